"""The op registry is the one definition of each kernel's arguments: every
backend must spell them as it does, and every op must have its test module and
benchmark."""
import inspect
import re
from pathlib import Path

import pytest

from fastvae import _backend, _registry, reference

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process tests")

ROOT = Path(__file__).parent.parent
KERNELS = list(_registry.KERNELS.values())


def _params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_reference_matches_the_registry(kernel):
    """The oracle's function (an op folder's __init__, else fastvae.reference),
    as the reference backend looks it up."""
    assert _params(_backend.kernel_function("reference", kernel.name)) == kernel.args
    oracle = _registry.FOLDERS.get(kernel.module, reference)  # an op folder's kernels: module is the folder
    assert _backend.kernel_function("reference", kernel.name) is getattr(oracle, kernel.name)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_triton_launcher_matches_the_registry(kernel):
    """Its arguments, then the objectives' bound's (Kernel.bound: Triton only)."""
    pytest.importorskip("triton")
    assert _params(getattr(_backend.triton_module(kernel.module), kernel.name)) == kernel.args + kernel.bound


def _cpp_params(fn) -> tuple[str, ...]:
    """Argument names from pybind11's signature line, e.g. 'f(x: numpy.ndarray, n: int) -> None'."""
    signature = fn.__doc__.splitlines()[0]
    inner = signature[signature.index("(") + 1: signature.rindex(") ->")]
    return tuple(re.findall(r"(?:^|, )(\w+):", inner))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_cpp_binding_matches_the_registry(kernel):
    """The cpp backend adds a trailing thread count (the uniforms are a test hook, serial), then the
    keyword options only its kernel takes."""
    extra = () if kernel.name == "uniform_fill" else ("n_threads",)
    assert _cpp_params(getattr(_backend.cpp_module(), kernel.name)) == kernel.args + extra + kernel.cpp_options


def test_every_cpp_function_is_registered():
    cpp = _backend.cpp_module()
    bound = {name for name in dir(cpp) if not name.startswith("_") and callable(getattr(cpp, name))
             and not isinstance(getattr(cpp, name), type)}  # the boundary's exception is not a kernel
    assert bound == set(_registry.KERNELS) | set(_registry.CPP_CONTROLS)


def test_launch_refuses_arguments_that_differ_from_the_registry():
    with pytest.raises(TypeError, match=r"kl_normal_forward takes \(mu, logvar, prior_mu, prior_logvar, kl\)"):
        _backend.launch("reference", "kl_normal_forward", 1, logvar=None, mu=None, prior_mu=None,
                        prior_logvar=None, kl=None)


@pytest.mark.skipif(not _backend.cpp_available(), reason="the C++ kernels")
def test_launch_cpp_refuses_an_option_the_kernel_has_not():
    """launch_cpp passes only the options the registry lists for that kernel (kl_normal_forward has none)."""
    with pytest.raises(TypeError, match=r"kl_normal_forward takes .* and the options \(\), got .* and \(of_scale\)"):
        _backend.launch_cpp("kl_normal_forward", 1, {"of_scale": True}, mu=None, logvar=None, prior_mu=None,
                            prior_logvar=None, kl=None)


@pytest.mark.parametrize("op", _registry.OPS.values(), ids=lambda op: op.name)
def test_every_op_has_its_kernels_tests_and_benchmark(op):
    assert set(op.kernels) <= set(_registry.KERNELS)
    assert (ROOT / op.test).exists()
    # its folder's benchmark row, run by benchmarks/bench_op.py
    folder = _registry.FOLDER_OF[op.name]
    assert op.benchmark == folder
    names = _registry.FOLDERS[folder].BENCH.fastvae
    assert set((names,) if isinstance(names, str) else names) <= {o.name for o in _registry.folder_ops(folder)}


# What an op folder holds (fastvae/ops/__init__.py): the files of its layers, and
# nothing of it outside (no kernels/<op>.py, fastvae/<op>.py, csrc/<op>*.cpp, tests/test_<op>.py)
FOLDER_FILES = ("__init__.py", "op.py", "triton.py", "{op}.h", "{op}.cpp", "bind.cpp", "test_{op}.py")


