"""A compiled objective survives what training and evaluation loops change
between calls: k, the batch, the data's size and shape, the dtype,
n_samples, a decoder that folds the samples into the batch, and
torch._dynamo.mark_dynamic on the batch. Each second call recompiles or runs
with dynamic shapes, and gives eager's bound and gradients.

One compiled function serves both calls, as a training script that compiles
its loss once and a probe that compiles one loss for two models do. The
matrix runs Dynamo and AOT autograd (backend="aot_eager": the tracing that
broke, without Inductor's code generation, which test_compile.py covers);
in the main process on the cpp backend (its C++ operators in the graph), and
under the Triton interpreter on the triton backend (the plans' graph ops,
fastvae/_plan_ops.py), where every case's kernels run as programs of Python:
there a smaller matrix.

The second part checks what a CUDA graph of the step needs and a CPU can
see: a step compiled with fullgraph=True, called again and after a change of
shape, makes no host sync (no value read on the host, so no .item() of a
value check, no host-side seed, no plan lookup that reads tensor data) and
does not recompile on a repeated call; its seed is drawn in the graph at each
call. On the cpp backend in the main process; on the triton backend (the
plans' graph ops, the CUDA code path) in the interpreter child, with real
interpreted launches and with the launches stubbed as benchmarks/
bench_host_cost.py stubs them, which takes the direct launches a GPU takes
after the first. A CUDA device adds mode="reduce-overhead" itself."""
import itertools

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from fastvae import objectives

from conftest import INTERPRET


class Encoder(nn.Module):
    def __init__(self, d: int, latent: int):
        super().__init__()
        self.f = nn.Linear(d, 2 * latent)

    def forward(self, x):
        return self.f(x.flatten(1)).chunk(2, -1)


class Decoder(nn.Module):
    """z (..., L) -> the decoder output for x (B, *event); ``folded``: it runs
    on z.reshape(-1, L) and returns (S·B, *event) rows (a conv decoder's habit)."""

    def __init__(self, latent: int, event: tuple, likelihood: str, folded: bool = False):
        super().__init__()
        self.event, self.likelihood, self.folded = event, likelihood, folded
        size = 1
        for e in event:
            size *= e
        self.f = nn.Linear(latent, size * (2 if likelihood == "gaussian" else 1))

    def forward(self, z):
        h = self.f(z.reshape(-1, z.shape[-1]) if self.folded else z)
        shape = (-1, *self.event) if self.folded else (*z.shape[:-1], *self.event)
        if self.likelihood == "gaussian":
            mean, logvar = h.chunk(2, -1)
            return mean.reshape(shape), logvar.reshape(shape)
        if self.likelihood == "poisson":
            h = h.clamp(-5.0, 5.0)
        return h.reshape(shape)


def _data(batch: int, event: tuple, likelihood: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.rand(batch, *event, generator=torch.Generator().manual_seed(batch), dtype=dtype)
    if likelihood == "bernoulli":
        return (x > 0.5).to(dtype)
    if likelihood == "poisson":
        return (5 * x).floor()
    return x


def _objective(name: str, likelihood: str, x, encoder, decoder, k: int, n: int):
    mu, logvar = encoder(x)
    if name == "elbo":
        return fastvae.elbo(x, mu, logvar, decoder, likelihood=likelihood, n_samples=n)
    if name == "elbo_terms":
        terms = fastvae.elbo_terms(x, mu, logvar, decoder, likelihood=likelihood, n_samples=n)
        return terms.bound + 0.1 * terms.kl.sum()
    if name == "iwae_terms":
        terms = fastvae.iwae_terms(x, mu, logvar, decoder, k=k, likelihood=likelihood)
        return terms.bound + 0.1 * terms.kl.sum()
    if name == "elbo tensor beta":  # the general path under compile
        return fastvae.elbo(x, mu, logvar, decoder, likelihood=likelihood, n_samples=n,
                            beta=torch.tensor(0.5, dtype=x.dtype))
    if name == "renyi":
        return fastvae.iwae(x, mu, logvar, decoder, k=k, likelihood=likelihood, alpha=0.5)
    if name == "iwae torch prior":
        prior = torch.distributions.Normal(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype))
        return fastvae.iwae(x, mu, logvar, decoder, k=k, likelihood=likelihood, prior=prior)
    return fastvae.iwae(x, mu, logvar, decoder, k=k, likelihood=likelihood, estimator=name.split()[1])


