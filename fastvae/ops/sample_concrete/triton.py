"""Triton kernels of sample_concrete: relaxed one-hot (Concrete /
Gumbel-softmax) samples of logits (N, L, C) at a temperature per latent, from
C consecutive Philox uniforms per latent (the samplers' words, kernels/sampler.py),
and log q(z) summed over L from the same Exp(1) noise t = -log u; the backward
regenerates t from (seed, offset) instead of storing it.
The oracle's concrete_terms (__init__.py) gives the closed forms; -inf logits mask their
category (z_c = 0, left out of the density).

One latent's C categories are one row of a 2-D tile, BLOCK_C the next power
of two of C (C up to MAX_C). A forward program owns BLOCK_R sample rows (k, n)
and takes BLOCK_L of their latents at once: its tile is (BLOCK_R x BLOCK_L,
BLOCK_C), the latents of a row consecutive, and each row's log q and KL are
the tile's per-latent terms summed over the latent axis (a reshape to
(BLOCK_R, BLOCK_L) and a sum: deterministic, no atomics), one chunk of
BLOCK_L latents after another where L is longer than the tile holds. The tile
is TILE elements (512 on a GPU: 4 a thread at 4 warps, beside Philox's state)
filled latents first, then rows: a sampler's row of L <= 512 / BLOCK_C
latents is one program, so the K N rows all run at once, no SM walking many
rows' latents one after another while the others wait (a Gumbel-softmax
VAE's (100, 30, 10) launches 100 programs, (4096, 32, 16) 4096); a row of
fewer elements shares
a program with others, and a latent of more than TILE categories is a tile of
one latent (the program loops over the row's latents). The block shapes follow
L and C only, never K or N (no new variant per batch size). The backward's
programs take BLOCK_J = TILE / BLOCK_C latents and loop over the K samples.
With a prior log-pmf (WITH_KL) the forward also sums the analytic categorical
KL of each row over its latents (stored by the rows of sample 0 only: it has no
noise), and the backward adds its gradient to each latent's. Under the
interpreter (CPU tensors, about 1 ms a program) the tile is INTERPRETER_TILE
elements, so that few programs run.
"""
import torch
import triton
import triton.language as tl

from fastvae.kernels._common import acc_dtype, program_rows
from fastvae.kernels.sampler import exp1, gradient_samples, words

MAX_C = 1 << 14
# Elements of a program's tile on a GPU (forward and backward): 4 a thread at 4
# warps, Philox's state and the noise's logs and exps holding the rest of the
# registers; a latent of more categories is a tile alone, at 8 warps.
TILE = 512
INTERPRETER_TILE = 1 << 14
# Left to itself ptxas gave the backward's grad_z + grad_kl variant 64 registers
# and a spill (float16, sm_90; float64: 128 and 24 bytes): a cap above what
# every variant of a TILE-element tile uses keeps them all in registers.
BACKWARD_MAXNREG = 128
FP64_BACKWARD_MAXNREG = 168


@triton.jit
def _latents(x, a, lam, cols, C, ACC: tl.constexpr):
    """(z, log q, w, count) of a (rows, BLOCK_C) tile of latents: folded words
    x, logits a (-inf: masked or padding), temperatures lam (rows,)."""
    valid = (a > float("-inf")) & (cols < C)
    t = exp1(x, ACC)
    t = tl.where(valid, t, 1.0)
    lt = tl.log(t)
    # shifted by the latent's largest logit (only differences matter): y stays
    # finite for logits of any size at any temperature
    top = tl.max(tl.where(valid, a, float("-inf")), axis=1)
    top = tl.where(top > float("-inf"), top, 0.0)
    y = tl.where(valid, ((a - top[:, None]) - lt) / lam[:, None], float("-inf"))
    m = tl.max(y, axis=1)
    e = tl.where(valid, tl.exp(y - m[:, None]), 0.0)
    ls = tl.log(tl.sum(e, axis=1))
    lz = tl.where(valid, y - m[:, None] - ls[:, None], 0.0)
    z = tl.where(valid, tl.exp(lz), 0.0)
    count = tl.sum(valid.to(ACC), axis=1)
    tv = tl.where(valid, t, 0.0)
    sum_t = tl.sum(tv, axis=1)
    colf = cols.to(ACC)
    lgam = tl.sum(tl.where((colf >= 1.0) & (colf < count[:, None]), tl.log(tl.maximum(colf, 1.0)), 0.0), axis=1)
    log_q = (lgam + (count - 1.0) * tl.log(lam) - tl.sum(lz, axis=1) + tl.sum(tl.where(valid, lt, 0.0), axis=1)
             - count * tl.log(sum_t))
    w = tv / sum_t[:, None]
    return z, log_q, w, count, y, m, valid


