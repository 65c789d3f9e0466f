"""torch.compile(fullgraph=True) traces a training step through the ops with no graph break."""
import pytest
import torch

import fastvae
from fastvae.ops.sample_normal.op import SampleNormal

from conftest import INTERPRET
from helpers import assert_compiled_matches_eager, dreg_compile_cases, op_cases

pytestmark = pytest.mark.skipif(INTERPRET, reason="compile tests run in the main process (cpp backend)")


class TinyVAE(torch.nn.Module):
    def __init__(self, d=12, latent=3):
        super().__init__()
        self.enc = torch.nn.Linear(d, 2 * latent)
        self.dec = torch.nn.Linear(latent, d)


def loss_public_api(model, x):
    mu, logvar = model.enc(x).chunk(2, dim=-1)
    z, kl = fastvae.sample_normal(mu, logvar, 4)
    prior_kl = fastvae.kl_normal(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
    out = model.dec(z)  # (4, B, D); x (B, D) broadcasts over the samples
    recon = fastvae.gaussian_log_prob(x, out, scale=0.5).mean(0)
    recon_sp = fastvae.gaussian_log_prob(x, out, softplus_var=out.detach() * 0 + model.dec.bias, delta=1e-3).mean(0)
    recon_bern = fastvae.bernoulli_log_prob(torch.sigmoid(x), out).mean(0)
    return (kl - recon - 0.1 * recon_sp - 0.1 * recon_bern + 0.1 * prior_kl).mean()


def loss_with_seed(model, x, seed):
    mu, logvar = model.enc(x).chunk(2, dim=-1)
    z, kl = SampleNormal.apply(mu, logvar, seed, 3)
    return (((model.dec(z) - x) ** 2).sum(-1).mean(0) + kl).mean()


def test_training_step_compiles_fullgraph_and_matches_eager(monkeypatch):
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    assert_compiled_matches_eager(loss_public_api, (model, x), list(model.parameters()), torch_seed=1)


def test_compiled_matches_eager_for_same_seed(monkeypatch):
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    assert_compiled_matches_eager(loss_with_seed, (model, x, torch.tensor(4242)), list(model.parameters()),
                                  atol=1e-6, grad_rtol=1e-5)


def loss_full_covariance(model, x):
    """A full-covariance encoder: mu and a lower-triangular S (softplus diagonal) from one linear layer."""
    L = model.dec.in_features
    h = model.enc_full(x)
    mu, raw = h[:, :L], h[:, L:].reshape(-1, L, L)
    diag = torch.nn.functional.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)) + 1e-3
    S = torch.tril(raw, -1) + torch.diag_embed(diag)
    z, kl = fastvae.sample_normal_tril(mu, S, 3)
    return (((model.dec(z) - x) ** 2).sum(-1).mean(0) + kl).mean()


def test_full_covariance_step_compiles_fullgraph_and_matches_eager():
    fastvae._backend.set_backend(None)
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    model.enc_full = torch.nn.Linear(12, 3 + 3 * 3)
    assert_compiled_matches_eager(loss_full_covariance, (model, x), list(model.enc_full.parameters())
                                  + list(model.dec.parameters()), torch_seed=2)


