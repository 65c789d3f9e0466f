"""The objectives' plans (fastvae/_plan.py): the lean per-call path of
fastvae.elbo / fastvae.iwae on the triton backend gives the general
composition's values and gradients bit for bit under the interpreter (on a
GPU to a few ulp: _same), takes two autograd nodes, and is chosen only where
it applies.

The comparisons run where the triton backend does (the interpreter child,
tests/test_triton_interpreter.py, and a GPU); the selection tests run in the
main process too."""
import pytest
import torch

import fastvae
from fastvae import _launch, _plan, objectives

from conftest import INTERPRET

TRITON = INTERPRET or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="the plans serve the triton backend (interpreter child, GPU)")

B, L, D, K = 3, 5, 7, 4  # odd sizes: no tile is full


def _same(a, b) -> bool:
    """a equals b bit for bit under the interpreter (IEEE arithmetic in
    numpy), a reduced bound to 4 ulp (the rows' sum may take another order). On a GPU the
    plans' kernels reduce the bound and divide its gradient themselves
    (kernels/_common.py's bound_epilogue), in an order and with a division of
    their own: there to a few ulp."""
    if INTERPRET and a.dim() > 0:
        return torch.equal(a, b)
    if INTERPRET:  # a reduced bound: numpy's sum and torch's may add the rows in another order
        return abs(float(a) - float(b)) <= 4 * torch.finfo(a.dtype).eps * abs(float(b))
    eps = torch.finfo(a.dtype).eps
    torch.testing.assert_close(a, b, rtol=8 * eps, atol=8 * eps * float(b.abs().max()) if b.numel() else 0.0)
    return True


@pytest.fixture
def triton_device():
    """The device the triton backend runs on here (CPU tensors under the interpreter)."""
    device = "cpu" if INTERPRET else "cuda"
    fastvae.set_backend(None if device == "cuda" else "triton")
    return device


