"""Double backward (create_graph=True): every op with a closed
form passes torch.autograd.gradgradcheck in float64 on every backend, through
the C++ operators (eager cpp) and the Python Functions alike; mixture_log_prob
and the DReG encoder gradient raise an error that names them when
differentiated twice; never a silent zero. The objectives' second derivatives
match a plain-torch reference with the same noise."""
from __future__ import annotations

import pytest
import torch
import torch.distributions as D
from test_objectives import make_problem, ref_log_lik, ref_log_weights, ref_renyi, same_noise
from torch.autograd import gradcheck, gradgradcheck

import fastvae
from fastvae import _backend
from fastvae.ops.sample_normal.op import sample_normal_with_ratio_unchecked

from conftest import INTERPRET
from helpers import gen, op_cases

F64 = torch.float64


def _has_operators() -> bool:
    return _backend.cpp_available() and _backend.cpp_module().HAS_TORCH_OPS


@pytest.fixture(params=["operator", "function"])
def path(request, backend, monkeypatch):
    """"operator": the C++ operators where they serve (eager float CPU calls on
    cpp); "function": the ops' Python autograd Functions, on every backend."""
    if request.param == "operator":
        if backend[0] != "cpp" or not _has_operators():
            pytest.skip("the C++ operators serve the cpp backend's eager calls only")
    else:
        monkeypatch.setattr(_backend, "torch_ops", lambda *tensors: None)
    return request.param