# name: the two calls' (batch, event, L, k, n_samples, dtype, folded decoder)
F32, F64 = torch.float32, torch.float64
CHANGES = {
    "k": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 3, 8, 1, F32, False)],
    "batch": [(4, (12,), 3, 5, 1, F32, False), (6, (12,), 3, 5, 1, F32, False)],
    "D": [(4, (12,), 3, 5, 1, F32, False), (4, (20,), 3, 5, 1, F32, False)],
    "latent size": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 5, 5, 1, F32, False)],
    "image shape": [(4, (2, 3, 4), 3, 5, 1, F32, False), (4, (3, 4, 4), 3, 5, 1, F32, False)],
    "flat to image": [(4, (12,), 3, 5, 1, F32, False), (4, (3, 2, 2), 3, 5, 1, F32, False)],
    "dtype": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 3, 5, 1, F64, False)],
    "n_samples": [(4, (12,), 3, 5, 1, F32, False), (4, (12,), 3, 5, 3, F32, False)],
    "folded decoder": [(4, (2, 3, 2), 3, 5, 2, F32, False), (4, (2, 3, 2), 3, 5, 2, F32, True)],
    "all at once": [(4, (12,), 3, 50, 1, F32, False), (6, (3, 2, 2), 5, 8, 3, F32, True)],
}
PLANNED = ("elbo", "elbo_terms", "iwae iwae", "iwae dreg", "iwae stl", "iwae_terms")
GENERAL = ("elbo tensor beta", "renyi", "iwae torch prior")


INTERPRETED = [("elbo", "bernoulli", "k", False), ("iwae dreg", "bernoulli", "k", False),
               ("iwae_terms", "bernoulli", "k", False), ("elbo", "bernoulli", "batch", False),
               ("iwae iwae", "bernoulli", "batch", True)]


def _cases():
    """Every change for the ELBO and DReG, the counts' changes for the other
    estimators and the terms, the general path's objectives, the other
    likelihoods' shape changes, and mark_dynamic: what can break where (the
    heads take the counts, the tails the shapes), in a few minutes on 2 cores."""
    counts = ("k", "n_samples", "all at once")
    # the plans' graph ops (triton backend): every objective they serve after a new k; the shapes for two
    planned = ([(o, "bernoulli", "k", False) for o in PLANNED]
               + [(o, "bernoulli", c, False) for o, c in itertools.product(("elbo", "iwae dreg"), ("batch", "dtype"))]
               + [(o, "bernoulli", "batch", True) for o in ("elbo", "iwae iwae")])
    if INTERPRET:  # a compile each, slow under the interpreter: the counts, a batch, mark_dynamic (on a GPU, all)
        return [(*case, "cpu") for case in planned if case in INTERPRETED]
    cuda = [(*case, "cuda") for case in planned] if torch.cuda.is_available() else []
    cpp = ([(o, "bernoulli", c, False) for o, c in itertools.product(("elbo", "iwae dreg"), CHANGES)]
           + [(o, "bernoulli", c, False) for o, c in itertools.product(PLANNED[1:], counts) if o != "iwae dreg"]
           + [(o, "bernoulli", c, False) for o, c in itertools.product(GENERAL, ("k", "all at once"))]
           + [(o, lik, c, False) for o, lik, c in itertools.product(("elbo", "iwae dreg"), ("gaussian", "poisson"),
                                                                     ("batch", "image shape", "all at once"))]
           + [(o, "bernoulli", "batch", True) for o in ("elbo", "iwae iwae", "iwae dreg")])
    return cuda + [(*case, "cpu") for case in cpp]


@pytest.mark.parametrize("objective,likelihood,change,mark_dynamic,device", _cases(),
                         ids=lambda v: v if isinstance(v, str) else ("mark_dynamic" if v is True else None))
def test_a_compiled_objective_survives_a_change_between_calls(objective, likelihood, change, mark_dynamic, device):
    if "dreg" in objective and not objectives.DREG_COMPILES:
        pytest.skip("estimator='dreg' compiles from torch 2.13 on")
    fastvae.set_backend("triton" if INTERPRET else None)
    torch._dynamo.reset()

    def loss(x, encoder, decoder, k, n):
        return _objective(objective, likelihood, x, encoder, decoder, k, n)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for batch, event, latent, k, n, dtype, folded in CHANGES[change]:
        size = 1
        for e in event:
            size *= e
        torch.manual_seed(0)
        encoder = Encoder(size, latent).to(device, dtype)
        decoder = Decoder(latent, event, likelihood, folded).to(device, dtype)
        x = _data(batch, event, likelihood, dtype).to(device)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 0)
        params = [*encoder.parameters(), *decoder.parameters()]
        torch.manual_seed(1)
        got = compiled(x, encoder, decoder, k, n)
        got_grads = torch.autograd.grad(got, params)
        torch.manual_seed(1)
        want = loss(x, encoder, decoder, k, n)
        want_grads = torch.autograd.grad(want, params)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- CUDA graphs readiness -----------------------------------------------------------------

