"""Allocation (per_layer, global, calibrated) against computations written out in plain Python."""

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_checkpoint, tiny_model

from pipeline.cli import main
from pipeline.masks.allocation import (
    ALLOCATIONS,
    NORMALIZATIONS,
    allocate,
    global_keep_masks,
    layer_level_keep_masks,
    normalized,
)
from pipeline.masks.calibration import (
    CalibrationRows,
    greedy_path,
    layer_gain,
    level_grid,
    levels_for,
    loss_table,
)
from pipeline.masks.masks import keep_masks
from pipeline.models.adapters import layout_for
from pipeline.results.record import Record
from pipeline.scores.attribution import attribute_batch
from pipeline.scores.metrics import SCORES

LEVELS = [0.0, 0.1, 0.25, 0.5, 0.7, 0.9]


def _floor(x: float) -> int:
    return math.floor(round(x, 9))


def _by_hand(values: list[float], how: str) -> list[float]:
    """One layer's scores made comparable, spelled out."""
    n = len(values)
    if how == "none":
        return list(values)
    if how == "mean":
        scale = sum(abs(v) for v in values) / n
    elif how == "l2":
        scale = math.sqrt(sum(v * v for v in values))
    else:  # rank: (rank + 1) / n, ties to the lower index
        order = sorted(range(n), key=lambda i: (values[i], i))
        rank = {unit: r for r, unit in enumerate(order)}
        return [(rank[i] + 1) / n for i in range(n)]
    scale = scale if scale > 0 else 1.0
    return [v / scale for v in values]


def _importance(tokens=4, layers=3, units=10, seed=0):
    """Integer-valued (so sums and norms are exact) with many ties, one all-zero layer at token 0."""
    g = torch.Generator().manual_seed(seed)
    importance = torch.randint(-3, 4, (tokens, layers, units), generator=g).double()
    importance[0, 1] = 0
    return importance


@pytest.mark.parametrize("how", list(NORMALIZATIONS))
def test_normalisations_match_hand_computation(how):
    importance = _importance()
    got = normalized(importance, how)
    for t in range(importance.shape[0]):
        for layer in range(importance.shape[1]):
            assert got[t, layer].tolist() == _by_hand(importance[t, layer].tolist(), how)


@pytest.mark.parametrize("how", list(NORMALIZATIONS))
@pytest.mark.parametrize("units", [4, 10])
def test_global_matches_sorting_all_units_by_hand(how, units):
    importance = _importance(units=units, seed=units)
    tokens, layers, _ = importance.shape
    masks = global_keep_masks(importance, LEVELS, how)
    assert masks.shape == (len(LEVELS), tokens, layers, units)
    for li, p in enumerate(LEVELS):
        for t in range(tokens):
            values = [_by_hand(importance[t, l].tolist(), how) for l in range(layers)]
            everything = sorted((values[l][u], l, u) for l in range(layers) for u in range(units))
            off = {(l, u) for _, l, u in everything[:_floor(p * layers * units)]}
            expected = [[(l, u) not in off for u in range(units)] for l in range(layers)]
            assert masks[li, t].tolist() == expected


def test_global_lets_layers_lose_different_counts():
    """A layer with small scores loses more than p of its units under global/none (per_layer cannot)."""
    importance = torch.rand(2, 3, 20, dtype=torch.float64)
    importance[:, 0] *= 0.01
    masks = global_keep_masks(importance, [0.3], "none")[0]
    lost = (~masks).float().mean(dim=(0, 2))
    assert lost[0] > 0.3 and lost[1:].max() < 0.3
    assert (~masks).sum().item() == 2 * math.floor(0.3 * 60)


def test_global_rank_equals_per_layer_when_p_n_is_whole():
    """Rank normalisation gives every layer the same values, so p*n whole -> exactly per_layer."""
    importance = torch.randn(5, 4, 10, dtype=torch.float64)
    levels = [0.0, 0.2, 0.5, 0.9]
    assert torch.equal(global_keep_masks(importance, levels, "rank"), keep_masks(importance, levels))


