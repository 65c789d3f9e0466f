"""fastvae's modules form layers that point one way (docs/architecture.md,
"Layers"): every import inside fastvae/ and kernels/ (the package's
``fastvae.kernels``), the op folders' Triton kernels included, at module level
or inside a function, goes to a module of the same layer or one below, no
imports form a cycle, and the reference backend is reached through
``_backend`` except where a production formula of it is a declared use
(DECLARED, each with its reason).

Read from the source with ``ast``: nothing is imported, so a lazy import
inside a function counts as much as one at the top, and so does
``importlib.import_module`` of a literal module name."""
import ast
from pathlib import Path

import pytest

from fastvae import _registry

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process tests")

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "fastvae"
KERNELS = ROOT / "kernels"  # installed as fastvae.kernels (setup.py's package_dir)

# The ops layer is every front end the registry names (fastvae/<module>.py, or
# fastvae/ops/<op>/op.py for an op in a folder of its own, whose __init__, its
# description and oracle, sits below the registry that reads it).
OP_MODULES = tuple(sorted({_registry.KERNELS[k].module for op in _registry.OPS.values() for k in op.kernels}
                          & {p.stem for p in PACKAGE.glob("*.py")})) + tuple(f"ops.{n}.op" for n in _registry.FOLDERS)

# The kernel layer, beside the reference backend: kernels/ (the shared Triton
# helpers, the noise stream's kernels) and every op folder's Triton kernels
# (ops.X.triton). kernels/aot.py, the ahead-of-time build tool, is an application.
KERNEL_MODULES = tuple(sorted(
    "kernels" if p.stem == "__init__" else f"kernels.{p.stem}" for p in KERNELS.glob("*.py") if p.stem != "aot"
)) + tuple(f"ops.{n}.triton" for n in _registry.FOLDERS if (PACKAGE / "ops" / n / "triton.py").exists())

# Bottom to top; a module may import its own layer (without a cycle) or any below.
LAYERS = {
    "base": ("_openmp", "_dtypes", "_spec", "_families", "_philox", "_oracle_math", "ops"),
    "op descriptions": tuple(f"ops.{n}" for n in _registry.FOLDERS),  # each with its oracle (the reference backend's)
    "registry": ("_registry",),
    "backends": ("reference",) + KERNEL_MODULES,  # and fastvae._C (C++), which imports no Python
    "dispatch": ("_backend", "_launch"),
    "op support": ("_validate", "_value_checks", "_op", "_opaque", "_double_backward", "_likelihood_layout",
                   "_noise", "_pareto", "_sampler"),
    "ops": OP_MODULES,
    "distributions": ("distributions", "priors", "latents"),
    "objectives": ("_decoder", "_plan", "_plan_ops", "_triton_ops", "objectives", "evaluation", "hierarchical"),
    "application": ("demo", "__init__", "__main__", "kernels.aot"),
}

# The backends are reached through the dispatch layer (_backend.launch). These
# imports of the reference's formulas by production code are on purpose; the
# tests of what they serve do not rest on them (gradgradcheck, closed forms).
DECLARED = {
    ("ops.kl_normal.op", "ops.kl_normal"): "kl_normal_grad, differentiable, for its own double backward",
    ("ops.stick_breaking.op", "ops.stick_breaking"): "stick_breaking_grad, differentiable, for its own double "
                                                      "backward",
    ("ops.sample_normal_kl.op", "ops.sample_normal_kl"): "sample_normal_kl_grad, differentiable, for its own "
                                                         "double backward",
    ("ops.count_log_prob.op", "ops.count_log_prob"): "the count likelihoods' second derivative is autograd of "
                                                      "their oracle's stable formula (create_graph=True only)",
    ("ops.family_kl.op", "ops.family_kl"): "the family KLs' second derivative is autograd of their oracle's "
                                            "formula (create_graph=True only)",
    ("ops.bernoulli_likelihood.op", "ops.bernoulli_likelihood"): "the continuous Bernoulli's d log C / d logit "
                                                                 "with its Taylor branch near 0 (_cb_log_norm_grad), "
                                                                 "differentiable, for its own double backward",
    ("ops.sample_normal.op", "ops.kl_normal"): "kl_normal_grad (kl_normal's one gradient formula in Python) in "
                                               "sample_normal's double backward",
    ("ops.sample_family.op", "ops.sample_family"): "positive_terms: the positive families' closed forms, "
                                                    "differentiable, for sample_positive's own double backward",
    ("latents", "ops.sample_family"): "positive_terms at the median (Positive.point): one closed form, not a "
                                      "second copy",
    ("priors", "ops.kl_normal"): "kl_normal's formula as torch expressions for a diagonal prior under "
                                 "torch.compile, which Inductor fuses: not a second copy",
    ("latents", "ops.family_kl"): "kumaraswamy_beta_kl, the public torch form of the truncated series (any "
                                  "number of terms): the oracle's formula, not a second copy",
}


