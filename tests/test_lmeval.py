"""The lm-eval model ``sparseact`` against independent computations.

* level 0 equals lm-eval's own ``hf`` model (HFLM) on the offline tasks: tiny model, SmolLM2;
* at level p with a label-free score, per-position log-likelihoods equal a step-by-step
  recomputation in which each position runs a copy of the model whose switched-off units'
  weights are zeroed (down-projection columns, output-projection head columns);
* an oracle score on a log-likelihood request takes the dense argmax as labels (slow
  per-position gradients, written here);
* a killed ``sparseact lmeval`` run resumes without redoing finished requests;
* bad input: one line, exit status != 0.
"""

from __future__ import annotations

import copy
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import make_tiny_checkpoint, shared_file

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.lmeval.model import SparseActLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "configs" / "lm_eval" / "tasks"
LOCAL_TASKS = ["truthfulqa_mc1_local", "truthfulqa_mc2_local", "gsm8k_local"]

# Written here, not taken from the adapter table: (head projection, neuron projection) per block.
PROJECTIONS = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def manager():
    shared_file("truthfulqa", "TruthfulQA.csv")
    shared_file("gsm8k", "test.jsonl")
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _tiny(tiny_dir, arch="llama"):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    if arch == "llama":
        model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
    else:
        from conftest import tiny_model

        model = tiny_model(arch, dtype=torch.float64, seed=1)
    return model.to(torch.float64).eval().requires_grad_(False), tokenizer


def _evaluate(lm, manager, tasks, limit):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                                   gen_kwargs="max_gen_toks=12")


def _same_numbers(ours, theirs):
    for task in ours["results"]:
        assert ours["results"][task] == theirs["results"][task], task
        assert [s["resps"] for s in ours["samples"][task]] == [s["resps"] for s in theirs["samples"][task]], task


# -- (a) level 0 is lm-eval's hf model ----------------------------------------------------

def test_level_zero_equals_hf_on_tiny_model(tiny_dir, manager):
    model, tokenizer = _tiny(tiny_dir)
    model = model.float()
    ours = _evaluate(SparseActLM(pretrained=model, tokenizer=tokenizer, level=0.0, batch_size=2), manager,
                     LOCAL_TASKS, 3)
    theirs = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2), manager, LOCAL_TASKS, 3)
    _same_numbers(ours, theirs)


def test_level_zero_equals_hf_on_smollm2(manager):
    from pipeline.config import ModelConfig
    from pipeline.errors import UserError
    from pipeline.models.loading import load_model

    try:
        loaded = load_model(ModelConfig(name="smollm2-135m"))
    except UserError as error:
        pytest.skip(str(error))
    tasks = ["truthfulqa_mc1_local", "gsm8k_local"]
    ours = _evaluate(SparseActLM(pretrained="smollm2-135m", level=0.0, batch_size=4, device="cpu"), manager, tasks, 1)
    theirs = _evaluate(HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4), manager, tasks, 1)
    _same_numbers(ours, theirs)


# -- the independent per-position computation ------------------------------------------------

def _blocks(model, arch):
    return model.model.layers if arch == "llama" else model.transformer.h


def _out_in(module):
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()  # GPT-2's Conv1D is [in, out]


def _zeroed(model, arch, heads_off, neurons_off, head_dim):
    """A copy whose switched-off units are removed: their columns of the output projections zeroed."""
    copy_ = copy.deepcopy(model)
    for layer, block in enumerate(_blocks(copy_, arch)):
        head_proj, neuron_proj = (block.get_submodule(n) for n in PROJECTIONS[arch])
        w = _out_in(head_proj)
        for h in heads_off[layer]:
            w[:, h * head_dim:(h + 1) * head_dim] = 0
        w = _out_in(neuron_proj)
        for n in neurons_off[layer]:
            w[:, n] = 0
    return copy_


def _lowest(scores: torch.Tensor, level: float) -> list[list[int]]:
    """Per layer (rows of ``[layers, units]``) the floor(level * units) lowest-scoring units."""
    count = int(level * scores.shape[-1] + 1e-9)
    return [sorted(row.argsort(stable=True)[:count].tolist()) for row in scores]


def _step(model, ids, cache, grad_of=None):
    """One forward over ``ids`` ([1, n]) reading and extending ``cache``; with ``grad_of`` (arch), the unit
    outputs at the last position are recorded with a zero leaf added, to differentiate against."""
    records, handles = {}, []
    if grad_of is not None:
        for layer, block in enumerate(_blocks(model, grad_of)):
            for kind, name in zip(("heads", "neurons"), PROJECTIONS[grad_of]):
                def hook(module, args, key=(kind, layer)):
                    x = args[0]
                    leaf = torch.zeros_like(x[:, -1:]).requires_grad_()
                    records[key] = (x[0, -1].detach(), leaf)
                    return (torch.cat([x[:, :-1], x[:, -1:] + leaf], dim=1),)
                handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits, records