@pytest.mark.parametrize("name", _registry.FOLDERS)
def test_an_op_folder_holds_all_of_its_op(name):
    """Files named after the folder: the op's name, or its family's."""
    folder = ROOT / "fastvae" / "ops" / name
    ops = _registry.folder_ops(name)
    assert len(ops) == 1 and ops[0].name == name or len(ops) > 1 and not hasattr(_registry.FOLDERS[name], "OP")
    expected = {f.format(op=name) for f in FOLDER_FILES}
    if any(op.torch_ops for op in ops):
        expected.add("torch_op.cpp")
    assert {p.name for p in folder.iterdir() if p.is_file()} == expected
    for op in ops:
        assert op.test == f"fastvae/ops/{name}/test_{name}.py"
        assert all(_registry.KERNELS[k].module == name for k in op.kernels)
    stems = {name} | {op.name for op in ops}
    elsewhere = [p for stem in sorted(stems) for p in (
        ROOT / "kernels" / f"{stem}.py", ROOT / "fastvae" / f"{stem}.py", ROOT / "csrc" / f"{stem}.cpp",
        ROOT / "csrc" / f"{stem}.h", ROOT / "csrc" / f"{stem}_bind.cpp", ROOT / "tests" / f"test_{stem}.py",
        ROOT / "benchmarks" / f"bench_{stem}.py")]
    assert [str(p.relative_to(ROOT)) for p in elsewhere if p.exists()] == []


@pytest.mark.parametrize("name", _registry.FOLDERS)
def test_an_op_folder_gives_its_cases_of_every_suite_wide_check(name):
    """The checks over every op (launches, thread counts, the fallback, the
    double backward, and for a C++ operator its compile and twin cases) read an
    op folder's cases from its test module (tests/helpers.py, op_cases); a
    missing one would leave the op unchecked there (a family's: for each of
    its ops, as the central tests' own "every op has a case" checks find)."""
    import helpers

    ops = _registry.folder_ops(name)
    needed = {(kind, op.name) for kind in helpers.PER_OP_CASES for op in ops}
    if any(op.double_backward == "closed form" for op in ops):
        needed.add(("double_backward_cases", name))
    if any(op.torch_ops for op in ops):
        needed |= {("compile_cases", name), ("twin_op_cases", name)}
    assert sorted((kind, n) for kind, n in needed if n not in helpers.op_cases(kind)) == []


def test_interpreter_run_covers_every_module_that_reaches_a_triton_kernel():
    """A test module that calls an op (or an objective built on them) and is left
    out of the interpreter run would leave Triton code untested."""
    modules = set(_registry.interpreter_test_modules())
    main_process_only = {"test_backend.py", "test_registry.py", "test_triton_interpreter.py", "test_benchmarks.py",
                         "test_demo.py", "test_examples.py", "test_compile.py", "test_aot.py",
                         "test_docs.py", "test_migrating.py", "test_torch_ops.py", "test_layers.py",
                         "test_history_free.py", "test_op_ownership.py", "test_hierarchical.py", "test_importance.py",
                         "test_tiers.py", "test_integrations.py", "test_integrations_scvi.py",
                         "test_integrations_pythae.py", "test_triton_ops.py"}
    missing = sorted(n for n in main_process_only if not (ROOT / "tests" / n).exists())
    assert not missing, f"named here but not in tests/: {missing}"  # a stale name hides nothing
    for path in sorted((ROOT / "tests").glob("test_*.py")) + sorted((ROOT / "fastvae" / "ops").glob("*/test_*.py")):
        if path.name not in main_process_only:
            assert str(path.relative_to(ROOT)) in modules, f"{path} is missing from the Triton interpreter run"