@triton.jit
def _categorical_kl(a, lp, valid):
    """(KL per row, pi, log pi, live) of a (rows, BLOCK_C) tile of logits a and
    prior log-pmf lp: sum_c pi_c (log pi_c - log p_c) over the categories with
    pi_c > 0 (masked ones, and underflowed ones, add 0 as in torch's
    where(pi > 0, ...), even where log p_c = -inf)."""
    top = tl.max(tl.where(valid, a, float("-inf")), axis=1)
    top = tl.where(top > float("-inf"), top, 0.0)
    s = tl.where(valid, tl.exp(a - top[:, None]), 0.0)
    ls = tl.log(tl.sum(s, axis=1))
    lpi = tl.where(valid, (a - top[:, None]) - ls[:, None], 0.0)
    pi = tl.where(valid, tl.exp(lpi), 0.0)
    live = pi > 0.0
    diff = lpi - tl.where(live, lp, 0.0)
    kl = tl.sum(tl.where(live, pi * diff, 0.0), axis=1)
    return kl, pi, diff, live


@triton.jit(do_not_specialize=["N", "KN", "L", "C", "offset0", "sample_stride", "row_stride", "lp_stride"])
def _sample_concrete_fwd_kernel(
    a_ptr,  # (N, L, C)
    lam_ptr,  # (N, L)
    seed_ptr,  # (): int64
    z_ptr,  # (K, N, L, C)
    log_q_ptr,  # (K, N): written when WITH_LOG_Q
    log_p_ptr,  # (L, C), rows lp_stride apart (0: one (C,) prior for every latent): read when WITH_KL
    kl_ptr,  # (N,): written when WITH_KL
    offset0,
    sample_stride,
    row_stride,
    N,
    KN,
    L,
    C,
    lp_stride,
    HARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WITH_LOG_Q: tl.constexpr,
    WITH_KL: tl.constexpr,
):
    # tile row i is latent i % BLOCK_L of the program's row i // BLOCK_L
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    i = tl.arange(0, BLOCK_R * BLOCK_L)
    r = pid * BLOCK_R + (i // BLOCK_L).to(tl.int64)
    lat = i % BLOCK_L
    rmask = r < KN
    n = r % N
    k = r // N
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_C)
    first_offset = offset0 + k * sample_stride + n * row_stride
    log_q = tl.zeros([BLOCK_R], dtype=ACC)
    kl = tl.zeros([BLOCK_R], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        li = l0 + lat
        live = rmask & (li < L)
        cmask = live[:, None] & (cols[None, :] < C)
        j = n * L + li
        a = tl.load(a_ptr + j[:, None] * C + cols[None, :], mask=cmask, other=float("-inf")).to(ACC)
        a = tl.where(live[:, None], a, tl.where(cols[None, :] == 0, 0.0, float("-inf")))  # dead rows: finite
        lam = tl.load(lam_ptr + j, mask=live, other=1.0).to(ACC)
        x = words(seed, (first_offset + li * C)[:, None] + cols[None, :])
        z, lq, w, count, y, m, valid = _latents(x, a, lam, cols[None, :], C, ACC)
        if HARD:
            first = tl.min(tl.where(valid & (y == m[:, None]), cols[None, :], BLOCK_C), axis=1)
            z = tl.where(cols[None, :] == first[:, None], 1.0, 0.0)
        tl.store(z_ptr + (r * L + li)[:, None] * C + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=cmask)
        log_q += tl.sum(tl.reshape(tl.where(live, lq, 0.0), (BLOCK_R, BLOCK_L)), axis=1)
        if WITH_KL:
            lp = tl.load(log_p_ptr + li[:, None] * lp_stride + cols[None, :],
                         mask=(li < L)[:, None] & (cols[None, :] < C), other=0.0).to(ACC)
            kl_l = _categorical_kl(a, lp, valid)[0]
            kl += tl.sum(tl.reshape(tl.where(live, kl_l, 0.0), (BLOCK_R, BLOCK_L)), axis=1)
    if WITH_LOG_Q:
        tl.store(log_q_ptr + rows, log_q.to(log_q_ptr.dtype.element_ty), mask=rows < KN)
    if WITH_KL:  # the rows of sample 0: r < N
        tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=rows < N)


