"""Shared fixtures of every test (tests/ and each op's fastvae/ops/<op>/test_<op>.py):
the backends under test, NaN-poisoned outputs, Hypothesis profiles.

One pytest process tests the reference and cpp backends (and compiled Triton
when a CUDA device is present). The Triton interpreter needs TRITON_INTERPRET=1
before Triton is imported, so tests/test_triton_interpreter.py re-runs the op
tests in a child process with that set; there the only backend is triton on CPU.

Two tiers (CONTRIBUTING.md, Running the tests): ``python -m pytest`` runs the
quick tier, ``python -m pytest --full`` (or FASTVAE_TESTS=full) the full one.
The quick tier runs every test function, each of its parametrizations'
values at least once per backend (quick_selection below), with few
Hypothesis examples, and leaves out the GPU compiles (``gpu_compile``) and
the tests marked ``full``; the full tier runs every parametrization with the
"ci" profile's examples.
"""
import atexit
import os
import shutil
import tempfile

# The main process and the interpreter child run side by side, each with
# torch's OpenMP threads: threads that spin while they wait would take the
# other process's core (fastvae/_openmp.py says why). Set before torch loads
# its OpenMP runtime; a policy the environment sets stands. It also keeps
# fastvae's one-time ThreadsWarning (fastvae/_openmp.py), which depends on the
# machine's load, out of tests that count warnings.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A fresh inductor cache per run: a cached compiled graph can outlive a change
# to a custom op's schema and call it with the old arguments.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastvae-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import fastvae._backend  # noqa: E402
import fastvae._plan  # noqa: E402
import fastvae._registry  # noqa: E402
from fastvae.ops.bernoulli_likelihood import op as bernoulli_op  # noqa: E402 (its plans too)
from fastvae.ops.sample_normal_kl import op as sample_normal_kl_op  # noqa: E402 (its plans, as the objectives')

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the tier: set from --full and --skip-quick by pytest_sessionstart, and inherited by the interpreter child
FULL = os.environ.get("FASTVAE_TESTS", "quick") in ("full", "full-skip-quick")
SKIP_QUICK = os.environ.get("FASTVAE_TESTS") == "full-skip-quick"