def test_both_terms_objects_name_the_bound_bound_and_elbo_stays_an_alias():
    """ELBOTerms and IWAETerms share .bound; ELBOTerms.elbo is a
    deprecated alias that warns in eager mode and traces under fullgraph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.rand(8, 12)

    def bounds(x):
        mu, logvar = model.enc(x).chunk(2, dim=-1)
        e = fastvae.elbo_terms(x, mu, logvar, model.dec, likelihood="bernoulli", generator=None)
        i = fastvae.iwae_terms(x, mu, logvar, model.dec, k=3, likelihood="bernoulli")
        return e.bound, e.elbo, i.bound

    compiled = torch.compile(bounds, fullgraph=True)
    torch.manual_seed(1)
    e_bound, e_alias, i_bound = compiled(x)
    assert torch.equal(e_bound, e_alias) and torch.isfinite(i_bound)
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning, match=r"ELBOTerms.elbo is deprecated: use .bound"):
        eager = bounds(x)
    torch.testing.assert_close(eager[0], e_bound)
    assert fastvae.ELBOTerms._fields[0] == fastvae.IWAETerms._fields[0] == "bound"


# -- the compiled CPU graph calls the C++ twins (fastvae_cpu::*, csrc/torch_ops.cpp) --

needs_twins = pytest.mark.skipif(
    not fastvae._backend.cpp_available() or not fastvae._backend.cpp_module().HAS_TORCH_OPS,
    reason="built without torch headers: no C++ operators")


def _twin_cases():
    """(name, fn, float inputs): each call puts one op of a training step, and
    its backward, in the graph."""
    g = torch.Generator().manual_seed(3)
    mu, lv = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    return [
        *(case for cases in op_cases("compile_cases").values() for case in cases(mu, lv)),
    ]


def _run_with_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(11)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(1)
        total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        grads = torch.autograd.grad(total, leaves)
    return [o.detach() for o in outs], list(grads), {e.key for e in prof.key_averages()}


@needs_twins
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(_twin_cases())))  # every op folder's compile_cases
def test_compiled_cpu_ops_call_the_cpp_twins_bit_for_bit(case, dtype):
    """Under torch.compile on the cpp backend, each op of a training step runs
    its C++ twin (fastvae_cpu::<op>), forward and backward, with no Python op
    in the graph, and gives eager's values and gradients bit for bit (eager
    takes the C++ operators: the same kernels)."""
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    name, fn, inputs = _twin_cases()[case]
    inputs = tuple(t.to(dtype) for t in inputs)
    eager = _run_with_grads(fn, inputs)
    compiled_fn = torch.compile(fn, fullgraph=True, dynamic=False)
    _run_with_grads(compiled_fn, inputs)  # compiles: the profile below sees the compiled call alone
    compiled = _run_with_grads(compiled_fn, inputs)
    ran = compiled[2]
    op = name.split(" ")[0]
    assert f"fastvae_cpu::{op}" in ran, (name, sorted(k for k in ran if "fastvae" in k))
    assert f"fastvae_cpu::{'sample_normal' if op.startswith('sample_normal') else op}_backward" in ran, name
    assert not any(k.startswith("fastvae::") for k in ran), sorted(k for k in ran if "fastvae" in k)
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name


@needs_twins
def test_compiled_cpu_ops_keep_the_python_op_off_the_cpp_backend():
    """The twins serve the cpp backend only: under use_backend("reference")
    the graph calls fastvae::<op> (set_backend recompiles: Dynamo guards on
    the choice), and half precision stays with the Python op too."""
    torch._dynamo.reset()
    mu = torch.randn(4, 3)
    fn = torch.compile(lambda m: fastvae.kl_normal(m, m), fullgraph=True, dynamic=False)

    def ops_run(t):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(t)
        return {e.key for e in prof.key_averages() if "kl_normal" in e.key}

    fastvae._backend.set_backend(None)
    assert ops_run(mu) == {"fastvae_cpu::kl_normal"}
    with fastvae.use_backend("reference"):
        assert ops_run(mu) == {"fastvae::kl_normal"}
    assert ops_run(mu) == {"fastvae_cpu::kl_normal"}
    assert ops_run(mu.bfloat16()) == {"fastvae::kl_normal"}


# -- the objectives under torch.compile: Dynamo traces the decoder alone ------------
# (fastvae/_opaque.py: the steps before and after the decoder are opaque calls,
# which AOT autograd traces; Dynamo guards on their arguments only)


def _guard_sources(fn) -> list[str]:
    """The source of every guard Dynamo installed for fn's compiled frames."""
    out = []

    def walk(manager):
        out.append(manager.get_source())
        for child in manager.get_child_managers():
            walk(child)

    for entry in torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__):
        walk(entry.guard_manager.root)
    return out


class PairDecoder(torch.nn.Module):
    """A Gaussian decoder that returns (mean, logvar): a tuple of tensors."""

    def __init__(self, latent=3, d=12):
        super().__init__()
        self.net = torch.nn.Linear(latent, 2 * d)

    def forward(self, z):
        mean, logvar = self.net(z).chunk(2, dim=-1)
        return mean, logvar