# The ahead-of-time tool (python -m fastvae.kernels.aot) is not a kernel: it
# drives the kernels from the front end's op registry, so it sits above both.
KERNEL_LAYER_TOOLS = {"aot.py"}


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, absolute names; relative imports that leave
    kernels/ (installed as fastvae.kernels) resolve into fastvae."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
            elif node.level >= 2:  # from .. import x / from ..y import x: above fastvae.kernels
                names.add("fastvae" + ("." + node.module if node.module else ""))
            else:
                names.add("fastvae.kernels" + ("." + node.module if node.module else ""))
    return names


def _is_kernel_module(name: str) -> bool:
    """fastvae.kernels and its modules, and an op folder's Triton kernels (fastvae.ops.<op>.triton)."""
    return name.startswith("fastvae.kernels") or re.fullmatch(r"fastvae\.ops\.\w+\.triton", name) is not None


def test_kernels_do_not_import_the_front_end():
    """kernels/ and the op folders' triton.py are the bottom layer: no kernel
    module imports fastvae beyond fastvae.kernels and the op folders' triton.py
    (the front end imports the kernels, never the other way round)."""
    modules = sorted(p for p in (ROOT / "kernels").glob("*.py") if p.name not in KERNEL_LAYER_TOOLS)
    modules += sorted((ROOT / "fastvae" / "ops").glob("*/triton.py"))
    assert modules
    upward = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                             if (m == "fastvae" or m.startswith("fastvae.")) and not _is_kernel_module(m))
              for p in modules}
    upward = {name: found for name, found in upward.items() if found}
    assert not upward, upward


def test_kernels_accumulation_rule_is_the_front_ends():
    pytest.importorskip("triton")
    import torch

    common = _backend.triton_module("_common")
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert common.accumulation_dtype(dtype) == _backend.accumulation_dtype(dtype), dtype


# -- the per-op facts of each Op entry, and the lists derived from them -----------------------


@pytest.mark.parametrize("op", _registry.OPS.values(), ids=lambda op: op.name)
def test_every_op_describes_its_launches_and_double_backward(op):
    """Each Op says what tests/test_launches.py asserts (Triton launches forward
    and backward, other kernels) and which double backward its Function has
    (tests/test_double_backward.py derives its coverage check from it)."""
    assert len(op.launches) == 3 and all(type(n) is int and n >= 0 for n in op.launches)
    assert op.launches[0] >= 1 and op.launches[1] >= 1
    assert op.double_backward in ("closed form", "not_twice")
    assert all(type(k) is str for k in op.other_kernels)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_a_heavy_kernel_names_its_rows(kernel):
    """Kernel.heavy (tests/test_aot.py's warps and wave, and its K x B x rows problem)
    is the rows' dimension, "D" or "L", or None; a kernel that reads its rows 128
    bits at a time (vector_loads) is a heavy forward kernel, whose rows' length
    tests/test_aot.py checks is a multiple of 4."""
    assert kernel.heavy in (None, "D", "L")
    assert not kernel.vector_loads or (kernel.heavy is not None and kernel.name.endswith("_forward"))


@pytest.mark.parametrize("op", [op for op in _registry.OPS.values() if op.model_bytes is not None],
                         ids=lambda op: op.name)
def test_the_gpu_model_s_ops_give_their_bytes(op):
    """Op.model_bytes (benchmarks/gpu_model.py's rows) gives positive bytes for both
    directions, no fewer for more samples (kl_normal has none), and fewer in
    bfloat16 than in float32."""
    shape = dict(K=5, B=256, L=32, D=784)
    f32, bf16 = op.model_bytes(shape, "float32"), op.model_bytes(shape, "bfloat16")
    more = op.model_bytes({**shape, "K": 50}, "float32")
    for direction in ("forward", "backward"):
        assert type(f32[direction]) is int and 0 < bf16[direction] < f32[direction] <= more[direction], direction


