"""mixture_log_prob against torch.distributions' MixtureSameFamily in float64,
per backend (the root conftest.py): values and the gradients of z, means,
logvars and logits (the error scales from the op's own oracle,
fastvae/ops/mixture_log_prob/__init__.py), and its cases of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import fastvae
from fastvae.ops import mixture_log_prob as formulas
from fastvae.ops.mixture_log_prob import op as mixture_module
from fastvae.ops.mixture_log_prob.op import MixtureLogProb, mixture_log_prob_backward_op, mixture_log_prob_op
from fastvae.ops.sample_normal.op import SampleNormal

from conftest import INTERPRET
from helpers import (
    RTOL,
    assert_close,
    assert_compiled_matches_eager,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
)

# L: 1, odd, powers of two and +-1, past one GPU block (32) and one
# interpreter block (256)
LATENT = [1, 2, 3, 7, 32, 33, 100, 300]
# U: one component, odd counts, past one Triton block (16) and one C++ chunk (64)
COMPONENTS = [1, 2, 5, 17, 70]


@st.composite
def problems(draw):
    L = draw(st.sampled_from(LATENT))
    U = draw(st.sampled_from(COMPONENTS))
    batch = draw(st.sampled_from([(), (1,), (6,), (3, 5), (2, 40)]))  # () and a (K, B) pair included
    while math.prod(batch) * U * L > 40000 and U > 1:
        U = max(1, U // 4)
    return dict(
        L=L, U=U, batch=batch, logits=draw(st.booleans()), lv_bound=draw(st.sampled_from([1.0, 5.0, 30.0])),
        far=draw(st.sampled_from(["none", "one", "all"])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(p, dtype, device):
    """z (*batch, L) drawn from the mixture (a few rows elsewhere), means,
    logvars (U, L), logits (U,) or None; far: "one" moves component 0 far
    from every z, "all" moves z far from every component."""
    g = torch.Generator().manual_seed(p["seed"])
    U, L = p["U"], p["L"]
    means = torch.randn(U, L, generator=g, dtype=torch.float64) * 2
    logvars = (torch.rand(U, L, generator=g, dtype=torch.float64) * 2 - 1) * p["lv_bound"]
    logits = torch.randn(U, generator=g, dtype=torch.float64) * 2 if p["logits"] else None
    n = math.prod(p["batch"])
    which = torch.randint(0, U, (n,), generator=g)
    eps = torch.randn(n, L, generator=g, dtype=torch.float64)
    z = means[which] + torch.exp(0.5 * logvars[which]) * eps
    z[::4] = torch.randn(z[::4].shape, generator=g, dtype=torch.float64) * 3  # between components
    if p["far"] == "one":
        means[0] += 1e4
    elif p["far"] == "all":
        z += 300.0
    z = z.reshape(*p["batch"], L)
    tensors = [z, means, logvars] + ([logits] if logits is not None else [])
    return [t.to(dtype).to(device).requires_grad_() for t in tensors]


def oracle(z, means, logvars, logits=None):
    """torch.distributions' mixture log density (float64 inputs, differentiable)."""
    if logits is None:
        logits = torch.zeros(means.shape[0], dtype=means.dtype)
    comp = Independent(Normal(means, torch.exp(0.5 * logvars)), 1)
    return MixtureSameFamily(Categorical(logits=logits), comp).log_prob(z)


def scales(z, means, logvars, logits, g, dtype=torch.float64):
    """Magnitudes of the terms behind the output and each gradient (float64,
    z (N, L), g (N,)): a term's rounding error is relative to its own size,
    and it enters the result with its weight w. A weight below the smallest
    normal number of ``dtype`` may be flushed to 0 (the C++ float32 exp
    does): each gradient term may be off by that much times its factors."""
    U, L = means.shape
    term = formulas.mixture_terms(z, means, logvars, logits)  # (N, U)
    out = torch.logsumexp(term, -1)
    w = torch.exp(term - out[:, None])
    log_w = formulas._mixture_log_weights(logits, U, z.dtype, z.device)
    d = z[:, None, :] - means  # (N, U, L)
    iv = torch.exp(-logvars)
    mag = log_w.abs() + 0.5 * (logvars.abs().sum(-1) + L * math.log(2 * math.pi) + (d * d * iv).sum(-1))
    out_scale = (w * mag).sum(-1) + out.abs()
    flush = torch.finfo(dtype).tiny / RTOL[dtype]  # a flushed weight's error, relative to the tolerance
    a = g.abs()[:, None] * (w * (1 + mag + out_scale[:, None]) + flush)  # (N, U): |g w| and its error's factor
    dz = (a[..., None] * d.abs() * iv).sum(1)
    dmeans = (a[..., None] * d.abs() * iv).sum(0)
    dlogvars = 0.5 * (a[..., None] * (d * d * iv + 1)).sum(0)
    softmax = torch.exp(log_w)
    dlogits = a.sum(0) + softmax * g.abs().sum()
    return out_scale, dz, dmeans, dlogvars, dlogits


