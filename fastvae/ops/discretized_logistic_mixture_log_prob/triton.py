"""Triton kernels of discretized_logistic_mixture_log_prob, PixelCNN++'s
likelihood (Salimans et al. 2017; openai/pixel-cnn nn.py,
discretized_mix_logistic_loss):
    out[k, p] = sum_s (lse_m(logit_m + sum_c lp_mc) - lse_m(logit_m)),
lp_mc the log mass of x's bin under logistic m of channel c (the oracle's
discretized_logistic_terms, in this folder's __init__.py, gives the branches).

Layout: x (P, C, S), S = H * W pixels, broadcast over K by indexing; params
(K, P, 10 M, S) packed (PixelCNN++, C = 3: the M logits, then per channel c
3 M rows of means, log scales and raw coefficients), or the logits
(K, P, M, S) with means and log_scales (K, P, M, C, S). Pixels are contiguous
in every array, so a program's tile of pixels loads each row coalesced.
- forward: one program per image (k, p), looping over its pixels in tiles of
  TILE (FP64_TILE) and over the components with a running (max, sumexp) per pixel for
  both log-sum-exps: no (K, P, M, S) intermediate, and the image's sum is
  added in one program in a fixed order (deterministic);
- backward: one program per image and pixel tile, two passes over the
  components: the first finds the pixel's log-sum-exps, the second
  recomputes each term with its derivatives and writes the gradients
  g w_m dlp (w_m the component's posterior weight), nothing saved from the
  forward but its inputs.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import acc_dtype, cdiv, log1p_unit, next_power_of_2, sigmoid, softplus

# Pixels per program tile, at 4 warps: 2 per thread, each with its two
# running (max, sumexp) states and the packed layout's three channels and
# coefficients live, under a cap of 128 registers; float64's math (libdevice
# exp and log in double) holds about twice the registers: 1 pixel per thread
# under ptxas's maximum of 255 (it takes 96-176). ptxas's own choice spilled
# a value or more in some variant of every other shape tried (512 pixels at a
# cap of 128 or 168, 256 in float64 at 168), and these spill nothing on sm_90
# and sm_80 in any dtype (python -m fastvae.kernels.aot; docs/internals/triton.md).
TILE = 256
FP64_TILE = 128
NUM_WARPS = 4
MAXNREG = 128
FP64_MAXNREG = 255
# The interpreter costs about 1 ms a program whatever its size: large tiles.
INTERPRETER_TILE = 4096

_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_EDGE: tl.constexpr = tl.constexpr(0.999)  # PixelCNN++'s first and last bins: x < -0.999, x > 0.999
_LOG_MIN_DELTA: tl.constexpr = tl.constexpr(-11.512925464970229)  # log(1e-5): below it, the pdf fallback
_LOG_SCALE_MIN: tl.constexpr = tl.constexpr(-7.0)  # PixelCNN++'s floor of the log scales

# -- math helpers -------------------------------------------------------------


@triton.jit
def _expm1(x):
    """e^x - 1 to a few ulp in either precision (Kahan's (u - 1) x / log u;
    libdevice expm1 is missing under the interpreter)."""
    u = tl.exp(x)
    um1 = u - 1.0
    lu = tl.log(u)
    ok = (um1 != 0.0) & (lu != 0.0) & (u > 0.0) & (u < float("inf"))
    kahan = um1 * x / tl.where(ok, lu, 1.0)
    return tl.where(ok, kahan, tl.where(u == 0.0, -1.0, tl.where(um1 == 0.0, x, um1)))


@triton.jit
def _log1mexp(d):
    """log(1 - e^-d), d >= 0 (Maechler's branches, no cancellation)."""
    return tl.where(d <= _LN2, tl.log(-_expm1(-d)), log1p_unit(-tl.exp(-d)))


@triton.jit
def _tanh(v):
    t = _expm1(-2.0 * tl.abs(v))
    r = -t / (2.0 + t)
    return tl.where(v < 0.0, -r, r)


@triton.jit
def _bin_log_mass(x, mu, ls_raw, h, log_half_bins, WITH_GRAD: tl.constexpr):
    """(lp, dlp/dmu, dlp/dls_raw) of one discretized logistic (the gradients
    only WITH_GRAD, else zeros): s = max(ls, -7), inv = e^-s,
    a = inv (x - mu + h), b = inv (x - mu - h); the first bin log sigmoid(a),
    the last -softplus(b), others -softplus(-a) - softplus(b) + log(1 - e^-(a - b))
    (PixelCNN++'s log(sigmoid(a) - sigmoid(b)) without cancellation), and
    where that is not above log(1e-5) PixelCNN++'s fallback
    mid - s - 2 softplus(mid) - log((num_bins - 1) / 2), mid = inv (x - mu)."""
    s = tl.maximum(ls_raw, _LOG_SCALE_MIN)
    inv = tl.exp(-s)
    c = x - mu
    a = inv * (c + h)
    b = inv * (c - h)
    d = (2.0 * h) * inv
    mid = inv * c
    sa = softplus(-a)
    sb = softplus(b)
    lmid = -sa - sb + _log1mexp(d)
    left = x < -_EDGE
    right = x > _EDGE
    fallback = (x >= -_EDGE) & (x <= _EDGE) & ~(lmid > _LOG_MIN_DELTA)
    lpdf = mid - s - 2.0 * softplus(mid) - log_half_bins
    lp = tl.where(left, -sa, tl.where(right, -sb, tl.where(fallback, lpdf, lmid)))
    if WITH_GRAD:
        pa = sigmoid(-a)
        pb = sigmoid(b)
        tm = 1.0 - 2.0 * sigmoid(mid)
        em1 = _expm1(d)
        q = tl.where(em1 > 0.0, d / tl.where(em1 > 0.0, em1, 1.0), 1.0)  # d / (e^d - 1)
        dmu = tl.where(left, -inv * pa, tl.where(right, inv * pb, tl.where(fallback, -inv * tm, -inv * (pa - pb))))
        dls = tl.where(left, -a * pa, tl.where(right, b * pb,
                       tl.where(fallback, -mid * tm - 1.0, -a * pa + b * pb - q)))
        dls = tl.where(ls_raw >= _LOG_SCALE_MIN, dls, 0.0)
    else:
        dmu = tl.zeros_like(lp)
        dls = tl.zeros_like(lp)
    return lp, dmu, dls


@triton.jit
def _packed_x(x_ptr, xrow, s, ok, S, ACC: tl.constexpr):
    """Packed (C = 3): x's three channels at the tile's pixels, (1, TILE) each.
    Apart from _packed_tanh: every inlined call leaves a debug label in the
    PTX that bounds ptxas's scheduling, and with one helper for both the
    float16 backward took a register more than before (python -m
    fastvae.kernels.aot; the instructions are the same)."""
    x0 = tl.load(x_ptr + xrow + s, mask=ok, other=0.0).to(ACC)[None, :]
    x1 = tl.load(x_ptr + xrow + S + s, mask=ok, other=0.0).to(ACC)[None, :]
    x2 = tl.load(x_ptr + xrow + 2 * S + s, mask=ok, other=0.0).to(ACC)[None, :]
    return x0, x1, x2


@triton.jit
def _packed_tanh(means_ptr, base, msk, mean_c, coef0, ACC: tl.constexpr):
    """Packed: tanh of the components' three coefficients, (BM, TILE) each,
    which couple channel 1's and 2's means to x0 and x1."""
    t0 = _tanh(tl.load(means_ptr + coef0 + base, mask=msk, other=0.0).to(ACC))
    t1 = _tanh(tl.load(means_ptr + coef0 + base + mean_c, mask=msk, other=0.0).to(ACC))
    t2 = _tanh(tl.load(means_ptr + coef0 + base + 2 * mean_c, mask=msk, other=0.0).to(ACC))
    return t0, t1, t2


@triton.jit
def _packed_channel(means_ptr, ls_ptr, base, msk, mean_c, mean0, ls0, x0, x1, x2, t0, t1, t2, c: tl.constexpr,
                    ACC: tl.constexpr):
    """Packed: (x, mu', log scale) of channel c, mu' PixelCNN++'s coupled
    mean (m1 + tanh(a0) x0, m2 + tanh(a1) x0 + tanh(a2) x1)."""
    xc = x0 if c == 0 else (x1 if c == 1 else x2)
    mu = tl.load(means_ptr + mean0 + base + c * mean_c, mask=msk, other=0.0).to(ACC)
    if c == 1:
        mu = mu + t0 * x0
    if c == 2:
        mu = mu + t1 * x0 + t2 * x1
    ls = tl.load(ls_ptr + ls0 + base + c * mean_c, mask=msk, other=0.0).to(ACC)
    return xc, mu, ls


@triton.jit
def _channel(x_ptr, means_ptr, ls_ptr, xrow, s, ok, base, msk, c, S, mean_c, mean0, ls0, ACC: tl.constexpr):
    """Not packed: (x, mean, log scale) of channel c."""
    xc = tl.load(x_ptr + xrow + c * S + s, mask=ok, other=0.0).to(ACC)[None, :]
    mu = tl.load(means_ptr + mean0 + base + c * mean_c, mask=msk, other=0.0).to(ACC)
    ls = tl.load(ls_ptr + ls0 + base + c * mean_c, mask=msk, other=0.0).to(ACC)
    return xc, mu, ls


@triton.jit
def _component(x_ptr, logits_ptr, means_ptr, ls_ptr, xrow, lrow, mrow, s, ok, mm, mok, C, S, mean_m, mean_c,
               mean0, ls0, coef0, h, log_half_bins, PACKED: tl.constexpr, ACC: tl.constexpr):
    """(logit, logit + sum_c lp_mc) of the components mm (BM,) at the tile's
    pixels s (TILE,): (BM, TILE) each, -inf in the rows past M."""
    msk = mok[:, None] & ok[None, :]
    lg = tl.load(logits_ptr + lrow + mm[:, None] * S + s[None, :], mask=msk, other=0.0).to(ACC)
    lp = lg
    base = mrow + mm[:, None] * mean_m + s[None, :]
    if PACKED:
        x0, x1, x2 = _packed_x(x_ptr, xrow, s, ok, S, ACC)
        t0, t1, t2 = _packed_tanh(means_ptr, base, msk, mean_c, coef0, ACC)
        for c in tl.static_range(3):
            xc, mu, ls = _packed_channel(means_ptr, ls_ptr, base, msk, mean_c, mean0, ls0, x0, x1, x2, t0, t1, t2, c,
                                         ACC)
            v, _, _ = _bin_log_mass(xc, mu, ls, h, log_half_bins, False)
            lp += v
    else:
        for c in range(0, C):
            xc, mu, ls = _channel(x_ptr, means_ptr, ls_ptr, xrow, s, ok, base, msk, c, S, mean_c, mean0, ls0, ACC)
            v, _, _ = _bin_log_mass(xc, mu, ls, h, log_half_bins, False)
            lp += v
    return tl.where(mok[:, None], lg, float("-inf")), tl.where(mok[:, None], lp, float("-inf"))


@triton.jit
def _merge(mx, se, v):
    """The running (max, sumexp) of each pixel after a block v (BM, TILE) of
    terms (finite, or -inf in rows past M; at least one row finite)."""
    new = tl.maximum(mx, tl.max(v, axis=0))
    return new, se * tl.exp(mx - new) + tl.sum(tl.exp(v - new[None, :]), axis=0)


@triton.jit
def _image(r, P, C, S, num_bins, img_logits, img_means, ACC: tl.constexpr):
    """Image r's first x, logit and mean offsets, half a bin and
    log((num_bins - 1) / 2)."""
    xrow = (r % P) * C * S
    lrow = r * img_logits
    mrow = r * img_means
    nb1 = (num_bins - 1).to(ACC)
    return xrow, lrow, mrow, 1.0 / nb1, tl.log(nb1 * 0.5)


@triton.jit
def _normalizers(x_ptr, logits_ptr, means_ptr, ls_ptr, xrow, lrow, mrow, s, ok, M, C, S, mean_m, mean_c, mean0, ls0,
                 coef0, h, log_half_bins, PACKED: tl.constexpr, ACC: tl.constexpr, TILE: tl.constexpr,
                 BM: tl.constexpr):
    """The running (max, sumexp) over all components of logit_m + sum_c lp_mc
    and of logit_m at the tile's pixels, (TILE,) each, nothing of size M kept.
    The callers take the logs: where the backward's row views are made
    changes ptxas's register allocation."""
    mx = tl.full([TILE], float("-inf"), ACC)
    se = tl.zeros([TILE], dtype=ACC)
    zmx = tl.full([TILE], float("-inf"), ACC)
    zse = tl.zeros([TILE], dtype=ACC)
    for m0 in range(0, M, BM):
        mm = m0 + tl.arange(0, BM)
        lg, lp = _component(x_ptr, logits_ptr, means_ptr, ls_ptr, xrow, lrow, mrow, s, ok, mm, mm < M, C, S,
                            mean_m, mean_c, mean0, ls0, coef0, h, log_half_bins, PACKED, ACC)
        mx, se = _merge(mx, se, lp)
        zmx, zse = _merge(zmx, zse, lg)
    return mx, se, zmx, zse


# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["P", "M", "C", "S", "num_bins", "mean0", "ls0", "coef0", "img_logits",
                               "img_means", "mean_m", "mean_c"])
