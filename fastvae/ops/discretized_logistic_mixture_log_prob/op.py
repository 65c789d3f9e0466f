"""discretized_logistic_mixture_log_prob's front end: the public function,
the torch.library ops fastvae::discretized_logistic_mixture_log_prob and
fastvae::discretized_logistic_mixture_log_prob_backward, their autograd
Function (no double backward: a named error) and the route of
likelihood="discretized_logistic_mixture" (decoder_log_prob,
fastvae/_decoder.py's table).

PixelCNN++'s likelihood of 8-bit images (Salimans et al. 2017,
"PixelCNN++"; openai/pixel-cnn nn.py, discretized_mix_logistic_loss), fused
forward and backward, with x broadcast over decoder samples.

Also the decoder convention of likelihood="discretized_logistic_mixture" in
the objectives and evaluation functions (``decoder_log_prob``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ... import _backend, _double_backward, _validate, _value_checks
from ..._launch import Launch, PlanCache, template
from ..._op import define, run
from ..._validate import broadcasts_to

NUM_BINS_MAX = 2001  # the second bin's centre, -1 + 2 / (num_bins - 1), must not pass PixelCNN++'s -0.999


# The plans of the ops' own calls (a compiled graph's nodes) on the triton
# backend, per signature (bounded: fastvae._launch.PlanCache); ENABLED False
# sends every call the general way (the tests compare the two); ``empty``
# allocates each output like a template the plan holds (the tests' fixture may
# poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class MixtureOfLogisticsPlan:
    """The launches of one signature of the ops' own calls: x (P, C, S) and
    params (K, P, rows, S), packed or with means and log_scales (K, P, M, C,
    S), contiguous, of one float32 or float64 dtype, K P S > 0, and
    num_bins. The general launchers' variants (triton.py's launch_plans) on
    the same arguments, one kernel each way."""

    __slots__ = ("packed", "out_like", "dparams_like", "dmeans_like", "forward", "forward_ints", "backward",
                 "backward_ints")

    def __init__(self, x: Tensor, params: Tensor, means: Tensor | None, num_bins: int):
        kern = _backend.triton_module("discretized_logistic_mixture_log_prob")
        dtype, device = params.dtype, params.device
        self.packed = means is None
        self.out_like = template(params.shape[:2], dtype, device)
        self.dparams_like = template(params.shape, dtype, device)
        self.dmeans_like = None if means is None else template(means.shape, dtype, device)  # dlog_scales' too
        (grid, meta, self.forward_ints), (bgrid, bmeta, self.backward_ints) = kern.launch_plans(x, params, means,
                                                                                                num_bins)
        self.forward = Launch(kern._dlm_fwd_kernel, grid, meta)
        self.backward = Launch(kern._dlm_bwd_kernel, bgrid, bmeta)

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, self.backward]

    def run_forward(self, x: Tensor, params: Tensor, means: Tensor | None, log_scales: Tensor | None) -> Tensor:
        """_forward's out, launched from the plan (the packed layout's means and
        log-scales are read from params)."""
        out = empty(self.out_like)
        self.forward(x, params, params if self.packed else means, params if self.packed else log_scales, out,
                     *self.forward_ints)
        return out

    def run_backward(self, grad_out: Tensor, x: Tensor, params: Tensor, means: Tensor | None,
                     log_scales: Tensor | None) -> list[Tensor]:
        """_backward's gradients, launched from the plan."""
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # (K, P) in any shape: read flat
        dparams = empty(self.dparams_like)
        if self.packed:
            self.backward(g, x, params, params, params, dparams, dparams, dparams, *self.backward_ints)
            return [dparams]
        dmeans, dlog_scales = empty(self.dmeans_like), empty(self.dmeans_like)
        self.backward(g, x, params, means, log_scales, dparams, dmeans, dlog_scales, *self.backward_ints)
        return [dparams, dmeans, dlog_scales]