def _nodes(t: torch.Tensor) -> set[str]:
    """The names of every autograd node behind t. The nodes are kept, not
    just their ids: torch may hand out a new Python object for a node at each
    visit, and the id of a freed one comes back (torch 2.11 then stopped the
    walk early)."""
    seen, stack = {}, [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(n for n, _ in node.next_functions)
    return {node.name() for node in seen.values()}


def _leaf(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device).requires_grad_()


def _tril(N, L, g):
    """A lower-triangular scale with a diagonal in [1, 2] (kept away from 0 by the steps)."""
    return (torch.randn(N, L, L, generator=g, dtype=F64).tril(-1)
            + torch.diag_embed(torch.rand(N, L, generator=g, dtype=F64) + 1))


# name -> (function of the leaves, the leaves' values (made on the CPU), C++ operator or not); a case of
# op X is named X or X_<variant> (test_every_op_has_its_double_backward_test checks each closed-form op has one)
def _cases(g):
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    return {
        **{name: case for cases in op_cases("double_backward_cases").values() for name, case in cases(r).items()},
    }


CASES = list(_cases(torch.Generator().manual_seed(0)))


def test_every_op_has_its_double_backward_test():
    """From each Op's double_backward in fastvae/_registry.py: a closed form has a
    gradgradcheck case here (named after the op), a not_twice op a test of its
    named error (test_<op>_raises_...)."""
    from fastvae import _registry

    kinds = {op.name: op.double_backward for op in _registry.OPS.values()}
    assert set(kinds.values()) <= {"closed form", "not_twice"}
    closed = [n for n, k in kinds.items() if k == "closed form"
              and not any(c == n or c.startswith(n + "_") for c in CASES)]
    errors = [n for n, k in kinds.items() if k == "not_twice"
              and not any(t.startswith(f"test_{n}_raises_") for t in globals())]
    assert (closed, errors) == ([], [])


@pytest.mark.parametrize("case", CASES)
def test_gradgradcheck(backend, path, case):
    """The second derivative of every op with a closed form, against finite
    differences of its create_graph gradient (gradgradcheck also perturbs the
    upstream gradients, so it checks the first derivative's linearity too)."""
    _, device = backend
    fn, values, has_operator = _cases(torch.Generator().manual_seed(0))[case]
    leaves = [_leaf(v, device) for v in values]
    out = fn(*leaves)
    first = out if isinstance(out, torch.Tensor) else out[0]
    took_operator = any("fastvae::torch_ops" in n for n in _nodes(first))
    assert took_operator == (path == "operator" and has_operator)
    # fast_mode (one random projection, two evaluations) under the interpreter,
    # where each of the full check's ~100 evaluations launches interpreted kernels
    assert gradgradcheck(fn, leaves, fast_mode=INTERPRET)


def test_latent_log_ratio_stop_score(backend, path):
    """With stop_score mu and logvar are constants of log q: z's gradient is
    differentiable again, theirs is None."""
    _, device = backend
    g = torch.Generator().manual_seed(1)
    z = _leaf(torch.randn(2, 3, 4, generator=g, dtype=F64), device)
    mu, lv = (_leaf(torch.randn(3, 4, generator=g, dtype=F64), device) for _ in range(2))
    assert gradgradcheck(lambda z: fastvae.latent_log_ratio(z, mu.detach(), lv.detach(), stop_score=True), [z])
    out = fastvae.latent_log_ratio(z, mu, lv, stop_score=True)
    dz, dmu = torch.autograd.grad(out.sum(), [z, mu], create_graph=True, allow_unused=True)
    assert dmu is None and dz.requires_grad


def test_sampler_stop_score_matches_a_detached_reference(backend, path):
    """The sampler's log-ratio in stop-score mode (STL, DReG): its create_graph
    gradient and that gradient's own gradient equal plain torch's with q's
    parameters detached in log q, the same eps."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    mu0, lv0 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    w = torch.randn(2, 3, generator=g, dtype=F64).to(device)

    def second(fn):
        mu, lv = _leaf(mu0, device), _leaf(lv0, device)
        z, ratio = fn(mu, lv)
        value = (w * ratio).sum() + (z**3).sum()
        gm, gl = torch.autograd.grad(value, [mu, lv], create_graph=True)
        return [gm, gl, *torch.autograd.grad((gm**2).sum() + (gm * gl).sum(), [mu, lv])]

    def fused(mu, lv):
        z, _, ratio = sample_normal_with_ratio_unchecked(mu, lv, 2, True, gen(4))
        return z, ratio

    def plain(mu, lv):
        z = mu + torch.exp(lv / 2) * same_noise(4, 2, mu.shape, device)
        log_q = D.Normal(mu.detach(), torch.exp(lv.detach() / 2)).log_prob(z).sum(-1)
        return z, D.Normal(0.0, 1.0).log_prob(z).sum(-1) - log_q

    for a, e in zip(second(fused), second(plain)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_a_gradient_penalty_on_the_kl_gradient(backend, path):
    """A gradient penalty on the KL's gradient: (kl + |g|^2) gives 3 mu, as torch does."""
    _, device = backend
    mu = _leaf(torch.randn(3, 4, dtype=F64), device)
    lv = torch.randn(3, 4, dtype=F64, device=device)
    (g,) = torch.autograd.grad(fastvae.kl_normal(mu, lv).sum(), mu, create_graph=True)
    assert g.requires_grad
    (fastvae.kl_normal(mu, lv).sum() + (g**2).sum()).backward()
    torch.testing.assert_close(mu.grad, 3 * mu.detach(), rtol=1e-12, atol=0)


def test_float32_create_graph_gradient_equals_the_kernels(backend, path):
    """In float32 the create_graph gradient is the kernels' to rounding."""
    _, device = backend
    g = torch.Generator().manual_seed(5)
    x, mean, lv = (torch.randn(2, 7, 9, generator=g).to(device).requires_grad_() for _ in range(3))

    def grads(create_graph):
        out = fastvae.gaussian_log_prob(x[0], mean, lv) + fastvae.kl_normal(mean, lv)
        return torch.autograd.grad(out.sum(), [x, mean, lv], create_graph=create_graph)

    kernels, graph = grads(False), grads(True)
    assert all(t.requires_grad for t in graph) and not any(t.requires_grad for t in kernels)
    for a, e in zip(graph, kernels):
        torch.testing.assert_close(a, e, rtol=2e-6, atol=1e-6)


# -- what has no second derivative says so ------------------------------------------


def test_mixture_log_prob_raises_a_named_error_when_differentiated_twice(backend, path):
    _, device = backend
    g = torch.Generator().manual_seed(6)
    z, means, logvars = (_leaf(torch.randn(*s, generator=g, dtype=F64), device) for s in ((3, 4), (5, 4), (5, 4)))
    out = fastvae.mixture_log_prob(z, means, logvars)
    plain = torch.autograd.grad(out.sum(), [z, means], retain_graph=True)
    # the first derivative with create_graph=True is the kernel's, and usable as a number
    dz, dmeans = torch.autograd.grad(out.sum(), [z, means], create_graph=True)
    torch.testing.assert_close(dz, plain[0], rtol=0, atol=0)
    torch.testing.assert_close(dmeans, plain[1], rtol=0, atol=0)
    for target in (dz, dmeans):
        with pytest.raises(RuntimeError, match=r"fastvae\.mixture_log_prob does not support double backward"):
            torch.autograd.grad((target**2).sum(), [z, means], retain_graph=True)
    # gradcheck of the first derivative still holds
    assert gradcheck(lambda z: fastvae.mixture_log_prob(z, means.detach(), logvars.detach()), [z])


# -- the objectives --------------------------------------------------------------------


def _penalized(bound_fn, params):
    """The gradient of bound + |d bound / d params|^2: second derivatives enter through the penalty."""
    bound = bound_fn()
    first = torch.autograd.grad(bound, params, create_graph=True)
    return torch.autograd.grad(bound + sum((d**2).sum() for d in first), params)


def _check(actual, expected, name):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m, i=i: f"{name}[{i}]: {m}")


