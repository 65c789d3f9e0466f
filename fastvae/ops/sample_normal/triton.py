"""Triton kernels of sample_normal: z = mu + exp(logvar / 2) * eps for K samples
with the analytic KL(q || N(0, I)) per row, and the backward that regenerates
eps from (seed, offset) instead of storing it.

Layout: mu, logvar (N, L) contiguous; z, grad_z (K, N, L); kl, grad_kl (N,);
log_ratio, grad_log_ratio (K, N). The offset of z[k, n, l] is k * N * L + n * L + l
(int64) in training.

One launch forward, one backward, no torch work around them.
Geometry: the samplers' (kernels/sampler.py, docs/internals/triton.md). The forward
tiles the K * N sample rows of z, so a large-K evaluation of one example is as
parallel as a training batch. The backward sums over K: mu is flat
(N * L elements, whose noise offsets are contiguous within a sample), each
program owns a block of consecutive elements and loops over every sample,
accumulating in registers, then adds the KL's terms and writes dmu and dlogvar
once (deterministic, no atomics, no partial sums). Where the blocks alone do
not fill a wave (small N * L against many samples) the samples are split: each
split stores its sums and the last program of a block to arrive adds them in
split order and finishes (_common.split_samples, arrive_last). The IWAE latent term's
gradient (grad_log_ratio) is folded in from the regenerated eps.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import acc_dtype, accumulation_dtype, arrive_last, cdiv, split_samples, tile_counters
from fastvae.kernels.philox import aligned, randn, randn4
from fastvae.kernels.sampler import (
    backward_geometry,
    forward_geometry,
    gradient_samples,
    noise_start,
    parameter_block,
    row_columns,
    sample_rows,
    store_split_parts,
    sum_split_parts,
)

# ptxas's own choice of registers for the backward spilled one across the
# sample loop (backward_plan)
BACKWARD_MAXNREG = 128

# -- kernels ------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "KN", "offset0", "sample_stride", "row_stride"])
def _sample_normal_fwd_kernel(
    mu_ptr,  # (N, L), rows in_stride elements apart
    logvar_ptr,  # (N, L), rows in_stride elements apart
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L) = (KN, L) sample rows
    kl_ptr,  # (N,)
    ratio_ptr,  # (KN,): log N(z; 0, I) - log q(z) per sample row, written when WITH_RATIO
    offset0,  # z[k, n, l] uses the noise at offset0 + k * sample_stride + n * row_stride + l
    sample_stride,
    row_stride,
    N,
    KN,  # K * N
    L,
    in_stride,  # mu's and logvar's row stride: L, or 2 L for an encoder's halves (h.chunk(2, -1))
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WITH_RATIO: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row's noise starts a Philox counter: four normals per call
):
    # sample rows k * N + n; with ALIGNED each thread holds whole Philox counters (philox.randn4)
    r, g, j = sample_rows(BLOCK_R, BLOCK_L)
    n = r % N
    seed = tl.load(seed_ptr)
    kl = tl.zeros([BLOCK_R], dtype=ACC)
    ratio = tl.zeros([BLOCK_R], dtype=ACC)
    rr = r[:, None, None]
    for l0 in range(0, L, BLOCK_L):
        cols, mask, idx = row_columns(r, n, g, j, l0, KN, L, in_stride)
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(ACC)
        lv = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(ACC)
        s = tl.exp(0.5 * lv)
        kl += tl.sum(tl.sum(tl.where(mask, s * s + mu * mu - 1.0 - lv, 0.0), axis=2), axis=1)
        first = noise_start(offset0, sample_stride, row_stride, r, n, N, l0)
        if ALIGNED:
            eps = randn4(seed, (first >> 2) + g, ACC)
        else:
            eps = randn(seed, first + 4 * g + j, ACC)
        z = mu + s * eps
        tl.store(z_ptr + rr * L + cols, z.to(z_ptr.dtype.element_ty), mask=mask)
        if WITH_RATIO:  # from the eps just drawn, never divided back out of z
            ratio += tl.sum(tl.sum(tl.where(mask, eps * eps + lv - z * z, 0.0), axis=2), axis=1)
    # the first sample's rows carry the KL of their row
    tl.store(kl_ptr + r, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=r < N)
    if WITH_RATIO:
        tl.store(ratio_ptr + r, (0.5 * ratio).to(ratio_ptr.dtype.element_ty), mask=r < KN)


@triton.jit
def _finish(acc_mu, acc_lv, acc_g, acc_score, i, mask, n, mu, lv, grad_kl_ptr, dmu_ptr, dlv_ptr,
            HAS_GRAD_KL: tl.constexpr, HAS_GRAD_RATIO: tl.constexpr, STOP_SCORE: tl.constexpr, ACC: tl.constexpr):
    """dmu, dlogvar of a block from its sums over every sample, plus the KL's terms."""
    dmu = acc_mu
    dlv = 0.5 * acc_lv * tl.exp(0.5 * lv)  # s again: not kept live across the sample loop
    if HAS_GRAD_RATIO:
        # the score term eps / s as (sum_k gr eps) / s in dmu and sum_k gr eps^2 / 2
        # in dlogvar, its exact product with eps s / 2: never (z - mu) exp(-logvar)
        # (0 * inf for a collapsed posterior) nor (eps / s) * s (inf * 0 once 1 / s
        # overflows); a zero sum stays 0
        if STOP_SCORE:
            dmu += tl.where(acc_score == 0, 0.0, acc_score * tl.exp(-0.5 * lv))
        dlv += 0.5 * acc_g
    if HAS_GRAD_KL:
        gk = tl.load(grad_kl_ptr + n, mask=mask, other=0.0).to(ACC)
        dmu += gk * mu
        dlv += 0.5 * gk * (tl.exp(lv) - 1.0)
    tl.store(dmu_ptr + i, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + i, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "NL", "K", "K_PER", "SPLITS"])
