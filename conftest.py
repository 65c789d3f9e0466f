"""Shared fixtures of every test (tests/ and each op's fastvae/ops/<op>/test_<op>.py):
the backends under test, NaN-poisoned outputs, Hypothesis profiles.

One pytest process tests the reference and cpp backends (and compiled Triton
when a CUDA device is present). The Triton interpreter needs TRITON_INTERPRET=1
before Triton is imported, so tests/test_triton_interpreter.py re-runs the op
tests in a child process with that set; there the only backend is triton on CPU.
"""
import atexit
import os
import shutil
import tempfile

# A fresh inductor cache per run: a cached compiled graph can outlive a change
# to a custom op's schema and call it with the old arguments.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastvae-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# torch loads its OpenMP runtime below, before fastvae: passive waiting keeps the suite's own threads
# off the cores of the shared machines it runs on, and keeps fastvae's one-time ThreadsWarning
# (fastvae/_openmp.py), which depends on the machine's load, out of tests that count warnings
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import fastvae._backend  # noqa: E402
import fastvae._plan  # noqa: E402
import fastvae._registry  # noqa: E402
from fastvae.ops.bernoulli_likelihood import op as bernoulli_op  # noqa: E402 (its plans too)
from fastvae.ops.sample_normal_kl import op as sample_normal_kl_op  # noqa: E402 (its plans, as the objectives')

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The interpreter child runs each Triton program as a Python loop, about 1 ms a
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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


def pytest_collection_modifyitems(session, config, items):
    """The interpreter's launcher test runs last: it waits for the child, and
    the main process's other tests run beside the child meanwhile, each on
    one core, instead of waiting with it."""
    launchers = [item for item in items if item.name == "test_op_tests_under_triton_interpreter"]
    items[:] = [item for item in items if item not in launchers] + launchers


def pytest_collection_finish(session):
    """Starts the interpreter child (tests/test_triton_interpreter.py) as soon
    as the session knows its launcher test will run, so that it runs beside
    the rest of the suite (CI's longest part, on one of the machine's cores)."""
    for item in session.items:
        if item.name == "test_op_tests_under_triton_interpreter":
            item.module.start_child()
            _interpreter_launcher.append(item.module)
            return


_terminal_reporter = [None]  # pytest's, once configured (None with -p no:terminal)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    _terminal_reporter[0] = config.pluginmanager.get_plugin("terminalreporter")


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