@triton.jit(do_not_specialize=["N", "L", "NL", "C", "K", "lp_stride"])
def _sample_concrete_bwd_kernel(
    grad_z_ptr,  # (K, N, L, C), read when HAS_GRAD_Z
    grad_q_ptr,  # (K, N), read when HAS_GRAD_Q
    a_ptr,  # (N, L, C)
    lam_ptr,  # (N, L)
    seed_ptr,  # (): int64
    d_ptr,  # (N, L, C)
    grad_kl_ptr,  # (N,), read when HAS_GRAD_KL
    log_p_ptr,  # (L, C), rows lp_stride apart: read when HAS_GRAD_KL
    N,
    L,
    NL,
    C,
    K,
    lp_stride,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_Q: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    STOP_SCORE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    j, jmask = program_rows(BLOCK_J, NL)
    n = j // L
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_C)
    cmask = jmask[:, None] & (cols[None, :] < C)
    idx = j[:, None] * C + cols[None, :]
    a = tl.load(a_ptr + idx, mask=cmask, other=float("-inf")).to(ACC)
    a = tl.where(jmask[:, None], a, tl.where(cols[None, :] == 0, 0.0, float("-inf")))  # dead rows: finite
    lam = tl.load(lam_ptr + j, mask=jmask, other=1.0).to(ACC)
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=ACC)
    NLC = NL * C
    for k in range(0, K):
        x = words(seed, k * NLC + idx)
        z, lq, w, count, y, m, valid = _latents(x, a, lam, cols[None, :], C, ACC)
        if HAS_GRAD_Z:
            g = tl.load(grad_z_ptr + k * NLC + idx, mask=cmask, other=0.0).to(ACC)
            zg = tl.sum(z * g, axis=1)
            acc += z * (g - zg[:, None])
        if HAS_GRAD_Q:
            gq = tl.load(grad_q_ptr + k * N + n, mask=jmask, other=0.0).to(ACC)
            if STOP_SCORE:
                h = count[:, None] * z + (count * lam)[:, None] * w - (lam + 1.0)[:, None]
            else:
                h = count[:, None] * z - 1.0
            acc += gq[:, None] * h
    ok = a > float("-inf")
    d = tl.where(ok, acc / lam[:, None], 0.0)
    if HAS_GRAD_KL:  # d KL_l / d a_c = pi_c ((log pi_c - log p_c) - KL_l), after the noise terms' 1 / lam
        lp = tl.load(log_p_ptr + (j % L)[:, None] * lp_stride + cols[None, :], mask=cmask, other=0.0).to(ACC)
        kl, pi, diff, live = _categorical_kl(a, lp, ok & (cols[None, :] < C))
        gk = tl.load(grad_kl_ptr + n, mask=jmask, other=0.0).to(ACC)
        d += tl.where(live, gk[:, None] * pi * (diff - kl[:, None]), 0.0)
    tl.store(d_ptr + idx, d.to(d_ptr.dtype.element_ty), mask=cmask)


def _check_categories(C: int) -> int:
    """BLOCK_C, the next power of two of C (at least 2)."""
    if C > MAX_C:
        raise ValueError(f"sample_concrete's Triton kernels take at most {MAX_C} categories, got C = {C}")
    return triton.next_power_of_2(max(C, 2))


def _tile(device_type: str) -> int:
    return INTERPRETER_TILE if device_type == "cpu" else TILE


def _warps(elements: int, device_type: str) -> int:
    return 4 if device_type == "cpu" or elements <= TILE else 8


