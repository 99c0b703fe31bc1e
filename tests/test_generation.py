"""Masked incremental decoding equals a from-scratch recomputation with each position's own mask."""

import warnings

import pytest
import torch
from conftest import tiny_model

from pipeline.decoding.generation import greedy_generate, masked_generate
from pipeline.models.adapters import layout_for


def _recompute_with_position_masks(model, prompt, head_keep, neuron_keep, steps):
    """No cache: every step reruns the whole sequence; position P-1+j gets mask j."""
    layout = layout_for(model)
    P = len(prompt)
    tokens = []
    for step in range(steps):
        ids = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)]).unsqueeze(0)

        def make(kind, layer):
            def hook(module, args):
                x = args[0].view(1, -1, args[0].shape[-1]).clone()
                for j in range(step + 1):
                    pos = P - 1 + j
                    if kind == "heads":
                        keep = head_keep[j, layer].repeat_interleave(layout.head_dim)
                    else:
                        keep = neuron_keep[j, layer]
                    x[0, pos] = x[0, pos] * keep.to(x.dtype)
                return (x.view_as(args[0]),)
            return hook

        handles = [m.register_forward_pre_hook(make("heads", l)) for l, m in enumerate(layout.head_inputs)]
        handles += [m.register_forward_pre_hook(make("neurons", l)) for l, m in enumerate(layout.neuron_inputs)]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        for h in handles:
            h.remove()
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize("arch", ["llama", "phi", "gemma3", "opt", "gpt2"])
def test_incremental_equals_recomputation(arch):
    model = tiny_model(arch)
    layout = layout_for(model)
    torch.manual_seed(1)
    steps = 7
    prompt = torch.tensor([4, 19, 33, 2, 70])
    rows_h = (torch.rand(3, steps, layout.num_layers, layout.num_heads) > 0.4).double()
    rows_n = (torch.rand(3, steps, layout.num_layers, layout.num_neurons) > 0.5).double()
    got = masked_generate(model, prompt, rows_h, rows_n, eos_token_ids=[])
    for row in range(3):
        expected = _recompute_with_position_masks(model, prompt, rows_h[row], rows_n[row], steps)
        assert got[row] == expected
    # the masks must matter, or this test could not fail
    assert any(g != greedy_generate(model, prompt, steps, [])[0] for g in got)


def test_generation_stops_at_eos_and_keeps_it():
    model = tiny_model("llama")
    prompt = torch.tensor([4, 19, 33])
    free = greedy_generate(model, prompt, 8, [])[0]
    eos = free[2]
    stopped = greedy_generate(model, prompt, 8, [eos])[0]
    assert stopped == free[: free.index(eos) + 1]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi"])
