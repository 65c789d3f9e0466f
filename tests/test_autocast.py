"""Every objective and evaluation function under torch.autocast("cpu",
torch.bfloat16): float32 bounds, KL terms and log-weights, gradients
in each input's dtype, and the bound equal to the float32 bound computed on the
same half-precision-rounded encoder and decoder outputs, to float32
accumulation error (not to bfloat16 rounding).

The models are linear maps whose float32 twin is written out: under autocast a
Linear casts its input and weights to bfloat16 and returns bfloat16, which is
exactly ``F.linear(x.bfloat16(), W.bfloat16(), b.bfloat16())``; the twin
returns that, widened to float32, so the float32 run sees the same rounded
numbers and differs only in how fastvae computes with them."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import DiagonalNormal, TrilNormal
from fastvae.objectives import DREG_COMPILES
from fastvae.priors import MixtureOfGaussians, VampPrior

B, D, L = 6, 23, 4
HALF = torch.bfloat16
# Under the Triton interpreter (about 1 ms a program) the kernels run on a
# subset: each estimator once per posterior, every prior with the diagonal one.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Model:
    def __init__(self, device, gaussian_var=False, half=HALF):
        g = torch.Generator().manual_seed(0)
        self.half = half
        self.enc = torch.nn.Linear(D, 2 * L).to(device)
        out = 2 * D if gaussian_var else D
        self.dec = torch.nn.Linear(L, out).to(device)
        with torch.no_grad():
            for p in (*self.enc.parameters(), *self.dec.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.gaussian_var = gaussian_var

    def _rounded(self, layer, t):
        h = self.half
        return F.linear(t.to(h), layer.weight.to(h), layer.bias.to(h)).float()

    def encode(self, x, half):
        h = self.enc(x) if half else self._rounded(self.enc, x)
        return h[..., :L], h[..., L:].clamp(-3, 3)

    def decode(self, z, half):
        out = self.dec(z) if half else self._rounded(self.dec, z)
        return (out[..., :D], out[..., D:].clamp(-3, 3)) if self.gaussian_var else out

    def parameters(self):
        return [*self.enc.parameters(), *self.dec.parameters()]


def data(device):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(B, D, generator=g) > 0.5).float().to(device)


def prior_of(kind, model, device):
    if kind == "standard":
        return None
    if kind == "diagonal":
        return DiagonalNormal(torch.full((L,), 0.3, device=device), torch.full((L,), -0.5, device=device))
    if kind == "mixture":
        g = torch.Generator().manual_seed(2)
        return MixtureOfGaussians(torch.randn(3, L, generator=g).to(device), torch.zeros(3, L, device=device),
                                  torch.zeros(3, device=device))
    pseudo = torch.rand(3, D, generator=torch.Generator().manual_seed(3)).to(device)
    return VampPrior(lambda u: model.encode(u, torch.is_autocast_enabled(torch.device(device).type)), pseudo)


def run_both(device, objective, half_dtype=HALF, **kw):
    """(value under autocast, value in float32 on the rounded outputs), same
    seed; the autocast run also backpropagates and checks gradient dtypes."""
    posterior = kw.pop("posterior", "diagonal")
    likelihood = kw.pop("likelihood", "bernoulli")
    model = Model(device, gaussian_var=likelihood == "gaussian_var", half=half_dtype)
    likelihood = "gaussian" if likelihood.startswith("gaussian") else likelihood
    x = data(device) if likelihood == "bernoulli" else \
        torch.randn(B, D, generator=torch.Generator().manual_seed(4)).to(device)
    prior_kind = kw.pop("prior", "standard")
    values = []
    for half in (True, False):
        torch.manual_seed(7)
        with torch.autocast(torch.device(device).type, half_dtype, enabled=half):
            mu, logvar = model.encode(x, half)
            if posterior == "tril":
                S = torch.diag_embed(torch.exp(0.5 * logvar.float())) + 0.1 * torch.ones(L, L, device=device).tril(-1)
                S = S.to(half_dtype) if half else S.to(half_dtype).float()  # the same rounded numbers in both runs
                q = TrilNormal(mu, S)
                args = (x, q, lambda z, h=half: model.decode(z, h))
            else:
                args = (x, mu, logvar, lambda z, h=half: model.decode(z, h))
            out = objective(*args, likelihood=likelihood, prior=prior_of(prior_kind, model, device), **kw)
        values.append(out)
        if half:
            bound = out if isinstance(out, torch.Tensor) else out[0]
            assert bound.dtype == torch.float32
            grads = torch.autograd.grad(bound.sum(), model.parameters())
            assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    return values


def close(a, b, what):
    """float32 accumulation error of a sum of O(D) terms of O(1): a few ulp of
    the terms' size, far below bfloat16's step (2**-8 relative)."""
    assert a.dtype == torch.float32 and b.dtype == torch.float32, what
    assert torch.isfinite(a).all(), what
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * D, msg=what)


OBJECTIVES = [
    ("elbo", dict()),
    ("elbo", dict(n_samples=3)),
    ("elbo", dict(n_samples=2, likelihood="gaussian")),
    ("elbo", dict(n_samples=2, likelihood="gaussian_var")),
    ("elbo", dict(beta=0.5, free_bits=0.1)),
    ("iwae", dict(k=5)),
    ("iwae", dict(k=5, estimator="dreg")),
    ("iwae", dict(k=5, estimator="stl")),
    ("iwae", dict(k=5, alpha=0.5)),
    ("iwae", dict(k=5, alpha=1.0)),
    ("iwae", dict(k=3, likelihood="gaussian_var", estimator="dreg")),
]


@pytest.mark.parametrize("prior", ["standard", "diagonal", "mixture", "vamp"])
@pytest.mark.parametrize("posterior", ["diagonal", "tril"])
@pytest.mark.parametrize("name,kw", OBJECTIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OBJECTIVES)])
def test_objectives_under_cpu_autocast(name, kw, posterior, prior):
    if kw.get("free_bits") and (posterior == "tril" or prior in ("mixture", "vamp")):
        pytest.skip("free bits need a per-dimension analytic KL")
    if INTERPRET and prior != "standard" and (posterior == "tril" or name != "iwae"):
        pytest.skip("the interpreter run's subset (see INTERPRET)")
    a, b = run_both("cpu", getattr(fastvae, name), reduction="none", posterior=posterior, prior=prior, **kw)
    close(a, b, f"{name} {kw}")


@pytest.mark.parametrize("posterior", ["diagonal", "tril"])
@pytest.mark.parametrize("prior", ["standard", "mixture"])
def test_terms_under_cpu_autocast(posterior, prior):
    a, b = run_both("cpu", fastvae.elbo_terms, reduction="none", n_samples=2, posterior=posterior, prior=prior)
    for name in ("elbo", "reconstruction", "kl"):
        close(getattr(a, name), getattr(b, name), name)
    a, b = run_both("cpu", fastvae.iwae_terms, reduction="none", k=4, posterior=posterior, prior=prior)
    for name in ("bound", "reconstruction", "kl", "ess", "log_weights"):
        close(getattr(a, name), getattr(b, name), name)


@pytest.mark.parametrize("fn", ["log_likelihood", "evaluate", "reconstruction_probability"])
@pytest.mark.parametrize("posterior", ["diagonal", "tril"])
def test_evaluation_under_cpu_autocast(fn, posterior):
    model = Model("cpu")
    x = data("cpu")

    def encode(half):
        def enc(xx):
            mu, logvar = model.encode(xx, half)
            if posterior == "tril":
                S = torch.diag_embed(torch.exp(0.5 * logvar.float())).to(HALF)
                return TrilNormal(mu, S if half else S.float())
            return mu, logvar
        return enc

    results = []
    for half in (True, False):
        with torch.autocast("cpu", HALF, enabled=half):
            kw = dict(generator=torch.Generator().manual_seed(9), likelihood="bernoulli")
            if fn == "reconstruction_probability":
                kw["n_samples"] = 7
            else:
                kw["k"] = 7
            if fn == "evaluate":
                kw["chunk_size"] = 3
            data_arg = [x[:4], x[4:]] if fn == "evaluate" else x  # evaluate takes batches
            out = getattr(fastvae, fn)(data_arg, encode(half), lambda z, h=half: model.decode(z, h), **kw)
        results.append(out)
    a, b = results
    if isinstance(a, torch.Tensor):
        close(a, b, fn)
    else:
        close(a.per_example, b.per_example, f"{fn}.per_example")
        assert abs(a.log_likelihood - b.log_likelihood) <= 2e-5 * D


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@pytest.mark.parametrize("half_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", OBJECTIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OBJECTIVES)])
def test_objectives_under_cuda_autocast(name, kw, half_dtype):
    """The same equality on the Triton kernels under CUDA autocast, bfloat16 and float16."""
    if kw.get("free_bits"):
        kw = dict(kw)
    a, b = run_both("cuda", getattr(fastvae, name), half_dtype, reduction="none", **kw)
    close(a, b, f"{name} {kw} {half_dtype}")


@pytest.mark.parametrize("device,half_dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=CUDA),
    pytest.param("cuda", torch.bfloat16, marks=CUDA),
])
def test_mixed_precision_training_learns_as_well_as_float32(device, half_dtype):
    """An IWAE training loop on sklearn digits under autocast with
    torch.amp.GradScaler (the float16 recipe; harmless for bfloat16) reaches
    the float32 loop's held-out bound: mixed precision costs no learning."""
    pytest.importorskip("sklearn")
    if INTERPRET:
        pytest.skip("a training loop is too slow for the Triton interpreter")
    from fastvae.demo import VAE, load_digits

    train, test = load_digits(device)

    def held_out_bound(amp: bool) -> float:
        torch.manual_seed(0)
        model = VAE(latent=8, hidden=64).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        scaler = torch.amp.GradScaler(device, enabled=amp)
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            xb = train[torch.randint(0, len(train), (64,), generator=g).to(device)]
            with torch.autocast(device, half_dtype, enabled=amp):
                mu, logvar = model.encode(xb)
                loss = -fastvae.iwae(xb, mu, logvar, model.decode, k=4, likelihood="bernoulli")
            assert loss.dtype == torch.float32
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        with torch.no_grad():  # judged the same way for both: float32, a fixed seed
            mu, logvar = model.encode(test)
            return fastvae.iwae(test, mu, logvar, model.decode, k=16, likelihood="bernoulli",
                                generator=torch.Generator(device).manual_seed(2)).item()

    initial = -44.4  # 64 pixels at log 2 nats each: an untrained decoder's bound
    full, mixed = held_out_bound(False), held_out_bound(True)
    assert full > initial + 10  # the float32 loop learns
    assert mixed > full - 1.0, (mixed, full)


