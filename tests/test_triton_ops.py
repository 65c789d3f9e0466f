"""The plans' triton_op twins (fastvae/_triton_ops.py) and the switch that puts
them in compiled graphs (fastvae.set_compiled_nodes, FASTVAE_COMPILED_NODES),
proven on the CPU as far as that goes.

In the main process Triton's kernels are compiled kernels (JITFunctions), so
wrap_triton traces them into graph nodes; no GPU runs them. Two stand-ins:
- fake CUDA tensors (FakeTensorMode): each op's implementation and its twin
  run with the CUDA geometry, no kernel launched, the launches recorded: the
  op's through a stubbed Triton ``run`` (the method of
  benchmarks/bench_host_cost.py), the twin's through a stubbed
  ``_triton_ops._launcher``;
- CPU tensors on the triton backend (the interpreter's check bypassed) with
  CPU added to the devices that take the twins: torch.compile traces a
  training step through Dynamo and AOT autograd, whose joint graph is
  inspected and never run.
What only a GPU can confirm is listed in docs/architecture.md, "Under torch.compile".
"""
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

import fastvae
from fastvae import _backend, _op, _plan_ops, _registry, _triton_ops
from fastvae._families import KL_FAMILIES, LOCATION_SCALE_FAMILIES, POSITIVE_FAMILIES

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="the twins trace Triton's compiled kernels: the main process")
triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = torch.float32


@pytest.fixture(scope="module")
def twins():
    """{op: twin}, every twin registered (once a process)."""
    return _triton_ops.register()


@pytest.fixture
def nodes():
    """Restores the compiled-nodes setting and the backend after the test."""
    before = _backend.compiled_nodes()
    yield
    _backend._compiled_nodes = before
    fastvae.set_backend(None)


@pytest.fixture
def quiet_mutation_analysis():
    """Without a GPU driver, Inductor's analysis of which arguments a Triton
    kernel writes fails and assumes all (with a logged traceback per kernel)."""
    log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    disabled, log.disabled = log.disabled, True
    yield
    log.disabled = disabled


# -- registration ----------------------------------------------------------------


def test_every_planned_op_has_a_twin_with_its_schema(twins):
    """Every op an op record lists in triton_ops, and every plan op of the
    objectives, has a twin fastvae_triton::<name> registered with the op's
    schema (names, types, defaults, returns; an int is a SymInt, the type
    torch.library.triton_op infers for a Python int), and _op.graph_node's
    table maps the op to it. Every folder whose op.py keeps OP_PLANS (its
    own calls' plans) declares twins."""
    names = _triton_ops.names()
    assert len(names) == len(set(names)) == len(twins)
    assert set(_plan_ops.TRITON_OPS) <= set(names)
    for name in names:
        op = getattr(torch.ops.fastvae, name).default
        twin = getattr(torch.ops.fastvae_triton, name).default
        assert twins[op] is twin is _op._TRITON_TWINS[op]
        want = str(op._schema).replace("fastvae::", "fastvae_triton::").replace("int ", "SymInt ")
        assert str(twin._schema) == want
    declared = {_registry.FOLDER_OF[op.name] for op in _registry.OPS.values() if op.triton_ops}
    planned = {folder for folder in _registry.FOLDERS
               if hasattr(sys.modules.get(f"fastvae.ops.{folder}.op"), "OP_PLANS")}
    assert planned == declared


# -- each twin launches what its plan launches -------------------------------------


