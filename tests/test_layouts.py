"""Every likelihood op, objective and evaluation function on the layouts users
hit first: one-row and two-row batches and odd sizes, K = 1 and K large enough
to pass each path's size thresholds (the cpp backend runs few x rows against
many samples in a folded layout once K·D passes its per-thread work; a batch of
one once crashed there), x contiguous or expanded (stride 0), and
non-contiguous decoder outputs. Values and gradients against the float64
reference backend on the same inputs."""
import math

import pytest
import torch

import fastvae
from fastvae import _backend

from conftest import INTERPRET
from helpers import assert_close

# K·P·D past the folded layout's threshold at P = 1 (K·D >= 32768 failed) and
# below it; P = 1, 2 and an odd size. The Triton interpreter (about 1 ms a
# program) takes the small ones: the fold is the cpp backend's path, and the
# Triton kernels' tiles and sample splits are covered by each op's own tests.
SHAPES = [(3, 1, 13), (1, 1, 800), (9, 7, 37)] + ([] if INTERPRET else [(41, 1, 800), (41, 2, 800)])


def _data(kind, P, D, device, g):
    if kind in ("poisson", "negative_binomial", "zinb"):
        return torch.poisson(torch.rand(P, D, generator=g) * 4, generator=g).to(device)
    if kind == "categorical":
        return torch.randint(0, 5, (P, D), generator=g).to(device)
    return torch.rand(P, D, generator=g).to(device) if kind == "continuous_bernoulli" else (
        (torch.rand(P, D, generator=g) > 0.5).float().to(device))