def test_batched_samples_equal_recomputation(arch):
    """Several samples' dense runs and masked rows decoded together (left padding, rows leaving the
    batch at their sample's length, dense leading steps and all-dense rows taken from the dense run)
    equal a from-scratch recomputation of each row on its own."""
    from pipeline.decoding.generation import dense_generate_batch, masked_after_dense_batch

    model = tiny_model(arch)
    layout = layout_for(model)
    torch.manual_seed(2)
    prompts = [torch.tensor([4, 19, 33, 2, 70]), torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10, 11, 12, 13])]
    dense = dense_generate_batch(model, prompts, [6, 3, 8], [])
    for prompt, run, steps in zip(prompts, dense, [6, 3, 8]):
        assert run.tokens == greedy_generate(model, prompt, steps, [])[0]
    heads, neurons = [], []
    for run in dense:
        T = len(run.tokens)
        h = torch.rand(4, T, layout.num_layers, layout.num_heads) > 0.3
        n = torch.rand(4, T, layout.num_layers, layout.num_neurons) > 0.4
        h[:, 0], n[:, 0] = True, True  # the dense first step
        h[0], n[0] = True, True  # a row with nothing off
        heads.append(h)
        neurons.append(n)
    got = masked_after_dense_batch(model, dense, heads, neurons, [])
    for prompt, run, h, n, rows in zip(prompts, dense, heads, neurons, got):
        assert rows[0] == run.tokens
        for row in range(4):
            assert rows[row] == _recompute_with_position_masks(model, prompt, h[row].double(), n[row].double(),
                                                               len(run.tokens))
    assert any(row != run.tokens for rows, run in zip(got, dense) for row in rows)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_padded_captured_steps_equal_eager_decoding(arch, monkeypatch):
    """The GPU path, run on the CPU with each captured step called instead of replayed: dense runs
    as one padded batch through a static cache, then the masked rows of several samples in
    shared-prefix groups of one shape, give the tokens (and dense caches) of the eager loops."""
    import pipeline.decoding.generation as generation

    model = tiny_model(arch)
    model.set_attn_implementation("sdpa")
    layout = layout_for(model)
    torch.manual_seed(3)
    prompts = [torch.tensor([4, 19, 33, 2, 70]), torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10, 11, 12, 13])]
    limits = [6, 3, 8]
    expected_dense = generation.dense_generate_batch(model, prompts, limits, [])
    heads, neurons = [], []
    for run in expected_dense:
        T = len(run.tokens)
        h = torch.rand(4, T, layout.num_layers, layout.num_heads) > 0.3
        n = torch.rand(4, T, layout.num_layers, layout.num_neurons) > 0.4
        h[:, 0], n[:, 0] = True, True
        h[0], n[0] = True, True
        heads.append(h)
        neurons.append(n)
    expected = generation.masked_after_dense_batch(model, expected_dense, heads, neurons, [])

    graphs = _call_instead_of_capture(monkeypatch, model)
    monkeypatch.setattr(generation, "GROUP_MAX_ROWS", 8)  # two samples of 4 rows per group: one group half empty
    dense = generation.dense_generate_batch(model, prompts, limits, [], graphs)
    assert [d.tokens for d in dense] == [d.tokens for d in expected_dense]
    for got, want in zip(dense, expected_dense):
        for (keys, values), (want_keys, want_values) in zip(got.kv, want.kv):
            torch.testing.assert_close(keys, want_keys)
            torch.testing.assert_close(values, want_values)
    assert any(key[0] == "padded" for key in graphs.decoders)
    # every group is queued before any group's tokens are read, and the caller hears when the first is
    events = []
    decode, lengths = generation.shared_prefix.SharedPrefixDecoder.decode, generation._lengths
    monkeypatch.setattr(generation.shared_prefix.SharedPrefixDecoder, "decode",
                        lambda *a, **k: events.append("group queued") or decode(*a, **k))
    monkeypatch.setattr(generation, "_lengths", lambda *a, **k: events.append("tokens read") or lengths(*a, **k))
    got = generation.masked_after_dense_batch(model, dense, heads, neurons, [],
                                              on_queued=lambda: events.append("on_queued"), graphs=graphs)
    assert got == expected
    assert events == ["group queued", "on_queued", "group queued", "tokens read", "tokens read"]
    assert sum(key[0] == "shared" for key in graphs.decoders) == 1  # one shape for all groups


def test_replayed_steps_stop_early_but_do_not_wait_after_the_last_step(monkeypatch):
    """Every ``CHECK_EVERY`` steps the replay loop asks whether all rows have ended (a wait for the
    device) and stops if so; after the last step it does not ask, so the caller can queue more
    work before it waits."""
    from pipeline.decoding import cuda_graph

    checks = []
    isin = torch.isin
    monkeypatch.setattr(torch, "isin", lambda *a, **k: checks.append(1) or isin(*a, **k))
    every = cuda_graph.CHECK_EVERY
    eos = torch.tensor([2])

    def run(steps: int, eos_at: int | None):
        state = {"step": 0}
        next_token = torch.zeros(3, dtype=torch.long)

        def replay():
            next_token.fill_(2 if eos_at is not None and state["step"] >= eos_at else 5)
            state["step"] += 1

        checks.clear()
        tokens = cuda_graph.replay_steps(replay, next_token, None, None, None, steps, eos)
        return tokens, state["step"], len(checks)

    tokens, replayed, asked = run(2 * every, None)
    assert (tokens.shape, replayed, asked) == ((3, 2 * every), 2 * every, 1)
    tokens, replayed, asked = run(2 * every + 3, None)
    assert (replayed, asked) == (2 * every + 3, 2)
    tokens, replayed, asked = run(3 * every, eos_at=1)  # every row ended at its second step: stops at the check
    assert (tokens.shape[1], replayed, asked) == (every, every, 1)
    assert tokens[:, 1:].eq(2).all() and tokens[:, 0].eq(5).all()


