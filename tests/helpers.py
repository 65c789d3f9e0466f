"""Comparison against the float64 reference with a per-element, condition-aware
tolerance: |actual - expected| <= rtol * scale, where scale bounds the size of
the terms that produced the value (so a sum of large terms that cancels is
judged against the terms, not against its small result). NaN never passes."""
import functools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvae.objectives import DREG_COMPILES

# Relative tolerance per dtype of the tensor under test (computed from the
# float64 reference, so this is the kernel's own rounding error).
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def assert_same_but_fma(got, want) -> None:
    """The same bits, but on a GPU: there two kernels that compute the same
    thing (a fused one and the separate ones, or two forms of a block) are
    compiled apart, and the GPU compiler contracts their multiply-adds into
    FMAs in different places (the interpreter and the C++ kernels round every
    step). An FMA moves a result by at most an ulp of the product it absorbs,
    so on a GPU each value agrees to 8 eps of the largest finite magnitude in
    its row (the last dimension; each element of a 1-d tensor is a row's own
    sum), and the non-finite values exactly. No NaN either way."""
    assert not torch.isnan(got).any()
    if got.device.type != "cuda":
        assert torch.equal(got, want)
        return
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite], want[~finite])
    size = torch.where(finite, want.abs(), 0.0)
    if size.dim() > 1:
        size = size.amax(-1, keepdim=True).expand_as(size)
    err = torch.where(finite, (got - want).abs(), 0.0)
    bound = 8 * torch.finfo(want.dtype).eps * size
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {want.numel()} values differ by more than 8 eps of their row's "
                           f"largest: max error {float(err.max()):.3g}")