# The ops that make the host wait for the device: a value read on the host
# (.item(), .tolist(), bool(), float() and int() of a tensor all reach
# _local_scalar_dense) and the ops whose output size depends on values.
HOST_SYNCS = frozenset(("_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal",
                        "unique", "_unique2", "unique_consecutive"))


class _OpRecorder(TorchDispatchMode):
    """Records each op that runs beneath it, a compiled graph's included.
    Dynamo runs its compiled frames under an infra mode only (under another
    dispatch mode it declines to compile and runs the function eagerly),
    hence ``is_infra_mode``; tests/test_compile_changes.py checks that the
    frames still run compiled beneath it."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.namespace}.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))

    def syncs(self) -> list[str]:
        return [op for op in self.ops if op.split(".", 1)[1] in HOST_SYNCS]


# torch's Dynamo honours an infra dispatch mode from 2.8 on; 2.7's (the floor) compiles each
# call again beneath one, so there the recorder cannot watch a compiled call and the tests
# below skip (what they check is torch's and fastvae's, the same on every version)
RECORDER_WATCHES_COMPILED = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
needs_recorder = pytest.mark.skipif(not RECORDER_WATCHES_COMPILED,
                                    reason="torch 2.7's Dynamo recompiles beneath a dispatch mode")


@needs_recorder
def test_the_recorder_sees_a_compiled_frames_host_sync():
    """The recorder that the tests below trust: beneath it, a compiled
    function still runs compiled (no new frame), and a value read inside it
    (a data-dependent branch, so a graph break) is recorded."""
    counter = CompileCounterWithBackend("aot_eager")

    def f(x):
        y = x * 2
        return y.sum() if y.sum() > 0 else y.mean()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counter)
    x = torch.ones(3)
    compiled(x)
    frames = counter.frame_count
    assert frames >= 1
    with _OpRecorder() as recorder:
        compiled(x)
    assert counter.frame_count == frames  # ran what was compiled, nothing new
    assert recorder.syncs() == ["aten._local_scalar_dense"]
    with _OpRecorder() as recorder:
        torch.compile(lambda x: (x * 2).sum(), backend="aot_eager", fullgraph=True)(x)
    assert recorder.syncs() == [] and "aten.mul" in recorder.ops


# (objective, posterior, likelihood): the Gaussian posterior's ELBO and IWAE with DReG on the
# objectives' plans (the plans' graph ops on the triton backend), a Gaussian decoder's
# (mean, logvar) (an op's own plan), and a Laplace posterior against a torch Laplace prior
# that validates its arguments (the family's fused sampler)
SYNC_FREE_STEPS = [("elbo", "normal", "bernoulli"), ("iwae dreg", "normal", "bernoulli"),
                   ("elbo", "normal", "gaussian"), ("elbo", "laplace", "bernoulli")]
# calls of one compiled step: (batch, D); the batch changes and comes back, as loops with a
# last short batch do (under the interpreter, where each call's kernels are Python: once)
SYNC_CALLS = [(4, 12), (4, 12), (6, 12), (6, 12), *(() if INTERPRET else ((4, 12), (6, 12)))]
# the interpreter child, where a case costs seconds, runs IWAE with DReG (the objectives' plans
# as graph ops) and the Laplace family's; the ELBO's graph ops with the launches stubbed, below
if INTERPRET:
    SYNC_FREE_STEPS = [("iwae dreg", "normal", "bernoulli"), ("elbo", "laplace", "bernoulli")]


def _sync_free_step(objective: str, posterior: str, likelihood: str):
    L = 3

    modules: dict = {}

    def make(D: int):
        """The modules of inputs of D features: made once, then the same objects, as a
        training loop's (torch 2.7's Dynamo guards on a module argument's identity)."""
        if D not in modules:
            with torch.random.fork_rng():  # the global stream untouched
                torch.manual_seed(0)
                modules[D] = nn.Linear(D, 2 * L), nn.Linear(L, D * (2 if likelihood == "gaussian" else 1))
        return modules[D]

    def step(x, encoder, decoder):
        h = encoder(x)
        decode = (lambda z: decoder(z).chunk(2, -1)) if likelihood == "gaussian" else decoder
        a, b = h.chunk(2, -1)
        if posterior == "laplace":
            q = fastvae.LocationScale("laplace", a, b)
            prior = torch.distributions.Laplace(torch.zeros(L), torch.ones(L))
            if objective == "elbo":
                return -fastvae.elbo(x, q, decode, likelihood=likelihood, prior=prior)
            return -fastvae.iwae(x, q, decode, k=5, likelihood=likelihood, prior=prior)
        if objective == "elbo":
            return -fastvae.elbo(x, a, b, decode, likelihood=likelihood)
        return -fastvae.iwae(x, a, b, decode, k=5, likelihood=likelihood, estimator=objective.split()[1])

    return make, step