def test_captured_steps_of_a_longer_batch_serve_a_shorter_one(monkeypatch):
    """A later batch whose prompts and answers fit the steps captured for an earlier one reuses
    them (no new capture), and decodes the tokens of the eager loops."""
    import pipeline.decoding.generation as generation
    from pipeline.hooks import UnitHooks

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    layout = layout_for(model)
    hooks = UnitHooks(layout)  # the run's, as a run passes them to every batch
    torch.manual_seed(5)
    batches = [([torch.randint(1, 90, (70,)), torch.randint(1, 90, (66,))], [9, 12]),  # caches of 128 columns
               ([torch.randint(1, 90, (9,)), torch.randint(1, 90, (4,))], [5, 7])]  # 64 would do
    masks = [[(torch.rand(3, n, layout.num_layers, layout.num_heads) > 0.3,
               torch.rand(3, n, layout.num_layers, layout.num_neurons) > 0.4) for n in limits] for _, limits in batches]
    expected = []
    for (prompts, limits), keeps in zip(batches, masks):  # eager: no graphs on the CPU
        dense = generation.dense_generate_batch(model, prompts, limits, [])
        expected.append(([d.tokens for d in dense], generation.masked_after_dense_batch(
            model, dense, [h[:, :len(d.tokens)] for (h, _), d in zip(keeps, dense)],
            [n[:, :len(d.tokens)] for (_, n), d in zip(keeps, dense)], [], hooks)))

    graphs = _call_instead_of_capture(monkeypatch, model)  # the run's, as a run passes them to every batch
    import pipeline.decoding.cuda_graph as cuda_graph

    made = []
    for module, maker in ((cuda_graph, "CapturedDecoder"), (generation.shared_prefix, "SharedPrefixDecoder")):
        original = getattr(module, maker)
        monkeypatch.setattr(module, maker, lambda *a, _original=original, **k: made.append(a) or _original(*a, **k))
    counts = []
    for ((prompts, limits), keeps), (want_dense, want_masked) in zip(zip(batches, masks), expected):
        dense = generation.dense_generate_batch(model, prompts, limits, [], graphs)
        assert [d.tokens for d in dense] == want_dense
        got = generation.masked_after_dense_batch(model, dense, [h[:, :len(d.tokens)] for (h, _), d in zip(keeps, dense)],
                                                  [n[:, :len(d.tokens)] for (_, n), d in zip(keeps, dense)], [], hooks,
                                                  graphs=graphs)
        assert got == want_masked
        counts.append(len(made))
    assert counts[0] == 2 and counts[1] == 2  # one padded and one shared-prefix decoder, made for the first batch only


def _shared_steps_made_and_serving(monkeypatch, sizes: list[int], budgets: list[int], seed: int):
    """Masked decoding of batches of ``sizes`` samples through shared-prefix steps (called, not
    captured), while the memory allows ``budgets`` samples per group: checks the tokens against the
    eager loop and returns the group size of each step made and of the step that served each group."""
    import pipeline.decoding.generation as generation

    from pipeline.hooks import UnitHooks

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    layout = layout_for(model)
    hooks = UnitHooks(layout)  # the run's, as a run passes them to every batch
    torch.manual_seed(seed)

    def batch(samples: int):
        prompts = [torch.randint(1, 90, (int(torch.randint(3, 9, ()).item()),)) for _ in range(samples)]
        dense = generation.dense_generate_batch(model, prompts, [6] * samples, [])
        keeps = [(torch.rand(3, len(d.tokens), layout.num_layers, layout.num_heads) > 0.3,
                  torch.rand(3, len(d.tokens), layout.num_layers, layout.num_neurons) > 0.4) for d in dense]
        return dense, [h for h, _ in keeps], [n for _, n in keeps]

    batches = [batch(size) for size in sizes]
    expected = [generation.masked_after_dense_batch(model, *b, [], hooks) for b in batches]  # eager on the CPU
    graphs = _call_instead_of_capture(monkeypatch, model)
    made = []
    original = generation.shared_prefix.SharedPrefixDecoder
    monkeypatch.setattr(generation.shared_prefix, "SharedPrefixDecoder",
                        lambda *a, **k: made.append(a[1]) or original(*a, **k))
    served = []  # the group size of each replayed group
    decode = original.decode
    monkeypatch.setattr(original, "decode", lambda self, *a, **k: served.append(self.cache.samples) or decode(self, *a, **k))
    allowed = iter(budgets)
    monkeypatch.setattr(generation, "_group_samples", lambda *a, **k: next(allowed))
    for number, ((dense, heads, neurons), want) in enumerate(zip(batches, expected)):
        assert generation.masked_after_dense_batch(model, dense, heads, neurons, [], hooks, graphs=graphs) == want, number
    return made, served