def _cases():
    """name -> a function of a tensor factory that returns the op's arguments
    for a call its plan serves (as a compiled graph makes it: flat contiguous
    float32 tensors), one per twin; a backward's saved tensors come from its
    forward op (fake: its registered fake)."""
    N, L, K, P, D, C, M = 5, 3, 2, 4, 6, 3, 7
    ls, kl_ls = LOCATION_SCALE_FAMILIES.index("laplace"), KL_FAMILIES.index("laplace")
    pos, kl_pos = POSITIVE_FAMILIES.index("weibull"), KL_FAMILIES.index("weibull")
    f = torch.ops.fastvae

    def lme(r):
        lw = r(K, P)
        _, lw_max, sumexp = f.logmeanexp(lw)
        return r(P), None, lw, lw_max, sumexp

    def mixture(r):
        z, means, logvars, logits = r(N, L), r(M, L), r(M, L), r(M)
        return r(N), z, means, logvars, logits, f.mixture_log_prob(z, means, logvars, logits), True, True, True, True

    def stick(r):
        y = r(N, L)
        return r(N, L + 1), y, f.stick_breaking(y)

    def iwae_tail(r):
        x, out, latent = r(P, D), r(K, P, D), r(K, P)
        _, lw, lw_max, sumexp, _ = f.plan_iwae_tail(x, out, latent, "gaussian", "sum", False)
        return r(), x, out, lw, lw_max, sumexp, "gaussian", "sum"

    return {
        "plan_sample": lambda r: (r(N, L), r(N, L), r.seed(), K, True, True, F32),
        "plan_sample_backward": lambda r: (r(N, L), r(N, L), r.seed(), r(K, N, L), r(N), r(K, N), K, True, False, F32),
        "plan_elbo_tail": lambda r: (r(P, D), r(P, D), r(P), 0.5, "bernoulli", "mean"),
        "plan_elbo_tail_backward": lambda r: (r(), r(P, D), r(P, D), r(P), 0.5, "bernoulli", "mean"),
        "plan_iwae_tail": lambda r: (r(P, D), r(K, P, D), r(K, P), "gaussian", "sum", True),
        "plan_iwae_tail_backward": iwae_tail,
        "bernoulli_log_prob": lambda r: (r(P, D), r(K, P, D)),
        "bernoulli_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), True),
        "continuous_bernoulli_log_prob": lambda r: (r(P, D), r(K, P, D)),
        "continuous_bernoulli_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), True),
        "categorical_log_prob": lambda r: (r.classes(P, D), r(K, P, D, C)),
        "categorical_log_prob_backward": lambda r: (r(K, P), r.classes(P, D), r(K, P, D, C)),
        "poisson_log_prob": lambda r: (r(P, D), r(K, P, D)),
        "poisson_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), True),
        "negative_binomial_log_prob": lambda r: (r(P, D), r(K, P, D), r(D)),
        "negative_binomial_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), r(K, P, D), True, True),
        "zinb_log_prob": lambda r: (r(P, D), r(K, P, D), r(K, P, D), r(K, P, D)),
        "zinb_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), r(D), r(K, P, D), True, True, True),
        "discretized_logistic_mixture_log_prob": lambda r: (r(P, 3, D), r(K, P, 10 * 2, D), None, None, 256),
        "discretized_logistic_mixture_log_prob_backward": lambda r: (
            r(K, P), r(P, 1, D), r(K, P, 2, D), r(K, P, 2, 1, D), r(K, P, 2, 1, D), 32),
        "gaussian_log_prob": lambda r: (r(P, D), r(K, P, D), r(P, D), False, 1e-6),
        "gaussian_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), r(K, P, D), True, 1e-3, True, True),
        "laplace_log_prob": lambda r: (r(P, D), r(K, P, D), r(D)),
        "laplace_log_prob_backward": lambda r: (r(K, P), r(P, D), r(K, P, D), r(P, D), True, True),
        "logmeanexp": lambda r: (r(K, P),),
        "logmeanexp_backward": lme,
        "mixture_log_prob": lambda r: (r(N, L), r(M, L), r(M, L), None),
        "mixture_log_prob_backward": mixture,
        "sample_location_scale": lambda r: (r(N, L), r(N, L), r.seed(), ls, K),
        "sample_location_scale_backward": lambda r: (r(N, L), r(N, L), r.seed(), ls, r(K, N, L), r(K, N), True),
        "sample_location_scale_kl": lambda r: (r(N, L), r(N, L), r(L), r(L), r.seed(), ls, kl_ls, K),
        "sample_location_scale_kl_backward": lambda r: (
            r(K, N, L), r(N), r(N, L), r(N, L), r(N, L), r(N, L), r.seed(), ls, kl_ls, True),
        "sample_positive": lambda r: (r(N, L), r(N, L), r.seed(), pos, K),
        "sample_positive_backward": lambda r: (r(N, L), r(N, L), r.seed(), pos, r(K, N, L), None, False),
        "sample_positive_kl": lambda r: (r(N, L), r(N, L), r(N, L), r(N, L), r.seed(), pos, kl_pos, K),
        "sample_positive_kl_backward": lambda r: (
            r(K, N, L), r(N), r(N, L), r(N, L), r(L), r(L), r.seed(), pos, kl_pos, True),
        "sample_concrete": lambda r: (r(N, L, C), r(N, L), r.seed(), True, K, r(L, C), False),
        "sample_concrete_backward": lambda r: (
            r(N, L, C), r(N, L), r.seed(), r(K, N, L, C), r(K, N), True, r(N), r(L, C), None),
        "sample_normal": lambda r: (r(N, L), r(N, L), r.seed(), K),
        "sample_normal_with_ratio": lambda r: (r(N, L), r(N, L), r.seed(), K),
        "sample_normal_backward": lambda r: (r(N, L), r(N, L), r.seed(), r(K, N, L), r(N), r(K, N), True),
        "sample_normal_kl": lambda r: (r(N, L), r(N, L), r(N, L), r(N, L), r.seed(), False, True, True),
        "sample_normal_kl_backward": lambda r: (
            r(N, L), r(N, L), r(N, L), r(N, L), r.seed(), r(N, L), r(N, L), True, False),
        "sample_normal_tril": lambda r: (r(N, L), r(N, L, L), r.seed(), K),
        "sample_normal_tril_backward": lambda r: (r(N, L), r(N, L, L), r.seed(), r(K, N, L), r(N)),
        "stick_breaking": lambda r: (r(N, L),),
        "stick_breaking_backward": stick,
    }