def test_layer_levels_match_hand_computation():
    importance = _importance(units=10, seed=3)
    tokens, layers, units = importance.shape
    layer_levels = torch.tensor([[0.0, 0.3, 0.9], [0.5, 0.5, 0.1]], dtype=torch.float64)
    masks = layer_level_keep_masks(importance, layer_levels)
    for row in range(2):
        for t in range(tokens):
            for layer in range(layers):
                values = importance[t, layer].tolist()
                order = sorted(range(units), key=lambda i: (values[i], i))
                off = set(order[:_floor(layer_levels[row, layer].item() * units)])
                assert masks[row, t, layer].tolist() == [i not in off for i in range(units)]
    same = torch.tensor([[p] * layers for p in LEVELS], dtype=torch.float64)
    assert torch.equal(layer_level_keep_masks(importance, same), keep_masks(importance, LEVELS))
    assert torch.equal(allocate("per_layer", importance, LEVELS), keep_masks(importance, LEVELS))


def test_every_score_row_names_known_allocations():
    for row in SCORES.values():
        assert set(row.allocations) <= set(ALLOCATIONS) and "per_layer" in row.allocations
        if "calibrated" in row.allocations:
            assert row.label_free  # levels searched on other rows need scores without labels


# ---- the greedy search ----------------------------------------------------------------

def _convex_table(layers, levels, rng):
    """Per layer, losses with non-decreasing increments (0 at level 0)."""
    table = []
    for _ in range(layers):
        steps = sorted(rng.uniform(0, 1) for _ in range(levels - 1))
        table.append([0.0] + list(itertools.accumulate(steps)))
    return table


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_optimal_on_separable_convex_losses(seed):
    rng = random.Random(seed)
    layers, levels = 3, 5
    table = _convex_table(layers, levels, rng)
    gain = [j / (layers * (levels - 1)) for j in range(levels)]  # every step adds the same sparsity
    moves = greedy_path(table, gain)
    assert len(moves) == layers * (levels - 1)
    state = [0] * layers
    for k, (layer, j) in enumerate(moves, start=1):
        assert j == state[layer] + 1
        state[layer] = j
        # exhaustive: the best configuration with k steps in total
        best = min(sum(table[l][c[l]] for l in range(layers))
                   for c in itertools.product(range(levels), repeat=layers) if sum(c) == k)
        assert sum(table[l][state[l]] for l in range(layers)) == pytest.approx(best, abs=1e-12)


def test_greedy_merges_steps_that_switch_nothing_off_and_levels_follow_the_path():
    grid = level_grid(0.1)
    assert grid == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    gain = [0.0, 0.0, 0.1, 0.1, 0.3, 0.3, 0.3, 0.3, 0.4, 0.4]  # steps of no gain are skipped
    table = [[0.0, 5.0, 1.0, 9.0, 2.0, 9.0, 9.0, 9.0, 4.0, 9.0], [0.0] * 10]
    moves = greedy_path(table, gain)
    for layer, j in moves:
        assert gain[j] > 0 and (j == 0 or gain[j] != gain[j - 1])
    levels = levels_for(moves, 2, grid, gain, [0.0, 0.05, 0.2, 0.8, 0.95])
    assert levels[0].tolist() == [0.0, 0.0]
    for row, p in zip(levels.tolist()[1:4], [0.05, 0.2, 0.8]):
        sparsity = sum(gain[grid.index(q)] for q in row)
        assert sparsity >= p
    assert levels[-1].tolist() == [0.8, 0.8]  # 0.95 is out of reach: the path's last state


