"""Attribution speed: this project's engine vs the authors' algorithm vs Captum, in one run.

(a) ``attribute_batch``: the five default scores, one forward+backward per batch of samples.
(b) The authors' algorithm, re-implemented here as the baseline: for every generated
    token, every layer and every unit kind, one forward of the current position over a
    KV cache of the earlier ones and one backward (docs/protocol.md §10). Timed on a subset
    of tokens (and layers, with --baseline-layers) and scaled per generated token.
(c) Captum's ``LayerGradientXActivation`` on the same hook points (all layers at once),
    looping over tokens as a Captum user would: one forward+backward over the prefix
    per token.

(a) and (b) are checked to agree on the tokens (b) computed. Prints tokens/s and ratios.

    python benchmarks/attribution.py                       # CPU, smollm2-135m, 20 TruthfulQA questions
    python benchmarks/attribution.py --model random:cfg.json --tokenizer tok --dtype bfloat16 --questions 64
"""

from __future__ import annotations

import copy
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, load, machine, matmul_rate, prompts_and_labels, record, timed  # noqa: E402

from transformers import DynamicCache  # noqa: E402

from pipeline.models.inputs import forward_arguments  # noqa: E402
from pipeline.hooks import HEADS, NEURONS  # noqa: E402
from pipeline.models.adapters import layout_for  # noqa: E402
from pipeline.scores.attribution import attribute_batch  # noqa: E402
from pipeline.scores.metrics import DEFAULT_METRICS, head_scores, neuron_scores  # noqa: E402


def authors_baseline(model, layout, prompt, labels, tokens, layers):
    """x and g per (token, kind, layer), one forward+backward per (token, kind, layer)."""
    device = next(model.parameters()).device
    cache_name, _ = forward_arguments(model)
    out = {}
    for t in range(tokens):
        sequence = torch.cat([prompt, labels[:t]]).to(device).unsqueeze(0)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=sequence[:, :-1], use_cache=True, **{cache_name: cache})
        positions = torch.tensor([[sequence.shape[1] - 1]], device=device)
        for kind, modules in ((HEADS, layout.head_inputs), (NEURONS, layout.neuron_inputs)):
            for layer in layers:
                captured = {}

                def hook(module, args):
                    leaf = torch.zeros_like(args[0], requires_grad=True)
                    captured["x"], captured["leaf"] = args[0].detach(), leaf
                    return (args[0] + leaf,)

                handle = modules[layer].register_forward_pre_hook(hook)
                try:
                    with torch.enable_grad():
                        logits = model(input_ids=sequence[:, -1:], position_ids=positions, use_cache=True,
                                       **{cache_name: copy.deepcopy(cache)}).logits[0, -1]
                        loss = F.cross_entropy(logits.float().unsqueeze(0), labels[t:t + 1].to(device))
                        (g,) = torch.autograd.grad(loss, [captured["leaf"]])
                finally:
                    handle.remove()
                out[(t, kind, layer)] = (captured["x"].reshape(-1), g.reshape(-1))
    return out


def captum_per_token(model, layout, prompt, labels):
    from captum.attr import LayerGradientXActivation

    device = next(model.parameters()).device
    modules = list(layout.head_inputs) + list(layout.neuron_inputs)
    results = []
    for t in range(len(labels)):
        sequence = torch.cat([prompt, labels[:t]]).to(device).unsqueeze(0)
        label = int(labels[t])

        def loss_of(ids):
            return -torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)[:, label:label + 1]

        attribution = LayerGradientXActivation(loss_of, modules)
        with torch.enable_grad():
            attrs = attribution.attribute(sequence, target=0, attribute_to_layer_input=True)
        results.append([a[0, -1].detach() for a in attrs])
    return results