CASES = _cases()


class _Tensors:
    """Fake tensors of a fake mode on ``device``: float32 by shape, the seed, class indices."""

    def __init__(self, device):
        self.device = device

    def __call__(self, *shape):
        return torch.randn(shape, dtype=F32, device=self.device)

    def seed(self):
        return torch.zeros((), dtype=torch.int64, device=self.device)

    def classes(self, *shape):
        return torch.zeros(shape, dtype=torch.int64, device=self.device)


class _Recorder:
    """What a stubbed launch records: (kernel, grid, arguments, compile-time parameters)."""

    def __init__(self):
        self.launches = []

    def run(self, kernel, *args, grid, warmup=False, **meta):  # JITFunction.run's stand-in: the plan's launch
        self.launches.append((kernel, tuple(grid), args, meta))

    def launcher(self, kernel):  # _triton_ops._launcher's stand-in: the twin's launch
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **meta: recorder.launches.append((kernel, tuple(grid), args, meta))

        return Launcher()


def _described(launches, inputs) -> list:
    """The launches with each tensor argument named by its storage (input i,
    or the n-th new buffer) beside its shape, strides, offset and dtype, the
    other arguments as they are: two paths that pass the same kernels the
    same arguments describe alike."""
    names = {}
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            names.setdefault(StorageWeakRef(t.untyped_storage()), f"input {i}")
    described = []
    for kernel, grid, args, meta in launches:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                key = StorageWeakRef(a.untyped_storage())
                name = names.setdefault(key, f"new {len(names)}")
                out.append((name, tuple(a.shape), a.stride(), a.storage_offset(), a.dtype))
            else:
                out.append(a)
        described.append((kernel, grid, tuple(out), meta))
    return described