def test_z_dtype_under_autocast_and_without():
    """z is float32 under autocast (the decoder's matmuls round it; priors see
    it unrounded) and in the encoder's dtype without (a half-precision model
    takes it as it is); KL terms are float32 either way; meta tensors, which
    have no autocast state, work too."""
    for device in ("cpu", "meta"):
        mu = torch.zeros(3, 4, dtype=HALF, device=device)
        z, kl = fastvae.sample_normal(mu, mu, 2)
        assert (z.dtype, kl.dtype) == (HALF, torch.float32)
        z, kl = fastvae.sample_normal_tril(mu, torch.eye(4, dtype=HALF, device=device).expand(3, 4, 4), 2)
        assert (z.dtype, kl.dtype) == (HALF, torch.float32)
    with torch.autocast("cpu", HALF):
        z, kl = fastvae.sample_normal(torch.zeros(3, 4, dtype=HALF), torch.zeros(3, 4, dtype=HALF), 2)
        assert (z.dtype, kl.dtype) == (torch.float32, torch.float32)


@pytest.mark.full  # a second compile (26 s): the quick tier compiles the objectives in test_compile*.py
def test_compiled_iwae_under_autocast_matches_eager():
    """torch.compile(fullgraph=True) traces fastvae under autocast: the fake
    implementations give the real dtypes (float32 bounds, z, KL), and the
    compiled bound and gradients equal the eager ones."""
    if INTERPRET:
        pytest.skip("torch.compile over the Triton interpreter is not what this checks")
    model = Model("cpu")
    x = data("cpu")

    def loss(x, seed):
        with torch.autocast("cpu", HALF):
            mu, logvar = model.encode(x, True)
            return -fastvae.iwae(x, mu, logvar, lambda z: model.decode(z, True), k=3, likelihood="bernoulli",
                                 estimator="dreg" if DREG_COMPILES else "stl")  # DReG compiles from torch 2.13

    compiled = torch.compile(loss, fullgraph=True, dynamic=False)
    try:
        results = []
        for fn in (loss, compiled):
            torch.manual_seed(3)
            value = fn(x, 0)
            results.append((value, torch.autograd.grad(value, model.parameters())))
    finally:
        torch._dynamo.reset()
    (v1, g1), (v2, g2) = results
    assert v1.dtype == v2.dtype == torch.float32
    torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-5)
    # the gradients pass through the model's bfloat16 autocast matmuls, whose
    # bfloat16 intermediates Inductor rounds differently from eager (fused in
    # float32): equal to bfloat16 rounding, not to float32's
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=1e-2)


