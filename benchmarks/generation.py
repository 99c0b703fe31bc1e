"""Masked generation throughput vs Hugging Face ``generate`` without masks, in one run.

Same model, dtype, batch (rows) and prompt; every row decodes exactly --new-tokens
tokens. The masked run uses random per-step keep masks at level 0.5 for every row,
applied by the project's hooks, as in a real evaluation (all metrics x levels of a
sample in one batch).

    python benchmarks/generation.py                               # CPU, smollm2-135m, 50 rows
    python benchmarks/generation.py --model random:cfg.json --tokenizer tok --dtype bfloat16 --rows 64
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arguments, load, machine, record, timed  # noqa: E402

from pipeline.decoding.cuda_graph import CapturedSteps  # noqa: E402
from pipeline.decoding.generation import greedy_generate  # noqa: E402
from pipeline.models.adapters import layout_for  # noqa: E402
from pipeline.models.prompts import prompt_ids  # noqa: E402

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def main():
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer, template = load(args)
    layout = layout_for(model)
    device = args.device
    prompt = torch.tensor(prompt_ids(tokenizer, template, "What happens to you if you eat watermelon seeds?"))
    rows, steps = args.rows, args.new_tokens
    batch = prompt.to(device).unsqueeze(0).repeat(rows, 1)

    def hf_generate():
        with torch.no_grad():
            return model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=steps,
                                  min_new_tokens=steps, do_sample=False, pad_token_id=0)

    # on the device, where a real run computes them from the scores
    generator = torch.Generator(device=device).manual_seed(0)
    head_keep = torch.rand(rows, steps, layout.num_layers, layout.num_heads, generator=generator, device=device) > 0.5
    neuron_keep = torch.rand(rows, steps, layout.num_layers, layout.num_neurons, generator=generator, device=device) > 0.5

    graphs = CapturedSteps(model)  # kept across calls, as a run keeps its own
    eager = CapturedSteps(model)
    eager.failed = True  # the plain Python loop, where CUDA graphs would otherwise be used

    def masked(captured=graphs):
        return greedy_generate(model, prompt, steps, [], head_keep, neuron_keep, graphs=captured)

    def unmasked():
        return greedy_generate(model, prompt, steps, [], torch.ones_like(head_keep), torch.ones_like(neuron_keep),
                               graphs=graphs)

    def masked_eager():
        return masked(eager)

    runs = {"hf": hf_generate, "masked": masked, "ones": unmasked}
    if str(device).startswith("cuda"):
        runs["eager"] = masked_eager
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up (and graph capture)
        fn()
    for _ in range(args.repeats):  # interleaved, best of
        for name, fn in runs.items():
            times[name].append(timed(fn, device)[1])
    best = {k: min(v) for k, v in times.items()}
    generated = rows * steps
    outputs = masked()
    assert all(len(r) == steps for r in outputs)
    lines = [
        f"model {args.model} ({args.dtype}), {rows} rows, prompt {len(prompt)} tokens, {steps} new tokens per row",
        f"HF generate, no masks:          {best['hf']:.3f} s  {generated / best['hf']:8.0f} tokens/s",
        f"project, masks at level 0.5:    {best['masked']:.3f} s  {generated / best['masked']:8.0f} tokens/s"
        f"  = {best['hf'] / best['masked']:.2f}x HF generate",
        f"project, all-ones masks:        {best['ones']:.3f} s  {generated / best['ones']:8.0f} tokens/s",
    ]
    if "eager" in best:
        same = sum(a == b for a, b in zip(outputs, masked_eager()))
        lines.append(f"project, masks, no CUDA graphs: {best['eager']:.3f} s  {generated / best['eager']:8.0f} tokens/s"
                     f"  = {best['hf'] / best['eager']:.2f}x HF generate; same tokens as with graphs in {same}/{rows} rows")
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
        bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
        if bandwidth:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_per_token = 2 * layout.num_layers * model.config.get_text_config().num_key_value_heads \
                if hasattr(model.config.get_text_config(), "num_key_value_heads") else 2 * layout.num_layers * layout.num_heads
            kv_bytes = kv_per_token * layout.head_dim * next(model.parameters()).element_size() * rows * (len(prompt) + steps / 2)
            limit = (weight_bytes + kv_bytes) / bandwidth
            step = best["masked"] / steps
            lines.append(f"per decoding step: {step * 1e3:.2f} ms vs memory-bandwidth limit {limit * 1e3:.3f} ms "
                         f"(weights + KV read once at {bandwidth / 1e12:.1f} TB/s) = {limit / step:.0%} of the limit")
    record(f"Masked generation: {args.model}, {args.dtype}, {machine(device).split(',')[0]}", lines, device, args.no_record)


if __name__ == "__main__":
    main()