def _op_plan(x: Tensor, params: Tensor, means: Tensor | None, log_scales: Tensor | None,
             num_bins: int) -> MixtureOfLogisticsPlan | None:
    """The plan of a call of the ops themselves (the Function hands them the
    kernels' layout, as a compiled graph calls them), or None (the general
    launch, which on CUDA pays the launch geometry and Triton's binding of
    the arguments at every call): on the triton backend, outside autocast,
    contiguous float32 or float64 tensors of one dtype and device, x (P, C,
    S) against params (K, P, rows, S), no empty dimension."""
    device = params.device
    if (not ENABLED or not _backend.op_plans_serve(device) or params.dtype not in _DTYPES or params.dim() != 4
            or x.dim() != 3 or params.numel() == 0 or x.shape[0] != params.shape[1] or x.shape[2] != params.shape[3]
            or (means is None) != (log_scales is None)
            or (means is not None and (means.dim() != 5 or log_scales.shape != means.shape))):
        return None
    for t in (x, params, means, log_scales):
        if t is not None and (t.dtype is not params.dtype or t.device != device or not t.is_contiguous()):
            return None
    key = (x.shape, params.shape, None if means is None else means.shape, params.dtype, device, num_bins)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, MixtureOfLogisticsPlan(x, params, means, num_bins))


def _kernel_inputs(backend: str, dtype, x, params, means, log_scales):
    return [_backend.kernel_input(backend, t, dtype) for t in (x, params, means, log_scales)]


def _forward(x: Tensor, params: Tensor, means: Tensor | None, log_scales: Tensor | None, num_bins: int) -> Tensor:
    """out (K, P) for x (P, C, S) and params (K, P, 10 M, S) (packed, means
    and log_scales None) or the logits (K, P, M, S) with means, log_scales
    (K, P, M, C, S), all contiguous; from a plan where _op_plan takes the call
    (a compiled graph's node on CUDA)."""
    if (plan := _op_plan(x, params, means, log_scales, num_bins)) is not None:
        return plan.run_forward(x, params, means, log_scales)
    backend = _backend.backend_for(params.device)
    dtype = _backend.compute_dtype(x, params, means, log_scales)
    x, params, means, log_scales = _kernel_inputs(backend, dtype, x, params, means, log_scales)
    out = _backend.empty_output(params.shape[:2], like=params, dtype=dtype)
    _backend.launch(backend, "discretized_logistic_mixture_log_prob_forward", params.numel(), x=x, params=params,
                    means=means, log_scales=log_scales, num_bins=num_bins, out=out)
    return out


def _backward(grad_out: Tensor, x: Tensor, params: Tensor, means: Tensor | None, log_scales: Tensor | None,
              num_bins: int) -> list[Tensor]:
    """[dparams] (packed) or [dlogits, dmeans, dlog_scales], each in its input's
    dtype; from a plan as the forward's."""
    if grad_out.dtype is params.dtype and (plan := _op_plan(x, params, means, log_scales, num_bins)) is not None:
        return plan.run_backward(grad_out, x, params, means, log_scales)
    backend = _backend.backend_for(params.device)
    dtype = _backend.compute_dtype(x, params, means, log_scales)
    dtypes = [t.dtype for t in (params, means, log_scales) if t is not None]
    x, params, means, log_scales = _kernel_inputs(backend, dtype, x, params, means, log_scales)
    grad_out = _backend.kernel_input(backend, grad_out, dtype).contiguous()
    dparams = _backend.empty_output(params.shape, like=params)
    dmeans = None if means is None else _backend.empty_output(means.shape, like=means)
    dlog_scales = None if log_scales is None else _backend.empty_output(log_scales.shape, like=log_scales)
    _backend.launch(backend, "discretized_logistic_mixture_log_prob_backward",
                    params.numel() + (0 if means is None else 2 * means.numel()), grad_out=grad_out, x=x,
                    params=params, means=means, log_scales=log_scales, num_bins=num_bins, dparams=dparams,
                    dmeans=dmeans, dlog_scales=dlog_scales)
    grads = [t for t in (dparams, dmeans, dlog_scales) if t is not None]
    return [_backend.in_dtype(t, d) for t, d in zip(grads, dtypes)]


