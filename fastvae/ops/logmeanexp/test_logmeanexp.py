"""logmeanexp, importance_weights, effective_sample_size and the streaming
state, against their float64 oracle (fastvae/ops/logmeanexp/__init__.py), per
backend (the root conftest.py), and the family's cases of the suite-wide
checks."""
import math
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae
from fastvae.ops import logmeanexp as oracle
from fastvae.ops.logmeanexp import op as logmeanexp_module
from fastvae.ops.logmeanexp.op import (
    EffectiveSampleSize,
    ImportanceWeights,
    LogMeanExp,
    effective_sample_size_backward_op,
    effective_sample_size_op,
    importance_weights_backward_op,
    importance_weights_op,
    logmeanexp_backward_op,
    logmeanexp_op,
)
from fastvae.ops.sample_normal.op import SampleNormal

from conftest import INTERPRET
from helpers import (
    RTOL,
    assert_close,
    assert_compiled_matches_eager,
    float_dtype_examples,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
    run_gloo_ranks,
)

INF = math.inf
# K: one sample, small odd, a power of two, and past one Triton tile of rows
SAMPLES = [1, 2, 3, 7, 64, 100, 1025]


@st.composite
def problems(draw):
    """A log-weight tensor description: K samples along `dim` of a small batch."""
    K = draw(st.sampled_from(SAMPLES))
    batch = list(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    while K * math.prod(batch) > 6000 and batch:
        batch = batch[1:]
    dim = draw(st.integers(0, len(batch)))
    return dict(
        K=K, batch=batch, dim=dim, keepdim=draw(st.booleans()),
        bound=draw(st.sampled_from([1.0, 30.0, 1.0e4])),
        neg_inf=draw(st.sampled_from(["none", "entries", "columns"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_lw(p, dtype, device):
    """(lw with the samples along p["dim"], the same as float64 (K, ...) for the
    reference, K, the dim)."""
    g = torch.Generator().manual_seed(p["seed"])
    K, batch = p["K"], p["batch"]
    lw = (torch.rand((K, *batch), generator=g, dtype=torch.float64) * 2 - 1) * p["bound"]
    if p["neg_inf"] == "entries":
        lw[torch.rand(lw.shape, generator=g) < 0.3] = -INF
    elif p["neg_inf"] == "columns" and lw[0].numel() > 0:
        cols = torch.rand(lw.shape[1:], generator=g) < 0.4
        lw[:, cols] = -INF
    lw = lw.to(dtype)
    return lw.movedim(0, p["dim"]).to(device).requires_grad_(), lw.double(), K, p["dim"]


def state_terms(lw64):
    """Per-column shift and |lw - shift| of the float64 (K, ...) log-weights, the
    magnitudes the tolerances scale with."""
    m, _ = oracle.logmeanexp_state(lw64)
    shift = torch.where(m.isinf(), torch.zeros_like(m), m)
    dist = torch.where(torch.isinf(lw64), torch.zeros_like(lw64), (lw64 - shift).abs())
    return shift, dist


def flushed(dtype, multiplier):
    """A scale allowing the absolute error of exp() results below the smallest
    normal float being flushed to 0 (as fast_exp does, and the GPU's
    ex2.approx.ftz): up to tiny * multiplier, multiplier being what scales e."""
    return torch.finfo(dtype).tiny / RTOL[dtype] * multiplier


def assert_close_or_inf(actual, expected, scale, name):
    """assert_close on the finite reference values; exact equality on infinite ones."""
    fin = torch.isfinite(expected)
    a = actual.detach().double().cpu()
    assert torch.equal(a[~fin], expected[~fin]), f"{name}: {a[~fin]} != {expected[~fin]}"
    assert_close(actual.detach().cpu()[fin], expected[fin], scale.expand_as(expected)[fin], name)


def to_front(t, dim, keepdim):
    """An output over `dim` (kept or not) or a (dim-placed) input, as (K, ...)-aligned."""
    return t.squeeze(dim) if keepdim else t


@float_dtype_examples(None, p=problems())
def test_logmeanexp_forward_backward(backend, dtype, p):
    check_logmeanexp(backend, dtype, p)


def grads_against_oracle(out, lw, lw64, fn, p, dtype, device, front):
    """(dlw, ref, g64, dref): out's gradient in lw given g, a float64 gradient
    drawn from p's seed and rounded to ``dtype``; the oracle ``fn``'s value at
    lw64 (samples first) and its gradient given g64 = front(g), g in the
    oracle's layout."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    (dlw,) = torch.autograd.grad(out, lw, g.to(dtype).to(device))
    x = lw64.clone().requires_grad_()
    ref = fn(x)
    g64 = front(g.to(dtype).double())
    (dref,) = torch.autograd.grad(ref, x, g64)
    return dlw, ref, g64, dref


def check_logmeanexp(backend, dtype, p):
    _, device = backend
    lw, lw64, K, dim = make_lw(p, dtype, device)
    out = fastvae.logmeanexp(lw, dim=dim, keepdim=p["keepdim"])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # a bound is never half
    expected_shape = list(lw.shape)
    if p["keepdim"]:
        expected_shape[dim] = 1
    else:
        del expected_shape[dim]
    assert list(out.shape) == expected_shape
    dlw, ref, g64, dref = grads_against_oracle(out, lw, lw64, oracle.logmeanexp, p, dtype, device,
                                               lambda g: to_front(g, dim, p["keepdim"]))
    shift, dist = state_terms(lw64)
    assert_close_or_inf(to_front(out, dim, p["keepdim"]), ref.detach(), shift.abs() + math.log(K) + 1.0, "out")
    w = oracle.importance_weights(lw64)
    assert_close(dlw.movedim(dim, 0), dref, g64.abs() * (w * (1.0 + dist) + flushed(dtype, 1.0)), "dlw")


@settings(max_examples=8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems())
def test_logmeanexp_half_precision(backend, dtype, p):
    """Half-precision log-weights: a float32 bound against the float64 one of
    the same rounded log-weights (to float32 error), dlw in lw's dtype."""
    check_logmeanexp(backend, dtype, p)


@float_dtype_examples(None, p=problems())
def test_importance_weights_forward_backward(backend, dtype, p):
    _, device = backend
    lw, lw64, K, dim = make_lw(p, dtype, device)
    w = fastvae.importance_weights(lw, dim=dim)
    assert w.shape == lw.shape and w.dtype == dtype
    dlw, w_ref, gw64, dref = grads_against_oracle(w, lw, lw64, oracle.importance_weights, p, dtype, device,
                                                  lambda g: g.movedim(dim, 0))
    _, dist = state_terms(lw64)
    w_ref = w_ref.detach()
    cond = 1.0 + dist + math.log(K)
    assert_close(w.movedim(dim, 0), w_ref, w_ref * cond, "w")
    dot = (gw64.abs() * w_ref).sum(0)
    dlw_scale = (gw64.abs() + dot) * (w_ref * cond + flushed(dtype, 1.0))
    assert_close(dlw.movedim(dim, 0), dref, dlw_scale, "dlw")


@float_dtype_examples(None, p=problems())
def test_effective_sample_size_forward_backward(backend, dtype, p):
    _, device = backend
    lw, lw64, K, dim = make_lw(p, dtype, device)
    ess = fastvae.effective_sample_size(lw, dim=dim, keepdim=p["keepdim"])
    dlw, ess_ref, g64, dref = grads_against_oracle(ess, lw, lw64, oracle.effective_sample_size, p, dtype, device,
                                                   lambda g: to_front(g, dim, p["keepdim"]))
    ess_ref = ess_ref.detach()
    assert ((ess_ref == 0) | ((ess_ref >= 1 - 1e-9) & (ess_ref <= K + 1e-9))).all()
    _, dist = state_terms(lw64)
    cond = 1.0 + math.log(K)
    assert_close(to_front(ess, dim, p["keepdim"]), ess_ref, ess_ref * cond, "ess")
    w = oracle.importance_weights(lw64)
    dlw_scale = 2 * g64.abs() * ess_ref * (1 + ess_ref * w) * (w * (cond + dist) + flushed(dtype, 1.0))
    assert_close(dlw.movedim(dim, 0), dref, dlw_scale, "dlw")


@float_dtype_examples(None, p=problems(), cuts=st.lists(st.floats(0, 1), min_size=0, max_size=3), data=st.data())
def test_state_merge_equals_logmeanexp(backend, dtype, p, cuts, data):
    """Chunks of K folded into states, merged in any grouping, give logmeanexp
    over all samples, gradient included."""
    _, device = backend
    lw, lw64, K, dim = make_lw(p, dtype, device)
    bounds = sorted({0, K, *(int(c * K) for c in cuts)})
    chunks = [lw.narrow(dim, a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    states = [fastvae.logmeanexp_state(c, dim=dim) for c in chunks]
    for c, st_ in zip(chunks, states):
        m_ref, s_ref = oracle.logmeanexp_state(c.detach().double().cpu().movedim(dim, 0))
        assert torch.equal(st_.max.double().cpu(), m_ref)
        assert_close(st_.sumexp, s_ref, s_ref * (1.0 + math.log(K)), "sumexp")
        assert st_.count == c.shape[dim]
    if data.draw(st.booleans(), label="right-nested"):
        merged = states[-1]
        for s in reversed(states[:-1]):
            merged = fastvae.merge_logmeanexp_states(s, merged)
    else:
        merged = fastvae.merge_logmeanexp_states(*states)
    assert merged.count == K
    out = fastvae.logmeanexp_from_state(merged)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    (dlw,) = torch.autograd.grad(out, lw, g.to(out.dtype).to(device))

    x = lw64.clone().requires_grad_()
    ref = oracle.logmeanexp(x)
    (dref,) = torch.autograd.grad(ref, x, g.to(out.dtype).double())
    shift, dist = state_terms(lw64)
    assert_close_or_inf(out, ref.detach(), shift.abs() + math.log(K) + 1.0, "out")
    w = oracle.importance_weights(lw64)
    assert_close(dlw.movedim(dim, 0), dref, g.abs() * (w * (1.0 + dist) + flushed(dtype, 1.0)), "dlw")


def test_all_neg_inf_columns(backend):
    """-inf everywhere in a column: logmeanexp -inf with zero gradient, weights 0,
    ESS 0, state (-inf, 0) that merges as the neutral element; never NaN."""
    _, device = backend
    lw = torch.tensor([[-INF, 0.5, -INF], [-INF, -1.0, -INF], [-INF, 2.0, 3.0]], device=device)
    lw.requires_grad_()
    out = fastvae.logmeanexp(lw)
    (d,) = torch.autograd.grad(out.sum(), lw)
    assert out[0] == -INF and out[2].item() == pytest.approx(3.0 - math.log(3), rel=1e-6)
    assert torch.equal(d[:, 0], torch.zeros(3, device=device))
    assert torch.equal(d[:, 2], torch.tensor([0.0, 0.0, 1.0], device=device))
    w = fastvae.importance_weights(lw)
    (dw,) = torch.autograd.grad((w * torch.arange(9.0, device=device).reshape(3, 3)).sum(), lw)
    assert torch.equal(w[:, 0], torch.zeros(3, device=device)) and torch.equal(dw[:, 0], torch.zeros(3, device=device))
    ess = fastvae.effective_sample_size(lw)
    (de,) = torch.autograd.grad(ess.sum(), lw)
    assert ess[0] == 0 and ess[2] == 1 and torch.equal(de[:, 0], torch.zeros(3, device=device))
    assert not any(torch.isnan(t).any() for t in (out, d, w, dw, ess, de))

    empty = fastvae.logmeanexp_state(lw[:2, 0:1])
    assert empty.max.item() == -INF and empty.sumexp.item() == 0
    full = fastvae.logmeanexp_state(lw[:, 1:2])
    for merged in (fastvae.merge_logmeanexp_states(empty, full), fastvae.merge_logmeanexp_states(full, empty)):
        assert merged.count == 5
        out_m = fastvae.logmeanexp_from_state(merged)
        expect = torch.logsumexp(lw[:, 1].detach().double(), 0) - math.log(5)
        assert abs(out_m.item() - expect.item()) < 1e-6
    both_empty = fastvae.merge_logmeanexp_states(empty, empty)
    assert fastvae.logmeanexp_from_state(both_empty).item() == -INF


def test_nan_propagates(backend):
    """A NaN log-weight makes its column NaN (value and gradient); other columns are untouched."""
    _, device = backend
    lw = torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [3.0, -INF]], dtype=torch.float64, device=device)
    lw.requires_grad_()
    out = fastvae.logmeanexp(lw)
    (d,) = torch.autograd.grad(out.sum(), lw)
    assert torch.isnan(out[0]) and torch.isnan(d[:, 0]).all()
    ref = torch.logsumexp(lw[:, 1].detach().cpu(), 0) - math.log(3)
    assert abs(out[1].item() - ref.item()) < 1e-12
    assert not torch.isnan(d[:, 1]).any()
    w = fastvae.importance_weights(lw)
    ess = fastvae.effective_sample_size(lw)
    assert torch.isnan(w[:, 0]).all() and not torch.isnan(w[:, 1]).any()
    assert torch.isnan(ess[0]) and not torch.isnan(ess[1])
    state = fastvae.logmeanexp_state(lw)
    assert torch.isnan(state.sumexp[0])
    merged = fastvae.merge_logmeanexp_states(state, fastvae.logmeanexp_state(lw[2:]))
    assert torch.isnan(fastvae.logmeanexp_from_state(merged)[0])


def test_plus_inf_like_torch_logsumexp(backend):
    """Like torch.logsumexp: a +inf log-weight makes logmeanexp +inf, with
    gradient 0 for the column's finite entries (however large) and NaN at +inf."""
    _, device = backend
    lw = torch.tensor([[INF, 0.0], [100.0, 5.0]], device=device, requires_grad=True)
    out = fastvae.logmeanexp(lw)
    (d,) = torch.autograd.grad(out.sum(), lw)
    x = lw.detach().cpu().requires_grad_()
    (d_torch,) = torch.autograd.grad(torch.logsumexp(x, 0).sum(), x)
    assert out[0] == INF and torch.isfinite(out[1])
    assert torch.isnan(d[0, 0]) and d[1, 0] == 0
    torch.testing.assert_close(d[:, 1].cpu(), d_torch[:, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_log_weights_exact(backend, dtype):
    """Log-weights of +-1e4 (and spreads of 2e4 in one column) to float64 rounding."""
    _, device = backend
    vals = torch.tensor([[1e4, -1e4, -1e4, 9999.0, 0.0],
                         [1e4 - 0.5, 1e4, -1e4, -9999.0, -1e4],
                         [-1e4, -1e4 + 3.0, -1e4, 9998.5, 1e4]], dtype=torch.float64)
    lw = vals.to(dtype).to(device).requires_grad_()
    out = fastvae.logmeanexp(lw)
    (d,) = torch.autograd.grad(out, lw, torch.ones_like(out))
    x = vals.to(dtype).double().requires_grad_()
    ref = oracle.logmeanexp(x)
    (dref,) = torch.autograd.grad(ref.sum(), x)
    shift, dist = state_terms(x.detach())
    assert_close(out, ref.detach(), shift.abs() + math.log(3) + 1, "out")
    assert_close(d, dref, oracle.importance_weights(x.detach()) * (1 + dist) + flushed(dtype, 1.0), "dlw")
    ess = fastvae.effective_sample_size(lw)
    ess_ref = oracle.effective_sample_size(x.detach())
    assert_close(ess, ess_ref, ess_ref * 3, "ess")


def test_single_sample(backend):
    """K = 1: logmeanexp is lw itself, the weight 1, the ESS 1, the gradient g."""
    _, device = backend
    lw = torch.tensor([[-3.5, 0.0, 7.25, -INF]], device=device, requires_grad=True)
    out = fastvae.logmeanexp(lw)
    g = torch.tensor([1.5, -2.0, 0.25, 3.0], device=device)
    (d,) = torch.autograd.grad(out, lw, g)
    assert torch.equal(out, lw[0].detach())
    assert torch.equal(d[0, :3], g[:3]) and d[0, 3] == 0
    assert torch.equal(fastvae.importance_weights(lw)[0], torch.tensor([1.0, 1.0, 1.0, 0.0], device=device))
    assert torch.equal(fastvae.effective_sample_size(lw), torch.tensor([1.0, 1.0, 1.0, 0.0], device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_k(backend, dtype):
    """K = 100003 samples streamed through the running (max, sum) state (and, on
    the triton backend, split over programs and merged), for a few columns:
    random, half -inf, all -inf except the last sample, all -inf."""
    _, device = backend
    K = 100003
    g = torch.Generator().manual_seed(5)
    lw64 = torch.randn(K, 4, generator=g, dtype=torch.float64) * 10
    lw64[: K // 2, 1] = -INF
    lw64[:-1, 2] = -INF
    lw64[:, 3] = -INF
    lw = lw64.to(dtype).to(device).requires_grad_()
    x = lw64.to(dtype).double().requires_grad_()
    gout = torch.tensor([1.0, -0.5, 2.0, 1.0], dtype=torch.float64)

    out = fastvae.logmeanexp(lw)
    (d,) = torch.autograd.grad(out, lw, gout.to(dtype).to(device))
    ref = oracle.logmeanexp(x)
    (dref,) = torch.autograd.grad(ref, x, gout)
    shift, dist = state_terms(x.detach())
    assert_close_or_inf(out, ref.detach(), shift.abs() + math.log(K) + 1, "out")
    w = oracle.importance_weights(x.detach())
    assert_close(d, dref, gout.abs() * (w * (1 + dist) + flushed(dtype, 1.0)), "dlw")
    assert_close(fastvae.importance_weights(lw), w, w * (1 + dist + math.log(K)), "w")
    ess = fastvae.effective_sample_size(lw)
    ess_ref = oracle.effective_sample_size(x.detach())
    assert_close(ess, ess_ref, ess_ref * (1 + math.log(K)), "ess")
    assert ess[3] == 0 and ess[2] == 1


def test_dim_keepdim_and_non_contiguous(backend):
    _, device = backend
    base = torch.randn(6, 5, 4, device=device) * 3
    lw = base.transpose(0, 2)  # (4, 5, 6), non-contiguous; samples along the last dim
    assert not lw.is_contiguous()
    out = fastvae.logmeanexp(lw, dim=-1, keepdim=True)
    assert out.shape == (4, 5, 1)
    expect = fastvae.logmeanexp(lw.contiguous().movedim(-1, 0))
    assert torch.equal(out[..., 0], expect)
    w = fastvae.importance_weights(lw, dim=2)
    assert w.shape == lw.shape
    assert torch.equal(w, fastvae.importance_weights(lw.movedim(2, 0).contiguous()).movedim(0, 2))
    ess = fastvae.effective_sample_size(lw, dim=1, keepdim=True)
    assert torch.equal(ess, fastvae.effective_sample_size(lw.movedim(1, 0).contiguous()).unsqueeze(1))


@pytest.mark.parametrize("shape", [(5, 0), (3, 0, 2)])
def test_empty_batch(backend, shape):
    _, device = backend
    lw = torch.zeros(shape, device=device, requires_grad=True)
    out = fastvae.logmeanexp(lw)
    assert out.shape == shape[1:]
    (out.sum() + fastvae.importance_weights(lw).sum() + fastvae.effective_sample_size(lw).sum()).backward()
    assert lw.grad.shape == shape


def test_saves_no_extra_k_sized_buffer(backend):
    """The logmeanexp backward needs lw and the (M,)-sized state: nothing else of size K x M."""
    _, device = backend
    lw = torch.randn(64, 32, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fastvae.logmeanexp(lw)
    assert sorted(saved) == [32, 32, 64 * 32]
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    """bf16/fp16 log-weights on every backend, with float32 accumulation: the
    bound, the state, the weights and the ESS in float32 (a bound rounded to
    bfloat16 steps by 4 nats at -544), equal to the float64 ones of the same
    rounded inputs to float32 error; the gradient in lw's dtype."""
    _, device = backend
    lw = (torch.randn(37, 9, generator=torch.Generator().manual_seed(0)) * 4).to(dtype).to(device).requires_grad_()
    x = lw.detach().double().cpu()
    out = fastvae.logmeanexp(lw)
    assert out.dtype == torch.float32
    assert torch.autograd.grad(out.sum(), [lw])[0].dtype == dtype
    assert fastvae.effective_sample_size(lw).dtype == torch.float32
    shift, dist = state_terms(x)
    assert_close(out, oracle.logmeanexp(x), shift.abs() + math.log(37) + 1, "out")
    state = fastvae.logmeanexp_state(lw)
    assert state.sumexp.dtype == torch.float32
    w = fastvae.importance_weights(lw)
    assert w.dtype == torch.float32
    w_ref = oracle.importance_weights(x)
    assert_close(w, w_ref, w_ref * (1 + dist), "w")


def test_gradcheck_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    lw = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(lambda x: LogMeanExp.apply(x)[0], (lw,), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(lambda x: EffectiveSampleSize.apply(x)[0], (lw,), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(ImportanceWeights.apply, (lw,), fast_mode=INTERPRET)
    # the state alone is not a function of lw (its max is a shift without a
    # gradient); what is derived from it is
    chunks = lambda x: fastvae.logmeanexp_from_state(  # noqa: E731
        fastvae.merge_logmeanexp_states(fastvae.logmeanexp_state(x[:2]), fastvae.logmeanexp_state(x[2:])))
    assert torch.autograd.gradcheck(chunks, (lw,), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    lw = torch.randn(6, 2, 3, device=device, requires_grad=True)
    torch.library.opcheck(logmeanexp_op, (lw,))
    torch.library.opcheck(effective_sample_size_op, (lw,))
    torch.library.opcheck(importance_weights_op, (lw,))
    out, mx, s = LogMeanExp.apply(lw.detach())
    ess = EffectiveSampleSize.apply(lw.detach())[0]
    g = torch.randn(2, 3, device=device)
    torch.library.opcheck(logmeanexp_backward_op, (g, torch.randn(2, 3, device=device), lw.detach(), mx, s))
    torch.library.opcheck(logmeanexp_backward_op, (g, None, lw.detach(), mx, s))
    torch.library.opcheck(effective_sample_size_backward_op, (g, lw.detach(), mx, s, ess))
    w = importance_weights_op(lw.detach())
    torch.library.opcheck(importance_weights_backward_op, (torch.randn_like(w), w))


def test_errors_on_bad_input(backend):
    _, device = backend
    lw = torch.zeros(4, 3, device=device)
    with pytest.raises(ValueError, match=r"dim=2 is out of range for lw of shape \(4, 3\)"):
        fastvae.logmeanexp(lw, dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        fastvae.importance_weights(lw, dim=1.0)
    with pytest.raises(ValueError, match=r"shape \(0, 3\) has no samples"):
        fastvae.effective_sample_size(torch.zeros(0, 3, device=device))
    with pytest.raises(ValueError, match="0-d"):
        fastvae.logmeanexp(torch.zeros((), device=device))
    with pytest.raises(TypeError, match="int64"):
        fastvae.logmeanexp(torch.zeros(4, 3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="Tensor"):
        fastvae.logmeanexp([1.0, 2.0])
    s1 = fastvae.logmeanexp_state(lw)
    s2 = fastvae.logmeanexp_state(torch.zeros(4, 2, device=device))
    with pytest.raises(ValueError, match=r"states\[1\] has max of shape \(2,\)"):
        fastvae.merge_logmeanexp_states(s1, s2)
    with pytest.raises(TypeError, match="LogMeanExpState"):
        fastvae.logmeanexp_from_state(lw)
    with pytest.raises(ValueError, match="at least one"):
        fastvae.merge_logmeanexp_states()


# -- main process only: the C++ boundary, torch.compile, torch.distributed --------

main_process_only = pytest.mark.skipif(INTERPRET, reason="main-process tests (cpp backend)")


@main_process_only
def test_cpp_boundary_checks():
    """The extension refuses mismatched extents, dtypes and non-arrays before touching memory."""
    from fastvae import _C

    lw = torch.zeros(5, 3).numpy()
    m, s = torch.zeros(3).numpy(), torch.zeros(3).numpy()
    with pytest.raises(ValueError, match="sumexp: expected shape"):
        _C.logmeanexp_forward(lw, m, torch.zeros(4).numpy(), None, None, 1)
    with pytest.raises(TypeError, match="max: expected dtype"):
        _C.logmeanexp_forward(lw, m.astype("float64"), s, None, None, 1)
    with pytest.raises(TypeError, match="out: expected a NumPy array"):
        _C.logmeanexp_forward(lw, m, s, [0.0, 0.0, 0.0], None, 1)
    with pytest.raises(ValueError, match="lw: expected a 2-d"):
        _C.logmeanexp_forward(torch.zeros(5).numpy(), m, s, None, None, 1)
    with pytest.raises(ValueError, match="dlw: expected shape"):
        _C.logmeanexp_backward(lw, m, s, m, None, None, torch.zeros(5, 2).numpy(), 1)
    with pytest.raises(ValueError, match="at most one"):
        _C.logmeanexp_backward(lw, m, s, m, m, m, lw.copy(), 1)
    with pytest.raises(ValueError, match="n_threads"):
        _C.importance_weights_backward(lw, lw, lw.copy(), 0)


def iwae_loss(enc, dec, x, seed, k):
    """IWAE bound through the fastvae ops, with the ESS as a side output."""
    mu, logvar = enc(x).chunk(2, dim=-1)
    z, _ = SampleNormal.apply(mu, logvar, seed, k)
    log_px = -0.5 * ((dec(z) - x) ** 2).sum(-1)
    lw = log_px + fastvae.latent_log_ratio(z, mu, logvar)
    state = fastvae.merge_logmeanexp_states(fastvae.logmeanexp_state(lw[:2]), fastvae.logmeanexp_state(lw[2:]))
    bound = fastvae.logmeanexp(lw, dim=0) + 0 * fastvae.logmeanexp_from_state(state)
    return -bound.mean(), fastvae.effective_sample_size(lw.detach()).mean()


@main_process_only
def test_iwae_step_compiles_fullgraph(monkeypatch):
    fastvae._backend.set_backend(None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(10, 6), torch.nn.Linear(3, 10)
    x = torch.randn(8, 10)
    params = list(enc.parameters()) + list(dec.parameters())
    assert_compiled_matches_eager(iwae_loss, (enc, dec, x, torch.tensor(777), 5), params,
                                  atol=1e-6, grad_rtol=1e-5)


_DIST_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, fastvae
    rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    lw = torch.load(sys.argv[4])
    # rank r holds its own (uneven) share of the samples; rank 1's first column is all -inf
    bounds = [0, 3, lw.shape[0]]
    state = fastvae.logmeanexp_state(lw[bounds[rank]:bounds[rank + 1]])
    merged = fastvae.all_reduce_logmeanexp_state(state)
    if rank == 0:
        torch.save((fastvae.logmeanexp_from_state(merged), merged.count), sys.argv[5])
    dist.destroy_process_group()
""")


@main_process_only
def test_all_reduce_state_across_processes(tmp_path):
    """Two gloo ranks, each with part of the samples, merge to the logmeanexp of all."""
    lw = torch.randn(11, 4, dtype=torch.float64) * 5
    lw[3:, 0] = -INF
    torch.save(lw, tmp_path / "lw.pt")
    run_gloo_ranks(_DIST_WORKER, lambda r: [str(tmp_path / "lw.pt"), str(tmp_path / "out.pt")], tmp_path)
    out, count = torch.load(tmp_path / "out.pt")
    assert int(count) == 11
    ref = oracle.logmeanexp(lw)
    assert_close(out, ref, ref.abs() + math.log(11) + 1, "out")


@pytest.mark.parametrize("count", [0, -3])
def test_state_with_no_samples_is_refused(count):
    state = fastvae.LogMeanExpState(torch.zeros(2), torch.ones(2), count)
    with pytest.raises(ValueError, match="state.count must be >= 1"):
        fastvae.logmeanexp_from_state(state)


# -- the evaluation's accumulating kernel (logmeanexp_accumulate) -------------------


def _merged_reference(chunks, latents):
    """merge_logmeanexp_states of the states of x = lw + latent and of 2 x, chunk
    by chunk, in float64 on the CPU (the front end's own merge as the oracle)."""
    run1 = run2 = None
    for lw, lat in zip(chunks, latents):
        x = lw.double().cpu() + (0.0 if lat is None else lat.double().cpu())
        s1, s2 = fastvae.logmeanexp_state(x), fastvae.logmeanexp_state(2 * x)
        run1 = s1 if run1 is None else fastvae.merge_logmeanexp_states(run1, s1)
        run2 = s2 if run2 is None else fastvae.merge_logmeanexp_states(run2, s2)
    return run1, run2


def _accumulated(chunks, latents):
    """(the two states accumulate_states leaves, chunk by chunk; the merged
    reference's two)."""
    from fastvae.ops.logmeanexp.op import accumulate_states

    run1 = run2 = None
    for lw, lat in zip(chunks, latents):
        run1, run2 = accumulate_states(lw, lat, run1, run2)
    return run1, run2, *_merged_reference(chunks, latents)


def _assert_state_close(state, ref, K, name):
    m, s = state.max.double().cpu(), state.sumexp.double().cpu()
    nan = torch.isnan(ref.sumexp)
    assert torch.equal(torch.isnan(s), nan), f"{name}: NaN columns {torch.isnan(s)} != {nan}"
    fin = ~nan
    assert torch.equal(m[fin], ref.max[fin]) or torch.allclose(m[fin], ref.max[fin], rtol=1e-6, atol=0), name
    assert_close(state.sumexp.cpu()[fin], ref.sumexp[fin], ref.sumexp[fin] * (2.0 + math.log(K)), f"{name}.sumexp")
    # the log-mean-exp the evaluation reads from the state
    assert_close_or_inf(fastvae.logmeanexp_from_state(state)[fin],
                        fastvae.logmeanexp_from_state(ref)[fin],
                        ref.max[fin].abs().nan_to_num(0.0, 0.0, 0.0) + math.log(K) + 1.0, f"{name} logmeanexp")


def _accumulate_case(dtype, device, K, M, cuts, with_latent, seed):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(K, M, generator=g, dtype=torch.float64) * 20
    lw[:, 0] = -INF  # an all -inf column
    if M > 2:
        lw[: K // 2, 1] = -INF  # -inf in the first chunks only
        lw[K - 1, 2] = float("nan")  # NaN in the last chunk
    if M > 3:
        lw[0, 3] = float("nan")  # NaN in the first chunk
    lat = torch.randn(K, M, generator=g, dtype=torch.float64) if with_latent else None
    bounds = sorted({0, K, *cuts})
    chunks = [lw[a:b].to(dtype).to(device) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    lats = ([lat[a:b].to(dtype).to(device) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            if with_latent else [None] * len(chunks))
    return chunks, lats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_latent", [False, True])
@pytest.mark.parametrize("K, M, cuts", [(1, 1, []), (9, 5, [3, 4]), (100, 7, [1, 50, 99]), (1025, 4, [600])])
def test_accumulate_matches_merged_states(backend, dtype, with_latent, K, M, cuts):
    """accumulate_states, chunk by chunk, equals merge_logmeanexp_states of the
    chunks' states of lw + latent and of twice that: all -inf columns stay
    (-inf, 0), a NaN in any chunk makes its column NaN, counts add up."""
    _, device = backend
    chunks, lats = _accumulate_case(dtype, device, K, M, cuts, with_latent, seed=K + M)
    run1, run2, ref1, ref2 = _accumulated(chunks, lats)
    assert run1.count == run2.count == K
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert run1.max.dtype == run1.sumexp.dtype == run2.sumexp.dtype == acc
    assert run1.max.device.type == torch.device(device).type
    _assert_state_close(run1, ref1, K, "w")
    _assert_state_close(run2, ref2, K, "w^2")
    assert run1.max[0] == -INF and run1.sumexp[0] == 0 and run2.max[0] == -INF and run2.sumexp[0] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accumulate_half_precision_widens_before_adding(backend, dtype):
    """Half-precision log-weights and latent terms are added in float32 (the
    evaluation's rule), on the triton backend in the kernel."""
    _, device = backend
    chunks, lats = _accumulate_case(dtype, device, 40, 3, [17], True, seed=3)
    run1, run2, ref1, ref2 = _accumulated(chunks, lats)
    _assert_state_close(run1, ref1, 40, "w")
    _assert_state_close(run2, ref2, 40, "w^2")


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels' split path, under the interpreter")
@pytest.mark.parametrize("accumulate", [False, True])
def test_split_k_and_the_finish_kernel(backend, monkeypatch, accumulate):
    """With tiles of 64 elements and one tile per split, K splits over many
    programs and the finish kernel merges the partial states (a tile of
    splits at a time, several column blocks): the same states, logmeanexp and
    ESS as without splitting."""
    from fastvae.ops.logmeanexp import triton as klme

    _, device = backend
    chunks, lats = _accumulate_case(torch.float32, device, 300, 9, [130], True, seed=7)
    lw = torch.cat(chunks)
    ref_out = fastvae.logmeanexp(lw)
    ref_ess = fastvae.effective_sample_size(lw)
    monkeypatch.setattr(klme, "INTERPRETER_TILE", 64)  # BLOCK_M 16, BLOCK_K 4; finish: 16 splits x 4 columns
    monkeypatch.setattr(klme, "CHUNKS_PER_SPLIT", 1)  # 75 splits of 4 rows
    seen = []
    real = klme._logmeanexp_finish_kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs.get("grid"))
        return real(*args, **kwargs)

    monkeypatch.setattr(klme._logmeanexp_finish_kernel, "run", spy)
    if accumulate:
        run1, run2, ref1, ref2 = _accumulated(chunks, lats)
        _assert_state_close(run1, ref1, 300, "w")
        _assert_state_close(run2, ref2, 300, "w^2")
    else:
        out, ess = fastvae.logmeanexp(lw), fastvae.effective_sample_size(lw)
        assert torch.equal(torch.isnan(out), torch.isnan(ref_out))
        fin = ~torch.isnan(ref_out)
        assert_close_or_inf(out[fin], ref_out[fin].double(), ref_out[fin].abs().double() + 1.0, "out")
        assert_close(ess[fin], ref_ess[fin].double(), ref_ess[fin].double() + 1.0, "ess")
    assert seen, "the finish kernel did not run"


def test_accumulate_refuses_bad_buffers():
    """The C++ binding checks every extent of the running states."""
    cpp = pytest.importorskip("fastvae._C")
    lw = torch.zeros(3, 4).numpy()
    st = [torch.zeros(4).numpy() for _ in range(4)]
    with pytest.raises(ValueError, match="sq_sumexp"):
        cpp.logmeanexp_accumulate(lw, None, *st[:3], torch.zeros(5).numpy(), True, 1)
    with pytest.raises(ValueError, match="latent"):
        cpp.logmeanexp_accumulate(lw, torch.zeros(2, 4).numpy(), *st, False, 1)


# -- the family's cases of the suite-wide checks -------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the family's ops: test_registry.py
# fails when one is missing. launch_case, thread_count_calls and fallback_call
# give {op name: its case} (tests/helpers.py, PER_OP_CASES); the others the
# family's cases, as a one-op folder gives its own.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size, per op;
    ``op`` makes the call from the function and its leaves' shapes."""
    return {
        "logmeanexp": op(lambda lw: fastvae.logmeanexp(lw, 0), (K, B)),
        "importance_weights": op(lambda lw: fastvae.importance_weights(lw, 0), (K, B)),
        "effective_sample_size": op(lambda lw: fastvae.effective_sample_size(lw, 0), (K, B)),
    }


def thread_count_calls(leaf, run):
    """tests/test_backend.py: per op, calls with enough work for several threads,
    whose bits must not depend on the thread count: many columns, few columns
    of many samples (K split over the threads), and logmeanexp's tall case."""
    lw_wide, lw_long, lw_tall = leaf(32768, 32, scale=3), leaf(70000, 3, scale=3), leaf(40, 4096, scale=3)
    return {
        "logmeanexp": [lambda lw=lw: run(fastvae.logmeanexp, lw) for lw in (lw_wide, lw_long, lw_tall)],
        "importance_weights": [lambda lw=lw: run(fastvae.importance_weights, lw) for lw in (lw_wide, lw_long)],
        "effective_sample_size": [lambda lw=lw: run(fastvae.effective_sample_size, lw) for lw in (lw_wide, lw_long)],
    }


def fallback_call(leaf, run):
    """tests/test_backend.py: per op, a small call, run with and without the extension."""
    lw = leaf(7, 3)
    return {
        "logmeanexp": lambda: run(fastvae.logmeanexp, lw),
        "importance_weights": lambda: run(fastvae.importance_weights, lw),
        "effective_sample_size": lambda: run(fastvae.effective_sample_size, lw),
    }


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck."""
    return {
        "logmeanexp": (lambda lw: fastvae.logmeanexp(lw), [r(5, 3)], True),
        "logmeanexp_dim": (lambda lw: fastvae.logmeanexp(lw, 1, keepdim=True), [r(3, 5)], True),
        "logmeanexp_state": (lambda lw: fastvae.logmeanexp_from_state(fastvae.logmeanexp_state(lw)), [r(5, 3)], True),
        "importance_weights": (lambda lw: fastvae.importance_weights(lw, 1), [r(3, 5)], False),
        "effective_sample_size": (lambda lw: fastvae.effective_sample_size(lw), [r(5, 3)], False),
    }


def compile_cases(mu, lv):
    """tests/test_compile.py: (name, function, float inputs) whose compiled graph
    calls the C++ twins, forward and backward (mu, lv: (5, 2, 3); the
    log-weights: 5 samples of 6 columns)."""
    return [("logmeanexp", lambda w: fastvae.logmeanexp(w, dim=0), (mu.reshape(5, 6),))]


def twin_op_cases(m2, l2):
    """tests/test_torch_ops.py: (twin, arguments) in the Python op's layout, each
    checked bit for bit against fastvae::<twin> and by opcheck (m2, l2: (12, 6);
    the log-weights: 6 samples of (2, 3) columns from m2, with their state)."""
    lw = m2[:6].reshape(6, 2, 3)
    lw_max, sumexp = lw.amax(0), torch.exp(lw - lw.amax(0)).sum(0)
    return [("logmeanexp", (lw,)),
            ("logmeanexp_backward", (torch.randn(2, 3), torch.randn(2, 3), lw, lw_max, sumexp)),
            ("logmeanexp_backward", (torch.randn(2, 3), None, lw, lw_max, sumexp))]


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(logmeanexp_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, split", [((1,), False), ((1, 1), False), ((5, 3), False), ((7, 2, 3), False),
                                          ((40000, 3), True)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, shape, split):
    """fastvae::logmeanexp and its backward called as a compiled graph calls
    them (an IWAE whose likelihood the objectives' plans do not fuse): on
    the triton backend from a plan of the call's signature (OP_PLANS), with
    the general launch's value, column state and gradient bit for bit, with
    and without a gradient of sumexp, from the first call and the second; one
    sample, one column, a batch of two dimensions, a column of -inf, and
    columns split over programs (the split launch and its finishing one);
    half precision, a transposed lw, an empty one and a gradient of another
    dtype take the general launch and make no plan."""
    if split:  # a split every tile of rows (the GPU's split comes from the programs it wants)
        monkeypatch.setattr(_triton_module(), "CHUNKS_PER_SPLIT", 1)
    logmeanexp_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(sum(shape))
    lw = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(plan_device)
    if lw.dim() > 1:
        lw.view(shape[0], -1)[:, -1] = -INF  # an empty column: state (-inf, 0), value -inf, gradient 0
    grad_out = torch.randn(shape[1:], generator=g, dtype=torch.float64).to(dtype).to(plan_device)
    grad_sumexp = torch.randn(shape[1:], generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    def calls():
        value, lw_max, sumexp = logmeanexp_op(lw)
        return (value, lw_max, sumexp, logmeanexp_backward_op(grad_out, None, lw, lw_max, sumexp),
                logmeanexp_backward_op(grad_out, grad_sumexp, lw, lw_max, sumexp))

    op_plans_match_the_general_launch(monkeypatch, logmeanexp_module, calls)
    (plan,) = logmeanexp_module.OP_PLANS.values()
    assert (plan.finish is not None) == split and len(plan.launches()) == 3 + split
    logmeanexp_module.OP_PLANS.clear()
    logmeanexp_op(lw.half())
    if lw.dim() == 2 and shape[1] > 1:
        logmeanexp_op(lw.t().contiguous().t())
    logmeanexp_op(lw[:0])
    value, lw_max, sumexp = logmeanexp_op(lw)
    logmeanexp_module.OP_PLANS.clear()
    other = torch.float64 if dtype is torch.float32 else torch.float32
    logmeanexp_backward_op(grad_out.to(other), None, lw, lw_max, sumexp)
    assert len(logmeanexp_module.OP_PLANS) == 0


def _triton_module():
    from fastvae.ops.logmeanexp import triton
    return triton