def _objective_loss(objective):
    """(loss(model, x), the model's decoder): each objective the compiled path takes."""
    def loss(model, x):
        mu, logvar = model.enc(x).chunk(2, dim=-1)
        if objective == "elbo":
            return -fastvae.elbo(torch.sigmoid(x), mu, logvar, model.dec, likelihood="bernoulli")
        if objective == "elbo, n_samples=3, sum, beta=0.5":
            return -fastvae.elbo(x, mu, logvar, model.dec, likelihood="gaussian", n_samples=3, reduction="sum",
                                 beta=0.5)
        if objective == "elbo, (mean, logvar) decoder":
            return -fastvae.elbo(x, mu, logvar, model.pair, likelihood="gaussian")
        if objective == "elbo_terms, n_samples=2":  # the loss, then each term
            t = fastvae.elbo_terms(torch.sigmoid(x), mu, logvar, model.dec, likelihood="bernoulli", n_samples=2)
            assert t.kl_analytic
            return -t.bound, t.reconstruction, t.kl, t.kl_per_dim
        if objective.startswith("iwae_terms"):
            t = fastvae.iwae_terms(torch.sigmoid(x), mu, logvar, model.dec, k=4, likelihood="bernoulli",
                                   estimator=objective.split(" ")[-1])
            return -t.bound, t.reconstruction, t.kl, t.ess, t.log_weights
        estimator = objective.split(" ")[-1]
        return -fastvae.iwae(torch.sigmoid(x), mu, logvar, model.dec, k=4, likelihood="bernoulli",
                             estimator=estimator)
    return loss


OBJECTIVES = ["elbo", "elbo, n_samples=3, sum, beta=0.5", "elbo, (mean, logvar) decoder", "iwae iwae", "iwae stl",
              "iwae dreg", "elbo_terms, n_samples=2", "iwae_terms iwae", "iwae_terms dreg"]


@pytest.mark.quick_one  # test_compile_changes.py compiles every planned objective in the quick tier
@pytest.mark.parametrize("objective", dreg_compile_cases(OBJECTIVES))
def test_compiled_objectives_match_eager(objective):
    """The compiled path (opaque calls around the decoder) gives eager's bound
    and gradients for the same torch seed."""
    fastvae._backend.set_backend(None)
    torch.manual_seed(0)
    model, x = TinyVAE(), torch.randn(8, 12)
    model.pair = PairDecoder()
    decoder = model.pair if "(mean, logvar)" in objective else model.dec
    params = [*model.enc.parameters(), *decoder.parameters()]
    assert_compiled_matches_eager(_objective_loss(objective), (model, x), params, torch_seed=3)


@pytest.mark.parametrize("objective", dreg_compile_cases(["elbo", "elbo, (mean, logvar) decoder", "iwae iwae",
                                                           "iwae dreg", "elbo_terms, n_samples=2", "iwae_terms dreg"]))
def test_compiled_objectives_guard_on_few_fastvae_globals(objective):
    """Dynamo traces the decoder and a few lines of fastvae: its guards name
    none of the modules of the checks and the ops (traced whole, the digits
    ELBO step guarded on 170 fastvae sources, which cost it 4%)."""
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    model, x = TinyVAE(), torch.randn(8, 12)
    model.pair = PairDecoder()
    fn = _objective_loss(objective)
    out = torch.compile(fn, fullgraph=True)(model, x)
    (out[0] if isinstance(out, tuple) else out).backward()
    fastvae_sources = [s for s in _guard_sources(fn) if "fastvae" in s]
    internal = ("_validate", "_decoder", "_value_checks", "_likelihood_layout", "_dot_ops_dot_", "_CPU_TWINS")
    assert not [s for s in fastvae_sources if any(name in s for name in internal)], fastvae_sources
    # today 30 for elbo, 42 for DReG: the public function's defaults, the path's functions, DReG's hooks
    assert len(fastvae_sources) <= 50, fastvae_sources


