"""discretized_logistic_mixture_log_prob against a float64 transcription of
PixelCNN++'s discretized_mix_logistic_loss (openai/pixel-cnn nn.py), values
and the gradient of every parameter, per backend (the root conftest.py), with
error bounds from its oracle
(fastvae/ops/discretized_logistic_mixture_log_prob/__init__.py); and its cases
of the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae
from fastvae.ops import discretized_logistic_mixture_log_prob as oracle
from fastvae.ops.discretized_logistic_mixture_log_prob import op as dlm_module
from fastvae.ops.discretized_logistic_mixture_log_prob.op import (
    DiscretizedLogisticMixtureLogProb,
    discretized_logistic_mixture_log_prob_backward_op,
    discretized_logistic_mixture_log_prob_op,
)

from conftest import INTERPRET
from helpers import RTOL, assert_close, needs_plan_triton, op_plans_match_the_general_launch, plan_device_fixture

EPS64 = torch.finfo(torch.float64).eps


def softplus(v):
    """Exact log(1 + e^v): torch's F.softplus returns v itself above 20 (and
    TensorFlow's has a cut-off too), an error of e^-20 that float64 sees."""
    return torch.logaddexp(torch.zeros_like(v), v)


def pixelcnn_log_prob(x, l, num_bins=256):  # noqa: E741 (nn.py's names)
    """PixelCNN++'s discretized_mix_logistic_loss for x (B, 3, H, W) and
    packed l (B, 10 M, H, W), transcribed line by line (channels last, as
    nn.py), returning the per-image log-likelihood (the loss without its
    minus sign and its sum over the batch). num_bins generalizes 255 to
    num_bins - 1 (the half bin 1/255 and log(127.5))."""
    x, l = x.permute(0, 2, 3, 1), l.permute(0, 2, 3, 1)  # noqa: E741
    xs, ls = list(x.shape), list(l.shape)
    nr_mix = ls[-1] // 10
    logit_probs = l[..., :nr_mix]
    l = l[..., nr_mix:].reshape(xs + [nr_mix * 3])  # noqa: E741
    means = l[..., :nr_mix]
    log_scales = torch.clamp(l[..., nr_mix:2 * nr_mix], min=-7.0)
    coeffs = torch.tanh(l[..., 2 * nr_mix:3 * nr_mix])
    x = x.unsqueeze(-1) + torch.zeros(xs + [nr_mix], dtype=x.dtype)
    m2 = (means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]).unsqueeze(3)
    m3 = (means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]).unsqueeze(3)
    means = torch.cat((means[..., 0, :].unsqueeze(3), m2, m3), dim=3)
    return _pixelcnn_mixture(x, means, log_scales, logit_probs, num_bins, channel_dim=3)


def _pixelcnn_mixture(x, means, log_scales, logit_probs, num_bins, channel_dim):
    """nn.py from centered_x on: x, means, log_scales (..., C, M) with the
    channel at channel_dim, logit_probs (..., M); summed over all but the first dim."""
    half = 1.0 / (num_bins - 1)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + half)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - half)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - softplus(plus_in)
    log_one_minus_cdf_min = -softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * softplus(mid_in)
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, torch.where(
            cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
            log_pdf_mid - math.log((num_bins - 1) / 2.0))))
    log_probs = log_probs.sum(dim=channel_dim) + torch.log_softmax(logit_probs, -1)
    return torch.logsumexp(log_probs, dim=-1).flatten(1).sum(1)


def independent_log_prob(x, logit_probs, means, log_scales, num_bins=256):
    """The same formula without the channel coupling, for x (B, C, H, W),
    logit_probs (B, M, H, W), means and log_scales (B, M, C, H, W)."""
    log_scales = torch.clamp(log_scales, min=-7.0)
    move = lambda t: t.permute(0, 3, 4, 2, 1)  # noqa: E731  (B, H, W, C, M)
    xm = x.permute(0, 2, 3, 1).unsqueeze(-1).expand(-1, -1, -1, -1, logit_probs.shape[1])
    return _pixelcnn_mixture(xm, move(means), move(log_scales), logit_probs.permute(0, 2, 3, 1), num_bins, 3)


