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

# The ops layer is every front end the registry names (fastvae/<module>.py, or
# fastvae/ops/<op>/op.py for an op in a folder of its own, whose __init__, its
# description and oracle, sits below the registry that reads it).
OP_MODULES = tuple(sorted({_registry.KERNELS[k].module for op in _registry.OPS.values() for k in op.kernels}
                          & {p.stem for p in PACKAGE.glob("*.py")})) + tuple(f"ops.{n}.op" for n in _registry.FOLDERS)

# Bottom to top; a module may import its own layer (without a cycle) or any below.
LAYERS = {
    "base": ("_openmp", "_dtypes", "_spec", "_families", "_philox", "_oracle_math", "ops"),
    "op descriptions": tuple(f"ops.{n}" for n in _registry.FOLDERS),  # each with its oracle (the reference backend's)
    "registry": ("_registry",),
    "backends": ("reference",),  # with kernels/ (Triton) and fastvae._C (C++), outside this package
    "dispatch": ("_backend",),
    "op support": ("_validate", "_value_checks", "_op", "_opaque", "_double_backward", "_likelihood_layout",
                   "_noise", "_pareto"),
    "ops": OP_MODULES,
    "distributions": ("distributions", "priors", "latents"),
    "objectives": ("_decoder", "_plan", "_plan_ops", "objectives", "evaluation"),
    "application": ("demo", "__init__", "__main__"),
}

# The backends are reached through the dispatch layer (_backend.launch). These
# imports of the reference's formulas by production code are on purpose; the
# tests of what they serve do not rest on them (gradgradcheck, closed forms).
DECLARED = {
    ("ops.kl_normal.op", "ops.kl_normal"): "kl_normal_grad, differentiable, for its own double backward",
    ("ops.sample_normal_kl.op", "ops.sample_normal_kl"): "sample_normal_kl_grad, differentiable, for its own "
                                                         "double backward",
    ("ops.count_log_prob.op", "ops.count_log_prob"): "the count likelihoods' second derivative is autograd of "
                                                      "their oracle's stable formula (create_graph=True only)",
    ("ops.bernoulli_likelihood.op", "ops.bernoulli_likelihood"): "the continuous Bernoulli's d log C / d logit "
                                                                 "with its Taylor branch near 0 (_cb_log_norm_grad), "
                                                                 "differentiable, for its own double backward",
    ("ops.sample_normal.op", "ops.kl_normal"): "kl_normal_grad (kl_normal's one gradient formula in Python) in "
                                               "sample_normal's double backward",
    ("ops.sample_positive.op", "ops.sample_positive"): "positive_terms: the positive families' closed forms, "
                                                        "differentiable, for its own double backward",
    ("latents", "ops.sample_positive"): "positive_terms at the median (Positive.point): one closed form, not a "
                                        "second copy",
}


def _layer_of() -> dict[str, int]:
    index = {}
    for i, mods in enumerate(LAYERS.values()):
        for m in mods:
            assert m not in index, f"{m} is in two layers"
            index[m] = i
    return index


def _module_name(path: Path) -> str:
    """fastvae/x.py -> "x"; fastvae/ops/kl_normal/__init__.py -> "ops.kl_normal";
    fastvae/ops/kl_normal/op.py -> "ops.kl_normal.op"; fastvae/__init__.py -> "__init__"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> list[Path]:
    """Every front-end module: fastvae/*.py and the op folders' Python, but their
    Triton kernels (the kernel layer, tests/test_registry.py) and their tests."""
    return sorted(PACKAGE.glob("*.py")) + sorted(
        p for p in PACKAGE.glob("ops/**/*.py") if p.name != "triton.py" and not p.name.startswith("test_"))


def imports() -> dict[str, dict[str, int]]:
    """module -> {imported fastvae module: first line}, for every front-end
    module, at any depth of the file (function bodies included). A name
    imported from a package is the submodule of that name where there is one."""
    paths = _sources()
    modules = {_module_name(p) for p in paths}

    def resolve(parts: list[str], names: list[str]) -> list[str]:
        base = ".".join(parts) or "__init__"
        found = [f"{base}.{n}" if parts else n for n in names]
        return [m if m in modules else base for m in found] or [base]

    edges: dict[str, dict[str, int]] = {}
    for path in paths:
        name = _module_name(path)
        package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
        found = edges.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                if node.level > 0:  # relative: from . import x / from ..y import z
                    if node.level - 1 > len(package):
                        raise AssertionError(f"{path}:{node.lineno}: an import above the package")
                    parts = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                    targets = resolve(parts, names)
                elif node.module and node.module.split(".")[0] == "fastvae":
                    targets = resolve(node.module.split(".")[1:], names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "fastvae":
                        targets.append(".".join(parts[1:]) or "__init__")
            for t in targets:
                if t in modules and t != name:
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
    """Above the dispatch layer, nothing imports a backend (the reference, or an
    op description's oracle) but the declared uses."""
    index = _layer_of()
    oracles = {list(LAYERS).index("op descriptions"), list(LAYERS).index("backends")}
    dispatch = list(LAYERS).index("dispatch")
    skipping = [f"{a} imports {b} at line {line}" for a, targets in EDGES.items() for b, line in targets.items()
                if index[b] in oracles and index[a] > dispatch and (a, b) not in DECLARED]
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
    with its modules (the ops and op descriptions layers by their rule: every
    module the registry names, every op folder)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("\n## Layers"):]
    section = section[:section.index("\n## ", 1)]
    positions = [section.index(f"**{name}**") for name in LAYERS]
    assert positions == sorted(positions)
    for name, mods in LAYERS.items():
        if name in ("ops", "op descriptions"):
            continue
        line = section[section.index(f"**{name}**"):].split("\n")[0]
        for m in mods:
            assert f"`{m}`" in line, f"docs/architecture.md, Layers: {m} is not listed under {name}"
    for a, b in DECLARED:
        assert f"`{a}` -> `{b}`" in section, f"docs/architecture.md, Layers: the declared use {a} -> {b}"


def test_only_backend_compiling_asks_torch_is_compiling():
    """torch.compiler.is_compiling() is False inside a nonstrict_trace-d
    function and AOT autograd's backward trace before torch 2.13 (the H200's
    torch 2.11 then launched Triton on a FakeTensor): fastvae asks
    _backend.compiling(), which covers them. The exceptions are the four
    public objectives' first line (elbo, iwae and their _terms: _lean_elbo,
    _lean_iwae, elbo_terms, iwae_terms), which only Dynamo traces, never an
    opaque call or a fake tensor (the lean path takes plain tensors only);
    asking _backend there would add a module to every call's path
    (benchmarks/path_trace.py)."""
    asks = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "_backend.py":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "is_compiling(" in line:
                    asks.setdefault(str(path.relative_to(ROOT)), []).append(n)
    assert set(asks) <= {"fastvae/objectives.py"} and len(asks.get("fastvae/objectives.py", [])) == 4, asks