def assert_close(actual, expected, scale, name=""):
    rtol = RTOL[actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    s = scale.detach().double().cpu().expand_as(e)
    assert not torch.isnan(a).any(), f"{name}: NaN at {torch.isnan(a).nonzero()[:5].tolist()}"
    assert torch.isfinite(e).all(), f"{name}: reference is not finite (bad test input)"
    # tiny floor for the output dtype's smallest normal numbers
    tiny = torch.finfo(actual.dtype).tiny
    err = (a - e).abs()
    bound = rtol * s + tiny
    bad = ~(err <= bound)
    if bad.any():
        i = int(torch.argmax((err / bound).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements off; worst at flat index {i}: "
            f"actual {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
            f"error {err.flatten()[i].item():.3e} > bound {bound.flatten()[i].item():.3e}"
        )


def grads_and_float64_leaves(out, inputs, seed, dtype, device):
    """(g, grads, leaves, as64) of a check against the float64 oracle: g, a
    float64 incoming gradient drawn from ``seed``; grads, out's gradients in
    ``inputs`` given g in ``dtype``; leaves, a float64 CPU leaf of each input
    by id; as64(t), t's leaf (t itself in float64 where it is not an input;
    None for None)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, g.to(dtype).to(device))
    leaves = {id(t): t.detach().double().cpu().requires_grad_() for t in inputs}
    as64 = lambda t: None if t is None else leaves.get(id(t), t.detach().double().cpu())  # noqa: E731
    return g, grads, leaves, as64


def summed_like(elem, want):
    """elem (K, ..., D), per-element error scales, summed down to the shape of
    the gradient ``want`` (summed over samples and rows, per dimension, or a
    scalar): the error scale of a gradient that sums elem's terms."""
    scale = elem
    while scale.dim() > max(want.dim(), 1):
        scale = scale.sum(0)
    if want.dim() <= 1 and scale.shape != want.shape:
        scale = scale.reshape(-1, scale.shape[-1]).sum(0)
        scale = scale.sum() if want.dim() == 0 else scale
    return scale


def reference_tests(check, problems, half_examples=8, float16_caps=None, half_problem=None):
    """An op's two Hypothesis tests against its float64 oracle, for a test
    module to bind: check(problem, dtype, device) on float32 and float64
    inputs, and on bfloat16 and float16 ones with ``half_examples`` examples;
    float16_caps {key: bound} caps those keys of a float16 problem (where a
    gradient's 1 / variance must fit float16's 65504), and half_problem(problem)
    gives the problem both half dtypes take instead."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @given(p=problems)
    def test_forward_backward_match_reference(backend, dtype, p):
        check(p, dtype, backend[1])

    @settings(max_examples=half_examples)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @given(p=problems)
    def test_half_precision_matches_reference(backend, dtype, p):
        """The problems in half precision: float32 results (gradients in the
        inputs' dtype) against the float64 oracle of the same rounded inputs."""
        if half_problem is not None:
            p = half_problem(p)
        if dtype == torch.float16 and float16_caps:
            p = dict(p, **{k: min(p[k], bound) for k, bound in float16_caps.items()})
        check(p, dtype, backend[1])

    return test_forward_backward_match_reference, test_half_precision_matches_reference


class likelihood_checks:
    """A namespace (read as likelihood_checks.<check>) of the checks the
    likelihood ops' tests share: the leaves of a half-precision
    check, the refusal of a bad x, and those of every location-scale likelihood
    (x against a location and a scale parameter: gaussian_log_prob, laplace_log_prob)."""

    @staticmethod
    def half_precision_leaves(dtype, x_dtype, device, x, *params):
        """The leaves of a half-precision likelihood check, from float32 draws: x in
        ``x_dtype`` ("same": ``dtype``; float32 as under autocast), the
        distribution's parameters in ``dtype``."""
        x_dtype = dtype if x_dtype == "same" else x_dtype
        return x.to(x_dtype).to(device).requires_grad_(), *(t.to(dtype).to(device).requires_grad_() for t in params)

    @staticmethod
    def refuses_bad_x(log_prob, param, device, shape, dtype):
        """log_prob(x, param) with an x of ``shape`` (not param's rows), or of
        ``dtype`` (one it cannot read): errors that name x's shape and the dtype."""
        with pytest.raises(ValueError, match=r"x of shape \(" + ", ".join(map(str, shape)) + r"\)"):
            log_prob(torch.zeros(shape, device=device), param)
        with pytest.raises(TypeError, match="x must .*got dtype " + re.escape(str(dtype))):
            log_prob(torch.zeros(param.shape[-2:], dtype=dtype, device=device), param)

    @staticmethod
    def same_bits_twice(check, *args):
        """check(*args) -> (value, gradients), run twice: the same bits both
        times (a split backward's arrival counters are back at 0). Returns the
        first run's."""
        out, grads = check(*args)
        again, grads_again = check(*args)
        assert torch.equal(out, again)
        for a, b in zip(grads, grads_again):
            assert torch.equal(a, b)
        return out, grads

    @staticmethod
    def against_oracle(log_prob, oracle, x, loc, param):
        """log_prob(x, loc, param) and its summed gradients in loc and param,
        and the same of the float64 oracle at the same values: (out, grads,
        ref, ref_grads, the float64 x, loc, param)."""
        out = log_prob(x, loc, param)
        grads = torch.autograd.grad(out.sum(), [loc, param])
        x64 = x.double().cpu()
        l64, p64 = (t.detach().double().cpu().requires_grad_() for t in (loc, param))
        ref = oracle(x64, l64, p64)
        ref_grads = torch.autograd.grad(ref.sum(), [l64, p64])
        return out, grads, ref, ref_grads, (x64, l64.detach(), p64.detach())

    @staticmethod
    def location_scale_half_precision(log_prob, dtype, x_dtype, device):
        """(x, loc, param, out) of a half-precision check of a location-scale
        likelihood: x (4, 37) and loc (3, 4, 37) standard normal, the scale
        parameter uniform in [-1, 1), as half_precision_leaves rounds them;
        out = log_prob(x, loc, param), float32."""
        g = torch.Generator().manual_seed(5)
        x, loc, param = likelihood_checks.half_precision_leaves(
            dtype, x_dtype, device, torch.randn(4, 37, generator=g), torch.randn(3, 4, 37, generator=g),
            torch.rand(3, 4, 37, generator=g) * 2 - 1)
        out = log_prob(x, loc, param)
        assert out.dtype == torch.float32
        return x, loc, param, out

    @staticmethod
    def location_scale_shapes(draw, dims):
        """(D, batch, K) of a location-scale likelihood's Hypothesis problem: D
        from dims, up to two batch dimensions, K None (no sample dimension: x
        has the location's shape), 1, 2 or 5, and K * B * D at most 12000."""
        D = draw(st.sampled_from(dims))
        batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
        K = draw(st.sampled_from([None, 1, 2, 5]))
        while math.prod(batch) * (K or 1) * D > 12000 and batch:
            batch = batch[1:]
        return D, batch, K

    @staticmethod
    def location_scale_cases(log_prob, param):
        """A location-scale likelihood's (launch_case, thread_count_calls,
        fallback_call) for tests/test_launches.py and tests/test_backend.py;
        ``param`` is its scale parameter's keyword."""

        def launch_case(op, B, L, K, D):
            """One forward + backward at a training size; ``op`` makes the call
            from the function and its leaves' shapes (x binary, made without a
            draw; a per-element scale parameter)."""
            x = (torch.arange(B * D).reshape(B, D) % 2).float()
            return op(lambda m, s: log_prob(x, m, s), (K, B, D), (K, B, D))

        def thread_count_calls(leaf, run):
            """Calls with enough work for several threads, whose bits must not
            depend on the thread count: few x rows against many samples with a
            per-dimension scale parameter (the folded layout; its gradient sums
            over every row), and many rows with a per-row one."""
            x_few, loc_few, s_dim = leaf(8, 16), leaf(1000, 8, 16), leaf(16)
            x_many, loc_many, s_row = leaf(600, 40), leaf(4, 600, 40), leaf(600, 40)
            call = lambda a, b, c: log_prob(a, b, **{param: c})  # noqa: E731
            return [lambda: run(call, x_few, loc_few, s_dim), lambda: run(call, x_many, loc_many, s_row)]

        def fallback_call(leaf, run):
            """A small call, run with and without the extension (few x rows
            against many samples)."""
            x, loc = leaf(2, 16), leaf(2048, 2, 16)
            return lambda: run(lambda a, b: log_prob(a, b), x, loc)

        return launch_case, thread_count_calls, fallback_call

    @staticmethod
    def location_scale_double_backward_cases(name, log_prob, r):
        """tests/test_double_backward.py's cases of every scale-parameter
        layout, each served by a C++ operator: per element, per row, per
        dimension, no sample dimension, a scale tensor and a fixed scale."""
        f = lambda x, m, s: log_prob(x, m, s)  # noqa: E731
        return {
            f"{name}_per_element": (f, [r(3, 5), r(2, 3, 5), r(2, 3, 5)], True),
            f"{name}_per_row": (f, [r(3, 5), r(2, 3, 5), r(3, 5)], True),
            f"{name}_per_dim": (f, [r(3, 5), r(2, 3, 5), r(5)], True),
            f"{name}_no_samples": (f, [r(3, 5), r(3, 5), r(3, 5)], True),
            f"{name}_scale_tensor": (lambda x, m, s: log_prob(x, m, scale=s.exp()), [r(3, 5), r(2, 3, 5), r(())], True),
            f"{name}_fixed_scale": (lambda x, m: log_prob(x, m, scale=0.7), [r(3, 5), r(2, 3, 5)], True),
        }

    @staticmethod
    def refuses_bad_location_scale_input(log_prob, param, device):
        """log_prob(x, loc, <param>): errors that name a bad x, the scale parameter
        ``param`` (its keyword) of another shape, both it and a scale, and another
        device; a float64 x with a float32 location gives float64. Returns the
        float32 (x (4, 3), loc (2, 4, 3)) it tried."""
        x = torch.zeros(4, 3, device=device)
        loc = torch.zeros(2, 4, 3, device=device)
        likelihood_checks.refuses_bad_x(log_prob, loc, device, (5, 3), torch.int64)
        with pytest.raises(ValueError, match=param + r" of shape \(2,\)"):
            log_prob(x, loc, torch.zeros(2, device=device))
        assert log_prob(x.double(), loc).dtype == torch.float64  # mixed dtypes: float64 wins
        with pytest.raises(ValueError, match=f"at most one of {param}, scale"):
            log_prob(x, loc, torch.zeros(3, device=device), scale=2.0)
        with pytest.raises(ValueError, match="device"):
            log_prob(torch.zeros(4, 3, device="meta"), loc)
        return x, loc

    @staticmethod
    def x_is_not_copied_per_sample(log_prob, device):
        """x (B, D) against a location (K, B, D), float64: the op saves x at its own
        size (nothing of K * B * D elements but the location). Returns x, the
        location and dx of the summed log-probability."""
        x = torch.randn(4, 9, device=device, dtype=torch.float64, requires_grad=True)
        loc = torch.randn(3, 4, 9, device=device, dtype=torch.float64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = log_prob(x, loc)
        assert (4, 9) in saved and (3, 4, 9) in saved and max(math.prod(s) for s in saved) == 3 * 4 * 9
        (dx,) = torch.autograd.grad(out.sum(), [x])
        return x, loc, dx

    @staticmethod
    def event_dims_flatten(log_prob, device, name):
        """event_dims=3 on x (B, C, H, W) against a location (K, B, C, H, W) and a
        per-channel scale parameter equals the flattened (K, B, C*H*W) call, x
        broadcast over K; event_dims=0 is refused. Returns x and the location."""
        g = torch.Generator().manual_seed(0)
        K, B, C, H, W = 2, 3, 2, 3, 4
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(device)
        loc = torch.randn(K, B, C, H, W, generator=g, dtype=torch.float64).to(device)
        s = torch.randn(C, 1, 1, generator=g, dtype=torch.float64).to(device)
        got = log_prob(x, loc, s, event_dims=3)
        want = log_prob(x.reshape(B, -1), loc.reshape(K, B, -1), s.expand(C, H, W).reshape(-1))
        assert got.shape == (K, B)
        assert_close(got, want, 1 + want.abs(), f"{name} event_dims=3")
        with pytest.raises(ValueError, match="event_dims must be >= 1"):
            log_prob(x, loc, event_dims=0)
        return x, loc


def float_dtype_examples(examples, **strategies):
    """The decorators of a test over float32 and float64 inputs with
    ``examples`` Hypothesis examples (None: the profile's) of ``strategies``
    (its keyword arguments)."""
    def decorate(test):
        test = given(**strategies)(test)
        if examples is not None:
            test = settings(max_examples=examples)(test)
        return pytest.mark.parametrize("dtype", [torch.float32, torch.float64])(test)
    return decorate


class sampler_checks:
    """A namespace (read as sampler_checks.<check>) of the checks the samplers
    share. In those of the samplers of two log-parameters per element
    (sample_location_scale, sample_positive), ``apply`` is the op's
    Function.apply(p0, p1, seed, family index, K, stop_score), ``oracle`` its
    float64 oracle(family, p0, p1, seed, K, dtype, stop_score) -> (z, log q),
    differentiable in p0, p1."""

    @staticmethod
    def refuses_bad_arguments(sample, mu, param, device):
        """sample(mu, param, n_samples): errors that name a param on another
        device, n_samples of 0 or a float, 0-d inputs and a mu that is a list."""
        with pytest.raises(ValueError, match="device"):
            sample(mu, torch.zeros(param.shape, device="meta"))
        with pytest.raises(ValueError, match="n_samples"):
            sample(mu, param, 0)
        with pytest.raises(TypeError, match="n_samples"):
            sample(mu, param, 2.0)
        with pytest.raises(ValueError, match="0-d"):
            sample(torch.zeros((), device=device), torch.zeros((), device=device))
        with pytest.raises(TypeError, match="Tensor"):
            sample([1.0], param)

    @staticmethod
    def normal_call(sample, mu, param, n_samples, data_seed):
        """(z, kl, seed, K) of a Normal posterior's sampler (sample_normal,
        sample_normal_tril) called as users call it, with a generator seeded
        data_seed + 1 on mu's device: seed is the Philox seed it drew, K the
        samples drawn (1 where n_samples is None)."""
        device = mu.device
        gen_seed = data_seed + 1
        z, kl = sample(mu, param, n_samples, generator=torch.Generator(device).manual_seed(gen_seed))
        from fastvae._op import draw_seed

        seed = int(draw_seed(device, torch.Generator(device).manual_seed(gen_seed)))
        return z, kl, seed, 1 if n_samples is None else n_samples

    @staticmethod
    def n_samples_none_is_first_sample(sample, mu, param):
        """sample(mu, param) without n_samples draws, bit for bit, the first of
        n_samples=1's samples and its KL, without the sample dimension."""
        device = mu.device
        z1, kl1 = sample(mu, param, generator=torch.Generator(device).manual_seed(3))
        zk, klk = sample(mu, param, 1, generator=torch.Generator(device).manual_seed(3))
        assert z1.shape == mu.shape and zk.shape == (1, *mu.shape)
        assert torch.equal(z1, zk[0]) and torch.equal(kl1, klk)

    @staticmethod
    def normal_backward(apply, mu, param, data_seed, K, dtype):
        """A Normal posterior's sampler's gradients in mu and its second
        parameter, apply(mu, param, seed, K) the op's Function.apply, given
        incoming gradients of z (K, ..., L) and the KL (...) drawn in float64 from
        data_seed + 2 and rounded to dtype: (seed, those gradients in float64,
        the op's gradients, float64 CPU leaves of mu and param for the oracle)."""
        device = mu.device
        seed = data_seed * 7919 + 13
        g = torch.Generator().manual_seed(data_seed + 2)
        gz = torch.randn((K, *mu.shape), generator=g, dtype=torch.float64).to(dtype)
        gk = torch.randn(mu.shape[:-1], generator=g, dtype=torch.float64).to(dtype)
        z, kl = apply(mu, param, seed_tensor(seed, device), K)
        grads = torch.autograd.grad((z, kl), (mu, param), (gz.to(device), gk.to(device)))
        leaves = tuple(t.detach().double().cpu().requires_grad_() for t in (mu, param))
        return seed, gz.double(), gk.double(), grads, leaves

    @staticmethod
    def forward(apply, families, make_inputs, problem, dtype, device):
        """The op's samples of a Hypothesis problem (family, batch, L, K, data
        seed, bound), their dtype and shapes checked: (seed, p0, p1, z, log q),
        p0, p1 make_inputs' two parameters."""
        family, batch, L, K, data_seed, bound = problem
        p0, p1 = make_inputs(batch, L, data_seed, bound, dtype, device)
        seed = data_seed * 31 + 7
        z, log_q = apply(p0, p1, seed_tensor(seed, device), families.index(family), K, False)
        assert z.dtype == dtype and log_q.dtype == dtype
        assert z.shape == (K, *batch, L) and log_q.shape == (K, *batch)
        return seed, p0, p1, z, log_q

    @staticmethod
    def backward(apply, families, make_inputs, problem, dtype, device, stop_score):
        """The op's gradients of a Hypothesis problem (family, batch, L, K, data
        seed, bound): (seed, gz, gq, grads, leaves), grads those of make_inputs'
        two parameters given incoming gradients gz, gq (float64 draws from data
        seed + 1, rounded to dtype; None where unused), leaves the parameters'
        float64 CPU copies, leaves for the oracle."""
        family, batch, L, K, data_seed, bound = problem
        p0, p1 = make_inputs(batch, L, data_seed, bound, dtype, device, requires_grad=True)
        seed = data_seed * 13 + 5
        g = torch.Generator().manual_seed(data_seed + 1)
        gz = torch.randn((K, *batch, L), generator=g, dtype=torch.float64).to(dtype)
        gq = torch.randn((K, *batch), generator=g, dtype=torch.float64).to(dtype)
        z, log_q = apply(p0, p1, seed_tensor(seed, device), families.index(family), K, stop_score)
        grads = torch.autograd.grad((z, log_q), (p0, p1), (gz.to(device), gq.to(device)), allow_unused=True)
        leaves = tuple(p.detach().double().cpu().requires_grad_() for p in (p0, p1))
        return seed, gz, gq, grads, leaves

    @staticmethod
    def split_over_samples(apply, oracle, families, family, p0, p1):
        """K = 7 samples of p0, p1 (one short row, so that the Triton backward's
        split path, when forced, splits them) with stop_score: the gradients of
        z.sum() + sum_k k log q_k land in p0.grad, p1.grad; returns the float64
        oracle's (p0's, p1's)."""
        device = p0.device
        z, log_q = apply(p0, p1, seed_tensor(99, device), families.index(family), 7, True)
        (z.sum() + (log_q * torch.arange(7, device=device)[:, None]).sum()).backward()
        a, b = (p.detach().double().cpu().requires_grad_() for p in (p0, p1))
        z_ref, q_ref = oracle(family, a, b, 99, 7, p0.dtype, True)
        (z_ref.sum() + (q_ref * torch.arange(7)[:, None]).sum()).backward()
        return a.grad, b.grad

    @staticmethod
    def double_backward(apply, families, family, p0, p1, stop_score, reads_p1=True):
        """Whether gradgradcheck (float64) passes the op's closed-form second
        derivative at p0, p1, K = 2, Philox seed 17 (p1 not a leaf, p0's value,
        where the family does not read it)."""
        seed = seed_tensor(17, p0.device)
        index = families.index(family)
        if not reads_p1:
            return torch.autograd.gradgradcheck(lambda a: apply(a, a.detach(), seed, index, 2, stop_score), (p0,),
                                                atol=1e-6, rtol=1e-5)
        return torch.autograd.gradgradcheck(lambda a, b: apply(a, b, seed, index, 2, stop_score), (p0, p1),
                                            atol=1e-6, rtol=1e-5)

    @staticmethod
    def evaluation_layout(at, forward, families, p0, p1):
        """Yields (family, z, log q, the oracle's z, log q) of every family in the
        evaluation's layout: 4 samples of p0, p1 (3, 6) from offset 7 (not
        divisible by 4), sample stride 6, row stride 24, Philox seed 5; ``at``
        is the op's <op>_at, ``forward`` its oracle's forward (float64)."""
        for index, family in enumerate(families):
            z, log_q = at(index, p0, p1, seed_tensor(5, p0.device), 4, offset0=7, sample_stride=6, row_stride=4 * 6)
            zr = torch.empty(4, 3, 6, dtype=torch.float64)
            qr = torch.empty(4, 3, dtype=torch.float64)
            forward(p0.double().cpu(), p1.double().cpu(), 5, index, 7, 6, 24, zr, qr)
            yield family, z, log_q, zr, qr


class fused_kl_checks:
    """The checks a family sampler's ELBO draw fused with its closed-form KL
    shares with every such sampler (sample_location_scale_kl, sample_positive_kl)."""

    @staticmethod
    def fused_and_separate(fused, separate, leaves, K, shape, g, dtype, device, create_graph=False):
        """[(outputs, gradients)] of ``fused(seed)`` and ``separate(seed)``,
        each (z (K, *shape), kl (shape[:-1])), at the same seed: the gradients
        in ``leaves`` of z and the KL weighted by random weights (from
        generator g), with a graph where ``create_graph``."""
        w_z = torch.randn(K, *shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        w_kl = torch.randn(shape[:-1], generator=g, dtype=torch.float64).to(dtype).to(device)
        results = []
        for draw in (fused, separate):
            z, kl = draw(seed_tensor(11, device))
            grads = torch.autograd.grad((z * w_z).sum() + (kl * w_kl).sum(), leaves, create_graph=create_graph,
                                        allow_unused=True)
            results.append(((z, kl), grads))
        return results

    @staticmethod
    def differentiates_twice(fused_and_separate):
        """A create_graph backward of the fused Function: the second
        derivatives of the two Functions it fuses. ``fused_and_separate``:
        ((fused, separate), leaves), each (outputs, gradients with a graph)."""
        (fused, separate), leaves = fused_and_separate
        for a, b in zip(fused[1], separate[1]):
            second = [torch.autograd.grad(x.sum(), leaves, retain_graph=True, allow_unused=True) for x in (a, b)]
            for u, v in zip(*second):
                assert (u is None) == (v is None)
                if u is not None:
                    torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)

    @staticmethod
    def compiles_with_changing_shapes(unchecked, family, kl_family, device):
        """Under torch.compile the fused op (``unchecked(family, kl_family, p0,
        p1, prior0, prior1, k, generator)``) takes batch, width, sample count
        and dtype changes between calls, as a training and evaluation loop
        makes them, with eager's values and gradients."""
        torch._dynamo.reset()

        def step(p0, p1, r0, r1, k):
            z, kl = unchecked(family, kl_family, p0, p1, r0, r1, k, None)
            return (z * z).sum() + kl.sum()

        compiled = torch.compile(step)
        for N, L, k, dtype in [(8, 4, 1, torch.float32), (13, 4, 1, torch.float32), (13, 6, 3, torch.float32),
                               (5, 6, 1, torch.float64)]:
            g = torch.Generator().manual_seed(N + L)
            leaves = [(torch.randn(N, L, generator=g) * 0.5).to(dtype).to(device).requires_grad_() for _ in range(2)]
            leaves += [(torch.randn(L, generator=g) * 0.3).to(dtype).to(device).requires_grad_() for _ in range(2)]
            values = []
            for fn in (compiled, step):
                torch.manual_seed(3)  # the seed comes from torch's generator
                out = fn(*leaves, k)
                values.append((out, torch.autograd.grad(out, leaves)))
            (a, ga), (b, gb) = values
            # (Inductor may sum z * z, and the prior's per-row gradients, in another order)
            eps = torch.finfo(dtype).eps
            assert torch.isfinite(a)
            torch.testing.assert_close(a, b, rtol=64 * eps, atol=0.0)
            for u, v in zip(ga, gb):
                torch.testing.assert_close(u, v, rtol=16 * eps, atol=16 * eps)


def seed_tensor(value, device):
    return torch.tensor(value, dtype=torch.int64, device=device)


def gen(seed):
    """A CPU torch.Generator seeded with ``seed``, for generator= arguments."""
    return torch.Generator().manual_seed(seed)


def philox_seed_of(gen_seed):
    """The Philox seed a call with generator=gen(gen_seed) draws."""
    from fastvae._op import draw_seed

    return int(draw_seed(torch.device("cpu"), gen(gen_seed)))


def run_gloo_ranks(script, args_of_rank, tmp_path, n=2, timeout=180):
    """Runs ``python -c script rank n init *args_of_rank(rank)`` for n gloo
    ranks on this machine (cpp backend, one thread each) and fails with the
    ranks' output if any exits non-zero."""
    import os
    import subprocess
    import sys

    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, FASTVAE_BACKEND="cpp", OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no dependence on the hostname resolving
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(n), init, *args_of_rank(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(n)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]


# estimator="dreg" under torch.compile needs torch >= 2.13 (fastvae.objectives.DREG_COMPILES says why;
# before, fastvae raises a clear error, which test_compile.py checks)
NEEDS_DREG_COMPILE = pytest.mark.skipif(
    not DREG_COMPILES, reason="estimator='dreg' under torch.compile needs torch >= 2.13")


def dreg_compile_cases(cases):
    """cases, those that name "dreg" marked NEEDS_DREG_COMPILE."""
    return [pytest.param(c, marks=NEEDS_DREG_COMPILE) if "dreg" in c else c for c in cases]


def assert_compiled_matches_eager(fn, args, params, *, torch_seed=0, rtol=1e-5, atol=1e-5, grad_rtol=1e-4):
    """fn(*args) under torch.compile(fullgraph=True) gives eager's values and
    gradients w.r.t. params (the same torch seed before each run, so the same
    Philox seed is drawn). fn returns a scalar loss or (loss, *extra outputs)."""
    def run(f):
        torch.manual_seed(torch_seed)
        out = f(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return outs, torch.autograd.grad(outs[0], params)

    torch._dynamo.reset()
    eager, eager_grads = run(fn)
    compiled, compiled_grads = run(torch.compile(fn, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=atol)


# -- decoders that fold the samples into the batch ------------------------------

FOLDED_FORMS = ("mean", "mean_logvar", "mean_channel_logvar", "normal", "independent_normal", "logits",
                "bernoulli_probs", "continuous_bernoulli", "categorical", "poisson", "negative_binomial", "zinb",
                "mixture_packed", "mixture_tuple")
# The view happens before any kernel runs, so the Triton interpreter child (about
# 1 ms a program, 40 s for the mixture forms alone) checks two forms that reach
# its kernels; the main process checks them all on the reference and C++ backends.
INTERPRETER_FOLDED_FORMS = ("mean_logvar", "bernoulli_probs")


def folded_decoder_case(form, device, B=3, L=2, seed=0):
    """(x, likelihood, decode, folded_decode) for one decoder output form on
    image-shaped x (B, C, H, W): decode honours the (..., L) -> (..., *event)
    contract, folded_decode runs the same network on z.reshape(-1, L) and
    returns its (S·B, *event) rows as they are (a conv decoder's habit). Both
    compute the same numbers, so the objectives must agree bit for bit."""
    import torch.distributions as dist

    g = torch.Generator().manual_seed(seed)
    C, H, W = (3, 2, 2) if form.startswith("mixture") else (2, 3, 2)
    M = 2
    if form == "categorical":
        x = torch.randint(0, 4, (B, C, H, W), generator=g)
    elif form in ("poisson", "negative_binomial", "zinb"):
        x = torch.randint(0, 6, (B, C, H, W), generator=g).double()
    elif form.startswith("mixture"):
        x = torch.randint(0, 256, (B, C, H, W), generator=g).double() / 127.5 - 1
    elif form in ("logits", "bernoulli_probs", "continuous_bernoulli"):
        x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    event = (C, H, W)
    pieces = {  # per-example shape of each output tensor
        "categorical": [(*event, 4)],
        "mean_logvar": [event, event], "normal": [event, event], "independent_normal": [event, event],
        "negative_binomial": [event], "zinb": [event, event, event],
        "mixture_packed": [(10 * M, H, W)], "mixture_tuple": [(M, H, W), (M, C, H, W), (M, C, H, W)],
    }.get(form, [event])
    sizes = [math.prod(p) for p in pieces]
    weight = (torch.randn(L, sum(sizes), generator=g, dtype=torch.float64) * 0.5).to(device)
    channel_logvar = (torch.randn(C, 1, 1, generator=g, dtype=torch.float64) * 0.3).to(device)
    gene_theta = torch.randn(*event, generator=g, dtype=torch.float64).to(device)  # per element of one example

    def finish(parts):
        if form == "mean":
            return parts[0]
        if form == "mean_logvar":
            return parts[0], parts[1] * 0.3
        if form == "mean_channel_logvar":
            return parts[0], channel_logvar
        if form == "normal":
            return dist.Normal(parts[0], (parts[1] * 0.15).exp())
        if form == "independent_normal":
            return dist.Independent(dist.Normal(parts[0], (parts[1] * 0.15).exp()), 3)
        if form == "bernoulli_probs":
            return dist.Bernoulli(probs=torch.sigmoid(parts[0]))
        if form == "negative_binomial":
            return parts[0], gene_theta
        if form == "zinb":
            return parts[0], parts[1], parts[2]
        if form == "mixture_tuple":
            return parts[0], parts[1].tanh(), parts[2] * 0.2 - 2
        return parts[0]

    def run(z, fold):
        flat = z.reshape(-1, z.shape[-1]) @ weight  # (N, sum(sizes)): the net sees a flat batch
        parts = [p.reshape(-1, *shape) for p, shape in zip(flat.split(sizes, -1), pieces)]
        if not fold:
            parts = [p.unflatten(0, z.shape[:-1]) for p in parts]
        return finish(parts)

    likelihood = {"mean": "gaussian", "mean_logvar": "gaussian", "mean_channel_logvar": "gaussian",
                  "logits": "bernoulli", "continuous_bernoulli": "continuous_bernoulli",
                  "categorical": "categorical", "poisson": "poisson", "negative_binomial": "negative_binomial",
                  "zinb": "zinb", "mixture_packed": "discretized_logistic_mixture",
                  "mixture_tuple": "discretized_logistic_mixture"}.get(form)  # None: the distribution implies it
    return x.to(device), likelihood, (lambda z: run(z, False)), (lambda z: run(z, True))


# The case functions each op in a folder of its own defines in its test module
# (fastvae/ops/<op>/test_<op>.py) for the checks that run over every op.
OP_CASES = ("launch_case", "thread_count_calls", "fallback_call", "double_backward_cases", "compile_cases",
            "twin_op_cases")


def op_cases(kind: str) -> dict:
    """op name -> its case function ``kind`` (one of OP_CASES), for every op in
    an op folder whose test module defines one (an op with no C++ operator has
    no compile_cases or twin_op_cases; tests/test_registry.py checks the rest).
    A family's folder (several ops) gives one function of each kind; those of
    PER_OP_CASES return {op name: its case}, the others all the family's cases,
    listed here under the folder's name."""
    import importlib

    from fastvae import _registry

    assert kind in OP_CASES, kind
    found = {}
    for name in _registry.FOLDERS:
        module = importlib.import_module(f"fastvae.ops.{name}.test_{name}")
        if not hasattr(module, kind):
            continue
        cases, ops = getattr(module, kind), _registry.folder_ops(name)
        if len(ops) == 1 or kind not in PER_OP_CASES:  # a one-op folder is named after its op
            found[name] = cases
        else:
            found.update((op.name, functools.partial(_family_case, cases, op.name)) for op in ops)
    return found


# the case functions that give one op's case (or calls): a family's give {op name: it}
PER_OP_CASES = ("launch_case", "thread_count_calls", "fallback_call")


def _family_case(cases, name, *args):
    return cases(*args)[name]


# -- an op's own per-signature plans (its op.py's PLANS) -----------------------


def _plan_triton() -> bool:
    from conftest import INTERPRET
    return INTERPRET or torch.cuda.is_available()


needs_plan_triton = pytest.mark.skipif(not _plan_triton(),
                                       reason="the plans serve the triton backend (interpreter child, GPU)")


def op_plans_match_the_general_launch(monkeypatch, op_module, call) -> list:
    """Runs ``call()`` (an op's own calls, as a compiled graph makes them: a
    sequence of tensors) with ``op_module``'s plans on twice (the first call
    makes its OP_PLANS, the second finds them) and off (the general launch),
    and checks that each planned run gives the general run's tensors bit for
    bit (same shapes and dtypes; no NaN, which plan_device poisons the plans'
    outputs with); leaves the plans on and returns the planned run."""
    runs = []
    for enabled in (True, True, False):
        monkeypatch.setattr(op_module, "ENABLED", enabled)
        runs.append(list(call()))
    monkeypatch.setattr(op_module, "ENABLED", True)
    assert op_module.OP_PLANS and None not in op_module.OP_PLANS.values()
    for planned in runs[:2]:
        for a, b in zip(planned, runs[2], strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and not torch.isnan(a).any()
            assert torch.equal(a, b)
    return runs[0]


# the scale parameter's layouts of a location-scale likelihood's ops (_likelihood_layout.kernel_var)
SCALE_LAYOUTS = ("element", "row", "dim")


def scale_likelihood_op_plans_check(monkeypatch, op_module, forward_op, backward_op, options: tuple, shape,
                                    splits, layout: str, dtype, device) -> None:
    """The op plans of a location-scale likelihood (``op_module``'s OP_PLANS:
    gaussian_log_prob's, laplace_log_prob's) against the general launch, its
    ops called as a compiled graph calls them: x (P, D), the decoder output
    (K, P, D) = ``shape`` and its scale parameter in ``layout``, contiguous,
    with the op's ``options`` after them. The forward and the backward for
    each set of gradients, bit for bit, the first call and the second
    (op_plans_match_the_general_launch); ``splits`` forced (the backward's
    partial sums over split samples) where not None. Then the calls the plans
    refuse, which make none: half precision, a decoder output whose rows are
    2 D apart (the halves of one output), an empty batch, a scale parameter
    of another dtype, a gradient of another dtype."""
    from fastvae.kernels import _common

    if splits is not None:
        monkeypatch.setattr(_common, "FORCE_SPLITS", splits)
    op_module.OP_PLANS.clear()
    K, P, D = shape
    g = torch.Generator().manual_seed(K * 100 + P * 10 + D)

    def rnd(*size):
        return (2 * torch.randn(size, generator=g, dtype=torch.float64)).to(dtype).to(device)

    x, out = rnd(P, D), rnd(K, P, D)
    param = {"element": rnd(K, P, D), "row": rnd(P, D), "dim": rnd(D)}[layout]
    grad_out = rnd(K, P)

    def calls():
        got = [forward_op(x, out, param, *options)]
        for need_dx in (False, True):
            for need_dparam in (False, True):
                got += backward_op(grad_out, x, out, param, *options, need_dx, need_dparam)
        return got

    planned = op_plans_match_the_general_launch(monkeypatch, op_module, calls)
    assert len(planned) == 1 + 1 + 2 + 2 + 3
    (plan,) = op_module.OP_PLANS.values()
    assert len(plan.launches()) == 1 + 4
    op_module.OP_PLANS.clear()
    forward_op(x.half(), out.half(), param.half(), *options)
    if K * P > 1:  # the halves of one decoder output: rows 2 D apart
        packed = torch.cat([out, param if layout == "element" else out], -1)
        forward_op(x, packed[..., :D], packed[..., D:] if layout == "element" else param, *options)
    forward_op(x[:0], out[:, :0], param[..., :0, :] if layout != "dim" else param, *options)
    other = torch.float64 if dtype is torch.float32 else torch.float32
    forward_op(x, out, param.to(other), *options)
    backward_op(grad_out.to(other), x, out, param, *options, True, True)
    assert len(op_module.OP_PLANS) == 0


def plan_templates(obj, path: str = "", depth: int = 0):
    """(path, tensor) of each output template a plan keeps (an attribute
    named ``*_like``), in the plan and in the fastvae objects, tuples, lists
    and dicts it holds (an objectives' Plan's SamplePlan and TailPlan)."""
    if isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif type(obj).__module__.startswith("fastvae") and type(obj).__name__ != "Launch":
        names = [n for k in type(obj).__mro__ for n in getattr(k, "__slots__", ())]
        items = ((n, getattr(obj, n, None)) for n in [*names, *getattr(obj, "__dict__", {})])
    else:
        return
    for name, value in items:
        where = f"{path}.{name}" if path else f"{type(obj).__name__}.{name}"
        if isinstance(value, torch.Tensor):
            if isinstance(name, str) and name.endswith("_like"):
                yield where, value
        elif depth < 3 and value is not None:
            yield from plan_templates(value, where, depth + 1)


def assert_plans_keep_one_element_templates(stores) -> int:
    """Every output template the plans in ``stores`` (PlanCaches) keep holds
    one element (fastvae._launch.template), not an output's memory; returns
    how many were checked."""
    checked = 0
    for plans in stores:
        for plan in plans.values():
            for where, t in plan_templates(plan):
                held = t.untyped_storage().nbytes()
                assert held <= t.element_size(), (
                    f"{where} {tuple(t.shape)} holds {held} bytes: a plan's template must hold one element")
                checked += 1
    return checked


def plan_device_fixture(op_module):
    """A fixture for the tests of ``op_module``'s plans (its PLANS and OP_PLANS):
    the device the triton backend runs on here (CPU tensors under the interpreter), no plan kept,
    the plans' outputs allocated full of NaN (a value a launch failed to write
    shows)."""

    @pytest.fixture
    def plan_device(monkeypatch):
        import fastvae

        from conftest import INTERPRET
        device = "cpu" if INTERPRET else "cuda"
        fastvae.set_backend(None if device == "cuda" else "triton")
        monkeypatch.setattr(op_module, "empty", lambda like: torch.full_like(like, math.nan))
        stores = [getattr(op_module, name) for name in ("PLANS", "OP_PLANS") if hasattr(op_module, name)]
        for plans in stores:
            plans.clear()
        yield device
        assert_plans_keep_one_element_templates(stores)
        for plans in stores:
            plans.clear()

    return plan_device