def _params(kind, K, P, D, device, g):
    """The decoder outputs of one likelihood, float32 on device, (K, P, D)-shaped."""
    def r(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(device)
    if kind == "gaussian":
        return {"mean": r(K, P, D), "logvar": r(K, P, D, s=0.5)}
    if kind == "gaussian_row_var":  # a variance per x row, shared over the samples
        return {"mean": r(K, P, D), "logvar": r(P, D, s=0.5)}
    if kind == "negative_binomial":
        return {"log_mean": r(K, P, D), "log_theta": r(D, s=0.5)}
    if kind == "zinb":
        return {"log_mean": r(K, P, D), "log_theta": r(K, P, D, s=0.5), "zi_logits": r(K, P, D)}
    if kind == "categorical":
        return {"logits": r(K, P, D, 5)}
    if kind == "poisson":
        return {"log_rate": r(K, P, D, s=0.5)}
    return {"logits": r(K, P, D, s=2.0)}


OPS = {
    "gaussian": lambda x, p: fastvae.gaussian_log_prob(x, p["mean"], p["logvar"]),
    "gaussian_row_var": lambda x, p: fastvae.gaussian_log_prob(x, p["mean"], p["logvar"]),
    "bernoulli": lambda x, p: fastvae.bernoulli_log_prob(x, p["logits"]),
    "continuous_bernoulli": lambda x, p: fastvae.continuous_bernoulli_log_prob(x, p["logits"]),
    "poisson": lambda x, p: fastvae.poisson_log_prob(x, p["log_rate"]),
    "negative_binomial": lambda x, p: fastvae.negative_binomial_log_prob(x, p["log_mean"], p["log_theta"]),
    "zinb": lambda x, p: fastvae.zinb_log_prob(x, p["log_mean"], p["log_theta"], p["zi_logits"]),
    "categorical": lambda x, p: fastvae.categorical_log_prob(x, p["logits"]),
}


def _layout(t, layout):
    """t in the asked memory layout, same values: "expanded" makes the leading
    dimension stride 0 where it repeats one row, "strided" a non-contiguous view."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "expanded":
        return t[:1].expand(t.shape) if t.shape[0] > 1 else t.expand(t.shape)
    # every second element of a buffer twice as wide: a non-contiguous view of the same values
    wide = torch.stack((t, torch.zeros_like(t)), dim=-1)
    return wide[..., 0]


def _evaluate(kind, x, params, backend_name, dtype):
    """(log-prob, its gradients) on one backend, every parameter cast to dtype."""
    ps = {k: v.to(dtype).requires_grad_() for k, v in params.items()}
    xs = x.to(dtype) if x.is_floating_point() else x
    with fastvae.use_backend(backend_name):
        out = OPS[kind](xs, ps)
    grads = torch.autograd.grad(out.sum() if out.dim() else out, list(ps.values()))
    return out, dict(zip(ps, grads))


@pytest.mark.parametrize("layout", ["contiguous", "expanded", "strided"])
@pytest.mark.parametrize("K,P,D", SHAPES)
@pytest.mark.parametrize("kind", list(OPS))
def test_likelihood_ops_on_every_layout(backend, kind, K, P, D, layout):
    name, device = backend
    g = torch.Generator().manual_seed(K * 1000 + P * 10 + D)
    x = _layout(_data(kind, P, D, device, g), layout)
    params = {k: _layout(v, layout) if v.dim() >= 2 else v for k, v in _params(kind, K, P, D, device, g).items()}
    if K == 1:  # one sample: the decoder output without its sample dimension too
        params = {k: v[0] if v.dim() == 3 + (kind == "categorical") else v for k, v in params.items()}
    out, grads = _evaluate(kind, x, params, name if device == "cpu" else None, torch.float32)
    ref, ref_grads = _evaluate(kind, x.cpu(), {k: v.cpu() for k, v in params.items()}, "reference", torch.float64)
    # each output sums D terms of size O(1) (more for the counts' lgamma terms)
    assert_close(out, ref, ref.abs() + 10 * D, f"{kind} value")
    for k, gr in grads.items():
        assert gr.shape == params[k].shape, k
        assert_close(gr, ref_grads[k], ref_grads[k].abs() + 10 * (K if gr.dim() < 3 else 1), f"{kind} d{k}")


def _vae(device, D, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.3 * torch.randn(L, D, generator=g)).to(device)
    E = (0.1 * torch.randn(D, 2 * L, generator=g)).to(device)

    def encode(x):
        h = x.to(E.dtype) @ E
        return h[..., :L], h[..., L:] - 1.0

    return encode, (lambda z: z @ W)


@pytest.mark.parametrize("B", [1] if INTERPRET else [1, 2, 7])
def test_objectives_on_one_example_past_the_fold_threshold(backend, B):
    """iwae(k=50) on one MNIST-size example (K·D = 39200) gives the reference's
    value and gradients; so do the ELBO with many samples and a stride-0 x."""
    name, device = backend
    D = 784
    encode, decode = _vae(device, D)
    g = torch.Generator().manual_seed(B)
    x = (torch.rand(1, D, generator=g) > 0.5).float().to(device).expand(B, D)  # B copies of one row, stride 0

    def run(backend_name, objective, dtype, **kw):
        mu, logvar = (t.detach().to(dtype).requires_grad_() for t in encode(x))
        with fastvae.use_backend(backend_name):
            bound = objective(x.to(dtype), mu, logvar, lambda z: decode(z.float()).to(dtype), likelihood="bernoulli",
                              generator=torch.Generator(device).manual_seed(3), **kw)
        return (bound, *torch.autograd.grad(bound, (mu, logvar)))

    for objective, kw in ((fastvae.iwae, {"k": 50}), (fastvae.iwae, {"k": 50, "estimator": "dreg"}),
                          (fastvae.elbo, {"n_samples": 45})):
        got = run(name if device == "cpu" else None, objective, torch.float32, **kw)
        want = run("reference", objective, torch.float64, **kw)
        # each log-weight sums D = 784 terms into a few hundred nats: its float32
        # rounding, relative to the bound's size, moves the weights and so the
        # gradients; the scale is that size (twice it for DReG, whose gradient
        # weighs by the squared weights: twice as sensitive to a log-weight's error)
        size = want[0].abs() * (2 if kw.get("estimator") == "dreg" else 1)
        for a, e, what in zip(got, want, ("bound", "dmu", "dlogvar")):
            assert_close(a, e, e.abs() + 1e-2 * size, f"{objective.__name__} {kw} {what}")


@pytest.mark.filterwarnings("ignore::fastvae.EvaluationWarning")  # a random model: degenerate weights
def test_log_likelihood_of_one_image_and_a_last_batch_of_one(backend):
    """log_likelihood of one example, and evaluate whose last batch holds one
    example (301 in batches of 100; 41 in batches of 20 under the interpreter):
    as the same examples in one batch."""
    name, device = backend
    D, N, per_batch = (784, 301, 100) if not INTERPRET else (784, 41, 20)
    encode, decode = _vae(device, D)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(N, D, generator=g) > 0.5).float().to(device)
    with fastvae.use_backend(name if device == "cpu" else None):
        one = fastvae.log_likelihood(data[:1], encode, decode, k=64, likelihood="bernoulli",
                                     generator=torch.Generator(device).manual_seed(1))
        assert one.shape == (1,) and torch.isfinite(one).all()
        batches = [data[i:i + per_batch] for i in range(0, N, per_batch)]
        assert batches[-1].shape[0] == 1
        res = fastvae.evaluate(batches, encode, decode, k=64, likelihood="bernoulli", progress=False,
                               generator=torch.Generator(device).manual_seed(2))
        whole = fastvae.evaluate([data], encode, decode, k=64, likelihood="bernoulli", progress=False,
                                 generator=torch.Generator(device).manual_seed(2))
    assert res.n_examples == N
    # the noise is a function of each example's global index: the batching changes nothing
    assert_close(res.per_example, whole.per_example, whole.per_example.abs() + 1.0, "per-example log p(x)")
    with fastvae.use_backend("reference"):
        ref = fastvae.log_likelihood(data[:1].double(), lambda x: tuple(t.double() for t in encode(x.float())),
                                     lambda z: decode(z.float()).double(), k=64, likelihood="bernoulli",
                                     generator=torch.Generator(device).manual_seed(1))
    assert_close(one, ref, ref.abs() + math.sqrt(D), "log p(x) of one image")


def test_backend_fixture_is_the_one_serving_the_ops(backend):
    """The matrix above runs on the backend it names (a fall-back to the
    reference would make it compare the reference with itself)."""
    name, device = backend
    x = torch.zeros(1, 3, device=device)
    assert _backend.backend_for(x.device) == ("triton" if device == "cuda" else name)


@pytest.mark.skipif(INTERPRET, reason="main-process test: torch.compile on the CPU path")
def test_one_example_iwae_compiles_fullgraph():
    """iwae(k=50) on one MNIST-size example under torch.compile(fullgraph=True):
    the traced graph takes the same folded layout and gives eager's numbers."""
    from helpers import assert_compiled_matches_eager

    D = 784
    encode, decode = _vae("cpu", D)
    x = (torch.rand(1, D, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    mu, logvar = (t.detach().requires_grad_() for t in encode(x))
    assert_compiled_matches_eager(lambda x, m, v: fastvae.iwae(x, m, v, decode, k=50, likelihood="bernoulli"),
                                  (x, mu, logvar), (mu, logvar), rtol=1e-5, atol=1e-4, grad_rtol=1e-4)