def _dlm_fwd_kernel(
    x_ptr,  # (P, C, S)
    logits_ptr,  # params: (K, P, 10 M, S) packed, or the logits (K, P, M, S)
    means_ptr,  # (K, P, M, C, S), or params (packed)
    ls_ptr,  # (K, P, M, C, S), or params (packed)
    out_ptr,  # (K, P)
    P, M, C, S, num_bins,
    mean0, ls0, coef0,  # first element of the means, log scales, coefficients (packed: rows M, 2 M, 3 M)
    img_logits, img_means, mean_m, mean_c,  # strides of an image, a component, a channel
    PACKED: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
    BM: tl.constexpr,  # components a step: 1 on a GPU, all of them under the interpreter
):
    r = tl.program_id(0).to(tl.int64)
    xrow, lrow, mrow, h, log_half_bins = _image(r, P, C, S, num_bins, img_logits, img_means, ACC)
    acc = tl.zeros([TILE], dtype=ACC)
    for s0 in range(0, S, TILE):
        s = s0 + tl.arange(0, TILE)
        ok = s < S
        mx, se, zmx, zse = _normalizers(x_ptr, logits_ptr, means_ptr, ls_ptr, xrow, lrow, mrow, s, ok, M, C, S,
                                        mean_m, mean_c, mean0, ls0, coef0, h, log_half_bins, PACKED, ACC, TILE, BM)
        acc += tl.where(ok, (mx + tl.log(se)) - (zmx + tl.log(zse)), 0.0)
    tl.store(out_ptr + r, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _store_grads(x_ptr, means_ptr, ls_ptr, dmeans_ptr, dls_ptr, xrow, base, s, ok, msk, C, S, mean_c, mean0, ls0,
                 coef0, h, log_half_bins, gw, PACKED: tl.constexpr, ACC: tl.constexpr):
    """Recomputes a block of components' terms at the tile's pixels (base:
    their first channel's offsets, (BM, TILE)) and stores g w dlp/dmu,
    g w dlp/dls and, packed, the coefficients' gradients."""
    if PACKED:
        x0, x1, x2 = _packed_x(x_ptr, xrow, s, ok, S, ACC)
        t0, t1, t2 = _packed_tanh(means_ptr, base, msk, mean_c, coef0, ACC)
        dmu1 = tl.zeros_like(gw)
        dmu2 = tl.zeros_like(gw)
        for c in tl.static_range(3):
            xc, mu, ls = _packed_channel(means_ptr, ls_ptr, base, msk, mean_c, mean0, ls0, x0, x1, x2, t0, t1, t2, c,
                                         ACC)
            _, dmu, dls = _bin_log_mass(xc, mu, ls, h, log_half_bins, True)
            dmu = gw * dmu
            if c == 1:
                dmu1 = dmu
            if c == 2:
                dmu2 = dmu
            tl.store(dmeans_ptr + mean0 + base + c * mean_c, dmu.to(dmeans_ptr.dtype.element_ty), mask=msk)
            tl.store(dls_ptr + ls0 + base + c * mean_c, (gw * dls).to(dls_ptr.dtype.element_ty), mask=msk)
        dty = dmeans_ptr.dtype.element_ty
        tl.store(dmeans_ptr + coef0 + base, (dmu1 * x0 * (1.0 - t0 * t0)).to(dty), mask=msk)
        tl.store(dmeans_ptr + coef0 + base + mean_c, (dmu2 * x0 * (1.0 - t1 * t1)).to(dty), mask=msk)
        tl.store(dmeans_ptr + coef0 + base + 2 * mean_c, (dmu2 * x1 * (1.0 - t2 * t2)).to(dty), mask=msk)
    else:
        for c in range(0, C):
            # literal zeros for mean0 and ls0 (0 in this layout) fold away, as the stores below add
            # no offset: run-time zeros would cost an add per address
            xc, mu, ls = _channel(x_ptr, means_ptr, ls_ptr, xrow, s, ok, base, msk, c, S, mean_c, 0, 0, ACC)
            _, dmu, dls = _bin_log_mass(xc, mu, ls, h, log_half_bins, True)
            tl.store(dmeans_ptr + base + c * mean_c, (gw * dmu).to(dmeans_ptr.dtype.element_ty), mask=msk)
            tl.store(dls_ptr + base + c * mean_c, (gw * dls).to(dls_ptr.dtype.element_ty), mask=msk)


@triton.jit(do_not_specialize=["P", "M", "C", "S", "num_bins", "tiles", "mean0", "ls0", "coef0", "img_logits",
                               "img_means", "mean_m", "mean_c"])
def _dlm_bwd_kernel(
    grad_out_ptr,  # (K, P)
    x_ptr,  # (P, C, S)
    logits_ptr,  # params, as the forward's
    means_ptr,
    ls_ptr,
    dlogits_ptr,  # dparams: params' layout
    dmeans_ptr,  # dmeans (K, P, M, C, S), or dparams (packed)
    dls_ptr,  # dlog_scales, or dparams (packed)
    P, M, C, S, num_bins, tiles,
    mean0, ls0, coef0,
    img_logits, img_means, mean_m, mean_c,
    PACKED: tl.constexpr,
    ACC: tl.constexpr,
    TILE: tl.constexpr,
    BM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid // tiles
    s = (pid % tiles) * TILE + tl.arange(0, TILE)
    ok = s < S
    xrow, lrow, mrow, h, log_half_bins = _image(r, P, C, S, num_bins, img_logits, img_means, ACC)
    g = tl.load(grad_out_ptr + r).to(ACC)
    mx, se, zmx, zse = _normalizers(x_ptr, logits_ptr, means_ptr, ls_ptr, xrow, lrow, mrow, s, ok, M, C, S, mean_m,
                                    mean_c, mean0, ls0, coef0, h, log_half_bins, PACKED, ACC, TILE, BM)
    lse = (mx + tl.log(se))[None, :]
    zlse = (zmx + tl.log(zse))[None, :]
    for m0 in range(0, M, BM):
        mm = m0 + tl.arange(0, BM)
        mok = mm < M
        msk = mok[:, None] & ok[None, :]
        lg, lp = _component(x_ptr, logits_ptr, means_ptr, ls_ptr, xrow, lrow, mrow, s, ok, mm, mok, C, S,
                            mean_m, mean_c, mean0, ls0, coef0, h, log_half_bins, PACKED, ACC)
        gw = g * tl.exp(lp - lse)
        dlg = gw - g * tl.exp(lg - zlse)
        tl.store(dlogits_ptr + lrow + mm[:, None] * S + s[None, :], dlg.to(dlogits_ptr.dtype.element_ty), mask=msk)
        base = mrow + mm[:, None] * mean_m + s[None, :]
        _store_grads(x_ptr, means_ptr, ls_ptr, dmeans_ptr, dls_ptr, xrow, base, s, ok, msk, C, S, mean_c, mean0, ls0,
                     coef0, h, log_half_bins, gw, PACKED, ACC)


# -- launchers ----------------------------------------------------------------


def _geometry(x, params, means):
    """(P, M, C, S, pointers and strides of the layout, tile, launch options)."""
    P, C, S = x.shape
    packed = means is None
    rows = params.shape[2]
    M = rows // 10 if packed else rows
    if packed:
        layout = dict(mean0=M * S, ls0=2 * M * S, coef0=3 * M * S, img_logits=10 * M * S, img_means=10 * M * S,
                      mean_m=S, mean_c=3 * M * S)
    else:
        layout = dict(mean0=0, ls0=0, coef0=0, img_logits=M * S, img_means=M * C * S, mean_m=C * S, mean_c=S)
    fp64 = params.dtype == torch.float64
    if x.device.type == "cpu":
        tile = min(INTERPRETER_TILE, next_power_of_2(max(S, 1)))
    else:
        tile = FP64_TILE if fp64 else TILE
    options = dict(num_warps=NUM_WARPS)
    if x.device.type != "cpu":
        options["maxnreg"] = FP64_MAXNREG if fp64 else MAXNREG
    bm = next_power_of_2(max(M, 1)) if x.device.type == "cpu" else 1
    return P, M, C, S, packed, layout, tile, dict(options, BM=bm)


def launch_plans(x, params, means, num_bins: int) -> tuple[tuple, tuple]:
    """((grid, meta, runtime integers) of the forward kernel, the same of the
    backward kernel) for x (P, C, S) and params (K, P, rows, S) (means the
    unpacked layout's, or None): the shapes' part of the launches, worked out
    once per call signature by the op's plans (op.py's MixtureOfLogisticsPlan)
    and at every call by the launchers below."""
    K = params.shape[0]
    P, M, C, S, packed, layout, tile, options = _geometry(x, params, means)
    tiles = cdiv(S, tile)
    meta = dict(PACKED=packed, ACC=acc_dtype(params.dtype), TILE=tile, **options)
    offsets = (layout["mean0"], layout["ls0"], layout["coef0"], layout["img_logits"], layout["img_means"],
               layout["mean_m"], layout["mean_c"])
    return (((K * P,), meta, (P, M, C, S, num_bins, *offsets)),
            ((K * P * tiles,), meta, (P, M, C, S, num_bins, tiles, *offsets)))


def discretized_logistic_mixture_log_prob_forward(x, params, means, log_scales, num_bins, out) -> None:
    """out (K, P) <- log p(x) per image for x (P, C, S) and params (K, P, 10 M, S)
    (packed; means, log_scales None) or the logits (K, P, M, S) with means,
    log_scales (K, P, M, C, S)."""
    (grid, meta, ints), _ = launch_plans(x, params, means, num_bins)
    if grid[0] == 0:
        return
    packed = means is None
    _dlm_fwd_kernel[grid](x, params, params if packed else means, params if packed else log_scales, out, *ints,
                          **meta)


def discretized_logistic_mixture_log_prob_backward(grad_out, x, params, means, log_scales, num_bins, dparams, dmeans,
                                                   dlog_scales) -> None:
    """dparams (params' layout) and, unpacked, dmeans and dlog_scales <- the
    gradients of the forward's out given grad_out (K, P)."""
    _, (grid, meta, ints) = launch_plans(x, params, means, num_bins)
    if grid[0] == 0:
        return
    packed = means is None
    _dlm_bwd_kernel[grid](
        grad_out, x, params, params if packed else means, params if packed else log_scales, dparams,
        dparams if packed else dmeans, dparams if packed else dlog_scales, *ints, **meta)