def _shapes(outputs) -> list:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [(tuple(t.shape), t.stride(), t.dtype) for t in outputs]


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake mode whose CUDA tensors the ops plan for as on a GPU (the
    triton backend, the GPU's geometry); no CUDA runtime: the arrival
    counters' stream is stubbed, and the plans and counters made from fake
    tensors are dropped after the test."""
    from fastvae.kernels import _common

    fastvae.set_backend(None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(_common, "_COUNTERS", {})
    yield FakeTensorMode()
    for store in _triton_ops._stores():
        store.clear()


@pytest.mark.parametrize("name", list(CASES))
def test_each_twin_launches_its_plans_kernels_with_its_arguments(twins, fake_cuda, monkeypatch, name):
    """On fake CUDA tensors, the twin's body launches through wrap_triton
    exactly what the op's implementation launches from its plan: the same
    kernels in the same order, with the same grid, compile-time parameters
    (num_warps and the rest) and arguments (the same inputs, new buffers of the
    same shapes, strides and dtypes in the same places, the same integers),
    and returns outputs of the op's shapes, strides and dtypes, as its fake
    (meta) implementation, which is the body itself, and the op's fake do;
    traced again (another fake mode), it launches the same."""
    op = getattr(torch.ops.fastvae, name).default
    twin = twins[op]
    recorder = _Recorder()
    monkeypatch.setattr(JITFunction, "run", lambda kernel, *a, **k: recorder.run(kernel, *a, **k))
    monkeypatch.setattr(_triton_ops, "_launcher", recorder.launcher)
    with fake_cuda:
        args = CASES[name](_Tensors("cuda"))
        for store in _triton_ops._stores():
            store.clear()
        planned = _op._IMPLS[op](*args)
        assert any(len(store) for store in _triton_ops._stores()), f"{name}: the op took its general launch"
        plan_launches, recorder.launches = recorder.launches, []
        twinned = twin(*args)
        twin_launches, recorder.launches = recorder.launches, []
        faked = op(*args)
    assert plan_launches, name
    assert all(isinstance(k, JITFunction) for k, *_ in plan_launches)
    assert _described(twin_launches, args) == _described(plan_launches, args)
    assert _shapes(twinned) == _shapes(planned) == _shapes(faked)
    # another trace (another fake mode): the body kept nothing of the first (a cached tensor of
    # another mode would raise), and launches the same again
    with FakeTensorMode():
        again = CASES[name](_Tensors("cuda"))
        twin(*again)
    assert _described(recorder.launches, again) == _described(plan_launches, args)


def test_the_case_table_covers_every_twin(twins):
    assert set(CASES) == set(_triton_ops.names())


def test_the_twins_scope_leaves_eager_state_as_it_found_it(twins, fake_cuda, monkeypatch):
    """A twin's body makes its plan afresh and drops it: the plans the stores
    held before (here a stand-in entry) are back after it, no plan made from
    fake tensors stays, and Launch.__call__, Triton's run and the arrival
    counters are the eager ones again."""
    from fastvae._launch import Launch
    from fastvae.kernels import _common

    recorder = _Recorder()
    monkeypatch.setattr(_triton_ops, "_launcher", recorder.launcher)
    stores = _triton_ops._stores()
    for store in stores:
        store["kept"] = "a plan of an eager call"
    _common._COUNTERS["kept"] = "a counter"
    call, run = Launch.__call__, JITFunction.run
    with fake_cuda:
        args = CASES["sample_normal_backward"](_Tensors("cuda"))
        twins[torch.ops.fastvae.sample_normal_backward.default](*args)
    assert recorder.launches
    assert all(dict(store) == {"kept": "a plan of an eager call"} for store in _triton_ops._stores())
    assert _common._COUNTERS == {"kept": "a counter"}
    assert Launch.__call__ is call and JITFunction.run is run
    for store in stores:
        store.clear()


class _Traced(Exception):
    """Raised by a capturing compiler once AOT autograd has traced: nothing runs."""


def _forward_graph(fn, args):
    """AOT autograd's graph of ``fn`` (no gradient) on fake tensors, captured and never run."""
    from functorch.compile import aot_function

    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        raise _Traced

    with pytest.raises(_Traced):
        aot_function(fn, fw_compiler=capture)(*args)
    return graphs[0]


def test_the_twin_traces_into_its_kernels_or_the_op_itself(twins, fake_cuda, quiet_mutation_analysis):
    """AOT autograd (which torch.compile runs before Inductor) traces a
    twin, on fake CUDA tensors, into its plan's Triton kernel nodes and no
    fastvae op. Where the op's implementation takes its general launch (no
    plan: half precision, a gradient of another dtype), it traces into the
    op itself, the graph op, as without the twins (symbolic shapes:
    test_a_dynamic_batch_takes_the_op_itself)."""
    op, backward = torch.ops.fastvae.sample_normal.default, torch.ops.fastvae.sample_normal_backward.default
    with fake_cuda:
        r = _Tensors("cuda")
        mu, seed = r(5, 3), r.seed()
        half = torch.randn(5, 3, dtype=torch.float16, device="cuda")
        grad64 = torch.randn(2, 5, 3, dtype=torch.float64, device="cuda")
    assert _nodes(_forward_graph(lambda m, s: twins[op](m, m, s, 2), (mu, seed))) == (
        ["_sample_normal_fwd_kernel"], [])
    assert _nodes(_forward_graph(lambda m, s: twins[op](m, m, s, 2), (half, seed))) == (
        [], ["fastvae.sample_normal.default"])
    assert _nodes(_forward_graph(lambda m, s, g: twins[backward](m, m, s, g, None, None, False),
                                 (mu, seed, grad64))) == ([], ["fastvae.sample_normal_backward.default"])


# -- the switch ------------------------------------------------------------------


def test_the_switch_defaults_to_the_graph_ops_and_rejects_a_bad_value(nodes):
    assert _backend._parse_compiled_nodes(None) == _backend._parse_compiled_nodes("") == "graph_ops"
    assert _backend._parse_compiled_nodes(" Triton_Op ") == "triton_op"
    with pytest.raises(ValueError, match="FASTVAE_COMPILED_NODES='triton' is not one of graph_ops, triton_op"):
        fastvae.set_compiled_nodes("triton")


def test_the_switch_sets_and_reads_back(twins, nodes):
    fastvae.set_compiled_nodes("triton_op")
    assert fastvae.compiled_nodes() == "triton_op"
    assert _backend.traced_choice() == "+triton_op"
    fastvae.set_compiled_nodes(None)
    assert fastvae.compiled_nodes() == "graph_ops"
    assert _backend.traced_choice() == ""
    fastvae.set_compiled_nodes("graph_ops")
    assert fastvae.compiled_nodes() == "graph_ops"


def _import_fastvae(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTVAE_COMPILED_NODES": value, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    code = ("import fastvae, fastvae._op as o; "
            "print(fastvae.compiled_nodes(), len(o._TRITON_TWINS), 'triton' in __import__('sys').modules)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_the_environment_variable_is_read_at_import():
    """FASTVAE_COMPILED_NODES at import: unset or "" the graph ops, no twin
    registered and Triton not imported; a bad value raises a ValueError that
    names the variable. (=triton_op: test_the_environment_variable_registers_the_twins.)"""
    got = _import_fastvae("")
    assert got.returncode == 0 and got.stdout.split() == ["graph_ops", "0", "False"], got.stderr
    bad = _import_fastvae("triton_ops")
    assert bad.returncode != 0
    assert "ValueError: FASTVAE_COMPILED_NODES='triton_ops' is not one of graph_ops, triton_op" in bad.stderr


@pytest.mark.full
def test_the_environment_variable_registers_the_twins():
    got = _import_fastvae("triton_op")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split()[:2] == ["triton_op", str(len(_triton_ops.names()))]


def test_graph_node_takes_the_twin_only_where_the_switch_the_device_and_the_backend_say(twins, nodes, monkeypatch):
    op = torch.ops.fastvae.sample_normal.default
    cuda = torch.empty(0, device="meta")  # a stand-in with a device type: graph_node reads nothing else
    monkeypatch.setattr(_op, "TWIN_DEVICES", ("meta",))
    fastvae.set_compiled_nodes("graph_ops")
    assert _op.graph_node(op, (cuda,)) is op
    fastvae.set_compiled_nodes("triton_op")
    assert _op.graph_node(op, (cuda,)) is twins[op]
    assert _op.graph_node(op, (None, cuda)) is twins[op]  # the first tensor's device (an optional first argument)
    assert _op.graph_node(op, (torch.empty(0),)) is op  # a CPU tensor
    assert _op.graph_node(torch.ops.fastvae.kl_normal.default, (cuda,)) is torch.ops.fastvae.kl_normal.default
    with fastvae.use_backend("reference"):
        assert _op.graph_node(op, (cuda,)) is op


# -- a compiled step takes the twins --------------------------------------------------


class _Capture:
    """A torch.compile backend that traces each graph Dynamo hands it through
    AOT autograd, keeps the joint (forward and backward) graph, and returns a
    stand-in that runs nothing (its outputs zeros): the kernels never launch."""

    def __init__(self):
        self.joints = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def keep(joint, inputs, **kwargs):
            self.joints.append(joint)
            raise _Traced

        try:
            aot_autograd(fw_compiler=lambda g, example: g, partition_fn=keep)(gm, example_inputs)
        except _Traced:
            pass
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        return lambda *args: [torch.zeros(()) for _ in outputs]


def _joint_graph(step, args, dynamic=None):
    """AOT autograd's joint graph of ``step`` compiled with fullgraph=True (_Capture)."""
    capture = _Capture()
    torch.compile(step, backend=capture, fullgraph=True, dynamic=dynamic)(*args)
    (joint,) = capture.joints
    return joint


def _nodes(gm) -> tuple[list, list]:
    """(the Triton kernels of the graph's triton_op launches, by name; the fastvae ops it calls)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernels, ops = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            jit = kernel if isinstance(kernel, JITFunction) else kernel.fn  # (an Autotuner of num_warps' config)
            kernels.append(jit.fn.__name__)
        elif str(node.target).startswith("fastvae"):
            ops.append(str(node.target))
    return kernels, ops


@pytest.fixture
def triton_on_cpu(twins, nodes, monkeypatch, quiet_mutation_analysis):
    """The triton backend on CPU tensors without the interpreter (its check
    bypassed: the kernels only trace, never run) and CPU among the devices
    whose graphs take the twins."""
    monkeypatch.setattr(_backend, "_interpreting", lambda: True)
    monkeypatch.setattr(_op, "TWIN_DEVICES", ("cpu", "cuda"))
    fastvae.set_backend("triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    for store in _triton_ops._stores():
        store.clear()


def _elbo_step(enc, dec):
    def step(x):
        mu, logvar = enc(x).chunk(2, -1)
        return fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli")

    return step


def test_a_compiled_elbo_step_launches_the_plans_kernels_as_triton_op_nodes(triton_on_cpu):
    """torch.compile(fullgraph=True) of an ELBO training step, traced through
    Dynamo and AOT autograd: with the graph ops its joint graph calls the
    plan ops (the sampler's and the tail's, forward and backward); with
    "triton_op" it calls no fastvae op and holds the same plans' kernels as
    Triton kernel nodes, which Inductor launches from its generated code.
    The compiled function guards on the setting: the call after a change
    recompiles, the next one does not."""
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
    x = torch.rand(5, 6)
    capture = _Capture()
    step = torch.compile(_elbo_step(enc, dec), backend=capture, fullgraph=True)
    fastvae.set_compiled_nodes("graph_ops")
    step(x)
    fastvae.set_compiled_nodes("triton_op")
    step(x)
    step(x)
    assert len(capture.joints) == 2
    kernels, ops = _nodes(capture.joints[0])
    assert not kernels
    assert ops == ["fastvae.plan_sample.default", "fastvae.plan_elbo_tail.default",
                   "fastvae.plan_elbo_tail_backward.default", "fastvae.plan_sample_backward.default"]
    kernels, ops = _nodes(capture.joints[1])
    assert not ops
    assert kernels == ["_sample_normal_fwd_kernel", "_bernoulli_log_prob_fwd_kernel",
                       "_bernoulli_log_prob_bwd_kernel", "_sample_normal_bwd_kernel"]


@pytest.mark.full
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_a_compiled_iwae_step_launches_the_plans_kernels_as_triton_op_nodes(triton_on_cpu, estimator):
    """The IWAE's (and DReG's) compiled step under "triton_op": the sampler's,
    the Gaussian tail's and the log-mean-exp's kernels, no fastvae op."""
    if estimator == "dreg" and not fastvae.objectives.DREG_COMPILES:
        pytest.skip("DReG's hooks compile from torch 2.13 on")
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
    x = torch.randn(5, 6)

    def step(x):
        mu, logvar = enc(x).chunk(2, -1)
        return fastvae.iwae(x, mu, logvar, dec, k=3, likelihood="gaussian", estimator=estimator)

    fastvae.set_compiled_nodes("triton_op")
    kernels, ops = _nodes(_joint_graph(step, (x,)))
    assert not ops
    assert {"_sample_normal_fwd_kernel", "_sample_normal_bwd_kernel", "_logmeanexp_fwd_kernel",
            "_logmeanexp_bwd_kernel"} <= set(kernels)


def test_a_compiled_op_call_takes_its_twin(triton_on_cpu):
    """Outside the objectives a compiled graph calls the ops themselves
    (_op.run, which Dynamo traces and so guards on the setting): the
    Concrete sampler's op and its backward, or under "triton_op" its two
    kernels' nodes."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, requires_grad=True)
    w = torch.randn(4, 3, 5)

    def step(logits):
        z, _ = fastvae.sample_concrete(logits, 0.5)
        return (z * w).sum()

    capture = _Capture()
    compiled = torch.compile(step, backend=capture, fullgraph=True)
    fastvae.set_compiled_nodes("graph_ops")
    compiled(logits)
    fastvae.set_compiled_nodes("triton_op")
    compiled(logits)
    assert [_nodes(joint) for joint in capture.joints] == [
        ([], ["fastvae.sample_concrete.default", "fastvae.sample_concrete_backward.default"]),
        (["_sample_concrete_fwd_kernel", "_sample_concrete_bwd_kernel"], [])]


def test_a_dynamic_batch_takes_the_op_itself(triton_on_cpu):
    """Compiled with dynamic shapes, the batch is a symbol: the plans'
    geometry is integers, so the twin traces into the op itself (the graph
    op, which plans at run time) and the batch stays dynamic."""
    logits = torch.randn(4, 3, 5, requires_grad=True)

    def step(logits):
        z, _ = fastvae.sample_concrete(logits, 0.5)
        return z.sum()

    fastvae.set_compiled_nodes("triton_op")
    kernels, ops = _nodes(_joint_graph(step, (logits,), dynamic=True))
    assert not kernels
    assert ops == ["fastvae.sample_concrete.default", "fastvae.sample_concrete_backward.default"]