@pytest.mark.parametrize("likelihood,learned,beta,free_bits", [
    ("gaussian", False, 1.0, 0.0), ("gaussian", True, 1.0, 0.0), ("bernoulli", False, 1.0, 0.0),
    ("bernoulli", False, 0.5, 1.05)])  # 1.05: one of the two dimensions (batch-mean KL 1.0492, 1.0505) floored
@pytest.mark.parametrize("n_samples", [1, 3])
def test_elbo_second_derivatives_match_torch(backend, path, likelihood, learned, beta, free_bits, n_samples):
    _, device = backend
    x, mu, logvar, model = make_problem(3, 2, 5, likelihood, learned, seed=7, device=device)
    params = [mu, logvar, *model.parameters()]
    eps = same_noise(7, n_samples, mu.shape, device)

    def reference():
        rec = ref_log_lik(model, x, mu + torch.exp(logvar / 2) * eps).mean(0)
        per_dim = D.kl_divergence(D.Normal(mu, torch.exp(logvar / 2)), D.Normal(0.0, 1.0))
        # free bits: a latent dimension whose batch-mean KL is below the floor counts the floor
        kl = torch.where(per_dim.mean(0) < free_bits, free_bits, per_dim).sum(-1)
        return (rec - beta * kl).sum()

    fused = _penalized(lambda: fastvae.elbo(x, mu, logvar, model, likelihood=likelihood, n_samples=n_samples,
                                            beta=beta, free_bits=free_bits, reduction="sum", generator=gen(7)),
                       params)
    _check(fused, _penalized(reference, params), "elbo")