def _sample_normal_bwd_kernel(
    grad_z_ptr,  # (K, N, L), read when HAS_GRAD_Z
    grad_kl_ptr,  # (N,), read when HAS_GRAD_KL
    grad_ratio_ptr,  # (K, N), read when HAS_GRAD_RATIO
    mu_ptr,  # (N, L), rows in_stride elements apart
    logvar_ptr,  # (N, L), rows in_stride elements apart
    seed_ptr,  # (): int64
    dmu_ptr,  # (N, L)
    dlv_ptr,  # (N, L)
    part_ptr,  # (2 to 4, SPLITS, N * L) ACC: each split's sums (SPLITS > 1)
    counter_ptr,  # (blocks,) int32 arrival counters, 0 between launches (SPLITS > 1)
    z_scale_ptr,  # (K, N): a weight of each sample's grad_z row (DReG's), when Z_SCALE
    N,
    L,
    NL,  # N * L: the flat elements of mu, and the noise offset of one sample
    in_stride,  # mu's and logvar's row stride (the forward's)
    K,  # samples to sum over (0 when neither grad_z nor grad_log_ratio is given)
    K_PER,  # samples per split
    SPLITS,
    Z_SCALE: tl.constexpr,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    HAS_GRAD_RATIO: tl.constexpr,
    STOP_SCORE: tl.constexpr,  # the log-ratio's path term eps / s - z, and no direct logvar term
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,  # elements of mu per program, a multiple of 4
    ALIGNED: tl.constexpr,  # L (so NL) divisible by 4: each sample's block starts a Philox counter
):
    # element i = start + 4 g4 + j (int64 flat index n * L + l), whole Philox counters per thread
    tile, split, k0, k1, start, g4, i, mask, n = parameter_block(NL, L, K, K_PER, BLOCK)
    seed = tl.load(seed_ptr)
    src = i + n * (in_stride - L)  # mu's and logvar's element n, l
    lv = tl.load(logvar_ptr + src, mask=mask, other=0.0).to(ACC)
    s = tl.exp(0.5 * lv)
    acc_mu = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dz
    acc_lv = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k dz * eps
    # sum_k grad_log_ratio (its direct logvar term), or with STOP_SCORE sum_k grad_log_ratio eps^2
    acc_g = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    acc_score = tl.zeros([BLOCK // 4, 4], dtype=ACC)  # sum_k grad_log_ratio eps (STOP_SCORE)
    mu = tl.zeros([BLOCK // 4, 4], dtype=ACC)
    if HAS_GRAD_RATIO or HAS_GRAD_KL:
        mu = tl.load(mu_ptr + src, mask=mask, other=0.0).to(ACC)
    for k in range(k0, k1):
        base = k * NL
        if ALIGNED:
            eps = randn4(seed, ((base + start) >> 2) + g4, ACC)
        else:
            eps = randn(seed, base + i, ACC)
        if HAS_GRAD_Z:
            dz = tl.load(grad_z_ptr + base + i, mask=mask, other=0.0)
            if Z_SCALE:  # rounded as grad_z * z_scale[..., None] in grad_z's dtype gives it
                w = tl.load(z_scale_ptr + k * N + n, mask=mask, other=0.0)
                dz = (dz.to(ACC) * w.to(ACC)).to(grad_z_ptr.dtype.element_ty)
            dz = dz.to(ACC)
        else:
            dz = tl.zeros([BLOCK // 4, 4], dtype=ACC)
        if HAS_GRAD_RATIO:
            gr = tl.load(grad_ratio_ptr + k * N + n, mask=mask, other=0.0).to(ACC)
            dz -= gr * (mu + s * eps)
            if STOP_SCORE:
                acc_score += gr * eps
                acc_g += gr * eps * eps
            else:
                acc_g += gr
        acc_mu += dz
        acc_lv += dz * eps
    if SPLITS == 1:
        _finish(acc_mu, acc_lv, acc_g, acc_score, i, mask, n, mu, lv, grad_kl_ptr, dmu_ptr, dlv_ptr,
                HAS_GRAD_KL, HAS_GRAD_RATIO, STOP_SCORE, ACC)
    else:
        # each split's sums; the last program of the block to arrive adds them in split order
        store_split_parts(part_ptr, split, SPLITS, NL, i, mask, acc_mu, acc_lv, acc_g, acc_score, HAS_GRAD_RATIO,
                          HAS_GRAD_RATIO and STOP_SCORE)
        if arrive_last(counter_ptr + tile, SPLITS):
            sum_mu, sum_lv, sum_g, sum_score = sum_split_parts(part_ptr, SPLITS, NL, i, mask, HAS_GRAD_RATIO,
                                                               HAS_GRAD_RATIO and STOP_SCORE, ACC, BLOCK)
            _finish(sum_mu, sum_lv, sum_g, sum_score, i, mask, n, mu, lv, grad_kl_ptr, dmu_ptr, dlv_ptr,
                    HAS_GRAD_KL, HAS_GRAD_RATIO, STOP_SCORE, ACC)


# -- launchers ----------------------------------------------------------------


def forward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device, with_ratio: bool,
                 offset0: int, sample_stride: int, row_stride: int) -> tuple[tuple[int], dict]:
    """(grid, meta) of the forward kernel for z (K, N, L) from mu, logvar (N, L)
    of ``dtype`` (K >= 1, N * L > 0): what depends on the shapes alone, worked
    out once per call signature by the objectives' plans (fastvae/_plan.py)
    and on every call by sample_normal_forward."""
    BLOCK_R, BLOCK_L, warps = forward_geometry(L, device, dtype == torch.float64)
    return (cdiv(K * N, BLOCK_R),), dict(
        ACC=acc_dtype(dtype), BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, WITH_RATIO=with_ratio,
        ALIGNED=aligned(offset0, sample_stride, row_stride), num_warps=warps)


def sample_normal_forward(mu, logvar, seed, offset0, sample_stride, row_stride, z, kl, log_ratio) -> None:
    """z (K, N, L), kl (N,) <- sample_normal of mu, logvar (N, L); seed: () int64 tensor;
    z[k, n, l] uses the noise at offset0 + k * sample_stride + n * row_stride + l;
    log_ratio (K, N), when not None, <- 0.5 * sum_l(eps^2 + logvar - z^2)."""
    K, N, L = z.shape
    if N * L == 0:
        kl.zero_()
        if log_ratio is not None:  # an empty latent: log p(z) - log q(z) = 0
            log_ratio.zero_()
        return
    if K == 0:  # the KL still has to be written
        z = torch.empty((1, N, L), dtype=z.dtype, device=z.device)
    KN = z.shape[0] * N
    with_ratio = log_ratio is not None and log_ratio.numel() > 0
    grid, meta = forward_plan(z.shape[0], N, L, mu.dtype, mu.device, with_ratio, offset0, sample_stride, row_stride)
    _sample_normal_fwd_kernel[grid](
        mu, logvar, seed, z, kl, log_ratio if with_ratio else kl, offset0, sample_stride, row_stride, N, KN, L, L,
        **meta)


def backward_plan(K: int, N: int, L: int, dtype: torch.dtype, device: torch.device, has_grad_z: bool,
                  has_grad_kl: bool, has_grad_ratio: bool, stop_score: bool, z_scale: bool = False
                  ) -> tuple[tuple[int], dict, int, int, int]:
    """(grid, meta, blocks, splits, samples per split) of the backward kernel
    (N * L > 0), from the shapes and which gradients are given alone;
    ``z_scale``: grad_z's rows weighted (DReG)."""
    BLOCK, warps = backward_geometry(device, dtype == torch.float64)
    blocks = cdiv(N * L, BLOCK)
    splits, per_split = split_samples(blocks, K, device)
    return (blocks * splits,), dict(
        Z_SCALE=z_scale, HAS_GRAD_Z=has_grad_z, HAS_GRAD_KL=has_grad_kl, HAS_GRAD_RATIO=has_grad_ratio,
        STOP_SCORE=bool(stop_score),
        # aligned on L, not N * L: a variant must not depend on the batch size
        ACC=acc_dtype(dtype), BLOCK=BLOCK, ALIGNED=aligned(L), num_warps=warps,
        # ptxas's own choice spilled a register across the sample loop (80 registers
        # on sm_80; 128 on sm_90 with the score sums); a cap of 128 fits every variant
        maxnreg=BACKWARD_MAXNREG,
    ), blocks, splits, per_split


def split_buffers(N: int, L: int, dtype: torch.dtype, device: torch.device, blocks: int, splits: int,
                  has_grad_ratio: bool, stop_score: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(part, counters) of the backward: each split's sums and the arrival
    counters where the samples are split, placeholders otherwise."""
    sums = 2 if not has_grad_ratio else 4 if stop_score else 3  # mu, logvar (+ ratio, + score)
    part = torch.empty((sums, splits, N * L) if splits > 1 else (1,), dtype=accumulation_dtype(dtype), device=device)
    return part, tile_counters(device, blocks, splits)


def sample_normal_backward(grad_z, grad_kl, grad_log_ratio, mu, logvar, seed, stop_score, dmu, dlogvar,
                           z_scale=None) -> None:
    """dmu, dlogvar (N, L) <- gradients of sample_normal (and of its log-ratio
    output) given grad_z (K, N, L), grad_kl (N,), grad_log_ratio (K, N), each
    None when that output has no gradient:
    dz_k = grad_z_k + grad_log_ratio_k * (-z_k, or eps_k / s - z_k with stop_score),
    dmu = sum_k dz_k + grad_kl mu,
    dlogvar = sum_k dz_k eps_k s / 2 + grad_kl (s^2 - 1) / 2 (+ sum_k grad_log_ratio_k / 2
    without stop_score), with s = exp(logvar / 2) and eps regenerated. With
    ``z_scale`` (K, N) each grad_z row is first weighted by it (the objectives'
    DReG, fastvae/_plan.py; rounded as grad_z * z_scale[..., None] would be)."""
    N, L = mu.shape
    if N * L == 0:
        return
    K = gradient_samples(grad_z, grad_log_ratio)
    grid, meta, blocks, splits, per_split = backward_plan(
        K, N, L, mu.dtype, mu.device, grad_z is not None, grad_kl is not None, grad_log_ratio is not None, stop_score,
        z_scale is not None)
    part, counters = split_buffers(N, L, mu.dtype, mu.device, blocks, splits, grad_log_ratio is not None, stop_score)
    _sample_normal_bwd_kernel[grid](
        grad_z if grad_z is not None else mu, grad_kl if grad_kl is not None else mu,
        grad_log_ratio if grad_log_ratio is not None else mu, mu, logvar, seed, dmu, dlogvar, part,
        counters, mu if z_scale is None else z_scale, N, L, N * L, L, K, per_split, splits, **meta)