# -- error bounds ------------------------------------------------------------------


def _pieces(x, logits, mu, ls, num_bins):
    """float64 (K, P, ...) quantities of the formula, for the error bounds:
    lp, dmu, dls, a, b, inv, w, pi (posterior and prior weights (K, P, M, S))."""
    lp, dmu, dls = oracle.discretized_logistic_terms(x, mu, ls, num_bins)
    s = ls.clamp(min=-7.0)
    inv = torch.exp(-s)
    h = 1.0 / (num_bins - 1)
    a, b = inv * (x - mu + h), inv * (x - mu - h)
    w = torch.softmax(logits + lp.sum(-2), -2)
    pi = torch.softmax(logits, -2)
    return lp, dmu, dls, a, b, inv, s, w, pi


def error_scales(x, packed, tensors, g, num_bins, floor=0.0):
    """Per-output scales for assert_close: what the rounding of the op's inputs
    and intermediates can move each result by, divided by the dtype's unit
    roundoff (the condition of the formula, not a tuned tolerance), and the
    float64 transcription's own error bound (its cdf_plus - cdf_min cancels).

    Kernel layout: x (P, C, S); tensors (params,) packed (K, P, 10 M, S) or
    (logits (K, P, M, S), means, log_scales (K, P, M, C, S)); g (K, P).
    floor: the posterior weights' underflow (the compute dtype's smallest
    normal number, an absolute error of each weight) over the gradients' rtol.
    Returns (value scale (K, P), value ref error, [grad scales], [grad ref errors])
    with the gradients in tensors' layout."""
    xm = x[:, None]  # (P, 1, C, S)
    if packed:
        logits, means, log_scales, raw = oracle.unpack_pixelcnn_params(tensors[0])
        t = torch.tanh(raw)
        mu = oracle.coupled_means(x, means, t)
        mag = means.abs() + torch.stack([torch.zeros_like(t[..., 0, :]), (t[..., 0, :] * xm[..., 0, :]).abs(),
                                         (t[..., 1, :] * xm[..., 0, :]).abs() + (t[..., 2, :] * xm[..., 1, :]).abs()],
                                        -2)
    else:
        logits, mu, log_scales = tensors
        mag = mu.abs()
    lp, dmu, dls, a, b, inv, s, w, pi = _pieces(xm, logits, mu, log_scales, num_bins)
    A = inv * (xm.abs() + mag + 1.0)  # the magnitude of what a and b are made of
    pa, pb = torch.sigmoid(-a), torch.sigmoid(b)
    tmid = (1.0 - 2.0 * torch.sigmoid(inv * (xm - mu))).abs()
    # one element's value: its own size, what flows through a and b, the scale's exp
    kappa = 1.0 + lp.abs() + A * (pa + pb + tmid) + dls.abs() * (1.0 + s.abs()) + math.log(num_bins)
    kappa_m = kappa.sum(-2)  # (K, P, M, S)
    kappa_l = (w * kappa_m).sum(-2, keepdim=True)
    logit_err = 1.0 + logits.abs() + logits.abs().amax(-2, keepdim=True)
    value = (kappa_l[..., 0, :] + logit_err.amax(-2)).sum(-1)
    # the transcription's log(cdf_plus - cdf_min): relative error eps (cdf_plus + cdf_min) / delta
    mid = (xm > -0.999) & (xm < 0.999)
    cp, cm = torch.sigmoid(a), torch.sigmoid(b)
    delta = (cp - cm).clamp(min=1e-300)
    cond = torch.where(mid & (delta > 1e-5), (cp + cm) / delta, 0.0)
    ref_value = 8 * EPS64 * ((w * cond.sum(-2)).sum(-2).sum(-1) + value)
    ga = g.abs()[..., None, None]
    gw = ga * w
    dlogit = ga * (w * (kappa_m + kappa_l) + pi * logit_err + floor)
    err_w = (kappa_m + kappa_l)[..., None, :]  # the relative error of w
    gf = ga[..., None, :] * floor
    dmu_scale = gw[..., None, :] * (dmu.abs() * err_w + inv * (pa + pb + tmid) * (1.0 + A + s.abs())) + gf * dmu.abs()
    dls_scale = gw[..., None, :] * (dls.abs() * err_w + (A * (pa + pb + tmid) + 1.0) * (1.0 + A + s.abs())) \
        + gf * dls.abs()
    dref = 8 * EPS64 * gw[..., None, :] * (1.0 + cond) * (inv * (1.0 + cond) + 1.0) * (1.0 + A)
    dref_logit = 8 * EPS64 * ga * (w * (1.0 + (w * cond.sum(-2)).sum(-2, keepdim=True) + cond.sum(-2)) + pi)
    if not packed:
        return value, ref_value, [dlogit, dmu_scale, dls_scale], [dref_logit, dref, dref]
    x0, x1 = xm[..., 0, :], xm[..., 1, :]
    one = 1.0 - t * t
    dmu_g = gw[..., None, :] * dmu
    coef = torch.stack([
        x0.abs() * (dmu_scale[..., 1, :] * one[..., 0, :] + dmu_g[..., 1, :].abs() * (1 + raw[..., 0, :].abs())),
        x0.abs() * (dmu_scale[..., 2, :] * one[..., 1, :] + dmu_g[..., 2, :].abs() * (1 + raw[..., 1, :].abs())),
        x1.abs() * (dmu_scale[..., 2, :] * one[..., 2, :] + dmu_g[..., 2, :].abs() * (1 + raw[..., 2, :].abs())),
    ], -2)
    coef_ref = torch.stack([x0.abs() * dref[..., 1, :], x0.abs() * dref[..., 2, :], x1.abs() * dref[..., 2, :]], -2)
    return value, ref_value, [pack(dlogit, dmu_scale, dls_scale, coef)], [pack(dref_logit, dref, dref, coef_ref)]


