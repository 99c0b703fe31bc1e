"""The package's shape: no two parts of ``pipeline/`` import each other, and the light entry points stay light.

A part is a folder of ``pipeline/`` (``scores``, ``masks``, ``decoding``, ...) or a module
directly in it (``hooks``, ``protocol``, ``config``, ...). Every import counts, those inside
functions included: a deferred import is still a dependency. Only imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
HEAVY = ("torch", "transformers", "torchmetrics", "lightning")


def _part(module: str) -> str | None:
    """``pipeline.scores.metrics`` -> ``scores``; ``pipeline.hooks`` -> ``hooks``; the package itself -> None."""
    names = module.split(".")
    return names[1] if names[0] == "pipeline" and len(names) > 1 else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the ``pipeline`` modules ``path`` imports (``from pipeline.x import y`` may be module y)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # drop the bodies of ``if TYPE_CHECKING:``
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("pipeline.")}


def part_graph() -> dict[str, set[str]]:
    """Part -> the parts it imports (the package's ``__init__``, a facade of lazy names, is left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(_module_name(path))
        if source is None:
            continue
        targets = {_part(name) for name in _imports(path)} - {None, source}
        graph.setdefault(source, set()).update(t for t in targets if (PACKAGE / t).exists()
                                                or (PACKAGE / f"{t}.py").exists())
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_part_imports_a_part_that_imports_it_back():
    graph = part_graph()
    assert {"scores", "masks", "hooks", "decoding", "measures", "results", "runner", "protocol"} <= set(graph)
    assert _cycles(graph) == [], {part: sorted(targets) for part, targets in sorted(graph.items())}


def test_scores_and_masks_lean_one_way():
    """Masks are chosen from scores; scores never need masks, and neither needs the decoding loop's callers."""
    graph = part_graph()
    assert "masks" not in graph["scores"] and "decoding" not in graph["scores"]
    assert "hooks" in graph["scores"] and "hooks" in graph["decoding"]
    assert not graph["hooks"] - {"models"}


@pytest.mark.parametrize("statement", ["import pipeline", "import pipeline.config", "import pipeline.cli"])
def test_light_entry_points_import_no_torch(statement):
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    assert result.stdout.strip() == "", f"{statement} imported {result.stdout.strip()}"


def test_the_package_still_hands_out_its_entry_points():
    import pipeline

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None


def test_library_calls_leave_the_model_as_they_found_it():
    """Hooks, the attention implementation and captured steps belong to a call or a run, never to the model."""
    import torch
    from conftest import tiny_model

    from pipeline import UnitHooks, attribute, layout_for, masked_generate

    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}

    def untouched():  # no hook left, and nothing hung on any module (state passed explicitly)
        return (not any(m._forward_pre_hooks for m in model.modules())
                and model.config._attn_implementation == implementation
                and {name: set(vars(module)) for name, module in model.named_modules()} == attributes)

    prompt, labels = torch.tensor([3, 17, 42]), torch.tensor([12, 77])
    scores = attribute(model, prompt, labels, metrics=["gxo", "ig"], ig_steps=2)
    keep = scores["gxo"].heads > scores["gxo"].heads.median(), scores["gxo"].neurons > 0
    masked_generate(model, prompt, *keep, eos_token_ids=[])
    assert untouched()

    with UnitHooks(layout_for(model)) as hooks:  # a run's hooks: passed down, still installed after each call
        again = attribute(model, prompt, labels, metrics=["gxo", "ig"], ig_steps=2, hooks=hooks)
        assert again["ig"].neurons.equal(scores["ig"].neurons)
        masked_generate(model, prompt, *keep, eos_token_ids=[], hooks=hooks)
        assert hooks.installed and hooks.probe is None and hooks.masks is None
    assert untouched()