def _check_sync_free(objective, posterior, likelihood, values: bool):
    """Runs SYNC_CALLS through one step compiled with fullgraph=True
    (aot_eager: Dynamo and AOT autograd decide the graph breaks and what the
    graph holds; Inductor only generates its code) and checks each call that
    compiles nothing: no host sync and no recompile, the seed drawn in the
    graph, fastvae's nodes run; with ``values`` the bound and gradients are
    finite and two calls of one shape draw different noise."""
    if "dreg" in objective and not objectives.DREG_COMPILES:
        pytest.skip("estimator='dreg' compiles from torch 2.13 on")
    make, step = _sync_free_step(objective, posterior, likelihood)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    seen: dict = {}
    bounds: dict = {}
    for i, (batch, D) in enumerate(SYNC_CALLS):
        encoder, decoder = make(D)
        params = [*encoder.parameters(), *decoder.parameters()]
        x = (torch.rand(batch, D, generator=torch.Generator().manual_seed(D)) > 0.5).float()
        frames = counter.frame_count
        with _OpRecorder() as recorder:
            loss = compiled(x, encoder, decoder)
            grads = torch.autograd.grad(loss, params)
        if (batch, D) not in seen:  # a shape's first call may compile, and traces under the recorder
            seen[batch, D] = i
            continue
        where = f"call {i} (batch {batch}, D {D})"
        assert counter.frame_count == frames, f"{where} recompiled"
        assert recorder.syncs() == [], f"{where} waited for the device: {recorder.syncs()}"
        assert recorder.ops.count("aten.randint") == 1, f"{where}: the seed is not drawn in the graph"
        assert any(op.startswith(("fastvae.", "fastvae_cpu.")) for op in recorder.ops), recorder.ops
        if values:
            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
            bounds.setdefault((batch, D), []).append(loss.item())
    if values:
        for shape, seen_bounds in bounds.items():
            assert len(set(seen_bounds)) == len(seen_bounds), f"{shape}: the same noise twice {seen_bounds}"
    return recorder