def pack(logits, means, log_scales, coeffs):
    """(..., M, S) and three (..., M, 3, S) in PixelCNN++'s packed (..., 10 M, S) order."""
    blocks = [torch.cat([t[..., c, :] for t in (means, log_scales, coeffs)], -2) for c in range(3)]
    return torch.cat([logits, *blocks], -2)


# -- problems ----------------------------------------------------------------------


@st.composite
def problems(draw):
    packed = draw(st.booleans())
    C = 3 if packed else draw(st.sampled_from([1, 2, 3]))
    M = draw(st.sampled_from([1, 2, 5, 10]))
    H, W = draw(st.sampled_from([(1, 1), (3, 5), (7, 3), (5, 5), (9, 7)]))
    K = draw(st.sampled_from([None, 1, 3]))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return dict(packed=packed, C=C, M=M, H=H, W=W, K=K, batch=batch, seed=draw(st.integers(0, 2**31 - 1)),
                num_bins=draw(st.sampled_from([256, 256, 256, 16, 2])), spread=draw(st.sampled_from([0.1, 1.0])))


def make_inputs(p, dtype, device):
    """x on the grid of num_bins levels (both edge bins included), params in
    PixelCNN++'s ranges: log scales from -8 (below the -7 floor) to 1.5,
    means off x by up to `spread` (tails that take the low-mass fallback)."""
    g = torch.Generator().manual_seed(p["seed"])
    nb, C, M, H, W = p["num_bins"], p["C"], p["M"], p["H"], p["W"]
    lead = (*(() if p["K"] is None else (p["K"],)), *p["batch"])
    levels = torch.randint(0, nb, (*p["batch"], C, H, W), generator=g)
    levels.view(-1)[0] = 0
    levels.view(-1)[-1] = nb - 1
    x = levels.double() * (2.0 / (nb - 1)) - 1.0
    xs = x.expand(*lead, C, H, W)
    means = xs.unsqueeze(-4) + p["spread"] * (2 * torch.rand((*lead, M, C, H, W), generator=g, dtype=torch.float64) - 1)
    log_scales = -8.0 + 9.5 * torch.rand((*lead, M, C, H, W), generator=g, dtype=torch.float64)
    logits = 3.0 * torch.randn((*lead, M, H, W), generator=g, dtype=torch.float64)
    if p["packed"]:
        raw = 1.5 * torch.randn((*lead, M, C, H, W), generator=g, dtype=torch.float64)
        flat = [t.flatten(-2) for t in (logits, means, log_scales, raw)]
        params64 = pack(*flat).unflatten(-1, (H, W))
        params = params64.to(dtype).to(device).requires_grad_()
        return x, params, (params64,), lead
    tensors = tuple(t.to(dtype).to(device).requires_grad_() for t in (logits, means, log_scales))
    return x, tensors, (logits, means, log_scales), lead


