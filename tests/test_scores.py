"""Every metric against a slow, obvious per-token reference.

The reference follows docs/protocol.md §4.1 literally: for token t, run the model on
prompt + y_0..y_{t-1} from scratch, take the loss of the last position only, and
differentiate it with respect to the unit outputs at the last position only.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from pipeline.models.adapters import layout_for
from pipeline.scores.attribution import attribute
from pipeline.scores.metrics import METRICS

PAPER_METRICS = [m for m in METRICS if m not in ("wina", "static")]  # own tests elsewhere

PROMPT = torch.tensor([3, 17, 42, 8, 23, 61, 5])
LABELS = torch.tensor([12, 77, 30, 4, 51, 9])  # more than the gemma3 sliding window of 4


def _last_position_pass(model, ids, label, scale=None):
    """Unit outputs and gradients at the last position; ``scale`` = (kind, layer, alpha)."""
    layout = layout_for(model)
    outputs, leaves, handles = {}, {}, []

    def make_hook(kind, layer):
        def hook(module, args):
            x = args[0].view(1, -1, args[0].shape[-1])  # OPT passes [seq, features]
            last = x[:, -1:]
            outputs[(kind, layer)] = last.detach().clone()
            leaf = torch.zeros_like(last, requires_grad=True)
            leaves[(kind, layer)] = leaf
            alpha = scale[2] if scale is not None and scale[:2] == (kind, layer) else 1.0
            return (torch.cat([x[:, :-1], alpha * last + leaf], dim=1).view_as(args[0]),)
        return hook

    for layer, module in enumerate(layout.head_inputs):
        handles.append(module.register_forward_pre_hook(make_hook("heads", layer)))
    for layer, module in enumerate(layout.neuron_inputs):
        handles.append(module.register_forward_pre_hook(make_hook("neurons", layer)))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids.unsqueeze(0)).logits[0, -1]
            loss = F.cross_entropy(logits.unsqueeze(0), label.view(1))
            keys = list(leaves)
            grads = dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys])))
    finally:
        for h in handles:
            h.remove()
    return outputs, grads


def _reference_scores(model, metric, ig_steps=3):
    layout = layout_for(model)
    L, H, D, N = layout.num_layers, layout.num_heads, layout.head_dim, layout.num_neurons
    heads = torch.zeros(len(LABELS), L, H, dtype=torch.float64)
    neurons = torch.zeros(len(LABELS), L, N, dtype=torch.float64)
    for t in range(len(LABELS)):
        ids = torch.cat([PROMPT, LABELS[:t]])
        x, g = _last_position_pass(model, ids, LABELS[t])
        for l in range(L):
            xh, gh = x[("heads", l)].view(H, D), g[("heads", l)].view(H, D)
            xn, gn = x[("neurons", l)].view(N), g[("neurons", l)].view(N)
            if metric == "ig":
                gh = sum(_last_position_pass(model, ids, LABELS[t], ("heads", l, k / ig_steps))[1][("heads", l)]
                         for k in range(1, ig_steps + 1)).view(H, D) / ig_steps
                gn = sum(_last_position_pass(model, ids, LABELS[t], ("neurons", l, k / ig_steps))[1][("neurons", l)]
                         for k in range(1, ig_steps + 1)).view(N) / ig_steps
            for h in range(H):  # per unit, spelled out
                prod = (gh[h] * xh[h]).mean()
                heads[t, l, h] = {
                    "magnitude": xh[h].norm(),
                    "gradient": -gh[h].mean(),
                    "gxo": -prod,
                    "snip": prod.abs(),
                    "ig": -prod,
                    "cor_gxo": -prod + 0.5 * xh[h].norm() * torch.stack([gh[j].mean() for j in range(H)]).norm(),
                }[metric]
            for i in range(N):
                neurons[t, l, i] = {
                    "magnitude": xn[i].abs(),
                    "gradient": -gn[i],
                    "gxo": -gn[i] * xn[i],
                    "snip": (gn[i] * xn[i]).abs(),
                    "ig": -gn[i] * xn[i],
                    "cor_gxo": -gn[i] * xn[i] + 0.5 * xn[i].abs() * gn.norm(),
                }[metric]
    return heads, neurons


def _assert_close(actual, expected):
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() / scale <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "phi", "gemma3"])
@pytest.mark.parametrize("metric", PAPER_METRICS)
def test_metric_matches_per_token_reference(arch, metric):
    model = tiny_model(arch)
    fast = attribute(model, PROMPT, LABELS, metrics=[metric], ig_steps=3)[metric]
    heads, neurons = _reference_scores(model, metric)
    assert fast.heads.shape == heads.shape and fast.neurons.shape == neurons.shape
    _assert_close(fast.heads, heads)
    _assert_close(fast.neurons, neurons)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox", "opt", "gpt2", "phi3", "mistral"])
def test_cor_gxo_on_other_architectures(arch):
    model = tiny_model(arch)
    fast = attribute(model, PROMPT, LABELS, metrics=["cor_gxo"])["cor_gxo"]
    heads, neurons = _reference_scores(model, "cor_gxo")
    _assert_close(fast.heads, heads)
    _assert_close(fast.neurons, neurons)


def test_full_sequence_backward_would_be_wrong():
    """Guard against a reference that cannot fail: a naive full-sequence backward differs from it."""
    model = tiny_model("llama")
    layout = layout_for(model)
    leaves = {}

    def hook(module, args):
        leaves["x"] = torch.zeros_like(args[0], requires_grad=True)
        return (args[0] + leaves["x"],)

    handle = layout.neuron_inputs[0].register_forward_pre_hook(hook)
    ids = torch.cat([PROMPT, LABELS[:-1]]).unsqueeze(0)
    with torch.enable_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1:]
        (naive,) = torch.autograd.grad(F.cross_entropy(logits, LABELS, reduction="sum"), [leaves["x"]])
    handle.remove()
    _, reference = _last_position_pass(model, PROMPT, LABELS[0])  # token 0's own gradient
    assert (naive[0, len(PROMPT) - 1] - reference[("neurons", 0)].view(-1)).abs().max() > 1e-6


def test_ig_with_one_step_equals_gxo():
    model = tiny_model("phi")
    scores = attribute(model, PROMPT, LABELS, metrics=["gxo", "ig"], ig_steps=1)
    torch.testing.assert_close(scores["ig"].heads, scores["gxo"].heads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scores["ig"].neurons, scores["gxo"].neurons, rtol=1e-9, atol=1e-12)


def test_attribution_leaves_the_model_untouched():
    model = tiny_model("llama")
    before = model(input_ids=PROMPT.unsqueeze(0)).logits
    attribute(model, PROMPT, LABELS, metrics=["cor_gxo", "ig"], ig_steps=2)
    after = model(input_ids=PROMPT.unsqueeze(0)).logits
    assert torch.equal(before, after)
    assert model.config._attn_implementation != "sparseact_exact"


BATCH = [
    (torch.tensor([3, 17, 42, 8, 23]), torch.tensor([12, 77, 30, 4, 51, 9])),
    (torch.tensor([5, 9]), torch.tensor([60, 2, 33])),
    (torch.tensor([7, 1, 88, 14, 19, 26, 40, 2]), torch.tensor([45, 6])),
]


def _reference_for(model, prompt, labels, metric):
    global PROMPT, LABELS
    saved = PROMPT, LABELS
    PROMPT, LABELS = prompt, labels
    try:
        return _reference_scores(model, metric)
    finally:
        PROMPT, LABELS = saved


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "phi", "gemma3"])
def test_batched_samples_of_different_lengths(arch, padding_side):
    from pipeline.scores.attribution import attribute_batch

    model = tiny_model(arch)
    results = attribute_batch(model, [p for p, _ in BATCH], [y for _, y in BATCH], metrics=PAPER_METRICS, ig_steps=3,
                              padding_side=padding_side)
    for (prompt, labels), result in zip(BATCH, results):
        for metric in PAPER_METRICS:
            heads, neurons = _reference_for(model, prompt, labels, metric)
            assert result[metric].heads.shape == heads.shape
            _assert_close(result[metric].heads, heads)
            _assert_close(result[metric].neurons, neurons)


def _relative_error(results, expected, metric):
    worst = 0.0
    for result, reference in zip(results, expected):
        for kind in ("heads", "neurons"):
            got, want = getattr(result[metric], kind).double().cpu(), getattr(reference[metric], kind)
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "phi", "gemma3"])
def test_cuda_fused_kernels_match_the_cpu_reference(arch, monkeypatch):
    """On a GPU the pass runs through CUDA's kernels (memory-efficient in fp32, cuDNN in bf16).

    fp32 must equal the fp64 CPU result (itself checked against the per-token reference
    above); bf16 must be no further from it than the written-out formula in bf16.
    """
    from pipeline.scores import exact_attention
    from pipeline.scores.attribution import attribute_batch

    metrics = ["gxo", "cor_gxo"]
    prompts, labels = [p for p, _ in BATCH], [y for _, y in BATCH]
    model = tiny_model(arch)
    expected = attribute_batch(model, prompts, labels, metrics=metrics)
    model.to("cuda", torch.float32)
    fp32 = attribute_batch(model, prompts, labels, metrics=metrics)
    assert all(_relative_error(fp32, expected, metric) <= 1e-4 for metric in metrics)
    model.to(torch.bfloat16)
    fused = attribute_batch(model, prompts, labels, metrics=metrics)
    monkeypatch.delitem(exact_attention._FUSED, "cuda")
    written_out = attribute_batch(model, prompts, labels, metrics=metrics)
    for metric in metrics:
        assert _relative_error(fused, expected, metric) <= 2 * _relative_error(written_out, expected, metric) + 1e-3


@pytest.mark.parametrize("arch", ["opt", "gpt2", "gpt_neox", "qwen2", "phi3", "mistral"])
def test_batched_left_padding_other_architectures(arch):
    from pipeline.scores.attribution import attribute_batch

    model = tiny_model(arch)
    results = attribute_batch(model, [p for p, _ in BATCH], [y for _, y in BATCH], metrics=["cor_gxo"],
                              padding_side="left")
    for (prompt, labels), result in zip(BATCH, results):
        heads, neurons = _reference_for(model, prompt, labels, "cor_gxo")
        _assert_close(result["cor_gxo"].heads, heads)
        _assert_close(result["cor_gxo"].neurons, neurons)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_wina_matches_weight_loop(arch):
    """WINA needs no labels: |x_i| ||W_down[:, i]|| and ||W_o[:, head h] x_h||, spelled out."""
    model = tiny_model(arch)
    layout = layout_for(model)
    fast = attribute(model, PROMPT, LABELS, metrics=["wina"])["wina"]
    H, D, N = layout.num_heads, layout.head_dim, layout.num_neurons
    for t in range(len(LABELS)):
        x, _ = _last_position_pass(model, torch.cat([PROMPT, LABELS[:t]]), LABELS[t])
        for l in range(layout.num_layers):
            o, down = layout.head_inputs[l], layout.neuron_inputs[l]
            w_o = o.weight if isinstance(o, torch.nn.Linear) else o.weight.t()
            w_down = down.weight if isinstance(down, torch.nn.Linear) else down.weight.t()
            xh, xn = x[("heads", l)].view(H, D), x[("neurons", l)].view(N)
            for h in range(H):
                expected = (w_o[:, h * D:(h + 1) * D] @ xh[h]).norm()
                assert torch.isclose(fast.heads[t, l, h], expected, rtol=1e-9)
            for i in range(N):
                assert torch.isclose(fast.neurons[t, l, i], xn[i].abs() * w_down[:, i].norm(), rtol=1e-9)


def test_shared_neuron_terms_equal_the_formulas():
    """The fused neuron scores (shared |x|, -g, -g*x) equal each metric's own formula."""
    from pipeline.scores.metrics import neuron_score_set, neuron_scores

    torch.manual_seed(0)
    x, g, g_ig = (torch.randn(5, 3, 40, dtype=torch.float64) for _ in range(3))
    metrics = ["magnitude", "gradient", "gxo", "snip", "cor_gxo", "ig", "static"]
    fused = neuron_score_set(metrics, x, g, g_ig)
    for metric in metrics:
        expected = neuron_scores(metric, x, g_ig if metric == "ig" else g)
        torch.testing.assert_close(fused[metric], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("answer_tokens", [1, 2])
def test_one_token_answer_fp32_precision(answer_tokens, device):
    """fp32 scores of a short answer are as close to fp64 as a plain per-token recomputation in fp32.

    A model with a real-sized vocabulary (49152, like SmolLM2): with logits kept for the
    answer's one or two positions only, the LM head's backward became a matrix-vector
    product over the vocabulary and the gradients were ~10x further from fp64 (2.2e-4
    relative for SmolLM2 against 1.8e-5 for the recomputation).
    """
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model32 = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    model64 = tf.LlamaForCausalLM(config).double().eval().requires_grad_(False)
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    model32.to(device)  # fp64 stays on the CPU: the reference
    prompt = torch.randint(0, 49152, (24,), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 49152, (answer_tokens,), generator=torch.Generator().manual_seed(2))
    t = answer_tokens - 1
    relative = lambda a, b: float((a.double().cpu() - b).norm() / b.norm())  # noqa: E731
    fast = {m: attribute(m, prompt, labels, metrics=["gxo"])["gxo"] for m in (model32, model64)}
    ids = torch.cat([prompt, labels[:t]])
    plain = {}
    for m in (model32, model64):
        where = next(m.parameters()).device
        x, g = _last_position_pass(m, ids.to(where), labels[t].to(where))
        plain[m] = torch.cat([(-g[k] * x[k]).flatten().double().cpu() for k in sorted(x)])
    plain_error = relative(plain[model32], plain[model64])
    for kind in ("heads", "neurons"):
        fast_error = relative(getattr(fast[model32], kind)[t], getattr(fast[model64], kind)[t])
        assert fast_error <= 2 * plain_error, (kind, fast_error, plain_error)