def _masked_logprobs(model, arch, ids, start, conts, masks, head_dim):
    """Log-probabilities of ``conts`` at steps 0..T-1, each position run by its own zeroed copy."""
    cache = tf.DynamicCache(config=model.config)
    if start:
        _step(model, ids[None, :start], cache)  # the context: dense
    out = []
    for t, (heads_off, neurons_off) in enumerate(masks):
        logits, _ = _step(_zeroed(model, arch, heads_off, neurons_off, head_dim), ids[None, start + t:start + t + 1],
                          cache)
        out.append(torch.log_softmax(logits, -1)[conts[t]].item())
    return out


def _ours_per_position(lm, context, continuation_words):
    """Per-position log-likelihoods from the model's public loglikelihood, by prefix differences."""
    requests = [Instance("loglikelihood", {}, (context, " " + " ".join(continuation_words[:k])), idx=0)
                for k in range(1, len(continuation_words) + 1)]
    sums = [ll for ll, _ in lm.loglikelihood(requests)]
    return [sums[0]] + [b - a for a, b in zip(sums, sums[1:])]


CONTEXT = "Instruct: w3 w17 the w40 is w8 ? Output:"
CONTINUATION = ["w12", "w5", "the", "w33", "w71", "."]


def _ids(lm, context, words):
    ctx, cont = lm._encode_pair(context, " " + " ".join(words))
    return torch.tensor(ctx + cont[:-1]), len(ctx) - 1, cont


# -- (b) label-free: zeroed weights, position by position -------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("score", ["magnitude", "wina"])
def test_label_free_equals_zeroed_weights_per_position(tiny_dir, arch, score):
    model, tokenizer = _tiny(tiny_dir, arch)
    level = 0.5
    lm = SparseActLM(pretrained=model, tokenizer=tokenizer, score=score, level=level, batch_size=4)
    ids, start, conts = _ids(lm, CONTEXT, CONTINUATION)
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads

    # dense unit outputs at every position (one pass, own hooks)
    seen, handles = {}, []
    for layer, block in enumerate(_blocks(model, arch)):
        for kind, name in zip(("heads", "neurons"), PROJECTIONS[arch]):
            handles.append(block.get_submodule(name).register_forward_pre_hook(
                lambda m, args, key=(kind, layer): seen.__setitem__(key, args[0][0].clone())))
    model(ids[None])
    for handle in handles:
        handle.remove()
    layers = range(len(_blocks(model, arch)))
    masks = []
    for t in range(len(conts)):
        position = start + t
        x_heads = torch.stack([seen[("heads", l)][position].view(heads, head_dim) for l in layers])
        x_neurons = torch.stack([seen[("neurons", l)][position] for l in layers])
        if score == "magnitude":
            head_scores, neuron_scores = x_heads.norm(dim=-1), x_neurons.abs()
        else:
            head_scores = torch.stack([
                torch.stack([(_out_in(_blocks(model, arch)[l].get_submodule(PROJECTIONS[arch][0]))
                               [:, h * head_dim:(h + 1) * head_dim] @ x_heads[l, h]).norm() for h in range(heads)])
                for l in layers])
            column_norms = torch.stack([_out_in(_blocks(model, arch)[l].get_submodule(PROJECTIONS[arch][1])).norm(dim=0)
                                        for l in layers])
            neuron_scores = x_neurons.abs() * column_norms
        masks.append((_lowest(head_scores, level), _lowest(neuron_scores, level)))

    expected = _masked_logprobs(model, arch, ids, start, conts, masks, head_dim)
    ours = _ours_per_position(lm, CONTEXT, CONTINUATION)
    assert ours == pytest.approx(expected, abs=1e-9, rel=1e-9)
    dense = _masked_logprobs(model, arch, ids, start, conts, [([[]] * len(layers), [[]] * len(layers))] * len(conts),
                             head_dim)
    assert max(abs(a - b) for a, b in zip(ours, dense)) > 1e-3  # the masks do something


# -- (c) oracle scores take the dense argmax as labels ------------------------------------------

def _gradient_masks(model, arch, ids, start, labels, level, heads, head_dim):
    """``gradient`` score (-dL/dx; heads: mean over the head's outputs), L = CE(step t, labels[t]),
    each step differentiated alone with earlier positions held fixed (a KV cache of the dense run)."""
    masks = []
    layers = range(len(_blocks(model, arch)))
    for t in range(len(labels)):
        cache = tf.DynamicCache(config=model.config)
        position = start + t
        with torch.no_grad():
            _step(model, ids[None, :position], cache)
        with torch.enable_grad():
            logits, records = _step(model, ids[None, position:position + 1], cache, grad_of=arch)
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([labels[t]]))
            keys = [(k, l) for k in ("heads", "neurons") for l in layers]
            grads = dict(zip(keys, torch.autograd.grad(loss, [records[k][1] for k in keys])))
        head_scores = torch.stack([-grads[("heads", l)][0, 0].view(heads, head_dim).mean(-1) for l in layers])
        neuron_scores = torch.stack([-grads[("neurons", l)][0, 0] for l in layers])
        masks.append((_lowest(head_scores, level), _lowest(neuron_scores, level)))
    return masks