def _fake_forward(x, params, means, log_scales, num_bins):
    return params.new_empty(params.shape[:2], dtype=_backend.compute_dtype(x, params, means, log_scales))


def _fake_backward(grad_out, x, params, means, log_scales, num_bins):
    return [torch.empty_like(t) for t in (params, means, log_scales) if t is not None]


discretized_logistic_mixture_log_prob_op = define(
    "discretized_logistic_mixture_log_prob(Tensor x, Tensor params, Tensor? means, Tensor? log_scales, "
    "int num_bins) -> Tensor",
    _forward, _fake_forward,
)
discretized_logistic_mixture_log_prob_backward_op = define(
    "discretized_logistic_mixture_log_prob_backward(Tensor grad_out, Tensor x, Tensor params, Tensor? means, "
    "Tensor? log_scales, int num_bins) -> Tensor[]",
    _backward, _fake_backward,
)


class DiscretizedLogisticMixtureLogProb(torch.autograd.Function):
    """Autograd of fastvae::discretized_logistic_mixture_log_prob on the
    kernels' layout (x (P, C, S); params (K, P, rows, S); means, log_scales
    (K, P, M, C, S) or None), made by the public function. x gets no gradient
    (the data of a discrete likelihood)."""

    @staticmethod
    def forward(ctx, x, params, means, log_scales, num_bins, out_shape):
        ctx.save_for_backward(x, params, means, log_scales)
        ctx.num_bins = num_bins
        return run(discretized_logistic_mixture_log_prob_op, x, params, means, log_scales, num_bins).view(out_shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, params, means, log_scales = ctx.saved_tensors
        g = grad_out.reshape(params.shape[:2])
        grads = run(discretized_logistic_mixture_log_prob_backward_op, g, x, params, means, log_scales, ctx.num_bins)
        if torch.is_grad_enabled():  # create_graph=True: no closed form here
            grads = _double_backward.not_twice("discretized_logistic_mixture_log_prob", tuple(grads),
                                               (params, means, log_scales, grad_out))
        if means is None:
            return None, grads[0], None, None, None, None
        return None, grads[0], grads[1], grads[2], None, None


# -- public function -----------------------------------------------------------


def _check_data(x: Tensor, name: str = "x") -> None:
    """Warn when images under the discretized logistic mixture leave [-1, 1]
    (raw 8-bit pixels, or pixels scaled into [0, 1]): every value past 0.999
    falls in the last bin and the result is no log-likelihood of the images."""
    if not _value_checks.should_check("discretized data", x):
        return
    lo, hi = _value_checks.value_range(x)
    if lo < -1.0 or hi > 1.0:
        _value_checks.warn("discretized data",
            f"{name} lies outside [-1, 1] (min {lo:.3g}, max {hi:.3g}): the discretized logistic mixture takes "
            f"pixels scaled as p / 127.5 - 1 (8 bits); values outside [-1, 1] all fall in an edge bin")


def _check_params(x: Tensor, params: Any, x_name: str = "x") -> tuple[Tensor, ...]:
    """The parameter tensors (one packed tensor, or the three of the tuple)
    after the metadata checks, naming what is wrong, and the value check of x."""
    _check_data(x, x_name)
    if isinstance(params, Tensor):
        _validate.float_tensors(x=x, params=params)
        if x.dim() < 3 or params.dim() < 3:
            raise ValueError(f"x and params need (C, H, W) and (10 M, H, W) trailing dimensions, got x of shape "
                             f"{tuple(x.shape)} and params of shape {tuple(params.shape)}")
        rows, H, W = params.shape[-3:]
        if rows < 10 or rows % 10 or x.shape[-3] != 3 or x.shape[-2:] != (H, W):
            raise ValueError(
                f"packed (PixelCNN++) params have shape (..., 10 M, H, W) for x of shape (..., 3, H, W): "
                f"got params {tuple(params.shape)} and x {tuple(x.shape)}; for other channel counts pass "
                f"(logit_probs, means, log_scales)")
        return (params,)
    if not isinstance(params, (tuple, list)) or len(params) != 3:
        raise TypeError("params must be PixelCNN++'s packed tensor (..., 10 M, H, W) or a (logit_probs, means, "
                        f"log_scales) tuple, got {type(params).__name__}"
                        + (f" of {len(params)} items" if isinstance(params, (tuple, list)) else ""))
    logit_probs, means, log_scales = params
    _validate.float_tensors(x=x, logit_probs=logit_probs, means=means, log_scales=log_scales)
    if x.dim() < 3 or logit_probs.dim() < 3:
        raise ValueError(f"x needs (C, H, W) and logit_probs (M, H, W) trailing dimensions, got shapes "
                         f"{tuple(x.shape)} and {tuple(logit_probs.shape)}")
    lead, (M, H, W), C = logit_probs.shape[:-3], logit_probs.shape[-3:], x.shape[-3]
    want = (*lead, M, C, H, W)
    for name, t in (("means", means), ("log_scales", log_scales)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} of shape {tuple(t.shape)}: expected {want} (logit_probs' {tuple(lead)} "
                             f"leading shape, M = {M} components, x's C = {C} channels and H, W = {H}, {W})")
    if x.shape[-2:] != (H, W) or M < 1:
        raise ValueError(f"x of shape {tuple(x.shape)} against logit_probs of shape {tuple(logit_probs.shape)}: "
                         f"H and W must agree and M >= 1")
    return logit_probs, means, log_scales


def discretized_logistic_mixture_log_prob(x: Tensor, params: Tensor | tuple[Tensor, Tensor, Tensor],
                                          num_bins: int = 256) -> Tensor:
    """log p(x) of a mixture of discretized logistics per image (PixelCNN++),
    summed over channels and pixels.

    Args:
        x: images (..., C, H, W) with values on the grid of ``num_bins`` levels
            in [-1, 1] (8-bit pixels p as p / 127.5 - 1). It broadcasts
            against params' leading shape (K, ...) without being copied K
            times. It gets no gradient.
        params: either PixelCNN++'s packed decoder output (..., 10 M, H, W)
            for C = 3: the M mixture logits, then per channel c a block of
            3 M rows, its M means, its M log scales and its M raw coefficients
            (exactly the layout of discretized_mix_logistic_loss, channels
            first); channel 1's mean is m1 + tanh(a0) x0 and channel 2's
            m2 + tanh(a1) x0 + tanh(a2) x1, a_j channel j's coefficients.
            Or a tuple (logit_probs (..., M, H, W), means (..., M, C, H, W),
            log_scales (..., M, C, H, W)) for any C, channels independent
            given the component.
        num_bins: levels per channel, 2 to 2001 (256 for 8 bits).

    Returns:
        log p(x), shape params' leading dimensions (..., without the last 3):
        per pixel log sum_m softmax(logits)_m prod_c P(x_c | m), summed over
        the pixels. P is PixelCNN++'s, to rounding: log scales are clamped
        below at -7 (their gradient is 0 there, as torch.clamp's); the first
        bin (x < -0.999) takes the mass below its upper edge, log sigmoid;
        the last (x > 0.999) the mass above its lower edge, -softplus;
        any other the mass between its edges, computed as
        -softplus(-a) - softplus(b) + log(1 - e^-(a - b)) (PixelCNN++'s
        log(sigmoid(a) - sigmoid(b)) without the cancellation of the
        difference); where that mass is not above 1e-5, PixelCNN++'s formula
        for it: the log density at the bin's centre plus the log bin width,
        log_pdf_mid - log((num_bins - 1) / 2), i.e. - log(127.5) for 256 bins.
        Differentiable in every parameter.

    Dtypes may differ: the result is float32 for half-precision inputs
    (float64 when any input is float64), each gradient in its input's dtype.
    """
    tensors = _check_params(x, params)
    if type(num_bins) is not int:
        num_bins = _validate.integer("num_bins", num_bins)
    if not 2 <= num_bins <= NUM_BINS_MAX:
        raise ValueError(f"num_bins must be in [2, {NUM_BINS_MAX}], got {num_bins}: the first and last bins are "
                         f"recognised as PixelCNN++ does (x < -0.999, x > 0.999)")
    return discretized_logistic_mixture_log_prob_unchecked(x, tensors, num_bins)


def discretized_logistic_mixture_log_prob_unchecked(x: Tensor, tensors: tuple[Tensor, ...], num_bins: int) -> Tensor:
    """The op for checked arguments: tensors is (packed,) or (logit_probs, means, log_scales)."""
    first = tensors[0]
    lead = first.shape[:-3]
    C, H, W = x.shape[-3:]
    S = H * W
    x_lead = x.shape[:-3]
    if not broadcasts_to(x_lead, lead):
        raise ValueError(f"x of shape {tuple(x.shape)} does not broadcast against the parameters' leading shape "
                         f"{tuple(lead)} (the result has that shape)")
    if x_lead == lead:
        K, P = 1, math.prod(lead)
    else:
        while len(x_lead) > max(len(lead) - 1, 0) and x_lead[0] == 1:  # (1, B) against (K, B): over K
            x_lead = x_lead[1:]
        if len(lead) >= 1 and x_lead == lead[1:]:
            K, P = lead[0], math.prod(lead[1:])
        else:  # an unusual broadcast: materialized (x is data, with no gradient to sum back)
            x_lead, K, P = lead, 1, math.prod(lead)
    x3 = x.detach().expand(*x_lead, C, H, W).reshape(P, C, S).contiguous()
    if len(tensors) == 1:
        params, means, log_scales = tensors[0].reshape(K, P, first.shape[-3], S).contiguous(), None, None
    else:
        M = first.shape[-3]
        params = first.reshape(K, P, M, S).contiguous()
        means, log_scales = (t.reshape(K, P, M, C, S).contiguous() for t in tensors[1:])
    return DiscretizedLogisticMixtureLogProb.apply(x3, params, means, log_scales, num_bins, lead)


# -- likelihood="discretized_logistic_mixture" (fastvae._decoder) ---------------


def decoder_log_prob(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int) -> Tensor:
    """log p(x | z) of likelihood="discretized_logistic_mixture": decode(z)
    returned PixelCNN++'s packed params (*sample_shape, *batch, 10 M, H, W)
    or a (logit_probs, means, log_scales) tuple of those leading shapes, for
    x (*batch, C, H, W) in [-1, 1] (256 levels)."""
    if x.dim() - batch_ndim != 3:
        raise ValueError(f"likelihood='discretized_logistic_mixture' needs images: x of shape {tuple(x.shape)} "
                         f"has {x.dim() - batch_ndim} event dimensions after {batch_ndim} batch dimension(s); "
                         f"expected (C, H, W)")
    tensors = _check_params(x, out if isinstance(out, Tensor) else tuple(out) if isinstance(out, list) else out,
                            "x (likelihood='discretized_logistic_mixture')")
    want = (*sample_shape, *x.shape[:batch_ndim])
    if tuple(tensors[0].shape[:-3]) != want:
        raise ValueError(f"decode returned parameters of leading shape {tuple(tensors[0].shape[:-3])}; expected "
                         f"{want} (sample shape {sample_shape} followed by x's batch shape)."
                         + _validate.decoder_shape_hint(x, sample_shape, batch_ndim, tuple(tensors[0].shape[-3:])))
    return discretized_logistic_mixture_log_prob_unchecked(x, tensors, 256)


# -- the decoder route: likelihood= of the objectives and evaluation (fastvae/_decoder.py) --


def decoder_route(x: Tensor, out: Any, sample_shape: tuple[int, ...], batch_ndim: int, probs_given: bool) -> Tensor:
    """PixelCNN++'s packed parameters or their (logit_probs, means, log_scales)."""
    return decoder_log_prob(x, out, sample_shape, batch_ndim)