def test_compiled_elbo_recompiles_when_the_backend_changes():
    """The requested backend is an argument of the opaque calls, so Dynamo
    guards on it: under use_backend("reference") the graph calls the Python
    op (fastvae::), back on the cpp backend the C++ twin (fastvae_cpu::)."""
    torch._dynamo.reset()
    model, x = TinyVAE(), torch.randn(8, 12)
    fn = torch.compile(_objective_loss("elbo"), fullgraph=True)

    def likelihood_ops():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(model, x)
        return {e.key for e in prof.key_averages() if e.key.endswith("::bernoulli_log_prob")}

    fastvae._backend.set_backend(None)
    twin = {"fastvae_cpu::bernoulli_log_prob"} if (fastvae._backend.cpp_available()
                                                    and fastvae._backend.cpp_module().HAS_TORCH_OPS) else None
    first = likelihood_ops()
    if twin is not None:
        assert first == twin
    with fastvae.use_backend("reference"):
        assert likelihood_ops() == {"fastvae::bernoulli_log_prob"}
    assert likelihood_ops() == first


@pytest.mark.parametrize("bad, message", [
    ({"likelihood": "bernouli"}, "likelihood must be one of"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"n_samples": 0}, "n_samples"),
    ({"beta": -1.0}, "beta"),
])
def test_compiled_elbo_errors_name_the_argument(bad, message):
    """A bad argument raises while torch.compile traces; Dynamo wraps the
    error, whose cause chain holds fastvae's own (the message names the argument)."""
    torch._dynamo.reset()
    model, x = TinyVAE(), torch.rand(8, 12)
    kwargs = {"likelihood": "bernoulli", **bad}

    def loss(x):
        mu, logvar = model.enc(x).chunk(2, dim=-1)
        return fastvae.elbo(x, mu, logvar, model.dec, **kwargs)

    with pytest.raises(Exception) as info:
        torch.compile(loss, fullgraph=True)(x)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, (ValueError, TypeError)) and message in str(e) for e in chain), chain


@pytest.mark.quick_one  # a compile each (~20 s); test_compile_changes.py changes every objective's shapes
@pytest.mark.parametrize("objective", dreg_compile_cases(["elbo", "iwae dreg"]))
def test_compiled_objectives_follow_a_changing_batch(objective):
    """A smaller last batch makes Dynamo recompile with dynamic shapes: the
    opaque calls are traced with symbolic sizes and still give eager's
    bound and gradients, down to a batch of one."""
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyVAE()
    fn = _objective_loss(objective)
    compiled = torch.compile(fn, fullgraph=True)
    params = [*model.enc.parameters(), *model.dec.parameters()]
    for batch in (8, 5, 1):
        x = torch.randn(batch, 12)
        torch.manual_seed(4)
        got = compiled(model, x)
        got_grads = torch.autograd.grad(got, params)
        torch.manual_seed(4)
        want = fn(model, x)
        want_grads = torch.autograd.grad(want, params)
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_importing_fastvae_leaves_dynamo_unloaded():
    """fastvae._opaque (which imports torch._dynamo) loads only when Dynamo
    first traces an objective: importing torch._dynamo would double the
    time of ``import fastvae`` for users who never compile."""
    import subprocess
    import sys

    code = ("import sys, fastvae; assert 'torch._dynamo' not in sys.modules, 'dynamo'; "
            "assert 'fastvae._opaque' not in sys.modules, 'opaque'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("objective", ["iwae dreg", "iwae_terms dreg"])
def test_compiled_dreg_before_torch_2_13_says_what_to_do(objective, monkeypatch):
    """Dynamo before torch 2.13 cannot trace DReG's gradient hooks (2.11 looped
    until a RecursionError, seen on an H200): there fastvae raises an error
    that names the estimator, the torch version needed and the way out."""
    monkeypatch.setattr(fastvae.objectives, "DREG_COMPILES", False)
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    model, x = TinyVAE(), torch.randn(8, 12)
    with pytest.raises(Exception) as info:
        torch.compile(_objective_loss(objective), fullgraph=True)(model, x)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, RuntimeError) and "estimator='dreg' under torch.compile needs torch 2.13" in str(e)
               and "torch.compiler.disable" in str(e) for e in chain), chain
    torch._dynamo.reset()
    with torch.no_grad():  # no gradient, no hook: the bound compiles on any torch
        torch.compile(_objective_loss(objective), fullgraph=True)(model, x)