def _torch_library_block(namespace: str) -> str:
    """The bodies of csrc/torch_ops.cpp's TORCH_LIBRARY(namespace, m) { ... } and
    of each op folder's TORCH_LIBRARY_FRAGMENT(namespace, m) { ... } in torch_op.cpp
    (a body ends at its first closing brace: a schema has none), on one line or several,
    with the definitions each FASTVAE_TORCH_OP(NAME, ...) there makes: NAME in
    both namespaces, NAME_backward in fastvae_cpu."""
    blocks = []
    for path in [ROOT / "csrc" / "torch_ops.cpp", *sorted((ROOT / "fastvae" / "ops").glob("*/torch_op.cpp"))]:
        text = path.read_text()
        for head in (f"TORCH_LIBRARY({namespace}, m) {{", f"TORCH_LIBRARY_FRAGMENT({namespace}, m) {{"):
            if head in text:
                start = text.index(head)
                blocks.append(text[start:text.index("}", start + len(head))])
        for name in re.findall(r"^FASTVAE_TORCH_OP\((\w+),", text, re.M):
            blocks.append(f'm.def("{name}(')
            if namespace == "fastvae_cpu":
                blocks.append(f'm.def("{name}_backward(')
    return "\n".join(blocks)


def test_the_graph_twins_are_the_ops_defined_with_cpu():
    """csrc/torch_ops.cpp's fastvae_cpu block defines exactly the twins of the
    Python ops that `_op.define` was given ``cpu=`` for, each with its op's
    schema, so a traced graph never names a twin that does not exist."""
    from fastvae import _op
    names = set(re.findall(r'm\.def\("(\w+)\(', _torch_library_block("fastvae_cpu")))
    if not _op._CPU_TWINS:
        pytest.skip("a build without the C++ operators")
    assert names == {op.name().split("::")[1] for op in _op._CPU_TWINS}
    for op, (twin, _) in _op._CPU_TWINS.items():
        assert str(twin._schema).split("::", 1)[1] == str(op._schema).split("::", 1)[1], op


def test_the_cpp_operators_are_the_registry_s():
    """csrc/torch_ops.cpp defines exactly the operators the Op entries name
    (_backend.TORCH_OPS derives from them), and each serves its own op."""
    defined = set(re.findall(r'm\.def\("(\w+)\(', _torch_library_block("fastvae_cpp")))
    assert defined == set(_registry.TORCH_OPS) == set(_backend.TORCH_OPS)
    for op in _registry.OPS.values():
        assert all(name == op.name or name.startswith(op.name + "_") for name in op.torch_ops), op.name


def test_every_op_has_its_aot_cases():
    """python -m fastvae.kernels.aot compiles each op's launches from its
    folder's description (aot_calls), and only from there."""
    assert all(callable(getattr(_registry.FOLDERS[name], "aot_calls", None)) for name in _registry.FOLDERS)
    assert set(_registry.OPS) == set(_registry.FOLDER_OF)


_NUMBERS = {"six": 6, "seven": 7, "eight": 8, "nine": 9}


def test_the_adding_an_op_checklist_counts_its_files_and_names_real_ones():
    """docs/architecture.md's "Adding an op": the counts in its first sentence
    are those of its numbered items, each item names a file of the op folder
    it was written from (X read as kl_normal), the test module's case
    functions it names are helpers.OP_CASES, and each test the checklist says
    fails is there."""
    import helpers

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("\n## Adding an op\n"):]
    section = section[:section.index("\n## ", 5)]
    head = re.search(r"(\w+) files in the folder \((\w+) with a C\+\+\s+operator\)", section)
    items = re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |^Only if|^Outside the folder|\Z)", section, re.M | re.S)
    numbers = [int(n) for n, _ in items]
    assert numbers == list(range(1, len(items) + 1))
    cpp_from = int(re.search(r"^(\d+)\. ", section[section.index("Only if"):], re.M).group(1))
    assert _NUMBERS[head.group(1).lower()] == cpp_from - 1 == len(FOLDER_FILES)
    assert _NUMBERS[head.group(2).lower()] == len(items) == len(FOLDER_FILES) + 1
    for n, body in items:
        paths = [p.replace("X", "kl_normal") for p in re.findall(r"`([\w./]+\.(?:py|cpp|h|md))`", body)]
        assert paths and (ROOT / paths[0]).exists(), f"item {n} names no file of the op folder first: {paths}"
    named = set(re.findall(r"`(\w+)`", section[section.index("7. "):section.index("Only if")]))
    assert set(helpers.OP_CASES) <= named
    for test in re.findall(r"`(test_(?:every|an_op)_\w+)`", section):
        assert any(test in p.read_text() for p in (ROOT / "tests").glob("test_*.py")), test