# Imports that point up, on purpose, each with its reason (to be removed, not added to).
UPWARD = {
    ("ops.logmeanexp", "ops.logmeanexp.triton"): "aot_calls asks the kernels' forward_plan whether the reduced bound "
                                                 "is one launch at a shape; it runs only under kernels/aot.py",
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
    fastvae/ops/kl_normal/op.py -> "ops.kl_normal.op"; fastvae/__init__.py -> "__init__";
    kernels/philox.py -> "kernels.philox" (fastvae.kernels.philox); kernels/__init__.py -> "kernels"."""
    if path.is_relative_to(KERNELS):
        parts = ["kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> list[Path]:
    """Every module of the package: fastvae/*.py, the op folders' Python (their
    Triton kernels included, but not their tests) and kernels/*.py."""
    return sorted(PACKAGE.glob("*.py")) + sorted(
        p for p in PACKAGE.glob("ops/**/*.py") if not p.name.startswith("test_")) + sorted(KERNELS.glob("*.py"))


def _targets(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> dict[str, int]:
    """{fastvae module: first line} that the module ``name`` (a package's
    ``__init__`` when ``is_package``) imports anywhere in its source ``tree``:
    import statements, and ``importlib.import_module`` (or ``import_module``)
    of a literal absolute name. A name imported from a package is the
    submodule of that name where there is one."""
    package = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]

    def resolve(parts: list[str], names: list[str]) -> list[str]:
        base = ".".join(parts) or "__init__"
        found = [f"{base}.{n}" if parts else n for n in names]
        return [m if m in modules else base for m in found] or [base]

    def absolute(dotted: str) -> list[str]:
        parts = dotted.split(".")
        return [".".join(parts[1:]) or "__init__"] if parts[0] == "fastvae" else []

    found: dict[str, int] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level > 0:  # relative: from . import x / from ..y import z
                if node.level - 1 > len(package):
                    raise AssertionError(f"{name}:{node.lineno}: an import above the package")
                parts = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                targets = resolve(parts, names)
            elif node.module and node.module.split(".")[0] == "fastvae":
                targets = resolve(node.module.split(".")[1:], names)
        elif isinstance(node, ast.Import):
            targets = [t for a in node.names for t in absolute(a.name)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if called == "import_module":
                targets = absolute(node.args[0].value)
        for t in targets:
            if t in modules and t != name:
                found.setdefault(t, node.lineno)
    return found


def imports() -> dict[str, dict[str, int]]:
    """module -> {imported fastvae module: first line}, for every module of the
    package, at any depth of the file (function bodies included)."""
    paths = _sources()
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _targets(ast.parse(p.read_text(), str(p)), _module_name(p), p.name == "__init__.py",
                                      modules) for p in paths}


EDGES = imports()


def test_every_module_has_a_layer():
    index = _layer_of()
    assert set(EDGES) - set(index) == set(), "add the new module to LAYERS (and docs/architecture.md, 'Layers')"
    assert set(index) - set(EDGES) == set(), "LAYERS names a module that does not exist"


def test_no_import_points_up():
    index = _layer_of()
    up = [f"{a} ({list(LAYERS)[index[a]]}) imports {b} ({list(LAYERS)[index[b]]}) at line {line}"
          for a, targets in EDGES.items() for b, line in targets.items()
          if index[b] > index[a] and (a, b) not in UPWARD]
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
    assert [edge for edge in UPWARD if edge[1] not in EDGES.get(edge[0], {})] == []


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
    """An import inside a function counts (a cycle through a lazy import is a cycle too)."""
    tree = ast.parse("def f():\n    from . import reference\n")
    assert any(isinstance(n, ast.ImportFrom) and n.names[0].name == "reference" for n in ast.walk(tree))
    assert "reference" in EDGES["_backend"]  # kernel_function's lazy import of the reference backend


def test_the_checker_follows_import_module_and_sees_the_kernels():
    """importlib.import_module of a literal name is an import; a computed name
    cannot be followed (the dispatch layer's triton_module reaches the kernels
    by name, as it should). The Triton modules and kernels/ are in the set."""
    modules = set(EDGES)
    source = ("import importlib\nfrom importlib import import_module\n"
              "def f(name):\n    importlib.import_module('fastvae.reference')\n"
              "    import_module('fastvae.kernels.philox')\n    importlib.import_module(f'fastvae.{name}')\n")
    assert _targets(ast.parse(source), "_plan", False, modules) == {"reference": 4, "kernels.philox": 5}
    assert {"ops.kl_normal.triton", "kernels._common", "kernels.philox", "kernels.aot"} <= modules
    assert "kernels._common" in EDGES["ops.kl_normal.triton"] and "_registry" in EDGES["kernels.aot"]
    assert "kernels.sampler" in EDGES["ops.sample_family.triton"]


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
            if m in KERNEL_MODULES:  # named by their rule
                assert "`kernels/`" in line and "`triton.py`" in line, "docs/architecture.md, Layers: the kernels"
                continue
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