def forward_geometry(K: int, N: int, L: int, C: int, device_type: str = "cuda") -> tuple[int, dict]:
    """(programs, meta) of the forward at K samples of N rows of L latents of
    C categories on a device of this type ("cpu": the interpreter): meta's
    BLOCK_R, BLOCK_L, BLOCK_C and num_warps follow L and C alone. The tile
    takes as many of a row's latents as it holds (at least one), then as many
    rows; the programs are cdiv(K N, BLOCK_R)."""
    block_c = _check_categories(C)
    tile = _tile(device_type)
    block_l = min(triton.next_power_of_2(max(L, 1)), max(1, tile // block_c))
    block_r = max(1, tile // (block_l * block_c))
    meta = dict(BLOCK_R=block_r, BLOCK_L=block_l, BLOCK_C=block_c,
                num_warps=_warps(block_r * block_l * block_c, device_type))
    return triton.cdiv(K * N, block_r), meta


def backward_geometry(N: int, L: int, C: int, device_type: str = "cuda", fp64: bool = False) -> tuple[int, dict]:
    """(programs, meta) of the backward: BLOCK_J = the tile's latents of C
    categories (at least one), each program looping over the samples. A GPU
    tile of TILE elements is compiled with at most BACKWARD_MAXNREG registers
    (FP64_BACKWARD_MAXNREG for float64)."""
    block_c = _check_categories(C)
    block_j = max(1, _tile(device_type) // block_c)
    meta = dict(BLOCK_J=block_j, BLOCK_C=block_c, num_warps=_warps(block_j * block_c, device_type))
    if device_type != "cpu" and block_j * block_c <= TILE:
        meta["maxnreg"] = FP64_BACKWARD_MAXNREG if fp64 else BACKWARD_MAXNREG
    return triton.cdiv(N * L, block_j), meta


def forward_launch(K: int, N: int, L: int, C: int, dtype: torch.dtype, device_type: str, hard: bool,
                   with_log_q: bool, with_kl: bool) -> tuple[tuple, dict]:
    """(grid, meta) of one forward variant: forward_geometry's programs and
    blocks with the compile-time flags. sample_concrete_forward launches
    with these and op.py's plans keep them, so the two launch the same variant."""
    programs, meta = forward_geometry(K, N, L, C, device_type)
    return (programs,), dict(HARD=bool(hard), ACC=acc_dtype(dtype), WITH_LOG_Q=with_log_q, WITH_KL=with_kl, **meta)


def backward_launch(N: int, L: int, C: int, dtype: torch.dtype, device_type: str, has_grad_z: bool,
                    has_grad_q: bool, has_grad_kl: bool, stop_score: bool) -> tuple[tuple, dict]:
    """(grid, meta) of one backward variant (backward_geometry's with the
    compile-time flags), shared by sample_concrete_backward and op.py's plans."""
    programs, meta = backward_geometry(N, L, C, device_type, dtype == torch.float64)
    return (programs,), dict(HAS_GRAD_Z=has_grad_z, HAS_GRAD_Q=has_grad_q, HAS_GRAD_KL=has_grad_kl,
                             STOP_SCORE=bool(stop_score), ACC=acc_dtype(dtype), **meta)


def _rows_of(log_p):
    """log_p (L, C) with unit column stride, its rows at any stride: a (C,)
    prior expanded over L (row stride 0) is read in place, with no copy launched."""
    return log_p if log_p.stride(1) == 1 else log_p.contiguous()


def sample_concrete_forward(logits, temperature, seed, hard, offset0, sample_stride, row_stride, z, log_q, log_p,
                            kl) -> None:
    """z (K, N, L, C) <- softmax((logits - log t) / temperature) (one-hot of its
    argmax when hard), t the Exp(1) variate at offset0 + k * sample_stride +
    n * row_stride + l * C + c; log_q (K, N), when not None, <- the Concrete
    log-density summed over L from the same t; kl (N,), with the prior
    log-pmf log_p (L, C), <- the analytic categorical KL summed over L."""
    K, N, L, C = z.shape
    if K * N == 0:
        return
    if L * C == 0:
        if log_q is not None:
            log_q.zero_()
        if kl is not None:
            kl.zero_()
        return
    with_log_q, with_kl = log_q is not None, kl is not None
    grid, meta = forward_launch(K, N, L, C, logits.dtype, logits.device.type, hard, with_log_q, with_kl)
    log_p = _rows_of(log_p) if with_kl else logits
    _sample_concrete_fwd_kernel.run(
        logits, temperature, seed, z, log_q if with_log_q else z, log_p, kl if with_kl else z,
        offset0, sample_stride, row_stride, N, K * N, L, C, log_p.stride(0) if with_kl else 0,
        grid=grid, warmup=False, **meta,
    )


def sample_concrete_backward(grad_z, grad_log_q, logits, temperature, seed, stop_score, dlogits, grad_kl,
                             log_p) -> None:
    """dlogits (N, L, C) <- sum_k (z (grad_z - <z, grad_z>) + grad_log_q h) /
    temperature with t regenerated, plus grad_kl's analytic-KL term with the
    prior log-pmf log_p (L, C) (the oracle's sample_concrete_backward)."""
    N, L, C = logits.shape
    if N * L * C == 0:
        return
    K = gradient_samples(grad_z, grad_log_q)
    grid, meta = backward_launch(N, L, C, logits.dtype, logits.device.type, grad_z is not None,
                                 grad_log_q is not None, grad_kl is not None, stop_score)
    log_p = _rows_of(log_p) if grad_kl is not None else logits
    _sample_concrete_bwd_kernel.run(
        grad_z if grad_z is not None else logits, grad_log_q if grad_log_q is not None else logits, logits,
        temperature, seed, dlogits, grad_kl if grad_kl is not None else logits,
        log_p, N, L, N * L, C, K, log_p.stride(0) if grad_kl is not None else 0, grid=grid, warmup=False, **meta,
    )