def _slow_kl(model, layout, prompts, labels, heads, neurons, config):
    """Mean KL(dense || masked) with layer l at level q for every (l, q) in ``config``: each sample
    on its own, the whole sequence from scratch, the mask of token t spelled out at its position."""
    total, count, offset = 0.0, 0, 0
    for prompt, y in zip(prompts, labels):
        ids = torch.cat([prompt, y[:-1]]).unsqueeze(0)
        first = len(prompt) - 1
        handles = []
        for layer, q in config.items():
            for kind, modules, score in (("heads", layout.head_inputs, heads), ("neurons", layout.neuron_inputs, neurons)):
                width = score.shape[-1]
                mask = torch.ones(ids.shape[1], width)
                for t in range(len(y)):
                    values = score[offset + t, layer].tolist()
                    order = sorted(range(width), key=lambda i: (values[i], i))
                    for unit in order[:_floor(q * width)]:
                        mask[first + t, unit] = 0

                def hook(module, args, mask=mask):
                    x = args[0]
                    return ((x.view(1, x.shape[1], mask.shape[1], -1) * mask[None, :, :, None].to(x.dtype)).view_as(x),)
                handles.append(modules[layer].register_forward_pre_hook(hook))
        try:
            masked = model(input_ids=ids).logits[0, first:].double().log_softmax(-1)
        finally:
            for h in handles:
                h.remove()
        dense = model(input_ids=ids).logits[0, first:].double().log_softmax(-1)
        total += F.kl_div(masked, dense, log_target=True, reduction="sum").item()
        count += len(y)
        offset += len(y)
    return total / count


@pytest.fixture(scope="module")
def calibration_case():
    model = tiny_model("llama")
    layout = layout_for(model)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 90, (int(n),), generator=g) for n in (4, 7, 5)]
    labels = [torch.randint(3, 90, (int(n),), generator=g) for n in (6, 3, 5)]
    scores = attribute_batch(model, prompts, labels, metrics=["magnitude"])
    heads = torch.cat([s["magnitude"].heads for s in scores])
    neurons = torch.cat([s["magnitude"].neurons for s in scores])
    return model, layout, prompts, labels, heads, neurons


def test_loss_table_matches_slow_reference(calibration_case):
    model, layout, prompts, labels, heads, neurons = calibration_case
    grid = level_grid(0.25)
    table = loss_table(CalibrationRows(model, layout, prompts, labels), layout, heads, neurons, grid)
    for layer in range(layout.num_layers):
        assert table[layer][0] == 0.0
        for j, q in enumerate(grid[1:], start=1):
            expected = _slow_kl(model, layout, prompts, labels, heads, neurons, {layer: q})
            assert expected > 0
            assert table[layer][j] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_greedy_first_choice_is_the_exhaustive_best_single_step(calibration_case):
    """On 2 layers: the joint loss of every grid configuration, by the slow reference; the
    greedy's first move is the best configuration one step away from dense, and its
    path is the plain greedy on the table written out here."""
    model, layout, prompts, labels, heads, neurons = calibration_case
    grid = level_grid(0.25)
    table = loss_table(CalibrationRows(model, layout, prompts, labels), layout, heads, neurons, grid)
    gain = layer_gain(layout, grid)
    assert all(b > a for a, b in zip(gain, gain[1:]))
    joint = {c: _slow_kl(model, layout, prompts, labels, heads, neurons, dict(enumerate(grid[j] for j in c)))
             for c in itertools.product(range(len(grid)), repeat=layout.num_layers)}
    one_step = [c for c in joint if sorted(c) == [0, 1]]
    best = min(one_step, key=lambda c: joint[c])
    moves = greedy_path(table, gain)
    assert moves[0] == (best.index(1), 1)

    state, slow = [0, 0], []
    while any(j < len(grid) - 1 for j in state):
        costs = [((table[l][state[l] + 1] - table[l][state[l]]) / (gain[state[l] + 1] - gain[state[l]]), l)
                 for l in range(2) if state[l] < len(grid) - 1]
        _, layer = min(costs)
        state[layer] += 1
        slow.append((layer, state[layer]))
    assert moves == slow


# ---- end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _run(tiny_dir, out, *extra):
    main(["run", "--model.name", str(tiny_dir), "--data.limit", "3", "--protocol.levels", "[0.0, 0.3, 0.6]",
          "--protocol.max_new_tokens", "5", "--protocol.calibration_samples", "4", "--run.output_dir", str(out),
          "--run.progress", "false", *extra])
    return [Record.from_json(json.loads(line)) for line in (out / "records.jsonl").read_text().splitlines()]