def test_oracle_loglikelihood_uses_dense_argmax_labels(tiny_dir):
    model, tokenizer = _tiny(tiny_dir)
    level, heads = 0.5, model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    lm = SparseActLM(pretrained=model, tokenizer=tokenizer, score="gradient", level=level, batch_size=3)
    ids, start, conts = _ids(lm, CONTEXT, CONTINUATION)
    argmax = model(ids[None]).logits[0, start:].argmax(-1).tolist()
    assert argmax != conts  # the two label choices differ, so the test tells them apart

    expected = _masked_logprobs(model, "llama", ids, start, conts,
                                _gradient_masks(model, "llama", ids, start, argmax, level, heads, head_dim), head_dim)
    ours = _ours_per_position(lm, CONTEXT, CONTINUATION)
    assert ours == pytest.approx(expected, abs=1e-9, rel=1e-9)
    given = _masked_logprobs(model, "llama", ids, start, conts,
                             _gradient_masks(model, "llama", ids, start, conts, level, heads, head_dim), head_dim)
    assert max(abs(a - b) for a, b in zip(ours, given)) > 1e-6


# -- the command: run directory, resume after SIGKILL, bad input ----------------------------------

def _lmeval_args(tiny_dir, out, *extra):
    return ["lmeval", "--model.name", str(tiny_dir), "--tasks", "[truthfulqa_mc1_local]", "--limit", "6",
            "--score", "magnitude", "--level", "0.5", "--batch_size", "2", "--device", "cpu",
            "--output_dir", str(out), "--progress", "false", *extra]


def _cached(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0


def test_killed_run_resumes_without_redoing_requests(tiny_dir, tmp_path, manager, monkeypatch):
    out = tmp_path / "run"
    slow = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(ROOT)!r}]
        import pipeline.lmeval.model as m
        original = m.SparseActLM.masked_logits
        def slow(self, *args):
            time.sleep(0.4)
            return original(self, *args)
        m.SparseActLM.masked_logits = slow
        from pipeline.cli import main
        main({_lmeval_args(tiny_dir, out)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "cache" / "requests_rank0.db"
    deadline = time.time() + 60
    while _cached(db) < 6 and time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = _cached(db)
    assert done >= 6 and not (out / "results.json").exists()

    calls = []
    original = SparseActLM.masked_logits
    monkeypatch.setattr(SparseActLM, "masked_logits", lambda self, batched, *a: (calls.append(batched.shape[0]),
                                                                                   original(self, batched, *a))[1])
    main(_lmeval_args(tiny_dir, out))
    total = _cached(db)
    assert sum(calls) == total - done  # only the requests the killed run had not finished
    resumed = json.loads((out / "results.json").read_text())["results"]

    main(_lmeval_args(tiny_dir, tmp_path / "fresh"))
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())["results"]
    assert resumed == fresh
    lines = (out / "samples_truthfulqa_mc1_local.jsonl").read_text().splitlines()
    assert len(lines) == 6


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "[no_such_task]"], "unknown task"),
    (["--allocation", "global"], "unknown allocation 'global'"),
    (["--score", "static"], "score 'static'"),
    (["--level", "1.5"], "level must be"),
    (["--data_dir", "/nonexistent"], "TruthfulQA.csv not found"),
    (["--score", "cor_gxo", "--tasks", "[gsm8k_local]", "--gen_kwargs", "do_sample=True,temperature=0.7"],
     "must be greedy"),
])
def test_bad_input_is_one_line(tiny_dir, tmp_path, manager, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(_lmeval_args(tiny_dir, tmp_path / "run", *extra))
    assert exit_info.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(err) == 1 and err[0].startswith("sparseact: error:") and message in err[0], err
    if "--data_dir" in extra:  # found before the model loads: nothing written
        assert not (tmp_path / "run").exists()


def test_lm_eval_cli_unknown_model_arg_is_one_line(tiny_dir, manager):
    done = subprocess.run([sys.executable, "-m", "pipeline.lmeval", "--model", "sparseact", "--model_args",
                           f"pretrained={tiny_dir},score=wina,level=0.5,bogus=1", "--tasks", "truthfulqa_mc1_local",
                           "--limit", "1", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["sparseact: error: unknown model_args key(s) bogus; the sparseact model takes "
                      + ", ".join(__import__("pipeline.lmeval.model", fromlist=["MODEL_ARGS"]).MODEL_ARGS)]
    assert "Traceback" not in done.stderr


def test_lmeval_config_files_parse(capsys):
    files = sorted((ROOT / "configs" / "lm_eval").glob("*.yaml"))
    assert files
    for path in files:
        with pytest.raises(SystemExit) as exit_info:
            main(["lmeval", "--config", str(path), "--print_config"])
        assert exit_info.value.code == 0
