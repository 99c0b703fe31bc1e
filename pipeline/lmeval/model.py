"""The lm-eval model ``sparseact``: lm-eval's ``hf`` model with per-position unit masks.

See ``pipeline/lmeval/__init__.py`` for the semantics. Level 0 is lm-eval's ``HFLM``
unchanged; at level p > 0 ``_loglikelihood_tokens`` follows HFLM's batching (same sort
order, right padding, log-softmax) but computes each batch's logits with masks, and
``_model_generate`` decodes with per-step masks after HFLM's dense generation.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.lmeval import MODEL_NAME
from pipeline.decoding.cuda_graph import CapturedSteps
from pipeline.decoding.generation import DenseRun, masked_after_dense_batch
from pipeline.hooks import HEADS, UnitHooks
from pipeline.masks.allocation import allocate
from pipeline.models.adapters import layout_for
from pipeline.models.loading import DTYPES
from pipeline.models.prompts import stop_token_ids
from pipeline.scores.attribution import attribute_batch
from pipeline.scores.metrics import NEEDS_GRADIENT

ORACLE = frozenset(NEEDS_GRADIENT)  # gradient, gxo, snip, ig, cor_gxo: labels from the dense model
SERVED_LABEL_FREE = frozenset({"magnitude", "wina"})
SCORES = tuple(sorted(ORACLE | SERVED_LABEL_FREE))


# Allocations served here (pipeline.masks.allocation.allocate makes the masks): global and
# calibrated need what per-request serving does not have yet (calibration rows, a level grid).
ALLOCATIONS = ("per_layer",)

MODEL_ARGS = ("pretrained", "score", "level", "allocation", "dtype", "batch_size", "dense_first_step", "ig_steps",
              "device", "revision", "trust_remote_code", "cache_dir", "tokenizer", "max_length", "max_batch_size")


def check_args(score: str, level: float, allocation: str, dtype: str, batch_size, ig_steps=20) -> None:
    """Turn impossible model arguments into one clear ``UserError``."""
    if score == "static":
        raise UserError("score 'static' needs per-layer thresholds calibrated on held-out rows; "
                        f"sparseact lmeval serves {', '.join(SCORES)}")
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0.0 <= level < 1.0:
        raise UserError(f"level must be a number in [0, 1), got {level!r}")
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}; available: {', '.join(ALLOCATIONS)}")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be an integer >= 1 (no 'auto'), got {batch_size!r}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise UserError(f"ig_steps must be an integer >= 1, got {ig_steps!r}")


class PositionMasks:
    """Keep masks for chosen positions of a padded batch, read by ``UnitHooks``.

    ``index`` ``[N]``: flattened ``batch * seq`` positions; ``heads`` ``[N, layers, heads]``,
    ``neurons`` ``[N, layers, neurons]`` (bool). Every other position is left alone.
    """

    def __init__(self, rows: int, index: torch.Tensor, heads: torch.Tensor, neurons: torch.Tensor):
        self.rows, self.index, self.heads, self.neurons = rows, index, heads, neurons

    def apply(self, kind: str, layer: int, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        picked = flat.index_select(0, self.index)
        if kind == HEADS:
            picked = (picked.view(len(self.index), -1, head_dim) * self.heads[:, layer, :, None]).view_as(picked)
        else:
            picked = picked * self.neurons[:, layer]
        return flat.index_copy(0, self.index, picked).view_as(x)


def _device(device) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but no CUDA device is available (use device=cpu)")
    return device


@register_model(MODEL_NAME)
class SparseActLM(HFLM):
    """lm-eval model: a causal LM whose heads and neurons are switched off per position."""

    def __init__(self, pretrained="smollm2-135m", score: str = "wina", level: float = 0.0,
                 allocation: str = "per_layer", dtype: str = "float32", batch_size=1,
                 dense_first_step: bool = False, ig_steps: int = 20, device=None, revision=None,
                 trust_remote_code: bool = False, cache_dir=None, tokenizer=None, max_length=None,
                 max_batch_size=None, **unknown):
        if unknown:
            raise UserError(f"unknown model_args key(s) {', '.join(sorted(unknown))}; "
                            f"the sparseact model takes {', '.join(MODEL_ARGS)}")
        batch_size, ig_steps = (int(v) if isinstance(v, str) and v.isdigit() else v for v in (batch_size, ig_steps))
        level = float(level) if isinstance(level, int) and not isinstance(level, bool) else level
        check_args(score, level, allocation, dtype, batch_size, ig_steps)
        accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: lm-eval's data-parallel mode
            from accelerate import Accelerator

            accelerator = Accelerator()
            device = accelerator.device
        device = _device(device)
        if isinstance(pretrained, str):
            from pipeline.config import ModelConfig
            from pipeline.models.loading import load_model

            loaded = load_model(ModelConfig(name=pretrained, revision=revision, dtype=dtype, cache_dir=cache_dir,
                                            trust_remote_code=bool(trust_remote_code)), device)
            model, tokenizer, self.weights_id = loaded.model, loaded.tokenizer, loaded.weights_id
        else:  # an already loaded model object (tests, library use); its dtype and device are kept
            if tokenizer is None:
                raise UserError("a model object passed as pretrained needs its tokenizer")
            model, self.weights_id = pretrained, getattr(pretrained, "name_or_path", "object")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.score, self.level, self.allocation = score, float(level), allocation
        self.dense_first_step, self.ig_steps = bool(dense_first_step), int(ig_steps)
        self.dense = self.level == 0.0  # level 0: lm-eval's HFLM code path, untouched
        self.show_progress = True
        self._stop_ids = stop_token_ids(self.tokenizer, self.model)
        # this model's hooks, installed for its lifetime: idle (no probe, no masks) they change no number
        self.unit_hooks = None if self.dense else UnitHooks(layout_for(self.model)).install()
        self.graphs = CapturedSteps(self.model)  # its captured decoding steps, reused by every generate request
        if accelerator is not None and accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    # -- masks ---------------------------------------------------------------------------

    def keep(self, importance: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[steps, layers, units]`` of one request from its scores."""
        keep = allocate(self.allocation, importance, [self.level])[0]
        if self.dense_first_step:
            keep[0] = True
        return keep

    def _step_masks(self, prompts, labels, targets=None):
        """Per request, keep masks (heads, neurons) ``[T, layers, units]`` for its T steps."""
        scores = attribute_batch(self.model, prompts, labels, metrics=[self.score], ig_steps=self.ig_steps,
                                 targets=targets, hooks=self.unit_hooks)
        return [(self.keep(s[self.score].heads), self.keep(s[self.score].neurons)) for s in scores]

    @torch.no_grad()
    def masked_logits(self, batched: torch.Tensor, inplens: list[int], conts: list[list[int]]) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` of a right-padded batch with each step's own mask.

        Row b feeds ``context + y[:-1]`` (``inplens[b]`` tokens); steps are its last
        ``len(conts[b])`` positions.
        """
        rows, width = batched.shape
        starts = [n - len(c) for n, c in zip(inplens, conts)]  # the position predicting y_0
        prompts = [batched[b, : starts[b] + 1].cpu() for b in range(rows)]
        labels = [torch.tensor(c, dtype=torch.long) for c in conts]
        targets = None
        if self.score in ORACLE:  # labels: the dense model's argmax at every step
            dense = self._model_call(batched)
            targets = [dense[b, starts[b]: inplens[b]].argmax(-1).cpu() for b in range(rows)]
            del dense
        with torch.enable_grad():
            masks = self._step_masks(prompts, labels, targets)
        index = torch.cat([b * width + torch.arange(starts[b], inplens[b]) for b in range(rows)]).to(batched.device)
        hooks = self.unit_hooks
        hooks.masks = PositionMasks(rows, index, torch.cat([h for h, _ in masks]).to(batched.device),
                                    torch.cat([n for _, n in masks]).to(batched.device))
        try:
            return self._model_call(batched)
        finally:
            hooks.masks = None

    # -- lm-eval request types -------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.dense:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not self.show_progress,
                                                 override_bs=override_bs)
        # HFLM's batching (same order, right padding, softmax); no logits sharing between requests
        re_ord = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.show_progress or self.rank != 0,
                    desc=f"loglikelihood, {self.score} at {self.level}")
        for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
            inps, inplens, conts = [], [], []
            for _, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0 and 0 < len(continuation_enc) <= self.max_length
                inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                inps.append(torch.tensor(inp, dtype=torch.long, device=self.device))
                inplens.append(len(inp))
                conts.append(continuation_enc)
            batched = pad_and_concat(max(inplens), inps, padding_side="right")
            multi_logits = F.log_softmax(self.masked_logits(batched, inplens, conts), dim=-1, dtype=self.softmax_dtype)
            for (request_str, _, _), logits, inplen, cont_toks in zip(chunk, multi_logits, inplens, conts):
                logits = logits[inplen - len(cont_toks): inplen].unsqueeze(0)  # [1, T, vocab]
                cont = torch.tensor(cont_toks, dtype=torch.long, device=self.device).unsqueeze(0)
                greedy = bool((logits.argmax(-1) == cont).all())
                answer = (float(torch.gather(logits, 2, cont.unsqueeze(-1)).sum()), greedy)
                res.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.dense:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if generation_kwargs.get("do_sample") or float(generation_kwargs.get("temperature") or 0.0) > 0.0:
            raise UserError(f"score {self.score} at level {self.level}: generate_until requests must be greedy "
                            "(do_sample false, temperature 0); masks are defined on the dense greedy continuation")
        dense = super()._model_generate(context, max_length, stop, **dict(generation_kwargs))
        attention_mask = generation_kwargs.get("attention_mask")
        width = context.shape[1]
        prompts, labels = [], []
        for b in range(context.shape[0]):
            real = attention_mask[b].bool() if attention_mask is not None else torch.ones(width, dtype=torch.bool)
            prompts.append(context[b][real.to(context.device)])
            tokens = dense[b, width:].tolist()
            labels.append(torch.tensor(tokens[: self._label_length(tokens, stop)], dtype=torch.long))
        with torch.enable_grad():
            masks = self._step_masks([p.cpu() for p in prompts], labels)
        runs = [DenseRun(p, y.tolist(), None) for p, y in zip(prompts, labels)]
        outputs = masked_after_dense_batch(self.model, runs, [h[None] for h, _ in masks], [n[None] for _, n in masks],
                                           self._stop_ids, self.unit_hooks, graphs=self.graphs)
        rows = [context[b].tolist() + out[0] for b, out in enumerate(outputs)]
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        return torch.tensor([r + [pad] * (longest - len(r)) for r in rows], dtype=torch.long, device=context.device)

    def _label_length(self, tokens: list[int], stop: list[str]) -> int:
        """The dense continuation's steps: through the first end-of-sequence token or the
        first token that completes a stop sequence, else all of them."""
        for t, token in enumerate(tokens):
            if token in self._stop_ids:
                return t + 1
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        if not any(s and s in text for s in stop):
            return len(tokens)
        for t in range(1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[:t], skip_special_tokens=False)
            if any(s and s in text for s in stop):
                return t
        return len(tokens)

    def get_model_info(self) -> dict:
        # HFLM's asks the Hub for the model's sha; the weights id says which weights these are
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "sparseact_weights": self.weights_id, "sparseact_score": self.score,
                "sparseact_level": self.level, "sparseact_allocation": self.allocation,
                "sparseact_dense_first_step": self.dense_first_step}