def transcription(x64, params64, packed, lead, num_bins):
    """PixelCNN++'s formula in float64 over the flattened leading shape (x broadcast)."""
    xs = x64.expand(*lead, *x64.shape[-3:]).reshape(-1, *x64.shape[-3:])
    if packed:
        out = pixelcnn_log_prob(xs, params64[0].reshape(-1, *params64[0].shape[-3:]), num_bins)
    else:
        logits, means, log_scales = params64
        out = independent_log_prob(xs, logits.reshape(-1, *logits.shape[-3:]),
                                   means.reshape(-1, *means.shape[-4:]), log_scales.reshape(-1, *means.shape[-4:]),
                                   num_bins)
    return out.reshape(lead)


def check_against_pixelcnn(p, dtype, device):
    x, params, _, lead = make_inputs(p, dtype, device)
    nb = p["num_bins"]
    inputs = [params] if p["packed"] else list(params)
    out = fastvae.discretized_logistic_mixture_log_prob(x.to(dtype).to(device), params, num_bins=nb)
    assert out.shape == lead
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.Generator().manual_seed(p["seed"] + 1)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, up.to(out.dtype).to(device))

    # the float64 transcription sees the same rounded inputs
    x64 = x.to(dtype).double()
    p64 = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = transcription(x64, p64, p["packed"], lead, nb)
    ref_grads = torch.autograd.grad(ref, p64, up)

    # error scales on the kernel layout (K = 1, P = all images)
    P = math.prod(lead)
    S = p["H"] * p["W"]
    x3 = x64.expand(*lead, *x64.shape[-3:]).reshape(P, p["C"], S)
    flat = [t.detach().reshape(1, P, *t.shape[len(lead):-2], S) for t in p64]
    floor = torch.finfo(out.dtype).tiny / RTOL[dtype]  # a posterior weight that underflows
    value_scale, value_ref, grad_scales, grad_refs = error_scales(x3, p["packed"], flat, up.reshape(1, P), nb, floor)
    rtol = RTOL[out.dtype]
    assert_close(out, ref.detach(), value_scale.reshape(lead) + value_ref.reshape(lead) / rtol, "log_prob")
    names = ["params"] if p["packed"] else ["logit_probs", "means", "log_scales"]
    for name, got, want, scale, ref_err in zip(names, grads, ref_grads, grad_scales, grad_refs):
        assert got.dtype == dtype
        grad_rtol = RTOL[got.dtype]
        assert_close(got, want, (scale + ref_err / grad_rtol).reshape(want.shape), "d" + name)
    return out, grads


# The interpreter runs a program of this op in about 0.1-0.5 s: a subset there.
@settings(max_examples=10 if INTERPRET else 40)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(p=problems())
def test_forward_backward_match_pixelcnn(backend, dtype, p):
    check_against_pixelcnn(p, dtype, backend[1])