@pytest.mark.parametrize("estimator", ["iwae", "stl"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_iwae_second_derivatives_match_torch(backend, path, estimator, alpha):
    _, device = backend
    x, mu, logvar, model = make_problem(3, 2, 5, "gaussian", True, seed=8, device=device)
    params = [mu, logvar, *model.parameters()]
    eps = same_noise(8, 4, mu.shape, device)

    def reference():
        return ref_renyi(ref_log_weights(model, x, mu, logvar, eps, stop_score=estimator == "stl"), alpha).sum()

    fused = _penalized(lambda: fastvae.iwae(x, mu, logvar, model, k=4, likelihood="gaussian", estimator=estimator,
                                            alpha=alpha, reduction="sum", generator=gen(8)), params)
    _check(fused, _penalized(reference, params), estimator)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_full_covariance_and_diagonal_prior_second_derivatives_match_torch(backend, path, objective):
    """A TrilNormal posterior against a learned DiagonalNormal prior (the analytic
    KL for elbo; log p(z) - log q(z) per sample for iwae)."""
    _, device = backend
    x, mu, _, model = make_problem(3, 2, 5, "bernoulli", seed=11, device=device)
    g = torch.Generator().manual_seed(11)
    S = _leaf(_tril(3, 2, g) * 0.7, device)
    pm, plv = (_leaf(torch.randn(2, generator=g, dtype=F64) * 0.5, device) for _ in range(2))
    params = [mu, S, pm, plv, *model.parameters()]
    prior = fastvae.DiagonalNormal(pm, plv)
    k = 3
    eps = same_noise(11, k, mu.shape, device)

    def reference():
        z = mu + (S.tril() @ eps.unsqueeze(-1)).squeeze(-1)
        q = D.MultivariateNormal(mu, scale_tril=S.tril())
        p = D.Independent(D.Normal(pm, torch.exp(plv / 2)), 1)
        if objective == "elbo":
            return (ref_log_lik(model, x, z).mean(0) - D.kl_divergence(q, D.MultivariateNormal(
                pm, scale_tril=torch.diag_embed(torch.exp(plv / 2))))).sum()
        return ref_renyi(ref_log_lik(model, x, z) + p.log_prob(z) - q.log_prob(z), 0.0).sum()

    call = fastvae.elbo if objective == "elbo" else fastvae.iwae
    count = {"n_samples": k} if objective == "elbo" else {"k": k}
    fused = _penalized(lambda: call(x, fastvae.TrilNormal(mu, S), model, likelihood="bernoulli", prior=prior,
                                    reduction="sum", generator=gen(11), **count), params)
    _check(fused, _penalized(reference, params), objective)


def test_dreg_raises_a_named_error_for_the_encoder_and_not_the_decoder(backend, path):
    """DReG's encoder gradient weights samples by constants (the gradient of no
    objective): differentiating it again raises; the decoder's gradient is
    IWAE's and differentiates like it."""
    _, device = backend
    x, mu, logvar, model = make_problem(3, 2, 5, "bernoulli", seed=9, device=device)
    dec = list(model.parameters())

    def bound(estimator):
        return fastvae.iwae(x, mu, logvar, model, k=4, likelihood="bernoulli", estimator=estimator,
                            reduction="sum", generator=gen(9))

    dmu, dlv = torch.autograd.grad(bound("dreg"), [mu, logvar], create_graph=True)
    with pytest.raises(RuntimeError, match=r"fastvae\.iwae\(estimator='dreg'\) does not support double backward"):
        torch.autograd.grad((dmu**2).sum(), [mu, logvar])
    dreg = torch.autograd.grad(bound("dreg"), dec, create_graph=True)
    iwae = torch.autograd.grad(bound("iwae"), dec, create_graph=True)
    _check(torch.autograd.grad(sum((d**2).sum() for d in dreg), dec),
           torch.autograd.grad(sum((d**2).sum() for d in iwae), dec), "dreg decoder")


def test_a_mixture_prior_raises_a_named_error(backend, path):
    _, device = backend
    x, mu, logvar, model = make_problem(3, 2, 5, "gaussian", seed=10, device=device)
    g = torch.Generator().manual_seed(10)
    prior = fastvae.priors.MixtureOfGaussians(torch.randn(3, 2, generator=g, dtype=F64).to(device),
                                             torch.zeros(3, 2, dtype=F64, device=device))
    bound = fastvae.iwae(x, mu, logvar, model, k=3, likelihood="gaussian", prior=prior, generator=gen(10))
    (dmu,) = torch.autograd.grad(bound, [mu], create_graph=True)
    with pytest.raises(RuntimeError, match=r"fastvae\.mixture_log_prob does not support double backward"):
        torch.autograd.grad((dmu**2).sum(), [mu])


def test_discretized_logistic_mixture_log_prob_raises_a_named_error_when_differentiated_twice(backend):
    _, device = backend
    g = torch.Generator().manual_seed(7)
    x = (torch.randint(0, 256, (2, 3, 2, 3), generator=g, dtype=F64) / 127.5 - 1).to(device)
    params = _leaf(torch.randn(4, 2, 20, 2, 3, generator=g, dtype=F64), device)
    out = fastvae.discretized_logistic_mixture_log_prob(x, params)
    plain = torch.autograd.grad(out.sum(), [params], retain_graph=True)[0]
    (dparams,) = torch.autograd.grad(out.sum(), [params], create_graph=True)
    torch.testing.assert_close(dparams, plain, rtol=0, atol=0)  # the kernel's, usable as a number
    with pytest.raises(RuntimeError, match=r"fastvae\.discretized_logistic_mixture_log_prob does not support double"):
        torch.autograd.grad((dparams**2).sum(), [params])


def test_sample_concrete_raises_a_named_error_when_differentiated_twice(backend):
    """The relaxed categorical's backward is a kernel
    (fastvae/ops/sample_family/test_sample_family.py)."""
    _, device = backend
    g = torch.Generator().manual_seed(8)
    logits = _leaf(torch.randn(3, 2, 4, generator=g, dtype=F64), device)
    z, log_q = fastvae.sample_concrete(logits, 0.7, 2, generator=torch.Generator().manual_seed(3))
    loss = (z * z).sum() + log_q.sum()
    plain = torch.autograd.grad(loss, [logits], retain_graph=True)[0]
    (d,) = torch.autograd.grad(loss, [logits], create_graph=True)
    torch.testing.assert_close(d, plain, rtol=0, atol=0)  # the kernel's, usable as a number
    with pytest.raises(RuntimeError, match=r"fastvae\.sample_concrete does not support double backward"):
        torch.autograd.grad((d**2).sum(), [logits])


def _first_derivatives_agree(loss, params):
    """create_graph=True's first derivatives are those of a plain backward."""
    plain = torch.autograd.grad(loss(), params)
    graphed = torch.autograd.grad(loss(), params, create_graph=True)
    for name, a, b in zip(range(len(params)), graphed, plain):
        assert a.isfinite().all(), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"parameter {name}")


@pytest.mark.parametrize("general", [False, True])
def test_a_replay_with_inputs_made_from_one_another_counts_each_path_once(backend, path, general, monkeypatch):
    """The ops whose create_graph=True gradient is autograd of a formula on
    their inputs replay it on aliases of them: where one input is computed
    from another (a torch Uniform's high = low + width, a prior's log-scale
    made from its location, a count likelihood's log theta from its log
    mean), the first derivatives are a plain backward's, not the shared
    path counted twice; the second derivatives too (gradgradcheck)."""
    if general:  # the general composition, not the objectives' plans
        monkeypatch.setattr(fastvae._plan, "ENABLED", False)
    g = gen(0)
    low = torch.randn(5, 3, generator=g, dtype=F64).mul(0.1).requires_grad_()
    width = torch.rand(5, 3, generator=g, dtype=F64).add(0.5).requires_grad_()
    p_low = torch.randn(3, generator=g, dtype=F64).requires_grad_()
    p_raw = torch.randn(3, generator=g, dtype=F64).requires_grad_()
    x = (torch.rand(5, 3, generator=g) < 0.5).to(F64)

    def kl(family):
        return lambda: fastvae.family_kl(family, (low, width.log()), (p_low, 0.3 * p_low + p_raw)).sum()

    for family in ("laplace", "gumbel", "cauchy"):
        _first_derivatives_agree(kl(family), (low, width, p_low, p_raw))

    def uniform_elbo():
        q = D.Uniform(low, low + width)
        prior = D.Uniform(p_low - 3.0, p_low + 3.0 + p_raw.exp())
        return fastvae.elbo(x, q, lambda z: 2.0 * z, likelihood="bernoulli", prior=prior,
                            generator=gen(1)).sum()

    _first_derivatives_agree(uniform_elbo, (low, width, p_low, p_raw))

    counts = torch.poisson(torch.full((4, 3), 3.0, dtype=F64), generator=gen(2))
    log_mean = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_()

    def nb():
        return fastvae.negative_binomial_log_prob(counts, log_mean, 0.5 * log_mean + 0.2).sum()

    _first_derivatives_agree(nb, (log_mean,))
    assert gradgradcheck(lambda m: fastvae.negative_binomial_log_prob(counts, m, 0.5 * m + 0.2), (log_mean,))
    assert gradgradcheck(lambda m, r: fastvae.family_kl("laplace", (m, r), (m[0] * 0.5, r[0] + m[0])),
                         (low, width.detach().log().requires_grad_()))