# The non-decoder ops named *_log_prob: a prior's log p(z) (fastvae/priors.py), not log p(x | z).
NOT_DECODER_LIKELIHOODS = {"mixture_log_prob"}


def test_every_likelihood_op_has_its_entry_in_the_decoder_table():
    """The decoder likelihoods are the Ops whose ``likelihood`` field names a
    likelihood= value; fastvae/_decoder.py's table routes each to its op. Fails
    when such an Op has no table entry (or one that calls another op), when the
    table names an op the registry lacks or that does not name the entry back,
    and when an op named *_log_prob is neither a likelihood nor declared above
    as something else."""
    from fastvae import _decoder

    serving = {op.likelihood: op.name for op in _registry.OPS.values() if op.likelihood is not None}
    table = {name: entry.op for name, entry in _decoder._TABLE.items()}
    assert all(name == entry.name for name, entry in _decoder._TABLE.items())
    assert sorted(set(serving) - set(table)) == [], "likelihood ops with no entry in _decoder's table"
    assert sorted(set(table) - set(serving)) == [], "table entries whose op does not name them in the registry"
    assert serving == table
    assert _decoder.LIKELIHOODS == tuple(_decoder._TABLE)
    log_prob_ops = {name for name in _registry.OPS if name.endswith("_log_prob")}
    assert log_prob_ops == set(serving.values()) | NOT_DECODER_LIKELIHOODS
    assert NOT_DECODER_LIKELIHOODS <= set(_registry.OPS)
    # each route is its op folder's own function (the folder owns the step from a decoder output to its op)
    for entry in _decoder._TABLE.values():
        assert entry.route.__module__ == f"fastvae.ops.{_registry.FOLDER_OF[entry.op]}.op", entry
        assert entry.class_dims == _registry.OPS[entry.op].class_dims


# -- the family order that Python, C++ and Triton each spell --------------------------------
# A kernel's `family` argument is a family's position in fastvae/_families.py; the C++ kernels
# name the positions in an enum (or constants) and the Triton kernels branch on a constexpr
# FAMILY, a comment naming the family at each branch. Each family tuple: its C++ source, where
# the positions are named, its Triton module, and the op whose section of them it is where the
# folder holds a family of ops (each op's part begins at a "-- <op>" heading).
FAMILY_COPIES = {
    "LOCATION_SCALE_FAMILIES": ("sample_family/sample_family.cpp", "sample_family/triton.py",
                                "sample_location_scale"),
    "POSITIVE_FAMILIES": ("sample_family/sample_family.cpp", "sample_family/triton.py", "sample_positive"),
    "KL_FAMILIES": ("family_kl/family_kl.cpp", "family_kl/triton.py", None),
}
_SECTION = re.compile(r"^(?://|#) -- (sample_location_scale|sample_positive)\b", re.M)


def _section(text: str, op: str | None) -> str:
    """The part of a family folder's source that is ``op``'s: from its heading to
    the next op's (the whole text for None)."""
    if op is None:
        return text
    starts = [(m.start(), m.group(1)) for m in _SECTION.finditer(text)] + [(len(text), None)]
    parts = [text[a:b] for (a, name), (b, _) in zip(starts, starts[1:]) if name == op]
    assert parts, f"no section of {op}"
    return "".join(parts)


def _cpp_positions(text: str) -> list[tuple[str, int]]:
    """(family, position) of a C++ source's ``enum Family : int { kUniform = 0, ... }`` or
    ``constexpr int kLaplace = 0, ...;``, the family's name lower-cased from its constant's."""
    found = (re.search(r"enum Family : int \{([^}]*)\}", text)
             or re.search(r"constexpr int (k\w+ = \d+(?:, k\w+ = \d+)+);", text))
    assert found, "no enum Family and no constexpr int list of positions"
    return [(name.lower(), int(n)) for name, n in re.findall(r"k(\w+) = (\d+)", found.group(1))]