@settings(max_examples=3 if INTERPRET else 8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(p=problems())
def test_half_precision_matches_pixelcnn(backend, dtype, p):
    """Half-precision parameters: a float32 log-likelihood equal to the float64
    one of the same rounded inputs, gradients in the parameters' dtype."""
    check_against_pixelcnn(p, dtype, backend[1])


@pytest.mark.parametrize("packed", [True, False])
# (the interpreter runs a program per tile in Python: K = 5 there, K = 16 here)
@pytest.mark.parametrize("K,batch,HW", [(5 if INTERPRET else 16, (4,), (7, 9)), (1, (1,), (1, 1)), (3, (2,), (33, 35)),
                                        (None, (1,), (5, 3))])
@pytest.mark.full_interpreted  # 4-16 s a case interpreted; the PixelCNN++ and half tests give the kernel shapes
def test_shapes_and_x_broadcast_over_samples(backend, packed, K, batch, HW):
    """K = 1 and K > 1 with x broadcast over K, one-image batches, one pixel,
    and an image of more than 1024 pixels (several chunks / tiles), in float64
    against the transcription; a second call gives the same bits."""
    p = dict(packed=packed, C=3, M=10 if packed else 4, H=HW[0], W=HW[1], K=K, batch=batch, seed=sum(HW),
             num_bins=256, spread=1.0)
    out, grads = check_against_pixelcnn(p, torch.float64, backend[1])
    again, grads_again = check_against_pixelcnn(p, torch.float64, backend[1])
    assert torch.equal(out, again)
    for a, b in zip(grads, grads_again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edges_clamp_and_fallback(backend, dtype):
    """Each branch by itself: the first and last bins, a mid bin, the low-mass
    fallback, log scales below the -7 floor (no gradient) and far above it."""
    _, device = backend
    x = torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 1.0 / 255], dtype=torch.float64)
    means = torch.tensor([-0.2, 0.3, 0.01, 0.9, 0.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    log_scales = torch.tensor([-2.0, -1.0, -3.0, -5.0, -9.0, -8.0, 3.0, 40.0], dtype=torch.float64)
    n = x.numel()
    logits = torch.zeros(1, 1, 1, n, dtype=torch.float64)
    tensors = [logits, means.reshape(1, 1, 1, 1, n), log_scales.reshape(1, 1, 1, 1, n)]
    params = [t.to(dtype).to(device).requires_grad_() for t in tensors]
    out = fastvae.discretized_logistic_mixture_log_prob(x.reshape(1, 1, 1, n).to(dtype).to(device), params)
    p64 = [t.detach().double().cpu().requires_grad_() for t in params]
    ref = independent_log_prob(x.reshape(1, 1, 1, n), *p64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=RTOL[dtype] * 50, atol=0)
    grads = torch.autograd.grad(out.sum(), params)
    ref_grads = torch.autograd.grad(ref.sum(), p64)
    assert grads[2].reshape(-1)[4].item() == 0.0 and grads[2].reshape(-1)[5].item() == 0.0  # below the floor
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double().cpu(), want, rtol=RTOL[dtype] * 100, atol=RTOL[dtype] * 100)


def test_gradcheck_float64(backend):
    _, device = backend
    p = dict(packed=True, C=3, M=2, H=1, W=2, K=2, batch=(1,), seed=3, num_bins=256, spread=0.1)
    x, params, _, lead = make_inputs(p, torch.float64, device)
    x3 = x.expand(*lead, 3, 1, 2).reshape(2, 3, 2).contiguous().to(device)
    # finite differences of 80 parameters, each a forward: small for the interpreter's sake
    fn = lambda t: DiscretizedLogisticMixtureLogProb.apply(x3, t, None, None, 256, (2,))  # noqa: E731
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(fn, (params.detach().reshape(1, 2, 20, 2).requires_grad_(),), atol=1e-6,
                                    fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    x = torch.rand(2, 3, 5, device=device) * 2 - 1
    params = torch.randn(3, 2, 20, 5, device=device)
    torch.library.opcheck(discretized_logistic_mixture_log_prob_op, (x, params, None, None, 256))
    torch.library.opcheck(discretized_logistic_mixture_log_prob_backward_op,
                          (torch.randn(3, 2, device=device), x, params, None, None, 256))
    logits, means, ls = torch.randn(3, 2, 4, 5, device=device), torch.randn(3, 2, 4, 3, 5, device=device), \
        torch.randn(3, 2, 4, 3, 5, device=device)
    torch.library.opcheck(discretized_logistic_mixture_log_prob_op, (x, logits, means, ls, 16))
    torch.library.opcheck(discretized_logistic_mixture_log_prob_backward_op,
                          (torch.randn(3, 2, device=device), x, logits, means, ls, 16))


def test_errors_on_bad_input(backend):
    _, device = backend
    x = torch.zeros(2, 3, 4, 5, device=device)
    f = fastvae.discretized_logistic_mixture_log_prob
    with pytest.raises(ValueError, match=r"10 M"):
        f(x, torch.zeros(2, 15, 4, 5, device=device))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        f(torch.zeros(2, 1, 4, 5, device=device), torch.zeros(2, 10, 4, 5, device=device))
    with pytest.raises(ValueError, match="num_bins"):
        f(x, torch.zeros(2, 10, 4, 5, device=device), num_bins=1)
    with pytest.raises(ValueError, match="num_bins"):
        f(x, torch.zeros(2, 10, 4, 5, device=device), num_bins=5000)
    with pytest.raises(TypeError, match="tuple"):
        f(x, (torch.zeros(2, 1, 4, 5, device=device),))
    with pytest.raises(ValueError, match=r"means of shape \(2, 1, 3, 4, 4\)"):
        f(x, (torch.zeros(2, 1, 4, 5, device=device), torch.zeros(2, 1, 3, 4, 4, device=device),
              torch.zeros(2, 1, 3, 4, 5, device=device)))
    with pytest.raises(ValueError, match="does not broadcast"):
        f(torch.zeros(3, 3, 4, 5, device=device), torch.zeros(2, 10, 4, 5, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        f(x.long(), torch.zeros(2, 10, 4, 5, device=device))


def test_double_backward_is_refused(backend):
    _, device = backend
    x = torch.zeros(1, 3, 2, 2, device=device)
    params = torch.randn(1, 10, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
    out = fastvae.discretized_logistic_mixture_log_prob(x.double(), params)
    (g,) = torch.autograd.grad(out.sum(), params, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()


# -- likelihood="discretized_logistic_mixture" in the objectives and evaluation --------


def _images(device, B=3, H=5, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 3, H, W), generator=g).double() / 127.5 - 1.0
    x.view(-1)[0], x.view(-1)[-1] = -1.0, 1.0
    return x.to(device), g


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_objectives_with_the_likelihood(backend, packed, objective):
    """elbo_terms / iwae_terms with likelihood="discretized_logistic_mixture":
    the reconstruction term equals PixelCNN++'s formula at the z the decoder
    was given, and the decoder's gradient matches the formula's."""
    _, device = backend
    x, g = _images(device)
    B, M, L, H, W = 3, 2, 2, 5, 3
    mu = torch.randn(B, L, generator=g, dtype=torch.float64).to(device).requires_grad_()
    logvar = (0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    rows = 10 * M if packed else M * 7  # tuple: logits M, then means and log scales M x 3 each
    base = (0.5 * torch.randn(rows, H, W, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    weight = (0.3 * torch.randn(L, rows, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    seen = []

    def decode(z):
        seen.append(z.detach())
        h = base + (z @ weight)[..., None, None]
        if packed:
            return h
        return h[..., :M, :, :], h[..., M:4 * M, :, :].unflatten(-3, (M, 3)), h[..., 4 * M:, :, :].unflatten(-3, (M, 3))

    if objective == "elbo":
        terms = fastvae.elbo_terms(x, mu, logvar, decode, likelihood="discretized_logistic_mixture", n_samples=2,
                                   reduction="none")
    else:
        terms = fastvae.iwae_terms(x, mu, logvar, decode, k=3, likelihood="discretized_logistic_mixture",
                                   reduction="none")
    z = seen[-1]
    out = decode(z)
    seen.pop()
    k = z.shape[0]
    xs = x.double().cpu().expand(k, *x.shape).reshape(k * B, 3, H, W)
    if packed:
        ref = pixelcnn_log_prob(xs, out.double().cpu().reshape(k * B, 10 * M, H, W))
    else:
        lg, mn, ls = (t.double().cpu().reshape(k * B, *t.shape[2:]) for t in out)
        ref = independent_log_prob(xs, lg, mn, ls)
    ref = ref.reshape(k, B).mean(0)
    torch.testing.assert_close(terms.reconstruction.double().cpu(), ref.detach(), rtol=1e-10, atol=1e-9)
    got = torch.autograd.grad(terms.reconstruction.sum(), [base, weight])
    want = torch.autograd.grad(ref.sum(), [base, weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=1e-9, atol=1e-9)
    bound = getattr(fastvae, objective)(x, mu, logvar, decode, likelihood="discretized_logistic_mixture")
    assert torch.isfinite(bound)


@pytest.mark.parametrize("packed", [True, False])
def test_evaluation_with_the_likelihood(backend, packed):
    """log_likelihood, reconstruction_probability and evaluate with q = p(z)
    and a decoder that ignores z: every importance weight is p(x | z), the
    same for every sample, so each estimate equals PixelCNN++'s log p(x)."""
    _, device = backend
    x, g = _images(device, B=2, H=3, W=3, seed=1)
    M = 3
    params = torch.randn(10 * M, 3, 3, generator=g, dtype=torch.float64).to(device)
    if packed:
        ref = pixelcnn_log_prob(x.cpu(), params.cpu().expand(2, -1, -1, -1))
    else:
        ref = independent_log_prob(x.cpu(), params[:M].cpu().expand(2, -1, -1, -1),
                                   params[M:4 * M].cpu().unflatten(0, (M, 3)).expand(2, -1, -1, -1, -1),
                                   params[4 * M:7 * M].cpu().unflatten(0, (M, 3)).expand(2, -1, -1, -1, -1))

    def encode(xb):
        zero = torch.zeros(xb.shape[0], 2, dtype=xb.dtype, device=xb.device)
        return zero, zero

    def decode(z):
        lead = z.shape[:-1]
        h = params.expand(*lead, *params.shape) + 0.0 * z.sum(-1)[..., None, None, None]
        if packed:
            return h
        return h[..., :M, :, :], h[..., M:4 * M, :, :].unflatten(-3, (M, 3)), \
            h[..., 4 * M:7 * M, :, :].unflatten(-3, (M, 3))

    ll = fastvae.log_likelihood(x, encode, decode, k=7, likelihood="discretized_logistic_mixture", chunk_size=3)
    torch.testing.assert_close(ll.double().cpu(), ref, rtol=1e-10, atol=1e-9)
    rp = fastvae.reconstruction_probability(x, encode, decode, n_samples=5, likelihood="discretized_logistic_mixture")
    torch.testing.assert_close(rp.double().cpu(), ref, rtol=1e-10, atol=1e-9)
    result = fastvae.evaluate([x[:1], x[1:]], encode, decode, k=4, likelihood="discretized_logistic_mixture")
    assert result.log_likelihood == pytest.approx(ref.mean().item(), rel=1e-10)


def test_decoder_output_is_checked(backend):
    _, device = backend
    x, _ = _images(device)
    mu = torch.zeros(3, 2, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"leading shape \(2,\); expected \(3,\)"):
        fastvae.elbo(x, mu, mu, lambda z: torch.zeros(2, 20, 5, 3, dtype=torch.float64, device=device),
                     likelihood="discretized_logistic_mixture")
    with pytest.raises(ValueError, match="needs images"):
        fastvae.elbo(x.flatten(1), mu, mu, lambda z: torch.zeros(3, 45, dtype=torch.float64, device=device),
                     likelihood="discretized_logistic_mixture")


@pytest.mark.skipif(INTERPRET, reason="torch.compile of the op: a main-process test")
@pytest.mark.parametrize("packed", [True, False])
def test_compile_fullgraph_matches_eager(backend, packed):
    """torch.compile(fullgraph=True) traces the op as one node (its fake) and
    gives eager's values and gradients."""
    from helpers import assert_compiled_matches_eager

    _, device = backend
    p = dict(packed=packed, C=3, M=3, H=3, W=5, K=2, batch=(2,), seed=11, num_bins=256, spread=1.0)
    x, params, _, _ = make_inputs(p, torch.float32, device)
    x = x.float().to(device)
    wrt = [params] if packed else list(params)

    def loss(x, params):
        return fastvae.discretized_logistic_mixture_log_prob(x, params).sum()

    assert_compiled_matches_eager(loss, (x, params), wrt)


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing. Differentiated twice it raises a named error, tested in
# tests/test_double_backward.py (test_..._raises_a_named_error_when_differentiated_twice).


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes (images (B, 3, 3, 3),
    made without a draw, against packed params of M = 2 components)."""
    images = torch.linspace(-1, 1, B * 27).reshape(B, 3, 3, 3)
    return op(lambda p: fastvae.discretized_logistic_mixture_log_prob(images, p), (K, B, 20, 3, 3))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count: PixelCNN++'s packed layout,
    3 x 40 x 40 pixels, past one 1024-pixel work item per image, K = 3 samples
    of M = 3 components."""
    g = torch.Generator().manual_seed(0)
    x_img = torch.randint(0, 256, (2, 3, 40, 40), generator=g).float() / 127.5 - 1
    p_img = leaf(3, 2, 30, 40, 40)
    return [lambda: run(lambda p: fastvae.discretized_logistic_mixture_log_prob(x_img, p), p_img)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    x_img = (torch.arange(30, dtype=torch.float64) * 17 % 256).reshape(2, 3, 1, 5) / 127.5 - 1
    return lambda: run(lambda p: fastvae.discretized_logistic_mixture_log_prob(x_img, p), leaf(2, 2, 10, 1, 5))


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(dlm_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed, K, P, M, C, S, num_bins", [
    (True, 1, 1, 1, 3, 1, 256), (True, 2, 3, 5, 3, 13, 256), (True, 1, 2, 2, 3, 9, 32),  # PixelCNN++'s: C = 3
    (False, 1, 1, 1, 1, 1, 256), (False, 2, 3, 5, 3, 13, 256), (False, 1, 2, 2, 1, 9, 32)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, packed, K, P, M,
                                                                    C, S, num_bins):
    """fastvae::discretized_logistic_mixture_log_prob and its backward called as
    a compiled graph calls them (x (P, C, S); params (K, P, 10 M, S) packed,
    or the logits (K, P, M, S) with means and log-scales (K, P, M, C, S)):
    on the triton backend from a plan of the call's signature (OP_PLANS),
    with the general launch's log-likelihood and every gradient bit for bit,
    from the first call and the second; one pixel, odd sizes, another bin
    count, x at both edges; half precision, strided params and a
    gradient of another dtype take the general launch and make no plan."""
    dlm_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(K + P + M + C + S)

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    levels = torch.randint(0, num_bins, (P, C, S), generator=g, dtype=torch.int64)
    levels.view(-1)[:2] = torch.tensor([0, num_bins - 1])[: levels.numel()]
    x = (levels.to(torch.float64) / (num_bins - 1) * 2 - 1).to(dtype).to(plan_device)
    if packed:
        params, means, log_scales = rnd(K, P, 10 * M, S), None, None
    else:
        params, means, log_scales = rnd(K, P, M, S), rnd(K, P, M, C, S), rnd(K, P, M, C, S) - 2
    grad_out = rnd(K, P)

    def calls():
        return [discretized_logistic_mixture_log_prob_op(x, params, means, log_scales, num_bins),
                *discretized_logistic_mixture_log_prob_backward_op(grad_out, x, params, means, log_scales, num_bins)]

    op_plans_match_the_general_launch(monkeypatch, dlm_module, calls)
    assert len(dlm_module.OP_PLANS) == 1
    dlm_module.OP_PLANS.clear()
    discretized_logistic_mixture_log_prob_op(x.half(), params.half(), None if packed else means.half(),
                                             None if packed else log_scales.half(), num_bins)
    if S > 1:
        discretized_logistic_mixture_log_prob_op(x, torch.cat([params, params], -1)[..., ::2], means, log_scales,
                                                 num_bins)
    other = torch.float64 if dtype is torch.float32 else torch.float32
    discretized_logistic_mixture_log_prob_backward_op(grad_out.to(other), x, params, means, log_scales, num_bins)
    assert len(dlm_module.OP_PLANS) == 0