def test_several_allocations_in_one_run_leave_per_layer_rows_alone(tiny_dir, tmp_path):
    alone = _run(tiny_dir, tmp_path / "per_layer", "--protocol.metrics", "[magnitude, cor_gxo]")
    both = _run(tiny_dir, tmp_path / "both", "--protocol.metrics", "[magnitude, cor_gxo]",
                "--protocol.allocation", "[per_layer, global]", "--protocol.normalize", "[none, mean]")
    assert len(both) == 3 * 2 * 3 * 3  # samples x metrics x (per_layer, global/none, global/mean) x levels
    assert {r.allocation for r in alone} == {"per_layer"} and {r.normalize for r in alone} == {None}
    by_key = {r.key: r for r in both}
    for record in alone:
        assert by_key[record.key] == record
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    groups = {(r["metric"], r["allocation"], r["normalize"]) for r in summary["rows"]}
    assert len(groups) == 6 and all(r["n"] == 3 for r in summary["rows"])
    assert "cor_gxo/global/mean" in summary["max_sparsity_within_5pct_loss"]
    run_info = json.loads((tmp_path / "both" / "run.json").read_text())
    assert run_info["numbers_affecting"]["protocol"]["allocation"] == ["per_layer", "global"]
    # the global rows switch off the same total count per token as per_layer; per layer it differs
    for record in both:
        if record.allocation == "global" and record.level > 0:
            kept = record.kept_neurons
            assert sum(kept) / len(kept) == pytest.approx(1 - _floor(record.level * 48 * 2) / 96, abs=1e-3)


def test_calibrated_levels_round_trip(tiny_dir, tmp_path, monkeypatch):
    first = _run(tiny_dir, tmp_path / "first", "--protocol.metrics", "[magnitude, wina]",
                 "--protocol.allocation", "calibrated", "--protocol.calibration_step", "0.25")
    saved = tmp_path / "first" / "allocation_levels.json"
    document = json.loads(saved.read_text())
    assert set(document["scores"]) == {"magnitude", "wina"} and document["grid"] == [0.0, 0.25, 0.5, 0.75]
    assert document["calibration_rows"] == ["demo:3", "demo:4", "demo:5", "demo:6"]  # after the evaluated rows
    # the achieved sparsity of a calibrated record is the path's parameter-weighted sparsity
    path = document["scores"]["magnitude"]["path"]
    for record in first:
        if record.metric == "magnitude" and record.level > 0:
            reached = next(step["sparsity"] for step in path if step["sparsity"] >= record.level - 1e-12)
            assert record.sparsity == pytest.approx(reached, abs=1e-6)

    import pipeline.masks.calibration as calibration

    def no_search(*args, **kwargs):
        raise AssertionError("levels were given: nothing to calibrate")

    monkeypatch.setattr(calibration, "calibrate_levels", no_search)  # levels_file calls it through the module
    again = _run(tiny_dir, tmp_path / "again", "--protocol.metrics", "[magnitude, wina]",
                 "--protocol.allocation", "calibrated", "--protocol.calibration_step", "0.25",
                 "--protocol.allocation_levels", str(saved), "--data.start", "30", "--data.limit", "3")
    assert (tmp_path / "again" / "allocation_levels.json").read_text() == saved.read_text()
    assert {r.allocation for r in again} == {"calibrated"} and len(again) == 3 * 2 * 3
    # same levels -> same per-layer counts: kept fractions per layer agree with the first run's at each level
    for metric in ("magnitude", "wina"):
        for level in (0.3, 0.6):
            kept = {tuple(r.kept_neurons) for r in first + again if r.metric == metric and r.level == level}
            assert len(kept) == 1
    fingerprints = [json.loads((tmp_path / d / "run.json").read_text())["numbers_affecting"]["protocol"]
                    for d in ("first", "again")]
    assert "allocation_levels" not in fingerprints[0] and len(fingerprints[1]["allocation_levels"]) == 64


