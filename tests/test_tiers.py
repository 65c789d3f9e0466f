"""The test tiers (conftest.py): what the quick tier keeps of a parametrized
test, what the full tier runs, and what CI's --skip-quick leaves out."""
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test of the tiers (backend-independent)")
ROOT = Path(__file__).resolve().parents[1]


class _CallSpec:
    def __init__(self, params):
        self.params = params


class _Item:
    """What the selection reads of a pytest item: its node id, parameters and markers."""

    def __init__(self, name, params=None, markers=(), examples=False):
        self.name = name
        self.nodeid = f"tests/test_x.py::{name}" + (f"[{'-'.join(map(str, params.values()))}]" if params else "")
        if params is not None:
            self.callspec = _CallSpec(params)
        self._markers = set(markers)
        self.obj = type("Test", (), {"is_hypothesis_test": examples})

    def get_closest_marker(self, name):
        return name if name in self._markers else None

    def __repr__(self):
        return self.nodeid


def _grid(name, backends=("reference", "cpp"), **axes):
    names = list(axes)
    return [_Item(name, {"backend": backend, **dict(zip(names, values))})
            for backend in backends for values in itertools.product(*axes.values())]


AXES = dict(dtype=["float32", "float64"], family=["uniform", "laplace", "logistic", "gumbel", "cauchy"], size=[1, 37])


def test_the_quick_tier_covers_every_value_on_every_backend_in_fewer_runs():
    items = _grid("test_a", **AXES)
    kept = conftest.quick_selection(items)
    assert len(items) == 40 and len(kept) == 10  # 5 families on each of 2 backends
    for backend in ("reference", "cpp"):
        on = [item.callspec.params for item in kept if item.callspec.params["backend"] == backend]
        for axis, values in AXES.items():
            assert {p[axis] for p in on} == set(values), (backend, axis)


def test_the_full_tier_in_the_interpreter_covers_every_pair_of_values(monkeypatch):
    items = _grid("test_a", backends=("triton-interpreter",), **AXES)
    assert conftest.full_selection(items) == items  # the main process: every parametrization
    monkeypatch.setattr(conftest, "INTERPRET", True)
    kept = conftest.full_selection(items)
    assert len(kept) < len(items)
    for (a, va), (b, vb) in itertools.combinations([(axis, v) for axis, vs in AXES.items() for v in vs], 2):
        if a != b:
            assert any(i.callspec.params[a] == va and i.callspec.params[b] == vb for i in kept), (a, va, b, vb)


def test_the_quick_tier_keeps_every_test_but_the_full_tiers_own(monkeypatch):
    plain = _Item("test_plain")
    full = _Item("test_benchmark_run", markers={"full"})
    gpu = _Item("test_gpu", markers={"gpu_compile"})
    interpreted = _Item("test_slow_interpreted", markers={"full_interpreted"})
    gradcheck = _Item("test_gradcheck_float64")
    one = _grid("test_one", objective=["elbo", "iwae dreg", "iwae stl"])
    for item in one:
        item._markers = {"quick_one"}
    items = [plain, full, gpu, interpreted, gradcheck, *one]
    assert conftest.quick_selection(items) == [plain, interpreted, gradcheck, one[0], one[3]]
    monkeypatch.setattr(conftest, "INTERPRET", True)
    assert conftest.quick_selection(items) == [plain, one[0], one[3]]


def test_skip_quick_leaves_out_what_the_quick_run_ran_exactly_so(monkeypatch):
    """--full --skip-quick: the full tier less the quick tier's tests without
    Hypothesis examples (a quick run ran them as the full tier would); those
    with examples run again with the full profile's."""
    items = _grid("test_a", family=["uniform", "laplace", "logistic"], size=[1, 37])
    drawn = _grid("test_drawn", dtype=["float32", "float64"])
    for item in drawn:
        item.obj = type("Test", (), {"is_hypothesis_test": True})
    launcher = _Item(conftest.LAUNCHER)
    all_items = [*items, *drawn, launcher]
    quick = conftest.quick_selection(all_items)
    monkeypatch.setattr(conftest, "FULL", True)
    monkeypatch.setattr(conftest, "SKIP_QUICK", True)
    deselected = []
    hook = type("Hook", (), {"pytest_deselected": lambda self, items: deselected.extend(items)})()
    config = type("Config", (), {"hook": hook})()
    kept = list(all_items)
    conftest.pytest_collection_modifyitems(None, config, kept)
    assert set(map(id, kept)) | set(map(id, deselected)) == set(map(id, all_items))
    assert {id(i) for i in deselected} == {id(i) for i in quick if i in items}
    assert all(item in kept for item in drawn) and kept[-1] is launcher


def test_skip_quick_without_full_is_refused():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--skip-quick", "--collect-only", "-q",
                           "tests/test_philox.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "--skip-quick goes with --full" in proc.stdout + proc.stderr