@pytest.mark.parametrize("families", FAMILY_COPIES)
def test_the_cpp_and_triton_kernels_spell_the_families_order(families):
    """The C++ constants name each family at its position in fastvae/_families.py,
    the binding and the C++ dispatch count as many families (a sampler's binding
    lists their names in that order), and every Triton branch on FAMILY
    is a position of the tuple and, where its comment names a family, that
    family's: so the order cannot drift in one copy unnoticed."""
    from fastvae import _families

    order = getattr(_families, families)
    cpp_file, triton_file, op = FAMILY_COPIES[families]
    cpp_path, triton_path = (ROOT / "fastvae" / "ops" / p for p in (cpp_file, triton_file))
    cpp = _section(cpp_path.read_text(), op)
    assert _cpp_positions(cpp) == [(name, i) for i, name in enumerate(order)]
    # the binding's check of the index: a sampler's names in order with their count
    # (sample_family's bind.cpp, FamilySamplerNames), family_kl's count (in its header, which the
    # samplers' fused KL bindings read too)
    bind = (cpp_path.parent / "bind.cpp").read_text() + cpp_path.with_suffix(".h").read_text()
    listed = re.findall(r'(\d+),\s*"(\w+(?:, \w+)+)"', bind)
    known = [getattr(_families, f) for f in FAMILY_COPIES]
    assert all(tuple(names.split(", ")) in known for _, names in listed), listed
    bound = [int(n) for n, names in listed if tuple(names.split(", ")) == order]
    bound += [int(n) for n in re.findall(r"kFamilyKLFamilies = (\d+)", bind)]
    counts = [int(n) for n in re.findall(r"by_family<(\d+)>", cpp)]
    assert bound and set(bound + counts) == {len(order)}
    triton = _section(triton_path.read_text(), op)
    branches = [int(n) for n in re.findall(r"\bFAMILY == (\d+)", triton)]
    assert branches and set(branches) <= set(range(len(order)))
    named = re.findall(r"\bFAMILY == (\d+):\s*#\s*([A-Za-z]+)", triton)
    assert named and all(order[int(n)] == name.lower() for n, name in named), named


def test_the_triton_kernels_name_kl_families_by_their_positions():
    """The Triton modules' constants of a KL family (kernels import nothing of
    the front end, so they spell the position): KL_FAMILIES' own."""
    pytest.importorskip("triton")
    from fastvae._families import KL_FAMILIES
    from fastvae.ops.family_kl import triton as family_kl
    from fastvae.ops.sample_family import triton as sample_family

    assert family_kl.KUMARASWAMY == KL_FAMILIES.index("kumaraswamy")
    assert sample_family.GUMBEL_KL == KL_FAMILIES.index("gumbel")


def test_family_kl_names_the_exponential_s_position():
    """family_kl's header, which its binding and the samplers' fused KL bindings read, tells
    the exponential (no location), the Kumaraswamy (sample_positive's fused KL against a
    Beta) and the Weibull by constants of their own: their positions in KL_FAMILIES."""
    from fastvae._families import KL_FAMILIES

    header = (ROOT / "fastvae" / "ops" / "family_kl" / "family_kl.h").read_text()
    assert int(re.search(r"kFamilyKLExponential = (\d+)", header).group(1)) == KL_FAMILIES.index("exponential")
    assert int(re.search(r"kFamilyKLKumaraswamy = (\d+)", header).group(1)) == KL_FAMILIES.index("kumaraswamy")
    assert int(re.search(r"kFamilyKLWeibull = (\d+)", header).group(1)) == KL_FAMILIES.index("weibull")
    triton = (ROOT / "fastvae" / "ops" / "family_kl" / "triton.py").read_text()  # which imports no front end
    for name in ("exponential", "kumaraswamy", "weibull"):
        assert int(re.search(rf"^{name.upper()} = (\d+)", triton, re.M).group(1)) == KL_FAMILIES.index(name)
