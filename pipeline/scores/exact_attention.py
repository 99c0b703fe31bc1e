"""An attention function whose backward pass keeps every token's gradient to itself.

docs/protocol.md §4.1 wants, for each generated token t, the gradient of *its* loss L_t with
respect to the unit outputs at *its* position, earlier positions held fixed: one
decoding step with a KV cache. A plain backward of ``sum_t L_t`` over the full
sequence is wrong: position t's keys and values also feed the queries of later
positions, so later losses leak into t's gradient.

Position mixing happens only in attention, so it is enough that gradient reaches the
keys and values of position j only from the query of position j itself. This
function computes ordinary attention values but builds the scores and the weighted
sum from a *detached* context for all pairs (i, j), then adds back, on the diagonal
only, the difference between the live key/value and the context (zero in value, but
carrying the gradient):

    s_ij = q_i . k_ctx_j + [i == j] (q_i . k_i - q_i . k_ctx_i)
    o_i  = sum_j p_ij v_ctx_j + p_ii (v_i - v_ctx_i)

With ``k_ctx = k.detach()`` the forward numbers equal eager attention and
``d(sum_t L_t)/dx_{l,t} = dL_t/dx_{l,t}`` exactly, for all tokens and layers at once.
For integrated gradients the context is a *recorded* dense pass: a scaled pass then
sees the dense, unscaled states of earlier positions, as a decoding step would.

When the context is this pass (``k_ctx = k`` in value), the same function runs as one
fused attention kernel over the detached context (``_fused``: cuDNN or memory-efficient
on CUDA, flash on CPU); the two diagonal terms, zero in value, enter only through their
gradients (``_OwnPosition``). The formula above, written out, serves integrated
gradients' replays and soft-capped models.

The function is registered with transformers' ``AttentionInterface`` (and the eager
mask function under the same name, so causal and sliding-window masks arrive as
additive 4-D tensors), so it works for every model that dispatches through that
interface, grouped-query and sliding-window layers included, without touching any
modeling code. A model uses it only inside an ``ExactAttention.mode`` block, which names it
in the model's config and restores the config's own implementation on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from pipeline.models.inputs import attention_implementation

IMPLEMENTATION = "sparseact_exact"


class ExactAttention:
    """The exact attention for one attribution call: switches ``model`` to it, pass by pass.

    ``mode(...)`` is the block of one pass: the model's config names this implementation
    inside it and its own again after it, and the function below reads this object and the
    mode from ``_ACTIVE``. A ``record`` pass keeps each layer's keys and values in this
    object for ``replay`` passes; leaving the ``with`` block of the object drops them.
    """

    def __init__(self, model):
        self.model = model
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(attention module) -> keys, values

    def __enter__(self) -> "ExactAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.recorded = {}

    @contextmanager
    def mode(self, mode: str = "live"):
        """One pass with the exact attention: ``live`` (context = this pass, detached), ``record``
        (the same, and keep it) or ``replay`` (context = the recorded pass)."""
        active = _ACTIVE.set((self, mode))
        try:
            with attention_implementation(self.model, IMPLEMENTATION):
                yield
        finally:
            _ACTIVE.reset(active)


# The pass in progress: transformers calls the registered function with the attention module
# only, so the block of ``ExactAttention.mode`` sets it here and resets it on exit.
_ACTIVE: ContextVar[tuple[ExactAttention | None, str]] = ContextVar("sparseact_exact_attention", default=(None, "live"))


def exact_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: the unit is the query head
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    attention, mode = _ACTIVE.get()
    if mode == "replay":
        key_ctx, value_ctx = attention.recorded[id(module)]
        if key_ctx.shape[0] != query.shape[0]:  # IG: every scaling step replays the same dense pass
            copies = query.shape[0] // key_ctx.shape[0]
            key_ctx, value_ctx = key_ctx.repeat(copies, 1, 1, 1), value_ctx.repeat(copies, 1, 1, 1)
    else:
        key_ctx, value_ctx = key.detach(), value.detach()
        if mode == "record":
            attention.recorded[id(module)] = (key_ctx, value_ctx)

    # Queries are the last positions; earlier keys may come from a no-grad cache.
    past = key.shape[-2] - query.shape[-2]
    mask = _additive_mask(attention_mask, query, key.shape[-2], past)
    if mode != "replay" and softcap is None and _FUSED.get(query.device.type):
        return _fused(query, key, value, key_ctx, value_ctx, mask, scaling, past), None
    # q_i . (k_i - k_ctx_i): zero in value unless replaying; carries the gradient to the own key
    own = (query * (key[..., past:, :] - key_ctx[..., past:, :])).sum(-1)
    scores = torch.matmul(query, key_ctx.transpose(-1, -2))
    scores.diagonal(offset=past, dim1=-2, dim2=-1).add_(own)  # own_i at (i, past + i); the matmul keeps no output
    scores = scores.mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.add_(mask)
    # softmax in at least fp32, as eager attention does (and in fp64 for fp64 models)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    own_probs = probs.diagonal(offset=past, dim1=-2, dim2=-1).unsqueeze(-1)
    out = torch.addcmul(torch.matmul(probs, value_ctx), own_probs, value[..., past:, :] - value_ctx[..., past:, :])
    return out.transpose(1, 2).contiguous(), probs


def _additive_mask(attention_mask, query, length: int, past: int) -> torch.Tensor:
    """``[batch or 1, 1 or heads, seq, length]`` to add to the scores: the model's mask, or a causal one."""
    if attention_mask is not None:
        return attention_mask[..., :length].to(query.dtype)
    causal = torch.ones(query.shape[-2], length, dtype=torch.bool, device=query.device).triu(1 + past)
    mask = torch.zeros(causal.shape, dtype=query.dtype, device=query.device).masked_fill(causal, float("-inf"))
    return mask.expand(query.shape[0], 1, -1, -1)