# -- the latent families beyond the Gaussian ----------------------------------------
# The encoder's bfloat16 outputs become a location-scale (Laplace), a positive
# (Weibull) or a relaxed-categorical (Concrete, relaxed and straight-through)
# posterior; the decoder takes z (flattened over the categories for the
# Concrete). Same pattern: the float32 bound of the same rounded numbers.

CATS = 3  # categories per Concrete latent
LAM = 0.7  # its temperature


class FamilyModel(Model):
    """Model with an encoder of 2 L outputs (two parameters per latent) or
    L * CATS (the Concrete's logits), and a decoder of L or L * CATS inputs."""

    def __init__(self, device, family):
        g = torch.Generator().manual_seed(5)
        width = L * CATS if family.startswith("concrete") else L
        self.half, self.gaussian_var, self.family = HALF, False, family
        self.enc = torch.nn.Linear(D, 2 * width if not family.startswith("concrete") else width).to(device)
        self.dec = torch.nn.Linear(width, D).to(device)
        with torch.no_grad():
            for p in (*self.enc.parameters(), *self.dec.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def posterior(self, x, half):
        """(the posterior, its parameter tensors: the encoder's outputs)."""
        h = self.enc(x) if half else self._rounded(self.enc, x)
        if self.family.startswith("concrete"):
            logits = h.unflatten(-1, (L, CATS))
            return fastvae.Concrete(logits, LAM, hard=self.family == "concrete_hard"), (logits,)
        a, b = h[..., :L], h[..., L:].clamp(-2, 2)
        if self.family == "laplace":
            return fastvae.LocationScale("laplace", a, b), (a, b)
        return fastvae.Positive("weibull", a.clamp(-2, 2), b), (a, b)

    def decode(self, z, half):
        if self.family.startswith("concrete"):
            z = z.flatten(-2)
        return self.dec(z) if half else self._rounded(self.dec, z)


def family_prior(family, kind, device):
    zeros = torch.zeros(L, device=device)
    if family == "laplace":
        return torch.distributions.Laplace(zeros + 0.2, zeros + 1.3) if kind == "analytic" else None
    if family == "weibull":  # no closed form: the Monte Carlo KL either way
        return torch.distributions.Gamma(zeros + 2.0, zeros + 1.0)
    if kind == "analytic":
        return torch.distributions.OneHotCategorical(logits=torch.zeros(CATS, device=device))
    return torch.distributions.Independent(torch.distributions.RelaxedOneHotCategorical(
        torch.tensor(LAM, device=device), logits=torch.zeros(L, CATS, device=device)), 1)


FAMILY_CASES = [
    ("laplace", "elbo", "analytic", dict(n_samples=2)),
    ("laplace", "elbo", "mc", dict(n_samples=2)),
    ("laplace", "iwae", "analytic", dict(k=3, estimator="dreg")),
    ("weibull", "elbo", "mc", dict(n_samples=2)),
    ("weibull", "iwae", "mc", dict(k=3)),
    ("concrete", "elbo", "analytic", dict(n_samples=2)),
    ("concrete", "elbo", "mc", dict(n_samples=2)),
    ("concrete", "iwae", "mc", dict(k=3, estimator="stl")),
    ("concrete_hard", "elbo", "analytic", dict(n_samples=2)),
    ("concrete_hard", "elbo", "analytic", dict(beta=0.5, free_bits=0.05)),
]


@pytest.mark.parametrize("family,name,prior,kw", FAMILY_CASES,
                         ids=[f"{f}-{n}-{p}-{i}" for i, (f, n, p, _) in enumerate(FAMILY_CASES)])
def test_latent_families_under_cpu_autocast(family, name, prior, kw):
    """bfloat16 encoder outputs under autocast: the bound (and the KL) in float32,
    the gradients of the encoder's outputs in bfloat16 and of the parameters in
    float32, and the bound equal to the float32 bound of the same rounded numbers."""
    model = FamilyModel("cpu", family)
    x = data("cpu")
    objective = getattr(fastvae, f"{name}_terms")
    values = []
    for half in (True, False):
        torch.manual_seed(7)
        with torch.autocast("cpu", HALF, enabled=half):
            q, params = model.posterior(x, half)
            assert all(p.dtype == (HALF if half else torch.float32) for p in params)
            out = objective(x, q, lambda z, h=half: model.decode(z, h), likelihood="bernoulli",
                            prior=family_prior(family, prior, "cpu"), reduction="none", **kw)
        values.append(out)
        if half:
            assert out.bound.dtype == torch.float32 and out.kl.dtype == torch.float32
            grads = torch.autograd.grad(out.bound.sum(), [*params, *model.parameters()], retain_graph=True)
            assert [g.dtype for g in grads[:len(params)]] == [HALF] * len(params)
            assert all(g.dtype == torch.float32 for g in grads[len(params):])
            assert all(torch.isfinite(g).all() for g in grads)
    a, b = values
    close(a.bound, b.bound, f"{family} {name} bound")
    close(a.kl, b.kl, f"{family} {name} kl")
    if name == "elbo":
        close(a.reconstruction, b.reconstruction, f"{family} {name} reconstruction")


@pytest.mark.parametrize("hard", [False, True])
def test_sample_concrete_under_cpu_autocast(hard):
    """The op itself: bfloat16 logits under autocast give z and log q in float32
    (z unrounded: the decoder's matmuls round it), equal to the float32 op on the
    rounded logits; the logits' gradient comes back in bfloat16."""
    logits = (torch.randn(4, L, CATS, generator=torch.Generator().manual_seed(2)) * 2).to(HALF).requires_grad_()
    outs = []
    for half in (True, False):
        with torch.autocast("cpu", HALF, enabled=half):
            z, log_q = fastvae.sample_concrete(logits if half else logits.detach().float(), LAM, 2, hard=hard,
                                               generator=torch.Generator().manual_seed(3))
        outs.append((z, log_q))
    (z, log_q), (z32, log_q32) = outs
    assert z.dtype == log_q.dtype == torch.float32
    torch.testing.assert_close(z, z32, rtol=0, atol=0)
    torch.testing.assert_close(log_q, log_q32, rtol=0, atol=0)
    (g,) = torch.autograd.grad((z.sum() + log_q.sum()), logits)
    assert g.dtype == HALF and torch.isfinite(g).all()
    # without autocast a bfloat16 model gets z in bfloat16 (log q stays float32)
    z16, lq = fastvae.sample_concrete(logits, LAM, 2, hard=hard, generator=torch.Generator().manual_seed(3))
    assert (z16.dtype, lq.dtype) == (HALF, torch.float32)
    with torch.autocast("cpu", HALF):  # float64 logits keep float64 under autocast, as sample_normal's mu does
        z64, lq64 = fastvae.sample_concrete(logits.detach().double(), LAM, hard=hard)
    assert (z64.dtype, lq64.dtype) == (torch.float64, torch.float64)