@needs_recorder
@pytest.mark.parametrize("objective,posterior,likelihood", SYNC_FREE_STEPS)
def test_a_compiled_step_after_its_first_call_makes_no_host_sync(objective, posterior, likelihood):
    """A CUDA graph captures the step whole only if nothing in it waits for
    the host: checked on the cpp backend here, on the triton backend's graph
    ops under the interpreter."""
    fastvae.set_backend("triton" if INTERPRET else None)
    recorder = _check_sync_free(objective, posterior, likelihood, values=True)
    if INTERPRET and posterior == "normal":  # the objectives' plans as graph ops
        assert {"fastvae.plan_sample", "fastvae.plan_iwae_tail_backward"} <= set(recorder.ops), recorder.ops


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Every Triton launch a no-op that returns a stand-in compiled kernel
    (benchmarks/bench_host_cost.py's): a plan's launches after its first go
    directly to the stand-in's launcher, as on a GPU. The plans made meanwhile
    hold the stand-ins, so they are dropped before and after."""
    from triton.runtime import interpreter

    from benchmarks import bench_host_cost
    from fastvae import _launch, _plan, _registry

    def stub(self, *args, **kwargs):
        bench_host_cost._COUNTS["run"] += 1
        return bench_host_cost._NoOpCompiled()

    def forget_plans():
        _plan.clear()
        for plans in (*_registry.plan_stores("PLANS"), *_registry.plan_stores()):
            plans.clear()

    forget_plans()
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", stub)
    monkeypatch.setattr(_launch, "_runtime", bench_host_cost._NoOpRuntime())
    monkeypatch.setitem(bench_host_cost._COUNTS, "direct", 0)
    yield bench_host_cost._COUNTS
    forget_plans()


@needs_recorder
@pytest.mark.skipif(not INTERPRET, reason="the triton backend on CPU tensors: the interpreter child's")
def test_the_cuda_code_paths_compiled_step_launches_directly_without_a_host_sync(stubbed_launches):
    """The CUDA code path as a GPU runs it after a plan's first launch (the
    direct launches, which check the tensors' addresses): no host sync
    either. The kernels do not run, so the values are not checked. The
    ELBO: its sampler's and fused tail's graph ops."""
    fastvae.set_backend("triton")
    recorder = _check_sync_free("elbo", "normal", "bernoulli", values=False)
    assert {"fastvae.plan_sample", "fastvae.plan_elbo_tail_backward"} <= set(recorder.ops), recorder.ops
    assert stubbed_launches["direct"] > 0  # the later calls launched directly


@needs_recorder
@pytest.mark.full  # Inductor generates and compiles C++ for each of two shapes: about 30 s on 2 cores
@pytest.mark.skipif(INTERPRET, reason="main-process test (Inductor's C++ on the cpp backend)")
def test_an_inductor_compiled_step_makes_no_host_sync():
    """As above with Inductor's code (the cpp backend): the generated code
    reads no value on the host either."""
    fastvae.set_backend(None)
    make, step = _sync_free_step("iwae iwae", "normal", "bernoulli")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for i, (batch, D) in enumerate(SYNC_CALLS[:4]):
        encoder, decoder = make(D)
        x = (torch.rand(batch, D) > 0.5).float()
        with _OpRecorder() as recorder:
            torch.autograd.grad(compiled(x, encoder, decoder), [*encoder.parameters(), *decoder.parameters()])
        if i in (1, 3):  # a shape's second call
            assert recorder.syncs() == []
            assert any(op.startswith("fastvae_cpu.") for op in recorder.ops), recorder.ops


# a reduce-overhead step's calls per shape: the first runs eagerly in the graphs' memory pool (the
# warm-up), the second captures, the others replay the capture
CAPTURED_CALLS = 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("objective", ["elbo", "iwae dreg"])
def test_a_reduce_overhead_step_is_captured_whole_and_syncs_nothing(objective):
    """mode="reduce-overhead", two shapes in turn: Inductor skips no CUDA
    graph (a host sync, a CPU tensor or an unsafe op would make it), the
    replays make no synchronizing CUDA call (torch.cuda.set_sync_debug_mode
    ("error") raises on one; the warm-up and the capture synchronize by
    design), and every call gives eager's values. The posterior's variance is
    e^-30, so z is mu to float32 rounding whatever noise is drawn, and the
    graph's RNG need not be eager's: the ELBO's value and gradients compare
    whole; IWAE's value and encoder gradients hold log q(z|x) of the noise
    itself, so of it the decoder's gradients compare (each sample's is the
    same, and the weights sum to 1)."""
    if "dreg" in objective and not objectives.DREG_COMPILES:
        pytest.skip("estimator='dreg' compiles from torch 2.13 on")
    from torch._dynamo.utils import counters

    fastvae.set_backend(None)
    make, step = _sync_free_step(objective, "normal", "bernoulli")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for batch, D in ((4, 12), (6, 12)):
        encoder, decoder = (m.cuda() for m in make(D))
        with torch.no_grad():
            encoder.bias[3:].fill_(-30.0)  # logvar: the noise scaled by e^-15
        params = [*encoder.parameters(), *decoder.parameters()]
        x = (torch.rand(batch, D, device="cuda") > 0.5).float()
        want = step(x, encoder, decoder)
        want_grads = torch.autograd.grad(want, params)
        for call in range(CAPTURED_CALLS):
            torch.compiler.cudagraph_mark_step_begin()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if call >= 2 else "default")
            try:
                loss = compiled(x, encoder, decoder)
                grads = torch.autograd.grad(loss, params)
            finally:
                torch.cuda.set_sync_debug_mode("default")

            def named(m, where=f"batch {batch}, call {call}"):
                return f"{where}: {m}"

            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), named("not finite")
            compared = slice(None) if objective == "elbo" else slice(-2, None)  # the decoder's weight and bias
            if objective == "elbo":
                torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4, msg=named)
            for got, expected in zip(grads[compared], want_grads[compared]):
                torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4, msg=named)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