def main():
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--baseline-tokens", type=int, default=2)
    parser.add_argument("--baseline-layers", type=int, default=0, help="0 = all layers")
    parser.add_argument("--captum-samples", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="(a) is timed this many times, best kept")
    parser.add_argument("--baseline-dtype", default="float32", help="the authors ran fp32")
    args = parser.parse_args()

    model, tokenizer, template = load(args)
    layout = layout_for(model)
    prompts, labels = prompts_and_labels(model, tokenizer, template, args)
    total_tokens = sum(len(y) for y in labels)
    device = args.device

    # (a) this project: all samples, batched.
    def ours():
        results = []
        for i in range(0, len(prompts), args.batch_size):
            results += attribute_batch(model, prompts[i:i + args.batch_size], labels[i:i + args.batch_size],
                                       DEFAULT_METRICS)
        return results

    ours()  # warm-up (allocator, kernels)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [timed(ours, device) for _ in range(args.repeats)]
    scores, ours_time = runs[0][0], min(seconds for _, seconds in runs)  # best of
    if str(device).startswith("cuda"):
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:  # the process's peak resident memory (Linux reports KiB), model included
        peak = f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    ours_per_token = ours_time / total_tokens

    # (b) the authors' algorithm on a subset, scaled to all layers.
    layers = list(range(layout.num_layers))
    if args.baseline_layers:
        layers = layers[: args.baseline_layers]
    tokens = min(args.baseline_tokens, len(labels[0]))
    from pipeline.models.loading import DTYPES

    reference_model = model if args.baseline_dtype == args.dtype else copy.deepcopy(model).to(DTYPES[args.baseline_dtype])
    reference_layout = layout_for(reference_model)
    authors_baseline(reference_model, reference_layout, prompts[0], labels[0], 1, layers[:1])  # warm-up
    baseline, baseline_time = timed(
        lambda: authors_baseline(reference_model, reference_layout, prompts[0], labels[0], tokens, layers), device)
    baseline_per_token = baseline_time / tokens * layout.num_layers / len(layers)

    # agreement of (a) and (b) on what (b) computed
    worst = 0.0
    for metric in ("gxo", "cor_gxo"):
        for t in range(tokens):
            for layer in layers:
                x_h, g_h = baseline[(t, HEADS, layer)]
                x_n, g_n = baseline[(t, NEURONS, layer)]
                shape = (layout.num_heads, layout.head_dim)
                ref_h = head_scores(metric, x_h.view(shape).double(), g_h.view(shape).double())
                ref_n = neuron_scores(metric, x_n.double(), g_n.double())
                got_h = scores[0][metric].heads[t, layer].double()
                got_n = scores[0][metric].neurons[t, layer].double()
                worst = max(worst, ((got_h - ref_h).abs().max() / ref_h.abs().max()).item(),
                            ((got_n - ref_n).abs().max() / ref_n.abs().max()).item())

    overlap_lines = []
    if reference_model is not model:
        overlap_lines = kept_overlap(reference_model, prompts[: args.batch_size], labels[: args.batch_size],
                                     scores[: args.batch_size], args)
    lines = [
        f"model {args.model} ({args.dtype}), {len(prompts)} TruthfulQA prompts, {total_tokens} generated tokens, "
        f"{layout.num_layers} layers",
        f"(a) project, 5 scores, batch {args.batch_size}, best of {args.repeats}: {ours_time:.3f} s, {ours_per_token * 1e3:.3f} ms/token, "
        f"{total_tokens / ours_time:.1f} tokens/s, {peak}",
        f"(b) authors' algorithm (fp32 loss), {tokens} tokens x {len(layers)} layers x 2 kinds timed "
        f"({baseline_time:.2f} s), scaled: {baseline_per_token:.3f} s/token",
        f"    speed-up (a) vs (b): {baseline_per_token / ours_per_token:,.0f}x per generated token",
        f"    agreement (a) vs (b), gxo and cor_gxo: max relative error {worst:.2e}",
    ]

    lines += overlap_lines
    if args.captum_samples:
        try:
            n = args.captum_samples
            _, captum_time = timed(lambda: [captum_per_token(model, layout, p, y) for p, y in zip(prompts[:n], labels[:n])],
                                   device)
            captum_per = captum_time / sum(len(y) for y in labels[:n])
            lines += [f"(c) Captum LayerGradientXActivation per token, {n} sample(s): {captum_per:.3f} s/token",
                      f"    speed-up (a) vs (c): {captum_per / ours_per_token:,.0f}x per generated token"]
        except ImportError:
            lines.append("(c) Captum not installed (pip install captum): skipped")

    if str(device).startswith("cuda"):
        lines += flop_rate(model, prompts, labels, ours_time, args)
    record(f"Attribution: {args.model}, {args.dtype}, {machine(device).split(',')[0]}", lines, device, args.no_record)


def kept_overlap(reference_model, prompts, labels, scores, args):
    """How the lower-precision scores change the kept sets against the reference precision."""
    from pipeline.masks.masks import keep_masks

    reference = attribute_batch(reference_model, prompts, labels, DEFAULT_METRICS)
    lines = [f"kept-set overlap, {args.dtype} vs {args.baseline_dtype} scores ({len(prompts)} samples, "
             "|kept both| / |kept reference|):"]
    for metric in DEFAULT_METRICS:
        parts = []
        for level in (0.5, 0.8):
            for kind in ("heads", "neurons"):
                ours = torch.cat([keep_masks(getattr(s[metric], kind).float(), [level])[0].flatten() for s in scores])
                ref = torch.cat([keep_masks(getattr(r[metric], kind).float(), [level])[0].flatten() for r in reference])
                parts.append(f"{kind} p={level}: {(ours & ref).sum().item() / ref.sum().item():.3f}")
        lines.append(f"    {metric:<10} " + ", ".join(parts))
    return lines


def flop_rate(model, prompts, labels, seconds, args):
    """Attribution pass FLOP rate (3 x forward FLOPs) against a measured bf16 matmul rate.

    Counted two ways: over the padded batches the pass is given (``batch x longest
    sequence``, as the plain forward+backward reference of the task counts), and over
    the real tokens only.
    """
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    lengths = [len(p) + len(y) - 1 for p, y in zip(prompts, labels)]
    padded = sum(len(lengths[i:i + args.batch_size]) * max(lengths[i:i + args.batch_size])
                 for i in range(0, len(lengths), args.batch_size))
    peak = matmul_rate(args.device)
    lines = []
    for name, tokens in (("padded batch", padded), ("real tokens", sum(lengths))):
        achieved = 3 * 2 * params * tokens / seconds
        lines.append(f"    attribution pass, {name}: {achieved / 1e12:.0f} TFLOP/s (3x forward FLOPs, {params / 1e9:.2f} B "
                     f"non-embedding params, {tokens} tokens) = {achieved / peak:.0%} of measured bf16 matmul "
                     f"{peak / 1e12:.0f} TFLOP/s")
    return lines


if __name__ == "__main__":
    main()