# The full tier's profile. The interpreter child runs each Triton program as a Python loop, about 1 ms a
# program: it takes half the examples, so that it ends about when the main process
# does on 2 cores (a GPU run, and the cpp and reference backends, take all 40).
settings.register_profile(
    "ci", max_examples=20 if INTERPRET else 40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Under ASan and UBSan (.ci/sanitize) the examples look for memory errors, which the
# shapes decide (odd sizes, one row, broadcasting): the fixed first examples of each
# test cover them, and the values were checked by the main run's 40.
settings.register_profile(
    "sanitize", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The quick tier: a test's explicit examples and a few drawn ones, the same on
# every run. The shapes that find kernel bugs (odd sizes, one row, K = 1) come
# from the parametrizations and the explicit examples; the many drawn examples
# that search the rest of the space are the full tier's.
QUICK_EXAMPLES = 3
settings.register_profile(
    "quick", max_examples=QUICK_EXAMPLES, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _profile_name():
    return os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if FULL else "quick")


settings.load_profile(_profile_name())


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="fastvae's full tier: every parametrization, the Hypothesis 'ci' profile and the GPU "
                          "compiles (default: the quick tier; FASTVAE_TESTS=full does the same)")
    parser.addoption("--skip-quick", action="store_true",
                     help="with --full: leave out the quick tier's tests without Hypothesis examples, which a "
                          "quick run just ran exactly as the full tier would (CI runs the quick tier first)")


def _backend_params():
    if INTERPRET:
        return [pytest.param(("triton", "cpu"), id="triton-interpreter")]
    params = [pytest.param(("reference", "cpu"), id="reference"), pytest.param(("cpp", "cpu"), id="cpp")]
    # Without a GPU the triton-cuda variants are not generated at all (one
    # named skip in test_backend.py says so), rather than skipped one by one.
    if torch.cuda.is_available():
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    # FASTVAE_TEST_BACKENDS=cpp (a comma-separated list of ids) keeps only
    # those: .ci/sanitize tests the C++ alone, the reference has no C++ to check
    only = os.environ.get("FASTVAE_TEST_BACKENDS")
    if only:
        params = [p for p in params if p.id in only.split(",")]
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """(backend name, device): that backend serves every op for the test's duration."""
    name, device = request.param
    # on CUDA the automatic choice is triton, and CPU tensors that a test makes
    # for its oracle keep the cpp backend
    fastvae._backend.set_backend(None if device == "cuda" else name)
    return name, device


@pytest.fixture(params=[None, 3], ids=["one-pass", "split-3"])
def sample_splits(request, monkeypatch):
    """How the Triton backward splits a sum over samples: None (the launcher's
    choice: one pass under the interpreter) or 3 splits forced, whose partials
    the last program of a tile adds (the GPU's path when the rows alone do not
    fill a wave). Other backends ignore it."""
    common = pytest.importorskip("fastvae.kernels._common")
    monkeypatch.setattr(common, "FORCE_SPLITS", request.param)
    fastvae._plan.clear()  # the objectives' plans hold the geometry they were made with
    sample_normal_kl_op.PLANS.clear()  # and so do the ops'
    bernoulli_op.PLANS.clear()
    yield request.param
    fastvae._plan.clear()
    sample_normal_kl_op.PLANS.clear()
    bernoulli_op.PLANS.clear()


@pytest.fixture(autouse=True)
def fresh_op_plans():
    """The ops' own plans hold the launch geometry they were made with, which
    tests patch (FORCE_SPLITS, a kernel's geometry): each test starts without them."""
    for plans in fastvae._registry.plan_stores():
        plans.clear()
    yield


@pytest.fixture(autouse=True)
def plans_keep_one_element_templates():
    """The plans a test left (the objectives' and the ops') keep templates of
    one element: a plan outlives its call, so a template of an output's size
    would hold that memory for as long as the signature stays cached."""
    yield
    from helpers import assert_plans_keep_one_element_templates
    stores = fastvae._registry.plan_stores
    assert_plans_keep_one_element_templates([fastvae._plan.PLANS, *stores(), *stores("PLANS")])


@pytest.fixture(autouse=True)
def restore_backend():
    """A test that picks a backend must not leak the choice into the next one."""
    previous = fastvae._backend.requested_backend()
    yield
    fastvae._backend.set_backend(previous)


@pytest.fixture(autouse=True)
def fresh_value_checks():
    """Each test starts with the default value checks, none of them spent."""
    fastvae.set_value_checks("auto")
    yield
    fastvae.set_value_checks("auto")


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every fresh op output starts as NaN, so an element a kernel forgot to write fails."""
    real = fastvae._backend.empty_output

    def poisoned(shape, *, like, dtype=None):
        out = real(shape, like=like, dtype=dtype)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def poisoned_plan_output(like):
        out = torch.empty_like(like)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(fastvae._backend, "empty_output", poisoned)
    monkeypatch.setattr(fastvae._plan, "empty", poisoned_plan_output)
    monkeypatch.setattr(sample_normal_kl_op, "empty", poisoned_plan_output)
    # the C++ operators (csrc/torch_ops.cpp) allocate their outputs themselves
    cpp = fastvae._backend.cpp_module() if fastvae._backend.cpp_available() else None
    if cpp is not None:
        cpp._set_poison_outputs(True)
    yield
    if cpp is not None:
        cpp._set_poison_outputs(False)


_interpreter_launcher = []  # the module of tests/test_triton_interpreter.py, once its child is started
LAUNCHER = "test_op_tests_under_triton_interpreter"


# The axes a selection keeps whole: a test function runs on every backend,
# and covers its other parameters' values within each.
STRATA = ("backend",)


def _parts(item):
    """(argument, value) of each parametrized argument of the item (each
    argument of a multi-argument parametrize on its own)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    return {(name, repr(value)) for name, value in callspec.params.items() if name not in STRATA}


def _pairs(item):
    parts = sorted(_parts(item))
    return {(a, b) for i, a in enumerate(parts) for b in parts[i + 1:]} | {(a,) for a in parts}


def _covering(group, covers):
    """The fewest items, picked greedily in collection order, whose covers()
    together hold everything any item of the group covers."""
    wanted = set().union(*(covers(item) for item in group))
    chosen = [group[0]]
    wanted -= covers(group[0])
    while wanted:
        best = max(group, key=lambda item: len(covers(item) & wanted))  # the first of the best
        chosen.append(best)
        wanted -= covers(best)
    return chosen


def each_choice(group):
    """Every value of every parameter at least once: 20 combinations of 2
    dtypes x 5 families x 2 sizes become 5."""
    return _covering(group, _parts)


def pairwise(group):
    """Every pair of values of two parameters at least once (every family in
    every dtype, every dtype at every size...): 20 become 10."""
    return _covering(group, _pairs)


def _full_only(item):
    """The full tier's alone: ``gpu_compile`` (minutes of Triton compiles),
    ``full`` (a benchmark's run, a second compile of what the quick tier
    compiles once), ``full_interpreted`` and gradcheck and opcheck under the
    Triton interpreter (about 1 ms a program: tests of thousands, which the
    cpp and reference backends run in the quick tier)."""
    return (item.get_closest_marker("full") or item.get_closest_marker("gpu_compile")
            or (INTERPRET and (item.get_closest_marker("full_interpreted") or _checks_every_element(item))))


def _checks_every_element(item):
    """torch's gradcheck and opcheck: a finite difference or a dispatch check
    per element, seconds to a minute interpreted; the reference tests check the
    Triton kernels' values and gradients in the quick tier, and these run on the
    cpp and reference backends."""
    return "gradcheck" in item.name or "opcheck" in item.name


def first_only(group):
    """The group's first parametrization (marker ``quick_one``: the others
    prove the same mechanism on other inputs, as the full tier checks)."""
    return group[:1]


def select(items, cover, *, full_only=False):
    """The items ``cover`` picks, in collection order, from each test
    function's parametrizations on each backend (STRATA); with ``full_only``
    the full tier's own tests (_full_only) are left out and a test marked
    ``quick_one`` keeps its first parametrization."""
    groups: dict = {}
    for item in items:
        if full_only and _full_only(item):
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            groups[item.nodeid] = [item]
            continue
        stratum = tuple(repr(callspec.params.get(name)) for name in STRATA)
        groups.setdefault((item.nodeid.split("[")[0], stratum), []).append(item)
    def picks(group):
        return first_only(group) if full_only and group[0].get_closest_marker("quick_one") else cover(group)

    keep = {id(item) for group in groups.values() for item in picks(group)}
    return [item for item in items if id(item) in keep]


def quick_selection(items):
    """The quick tier: every test function but the full tier's own, each of
    its parameters' values at least once on each backend."""
    return select(items, each_choice, full_only=True)


def full_selection(items):
    """The full tier: every parametrization in the main process; under the
    Triton interpreter, every pair of parameter values (pairwise). There the
    parameters that only the front end reads (how a prior is passed, which
    estimator) run the same kernel programs again at about 1 ms a program,
    and the front end is tested whole on the cpp and reference backends;
    every pair of the kernel's own parameters (family and dtype, dtype and
    size, splits and dtype) still runs (docs/architecture.md, The tests)."""
    return select(items, pairwise) if INTERPRET else list(items)


def _has_examples(item):
    return getattr(getattr(item, "obj", None), "is_hypothesis_test", False)


def _cap_examples(items, cap):
    """A test's own ``@settings(max_examples=N)`` overrides the profile: the
    quick tier caps N too."""
    for function in {item.obj for item in items if hasattr(item, "obj")}:
        own = getattr(function, "_hypothesis_internal_use_settings", None)
        if own is not None and own.max_examples > cap:
            function._hypothesis_internal_use_settings = settings(own, max_examples=cap)


def _keep(config, items, kept):
    if len(kept) < len(items):
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
        items[:] = kept


def pytest_collection_modifyitems(session, config, items):
    """The tier's selection (quick_selection, full_selection; with
    --skip-quick, the full tier less the quick tier's tests that ran exactly
    so, those without Hypothesis examples); then the interpreter's launcher
    test runs last: it waits for the child, and the main process's other
    tests run beside the child meanwhile, each on one core."""
    if FULL:
        kept = full_selection(items)
        if SKIP_QUICK:
            quick = {id(item) for item in quick_selection(items) if not _has_examples(item)}
            kept = [item for item in kept if id(item) not in quick or item.name == LAUNCHER]
        _keep(config, items, kept)
    else:
        _keep(config, items, quick_selection(items))
        _cap_examples(items, settings().max_examples)
    launchers = [item for item in items if item.name == LAUNCHER]
    items[:] = [item for item in items if item not in launchers] + launchers


def pytest_collection_finish(session):
    """Starts the interpreter child (tests/test_triton_interpreter.py) as soon
    as the session knows its launcher test will run, so that it runs beside
    the rest of the suite (CI's longest part, on one of the machine's cores)."""
    for item in session.items:
        if item.name == LAUNCHER:
            item.module.start_child()
            _interpreter_launcher.append(item.module)
            return


_terminal_reporter = [None]  # pytest's, once configured (None with -p no:terminal)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    _terminal_reporter[0] = config.pluginmanager.get_plugin("terminalreporter")
    for marker in ("full: the full tier's alone (conftest.py, _full_only)",
                   "full_interpreted: the full tier's alone under the Triton interpreter (conftest.py, _full_only)",
                   "quick_one: the quick tier runs the first parametrization on each backend (conftest.py)"):
        config.addinivalue_line("markers", marker)


def pytest_sessionstart(session):
    """--full picks the full tier before any test module is imported (their
    @settings take the loaded profile as their parent); the environment
    carries it to the interpreter child. The header says which tier runs."""
    global FULL, SKIP_QUICK
    if session.config.getoption("full", False):
        FULL = True
        SKIP_QUICK = session.config.getoption("skip_quick", False)
        os.environ["FASTVAE_TESTS"] = "full-skip-quick" if SKIP_QUICK else "full"
        settings.load_profile(_profile_name())
    elif session.config.getoption("skip_quick", False):
        raise pytest.UsageError("--skip-quick goes with --full")
    if _terminal_reporter[0] is not None and not INTERPRET:
        tier = "full" if FULL else "quick (--full for the full tier)"
        _terminal_reporter[0].write_line(f"fastvae tests: the {tier} tier, Hypothesis profile {_profile_name()!r}")


_noted = set()  # the test modules whose NOTE was printed


@pytest.hookimpl(tryfirst=True)  # before the terminal reporter writes the test's file name
def pytest_runtest_protocol(item, nextitem):
    """A test module's NOTE, a line saying what its tests wait for (tests/test_aot.py:
    minutes of compiling for a GPU), is printed once, before its first test."""
    note = getattr(getattr(item, "module", None), "NOTE", None)
    if note and item.module not in _noted and _terminal_reporter[0] is not None:
        _noted.add(item.module)
        _terminal_reporter[0].write_line(note)


@pytest.hookimpl(trylast=True)  # after the terminal reporter has ended the test's line
def pytest_runtest_logfinish(nodeid, location):
    """Between the main process's tests, the interpreter child's progress so far
    (tests/test_triton_interpreter.py's show_progress: every half minute at most)."""
    if _terminal_reporter[0] is not None:
        for module in _interpreter_launcher:
            module.show_progress(_terminal_reporter[0])


def pytest_sessionfinish(session):
    """A session that ends before the launcher test waited for the child (-x
    after a failure, Ctrl-C) stops it: no test run outlives its session."""
    for module in _interpreter_launcher:
        module.stop_child()