def test_allocation_enters_the_fingerprint_only_when_it_is_not_per_layer():
    from dataclasses import asdict

    from pipeline.config import ProtocolConfig

    plain = ProtocolConfig()
    before = {k: v for k, v in asdict(plain).items()
              if k not in ("save_scores", "allocation", "normalize", "calibration_step", "allocation_levels")}
    assert plain.numbers_affecting() == before  # run directories of per_layer runs keep their fingerprint
    assert ProtocolConfig(normalize="rank").numbers_affecting() == before  # normalize means nothing here
    variants = [ProtocolConfig(allocation="global"), ProtocolConfig(allocation="global", normalize="l2"),
                ProtocolConfig(allocation=["per_layer", "global"]), ProtocolConfig(metrics=["magnitude"],
                                                                                   allocation="calibrated")]
    dicts = [v.numbers_affecting() for v in variants]
    assert all(d != before for d in dicts) and len({json.dumps(d, sort_keys=True) for d in dicts}) == len(dicts)


def test_sweep_runs_allocations_like_scores(tiny_dir, tmp_path):
    from pipeline.results.report import write_report

    config = tmp_path / "sweep.yaml"
    config.write_text(f"""models: [{{name: {tiny_dir}}}]
datasets: [{{limit: 2}}]
protocol: {{metrics: [magnitude, cor_gxo], allocation: [per_layer, global], normalize: rank, levels: [0.0, 0.5],
           max_new_tokens: 4}}
run: {{progress: false, plot: false}}
root: {tmp_path / "runs"}
""")
    main(["sweep", "--config", str(config)])
    (cell,) = (tmp_path / "runs").iterdir()
    records = [Record.from_json(json.loads(line)) for line in (cell / "records.jsonl").read_text().splitlines()]
    assert {(r.metric, r.allocation, r.normalize) for r in records} == {
        ("magnitude", "per_layer", None), ("magnitude", "global", "rank"),
        ("cor_gxo", "per_layer", None), ("cor_gxo", "global", "rank")}
    write_report([str(tmp_path / "runs")], str(tmp_path / "report"), "cor_gxo/global/rank", 0.5)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| cor_gxo/global/rank |" in markdown and "| magnitude/global/rank (label-free) |" in markdown


def test_a_new_score_is_one_row(monkeypatch):
    """A row added to the table is computed by the engine and accepted by the config, allocations included."""
    from pipeline.config import ProtocolConfig
    from pipeline.scores.attribution import attribute
    from pipeline.scores.metrics import EVERY_ALLOCATION, Score

    monkeypatch.setitem(SCORES, "cubed", Score("cubed", "magnitude cubed", lambda t: t.x.norm(dim=-1) ** 3,
                                               lambda t: t.abs_x ** 3, gradient=None, needs_labels=False,
                                               allocations=EVERY_ALLOCATION))
    model = tiny_model("llama")
    scores = attribute(model, torch.tensor([3, 17, 42]), torch.tensor([12, 77]), metrics=["cubed", "magnitude"])
    torch.testing.assert_close(scores["cubed"].neurons, scores["magnitude"].neurons ** 3)
    torch.testing.assert_close(scores["cubed"].heads, scores["magnitude"].heads ** 3)
    protocol = ProtocolConfig(metrics=["cubed", "cor_gxo"], allocation=["global", "calibrated"])
    protocol.validate()
    assert protocol.variants() == [("cubed", "global", "mean"), ("cubed", "calibrated", None),
                                   ("cor_gxo", "global", "mean")]


def test_sweep_refuses_a_cell_without_calibration_rows_before_running_any(tiny_dir, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""models: [{{name: {tiny_dir}}}]
datasets: [{{limit: 2}}, {{start: 30, limit: 3}}]
protocol: {{metrics: [magnitude], allocation: calibrated}}
root: {tmp_path / "runs"}
""")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(config)])
    assert exit_info.value.code == 2 and not (tmp_path / "runs").exists()
    assert "calibrates on the 16 rows after the evaluated ones, but only 1 remain" in capsys.readouterr().err


def test_score_table_names_every_allocation():
    from pipeline.masks import ALLOCATIONS
    from pipeline.scores.metrics import EVERY_ALLOCATION

    assert tuple(ALLOCATIONS) == EVERY_ALLOCATION