def check_against_oracle(inputs, g, dtype):
    """Values and gradients of fastvae.mixture_log_prob(*inputs) against the oracle."""
    out = fastvae.mixture_log_prob(*inputs)
    z = inputs[0]
    assert out.shape == z.shape[:-1] and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(out, inputs, g.to(dtype).to(out.device))
    args64 = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = oracle(*args64)
    g64 = g.to(dtype).double()
    refs = torch.autograd.grad(ref, args64, g64)
    z64, means64, lv64 = (t.detach() for t in args64[:3])
    logits64 = args64[3].detach() if len(args64) > 3 else None
    L = means64.shape[1]
    s = scales(z64.reshape(-1, L), means64, lv64, logits64, g64.reshape(-1), dtype)
    assert_close(out, ref.detach(), s[0].reshape(ref.shape), "out")
    assert_close(grads[0], refs[0], s[1].reshape(z.shape), "dz")
    for name, grad, r, scale in zip(("dmeans", "dlogvars", "dlogits"), grads[1:], refs[1:], s[2:]):
        assert_close(grad, r, scale, name)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(p=problems())
def test_forward_backward_match_torch_distributions(backend, dtype, p):
    _, device = backend
    inputs = make(p, dtype, device)
    g = torch.randn(p["batch"], generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    out = check_against_oracle(inputs, g, dtype)
    assert torch.isfinite(out).all()


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems())
def test_half_precision_matches_torch_distributions(backend, dtype, p):
    """The Hypothesis problems in half precision: a float32 log-density against
    the float64 one of the same rounded inputs, gradients in the inputs' dtype."""
    if dtype == torch.float16:  # the gradients (1/var, far-away z) must fit float16's 65504
        p = dict(p, lv_bound=min(p["lv_bound"], 5.0), far="none")
    _, device = backend
    inputs = make(p, dtype, device)
    g = torch.randn(p["batch"], generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    assert torch.isfinite(check_against_oracle(inputs, g, dtype)).all()


@pytest.fixture(params=[None, 3], ids=["one-pass", "split-3"])
def row_splits(request, monkeypatch):
    """How the Triton parameter kernel splits its sums over rows: None (the
    launcher's choice: one split under the interpreter) or 3 forced, whose
    partials the last program of each component block adds (the GPU's path).
    Other backends ignore it."""
    common = pytest.importorskip("fastvae.kernels._common")
    monkeypatch.setattr(common, "FORCE_SPLITS", request.param)
    return request.param


@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("L", [3, 300])
def test_parameter_gradients_sum_over_rows_in_one_pass_or_split(backend, row_splits, logits, L):
    """dmeans, dlogvars and dlogits (the logits' softmax included) written by
    the parameter kernel itself, in one split or several, against the oracle;
    L = 300 runs past one interpreter block (dz and the partial sums kept in
    memory the programs own). A second call gives the same bits."""
    _, device = backend
    p = dict(L=L, U=17, batch=(2, 100), logits=logits, lv_bound=3.0, far="none", seed=L)
    inputs = make(p, torch.float32, device)
    g = torch.randn(p["batch"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    first = [check_against_oracle(inputs, g, torch.float32)]
    first += torch.autograd.grad(fastvae.mixture_log_prob(*inputs), inputs, g.float().to(device))
    again = [check_against_oracle(inputs, g, torch.float32)]
    again += torch.autograd.grad(fastvae.mixture_log_prob(*inputs), inputs, g.float().to(device))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.full_interpreted  # the cpp backend's threads; 16 s interpreted
def test_many_rows_on_several_threads(backend):
    """Enough rows for many C++ tasks over every thread (per-thread partial
    sums), many Triton row blocks and a row split of the parameter kernel."""
    _, device = backend
    p = dict(L=33, U=70, batch=(3, 1000), logits=True, lv_bound=3.0, far="none", seed=5)
    inputs = make(p, torch.float32, device)
    g = torch.randn(p["batch"], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    check_against_oracle(inputs, g, torch.float32)


def test_far_component_does_not_underflow(backend):
    """A component 1e4 away adds nothing; z 300 away from every component still
    has a finite log density (each density alone underflows to 0)."""
    _, device = backend
    for dtype in (torch.float32, torch.float64):
        means = torch.tensor([[0.0, 0.0, 0.0], [1e4, 1e4, 1e4]], dtype=torch.float64)
        logvars = torch.zeros(2, 3, dtype=torch.float64)
        z = torch.tensor([[0.5, -0.5, 1.0], [300.0, 300.0, -300.0]], dtype=torch.float64)
        inputs = [t.to(dtype).to(device).requires_grad_() for t in (z, means, logvars)]
        out = check_against_oracle(inputs, torch.tensor([1.0, -2.0], dtype=torch.float64), dtype)
        assert torch.isfinite(out).all()
        near = Independent(Normal(means[0], 1.0), 1).log_prob(z[0]) + math.log(0.5)
        assert abs(out[0].item() - near.item()) < 1e-5
        assert out[1].item() < -1e5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logvars(backend, dtype):
    """logvars of -30 and +30 (variances 1e-13 and 1e13) in one mixture."""
    _, device = backend
    g = torch.Generator().manual_seed(7)
    means = torch.randn(4, 5, generator=g, dtype=torch.float64)
    logvars = torch.tensor([-30.0, 30.0, -30.0, 30.0], dtype=torch.float64)[:, None].expand(4, 5).contiguous()
    z = torch.cat([means[:1] + 1e-6 * torch.randn(3, 5, generator=g, dtype=torch.float64),
                   torch.randn(4, 5, generator=g, dtype=torch.float64) * 1e5])
    logits = torch.randn(4, generator=g, dtype=torch.float64)
    inputs = [t.to(dtype).to(device).requires_grad_() for t in (z, means, logvars, logits)]
    out = check_against_oracle(inputs, torch.randn(7, generator=g, dtype=torch.float64), dtype)
    assert torch.isfinite(out).all()


def test_one_component_is_a_diagonal_normal(backend):
    _, device = backend
    g = torch.Generator().manual_seed(8)
    means, logvars = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    logits = torch.randn(1, generator=g, requires_grad=True)
    z = torch.randn(3, 4, 6, generator=g)
    out = fastvae.mixture_log_prob(z.to(device), means.to(device), logvars.to(device), logits.to(device))
    normal = Independent(Normal(means[0].double(), torch.exp(0.5 * logvars[0].double())), 1).log_prob(z.double())
    assert_close(out, normal, normal.abs() + 1, "out")
    (dlogits,) = torch.autograd.grad(out.sum(), logits)
    assert dlogits.abs().item() < 1e-4  # the weight is 1 whatever the logit


def test_equal_weights_match_zero_logits(backend):
    _, device = backend
    g = torch.Generator().manual_seed(9)
    z, means, logvars = (torch.randn(s, generator=g).to(device) for s in ((10, 7), (5, 7), (5, 7)))
    a = fastvae.mixture_log_prob(z, means, logvars)
    b = fastvae.mixture_log_prob(z, means, logvars, torch.full((5,), 3.25, device=device))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_minus_inf_logit_drops_a_component(backend):
    """A component with logit -inf has weight 0: no NaN anywhere, and its
    gradients are 0."""
    _, device = backend
    g = torch.Generator().manual_seed(10)
    means, logvars = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z = torch.randn(6, 4, generator=g)
    logits = torch.tensor([0.3, -math.inf, -0.2])
    inputs = [t.to(device).requires_grad_() for t in (z, means, logvars, logits)]
    out = fastvae.mixture_log_prob(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    keep = [0, 2]
    two = fastvae.mixture_log_prob(z.to(device), means[keep].to(device), logvars[keep].to(device),
                                   logits[keep].to(device))
    torch.testing.assert_close(out, two, rtol=1e-5, atol=1e-5)
    for grad in grads:
        assert not torch.isnan(grad).any()
    assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all() and grads[3][1] == 0


def test_minus_inf_everywhere_gives_minus_inf_and_zero_gradients(backend):
    """z = inf: every term is -inf, so is the output, and no gradient is NaN."""
    _, device = backend
    z = torch.tensor([[math.inf, 0.0], [0.5, 0.5]], device=device, requires_grad=True)
    means = torch.zeros(3, 2, device=device, requires_grad=True)
    logvars = torch.zeros(3, 2, device=device, requires_grad=True)
    logits = torch.zeros(3, device=device, requires_grad=True)
    out = fastvae.mixture_log_prob(z, means, logvars, logits)
    assert out[0].item() == -math.inf and math.isfinite(out[1].item())
    dz, dmeans, dlogvars, dlogits = torch.autograd.grad(out, (z, means, logvars, logits), torch.ones(2, device=device))
    assert (dz[0] == 0).all()
    for grad in (dz, dmeans, dlogvars, dlogits):
        assert not torch.isnan(grad).any()


def test_only_the_requested_gradients(backend):
    """Each input alone requires grad: the same gradient as with all of them."""
    _, device = backend
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in ((9, 5), (4, 5), (4, 5), (4,))]
    leaves = [t.clone().requires_grad_() for t in base]
    full = torch.autograd.grad(fastvae.mixture_log_prob(*leaves).sum(), leaves)
    for i in range(4):
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate(base)]
        (alone,) = torch.autograd.grad(fastvae.mixture_log_prob(*args).sum(), args[i])
        torch.testing.assert_close(alone, full[i], rtol=1e-12, atol=1e-12)


def test_non_contiguous(backend):
    _, device = backend
    g = torch.Generator().manual_seed(12)
    z = torch.randn(6, 3, 4, generator=g).to(device).transpose(0, 2)  # (4, 3, 6)
    means = torch.randn(6, 5, generator=g).to(device).t()  # (5, 6)
    logvars = torch.randn(6, 5, generator=g).to(device).t()
    logits = torch.randn(10, generator=g).to(device)[::2]
    assert not z.is_contiguous() and not means.is_contiguous() and not logits.is_contiguous()
    out = fastvae.mixture_log_prob(z, means, logvars, logits)
    assert torch.equal(out, fastvae.mixture_log_prob(z.contiguous(), means.contiguous(), logvars.contiguous(),
                                                     logits.contiguous()))


@pytest.mark.parametrize("zshape,L", [((0, 4), 4), ((3, 0, 4), 4), ((5, 0), 0)])
def test_empty(backend, zshape, L):
    _, device = backend
    z = torch.zeros(zshape, device=device, requires_grad=True)
    means = torch.zeros(3, L, device=device, requires_grad=True)
    logvars = torch.zeros(3, L, device=device, requires_grad=True)
    logits = torch.zeros(3, device=device, requires_grad=True)
    out = fastvae.mixture_log_prob(z, means, logvars, logits)
    assert out.shape == zshape[:-1]
    if L == 0:  # the density of a 0-dim vector is 1
        assert torch.equal(out, torch.zeros(zshape[:-1], device=device))
    grads = torch.autograd.grad(out.sum(), (z, means, logvars, logits))
    for grad, t in zip(grads, (z, means, logvars, logits)):
        assert grad.shape == t.shape and not torch.isnan(grad).any()
        assert (grad.abs() < 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """Half-precision z and components on every backend: a float32 log-density
    equal to the float64 one of the same rounded inputs to float32 error."""
    _, device = backend
    p = dict(L=37, U=5, batch=(4, 3), logits=True, lv_bound=3.0, far="none", seed=1)
    inputs = make(p, dtype, device)
    out = fastvae.mixture_log_prob(*inputs)
    assert out.dtype == torch.float32
    args64 = [t.detach().double().cpu() for t in inputs]
    s = scales(args64[0].reshape(-1, 37), *args64[1:], torch.ones(12, dtype=torch.float64))[0]
    assert_close(out, oracle(*args64), s.reshape(4, 3), "out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L", [5, 300])
def test_half_precision_gradients(backend, dtype, L):
    """Gradients in half precision: summed in float32 and rounded once (for
    L = 300, past one interpreter block, dz is summed in a float32 scratch and
    cast at the end)."""
    _, device = backend
    p = dict(L=L, U=5, batch=(4, 3), logits=True, lv_bound=1.0, far="none", seed=2)
    inputs = make(p, dtype, device)
    g = torch.randn(p["batch"], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check_against_oracle(inputs, g, dtype)


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_()
               for s in ((2, 3, 4), (5, 4), (5, 4), (5,))]
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(MixtureLogProb.apply, tuple(tensors), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(lambda *a: MixtureLogProb.apply(*a, None), tuple(tensors[:3]), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    z = torch.randn(7, 5, device=device, requires_grad=True)
    means = torch.randn(3, 5, device=device, requires_grad=True)
    logvars = torch.randn(3, 5, device=device, requires_grad=True)
    logits = torch.randn(3, device=device, requires_grad=True)
    for lg in (logits, None):
        torch.library.opcheck(mixture_log_prob_op, (z, means, logvars, lg))
        out = mixture_log_prob_op(z.detach(), means.detach(), logvars.detach(), lg)
        g = torch.randn(7, device=device)
        for need in ((True, True, True, True), (True, False, False, False), (False, True, False, True),
                     (False, False, True, False)):
            torch.library.opcheck(mixture_log_prob_backward_op,
                                  (g, z.detach(), means.detach(), logvars.detach(),
                                   None if lg is None else lg.detach(), out, *need))


def test_errors_on_bad_input(backend):
    _, device = backend
    z, means = torch.zeros(4, 3, device=device), torch.zeros(5, 3, device=device)
    with pytest.raises(ValueError, match=r"means must be a 2-d \(U, L\) tensor, got shape \(3,\)"):
        fastvae.mixture_log_prob(z, means[0], means[0])
    with pytest.raises(ValueError, match=r"means has shape \(5, 3\), logvars has shape \(5, 2\)"):
        fastvae.mixture_log_prob(z, means, torch.zeros(5, 2, device=device))
    with pytest.raises(ValueError, match=r"z of shape \(4, 2\) must end in the latent dim L=3"):
        fastvae.mixture_log_prob(torch.zeros(4, 2, device=device), means, means)
    with pytest.raises(ValueError, match=r"logits must have shape \(5,\).*got \(4,\)"):
        fastvae.mixture_log_prob(z, means, means, torch.zeros(4, device=device))
    with pytest.raises(ValueError, match=r"logits must have shape \(5,\).*got \(1, 5\)"):
        fastvae.mixture_log_prob(z, means, means, torch.zeros(1, 5, device=device))
    with pytest.raises(ValueError, match="at least one component"):
        fastvae.mixture_log_prob(z, means[:0], means[:0])
    with pytest.raises(ValueError, match="z must have a last"):
        fastvae.mixture_log_prob(torch.zeros((), device=device), means, means)
    assert fastvae.mixture_log_prob(z, means, means.double()).dtype == torch.float64  # mixed dtypes: float64 wins
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        fastvae.mixture_log_prob(z, means, means, torch.zeros(5, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="means must be a torch.Tensor"):
        fastvae.mixture_log_prob(z, [[0.0] * 3], means)


main_process_only = pytest.mark.skipif(INTERPRET, reason="main-process tests (cpp backend)")


@main_process_only
def test_cpp_boundary_checks():
    from fastvae import _C

    z, means, out = torch.zeros(4, 3).numpy(), torch.zeros(2, 3).numpy(), torch.zeros(4).numpy()
    with pytest.raises(ValueError, match="out: expected shape"):
        _C.mixture_log_prob_forward(z, means, means, None, torch.zeros(3).numpy(), 1)
    with pytest.raises(ValueError, match="z: expected shape"):
        _C.mixture_log_prob_forward(torch.zeros(4, 2).numpy(), means, means, None, out, 1)
    with pytest.raises(ValueError, match="logits: expected shape"):
        _C.mixture_log_prob_forward(z, means, means, torch.zeros(3).numpy(), out, 1)
    with pytest.raises(ValueError, match="at least one component"):
        _C.mixture_log_prob_forward(z, means[:0], means[:0], None, out, 1)
    with pytest.raises(TypeError, match="logvars: expected dtype float32"):
        _C.mixture_log_prob_forward(z, means, means.astype("float64"), None, out, 1)
    with pytest.raises(ValueError, match="dlogits needs logits"):
        _C.mixture_log_prob_backward(out, z, means, means, None, out, None, None, None, torch.zeros(2).numpy(), 1)
    with pytest.raises(ValueError, match="dmeans: expected shape"):
        _C.mixture_log_prob_backward(out, z, means, means, None, out, None, z.copy(), None, None, 1)


def vamp_loss(enc, dec, pseudo, x, seed):
    """A VampPrior-style ELBO: the prior is the mixture of the encoder's
    posteriors at pseudo-inputs."""
    mu, logvar = enc(x).chunk(2, dim=-1)
    pmu, plv = enc(pseudo).chunk(2, dim=-1)
    z, _ = SampleNormal.apply(mu, logvar, seed, 3)
    log_q = -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar).sum(-1)
    log_p = fastvae.mixture_log_prob(z, pmu, plv, pseudo.sum(-1))
    recon = -0.5 * ((dec(z) - x) ** 2).sum(-1)
    return -(recon + log_p - log_q).mean()


@main_process_only
def test_compiles_fullgraph():
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
    x, pseudo, seed = torch.randn(5, 6), torch.randn(7, 6), torch.tensor(99)
    params = list(enc.parameters()) + list(dec.parameters())
    assert_compiled_matches_eager(vamp_loss, (enc, dec, pseudo, x, seed), params, atol=1e-6, grad_rtol=1e-5)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing. A not_twice op has no double_backward_cases: its named error
# is tests/test_double_backward.py's test_mixture_log_prob_raises_...


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes."""
    return op(fastvae.mixture_log_prob, (K, B, L), (3, L), (3, L))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (the parameters' gradients: sums
    over rows)."""
    z, means, logvars, logits = leaf(20000, 8), leaf(10, 8), leaf(10, 8), leaf(10)
    return [lambda: run(fastvae.mixture_log_prob, z, means, logvars, logits)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    zm, means, logvars = leaf(6, 4), leaf(3, 4), leaf(3, 4)
    return lambda: run(fastvae.mixture_log_prob, zm, means, logvars)


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(mixture_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, U, L", [(1, 1, 1), (200, 5, 3), (20, 3, 300)])
@pytest.mark.parametrize("logits", [True, False])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, row_splits, dtype, N,
                                                                    U, L, logits):
    """fastvae::mixture_log_prob and its backward called as a compiled graph
    calls them (a mixture prior's density: z (N, L), the components (U, L),
    the logits (U,) or none, contiguous): on the triton backend from a plan
    of the call's signature (OP_PLANS), with the general launch's density
    and every gradient bit for bit, for several sets of gradients (dz alone,
    the parameters' alone, the logits' alone, all), from the first call and
    the second; one component, odd sizes, L past one block, the parameters'
    sums split over rows (200 rows: four of the interpreter's 64-row blocks);
    half precision, a strided z and a gradient of
    another dtype take the general launch and make no plan."""
    mixture_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(N + U + L)

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    z, means, logvars = rnd(N, L), rnd(U, L), 0.5 * rnd(U, L)
    lg = rnd(U) if logits else None
    grad_out = rnd(N)
    needs = [(True, True, True, True), (True, False, False, False), (False, True, True, False),
             (False, False, False, True), (True, False, True, False)]

    def calls():
        out = mixture_log_prob_op(z, means, logvars, lg)
        return [out, *(d for need in needs if any(need[:3]) or logits
                       for d in mixture_log_prob_backward_op(grad_out, z, means, logvars, lg, out, *need))]

    op_plans_match_the_general_launch(monkeypatch, mixture_module, calls)
    (plan,) = mixture_module.OP_PLANS.values()
    assert len(plan._backward) == (5 if logits else 4)
    if row_splits and N > 128:  # the parameters' sums in split partials
        assert all(entry[2][1] > 1 for entry in plan._backward.values() if entry[2] is not None)
    mixture_module.OP_PLANS.clear()
    out = mixture_log_prob_op(z.half(), means.half(), logvars.half(), None if lg is None else lg.half())
    if L > 1:
        mixture_log_prob_op(torch.cat([z, z], -1)[:, ::2], means, logvars, lg)
    out = mixture_log_prob_op(z, means, logvars, lg)
    mixture_module.OP_PLANS.clear()
    other = torch.float64 if dtype is torch.float32 else torch.float32
    mixture_log_prob_backward_op(grad_out.to(other), z, means, logvars, lg, out, True, True, True, True)
    assert len(mixture_module.OP_PLANS) == 0