def test_a_kept_shared_step_of_another_group_size_serves_while_few_slots_stay_empty(monkeypatch):
    """The group size follows the device's free memory, which moves between batches: a kept
    shared-prefix step of another group size serves the next batch (no new capture) as long as
    its groups hold at most a quarter more sample slots, and decodes the eager loop's tokens;
    a batch that would leave most of its slots empty gets a step of its own."""
    # samples per group the memory allows: 4, 3 (groups of 2), 4, 3
    made, served = _shared_steps_made_and_serving(monkeypatch, [4, 4, 1, 4], [4, 3, 4, 3], seed=6)
    # the first batch's step of 4 samples serves the second (4 slots, where groups of 2 have 4);
    # one sample in groups of 4 would leave 3 of 4 slots empty: a step of 1 sample is made; the
    # fourth batch takes the step of 4 again, not the more recent one of 1 (4 groups, where 2 do)
    assert made == [4, 1]
    assert served == [4, 4, 1, 4]


def test_a_kept_shared_step_more_than_twice_as_large_does_not_serve(monkeypatch):
    """A kept step of 5 samples per group would serve 4 samples in groups of 2 by the group and slot
    bounds (one group of 5 slots where two of 2 hold 4, a quarter more), but its masks and cache are
    over twice the size asked for: a step of 2 is made."""
    made, served = _shared_steps_made_and_serving(monkeypatch, [5, 4], [5, 2], seed=7)
    assert made == [5, 2]
    assert served == [5, 2, 2]


def _call_instead_of_capture(monkeypatch, model):
    """Captured steps allowed on the CPU, each 'replay' calling the step (the GPU path, run eagerly);
    returns the ``CapturedSteps`` of ``model`` to pass to the calls, as a run passes its own to every batch."""
    import pipeline.decoding.cuda_graph as cuda_graph
    import pipeline.decoding.shared_prefix as shared_prefix

    class Called:
        def __init__(self, decoder, hooks):
            self.replay = lambda: decoder._step(hooks)

    def capture(self, kv, first_input, heads, neurons, hooks, prefix_mask=None, positions=None):
        self.graph = Called(self, hooks)

    def capture_shared(self, prefixes, first_input, positions, heads, neurons, hooks):
        self.graph = Called(self, hooks)

    monkeypatch.setattr(cuda_graph.CapturedSteps, "enabled", property(lambda self: not self.failed))
    monkeypatch.setattr(cuda_graph.CapturedDecoder, "_capture", capture)
    monkeypatch.setattr(shared_prefix.SharedPrefixDecoder, "_capture", capture_shared)
    return cuda_graph.CapturedSteps(model)


def test_sliding_window_models_do_not_take_the_shared_prefix_step(monkeypatch):
    """The shared-prefix step attends to every column of a sample; a model with sliding-window
    layers (Gemma-3) keeps its window through the eager loop, here with dense runs whose cache
    is recomputed (as lm-eval's are), the case that reached the shared step before."""
    import pipeline.decoding.generation as generation

    model = tiny_model("gemma3")
    model.set_attn_implementation("sdpa")
    layout = layout_for(model)
    torch.manual_seed(1)
    # prompts shorter than the window (4), answers that run past it
    prompts = [torch.tensor([4, 19, 33]), torch.tensor([5, 6, 7])]
    runs = [generation.DenseRun(p, d.tokens, None) for p, d in zip(prompts, generation.dense_generate_batch(
        model, prompts, [8, 8], []))]
    heads = [torch.rand(3, len(r.tokens), layout.num_layers, layout.num_heads) > 0.3 for r in runs]
    neurons = [torch.rand(3, len(r.tokens), layout.num_layers, layout.num_neurons) > 0.4 for r in runs]
    expected = generation.masked_after_dense_batch(model, runs, heads, neurons, [])
    graphs = _call_instead_of_capture(monkeypatch, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-sample captured step refuses sliding layers and says so
        got = generation.masked_after_dense_batch(model, runs, heads, neurons, [], graphs=graphs)
    assert got == expected
    assert not any(key[0] == "shared" for key in graphs.decoders)


def test_ctrl_c_inside_a_captured_step_is_not_taken_for_a_failed_capture(monkeypatch):
    """Ctrl-C raises ``Interrupted`` wherever the run is; the fallback after a failed capture
    (``except Exception``) must let it through instead of decoding on without graphs."""
    import pipeline.decoding.generation as generation
    import pipeline.decoding.shared_prefix as shared_prefix
    from pipeline.runner.preemption import Interrupted

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    layout = layout_for(model)
    prompts = [torch.tensor([4, 19, 33]), torch.tensor([5, 6])]
    dense = generation.dense_generate_batch(model, prompts, [4, 4], [])
    heads = [torch.rand(2, 4, layout.num_layers, layout.num_heads) > 0.3 for _ in dense]
    neurons = [torch.rand(2, 4, layout.num_layers, layout.num_neurons) > 0.3 for _ in dense]
    graphs = _call_instead_of_capture(monkeypatch, model)

    def interrupted(self, *args, **kwargs):
        raise Interrupted()

    monkeypatch.setattr(shared_prefix.SharedPrefixDecoder, "decode", interrupted)
    with pytest.raises(Interrupted):
        generation.masked_after_dense_batch(model, dense, heads, neurons, [], graphs=graphs)
    assert not graphs.failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["llama", "phi"])