def _efficient(query, key, value, mask, scaling):
    # the memory-efficient kernel wants the bias's rows 16-element aligned: pad, then slice
    bias = F.pad(mask.expand(query.shape[0], query.shape[1], -1, -1), (0, -mask.shape[-1] % 16))[..., : mask.shape[-1]]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, scale=scaling)[:2]
    return out, lse[..., : query.shape[-2]]


def _cudnn(query, key, value, bias, scaling):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, bias, True, scale=scaling)[:2]
    return out, lse.reshape(query.shape[:-1])


_CUDNN_TAKES: dict[tuple, bool] = {}  # (dtype, head size, device): whether cuDNN ran it forward and backward


def _cudnn_takes(query) -> bool:
    """Whether cuDNN's attention runs this dtype and head size, backward included.

    Tried once on a tiny input: support depends on the GPU and the cuDNN and torch
    versions, and a backward that fails inside the attribution pass could not fall back.
    """
    key = (query.dtype, query.shape[-1], query.device)
    if key not in _CUDNN_TAKES:
        shape = (2, 2, 16, query.shape[-1])
        q, k, v = (torch.randn(shape, dtype=query.dtype, device=query.device, requires_grad=True) for _ in range(3))
        bias = torch.zeros(1, 1, 16, 16, dtype=query.dtype, device=query.device).expand(2, 2, -1, -1)
        try:
            with torch.enable_grad():
                _cudnn(q, k, v, bias, 1.0)[0].sum().backward()
            _CUDNN_TAKES[key] = True
        except (RuntimeError, TypeError):  # no cuDNN attention for this GPU, head size, cuDNN or torch version
            _CUDNN_TAKES[key] = False
    return _CUDNN_TAKES[key]


CUDNN_ATTENTION = False  # see _cuda


def _cuda(query, key, value, mask, scaling):
    """The memory-efficient kernel; cuDNN's attention (half precision) where ``CUDNN_ATTENTION``.

    The whole attribution pass took 118.9 ms with cuDNN against 122.0 ms with the
    memory-efficient kernel (Phi-2 shape, 64 prompts, bf16, H200, best of 5 on one
    shape), but cuDNN builds a plan for every new shape, and every block of a run has
    its own padded length: a whole run's attribution took 9.6 s with it in the first
    pass over 256 questions and 0.6 s once the plans existed (benchmarks/end_to_end.py).
    """
    if CUDNN_ATTENTION and query.dtype in (torch.float16, torch.bfloat16) and _cudnn_takes(query):
        return _cudnn(query, key, value, mask.expand(query.shape[0], query.shape[1], -1, -1), scaling)
    return _efficient(query, key, value, mask, scaling)


def _flash_cpu(query, key, value, mask, scaling):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=mask, scale=scaling)


# Fused attention kernels that also return each query's log-sum-exp, by device type.
_FUSED = {"cuda": _cuda, "cpu": _flash_cpu}


class _OwnPosition(torch.autograd.Function):
    """Identity on the attention output whose backward adds a position's own key and value gradients.

    In value the output is attention over the context; the formula's diagonal terms are
    zero there and only their derivatives count. With ``o_i`` the output, ``p_ii`` the
    query's weight on its own position, ``s_ii`` its score and ``g`` the gradient reaching
    ``o_i``: ``dL/dv_i = p_ii g`` and ``dL/dk_i = scaling p_ii <g, v_i - o_i> q_i`` (the
    softmax's ``do_i/ds_ii = p_ii (v_i - o_i)``). Writing them as one backward, rather than
    as zero-valued terms autograd differentiates, keeps the forward pass free of them
    and the backward to a few kernels per layer.
    """

    @staticmethod
    def forward(ctx, out, own_key, own_value, query, lse, own_mask, scaling):
        ctx.save_for_backward(out, own_key, own_value, query, lse, own_mask)
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, key, value, query, lse, own_mask = ctx.saved_tensors
        precise = torch.promote_types(query.dtype, torch.float32)  # at least fp32, fp64 for fp64 models
        score = (query * key).sum(-1, dtype=precise) * ctx.scaling + own_mask
        own_weight = torch.exp(score - lse)  # p_ii, [batch, heads, queries]
        key_coefficient = own_weight * (grad * (value - out)).sum(-1, dtype=precise) * ctx.scaling
        grad_key = key_coefficient.to(query.dtype).unsqueeze(-1) * query
        grad_value = own_weight.to(grad.dtype).unsqueeze(-1) * grad
        return grad, grad_key, grad_value, None, None, None, None


def _fused(query, key, value, key_ctx, value_ctx, mask, scaling, past):
    """The same function as the eager formula when the context is this pass (live, record).

    A fused kernel computes ordinary attention over the detached context (it gives the
    queries their whole gradient) and each query's log-sum-exp; ``_OwnPosition`` adds
    the gradient of each position's own key and value.
    """
    out, lse = _FUSED[query.device.type](query, key_ctx, value_ctx, mask, scaling)
    own_mask = mask.diagonal(offset=past, dim1=-2, dim2=-1)
    out = _OwnPosition.apply(out, key[..., past:, :], value[..., past:, :], query.detach(), lse.detach(),
                             own_mask, scaling)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(IMPLEMENTATION, exact_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