def _problem(device, dtype, seed=0, halves=False):
    """x and [mu, logvar, W]: leaves, or with ``halves`` mu and logvar as the
    strided halves of one encoder output (h.chunk(2, -1), as encoders return them)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, D, generator=g) > 0.5).to(dtype)
    W = (torch.randn(L, 2 * D, generator=g) * 0.5).to(dtype)
    mu = torch.randn(B, L, generator=g).to(dtype)
    logvar = (torch.randn(B, L, generator=g) * 0.5).to(dtype)
    if halves:
        h = torch.cat([mu, logvar], -1).to(device).requires_grad_()
        mu, logvar = h.chunk(2, -1)
        assert not mu.is_contiguous()
        return x.to(device), [mu, logvar, W.to(device).requires_grad_()]
    leaves = [t.to(device).requires_grad_() for t in (mu, logvar, W)]
    return x.to(device), leaves


def _decoders(W):
    def logits(z):
        return z @ W[:, :D]

    def mean_logvar(z):  # the halves of one output, as decoders return them
        h = z @ W
        return h[..., :D], h[..., D:]

    def mean(z):  # the mean alone: unit variance
        return z @ W[:, D:]

    return {"bernoulli": logits, "gaussian": mean_logvar, "gaussian mean": mean}


CASES = {
    "elbo": dict(fn="elbo"),
    "elbo sum beta": dict(fn="elbo", reduction="sum", beta=0.3),
    "elbo none": dict(fn="elbo", reduction="none"),
    "iwae": dict(fn="iwae", k=K),
    "iwae sum": dict(fn="iwae", k=K, reduction="sum"),
    "iwae none k1": dict(fn="iwae", k=1, reduction="none"),
    "dreg": dict(fn="iwae", k=K, estimator="dreg"),
    "stl": dict(fn="iwae", k=K, estimator="stl", reduction="sum"),
}


def _run(device, dtype, likelihood, case, enabled, create_graph=False, halves=False, autocast=None):
    """(bound, its gradients in mu, logvar and the decoder's W, the name of its
    grad_fn). ``autocast``: the forward under bfloat16 autocast, with float32
    x and decoder weights (the decoder's matmul gives bfloat16 outputs) and an
    encoder (mu, logvar) of that dtype."""
    x, (mu, logvar, W) = _problem(device, dtype if autocast is None else torch.float32, halves=halves)
    if autocast is not None:
        mu, logvar = (t.detach().to(autocast).requires_grad_() for t in (mu, logvar))
    kw = dict(CASES[case])
    fn = getattr(fastvae, kw.pop("fn"))
    previous = _plan.ENABLED
    _plan.ENABLED = enabled
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast is not None):
            bound = fn(x, mu, logvar, _decoders(W)[likelihood], likelihood=likelihood.split()[0],
                       generator=torch.Generator(device).manual_seed(7), **kw)
    finally:
        _plan.ENABLED = previous
    grads = torch.autograd.grad(bound, (mu, logvar, W), torch.ones_like(bound), create_graph=create_graph)
    return bound, grads, type(bound.grad_fn).__name__


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian mean"])
@pytest.mark.parametrize("case", list(CASES))
def test_plans_give_the_general_path_bit_for_bit(triton_device, dtype, likelihood, case):
    _run(triton_device, dtype, likelihood, case, True)  # the first call: plans made, value checks run
    lean, lean_grads, node = _run(triton_device, dtype, likelihood, case, True)
    general, general_grads, general_node = _run(triton_device, dtype, likelihood, case, False)
    assert node == ("ElboTailBackward" if case.startswith("elbo") else "IwaeTailBackward")
    assert general_node != node
    assert not torch.isnan(lean).any()
    assert _same(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert a.dtype == b.dtype and _same(a, b)


@needs_triton
@pytest.mark.parametrize("encoder", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian mean"])
@pytest.mark.parametrize("case", ["elbo", "elbo sum beta", "iwae", "dreg", "stl"])
def test_autocast_takes_the_plans_bit_for_bit(triton_device, encoder, likelihood, case):
    """Under autocast (bfloat16 decoder outputs against float32 x; a float32 or
    bfloat16 encoder) the plans give the general path's values and gradients
    bit for bit: z and the KL in float32, the likelihood kernels' variants of
    the decoder output's dtype, each gradient in its tensor's dtype."""
    _run(triton_device, None, likelihood, case, True, autocast=encoder)
    lean, lean_grads, node = _run(triton_device, None, likelihood, case, True, autocast=encoder)
    general, general_grads, general_node = _run(triton_device, None, likelihood, case, False, autocast=encoder)
    assert node == ("ElboTailBackward" if case.startswith("elbo") else "IwaeTailBackward") != general_node
    assert lean.dtype == general.dtype == torch.float32
    assert not torch.isnan(lean).any() and _same(lean, general)
    for a, b, dtype in zip(lean_grads, general_grads, (encoder, encoder, torch.float32)):
        assert a.dtype == b.dtype == dtype and _same(a, b)


@pytest.mark.skipif(INTERPRET or not fastvae._backend.cpp_available(), reason="the cpp backend's plan")
@pytest.mark.parametrize("encoder", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian mean"])
@pytest.mark.parametrize("case", ["elbo", "iwae", "dreg"])
def test_autocast_takes_the_cpp_plan_bit_for_bit(encoder, likelihood, case):
    """The cpp backend's plan (its checks once) under CPU autocast: the general
    path's values and gradients bit for bit, one plan for the signature."""
    _plan.clear()
    with fastvae.use_backend("cpp"):
        _run("cpu", None, likelihood, case, True, autocast=encoder)
        lean, lean_grads, _ = _run("cpu", None, likelihood, case, True, autocast=encoder)
        general, general_grads, _ = _run("cpu", None, likelihood, case, False, autocast=encoder)
        assert len(_plan.PLANS) == 1
    assert not torch.isnan(lean).any() and torch.equal(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian mean"])
@pytest.mark.parametrize("case", ["elbo", "iwae", "dreg"])
def test_an_encoders_halves_take_the_plans_bit_for_bit(triton_device, likelihood, case):
    """mu and logvar as the strided halves of one encoder output, the usual
    encoder: the plans' kernels read them in place (rows 2 L apart; the
    general path copies them), with the same values and gradients bit for bit
    (their first and second derivatives)."""
    _plan.clear()
    _run(triton_device, torch.float64, likelihood, case, True, halves=True)
    lean, lean_grads, node = _run(triton_device, torch.float64, likelihood, case, True, halves=True)
    (plan,) = _plan.PLANS.values()
    assert plan.sample.in_place and plan.sample.in_stride == 2 * L
    general, general_grads, general_node = _run(triton_device, torch.float64, likelihood, case, False, halves=True)
    assert node == ("ElboTailBackward" if case == "elbo" else "IwaeTailBackward") != general_node
    assert not torch.isnan(lean).any() and _same(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert _same(a, b)
    if case == "dreg":  # DReG refuses a second derivative on both paths
        return
    second = []
    for enabled in (True, False):
        x, (mu, logvar, W) = _problem(triton_device, torch.float64, halves=True)
        kw = dict(CASES[case])
        fn = getattr(fastvae, kw.pop("fn"))
        _plan.ENABLED = enabled
        try:
            bound = fn(x, mu, logvar, _decoders(W)[likelihood], likelihood=likelihood.split()[0],
                       generator=torch.Generator(triton_device).manual_seed(7), **kw)
        finally:
            _plan.ENABLED = True
        h = mu._base  # the encoder output both halves view
        gh, gW = torch.autograd.grad(bound, (h, W), create_graph=True)
        second.append(torch.autograd.grad((gh * gh).sum() + (gW * gW).sum(), (h, W)))
    for a, b in zip(*second):
        assert not torch.isnan(a).any() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_sampler_reads_rows_in_place_where_they_sit_one_stride_apart():
    """_plan.in_stride: the row stride at which the sampler's kernels read mu
    and logvar without copies (contiguous, an encoder's halves, rows of a wider
    output, a broadcast batch), None where the rows are not one stride apart
    or the two differ (the plan copies them)."""
    h = torch.empty(6, 4, 2 * L, device="meta")
    cases = [
        (torch.empty(B, L, device="meta"), None, L),
        (*torch.empty(B, 2 * L, device="meta").chunk(2, -1), 2 * L),
        (*h.chunk(2, -1), 2 * L),  # leading dims that collapse: (6, 4) rows 2 L apart
        (h[:, 1:3, :L], h[:, 1:3, L:], None),  # (6, 2) rows of a (6, 4) grid: not one stride
        (h[:1, 1:3, :L], h[:1, 1:3, L:], 2 * L),  # a leading size-1 dim: any stride
        (torch.empty(1, L, device="meta").expand(B, L), None, 0),  # one row read B times
        (torch.empty(L, B, device="meta").t(), None, None),  # columns, not rows
        (torch.empty(B, L, device="meta"), torch.empty(B, 2 * L, device="meta")[:, :L], None),  # strides differ
        (torch.empty(L, device="meta"), None, L),
        (torch.empty(B, 1, device="meta"), torch.empty(B, 3, device="meta")[:, 1:2], None),  # strides differ
        (torch.empty(B, 3, device="meta")[:, :1], torch.empty(B, 3, device="meta")[:, 1:2], 3),  # L = 1
    ]
    for mu, logvar, expected in cases:
        logvar = mu if logvar is None else logvar  # the same strides
        assert _plan.in_stride(mu, logvar) == expected, (mu.shape, mu.stride(), logvar.stride())


@needs_triton
@pytest.mark.parametrize("layout", ["rows of a wider output", "halves of a 3-d output", "columns"])
@pytest.mark.parametrize("case", ["elbo", "dreg"])
def test_strided_encoder_outputs_give_the_general_path_bit_for_bit(triton_device, layout, case):
    """mu and logvar rows 3 L apart (a wider encoder output's slices) and the
    halves of a (2, B, 2 L) output are read in place; columns of a transposed
    output are copied: each gives the general path's values and gradients bit
    for bit."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, B, D, generator=g) > 0.5).double().to(triton_device)
    W = (torch.randn(L, D, generator=g) * 0.5).double().to(triton_device).requires_grad_()
    if layout == "rows of a wider output":
        h = torch.randn(2, B, 3 * L, generator=g).double().to(triton_device).requires_grad_()
        split, in_place, stride = (lambda t: (t[..., :L], t[..., 2 * L:])), True, 3 * L
    elif layout == "halves of a 3-d output":
        h = torch.randn(2, B, 2 * L, generator=g).double().to(triton_device).requires_grad_()
        split, in_place, stride = (lambda t: t.chunk(2, -1)), True, 2 * L
    else:
        h = torch.randn(2 * L, B * 2, generator=g).double().to(triton_device).requires_grad_()
        split, in_place, stride = (lambda t: (t[:L].t().unflatten(0, (2, B)), t[L:].t().unflatten(0, (2, B)))), False, L
    kw = dict(CASES[case])
    fn = getattr(fastvae, kw.pop("fn"))
    results = []
    _plan.clear()
    for enabled in (True, True, False):
        mu, logvar = split(h)
        _plan.ENABLED = enabled
        try:
            bound = fn(x, mu, logvar, lambda z: z @ W, likelihood="bernoulli",
                       generator=torch.Generator(triton_device).manual_seed(7), **kw)
        finally:
            _plan.ENABLED = True
        results.append((bound, *torch.autograd.grad(bound, (h, W))))
    (plan,) = _plan.PLANS.values()
    assert plan.sample.in_place == in_place and plan.sample.in_stride == stride
    assert not torch.isnan(results[1][0]).any()
    for a, b in zip(results[1], results[2]):
        assert _same(a, b)


@pytest.mark.skipif(INTERPRET or not fastvae._backend.cpp_available(), reason="the cpp backend's plan")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian mean"])
@pytest.mark.parametrize("case", list(CASES) + ["elbo n3"])
@pytest.mark.parametrize("halves", [False, True])
def test_the_cpp_plan_gives_the_general_path_bit_for_bit(dtype, likelihood, case, halves):
    """On the cpp backend the plan is the checks, once per call signature; the
    call then makes the general path's own op calls (the C++ operators), so
    values and gradients are the general path's bit for bit, its value checks
    still run on every call, and its stops are fewer (benchmarks/path_trace.py).
    The same for mu, logvar as the strided halves of one encoder output."""
    CASES.setdefault("elbo n3", dict(fn="elbo", n_samples=3))
    _plan.clear()
    with fastvae.use_backend("cpp"):
        _run("cpu", dtype, likelihood, case, True, halves=halves)  # the first call: the checks
        key_count = len(_plan.PLANS)
        lean, lean_grads, _ = _run("cpu", dtype, likelihood, case, True, halves=halves)
        general, general_grads, _ = _run("cpu", dtype, likelihood, case, False, halves=halves)
        assert len(_plan.PLANS) == key_count == 1
        x, (mu, logvar, W) = _problem("cpu", dtype)
        if likelihood == "bernoulli":  # the value checks of the general tail, on every call
            for _ in range(2):  # a warning once per kind: forget it, the check runs again
                fastvae.set_value_checks("auto")
                with pytest.warns(UserWarning, match="outside"):
                    fastvae.elbo(x * 3, mu, logvar, _decoders(W)["bernoulli"], likelihood="bernoulli")
    assert not torch.isnan(lean).any()
    assert torch.equal(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("fn", ["elbo", "iwae"])
def test_the_bernoulli_plan_runs_the_value_checks_again_when_their_state_changes(triton_device, fn):
    """The Bernoulli tail skips the value checks once they are settled (the
    first call of each kind ran them), and reads their state again when it
    changes (_value_checks.epoch): a later set_value_checks("always") or
    "auto" makes the next call check, and warn, again."""
    x, (mu, logvar, W) = _problem(triton_device, torch.float32)
    dec = _decoders(W)["bernoulli"]
    call = getattr(fastvae, fn)
    kw = {} if fn == "elbo" else {"k": K}
    fastvae.set_value_checks("auto")
    for _ in range(2):  # the first call checks (the general tail), the second takes the plan
        bound = call(x, mu, logvar, dec, likelihood="bernoulli", **kw)
    assert type(bound.grad_fn).__name__ == ("ElboTailBackward" if fn == "elbo" else "IwaeTailBackward")
    for mode in ("always", "auto"):
        fastvae.set_value_checks(mode)
        with pytest.warns(UserWarning, match="outside"):
            checked = call(x * 3, mu, logvar, dec, likelihood="bernoulli", **kw)
        assert type(checked.grad_fn).__name__ != type(bound.grad_fn).__name__  # the general tail checked
    fastvae.set_value_checks("never")
    assert type(call(x, mu, logvar, dec, likelihood="bernoulli", **kw).grad_fn) is type(bound.grad_fn)
    fastvae.set_value_checks("auto")


@needs_triton
@pytest.mark.parametrize("likelihood, case", [("bernoulli", "elbo"), ("gaussian", "iwae"), ("bernoulli", "stl")])
def test_plans_differentiate_twice_as_the_general_path(triton_device, likelihood, case):
    """create_graph=True replays the general composition: the same first and second derivatives."""
    _assert_second_derivatives_agree(lambda enabled, **kw: _run(triton_device, torch.float64, likelihood, case,
                                                                 enabled, **kw))


def _assert_second_derivatives_agree(run):
    """``run(enabled, create_graph=...)`` -> (bound, gradients, node): with the
    plans and without, the same gradients and the same derivative of their
    squared norm (the first call of each makes the plan and runs the checks)."""
    results = []
    for enabled in (True, False):
        run(enabled)
        _, grads, _ = run(enabled, create_graph=True)
        penalty = sum((g * g).sum() for g in grads)
        results.append((grads, torch.autograd.grad(penalty, [g for g in grads if g.requires_grad][0])))
    (lean, lean2), (general, general2) = results
    for a, b in zip(lean, general):
        assert _same(a, b)
    assert torch.allclose(lean2[0], general2[0], rtol=1e-12, atol=1e-12)


@needs_triton
def test_dreg_encoder_gradient_is_still_refused_a_second_derivative(triton_device):
    _run(triton_device, torch.float64, "bernoulli", "dreg", True)
    # the encoder gradient carries the refusal node (as the general path's hook gives it)
    x, (mu_leaf, logvar, W) = _problem(triton_device, torch.float64)
    bound = fastvae.iwae(x, mu_leaf, logvar, _decoders(W)["bernoulli"], k=K, likelihood="bernoulli",
                         estimator="dreg")
    dmu = torch.autograd.grad(bound, mu_leaf, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(dmu.sum(), mu_leaf)


@needs_triton
def test_a_decoder_output_the_plan_does_not_read_takes_the_general_tail(triton_device):
    x, (mu, logvar, W) = _problem(triton_device, torch.float32)
    for _ in range(2):
        bound = fastvae.elbo(x, mu, logvar, lambda z: (z @ W[:, :D]).t().contiguous().t(), likelihood="bernoulli")
    assert type(bound.grad_fn).__name__ != "ElboTailBackward"  # a transposed output: the general tail
    with pytest.raises(ValueError, match="decode returned logits of shape"):
        fastvae.elbo(x, mu, logvar, lambda z: z @ W, likelihood="bernoulli")


@needs_triton
def test_wrong_arguments_are_refused_after_a_plan_exists(triton_device):
    x, (mu, logvar, W) = _problem(triton_device, torch.float32)
    dec = _decoders(W)["bernoulli"]
    for _ in range(2):
        fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli", reduction="avg")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli", beta=-1.0)
    with pytest.raises(TypeError, match="decode must be callable"):
        fastvae.elbo(x, mu, logvar, 3, likelihood="bernoulli")
    with pytest.raises(ValueError, match="x must have mu's batch shape"):
        fastvae.elbo(x[:2], mu, logvar, dec, likelihood="bernoulli")


def test_the_plans_serve_the_triton_and_cpp_backends_in_eager_mode(backend):
    """On the reference backend (and under torch.compile, autocast of float64
    tensors, functorch transforms) the objectives take the general path;
    autocast of float32 ones takes the plans, with autocast in the key."""
    name, device = backend
    x, (mu, logvar, W) = _problem(device, torch.float32)
    dec = _decoders(W)["bernoulli"]
    args = (x, mu, logvar, dec, None, None, "bernoulli", "mean")
    assert (objectives._lean_device(*args) is not None) == (name in ("triton", "cpp"))
    with torch.autocast(device, dtype=torch.bfloat16):  # float32 x and encoder: the plans, autocast in the key
        lean = objectives._lean_device(*args)
        assert (lean is not None and lean[2]) == (name in ("triton", "cpp"))
        assert objectives._lean_device(x.double(), mu.double(), logvar.double(), dec, None, None, "bernoulli",
                                       "mean") is None  # float64 under autocast: the general path
    assert objectives._lean_device(x.t(), mu, logvar, dec, None, None, "bernoulli", "mean") is None
    halves = torch.cat([mu, logvar], -1).chunk(2, -1)  # strided mu, logvar: copied once by the plans
    assert (objectives._lean_device(x, *halves, dec, None, None, "bernoulli", "mean") is not None) == (
        name in ("triton", "cpp"))
    assert objectives._lean_device(x, mu, logvar, dec, fastvae.priors.StandardNormal(), None, "bernoulli",
                                   "mean") is None
    assert objectives._lean_device(x, mu.half(), logvar, dec, None, None, "bernoulli", "mean") is None
    assert objectives._lean_device(x, mu, logvar, dec, None, None, "poisson", "mean") is None


@needs_triton
def test_one_plan_per_call_signature(triton_device):
    _plan.clear()
    x, (mu, logvar, W) = _problem(triton_device, torch.float32)
    dec = _decoders(W)["bernoulli"]
    for _ in range(3):
        fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli")
        fastvae.iwae(x, mu, logvar, dec, k=K, likelihood="bernoulli")
    assert len(_plan.PLANS) == 2
    fastvae.iwae(x, mu, logvar, dec, k=K + 1, likelihood="bernoulli")  # another K: another plan
    fastvae.elbo(x[:2], mu[:2], logvar[:2], dec, likelihood="bernoulli")  # another batch size
    assert len(_plan.PLANS) == 4


@pytest.mark.skipif(INTERPRET, reason="records compiled GPU variants (JITFunction), not the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B_, K_", [(3, 4), (300, 5), (4096, 1), (256, 50)])
def test_plans_launch_the_general_launchers_gpu_variants(dtype, B_, K_):
    """The plans' launches on a GPU, recorded without one (kernels/aot.py's
    recording, meta tensors, sm_90): the same kernels, grids, signatures and
    compile-time parameters as the general launchers', so no variant of the
    CUDA branch is left to a GPU run to check."""
    aot = pytest.importorskip("fastvae.kernels.aot", reason="needs triton")
    from fastvae.ops.bernoulli_likelihood import triton as bern
    from fastvae.ops.gaussian_log_prob import triton as gauss
    from fastvae.ops.gaussian_log_prob.op import fixed_logvar
    from fastvae.ops.logmeanexp import triton as lme
    from fastvae.ops.sample_normal import triton as sn

    meta = torch.device("meta")

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=meta)

    def record(fn, *args):
        launches = []
        with aot.recording("sm_90", launches):
            fn(*args)
        assert launches, "nothing launched"
        return [(launch.kernel, launch.grid, launch.key) for launch in launches]

    mu, lv, seed = t(B_, L), t(B_, L), t(dt=torch.int64)
    z, kl, ratio = t(K_, B_, L), t(B_), t(K_, B_)
    sample = _plan.SamplePlan(mu.shape, dtype, meta, K_, True, True)
    assert record(sample.forward, mu, lv, seed, z, kl, ratio, *sample.ints) == record(
        sn.sample_normal_forward, mu, lv, seed, 0, B_ * L, L, z, kl, ratio)
    for dreg in (False, True):  # DReG: the kernel weights grad_z's rows
        # samples split over programs where few rows leave a GPU idle (all three sizes here): the plan's own buffers
        run, part, counters, per_split, splits, K = sample.backward(True, False, True, dreg)
        assert (splits > 1) == (K_ > 1) and K == K_
        assert record(run, z, mu, ratio, mu, lv, seed, mu, lv, part, counters, ratio if dreg else mu, B_, L,
                      B_ * L, L, K, per_split, splits) == record(
            sn.sample_normal_backward, z, None, ratio, mu, lv, seed, True, mu, lv, ratio if dreg else None)

    x, logits, rec, term, scalar = t(B_, D), t(K_, B_, D), t(K_, B_), t(K_, B_), t()
    batch = torch.Size((B_,))
    # the elbo's tail, its bound reduced or per row, and the iwae's (the latent
    # term added per row; the log-mean-exp reduces), with the bound's arguments
    for reduction, iwae in (("mean", False), ("none", False), ("sum", True), ("none", True)):
        reduced = reduction != "none"
        lik_reduced = reduced and not iwae
        out, divisor = (scalar, B_ if reduction == "mean" else 1) if lik_reduced else (rec, None)
        dterm = None if iwae else term
        # the term's weight as float64 bits (+1 here), 0 where no term is read: as the launchers pass it
        bits, dbits = _plan.ONE_BITS, 0 if iwae else _plan.ONE_BITS
        tail = _plan.TailPlan("bernoulli", K_, B_, D, dtype, meta, reduction, batch, iwae)
        assert record(tail.log_prob, x, logits, None, term, bits, lik_reduced) == record(
            bern.bernoulli_forward, bern.BERNOULLI, x, logits, out, term, 1.0, divisor)
        assert record(tail.log_prob_backward, out, x, logits, None, dterm, dbits) == record(
            bern.bernoulli_backward, bern.BERNOULLI, out, x, logits, None, logits, dterm, 1.0, divisor)
        gaussian = _plan.TailPlan("gaussian", K_, B_, D, dtype, meta, reduction, batch, iwae)
        packed = t(K_, B_, 2 * D)
        mean, logvar = packed[..., :D], packed[..., D:]
        assert record(gaussian.log_prob, x, packed, logvar, term, bits, lik_reduced) == record(
            gauss.gaussian_log_prob_forward, x, mean, logvar, False, 1.0, out, term, 1.0, divisor)
        assert record(gaussian.log_prob_backward, out, x, packed, logvar, dterm, dbits) == record(
            gauss.gaussian_log_prob_backward, out, x, mean, logvar, False, 1.0, None, mean, logvar, dterm, 1.0,
            divisor)
        mean = t(K_, B_, D)  # the mean alone: unit variance, gaussian_log_prob's fixed (D,) log-variance
        unit = fixed_logvar(D, 0.0, dtype, meta)
        assert record(gaussian.log_prob, x, mean, None, term, bits, lik_reduced) == record(
            gauss.gaussian_log_prob_forward, x, mean, unit, False, 1.0, out, term, 1.0, divisor)
        assert record(gaussian.log_prob_backward, out, x, mean, None, dterm, dbits) == record(
            gauss.gaussian_log_prob_backward, out, x, mean, unit, False, 1.0, None, mean, None, dterm, 1.0,
            divisor)
        if not iwae:
            continue
        state, value = t(B_, dt=_backend_acc(dtype)), t(B_)
        bound = scalar if reduced else value
        lme_divisor = 1 if reduced else None
        if tail.lme_forward is not None:
            part = tail.lme_parts if reduced else value
            assert record(tail.lme_forward, rec, rec, part, state, state, state, state, bound, state, state, state,
                          tail.counter if reduced else state, *tail.lme_ints) == record(
                lme.logmeanexp_forward, rec, state, state, bound, None, lme_divisor)
        else:  # columns split over programs (K = 50 of 256 rows): two launches, the columns reduced in torch
            assert K_ == 50

            def split(tail, state, value):
                (fwd, finish), (fwd_ints, finish_ints) = tail.lme_split, tail.lme_split_ints
                parts = (*tail.lme_split_parts, tail.lme_split_parts[1])
                fwd(rec, rec, *parts, state, state, value, state, state, state, state, *fwd_ints)
                finish(*parts, state, state, value, state, state, state, *finish_ints)

            assert record(split, tail, state, value) == record(lme.logmeanexp_forward, rec, state, state, value, None)
        for weighted in (False, True):  # DReG: also dlw times the weights
            dlw_weighted = rec if weighted else None
            assert record(tail.lme_backward[reduced, weighted], rec, state, state, bound, bound, bound, rec, rec,
                          K_, B_, 1) == record(
                lme.logmeanexp_backward, rec, state, state, bound, None, None, rec, lme_divisor, dlw_weighted)


def _backend_acc(dtype):
    return fastvae._backend.accumulation_dtype(dtype)


class _FakeCompiled:
    """Stands in for the CompiledKernel a CUDA launch returns: its launcher runs
    the interpreted kernel with every argument, constexprs included, bound by
    position, so arguments in the wrong order give other numbers or errors."""

    def __init__(self, kernel, run, calls):
        self.kernel, self.interpreted_run, self.calls = kernel, run, calls
        self.function, self.packed_metadata = object(), object()

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        assert (stream, function, packed) == (_FakeRuntime.STREAM, self.function, self.packed_metadata)
        assert launch_metadata is None and enter_hook is None and exit_hook is None
        self.calls.append(self.kernel)
        self.interpreted_run(self.kernel, *args, grid=(g0, g1, g2), warmup=False)


class HookChain:  # Triton's default launch hooks: an empty chain, no hook set
    def __init__(self, calls=()):
        self.calls = list(calls)


class _FakeRuntime:
    STREAM = 1234

    def __init__(self):
        from types import SimpleNamespace
        self.knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=HookChain(), launch_exit_hook=None))
        self.device = 0

    def current_device(self):
        return self.device

    def current_stream(self, device):
        assert device == 0
        return self.STREAM

    @staticmethod
    def is_compiled(kernel):
        return isinstance(kernel, _FakeCompiled)


@pytest.fixture
def compiled_stand_in(monkeypatch):
    """Every interpreted launch returns a _FakeCompiled, as JITFunction.run
    returns the CompiledKernel on CUDA: (direct launches, launches through run,
    the runtime)."""
    from triton.runtime.interpreter import InterpretedFunction
    interpreted_run = InterpretedFunction.run
    calls, jit_calls = [], []

    def run_returning_a_compiled_kernel(self, *args, **kwargs):
        jit_calls.append(self)
        interpreted_run(self, *args, **kwargs)
        return _FakeCompiled(self, interpreted_run, calls)

    runtime = _FakeRuntime()
    monkeypatch.setattr(InterpretedFunction, "run", run_returning_a_compiled_kernel)
    monkeypatch.setattr(_launch, "_runtime", runtime)
    _plan.clear()
    yield calls, jit_calls, runtime
    _plan.clear()


@pytest.mark.skipif(not INTERPRET, reason="a stand-in for CUDA's compiled kernels around the interpreter")
@pytest.mark.parametrize("likelihood, case", [("bernoulli", "elbo"), ("gaussian", "elbo sum beta"),
                                              ("bernoulli", "iwae"), ("gaussian", "dreg"), ("bernoulli", "stl")])
def test_direct_launches_of_the_compiled_kernels_give_the_same_numbers(triton_device, compiled_stand_in, likelihood,
                                                                       case):
    """After a plan's first launch, Launch calls the compiled kernel's launcher
    itself (the CUDA path, here around the interpreter): every argument in the
    position Triton's binder gives it, so values and gradients are those of the
    general path bit for bit; another current device or a launch hook sends
    the call back through run (alignment: the next test)."""
    calls, jit_calls, runtime = compiled_stand_in
    for _ in range(2):  # the value checks' first call, then the plans' first launches: compiled kernels kept
        _run(triton_device, torch.float64, likelihood, case, True)
    assert jit_calls
    jit_calls.clear(), calls.clear()
    lean, lean_grads, node = _run(triton_device, torch.float64, likelihood, case, True)
    assert calls and not jit_calls  # every launch direct
    assert node.endswith("TailBackward")
    general, general_grads, _ = _run(triton_device, torch.float64, likelihood, case, False)
    assert not torch.isnan(lean).any()
    assert _same(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert _same(a, b)
    hooks = runtime.knobs.runtime
    for change in ("device", "hook", "chained hook"):
        if change == "device":
            runtime.device = 1
        elif change == "hook":
            hooks.launch_exit_hook = lambda *a: None
        else:
            hooks.launch_enter_hook = HookChain([lambda *a: None])
        before = len(calls)
        again, _, _ = _run(triton_device, torch.float64, likelihood, case, True)
        assert len(calls) == before and torch.equal(again, general)
        runtime.device, hooks.launch_enter_hook, hooks.launch_exit_hook = 0, HookChain(), None


@needs_triton
@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("case", ["iwae", "dreg", "stl"])
def test_samples_split_over_programs_take_the_plans_own_buffers(triton_device, monkeypatch, case, halves):
    """Where a GPU splits the sampler's backward over samples (few rows, many
    samples: an IWAE at training sizes), the plan launches it with buffers of
    its own, made once (forced here with small blocks, several per launch):
    the general path's values and gradients bit for bit, on every call (the
    arrival counters back at 0 after each)."""
    from fastvae.kernels import _common
    from fastvae.ops.sample_normal import triton as kernels

    monkeypatch.setattr(_common, "FORCE_SPLITS", 3)
    if INTERPRET:
        monkeypatch.setattr(kernels, "backward_geometry", lambda device, fp64: (4, 4))
    _plan.clear()
    general, general_grads, _ = _run(triton_device, torch.float64, "bernoulli", case, False, halves=halves)
    for _ in range(3):
        lean, lean_grads, node = _run(triton_device, torch.float64, "bernoulli", case, True, halves=halves)
        assert node == "IwaeTailBackward" and not torch.isnan(lean).any() and _same(lean, general)
        for a, b in zip(lean_grads, general_grads):
            assert _same(a, b)
    (plan,) = _plan.PLANS.values()
    (launch, part, counters, per_split, splits, k), = (b for b in plan.sample._backward.values())
    assert splits == 2 and per_split == 2 and k == K and part.shape[1] == splits
    assert not counters.any()  # back at 0 after each launch
    _plan.clear()


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="Triton's compiled kernels: on a GPU")
@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("case", ["elbo", "iwae", "dreg", "dreg k=50"])
def test_plans_launch_the_compiled_kernels_directly_on_a_gpu(monkeypatch, case, halves):
    """On a GPU, after a plan's first call each of its launches goes to the
    compiled kernel's launcher itself, none through JITFunction.run: the host
    cost the lean path was built for. A Triton whose compiled
    kernels differ would fall back silently, and fail here. At these few rows
    the sampler's backward splits its samples over programs, and at k = 50
    the log-mean-exp its columns too: launched from the plan all the same."""
    from triton.runtime.jit import JITFunction

    monkeypatch.setitem(CASES, "dreg k=50", dict(fn="iwae", k=50, estimator="dreg"))
    _plan.clear()
    for _ in range(2):  # the value checks' first call, then the plans' first launches
        _run("cuda", torch.float32, "bernoulli", case, True, halves=halves)
    through_run = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **kw: through_run.append(self.fn.__name__)
                        or run(self, *a, **kw))
    bound, _, node = _run("cuda", torch.float32, "bernoulli", case, True, halves=halves)
    assert node.endswith("TailBackward") and not torch.isnan(bound).any()
    assert through_run == []
    (plan,) = _plan.PLANS.values()
    called = [launch for launch in _plan.launches(plan) if launch.direct is not None]
    assert len(called) >= (4 if case == "elbo" else 6) and all(launch.direct for launch in called)
    assert (getattr(plan.tail, "lme_split", None) is not None) == (case == "dreg k=50")


@pytest.mark.skipif(not INTERPRET, reason="a stand-in for CUDA's compiled kernels around the interpreter")
def test_a_direct_launch_checks_the_tensors_alignment(triton_device, compiled_stand_in):
    """A tensor whose address changes its 16-byte alignment (a view at an odd
    offset) would meet a kernel specialized for aligned pointers: that call
    goes back through run, which specializes again."""
    calls, jit_calls, _ = compiled_stand_in
    kern = _plan._kernels("logmeanexp")
    x = torch.randn(5, 9, dtype=torch.float64)
    planned = kern.forward_plan(5, 9, torch.float64, torch.device("cpu"))
    assert planned is not None
    launch = _launch.Launch(kern._logmeanexp_fwd_kernel, planned[0], planned[1])
    assert launch.direct is None
    state = [torch.empty(9, dtype=torch.float64) for _ in range(2)]
    value = torch.empty(9, dtype=torch.float64)
    args = (x, x, state[1], state[1], state[1], state[0], state[1], value, state[1], state[1], state[1], state[1],
            5, 9, planned[2], 1, 1)
    launch(*args)
    assert launch.direct and len(jit_calls) == 1  # kept (False: not kept)
    launch(*args)
    assert len(calls) == 1
    shifted = torch.empty(9 * 5 + 1, dtype=torch.float64)[1:].view(5, 9).copy_(x)  # 8 bytes past alignment
    launch(shifted, shifted, *args[2:])
    assert len(calls) == 1 and len(jit_calls) == 2
    torch.testing.assert_close(value, torch.logsumexp(x, 0) - torch.log(torch.tensor(5.0, dtype=torch.float64)))


# -- the bound fused into the kernels (kernels/_common.py's bound_epilogue) -----------
# The plans' kernels add the latent term to each row's log-likelihood and reduce
# the rows (or, for iwae, the log-mean-exp reduces the columns); their backward
# kernels read the reduced bound's scalar gradient and write the term's. Checked
# here launcher by launcher against float64 torch, on odd sizes, one row,
# several programs (the last to arrive adds the partial sums), more programs than
# one finishing block reads, and infinite logits.


def _bound_rows(P, D, dtype, device, seed=0, inf=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(P, D, generator=g) > 0.5).to(dtype)
    logits = (torch.randn(1, P, D, generator=g) * 3).to(dtype)
    term = torch.randn(1, P, generator=g).to(dtype)
    if inf and P > 1:  # a certain, right outcome (0) and a certain, wrong one (-inf)
        logits[0, 0, 0], x[0, 0] = float("inf"), 1.0
        logits[0, 1, 0], x[1, 0] = float("inf"), 0.0
    return x.to(device), logits.to(device), term.to(device)


def _bound_tolerance(dtype) -> dict:
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-5)


def _bound_gradient(divisor, P, dtype, device):
    """(the bound's gradient as the kernel reads it: a scalar where reduced,
    else one per row; the float64 gradient of each row it stands for)."""
    if divisor:
        g = torch.tensor(1.7, dtype=dtype, device=device)
        return g, (g.double() / divisor).expand(1, P)
    g = torch.randn(1, P, generator=torch.Generator().manual_seed(5), dtype=dtype).to(device)
    return g, g.double()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("P, rows_per_program", [(1, None), (5, None), (600, None), (1100, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_fused_bernoulli_bound_matches_float64(triton_device, monkeypatch, dtype, P, rows_per_program, reduction):
    from fastvae.kernels import _common
    from fastvae.ops import bernoulli_likelihood as oracle
    from fastvae.ops.bernoulli_likelihood import triton as bern
    if rows_per_program is not None:
        if not INTERPRET or reduction != "mean" or dtype != torch.float32:
            pytest.skip("the interpreter's program size, in one case (about 1 ms a program)")
        monkeypatch.setattr(_common, "INTERPRETER_BLOCK_ROWS", rows_per_program)  # 1100 programs
    D, beta = 7, 0.3
    x, logits, term = _bound_rows(P, D, dtype, triton_device, inf=P > 2)
    divisor = None if reduction == "none" else P if reduction == "mean" else 1
    out = torch.full(() if divisor else (1, P), float("nan"), dtype=dtype, device=triton_device)
    bern.bernoulli_forward(bern.BERNOULLI, x, logits, out, term, -beta, divisor)
    rows = oracle.bernoulli_log_prob(x.double(), logits.double()) - beta * term.double()
    want = rows if divisor is None else rows.sum() / divisor
    assert not torch.isnan(out).any()
    tol = _bound_tolerance(dtype)
    torch.testing.assert_close(out.double(), want, **tol)
    # backward: the bound's gradient divided among the rows, and the term's
    g, row_g = _bound_gradient(divisor, P, dtype, triton_device)
    dlogits = torch.full_like(logits, float("nan"))
    dterm = torch.full_like(term, float("nan"))
    bern.bernoulli_backward(bern.BERNOULLI, g, x, logits, None, dlogits, dterm, -beta, divisor)
    lg = logits.double().requires_grad_()
    (want_dlogits,) = torch.autograd.grad(oracle.bernoulli_log_prob(x.double(), lg), lg, row_g)
    finite = torch.isfinite(lg.detach())
    assert not torch.isnan(dlogits[finite]).any() and not torch.isnan(dterm).any()
    torch.testing.assert_close(dlogits.double()[finite], want_dlogits[finite], **tol)
    torch.testing.assert_close(dterm.double(), -beta * row_g, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("P", [1, 5, 600])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("unit", [False, True])
def test_the_fused_gaussian_bound_matches_float64(triton_device, dtype, P, reduction, unit):
    """(mean, logvar) the halves of one output, or the mean alone (a fixed (D,)
    log-variance 0), read as the plans launch them; dlogvar written at its
    offset in dmean's buffer."""
    from fastvae.ops.gaussian_log_prob import triton as gauss
    from fastvae.ops.gaussian_log_prob.op import fixed_logvar
    D, beta = 7, 1.0
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(P, D, generator=g0).to(dtype).to(triton_device)
    packed = torch.randn(1, P, 2 * D, generator=g0).to(dtype).to(triton_device)
    term = torch.randn(1, P, generator=g0).to(dtype).to(triton_device)
    mean = packed[..., :D]
    logvar = fixed_logvar(D, 0.0, dtype, triton_device) if unit else packed[..., D:]
    divisor = None if reduction == "none" else P
    out = torch.full(() if divisor else (1, P), float("nan"), dtype=dtype, device=triton_device)
    gauss.gaussian_log_prob_forward(x, mean, logvar, False, 1.0, out, term, -beta, divisor)
    m, lv = mean.double().requires_grad_(), logvar.double().requires_grad_()
    rows = (-0.5 * ((x.double() - m) ** 2 * torch.exp(-lv) + lv + 1.8378770664093453)).sum(-1)
    want = rows - beta * term.double()
    want = want if divisor is None else want.sum() / divisor
    tol = _bound_tolerance(dtype)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, **tol)
    g, row_g = _bound_gradient(divisor, P, dtype, triton_device)
    dpacked = torch.full_like(packed, float("nan"))
    dterm = torch.full_like(term, float("nan"))
    dmean, dlogvar = dpacked[..., :D], None if unit else dpacked[..., D:]
    gauss.gaussian_log_prob_backward(g, x, mean, logvar, False, 1.0, None, dmean, dlogvar, dterm, -beta, divisor)
    want_dm, want_dlv = torch.autograd.grad(rows, (m, lv), row_g, allow_unused=True)
    torch.testing.assert_close(dmean.double(), want_dm, **tol)
    if not unit:
        torch.testing.assert_close(dlogvar.double(), want_dlv, **tol)
    torch.testing.assert_close(dterm.double(), -beta * row_g, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, M", [(1, 1), (5, 3), (4, 1500)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_fused_iwae_bound_matches_float64(triton_device, dtype, K, M, reduction):
    """The log-mean-exp's columns reduced in its kernel, an infinite column
    included; its backward at the bound's scalar gradient, with DReG's dlw
    times the normalized weights."""
    from fastvae.ops.logmeanexp import triton as lme
    lw = torch.randn(K, M, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    if M > 2:
        lw[:, 1] = float("-inf")  # an empty column: logmeanexp -inf, no gradient
    lw = lw.to(triton_device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lw_max, sumexp = (torch.empty(M, dtype=acc, device=triton_device) for _ in range(2))
    divisor = M if reduction == "mean" else 1
    out = torch.full((), float("nan"), dtype=dtype, device=triton_device)
    if lme.forward_plan(K, M, dtype, lw.device, True) is None:
        pytest.skip("columns split over programs: the plans reduce in torch there")
    lme.logmeanexp_forward(lw, lw_max, sumexp, out, None, divisor)
    l64 = lw.double().requires_grad_()
    want = (torch.logsumexp(l64, 0) - torch.log(torch.tensor(float(K), dtype=torch.float64))).sum() / divisor
    tol = _bound_tolerance(dtype)
    if M > 2:
        assert out.item() == float("-inf")
        l64 = torch.cat([l64[:, :1], l64[:, 2:]], 1).detach().requires_grad_()
        lw, lw_max, sumexp = lw[:, [0, *range(2, M)]].contiguous(), lw_max[[0, *range(2, M)]], sumexp[[0, *range(2, M)]]
        M -= 1
        divisor = M if reduction == "mean" else 1
        out = torch.full((), float("nan"), dtype=dtype, device=triton_device)
        lme.logmeanexp_forward(lw, lw_max, sumexp, out, None, divisor)
        want = (torch.logsumexp(l64, 0) - torch.log(torch.tensor(float(K), dtype=torch.float64))).sum() / divisor
    torch.testing.assert_close(out.double(), want, **tol)
    g = torch.tensor(1.7, dtype=dtype, device=triton_device)
    dlw, weighted = (torch.full_like(lw, float("nan")) for _ in range(2))
    lme.logmeanexp_backward(lw, lw_max, sumexp, g, None, None, dlw, divisor, weighted)
    (want_dlw,) = torch.autograd.grad(want, l64, torch.tensor(1.7, dtype=torch.float64))
    torch.testing.assert_close(dlw.double(), want_dlw, **tol)
    w = torch.softmax(l64.detach(), 0)
    torch.testing.assert_close(weighted.double(), want_dlw * w, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_samplers_weighted_grad_z_is_the_product(triton_device, dtype):
    """DReG: the sampler's backward kernel weights grad_z's rows by z_scale,
    giving what it gives for grad_z * z_scale[..., None]: bit for bit under the
    interpreter; on a GPU within a few ulps, where the compiler fuses the
    weighting into an FMA with the sum over samples (seen on an H200)."""
    from fastvae.ops.sample_normal import triton as sn
    K, N, L = 3, 5, 6
    g = torch.Generator().manual_seed(4)
    mu, lv = (torch.randn(N, L, generator=g).to(dtype).to(triton_device) for _ in range(2))
    grad_z = torch.randn(K, N, L, generator=g).to(dtype).to(triton_device)
    ratio, scale = (torch.rand(K, N, generator=g).to(dtype).to(triton_device) for _ in range(2))
    seed = torch.tensor(123, dtype=torch.int64, device=triton_device)
    got, want = [[torch.full_like(mu, float("nan")) for _ in range(2)] for _ in range(2)]
    sn.sample_normal_backward(grad_z, None, ratio, mu, lv, seed, True, *got, scale)
    sn.sample_normal_backward(grad_z * scale[..., None], None, ratio, mu, lv, seed, True, *want)
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        if triton_device == "cuda":
            ulps = 8 * torch.finfo(dtype).eps
            torch.testing.assert_close(a, b, rtol=ulps, atol=ulps * b.abs().max().item())
        else:
            assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("case", ["iwae", "iwae sum", "dreg"])
def test_iwae_columns_split_over_programs_give_the_same_bound(triton_device, monkeypatch, case):
    """Where a GPU splits the log-mean-exp's columns over programs (K = 50 at a
    batch of 256, say: forward_plan says None), the iwae tail launches the
    general launcher's two kernels (split_plan) from the plan, with partial
    states of its own, and reduces the columns in torch; its backward is the
    same fused one. Forced here (two splits of two rows), the values and
    gradients are the general path's (as test_plans_give_the_general_path_bit_for_bit),
    on every call."""
    from fastvae.ops.logmeanexp import triton as lme
    monkeypatch.setattr(lme, "_tile", lambda K, M, device: (2, 4))
    monkeypatch.setattr(lme, "_splits", lambda K, M, block_k, block_m, device: min(2, -(-K // block_k)))
    _plan.clear()
    try:
        general, general_grads, _ = _run(triton_device, torch.float64, "bernoulli", case, False)
        for _ in range(2):
            lean, lean_grads, node = _run(triton_device, torch.float64, "bernoulli", case, True)
        (plan,) = _plan.PLANS.values()
    finally:
        _plan.clear()
    assert plan.tail.lme_forward is None and plan.tail.lme_split_parts.shape == (2, 2, B)
    assert node == "IwaeTailBackward"
    assert not torch.isnan(lean).any()
    torch.testing.assert_close(lean, general, rtol=1e-12, atol=1e-12)
    for a, b in zip(lean_grads, general_grads):
        assert not torch.isnan(a).any() and _same(a, b)


# -- under torch.compile: the plans as graph ops (fastvae/_plan_ops.py) ---------------------

COMPILED_CASES = ("elbo", "elbo sum beta", "elbo none", "iwae", "iwae none k1", "dreg", "stl")


def _bound_and_grads(fn, x, leaves):
    torch.manual_seed(7)  # the compiled objectives draw their seed from torch's generator, as eager ones do
    bound = fn(x, *leaves)
    return bound, torch.autograd.grad(bound, leaves, torch.ones_like(bound))


LIKELIHOODS = ("bernoulli", "gaussian mean", "gaussian")


@needs_triton
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_objectives_run_the_plans_kernels(triton_device, likelihood, case):
    """Under torch.compile on the triton backend the objectives' draw and
    fused tail are the plan ops: the graph keeps their plans, not the eager
    path's, and gives the eager plans' bound and gradients (the same kernels;
    DReG's weights applied by hooks in the graph, by the sampler's kernel in
    eager mode: the same products). A Gaussian decoder's (mean, logvar) pair
    takes the general tail after the planned draw."""
    if case == "dreg" and not objectives.DREG_COMPILES:
        pytest.skip("estimator='dreg' compiles from torch 2.13 on")
    if INTERPRET and (COMPILED_CASES.index(case) + LIKELIHOODS.index(likelihood)) % len(LIKELIHOODS):
        pytest.skip("the interpreter takes each case with one decoder form (a compile each): on a GPU, all")
    kw = dict(CASES[case])
    fn = getattr(fastvae, kw.pop("fn"))

    def loss(x, mu, logvar, W):
        return fn(x, mu, logvar, _decoders(W)[likelihood], likelihood=likelihood.split()[0], **kw)

    torch._dynamo.reset()
    x, leaves = _problem(triton_device, torch.float32)
    _plan.clear()
    try:
        want, want_grads = _bound_and_grads(loss, x, leaves)  # eager: the plans
        _plan.clear()
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        for _ in range(2):  # the second call: the plans made
            got, got_grads = _bound_and_grads(compiled, x, leaves)
        kinds = {key[0] for key in _plan.PLANS}
    finally:
        _plan.clear()
    assert kinds == ({"plan_sample"} if likelihood == "gaussian" else {"plan_sample", "plan_tail"})
    assert torch.isfinite(got).all() and _same(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.isfinite(a).all() and _same(a, b)


@needs_triton
def test_an_inductor_compiled_step_runs_the_plans_kernels(triton_device):
    """The same through Inductor, whose generated code calls the plan ops, on a
    batch that changes (a recompile with a dynamic batch, then plans per size)."""
    _, (mu0, logvar0, W) = _problem(triton_device, torch.float32)

    def loss(x, mu, logvar):
        return fastvae.iwae(x, mu, logvar, _decoders(W)["bernoulli"], k=K, likelihood="bernoulli")

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    _plan.clear()
    try:
        for batch in (B, B - 1):
            x = (torch.rand(batch, D, generator=torch.Generator().manual_seed(batch)) > 0.5).float().to(triton_device)
            leaves = [mu0[:batch].detach().clone().requires_grad_(), logvar0[:batch].detach().clone().requires_grad_()]
            want, want_grads = _bound_and_grads(loss, x, leaves)
            got, got_grads = _bound_and_grads(compiled, x, leaves)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        kinds = [key[0] for key in _plan.PLANS if key[0].startswith("plan_")]
    finally:
        _plan.clear()
    assert sorted(kinds) == ["plan_sample", "plan_sample", "plan_tail", "plan_tail"]


@needs_triton
def test_the_plan_ops_fake_implementations_match_their_kernels(triton_device):
    """torch.library.opcheck of each plan op: the schema, the fake (meta)
    implementation's shapes, dtypes and strides against the kernels' outputs."""
    from fastvae import _plan_ops  # noqa: F401 (registers the ops)
    ops = torch.ops.fastvae
    g = torch.Generator().manual_seed(2)
    mu, logvar = (torch.randn(B, L, generator=g).to(triton_device) for _ in range(2))
    seed = torch.tensor(5, device=triton_device)
    x = (torch.rand(B, D, generator=g) > 0.5).float().to(triton_device)
    out = torch.randn(K, B, D, generator=g).to(triton_device)
    latent = torch.randn(K, B, generator=g).to(triton_device)
    kl = torch.rand(B, generator=g).to(triton_device)
    _plan.clear()
    try:
        for k, with_ratio in ((0, False), (K, False), (K, True)):
            torch.library.opcheck(ops.plan_sample, (mu, logvar, seed, k, with_ratio, True, torch.float32),
                                  test_utils=("test_schema", "test_faketensor"))
        grad_z = torch.randn(K, B, L, generator=g).to(triton_device)
        torch.library.opcheck(ops.plan_sample_backward,
                              (mu, logvar, seed, grad_z, kl, latent, K, True, True, torch.float32),
                              test_utils=("test_schema", "test_faketensor"))
        for reduction in ("mean", "none"):
            torch.library.opcheck(ops.plan_elbo_tail, (x, out[0], kl, 0.5, "bernoulli", reduction),
                                  test_utils=("test_schema", "test_faketensor"))
            torch.library.opcheck(ops.plan_iwae_tail, (x, out, latent, "bernoulli", reduction, True),
                                  test_utils=("test_schema", "test_faketensor"))
    finally:
        _plan.clear()


def test_compiled_objectives_take_no_plan_ops_off_the_triton_backend():
    """On the cpp backend the compiled objectives keep their C++ operators:
    the plan ops serve the triton backend only."""
    if INTERPRET:
        pytest.skip("the cpp backend runs in the main process")
    fastvae.set_backend(None)
    torch._dynamo.reset()
    x, (mu, logvar, W) = _problem("cpu", torch.float32)
    _plan.clear()
    compiled = torch.compile(lambda x, mu, logvar: fastvae.elbo(x, mu, logvar, _decoders(W)["bernoulli"],
                                                                  likelihood="bernoulli"), fullgraph=True)
    bound = compiled(x, mu, logvar)
    torch.autograd.grad(bound, (mu, logvar))
    assert not any(key[0].startswith("plan_") for key in _plan.PLANS)


# -- a latent family's posterior against a prior of its closed-form KL ---------------

FAMILIES = {"laplace": torch.distributions.Laplace, "gumbel": torch.distributions.Gumbel,
            "cauchy": torch.distributions.Cauchy, "uniform": torch.distributions.Uniform,
            "exponential": torch.distributions.Exponential, "weibull": torch.distributions.Weibull,
            "kumaraswamy": torch.distributions.Kumaraswamy}
PAIRS = ("weibull", "kumaraswamy")  # two log parameters, (loc, raw) read as (log p0, log p1)


def _family_problem(device, dtype, family, q_form="torch", p_form="shared", seed=0, batch=(B,)):
    """x, the leaves (loc, raw scale, the prior's loc and raw scale, W) and a
    builder of (q, prior) from them, as a training step writes it: the scale
    exp(raw) each call, q a torch object (``q_form`` "torch", "independent")
    or fastvae's record ("record"), the prior one for every row ("shared",
    (L,)), a learned one ("learned": its parameters require a gradient), one
    per row ("per row", (..., L)) or a record ("record"). A Weibull's or
    Kumaraswamy's (log p0, log p1) are (loc, raw), exponentiated for a torch
    object; the Kumaraswamy's prior is a torch Beta."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(*batch, D, generator=g) > 0.5).to(dtype).to(device)
    loc = torch.randn(*batch, L, generator=g).to(dtype)
    raw = (torch.randn(*batch, L, generator=g) * 0.5).to(dtype)
    p_shape = (*batch, L) if p_form == "per row" else (L,)
    p_loc = (torch.randn(p_shape, generator=g) * 0.3).to(dtype)
    p_raw = (torch.randn(p_shape, generator=g) * 0.3 + (1.5 if family == "uniform" else 0.0)).to(dtype)
    W = (torch.randn(L, 2 * D, generator=g) * 0.5).to(dtype)
    leaves = [t.to(device).requires_grad_() for t in (loc, raw, W)]
    p_leaves = [t.to(device).requires_grad_(p_form == "learned") for t in (p_loc, p_raw)]

    def dist(m, r, form):
        if family == "exponential":  # its log-rate alone: raw (the location is left out)
            if form == "record":
                return fastvae.Positive("exponential", r)
            d = FAMILIES[family](r.exp())
            return torch.distributions.Independent(d, 1) if form == "independent" else d
        if family in PAIRS:
            if form == "record":
                return fastvae.Positive(family, m, r)
            d = (torch.distributions.Beta if family == "kumaraswamy" and form == "p" else FAMILIES[family])(
                m.exp(), r.exp())
            return torch.distributions.Independent(d, 1) if form == "independent" else d
        if form == "record":
            return fastvae.LocationScale(family, m, r)
        if family == "uniform":  # wide enough a prior that q's support lies inside it
            d = FAMILIES[family](m - 3.0 * r.exp(), m + 3.0 * r.exp()) if form != "q" else FAMILIES[family](
                m, m + r.exp())
        else:
            d = FAMILIES[family](m, r.exp())
        return torch.distributions.Independent(d, 1) if form == "independent" else d

    def build(loc, raw, p_loc, p_raw):
        q = dist(loc, raw, "record" if q_form == "record" else ("independent" if q_form == "independent" else "q"))
        return q, dist(p_loc, p_raw, "record" if p_form == "record" else "p")

    return x, leaves, p_leaves, build


def _family_run(device, dtype, family, enabled, q_form="torch", p_form="shared", likelihood="bernoulli",
                create_graph=False, **kw):
    """(bound, its gradients in every leaf that takes one, the grad_fn's name)."""
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem(device, dtype, family, q_form, p_form)
    q, prior = build(loc, raw, p_loc, p_raw)
    previous = _plan.ENABLED
    _plan.ENABLED = enabled
    try:
        bound = fastvae.elbo(x, q, _decoders(W)[likelihood], likelihood=likelihood.split()[0], prior=prior,
                             generator=torch.Generator(device).manual_seed(7), **kw)
    finally:
        _plan.ENABLED = previous
    # (the exponential has no location: its loc leaves take no part)
    params = (raw, W, p_raw) if family == "exponential" else (loc, raw, W, p_loc, p_raw)
    wrt = [t for t in params if t.requires_grad]
    grads = torch.autograd.grad(bound, wrt, torch.ones_like(bound), create_graph=create_graph)
    return bound, grads, type(bound.grad_fn).__name__


FAMILY_CASES = [  # (family, q_form, p_form, likelihood, dtype, keywords)
    ("laplace", "torch", "shared", "bernoulli", torch.float32, {}),
    ("laplace", "independent", "learned", "gaussian", torch.float64, dict(reduction="sum", beta=0.3)),
    ("laplace", "record", "record", "gaussian mean", torch.float32, dict(reduction="none")),
    ("gumbel", "torch", "per row", "bernoulli", torch.float64, {}),
    ("gumbel", "torch", "learned", "bernoulli", torch.float32, dict(n_samples=3)),
    ("cauchy", "torch", "shared", "gaussian", torch.float32, dict(reduction="sum")),
    ("cauchy", "independent", "learned", "bernoulli", torch.float64, dict(reduction="none")),
    ("uniform", "torch", "shared", "bernoulli", torch.float32, {}),
    ("uniform", "torch", "learned", "gaussian", torch.float64, dict(n_samples=2, reduction="sum")),
    ("exponential", "torch", "shared", "bernoulli", torch.float32, {}),
    ("exponential", "independent", "learned", "gaussian", torch.float64, dict(reduction="none")),
    ("exponential", "record", "record", "bernoulli", torch.float64, dict(n_samples=2)),
    ("weibull", "torch", "shared", "bernoulli", torch.float32, {}),
    ("weibull", "independent", "learned", "gaussian", torch.float64, dict(reduction="sum", beta=0.3)),
    ("weibull", "record", "record", "bernoulli", torch.float64, dict(n_samples=2)),
    ("weibull", "torch", "per row", "gaussian mean", torch.float32, dict(reduction="none")),
    ("kumaraswamy", "torch", "shared", "bernoulli", torch.float32, {}),
    ("kumaraswamy", "independent", "learned", "bernoulli", torch.float64, dict(reduction="none")),
    ("kumaraswamy", "record", "learned", "gaussian", torch.float64, dict(n_samples=2)),
    ("kumaraswamy", "torch", "per row", "bernoulli", torch.float64, {}),
]


@needs_triton
@pytest.mark.parametrize("family, q_form, p_form, likelihood, dtype, kw", FAMILY_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{str(c[4])[6:]}-{'-'.join(c[5])}" for c in FAMILY_CASES])
def test_family_plans_give_the_general_path_bit_for_bit(triton_device, family, q_form, p_form, likelihood, dtype,
                                                         kw):
    """A Laplace, Gumbel, Cauchy, uniform, exponential or Weibull posterior
    against a prior of its own family, a Kumaraswamy against a Beta (torch
    objects or records, one prior for every row, a learned one or one per
    row) takes the plans: the family's sampler and closed-form KL in one
    node, then the tail's (one sample), with the general path's values and
    gradients, the prior's included."""
    run = dict(q_form=q_form, p_form=p_form, likelihood=likelihood, **kw)
    _family_run(triton_device, dtype, family, True, **run)  # the first call: value checks run, plans made
    lean, lean_grads, node = _family_run(triton_device, dtype, family, True, **run)
    general, general_grads, general_node = _family_run(triton_device, dtype, family, False, **run)
    if kw.get("n_samples", 1) == 1:
        assert node == "ElboTailBackward" and general_node != node
    assert "FamilySampleBackward" in _graph_names(lean) and "FamilySampleBackward" not in _graph_names(general)
    assert not torch.isnan(lean).any() and torch.isfinite(lean).all()
    assert _same(lean, general)
    assert len(lean_grads) == len(general_grads) == (5 if p_form == "learned" else 3) - (family == "exponential") * (
        2 if p_form == "learned" else 1)
    for a, b in zip(lean_grads, general_grads):
        assert a.dtype == b.dtype and not torch.isnan(a).any() and _same(a, b)


def _graph_names(t: torch.Tensor) -> set[str]:
    """The names of the nodes of t's autograd graph."""
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


@needs_triton
def test_the_family_plan_holds_one_node_before_the_decoder(triton_device):
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem(triton_device, torch.float32, "laplace")
    seen = []
    for _ in range(2):
        q, prior = build(loc, raw, p_loc, p_raw)
        fastvae.elbo(x, q, lambda z: seen.append(z.grad_fn) or z @ W[:, :D], likelihood="bernoulli", prior=prior)
    assert type(seen[-1]).__name__ == "FamilySampleBackward"
    assert type(seen[0]).__name__ != "FamilySampleBackward"  # the first call checks values: the general path


@needs_triton
@pytest.mark.parametrize("family", ["laplace", *PAIRS])
def test_family_plans_differentiate_twice_as_the_general_path(triton_device, family):
    _assert_second_derivatives_agree(lambda enabled, **kw: _family_run(triton_device, torch.float64, family,
                                                                        enabled, p_form="learned", **kw))


@needs_triton
def test_family_plans_follow_changing_shapes_and_families(triton_device):
    """A loop whose batch size, latent family or prior changes between calls:
    one plan per signature, each call the general path's values."""
    _plan.clear()
    for batch in [(B,), (1,), (B, 2), (B,)]:
        for family in ("laplace", "gumbel"):
            x, (loc, raw, W), (p_loc, p_raw), build = _family_problem(triton_device, torch.float32, family,
                                                                      batch=batch)
            values, dec = [], _decoders(W)["bernoulli"]
            for enabled in (True, True, False):
                _plan.ENABLED = enabled
                try:
                    q, prior = build(loc, raw, p_loc, p_raw)
                    values.append(fastvae.elbo(x, q, dec, likelihood="bernoulli", prior=prior,
                                               generator=torch.Generator(triton_device).manual_seed(1)))
                finally:
                    _plan.ENABLED = True
            assert _same(values[1], values[2]) and torch.isfinite(values[1])
    assert len([k for k in _plan.PLANS if k[0] == "family elbo"]) == 6


@pytest.mark.parametrize("cpp", [False, True], ids=["triton", "cpp"])
def test_a_fixed_priors_log_is_kept_until_its_values_change(request, cpp):
    """A torch prior made anew each call around the same scale tensor: its
    log is taken once (no log op at the next calls), an in-place write to the
    scale is seen at the next call (the general path's bound again), and a
    learned prior's (requires grad) is never kept."""
    if cpp and (INTERPRET or not fastvae._backend.cpp_available()):
        pytest.skip("the cpp backend's plan")
    if not cpp and not TRITON:
        pytest.skip("the plans serve the triton backend (interpreter child, GPU)")
    device = "cpu" if cpp else request.getfixturevalue("triton_device")
    x, (loc, raw, W), _, _ = _family_problem(device, torch.float32, "laplace")
    p_loc, p_scale = torch.zeros(L, device=device), torch.full((L,), 1.5, device=device)
    dec = _decoders(W)["bernoulli"]

    def call(enabled):
        previous = _plan.ENABLED
        _plan.ENABLED = enabled
        try:
            return fastvae.elbo(x, torch.distributions.Laplace(loc, raw.exp()), dec, likelihood="bernoulli",
                                prior=torch.distributions.Laplace(p_loc, p_scale),
                                generator=torch.Generator(device).manual_seed(3))
        finally:
            _plan.ENABLED = previous

    logs = []

    class CountLogs(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.log.default and args[0] is not None and args[0].shape == (L,):
                logs.append(args[0])
            return func(*args, **(kwargs or {}))

    with fastvae.use_backend("cpp" if cpp else "triton"):
        for _ in range(2):
            call(True)  # the first call checks values (the general path), the second makes the plan
        with CountLogs():
            kept = call(True)
        assert not logs, "the fixed prior's log was taken again"
        assert _same(kept, call(False))
        with torch.no_grad():
            p_scale.mul_(2.0)  # an in-place write: new values at the same memory
        with CountLogs():
            changed = call(True)
        assert len(logs) == 1 and _same(changed, call(False)) and not torch.equal(changed, kept)
        p_scale.requires_grad_()  # a learned prior: its log is taken every call
        for _ in range(2):
            call(True)
        logs.clear()
        with CountLogs():
            call(True)
        assert len(logs) == 1


@pytest.mark.skipif(not INTERPRET, reason="a stand-in for CUDA's compiled kernels around the interpreter")
@pytest.mark.parametrize("family, launches", [("cauchy", 4), ("weibull", 6), ("kumaraswamy", 6)])
def test_family_plans_launch_the_compiled_kernels_directly(triton_device, compiled_stand_in, family, launches):
    """A location-scale family's draw with its KL and the likelihood, forward
    and backward (4 launches); a positive family's draw, its KL and the
    likelihood each way (6): all direct."""
    calls, jit_calls, _ = compiled_stand_in
    for _ in range(2):
        _family_run(triton_device, torch.float64, family, True, p_form="learned")
    jit_calls.clear(), calls.clear()
    lean, lean_grads, _ = _family_run(triton_device, torch.float64, family, True, p_form="learned")
    assert len(calls) == launches and not jit_calls
    general, general_grads, _ = _family_run(triton_device, torch.float64, family, False, p_form="learned")
    assert _same(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert _same(a, b)


@pytest.mark.skipif(INTERPRET or not fastvae._backend.cpp_available(), reason="the cpp backend's plan")
@pytest.mark.parametrize("family, q_form, p_form, likelihood, dtype, kw", FAMILY_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{str(c[4])[6:]}-{'-'.join(c[5])}" for c in FAMILY_CASES])
def test_the_cpp_family_plan_gives_the_general_path_bit_for_bit(family, q_form, p_form, likelihood, dtype, kw):
    run = dict(q_form=q_form, p_form=p_form, likelihood=likelihood, **kw)
    with fastvae.use_backend("cpp"):
        _family_run("cpu", dtype, family, True, **run)
        lean, lean_grads, _ = _family_run("cpu", dtype, family, True, **run)
        general, general_grads, _ = _family_run("cpu", dtype, family, False, **run)
    assert torch.isfinite(lean).all() and torch.equal(lean, general)
    for a, b in zip(lean_grads, general_grads):
        assert torch.equal(a, b)


@pytest.mark.skipif(INTERPRET or not fastvae._backend.cpp_available(), reason="the cpp backend's plan")
@pytest.mark.parametrize("q_form, p_form", [("torch", "learned"), ("independent", "shared"), ("torch", "shared")])
def test_the_cpp_uniform_plan_takes_high_minus_low_and_differentiates_twice(q_form, p_form):
    """A torch Uniform posterior's (low, high) go to the plan's node, which
    takes log(high - low) itself (one width for the value check and the log)
    and its gradients in the kernels' buffers (the general path's bit for
    bit: the cpp case above). With create_graph=True its replay gives the
    same first derivatives (high = low + width depends on low: the replay
    takes no path twice) and second derivatives that match the first ones'
    finite differences (the noise is the generator's, the same each call)."""
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem("cpu", torch.float64, "uniform", q_form, p_form)

    def grads(raw_value, create_graph):
        q, prior = build(loc, raw_value, p_loc, p_raw)
        bound = fastvae.elbo(x, q, _decoders(W)["bernoulli"], likelihood="bernoulli", prior=prior,
                             generator=torch.Generator().manual_seed(7))
        assert "FamilySampleBackward" in _graph_names(bound)
        wrt = [loc, raw_value, W] + ([p_loc, p_raw] if p_form == "learned" else [])
        return torch.autograd.grad(bound, wrt, create_graph=create_graph)

    with fastvae.use_backend("cpp"):
        grads(raw, False)  # the plan's first call
        plain, replayed = grads(raw, False), grads(raw, True)
        for a, b in zip(plain, replayed):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
        penalty = sum((g * g).sum() for g in replayed)
        (second,) = torch.autograd.grad(penalty, raw)
        v = torch.randn(raw.shape, generator=torch.Generator().manual_seed(1), dtype=raw.dtype)
        eps = 1e-6
        ends = [sum((g * g).sum() for g in grads((raw + s * eps * v).detach().requires_grad_(), False))
                for s in (1, -1)]
    fd = (ends[0] - ends[1]) / (2 * eps)
    assert abs(float(fd) - float((second * v).sum())) <= 1e-6 * (1.0 + abs(float(fd)))


@pytest.mark.skipif(INTERPRET or not fastvae._backend.cpp_available(), reason="the cpp backend's plan")
def test_the_cpp_uniform_plan_refuses_high_below_low_by_name():
    """The width the plan's node takes is value-checked there, as the general
    path checks a torch Uniform's: high <= low is refused by name on every call."""
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem("cpu", torch.float32, "uniform")
    _, prior = build(loc, raw, p_loc, p_raw)
    with fastvae.use_backend("cpp"):
        for _ in range(2):  # the plan's first call (made on the general path's checks) and a planned one
            fastvae.elbo(x, torch.distributions.Uniform(loc, loc + raw.exp()), lambda z: z @ W[:, :D],
                         likelihood="bernoulli", prior=prior)
        bad = torch.distributions.Uniform(loc, loc - raw.exp(), validate_args=False)
        with pytest.raises(ValueError, match=r"the posterior's high - low \(torch Uniform\) must be > 0"):
            fastvae.elbo(x, bad, lambda z: z @ W[:, :D], likelihood="bernoulli", prior=prior)


POSITIVE_CASES = [c for c in FAMILY_CASES if c[0] in ("exponential", *PAIRS)]


@pytest.mark.skipif(INTERPRET or not fastvae._backend.cpp_available(), reason="the cpp backend's plan")
@pytest.mark.parametrize("family, q_form, p_form, likelihood, dtype, kw", POSITIVE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{str(c[4])[6:]}-{'-'.join(c[5])}" for c in POSITIVE_CASES])
def test_the_cpp_positive_family_plan_is_taken_and_gives_the_general_path_bit_for_bit(family, q_form, p_form,
                                                                                      likelihood, dtype, kw):
    """On the cpp backend a positive family's parameters are checked on the
    general path (on the CPU every call); with the checks off the plan runs
    sample_positive_kl's fused C++ draw and KL in its one node before the
    decoder, with the general path's values and gradients."""
    run = dict(q_form=q_form, p_form=p_form, likelihood=likelihood, **kw)
    _plan.clear()
    fastvae.set_value_checks("never")
    try:
        with fastvae.use_backend("cpp"):
            lean, lean_grads, _ = _family_run("cpu", dtype, family, True, **run)
            general, general_grads, _ = _family_run("cpu", dtype, family, False, **run)
    finally:
        fastvae.set_value_checks("auto")
    assert [k[1] for k in _plan.PLANS if k[0] == "family elbo"] == [family]
    assert "FamilySampleBackward" in _graph_names(lean) and "FamilySampleBackward" not in _graph_names(general)
    assert torch.isfinite(lean).all() and torch.equal(lean, general)
    assert len(lean_grads) == len(general_grads) > 0
    for a, b in zip(lean_grads, general_grads):
        assert not torch.isnan(a).any() and torch.equal(a, b)


def test_family_calls_the_plans_do_not_serve_take_the_general_path(backend):
    """Selection (every backend): another family's prior, a Gaussian prior, the
    logistic (no closed form), mixed dtypes, half precision, autocast and
    the reference backend take the general path (None here); the plans'
    backends take a same-family call."""
    name, device = backend
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem(device, torch.float32, "laplace")
    q, prior = build(loc, raw, p_loc, p_raw)
    dec = _decoders(W)["bernoulli"]

    def lean(q, prior, x=x, likelihood="bernoulli", **kw):
        args = dict(beta=1.0, free_bits=0.0, n_samples=1, reduction="mean", generator=None) | kw
        return objectives._lean_family_elbo(x, q, dec, likelihood, args["beta"], args["free_bits"],
                                            args["n_samples"], args["reduction"], args["generator"], prior)

    fastvae.set_value_checks("never")
    try:
        assert (lean(q, prior) is not None) == (name in ("triton", "cpp"))
        td = torch.distributions
        assert lean(q, td.Gumbel(p_loc, p_raw.exp())) is None  # another family
        rate = td.Exponential(raw.exp())
        assert (lean(rate, td.Exponential(p_raw.exp())) is not None) == (name in ("triton", "cpp"))
        assert lean(rate, prior) is None and lean(q, td.Exponential(p_raw.exp())) is None
        weibull, kumaraswamy = td.Weibull(loc.exp(), raw.exp()), td.Kumaraswamy(loc.exp(), raw.exp())
        p_weibull, beta = td.Weibull(p_loc.exp(), p_raw.exp()), td.Beta(p_loc.exp(), p_raw.exp())
        assert (lean(weibull, p_weibull) is not None) == (name in ("triton", "cpp"))
        assert (lean(kumaraswamy, beta) is not None) == (name in ("triton", "cpp"))
        assert (lean(fastvae.Positive("kumaraswamy", loc, raw), td.Independent(beta, 1)) is not None) == (
            name in ("triton", "cpp"))
        # no closed form: a Kumaraswamy prior (a record or torch's), another positive family, a Laplace
        assert lean(kumaraswamy, td.Kumaraswamy(p_loc.exp(), p_raw.exp())) is None
        assert lean(kumaraswamy, fastvae.Positive("kumaraswamy", p_loc, p_raw)) is None
        assert lean(weibull, beta) is None and lean(weibull, td.Exponential(p_raw.exp())) is None
        assert lean(kumaraswamy, p_weibull) is None and lean(rate, p_weibull) is None
        assert lean(weibull, prior) is None and lean(q, p_weibull) is None and lean(q, beta) is None
        assert lean(weibull, td.Weibull(p_loc.double().exp(), p_raw.double().exp())) is None  # mixed dtypes
        assert lean(q, None) is None and lean(q, fastvae.priors.StandardNormal()) is None
        logistic = fastvae.LocationScale("logistic", loc, raw)
        assert lean(logistic, fastvae.LocationScale("logistic", p_loc, p_raw)) is None  # no closed form
        assert lean(q, td.Laplace(p_loc.double(), p_raw.exp().double())) is None  # mixed dtypes
        assert lean(td.Laplace(loc.half(), raw.exp().half()), td.Laplace(p_loc.half(), p_raw.exp().half()),
                    x=x.half()) is None
        assert lean(q, prior, free_bits=0.5) is None and lean(q, prior, likelihood="poisson") is None
        assert lean(td.Independent(td.Laplace(loc.unsqueeze(-1), raw.exp().unsqueeze(-1)), 2), prior) is None
        with torch.autocast(device, dtype=torch.bfloat16):
            assert lean(q, prior) is None
    finally:
        fastvae.set_value_checks("auto")


def test_a_family_call_checks_its_values_before_any_plan(backend):
    """A scale <= 0 (torch's own check off) is refused by name on a call that
    would take the plans, and "always" keeps every call on the checked path."""
    name, device = backend
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem(device, torch.float32, "laplace")
    dec = _decoders(W)["bernoulli"]
    td = torch.distributions
    prior = td.Laplace(p_loc, p_raw.exp())
    for _ in range(2):
        fastvae.elbo(x, td.Laplace(loc, raw.exp()), dec, likelihood="bernoulli", prior=prior)
    bad = td.Laplace(loc, raw.exp() * torch.tensor([1.0] * (L - 1) + [-1.0], device=device), validate_args=False)
    fastvae.set_value_checks("always")
    try:
        with pytest.raises(ValueError, match="scale"):
            fastvae.elbo(x, bad, dec, likelihood="bernoulli", prior=prior)
    finally:
        fastvae.set_value_checks("auto")


@pytest.mark.parametrize("family", PAIRS)
def test_a_positive_family_call_checks_its_values_before_any_plan(backend, family):
    """A Weibull's or Kumaraswamy's parameter <= 0, or its prior's (a
    Weibull's, a Beta's), torch's own check off, is refused by name on a call
    that would take the plans, as on the general path."""
    name, device = backend
    x, (loc, raw, W), (p_loc, p_raw), build = _family_problem(device, torch.float32, family)
    dec = _decoders(W)["bernoulli"]
    q, prior = build(loc, raw, p_loc, p_raw)
    for _ in range(2):
        fastvae.elbo(x, q, dec, likelihood="bernoulli", prior=prior)
    td = torch.distributions
    sign = torch.tensor([1.0] * (L - 1) + [-1.0], device=device)
    bad_q = FAMILIES[family](loc.exp(), raw.exp() * sign, validate_args=False)
    bad_prior = (td.Beta if family == "kumaraswamy" else td.Weibull)(p_loc.exp() * sign, p_raw.exp(),
                                                                      validate_args=False)
    fastvae.set_value_checks("always")
    try:
        with pytest.raises(ValueError, match=r"the posterior's concentration0? \(torch"):
            fastvae.elbo(x, bad_q, dec, likelihood="bernoulli", prior=prior)
        with pytest.raises(ValueError, match=r"the prior's (scale|concentration1) \(torch"):
            fastvae.elbo(x, fastvae.Positive(family, loc, raw), dec, likelihood="bernoulli", prior=bad_prior)
    finally:
        fastvae.set_value_checks("auto")


# -- a torch Normal posterior, and N(0, I) priors given as objects ------------------------


def _normal_priors(dtype, device="cpu"):
    z, o = torch.zeros(L, dtype=dtype, device=device), torch.ones(L, dtype=dtype, device=device)
    return {
        "none": None,
        "StandardNormal": fastvae.priors.StandardNormal(),
        "Normal (L,)": torch.distributions.Normal(z, o),
        "Independent Normal": torch.distributions.Independent(torch.distributions.Normal(z, o), 1),
        "Normal scalars": torch.distributions.Normal(torch.tensor(0.0, dtype=dtype, device=device),
                                                     torch.tensor(1.0, dtype=dtype, device=device)),
        "DiagonalNormal": fastvae.DiagonalNormal(z.clone(), z.clone()),
    }


def _normal_call(fn, x, mu, scale, W, prior, form, enabled):
    """fastvae.<fn> of q = N(mu, scale) given in ``form`` with ``prior``, the plans on or off."""
    q = {"Normal": lambda: torch.distributions.Normal(mu, scale),
         "Independent": lambda: torch.distributions.Independent(torch.distributions.Normal(mu, scale), 1),
         "DiagonalNormal": lambda: fastvae.DiagonalNormal(mu, 2 * scale.log()),
         "tensors": None}[form]
    kw = dict(k=K) if fn == "iwae" else {}
    previous = _plan.ENABLED
    _plan.ENABLED = enabled
    try:
        args = (x, mu, 2 * scale.log(), _decoders(W)["bernoulli"]) if q is None else (x, q(), _decoders(W)["bernoulli"])
        bound = getattr(fastvae, fn)(*args, likelihood="bernoulli", prior=prior,
                                     generator=torch.Generator(mu.device).manual_seed(3), **kw)
    finally:
        _plan.ENABLED = previous
    return bound, torch.autograd.grad(bound, (mu, scale, W))


NORMAL_CASES = ([(dtype, fn, form, "Normal (L,)") for dtype in (torch.float32, torch.float64) for fn in ("elbo", "iwae")
                 for form in ("Normal", "Independent", "DiagonalNormal", "tensors")]
                + [(torch.float64, "elbo", "Normal", prior) for prior in _normal_priors(torch.float64)
                   if prior != "Normal (L,)"])


@pytest.mark.parametrize("dtype, fn, form, prior", NORMAL_CASES)
def test_a_normal_posterior_against_the_standard_prior_takes_the_plans(backend, dtype, fn, form, prior):
    """q a torch Normal (or Independent, or DiagonalNormal) and a prior that is
    N(0, I) in any of its forms take the Gaussian's plan, one per call
    signature, and give the general path's bound and gradients (the KL
    without a prior's terms: to rounding)."""
    name, device = backend
    x, (mu, logvar, W) = _problem(device, dtype)
    scale = (0.5 * logvar.detach()).exp().requires_grad_()
    p = _normal_priors(dtype, device)[prior]
    general, g_grads = _normal_call(fn, x, mu, scale, W, p, form, False)
    _plan.clear()
    for _ in range(2):  # (a prior on a GPU is read at its second call: call twice more)
        bound, grads = _normal_call(fn, x, mu, scale, W, p, form, True)
    assert len(_plan.PLANS) == (1 if name in ("triton", "cpp") else 0)
    if name in ("triton", "cpp"):
        assert next(iter(_plan.PLANS))[0] == fn  # the Gaussian's plan
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound, general, **tol)
    for a, b in zip(grads, g_grads):
        torch.testing.assert_close(a, b, **tol)


def test_priors_that_are_not_the_standard_normal_keep_their_own_path(backend):
    """A prior with another location or scale, a learned one, one of another
    size or on another device is not taken for N(0, I); one written in place
    after a call is read again."""
    _, device = backend
    x, (mu, logvar, W) = _problem(device, torch.float32)
    dec = _decoders(W)["bernoulli"]
    z, o = torch.zeros(L, device=device), torch.ones(L, device=device)
    Normal = torch.distributions.Normal
    q = Normal(mu, (0.5 * logvar).exp())
    others = [Normal(z + 0.5, o), Normal(z, 2 * o), Normal(z.clone().requires_grad_(), o),
              Normal(torch.zeros(L + 1, device=device), 1.0), fastvae.DiagonalNormal(z.clone(), o.clone()),
              torch.distributions.Laplace(z, o)]
    if device != "cpu":
        others.append(Normal(torch.zeros(L), torch.ones(L)))  # on the CPU, q on the GPU: the general path's error
    for p in others:
        for _ in range(2):
            assert objectives._standard_normal_call(q, dec, None, p) is None
    with pytest.raises((ValueError, RuntimeError)):  # the general path's error for the wrong size (not taken for L)
        fastvae.elbo(x, q, dec, likelihood="bernoulli", prior=Normal(torch.zeros(L + 1, device=device), 1.0))
    p = Normal(z.clone(), o.clone())
    if device != "cpu":  # off the CPU a prior is read at its second call, not at its first
        assert objectives._standard_normal_call(q, dec, None, p) is None
    assert objectives._standard_normal_call(q, dec, None, p) is not None
    p.loc.add_(1.0)  # in place: its version changes, and it is read again
    assert objectives._standard_normal_call(q, dec, None, p) is None
    kw = dict(likelihood="bernoulli")
    shifted = fastvae.elbo(x, q, dec, generator=torch.Generator(device).manual_seed(1), prior=p, **kw)
    standard = fastvae.elbo(x, q, dec, generator=torch.Generator(device).manual_seed(1), **kw)
    assert torch.isfinite(shifted) and shifted < standard  # N(1, I) is further from q than N(0, I)


def test_a_prior_off_the_cpu_is_read_at_its_second_call_only():
    """A prior whose parameters are not on the CPU is not read at its first
    call (a prior made anew in every call would stall a GPU's queue on each):
    meta tensors, which cannot be read, stand in for a GPU's here."""
    p = torch.distributions.Normal(torch.zeros(L, device="meta"), torch.ones(L, device="meta"), validate_args=False)
    assert not objectives._standard_normal_prior(p, torch.Size([L]), torch.device("meta"))
    assert objectives._STANDARD_PRIORS[p][1] is None  # seen, not read
    with pytest.raises(RuntimeError, match="meta"):  # the second call reads the values (meta has none)
        objectives._standard_normal_prior(p, torch.Size([L]), torch.device("meta"))


@pytest.mark.full  # 50 s of compiles; test_compile_changes.py changes shapes in the quick tier
@pytest.mark.skipif(INTERPRET, reason="torch.compile runs in the main process")
def test_a_compiled_normal_posterior_takes_the_compiled_plans_as_shapes_change():
    """Under torch.compile, q a torch Normal with the default prior traces
    into the Gaussian's compiled path; the batch size, the latent width, k and
    the dtype change between calls."""
    torch._dynamo.reset()

    def step(x, mu, scale, W, k):
        q = torch.distributions.Normal(mu, scale)
        return fastvae.iwae(x, q, lambda z: z @ W, k=k, likelihood="bernoulli") + fastvae.elbo(
            x, q, lambda z: z @ W, likelihood="bernoulli")

    def inputs(n, width, dtype):
        g = torch.Generator().manual_seed(n)
        x = (torch.rand(n, D, generator=g) > 0.5).to(dtype)
        W = torch.randn(width, D, generator=g, dtype=dtype)
        mu = torch.randn(n, width, generator=g, dtype=dtype).requires_grad_()
        scale = torch.rand(n, width, generator=g, dtype=dtype).add(0.5).requires_grad_()
        return x, mu, scale, W

    compiled = torch.compile(step)
    for n, width, k, dtype in ((3, L, 4, torch.float64), (6, L, 4, torch.float64), (5, L + 2, 2, torch.float64),
                               (4, L, 3, torch.float32)):
        x, mu, scale, W = inputs(n, width, dtype)
        torch.manual_seed(0)
        eager = step(x, mu, scale, W, k)
        e_grads = torch.autograd.grad(eager, (mu, scale))
        torch.manual_seed(0)
        out = compiled(x, mu, scale, W, k)
        grads = torch.autograd.grad(out, (mu, scale))
        tol = dict(rtol=1e-10, atol=1e-10) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, eager, **tol)
        for a, b in zip(grads, e_grads):
            torch.testing.assert_close(a, b, **tol)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(step, backend=record)(*inputs(3, L, torch.float64), 2)
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    # the compiled path's opaque head and tail (fastvae/_opaque.py), twice: nothing of the general path
    assert sum("nonstrict_traceable" in c for c in calls) == 4, calls


def test_the_check_kinds_the_plans_wait_for_are_the_general_paths(monkeypatch):
    """The plans skip the value checks once settled() says their kinds ran:
    those kinds must be the ones the general path's checks run under, or the
    plans would wait for ever (or, misspelled the other way, never)."""
    from fastvae import _value_checks
    from fastvae.ops.bernoulli_likelihood.op import BERNOULLI_CHECKS

    seen = set()
    should_check = _value_checks.should_check

    def spy(kind, t):
        seen.add(kind)
        return should_check(kind, t)

    monkeypatch.setattr(_value_checks, "should_check", spy)
    monkeypatch.setattr(_plan, "ENABLED", False)
    x, (mu, logvar, W) = _problem("cpu", torch.float32)
    dec = _decoders(W)["bernoulli"]
    fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli")
    assert set(BERNOULLI_CHECKS) <= seen, seen
    td = torch.distributions
    laplace = td.Laplace(mu, logvar.exp())
    fastvae.elbo(x, laplace, dec, likelihood="bernoulli", prior=td.Laplace(torch.zeros(L), torch.ones(L)))
    assert set(objectives.FAMILY_CHECKS["location-scale"]) <= seen, seen
    for q, prior in ((td.Exponential(logvar.exp()), td.Exponential(torch.ones(L))),
                     (td.Weibull(mu.exp(), logvar.exp()), td.Weibull(torch.ones(L), torch.ones(L))),
                     (td.Kumaraswamy(mu.exp(), logvar.exp()), td.Beta(torch.ones(L), torch.ones(L)))):
        seen.clear()
        fastvae.elbo(x, q, dec, likelihood="bernoulli", prior=prior)
        assert set(objectives.FAMILY_CHECKS["positive"]) <= seen, (q, seen)


# -- the fused tail: a capability of the likelihood's op record (Op.plan_tail) ------------


def _code_words(path) -> set[str]:
    """The identifiers, attribute names, imported modules and string constants
    of a module's code (not its comments or docstrings), lower-cased."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            words.add(node.module or "")
            words.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return {w.lower() for w in words}


@pytest.mark.skipif(INTERPRET, reason="main-process test (reads the source)")
def test_the_plans_name_no_likelihood():
    """The plans' tail is generic: the likelihoods' own parts live in their
    op folders (Op.plan_tail), so no likelihood's name, nor an import of a
    likelihood op's folder, is left in the plans' code."""
    from pathlib import Path

    from fastvae import _decoder, _registry

    package = Path(_plan.__file__).parent
    likelihoods = set(_decoder.LIKELIHOODS)
    folders = {_registry.FOLDER_OF[op.name] for op in _registry.OPS.values() if op.likelihood is not None}
    for name in ("_plan.py", "_plan_ops.py"):
        words = _code_words(package / name)
        named = sorted(w for w in words for n in likelihoods | folders if n in w)
        assert not named, f"{name} names a likelihood or its op folder: {named}"
    uses = {(place, folder) for place, folder in _registry.USES if place in ("_plan", "_plan_ops")}
    assert not {use for use in uses if use[1] in folders}, uses


@pytest.mark.skipif(INTERPRET, reason="main-process test (reads the registry)")
def test_every_declared_plan_tail_is_its_folders_and_complete():
    """Every op that declares a fused tail names a class of its own folder's
    op.py that has every method the plans call (_spec.FusedTail), built
    from the arguments TailPlan passes."""
    import inspect

    from fastvae import _registry, _spec

    assert _registry.PLAN_TAILS, "no op declares a fused tail"
    params = ["K", "P", "D", "dtype", "out_dtype", "device", "reduce", "iwae", "out_shape", "lead", "placeholder",
              "counters"]
    for likelihood, op in _registry.PLAN_TAILS.items():
        assert op.likelihood == likelihood and isinstance(op.plan_tail, str), op
        tail = _registry.plan_tail(likelihood)
        assert tail.__module__ == f"fastvae.ops.{_registry.FOLDER_OF[op.name]}.op", tail
        for method in _spec.FUSED_TAIL_METHODS:
            assert callable(getattr(tail, method, None)), f"{tail.__name__} lacks {method}"
        assert list(inspect.signature(tail).parameters) == params, tail
    # a likelihood without one: the general tail
    assert "laplace" not in _registry.PLAN_TAILS and "laplace" not in objectives._LEAN_LIKELIHOODS
    assert set(objectives._LEAN_LIKELIHOODS) == set(_registry.PLAN_TAILS)


def _unpack_bits(bits: int) -> float:
    import struct

    return struct.unpack("<d", struct.pack("<q", bits))[0]


class _ToyTail:
    """A likelihood's fused tail written in torch (log p = sum x out over D),
    declared by a toy op record: what TailPlan asks of it and passes it."""

    def __init__(self, K, P, D, dtype, out_dtype, device, reduce, iwae, out_shape, lead, placeholder, counters):
        self.made = dict(K=K, P=P, D=D, dtype=dtype, out_dtype=out_dtype, device=device, reduce=reduce, iwae=iwae,
                         out_shape=out_shape, lead=lead)
        self.programs = 3
        self.launch = _launch.Launch(None, (3,), {})  # never called: the plan's launches() must find it
        self.calls = []

    def fit(self, out):
        return (out, None) if type(out) is torch.Tensor and out.shape == self.made["out_shape"] else None

    def forward(self, x, out, aux, res, term, part, counter, term_bits, divisor):
        self.calls.append(("forward", part, counter, divisor))
        rows = (x * out).sum(-1) + _unpack_bits(term_bits) * term
        res.copy_(rows.sum() / divisor if self.made["reduce"] else rows)

    def backward(self, grad, x, out, aux, dout, dterm, term_bits, divisor):
        self.calls.append(("backward", divisor))
        g = grad / divisor if grad.dim() == 0 else grad
        dout.copy_(g.unsqueeze(-1) * x)
        if dterm is not dout:
            dterm.copy_(_unpack_bits(term_bits) * g.expand(dterm.shape))

    def general_output(self, out, aux):
        return out


@pytest.mark.skipif(INTERPRET, reason="main-process test (a toy tail in torch)")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_likelihood_that_declares_a_tail_gets_the_plans(monkeypatch, reduction):
    """A new likelihood op whose record declares plan_tail (its class in its
    folder's op.py) is served by TailPlan and the compiled path's check with
    no edit outside its folder: the plan makes the op's tail, asks it to fit
    the output, launches it with the shared reduction buffers, beta's bits
    and the divisor, and the bound and gradients are the tail's."""
    import sys
    import types

    from fastvae import _backend, _plan_ops, _registry

    module = types.ModuleType("fastvae.ops.toy_likelihood.op")
    module.ToyTail = _ToyTail
    monkeypatch.setitem(sys.modules, module.__name__, module)
    op = _registry.Op("toy_log_prob", (), "toy", None, likelihood="toy", plan_tail="ToyTail")
    monkeypatch.setitem(_registry.PLAN_TAILS, "toy", op)
    monkeypatch.setitem(_registry.FOLDER_OF, op.name, "toy_likelihood")

    P_, D_ = 5, 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(P_, D_, generator=g, dtype=torch.float64)
    out = torch.randn(P_, D_, generator=g, dtype=torch.float64, requires_grad=True)
    kl = torch.rand(P_, generator=g, dtype=torch.float64, requires_grad=True)
    tail = _plan.TailPlan("toy", 1, P_, D_, torch.float64, torch.device("cpu"), reduction, torch.Size((P_,)), False,
                          None, x.shape)
    toy = tail.lik
    assert type(toy) is _ToyTail and toy.made == dict(
        K=1, P=P_, D=D_, dtype=torch.float64, out_dtype=torch.float64, device=torch.device("cpu"),
        reduce=reduction != "none", iwae=False, out_shape=x.shape, lead=1)
    assert tail.fit(out) == (out, None) and tail.fit(out[:2]) is None
    assert toy.launch in _plan.launches(tail)
    beta = 0.3
    bound = _plan.elbo_tail(x, out, kl, tail, beta, None)
    rows = (x * out).sum(-1) - beta * kl
    want = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(bound, want, rtol=1e-15, atol=0)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(bound, (out, kl), grad)
    torch.testing.assert_close(got, torch.autograd.grad(want, (out, kl), grad), rtol=1e-15, atol=0)
    (_, part, counter, divisor), backward = toy.calls
    assert divisor == (P_ if reduction == "mean" else 1) and backward == ("backward", divisor)
    if reduction != "none":  # the plan's own partial sums (one a program) and arrival counter
        assert part is tail.parts and part.numel() == toy.programs and counter is tail.counter
    # the compiled path serves it where its backend is triton, and no likelihood without a tail
    monkeypatch.setattr(_backend, "backend_for", lambda device, warn=True: "triton")
    assert _plan_ops.serves_tail(x, out.detach(), kl.detach(), "toy", False)
    assert not _plan_ops.serves_tail(x, out.detach(), kl.detach(), "laplace", False)


def test_the_launchers_host_arithmetic_is_tritons():
    """The launchers size grids and tiles with kernels/_common's cdiv and
    next_power_of_2, which give Triton's values without the call cost of its
    constexpr_functions (a few us a launch on the host): the same values from
    0 up, and no launcher's host code calls Triton's own."""
    import ast
    from pathlib import Path

    triton = pytest.importorskip("triton")
    from fastvae.kernels._common import cdiv, next_power_of_2

    for n in [*range(0, 4100), *(2 ** k + d for k in range(13, 40) for d in (-1, 0, 1))]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    root = Path(__file__).resolve().parents[1]
    called = []
    for path in [*root.glob("fastvae/ops/*/triton.py"), *root.glob("kernels/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "triton"
                    and node.func.attr in ("cdiv", "next_power_of_2")):
                called.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not called, called


def test_plans_keep_one_element_templates(backend):
    """A plan outlives its call (it stays cached for its signature), so the
    templates it allocates its outputs from hold one element, not an output's
    memory: a template of z at k = 5000 samples would be that many samples'
    memory, held for as long as the plan. The outputs the templates give are
    full, contiguous tensors: the bounds equal the general path's."""
    from helpers import assert_plans_keep_one_element_templates

    name, device = backend
    if name == "reference":
        pytest.skip("the reference backend takes no plans")
    _plan.clear()
    x, (mu, logvar, W) = _problem(device, torch.float32)
    dec = _decoders(W)["bernoulli"]
    fx, (loc, raw, fW), (p_loc, p_raw), build = _family_problem(device, torch.float32, "laplace")
    fdec = _decoders(fW)["bernoulli"]
    k = 64  # the samples' outputs (K, B, ...) are the largest a plan allocates

    def bounds():
        g = torch.Generator(device)
        q, p = build(loc, raw, p_loc, p_raw)
        out = [fastvae.iwae(x, mu, logvar, dec, k=k, likelihood="bernoulli", generator=g.manual_seed(1)),
               fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli", generator=g.manual_seed(2)),
               fastvae.elbo(fx, q, fdec, prior=p, likelihood="bernoulli", generator=g.manual_seed(3))[None]]
        grads = torch.autograd.grad(sum(b.sum() for b in out), (mu, logvar, W, loc, raw))
        return [*out, *grads]

    planned = bounds()
    assert len(_plan.PLANS) >= 2 and None not in _plan.PLANS.values()
    stores = [_plan.PLANS]
    if name == "triton":  # the ops' own eager plans: the Bernoulli likelihood's, its split partial sums included
        from fastvae.ops.bernoulli_likelihood import op as bernoulli_op
        logits = torch.randn(k, *x.shape, device=device, requires_grad=True)
        bernoulli_op.PLANS.clear()
        torch.autograd.grad(fastvae.bernoulli_log_prob(x, logits).sum(), logits)
        (plan,) = bernoulli_op.PLANS.values()
        for entry in plan._backward.values():
            assert entry[2].untyped_storage().nbytes() <= entry[2].element_size()
        stores.append(bernoulli_op.PLANS)
    assert assert_plans_keep_one_element_templates(stores) >= (8 if name == "triton" else 3)
    previous = _plan.ENABLED
    _plan.ENABLED = False
    try:
        general = bounds()
    finally:
        _plan.ENABLED = previous
    for a, b in zip(planned, general, strict=True):
        assert a.is_contiguous() and a.shape == b.shape and _same(a, b)