@pytest.mark.parametrize("max_rows", [None, 10])
def test_captured_shared_prefix_groups_equal_eager_decoding_on_cuda(arch, max_rows, monkeypatch):
    """On a GPU, in fp32: the masked rows of many samples through the captured shared-prefix
    step give the tokens of the eager loop (the same dense runs and masks); also in groups of
    two samples, all queued on the device before any group's tokens are read (one replayed
    step and its buffers serve them in stream order)."""
    import pipeline.decoding.generation as generation

    if max_rows is not None:
        monkeypatch.setattr(generation, "GROUP_MAX_ROWS", max_rows)

    model = tiny_model(arch, dtype=torch.float32).cuda()
    model.set_attn_implementation("sdpa")
    layout = layout_for(model)
    torch.manual_seed(5)
    prompts = [torch.randint(3, 90, (n,)) for n in (5, 2, 9, 1, 7, 4)]
    dense = generation.dense_generate_batch(model, prompts, [6, 3, 8, 5, 7, 2], [])
    heads = [torch.rand(5, len(d.tokens), layout.num_layers, layout.num_heads) > 0.3 for d in dense]
    neurons = [torch.rand(5, len(d.tokens), layout.num_layers, layout.num_neurons) > 0.4 for d in dense]
    for h, n in zip(heads, neurons):
        h[0], n[0] = True, True
    from pipeline.decoding.cuda_graph import CapturedSteps

    eager = CapturedSteps(model)
    eager.failed = True  # as after a failed capture: the eager loop
    expected = generation.masked_after_dense_batch(model, dense, heads, neurons, [], graphs=eager)
    graphs = CapturedSteps(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generation.masked_after_dense_batch(model, dense, heads, neurons, [], graphs=graphs)
    decoders = graphs.decoders
    assert any(key[0] == "shared" for key in decoders), [str(w.message) for w in caught]  # the captured path ran
    if max_rows is not None:
        assert all(key[1] == 2 for key in decoders if key[0] == "shared")  # 3 groups of 2 samples x 5 rows
    assert got == expected
    assert any(row != d.tokens for rows, d in zip(got, dense) for row in rows)


def test_out_of_memory_halves_with_the_failed_attempt_freed(monkeypatch):
    """A batch that runs out of memory is attributed in halves, and each half starts after the
    failed attempt's tensors are gone (held by the exception's traceback, they made every half
    run out of memory too)."""
    import weakref

    import pipeline.protocol as protocol_module
    from pipeline.config import ProtocolConfig

    alive = []

    def attribute_batch(model, prompts, labels, metrics, ig_steps, hooks=None):
        assert all(ref() is None for ref in alive), "a failed attempt's tensor is still alive"
        if len(prompts) > 1:
            activations = torch.ones(1000)  # stands for the attempt's activations, referenced by its frame
            alive.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [prompts[0].item()]

    monkeypatch.setattr(protocol_module, "attribute_batch", attribute_batch)
    prompts = [torch.tensor([i]) for i in range(5)]
    result = protocol_module._attribute_fitting(None, prompts, prompts, ProtocolConfig(), None)
    assert result == [0, 1, 2, 3, 4] and len(alive) == 4


def test_captured_steps_of_another_model_are_refused():
    """A run's ``CapturedSteps`` hold decoders built on its model's weights: handed with another
    model they would decode that model's rows with the first one's steps, so the call refuses."""
    import pipeline.decoding.generation as generation
    from pipeline.decoding.cuda_graph import CapturedSteps

    model, other = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(ValueError, match="another model"):
        generation.dense_generate_batch(other, [torch.tensor([4, 19, 33])], [3], [], CapturedSteps(model))
    generation.dense_generate_batch(model, [torch.tensor([4, 19, 33])], [3], [], CapturedSteps(model))
