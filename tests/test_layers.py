"""fastvae's modules form layers that point one way (docs/architecture.md,
"Layers"): every import inside fastvae/, at module level or inside a function,
goes to a module of the same layer or one below, no imports form a cycle, and
the reference backend is reached through ``_backend`` except where a
production formula of it is a declared use (DECLARED, each with its reason).

Read from the source with ``ast``: nothing is imported, so a lazy import
inside a function counts as much as one at the top."""
import ast
from pathlib import Path

import pytest

from fastvae import _registry

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process tests")

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "fastvae"

# The ops layer is every front end the registry names (fastvae/<module>.py).
OP_MODULES = tuple(sorted({_registry.KERNELS[k].module for op in _registry.OPS.values() for k in op.kernels}
                          & {p.stem for p in PACKAGE.glob("*.py")}))

# Bottom to top; a module may import its own layer (without a cycle) or any below.
LAYERS = {
    "base": ("_dtypes", "_registry"),
    "backends": ("reference",),  # with kernels/ (Triton) and fastvae._C (C++), outside this package
    "dispatch": ("_backend",),
    "op support": ("_validate", "_value_checks", "_op", "_double_backward", "_likelihood_layout",
                   "_bernoulli_likelihood", "_count_likelihood", "_noise", "_pareto"),
    "ops": OP_MODULES,
    "distributions": ("distributions", "priors", "latents"),
    "objectives": ("_decoder", "_plan", "objectives", "evaluation"),
    "application": ("demo", "__init__", "__main__"),
}

# The backends are reached through the dispatch layer (_backend.launch). These
# imports of the reference's formulas by production code are on purpose; the
# tests of what they serve do not rest on them (gradgradcheck, closed forms).
DECLARED = {
    ("_count_likelihood", "reference"): "the count likelihoods' second derivative is autograd of the reference's "
                                        "stable formula (create_graph=True only)",
    ("_double_backward", "reference"): "kl_normal_grad (kl_normal's one gradient formula in Python) and the "
                                       "continuous Bernoulli's d log C / d logit with its Taylor branch near 0, "
                                       "differentiable for the double backward",
    ("sample_positive", "reference"): "positive_terms: the positive families' closed forms, differentiable, for "
                                      "the double backward",
    ("latents", "reference"): "positive_terms at the median (Positive.point): one closed form, not a second copy",
}


def _layer_of() -> dict[str, int]:
    index = {}
    for i, mods in enumerate(LAYERS.values()):
        for m in mods:
            assert m not in index, f"{m} is in two layers"
            index[m] = i
    return index


def imports() -> dict[str, dict[str, int]]:
    """module -> {imported fastvae module: first line}, for every fastvae/*.py,
    at any depth of the file (function bodies included)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    edges: dict[str, dict[str, int]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        found = edges.setdefault(path.stem, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from . import x / from .x import y
                    targets = [a.name for a in node.names] if node.module is None else [node.module.split(".")[0]]
                elif node.level == 0 and node.module and node.module.split(".")[0] == "fastvae":
                    parts = node.module.split(".")
                    targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names] + ["__init__"]
                elif node.level > 1:
                    raise AssertionError(f"{path.name}:{node.lineno}: an import above the package")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "fastvae":
                        targets.append(parts[1] if len(parts) > 1 else "__init__")
            for t in targets:
                if t in modules and t != path.stem:
                    found.setdefault(t, node.lineno)
    return edges


EDGES = imports()


def test_every_module_has_a_layer():
    index = _layer_of()
    assert set(EDGES) - set(index) == set(), "add the new module to LAYERS (and docs/architecture.md, 'Layers')"
    assert set(index) - set(EDGES) == set(), "LAYERS names a module that does not exist"


def test_no_import_points_up():
    index = _layer_of()
    up = [f"{a} ({list(LAYERS)[index[a]]}) imports {b} ({list(LAYERS)[index[b]]}) at line {line}"
          for a, targets in EDGES.items() for b, line in targets.items() if index[b] > index[a]]
    assert up == []


def test_the_backends_are_reached_through_the_dispatch_layer():
    index = _layer_of()
    backends, dispatch = list(LAYERS).index("backends"), list(LAYERS).index("dispatch")
    skipping = [f"{a} imports {b} at line {line}" for a, targets in EDGES.items() for b, line in targets.items()
                if index[b] == backends and index[a] > dispatch and (a, b) not in DECLARED]
    assert skipping == [], "reach the backend through _backend.launch, or declare the use in DECLARED (with why)"


def test_the_declared_uses_exist():
    """A declared edge nobody uses any more is removed from the list."""
    assert [edge for edge in DECLARED if edge[1] not in EDGES.get(edge[0], {})] == []


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in EDGES.get(m, {}):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(EDGES):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_sees_lazy_imports(tmp_path):
    """An import inside a function counts (the cycles this test replaced were lazy ones)."""
    tree = ast.parse("def f():\n    from . import reference\n")
    assert any(isinstance(n, ast.ImportFrom) and n.names[0].name == "reference" for n in ast.walk(tree))
    assert "reference" in EDGES["_backend"]  # kernel_function's lazy import of the reference backend


def test_the_docs_name_the_layers_in_order():
    """docs/architecture.md's "Layers" section lists each layer, bottom first,
    with its modules (the ops layer by its rule: every module the registry names)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("\n## Layers"):]
    section = section[:section.index("\n## ", 1)]
    positions = [section.index(f"**{name}**") for name in LAYERS]
    assert positions == sorted(positions)
    for name, mods in LAYERS.items():
        if name == "ops":
            continue
        line = section[section.index(f"**{name}**"):].split("\n")[0]
        for m in mods:
            assert f"`{m}`" in line, f"docs/architecture.md, Layers: {m} is not listed under {name}"
    for a, b in DECLARED:
        assert f"`{a}` -> `{b}`" in section, f"docs/architecture.md, Layers: the declared use {a} -> {b}"
