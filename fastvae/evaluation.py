"""Large-K evaluation of a VAE: the importance-sampled log-likelihood
(Burda et al. 2015), its dataset mean, and the reconstruction probability
(the anomaly score of An & Cho 2015).

For each example x with encoder output q(z|x) = N(mu, diag(exp(logvar))):

    log p̂(x) = log (1/K) Σ_k w_k,  w_k = p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x)

K is streamed in chunks: a chunk's K_c samples of n examples are decoded in
one batched call, z (K_c, n, L) -> decode -> (K_c, n, D), and its log-weights
are folded into the running (max, sumexp) states of fastvae.logmeanexp_state
(one for w and one for w², which gives the standard error and the ESS) by one
kernel call per chunk (accumulate_states of ops/logmeanexp/op.py: the merge
runs on the device, no per-chunk torch ops), so memory is bounded by one
chunk whatever K is. The noise of sample k of the example with global index
g sits at Philox offset g·K·L + k·L + l, drawn by the sampling kernel at
those offsets (sample_at of ops/sample_normal/op.py), so the result does not
depend on the chunk size, on how
a dataset is cut into batches, or on how many processes share the work: only
on the seed. When torch.distributed is initialized, every rank passes the same
data and the examples (or the samples) are split over the ranks; the merged
result equals the single-process one. See docs/evaluation.md.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import _pareto, _validate
from ._backend import compute_dtype
from ._decoder import (
    EVALUATION_DOCS,
    LOG_WEIGHT_DOCS,
    as_posterior,
    call_user,
    check_likelihood,
    decoder_log_prob,
)
from ._dtypes import accumulation_dtype
from ._noise import evaluation_noise
from ._op import draw_seed
from ._sampler import MAX_OFFSET, z_dtype
from .distributions import DiagonalNormal, TrilNormal, widened
from .latents import LATENTS
from .ops.logmeanexp.op import (
    LogMeanExpState,
    accumulate_states,
    all_reduce_logmeanexp_state,
    logmeanexp_from_state,
)
from .ops.sample_normal.op import sample_at
from .priors import StandardNormal, check_prior, log_ratio_to_standard

# Bytes one chunk may use when chunk_size=None and memory_budget=None on the
# CPU; see _chunk_plan. 256 MiB keeps the K = 5000, B = 256, D = 784
# evaluation at ~30 chunks of ~160 samples, big enough that the decoder's
# matrix products run at full speed on a CPU.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# On CUDA the default budget is this fraction of the device's free memory
# (torch.cuda.mem_get_info) at the call: a GPU runs the decoder faster on
# larger chunks, and every chunk costs launches (measured on an H100, MLP VAE,
# K = 5000, B = 256: 256 MiB chunks 51-54 ms, chunks of 500 samples 29.6 ms).
# The rest of the free memory is headroom for what the budget does not count
# (a decoder's hidden layers wider than D).
CUDA_FREE_MEMORY_FRACTION = 0.25

SHARDS = ("examples", "samples", None)


class LogLikelihoodStats(NamedTuple):
    """Per-example results of ``return_stats=True``, each of shape (B,).

    log_likelihood: the estimate log p̂(x) (or the reconstruction probability).
    stderr: delta-method standard error of that log estimate from the spread of
        the K importance weights, sqrt(s²_w / K) / mean(w) with s²_w the
        unbiased sample variance: ≈ sqrt(1/ESS − 1/K). NaN for K = 1 (one
        sample says nothing about its spread). It is itself estimated from
        the weights, and understates the error when they are heavy-tailed:
        see pareto_k and docs/evaluation.md.
    ess: effective sample size (Σw)² / Σw², in [1, K]; 0 when every weight is 0.
    pareto_k: the Pareto k̂ of the weights' tail (Vehtari et al. 2024,
        fastvae._pareto): below 0.5 the stderr is meaningful, 0.5-0.7 the
        estimate converges slowly and the stderr understates its error,
        above 0.7 the estimate is unreliable (a warning says so). float64;
        NaN for K <= 20 (a tail of fewer than 5) or where every weight is 0.
    unreliable: bool, pareto_k > 0.7: the examples whose stderr understates
        the error of log p̂(x) (all False where k̂ was not fitted:
        reconstruction_probability without return_stats).
    k_used: int64, the samples each example drew: K, or fewer under
        target_stderr for the examples that reached the target.
    """
    log_likelihood: Tensor
    stderr: Tensor
    ess: Tensor
    pareto_k: Tensor
    unreliable: Tensor
    k_used: Tensor

    def __repr__(self) -> str:  # a summary, not the B per-example values
        n = self.log_likelihood.numel()
        if n == 0:
            return "LogLikelihoodStats(0 examples)"
        ll, se = self.log_likelihood.double(), self.stderr.double()
        k = self.pareto_k[~torch.isnan(self.pareto_k)]
        k_text = (f"max {k.max().item():.2f}, {int(self.unreliable.sum())} above {_pareto.HIGH_K}"
                  if k.numel() else "nan")
        return (f"LogLikelihoodStats({n} examples, each field a tensor of shape {tuple(self.log_likelihood.shape)}: "
                f"log_likelihood mean {ll.mean().item():.4f} (min {ll.min().item():.4f}, max "
                f"{ll.max().item():.4f}), stderr mean {se.mean().item():.4f}, ess mean "
                f"{self.ess.double().mean().item():.1f}, pareto_k {k_text}, k_used "
                f"{int(self.k_used.min())}-{int(self.k_used.max())})")


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` returns (floats in nats unless said otherwise).

    log_likelihood: mean of log p̂(x) over the dataset.
    stderr: its standard error across examples, std / sqrt(N) (NaN for N = 1).
    nll: −log_likelihood.
    bits_per_dim: nll / (D · ln 2), with no dequantization offset.
    mc_stderr: the part of the uncertainty due to the finite K alone,
        sqrt(Σ stderr_b²) / N from the per-example standard errors.
    n_examples, dim, k: N, D and the K used.
    per_example: the (N,) estimates log p̂(x_b), in data order.
    ess_fraction: mean over the examples of ESS / K. Below LOW_ESS_FRACTION
        a few weights dominate: the estimates are fragile and the delta-method
        mc_stderr too small (evaluate warns).
    pareto_k_max: the largest per-example Pareto k̂ (LogLikelihoodStats.pareto_k;
        NaN when none could be fitted).
    pareto_k_high: the fraction of examples whose k̂ exceeds 0.7, where the
        estimate is unreliable (evaluate warns when there is any).
    per_example_pareto_k: the (N,) k̂, in data order.
    per_example_unreliable: (N,) bool, k̂ > 0.7: the examples whose stderr
        understates their error (LogLikelihoodStats.unreliable).
    per_example_k: (N,) int64, the samples each example drew (k, or fewer
        under target_stderr).
    """
    log_likelihood: float
    stderr: float
    nll: float
    bits_per_dim: float
    mc_stderr: float
    n_examples: int
    dim: int
    k: int
    per_example: Tensor
    ess_fraction: float
    pareto_k_max: float = float("nan")
    pareto_k_high: float = float("nan")
    per_example_pareto_k: Tensor | None = None
    per_example_unreliable: Tensor | None = None
    per_example_k: Tensor | None = None

    def __repr__(self) -> str:  # one line, not the N per-example values
        return (f"EvaluationResult(log_likelihood={self.log_likelihood:.4f} ± {self.stderr:.4f} "
                f"(mc ± {self.mc_stderr:.4f}), nll={self.nll:.4f}, bits_per_dim={self.bits_per_dim:.4f}, "
                f"n_examples={self.n_examples}, dim={self.dim}, k={self.k}, ess_fraction={self.ess_fraction:.3f}, "
                f"pareto_k_max={self.pareto_k_max:.2f}, pareto_k_high={self.pareto_k_high:.3f})")


# Below this mean ESS / K the importance weights are degenerate: measured at
# ESS ~ 97 of 5000 (2%), the spread of repeated estimates was 1.5 times the
# delta-method stderr.
LOW_ESS_FRACTION = 0.05


class EvaluationWarning(RuntimeWarning):
    """The evaluation's diagnostics: degenerate importance weights, high Pareto
    k̂. Shown at every occurrence: Python's default filter shows a repeated
    warning once per call site, which in a loop over models or checkpoints
    hides every one after the first. An appended filter, so a user's own
    (``-W``, ``warnings.filterwarnings``, pytest's) still takes precedence."""


warnings.filterwarnings("always", category=EvaluationWarning, append=True)


def _warn_low_ess(fraction: float, k: int, stacklevel: int) -> None:
    if fraction < LOW_ESS_FRACTION:
        warnings.warn(
            f"the importance weights are degenerate: mean ESS/K = {fraction:.3f} (K = {k}). The estimate "
            f"rests on a few samples: it is still a stochastic lower bound on log p(x), but may lie far below "
            f"it, and its delta-method stderr understates the Monte Carlo error. Use a larger k, or a "
            f"better-fitted encoder (train longer, or with fastvae.iwae); docs/evaluation.md",
            EvaluationWarning, stacklevel=stacklevel,  # the user's call
        )


def _warn_high_k(pareto_k: Tensor, stacklevel: int) -> None:
    """Warn once per call when any example's k̂ exceeds the paper's 0.7 (one
    host sync, at the end of the evaluation): how many, the worst k̂, that
    their stderr understates the error, and the remedies."""
    high = pareto_k > _pareto.HIGH_K
    n_high = int(high.sum())
    if n_high:
        warnings.warn(
            f"Pareto k̂ > {_pareto.HIGH_K} for {n_high} of {pareto_k.numel()} examples (worst k̂ = "
            f"{pareto_k[high].max().item():.2f}): their importance weights are heavy-tailed, so their stderr "
            f"understates the error of log p̂(x), which may sit below the true log p(x) by far more than the "
            f"stderr says (Vehtari et al. 2024; LogLikelihoodStats.unreliable marks them). Remedies: a larger k or, "
            f"better, a better proposal: an encoder trained with fastvae.iwae (estimator='dreg' for its "
            f"encoder gradient), which fits q(z|x) to the posterior's spread; docs/evaluation.md",
            EvaluationWarning, stacklevel=stacklevel,
        )


def _warn_target_missed(stats: LogLikelihoodStats, target: float | None, k: int, stacklevel: int) -> None:
    """target_stderr: the examples that drew the cap k without reaching the
    target (those with k̂ > 0.7 have their own warning)."""
    if target is None:
        return
    missed = ~(stats.stderr <= target) & ~stats.unreliable
    n_missed = int(missed.sum())
    if n_missed:
        warnings.warn(
            f"target_stderr={target}: {n_missed} of {missed.numel()} examples drew the cap k={k} with a stderr "
            f"above the target (largest {stats.stderr[missed].double().max().item():.4g}); raise k to reach it",
            EvaluationWarning, stacklevel=stacklevel,
        )


@dataclass(frozen=True)
class _Config:
    k: int
    k_name: str  # how the caller spelled k ("k", or "n_samples" for reconstruction_probability)
    likelihood: str
    with_ratio: bool  # log w includes log p(z) − log q(z|x) (False: reconstruction probability)
    chunk_size: int | None
    memory_budget: int | None  # None: DEFAULT_MEMORY_BUDGET, or on CUDA a share of the free memory
    shard: str | None
    group: Any
    prior: Any  # p(z) (fastvae.priors); StandardNormal by default
    pareto: bool = False  # keep the largest log-weights and fit k̂ (log_likelihood, evaluate, return_stats)
    target_stderr: float | None = None  # stop an example's sampling at this standard error (_stream)
    bytes_per_sample: int | None = None  # the user's figure for the chunk plan; None: measured (_stream)


# -- argument checks -------------------------------------------------------------


def _config(k_name: str, k, *, likelihood, chunk_size, memory_budget, shard, group, with_ratio,
            prior=None, target_stderr=None, bytes_per_sample=None) -> _Config:
    k = _validate.positive_int(k_name, k)
    check_likelihood(likelihood)
    if chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    if memory_budget is not None:  # None: chosen per device at the call (_memory_budget)
        memory_budget = _validate.positive_int("memory_budget", memory_budget)
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    return _Config(k, k_name, likelihood, with_ratio, chunk_size, memory_budget, shard, group,
                   check_prior(prior), target_stderr=_target_stderr(target_stderr),
                   bytes_per_sample=_bytes_per_sample(bytes_per_sample))


def _target_stderr(value) -> float | None:
    """target_stderr: None, or a finite number > 0 (nats)."""
    if value is None:
        return None
    value = _validate.real("target_stderr", value)
    if value <= 0:
        raise ValueError(f"target_stderr must be > 0 (the standard error of log p̂(x) in nats to stop at), "
                         f"got {value}")
    return value


def _bytes_per_sample(value) -> int | None:
    return None if value is None else _validate.positive_int("bytes_per_sample", value)


def _check_target_sharding(cfg: _Config) -> None:
    """target_stderr decides per example after each round; with K split over
    ranks that would need a collective per round, which is not done."""
    if cfg.target_stderr is not None and cfg.shard == "samples" and _distributed(cfg) is not None:
        raise ValueError("target_stderr cannot be combined with shard='samples' under torch.distributed: "
                         "use shard='examples' (each rank stops its own examples) or shard=None")


def _check_model(encode: Any, decode: Any) -> None:
    """encode and decode are callables (named in the error, as in fastvae.elbo)."""
    _validate.callable_arg("encode", encode, "x -> (mu, logvar) or a posterior")
    _validate.callable_arg("decode", decode, "z -> decoder output")


def _check_x(x: Any, what: str = "x", likelihood: Any = None) -> None:
    _validate.data_tensor(what, x, likelihood)  # integer x: class indices or counts
    if x.dim() < 2:
        raise ValueError(f"{what} must have shape (B, *event), e.g. (B, D) or (B, C, H, W); got {tuple(x.shape)}")


def _encode(encode: Callable, x: Tensor) -> DiagonalNormal | TrilNormal:
    """q(z|x) as a fastvae posterior: encode may return a (mu, logvar) pair, a
    DiagonalNormal or TrilNormal, or a torch Normal / MultivariateNormal."""
    q = as_posterior(call_user(encode, x, "encode", "x", None, EVALUATION_DOCS), "encode(x)'s result")
    mu = q.mu
    if mu.dim() != 2 or mu.shape[0] != x.shape[0] or mu.shape[1] < 1:
        raise ValueError(f"encode(x) returned mu of shape {tuple(mu.shape)}; expected (B, L) with "
                         f"B = {x.shape[0]} for x of shape {tuple(x.shape)}")
    if mu.device != x.device:  # dtypes may differ: a bfloat16 encoder (autocast) of float32 x
        raise TypeError(f"encode(x) returned {mu.dtype} on {mu.device}; x is {x.dtype} on {x.device}")
    return q


def _rows(q: DiagonalNormal | TrilNormal, b0: int, b1: int) -> DiagonalNormal | TrilNormal:
    if isinstance(q, LATENTS):
        return q.rows(b0, b1)
    if isinstance(q, DiagonalNormal):
        return DiagonalNormal(q.mu[b0:b1], q.logvar[b0:b1])
    return TrilNormal(q.mu[b0:b1], q.scale_tril[b0:b1])


def _draw(q, cfg: _Config, seed: Tensor, g: int, c0: int, c1: int) -> tuple[Tensor, Tensor | None]:
    """(z (c1 - c0, n, L), log p(z) - log q(z | x) or None) for samples [c0, c1) of
    the examples g.. in the evaluation's noise layout. The latent term comes
    from the noise itself (exact however small the posterior's variance):
    for a diagonal q from the sampling kernel, for a full-covariance q from
    log q(z) = log N(eps; 0, I) - sum log S_ii."""
    L = q.latent_size
    offset0 = (g * cfg.k + c0) * L
    if isinstance(q, LATENTS):  # the other latent families, at the same offsets (fastvae/latents.py)
        return q.draw_at(seed, c1 - c0, offset0, L, cfg.k * L,
                         q.resolve_prior(cfg.prior, "evaluation") if cfg.with_ratio else None)
    if isinstance(q, DiagonalNormal):
        drawn = sample_at(q.mu, q.logvar, seed, c1 - c0, offset0=offset0, sample_stride=L,
                          row_stride=cfg.k * L, with_ratio=cfg.with_ratio)
        if not cfg.with_ratio:
            return drawn, None
        z, ratio = drawn
        extra = log_ratio_to_standard(cfg.prior, z)
        return z, ratio if extra is None else ratio + extra
    eps = evaluation_noise(seed, first_example=g, n_examples=q.mu.shape[0], n_samples=cfg.k, k0=c0, k1=c1,
                           latent=L, dtype=q.mu.dtype, device=q.mu.device)
    mu, S = widened(q.mu, q.scale_tril)
    S = S.tril()
    # S eps in the compute dtype (autocast would run the matmul in half
    # precision); z then in sample_normal's z dtype
    dtype = z_dtype(q.mu, q.scale_tril)  # outside the block, which turns autocast off
    with torch.autocast(S.device.type, enabled=False):
        z = (mu + (S @ eps.unsqueeze(-1).to(S.dtype)).squeeze(-1)).to(dtype)
    if not cfg.with_ratio:
        return z, None
    log_q = (StandardNormal().log_prob(eps) - torch.log(torch.diagonal(S, dim1=-2, dim2=-1)).sum(-1))
    return z, cfg.prior.log_prob(z) - log_q


# -- the chunk loop ---------------------------------------------------------------

# Samples per example before target_stderr trusts an example's standard error:
# the delta-method stderr is estimated from the weights themselves, and k̂ needs
# a tail (M = 20 of 100 samples) to say whether it can be trusted.
TARGET_MIN_SAMPLES = 100
# ... and the k̂ below which it stops an example on its stderr (Vehtari et al.
# 2024: below 0.5 the weights have a finite variance, so the central limit
# theorem, and the delta-method stderr, hold).
TARGET_MAX_PARETO_K = 0.5


class _PeakBytes(TorchDispatchMode):
    """The peak bytes of the tensors created while the mode is active and
    still alive, above what was alive when it started. PyTorch has no
    allocation counter on the CPU (torch.cuda.max_memory_allocated is CUDA's
    only, and resetting it would disturb the user's own peak), and the
    process's RSS moves in pages and with the allocator's caching. Every
    tensor an operator returns passes through this mode (C++ and Triton
    kernels allocate their outputs through torch.empty): a storage not seen
    before and not one of the operator's inputs is a new allocation, counted
    until the last Python tensor on it is freed (a view keeps it alive). What
    an operator allocates and frees inside itself (a matmul's workspace) is
    not seen; the budget's 10% margin is for that."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # A torch.compile'd decoder compiles and runs compiled under the mode
        # (torch.compile skips a frame run under any other mode, and then never
        # compiles it again); the buffers its compiled code allocates are not
        # seen, so bytes_per_sample is the way to size its chunks.
        return True

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable
        # otherwise, which imports torch._dynamo (and with it triton) at the
        # first operator: seconds of imports for a CPU evaluation
        return False

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[ptr]
                self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in _pytree.tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self.live.get(ptr)
            if entry is None:
                if inputs is None:
                    inputs = {a.untyped_storage().data_ptr() for a in _pytree.tree_leaves((args, kwargs))
                              if isinstance(a, Tensor) and a.device.type != "meta"}
                if ptr in inputs:  # a view of, or an in-place result on, a tensor from before
                    continue
                entry = self.live[ptr] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def _chunk_plan(budget: int, rows: int, n: int, fixed: float, per_sample: float, remaining: int) -> tuple[int, int]:
    """(samples per chunk, examples per block) for ``rows`` examples with
    ``remaining`` samples to go: the largest chunk whose modelled peak,
    (fixed + per_sample · K_c) · rows / n bytes (the cost measured for n
    examples, scaled to the rows decoded), stays within the budget. When
    even one sample of every row is too much, the rows are split into blocks
    of one sample each."""
    scale = rows / max(n, 1)
    per_sample = max(per_sample, 1.0)
    kc = int((budget - fixed * scale) // (per_sample * scale)) if rows else remaining
    if kc >= 1:
        return min(kc, remaining), rows
    return 1, max(1, min(rows, int(budget * n // max(fixed + per_sample, 1.0))))


def _fit(probes: list[tuple[int, int]]) -> tuple[float, float]:
    """(fixed, per sample) bytes of a line at or above every measured (samples,
    peak): its slope the steepest from the first probe (or, where no peak grew,
    the largest peak per sample), its intercept the least that clears them all."""
    (k1, p1), rest = probes[0], probes[1:]
    slope = max(((p - p1) / (k - k1) for k, p in rest if k > k1), default=0.0)
    if slope <= 0:  # not linear in K_c: count the largest chunk's whole peak per sample
        slope = max(p / k for k, p in probes)
    return max(0.0, *(p - slope * k for k, p in probes)), float(slope)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as maximal runs [start, stop) of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


@dataclass
class _Streamed:
    """What the chunk loop leaves: states of log w and 2 log w per example
    (n,), the largest log-weights (rows, n) with cfg.pareto (else None), and
    the samples each example drew (n,) int64."""
    st1: LogMeanExpState
    st2: LogMeanExpState
    tail: Tensor | None
    counts: Tensor


def _stream(n: int, k0: int, k1: int, cfg: _Config, chunk: Callable, dtype: torch.dtype, device: torch.device,
            per_sample: int | None, bar) -> _Streamed:
    """The chunk loop shared by log_likelihood and importance_log_likelihood.
    ``chunk(runs, c0, c1)`` gives the log-weights (c1 - c0, m) and the latent
    term (or None) of samples [c0, c1) of the m rows in ``runs`` (row ranges
    [start, stop), local indices). Their states are folded into per-example
    states, and with cfg.target_stderr the examples whose standard error has
    reached the target stop drawing (only the others are decoded).

    Chunk sizes: cfg.chunk_size as given; else per_sample (bytes per sample
    of one example) against the memory budget; else measured: the first
    three chunks hold 1, 2 and Q samples of every row (Q a quarter of the
    chunk the first two predict) and run under _PeakBytes, the model's call
    and fastvae's merge metered apart (_fit: the cost of one sample, and the
    rest the cost of a chunk whatever its size: the decoder's and our fixed
    buffers). The third catches a cost that grows only past a few samples."""
    rows_all = list(range(n))
    dtype = accumulation_dtype(dtype)  # a half-precision model's log-weights accumulate in float32
    m1 = torch.full((n,), float("-inf"), dtype=dtype, device=device)
    m2 = m1.clone()
    s1 = torch.zeros((n,), dtype=dtype, device=device)
    s2 = s1.clone()
    # the tail starts at its full height, so every chunk (the measured ones
    # too) merges the same rows; -inf rows are what pad_tail adds anyway
    tail = torch.full((_tail_rows(cfg), n), float("-inf"), dtype=dtype, device=device) if cfg.pareto else None
    counts = torch.zeros((n,), dtype=torch.int64, device=device)
    if n == 0 or k1 <= k0:
        return _Streamed(LogMeanExpState(m1, s1, max(0, k1 - k0)), LogMeanExpState(m2, s2, max(0, k1 - k0)),
                         tail, counts)
    budget = memory_budget_for(device, cfg.memory_budget) if cfg.chunk_size is None else 0
    model = None if per_sample is None else (0.0, float(per_sample) * n)  # (fixed, per sample) for n rows
    probes: list[tuple[int, int]] = []  # the measured chunks: (samples, peak bytes)

    def run_chunk(rows: list[int], c0: int, c1: int, measure: bool = False) -> int:
        """Runs a chunk; with ``measure``, returns its peak bytes (else 0)."""
        runs = _runs(rows)
        # measured, the model's log-weights and fastvae's merge are two meters: the
        # sum of their peaks. One meter over both would give the larger peak alone,
        # and where the merge's buffers (fixed in K_c) peak above a 1- or 2-sample
        # decoder's, the decoder's cost per sample would read as nothing.
        with _PeakBytes() if measure else contextlib.nullcontext() as meter:
            lw, latent = chunk(runs, c0, c1)
        with _PeakBytes() if measure else contextlib.nullcontext() as merge_meter:
            _merge_chunk(runs, rows, lw, latent)
        return meter.peak + merge_meter.peak if measure else 0

    def _merge_chunk(runs: list[tuple[int, int]], rows: list[int], lw: Tensor, latent: Tensor | None) -> None:
        one = len(runs) == 1
        idx = None if one else torch.tensor(rows, device=device)
        sel = slice(*runs[0]) if one else idx
        # a contiguous run's states are views the kernel updates in place;
        # scattered rows are gathered, merged and written back
        st1 = LogMeanExpState(m1[sel], s1[sel], 0)
        st2 = LogMeanExpState(m2[sel], s2[sel], 0)
        st1, st2 = accumulate_states(lw, latent, st1, st2)
        if not one:
            m1[idx], s1[idx], m2[idx], s2[idx] = st1.max, st1.sumexp, st2.max, st2.sumexp
        if tail is not None:  # the largest log-weights so far, merged on the device (no host sync)
            full = lw.to(dtype) if latent is None else lw.to(dtype) + latent.to(dtype)
            tail[:, sel] = _pareto.merge_tail(tail[:, sel], full, tail.shape[0])
        if bar is not None:
            bar.update(1)

    active = rows_all
    c = k0
    end = k1 if cfg.target_stderr is None else min(k1, k0 + TARGET_MIN_SAMPLES)
    while True:
        while model is None and cfg.chunk_size is None and c < end:  # measure: 1, 2, then Q samples of every row
            if len(probes) < 2:
                kc = min(len(probes) + 1, end - c)
            else:
                # Q, a quarter of the chunk the first two predict: an op whose buffers grow only
                # past a few samples (a kernel's path for larger inputs) shows its cost there
                planned, _ = _chunk_plan(budget, len(active), n, *_fit(probes), end - c)
                kc = min(planned // 4, end - c)
                if kc < 3:  # too small a chunk to tell more than the first two did
                    model = _fit(probes)
                    break
            probes.append((kc, run_chunk(active, c, c + kc, measure=True)))
            c += kc
            if len(probes) == 3:
                model = _fit(probes)
        if c < end:
            if cfg.chunk_size is not None:
                kc, nb = min(cfg.chunk_size, end - c), len(active)
            else:
                kc, nb = _chunk_plan(budget, len(active), n, *model, end - c)
            for b0 in range(0, len(active), nb):  # a block of examples, then the next
                for c0 in range(c, end, kc):
                    run_chunk(active[b0:b0 + nb], c0, min(end, c0 + kc))
            c = end
        if cfg.target_stderr is None or c >= k1:
            break
        # the stopping rule, one host sync per round: an example stops when its
        # stderr is at most the target and k̂ < 0.5, where the weights' variance
        # is finite and the stderr means what it says. Not 0.7: from the first
        # 100 samples of weights whose k is 0.9, k̂ came out in 0.5-0.7 for most
        # examples, which then stopped on a stderr that understated the error.
        # NaN k̂ (a flat tail: q the exact posterior) stops on the stderr alone.
        sel = torch.tensor(active, device=device)
        st = _stats(LogMeanExpState(m1[sel], s1[sel], c - k0), LogMeanExpState(m2[sel], s2[sel], c - k0),
                    c - k0, None if tail is None else tail[:, sel], fit_bytes=budget or _pareto.FIT_BYTES)
        done = (st.stderr <= cfg.target_stderr) & ~(st.pareto_k >= TARGET_MAX_PARETO_K)
        done_rows = sel[done]
        counts[done_rows] = c - k0
        active = [r for r, d in zip(active, done.tolist()) if not d]
        if not active:
            break
        # doubling: a few rounds (each a k̂ fit and a host sync) up to any cap, and
        # an example drawn at most twice the samples it needed
        end = min(k1, k0 + 2 * (c - k0))
    if active:
        counts[torch.tensor(active, device=device)] = c - k0
    # without a target every example drew k1 - k0 samples: an int count, as the collectives expect
    count = counts if cfg.target_stderr is not None else k1 - k0
    return _Streamed(LogMeanExpState(m1, s1, count), LogMeanExpState(m2, s2, count), tail, counts)


def memory_budget_for(device: torch.device, memory_budget: int | None = None) -> int:
    """Bytes one chunk may use: memory_budget when given; else on a CUDA device
    CUDA_FREE_MEMORY_FRACTION of its free memory now (torch.cuda.mem_get_info,
    at least 1 byte), and on any other device DEFAULT_MEMORY_BUDGET."""
    if memory_budget is not None:
        return memory_budget
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(free * CUDA_FREE_MEMORY_FRACTION))
    return DEFAULT_MEMORY_BUDGET


def _tail_rows(cfg: _Config) -> int:
    """How many of the largest log-weights per example k̂ needs: the tail and its threshold."""
    return _pareto.tail_size(cfg.k) + 1


def _states(x: Tensor, q, decode: Callable, cfg: _Config, seed: Tensor,
            g0: int, k0: int, k1: int, bar) -> _Streamed:
    """_stream over samples [k0, k1) of K for the n local examples of x, whose
    global indices start at g0: each chunk draws z for its rows (a run of
    consecutive rows at a time, at their noise offsets), decodes it and
    scores x."""
    n = x.shape[0]
    mu = q.mu
    L = mu.shape[1]
    check_prior(cfg.prior, L)  # the prior's latent size against the encoder's (metadata only)
    # The result's dtype is x's and the encoder's (log_likelihood's Returns), never the decoder output's: it is
    # then known before any decoder call, so an empty batch and a rank with no samples (whose states
    # the other ranks' all_reduce must match) get the dtype every other path gets.
    dtype = compute_dtype(x, mu)
    if n and k1 > k0:
        last = (g0 + n) * cfg.k * L - 1
        if last > MAX_OFFSET:
            raise ValueError(
                f"{cfg.k_name}={cfg.k} is too large: the noise of {g0 + n} examples x {cfg.k_name} samples x {L} "
                f"latents runs to Philox offset {last}, beyond 2**63 - 1; use {cfg.k_name} <= "
                f"{(MAX_OFFSET + 1) // ((g0 + n) * L)}"
            )

    def chunk(runs: list[tuple[int, int]], c0: int, c1: int) -> tuple[Tensor, Tensor | None]:
        # eps[g, k, l] = randn(seed, (g * K + k) * L + l), drawn where it is used
        drawn = [_draw(_rows(q, r0, r1), cfg, seed, g0 + r0, c0, c1) for r0, r1 in runs]
        if len(drawn) == 1:
            (z, latent), xb = drawn[0], x[runs[0][0]:runs[0][1]]
        else:  # the rows still sampling under target_stderr: only they are decoded
            z = torch.cat([d[0] for d in drawn], dim=1)
            latent = None if drawn[0][1] is None else torch.cat([d[1] for d in drawn], dim=1)
            xb = torch.cat([x[r0:r1] for r0, r1 in runs])
        # lw = log p(x|z); the latent term is added in the state kernel, in the
        # accumulation dtype (a half-precision model's terms are widened first)
        lw = decoder_log_prob(xb, call_user(decode, z, "decode", "z", "K_c", EVALUATION_DOCS), cfg.likelihood,
                              (c1 - c0,))
        if lw.dtype != dtype:  # a float32 decoder of a float64 posterior, or the reverse
            lw = lw.to(dtype)
        return lw, latent

    return _stream(n, k0, k1, cfg, chunk, dtype, mu.device, cfg.bytes_per_sample, bar)


def _stats(st1: LogMeanExpState, st2: LogMeanExpState, K: int | Tensor, tail: Tensor | None = None,
           counts: Tensor | None = None, fit_bytes: int = _pareto.FIT_BYTES) -> LogLikelihoodStats:
    """log p̂, its delta-method standard error, the ESS from the states of
    log w and 2 log w, and k̂ from the largest log-weights (NaN without them):
    with r = mean(w²) / mean(w)² = K / ESS, se(log p̂)² = s²_w / (K mean(w)²) = (r − 1) / (K − 1).
    K is the samples per example: an int, or (n,) under target_stderr, when
    k̂ is fitted per group of examples that drew the same number."""
    lme1, lme2 = logmeanexp_from_state(st1), logmeanexp_from_state(st2)
    zero = lme1 == float("-inf")
    ratio = torch.exp(torch.where(zero, 0.0, lme2 - 2 * lme1))
    ess = torch.where(zero, 0.0, K / ratio)
    if isinstance(K, Tensor):
        k_f = K.to(ratio.dtype)
        stderr = torch.sqrt(torch.clamp_min(ratio - 1, 0.0) / torch.clamp_min(k_f - 1, 1.0))
        stderr = torch.where(zero | (K <= 1), float("nan"), stderr)
    elif K > 1:
        stderr = torch.sqrt(torch.clamp_min(ratio - 1, 0.0) / (K - 1))
        stderr = torch.where(zero, float("nan"), stderr)
    else:
        stderr = torch.full_like(lme1, float("nan"))
    pareto_k = torch.full(lme1.shape, float("nan"), dtype=torch.float64, device=lme1.device)
    if tail is not None and isinstance(K, Tensor):
        for k_b in K.unique().tolist():
            cols = (K == k_b).nonzero().flatten()
            pareto_k[cols] = _pareto.pareto_k(tail[:, cols], int(k_b), fit_bytes)
    elif tail is not None:
        pareto_k = _pareto.pareto_k(tail, K, fit_bytes)
    if counts is None:
        counts = torch.full(lme1.shape, K, dtype=torch.int64, device=lme1.device) if isinstance(K, int) else K
    return LogLikelihoodStats(lme1, stderr, ess, pareto_k, pareto_k > _pareto.HIGH_K, counts)


# -- torch.distributed --------------------------------------------------------------


def _distributed(cfg: _Config) -> tuple[int, int] | None:
    """(rank, world size) of the group when the work is to be sharded, else None."""
    if cfg.shard is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(cfg.group)
    return None if world == 1 else (dist.get_rank(cfg.group), world)


def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    # NCCL moves CUDA tensors only; gloo and the others take CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _split(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced share of rank: sizes differ by at most one."""
    return total * rank // world, total * (rank + 1) // world


_MAX_DIMS = 8  # batch dimensions compared across ranks


def _shared_seed(x: Tensor, generator, cfg: _Config, what: str = "x") -> Tensor:
    """One seed per call; under sharding rank 0's, so every rank draws from the
    same stream (each rank's generator still advances, as without sharding)."""
    seed = draw_seed(x.device, generator)
    if _distributed(cfg) is None:
        return seed
    return _agree_on_batch(x, seed, what, cfg)


def _agree_on_batch(x: Tensor | None, seed: Tensor | None, what: str, cfg: _Config) -> Tensor:
    """Group rank 0's seed, from one all_gather of [seed, ndim, *shape] that
    also compares every rank's batch (x None: this rank's data has run out).
    Ranks given different batches all raise here, before any other
    collective: otherwise one would return while another waited in a later
    collective, or gloo would abort on the mismatched sizes. Every call
    gathers the same layout, so a rank whose data ended still meets a rank
    that has another batch."""
    import torch.distributed as dist

    if x is not None and x.dim() > _MAX_DIMS:
        raise ValueError(f"x must have at most {_MAX_DIMS} dimensions under shard=, got shape {tuple(x.shape)}")
    dev = _collective_device(cfg.group)
    dims = [-1] if x is None else [x.dim(), *x.shape]
    shape = torch.tensor(dims + [0] * (_MAX_DIMS + 1 - len(dims)), dtype=torch.int64, device=dev)
    mine = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev) if seed is None else seed.reshape(1).to(dev),
                      shape])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(cfg.group))]
    dist.all_gather(parts, mine, group=cfg.group)
    shapes = [None if p[1] < 0 else tuple(p[2:2 + int(p[1])].tolist()) for p in parts]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"rank {r}: {'no batch' if s is None else s}" for r, s in enumerate(shapes))
        raise ValueError(
            f"shard={cfg.shard!r} needs the same batch on every rank of the group; got {what} of shape {listed}")
    return parts[0][:1].reshape(()).to(x.device if x is not None else "cpu")  # group rank 0's seed


def _all_reduce_states(st1, st2, cfg: _Config):
    """Both states merged over the ranks in one all_reduce_logmeanexp_state
    (the states are per column, so they can be stacked)."""
    dev = _collective_device(cfg.group)
    local = LogMeanExpState(torch.stack([st1.max, st2.max]).to(dev),
                            torch.stack([st1.sumexp, st2.sumexp]).to(dev), st1.count)
    merged = all_reduce_logmeanexp_state(local, group=cfg.group)
    home = st1.max.device
    return [LogMeanExpState(merged.max[i].to(home), merged.sumexp[i].to(home), cfg.k) for i in (0, 1)]


def _all_gather_tails(tail: Tensor, cfg: _Config) -> Tensor:
    """Every rank's largest log-weights of its share of K (rows, n) -> the
    largest of all K, on every rank."""
    import torch.distributed as dist

    dev, home = _collective_device(cfg.group), tail.device
    local = tail.to(dev).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(cfg.group))]
    dist.all_gather(parts, local, group=cfg.group)
    return _pareto.merge_tail(None, torch.cat(parts), _tail_rows(cfg)).to(home)


def _all_gather_examples(stats: LogLikelihoodStats, B: int, world: int, cfg: _Config) -> LogLikelihoodStats:
    """Each rank's stats of its slice of the batch -> the stats of the whole batch
    on every rank. Slices are padded to one size, since all_gather wants it."""
    import torch.distributed as dist

    dev, out_dev = _collective_device(cfg.group), stats.log_likelihood.device
    width = math.ceil(B / world)
    local = torch.stack([t.double() for t in stats]).to(dev)  # k̂ is float64: no field loses precision
    padded = torch.zeros((len(stats), width), dtype=local.dtype, device=dev)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=cfg.group)
    sizes = [_split(B, r, world)[1] - _split(B, r, world)[0] for r in range(world)]
    full = torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1).to(out_dev)
    return LogLikelihoodStats(*(row.to(t.dtype) for row, t in zip(full, stats)))


# -- one batch ------------------------------------------------------------------------


def _estimate(x: Tensor, encode: Callable, decode: Callable, cfg: _Config, seed: Tensor, g0: int,
              progress: bool) -> LogLikelihoodStats:
    """Per-example stats of the batch x, whose first example has global index g0."""
    B = x.shape[0]
    dist_info = _distributed(cfg)
    rank, world = dist_info if dist_info is not None else (0, 1)
    by_examples = dist_info is not None and cfg.shard == "examples"
    b0, b1 = _split(B, rank, world) if by_examples else (0, B)
    k0, k1 = _split(cfg.k, rank, world) if dist_info is not None and cfg.shard == "samples" else (0, cfg.k)
    xs = x[b0:b1]
    if b1 > b0 or B == 0:  # an empty batch is encoded too: the result's dtype is the encoder's (log_likelihood)
        q = _encode(encode, xs)
    else:
        # No examples on this rank: nothing to encode, but the collectives still run.
        q = DiagonalNormal(xs.new_empty((0, 1)), xs.new_empty((0, 1)))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        # no total: the chunks are sized after the first two (_stream), and target_stderr stops early
        bar = tqdm(unit="chunk", desc="log-likelihood", leave=False)
    try:
        out = _states(xs, q, decode, cfg, seed, g0 + b0, k0, k1, bar)
    finally:
        if bar is not None:
            bar.close()
    return _finish(out, B, cfg, dist_info)


def _finish(out: _Streamed, B: int, cfg: _Config, dist_info) -> LogLikelihoodStats:
    """The batch's stats from the local states: merged over the ranks'
    samples, or gathered over their examples, under torch.distributed."""
    # k̂'s fit within the call's memory budget, as its chunks
    fit_bytes = memory_budget_for(out.st1.max.device, cfg.memory_budget)
    if dist_info is None:
        return _stats(out.st1, out.st2, out.st1.count, out.tail, fit_bytes=fit_bytes)
    if cfg.shard == "samples":  # no target_stderr here (_check_target_sharding): every count is cfg.k
        tail = None if out.tail is None else _all_gather_tails(out.tail, cfg)
        return _stats(*_all_reduce_states(out.st1, out.st2, cfg), cfg.k, tail, fit_bytes=fit_bytes)
    return _all_gather_examples(_stats(out.st1, out.st2, out.st1.count, out.tail, fit_bytes=fit_bytes), B,
                                dist_info[1], cfg)


# -- public functions ----------------------------------------------------------------


def log_likelihood(
    x: Tensor,
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    decode: Callable[[Tensor], Any],
    *,
    k: int = 5000,
    likelihood: str | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_stats: bool = False,
    memory_budget: int | None = None,
    shard: str | None = "examples",
    group=None,
    prior: Any = None,
    target_stderr: float | None = None,
    bytes_per_sample: int | None = None,
) -> Tensor | LogLikelihoodStats:
    """Importance-sampled estimate of log p(x) per example with K samples
    from the encoder's q(z|x) as the proposal (the IWAE bound of Burda et al.
    2015, whose expectation rises to log p(x) as K grows).

    Args:
        x: data (B, *event), e.g. (B, D) or (B, C, H, W) images, float32 or
            float64, or float16/bfloat16 on CUDA (log-weights accumulate in
            float32). decode returns (K_c, B, *event).
        encode: x (B, D) -> (mu, logvar), each (B, L): q(z|x) = N(mu, diag(exp(logvar)));
            or a fastvae.DiagonalNormal, a full-covariance fastvae.TrilNormal,
            or a torch Normal / MultivariateNormal.
        decode: z (K_c, B, L) -> the decoder output for every sample, shape
            (K_c, B, D): for likelihood="gaussian" the mean (unit variance) or a
            (mean, logvar) pair, for "laplace" the location or a (loc,
            log_scale) pair, for "bernoulli" the logits, for "poisson" the
            log rate, for "negative_binomial" (log mean, log theta), for "zinb"
            (log mean, log theta, zero-inflation logits).
        k: samples per example (K >= 1; 5000 is the usual report).
        likelihood: one of fastvae.elbo's (docs/likelihoods.md). Required
            (there is no default: a wrong one gives a plausible but
            meaningless number).
        chunk_size: samples decoded per call. None picks the largest chunk that
            fits ``memory_budget`` (and splits the batch when one sample of
            every example does not), from the memory a chunk really uses:
            measured on the first three chunks (1, 2 and a quarter of the
            predicted chunk's samples of every example), or
            ``bytes_per_sample``. The result does not depend on
            it (to float32 rounding).
        generator: torch.Generator the one Philox seed of the call is drawn
            from (default: torch's default generator of x's device).
        progress: show a tqdm bar over the chunks.
        return_stats: return a :class:`LogLikelihoodStats` (estimate, its
            standard error, ESS) instead of the estimate alone.
        memory_budget: bytes per chunk for chunk_size=None. Default: on a
            CUDA device ``fastvae.evaluation.CUDA_FREE_MEMORY_FRACTION`` (1/4)
            of its free memory at the call (``torch.cuda.mem_get_info``),
            elsewhere ``fastvae.evaluation.DEFAULT_MEMORY_BUDGET`` (256 MiB);
            see ``memory_budget_for``.
        shard: when torch.distributed is initialized (and the group has more
            than one rank): "examples" splits the batch over the ranks,
            "samples" splits K; None computes everything on every rank. Every
            rank passes the same x, draws the same noise (rank 0's seed) and
            gets the same result as one process would.
        group: the torch.distributed process group (default: the world).
        prior: p(z), as in fastvae.elbo (default N(0, I)); its parameters
            (a mixture's, a VampPrior's pseudo-inputs) are read once per chunk.
        target_stderr: stop sampling an example once the standard error of
            its log p̂(x) is at most this (nats, > 0), or at k samples (the
            cap). Checked after TARGET_MIN_SAMPLES (100) samples, then each
            time the count doubles; only the examples still short of the
            target are decoded in later rounds, so decode must treat each
            example on its own. An example whose k̂ exceeds 0.7 (its stderr
            cannot be trusted) draws to the cap and is flagged
            (``unreliable``). The estimator is the same as with K fixed: the
            samples an example draws are the first k_used of its k. The
            return type still follows return_stats (``k_used`` says how many
            samples each example drew).
        bytes_per_sample: the memory one sample of one example costs the
            decoder and the likelihood (bytes), in place of the measurement.

    Returns:
        (B,) estimates log p̂(x) in nats, or LogLikelihoodStats with
        return_stats=True: float64 when x or the encoder's output is float64,
        else float32, whatever the decoder's dtype (its log-probabilities
        are rounded to that dtype before the log-mean-exp), on every path:
        chunked or not, an empty batch, a rank with no samples. Warns
        (EvaluationWarning) when the weights are degenerate (mean ESS/K
        below 5%), when an example's Pareto k̂ exceeds 0.7 (with or without
        return_stats), and when target_stderr is not reached by k.

    Runs under torch.no_grad(); put the model in eval mode first.
    """
    _check_model(encode, decode)
    cfg = _config("k", k, likelihood=likelihood, chunk_size=chunk_size, memory_budget=memory_budget,
                  shard=shard, group=group, with_ratio=True, prior=prior, target_stderr=target_stderr,
                  bytes_per_sample=bytes_per_sample)
    return _run_one_batch(x, encode, decode, cfg, generator, progress, return_stats)


def reconstruction_probability(x: Tensor, encode: Callable[[Tensor], tuple[Tensor, Tensor]],
                               decode: Callable[[Tensor], Any], *, n_samples: int = 100,
                               likelihood: str | None = None, chunk_size: int | None = None,
                               generator: torch.Generator | None = None, progress: bool = False,
                               return_stats: bool = False, memory_budget: int | None = None,
                               shard: str | None = "examples", group=None,
                               prior: Any = None, bytes_per_sample: int | None = None) -> Tensor | LogLikelihoodStats:
    """The anomaly score of An & Cho (2015): log (1/L) Σ_l p(x|z_l) with
    z_l ~ q(z|x), per example; low values flag anomalies.

    It differs from :func:`log_likelihood` only in the weights: here
    w_l = p(x|z_l), without the prior-to-posterior ratio p(z_l) / q(z_l|x).
    So it measures how well x is reconstructed from its own posterior: it is
    not an estimate of, nor a bound on, log p(x), and it ignores how far q(z|x)
    sits from the prior (the KL term), so an input that the encoder maps to an
    unusual region of latent space but that decodes well still scores high.
    As L grows it converges to log E_q[p(x|z)] (from below on average).

    Same arguments, streaming path, noise layout, sharding and
    ``return_stats`` as log_likelihood, with n_samples (L) in place of k
    (no target_stderr). k̂ is fitted only with return_stats, and does not warn.
    """
    _check_model(encode, decode)
    cfg = _config("n_samples", n_samples, likelihood=likelihood, chunk_size=chunk_size,
                  memory_budget=memory_budget, shard=shard, group=group, with_ratio=False, prior=prior,
                  bytes_per_sample=bytes_per_sample)
    return _run_one_batch(x, encode, decode, cfg, generator, progress, return_stats)


def _run_one_batch(x, encode, decode, cfg, generator, progress, return_stats):
    _check_x(x, "x", cfg.likelihood)
    _check_target_sharding(cfg)
    if return_stats or cfg.with_ratio:
        # log p̂(x) always keeps k̂'s tail (a topk per chunk): a poor proposal must
        # be flagged on the plain call too, where the figure gets reported
        cfg = replace(cfg, pareto=True)
    with torch.no_grad():
        seed = _shared_seed(x, generator, cfg)
        stats = _estimate(x, encode, decode, cfg, seed, 0, progress)
    if cfg.with_ratio and stats.ess.numel() > 0:
        # the ESS comes with every estimate (the state of 2 log w): one host
        # sync per evaluation call, worth it for a figure that may be wrong
        _warn_low_ess(_ess_fraction(stats), cfg.k, stacklevel=4)
        _warn_high_k(stats.pareto_k, stacklevel=4)
        _warn_target_missed(stats, cfg.target_stderr, cfg.k, stacklevel=4)
    return stats if return_stats else stats.log_likelihood


def _ess_fraction(stats: LogLikelihoodStats) -> float:
    """Mean over the examples of ESS / K, K the samples each drew."""
    return (stats.ess.double() / stats.k_used.clamp_min(1).double()).mean().item()


def evaluate(data: Iterable, encode: Callable[[Tensor], tuple[Tensor, Tensor]], decode: Callable[[Tensor], Any], *,
             k: int = 5000, likelihood: str | None = None, chunk_size: int | None = None,
             generator: torch.Generator | None = None, progress: bool | None = None,
             memory_budget: int | None = None, shard: str | None = "examples", group=None,
             prior: Any = None, target_stderr: float | None = None,
             bytes_per_sample: int | None = None) -> EvaluationResult:
    """Dataset log-likelihood: :func:`log_likelihood` over every batch of
    ``data`` (a DataLoader or any iterable of (B, *event) tensors, or of tuples
    whose first element is that tensor, e.g. (x, y)).

    Example g of the dataset (counted across batches) always gets the same
    samples for a given seed, so the result does not depend on the batch size.
    progress: True shows a tqdm bar over the batches, False is silent, None
    (default) shows it only once a run has taken more than 2 seconds. Under
    torch.distributed every rank iterates the same data (no DistributedSampler)
    and each batch is sharded as in log_likelihood; every rank gets the result.
    Ranks whose batches differ in shape, or whose data ends at different
    batches, all raise the same ValueError (one small all_gather per batch).
    target_stderr applies per example, as in log_likelihood
    (EvaluationResult.per_example_k). Other arguments as in log_likelihood;
    returns an :class:`EvaluationResult`.
    """
    _check_model(encode, decode)
    cfg = _config("k", k, likelihood=likelihood, chunk_size=chunk_size, memory_budget=memory_budget,
                  shard=shard, group=group, with_ratio=True, prior=prior, target_stderr=target_stderr,
                  bytes_per_sample=bytes_per_sample)
    _check_target_sharding(cfg)
    dist_info = _distributed(cfg)
    show = progress is not False and (dist_info is None or dist_info[0] == 0)
    total = len(data) if hasattr(data, "__len__") else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="batch", desc="evaluate", disable=not show,
               delay=0 if progress else 2.0)
    cfg = replace(cfg, pareto=True)
    parts: list[LogLikelihoodStats] = []
    seed, D, g = None, None, 0
    try:
        with torch.no_grad():
            n_batches = 0
            for i, batch in enumerate(data):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                _check_x(x, f"batch {i}", cfg.likelihood)
                n_batches = i + 1
                if D is None:
                    event = x.shape[1:]
                    D = math.prod(event)
                    seed = _shared_seed(x, generator, cfg, f"batch {i}")
                elif dist_info is not None:
                    # every batch, since the ranks iterate their own data; before
                    # the local checks, which ranks with different data would not
                    # all fail
                    _agree_on_batch(x, None, f"batch {i}", cfg)
                if x.shape[1:] != event:
                    raise ValueError(f"batch {i} has event shape {tuple(x.shape[1:])}; earlier batches have "
                                     f"{tuple(event)}")
                stats = _estimate(x, encode, decode, cfg, seed, g, False)
                g += x.shape[0]
                parts.append(stats)
                bar.update(1)
            if dist_info is not None:  # every rank's data ends at the same batch
                _agree_on_batch(None, None, f"batch {n_batches}", cfg)
    finally:
        bar.close()
    if g == 0:
        raise ValueError("evaluate: data yielded no examples")
    all_stats = LogLikelihoodStats(*(torch.cat(field) for field in zip(*parts)))
    per_example = all_stats.log_likelihood
    ll = per_example.double()
    se = all_stats.stderr.double()
    mean = ll.mean().item()
    spread = ll.std().item() if g > 1 else float("nan")
    nll = -mean
    ess_fraction = _ess_fraction(all_stats)
    _warn_low_ess(ess_fraction, cfg.k, stacklevel=3)
    pareto_k = all_stats.pareto_k
    _warn_high_k(pareto_k, stacklevel=3)
    _warn_target_missed(all_stats, cfg.target_stderr, cfg.k, stacklevel=3)
    fitted = pareto_k[~torch.isnan(pareto_k)]
    return EvaluationResult(
        log_likelihood=mean,
        stderr=spread / math.sqrt(g),
        nll=nll,
        bits_per_dim=nll / (D * math.log(2)),
        mc_stderr=math.sqrt((se ** 2).sum().item()) / g,
        n_examples=g,
        dim=D,
        k=cfg.k,
        per_example=per_example,
        ess_fraction=ess_fraction,
        pareto_k_max=fitted.max().item() if fitted.numel() else float("nan"),
        pareto_k_high=(pareto_k > _pareto.HIGH_K).double().mean().item(),
        per_example_pareto_k=pareto_k,
        per_example_unreliable=all_stats.unreliable,
        per_example_k=all_stats.k_used,
    )


# -- log p(x) of any model ------------------------------------------------------------

_MASK64 = 2**64 - 1


def _chunk_seed(seed: int, first: int) -> int:
    """The seed of torch's generators for the chunk whose first sample has
    global index ``first`` (example g, sample c: g·K + c): splitmix64 of the
    call's seed and that index, so each chunk draws its own stream and a
    chunk starting at the same sample always draws the same one."""
    z = (seed + 0x9E3779B97F4A7C15 * (first + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # below 2**63: any torch generator takes it


def _call_seeded(fn: Callable, x_rep: Tensor, seed: int) -> Any:
    """fn(x_rep) with torch's default generators (the CPU one, and x_rep's
    CUDA device's) seeded with ``seed``, and restored afterwards: the call
    leaves the user's random state as it found it."""
    device = x_rep.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        return call_user(fn, x_rep, "log_weight_fn", "x_rep", "n", LOG_WEIGHT_DOCS)


_SHAPE_HINT = ("a model run on the samples folded into the batch, x_rep.reshape(n * B, *event), gives "
               "(n * B,) values, which .reshape(n, B) restores")


def _log_weights(out: Any, n: int, b: int, device: torch.device, examples: list[int], c0: int) -> Tensor:
    """The log-weights (n, b) of one chunk from log_weight_fn's result: a
    tensor, or a dict, tuple or list of tensors (its parts) that are summed in
    the accumulation dtype. Raises on a wrong type, shape or device, and on a
    +inf or NaN log-weight (one host sync per chunk), naming the part and the
    (example, sample) where it is (examples: the global index of each column)."""
    what = "log_weight_fn(x_rep)"
    if isinstance(out, Tensor):
        items = [(what, out)]
    elif isinstance(out, dict):
        items = [(f"{what}[{key!r}]", t) for key, t in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{what}[{i}]", t) for i, t in enumerate(out)]
    else:
        raise TypeError(f"{what} must return a tensor of log-weights (n, B), or a dict, tuple or list of "
                        f"tensors (n, B) that are summed; got {type(out).__name__}")
    if not items:
        raise ValueError(f"{what} returned an empty {type(out).__name__}: it must hold at least one (n, B) tensor")
    for name, t in items:
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {kind}")
        if t.shape != (n, b):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (n, B) = ({n}, {b}) for x_rep of shape "
                             f"({n}, {b}, ...): one log-weight per sample and example ({_SHAPE_HINT})")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}; x is on {device}")
    dtype = accumulation_dtype(compute_dtype(*(t for _, t in items)))
    lw = items[0][1].to(dtype)
    for _, t in items[1:]:
        lw = lw + t.to(dtype)
    if bool((torch.isnan(lw) | (lw == math.inf)).any()):
        for name, t in [*items, (what + "'s sum", lw)]:  # the part at fault, else the sum (inf - inf)
            bad = torch.isnan(t) | (t == math.inf)
            if bool(bad.any()):
                i, j = (int(v) for v in bad.nonzero()[0])
                value = t[i, j].item()
                why = ("+inf: a density that is unbounded there" if value > 0
                       else "NaN: usually inf - inf, or a NaN parameter")
                raise ValueError(
                    f"{name} is {value} at sample {c0 + i} of example {examples[j]}: a log-weight must be finite, "
                    f"or -inf for a weight of 0 (a sample the model cannot produce); {why} in the model")
    return lw


def _weight_states(x: Tensor, fn: Callable, cfg: _Config, seed: int, g0: int, k0: int, k1: int, bar) -> _Streamed:
    """_stream for a user's log-weight function over samples [k0, k1) for
    the n examples of x (global indices from g0). Each chunk's call runs with
    torch's generators seeded from the call's seed and the chunk's first
    (example, sample)."""
    n = x.shape[0]
    dtype = accumulation_dtype(x.dtype) if x.dtype.is_floating_point else torch.float32

    def chunk(runs: list[tuple[int, int]], c0: int, c1: int) -> tuple[Tensor, None]:
        xb = x[runs[0][0]:runs[0][1]] if len(runs) == 1 else torch.cat([x[r0:r1] for r0, r1 in runs])
        x_rep = xb.unsqueeze(0).expand(c1 - c0, *xb.shape)  # a view: x is not copied
        out = _call_seeded(fn, x_rep, _chunk_seed(seed, (g0 + runs[0][0]) * cfg.k + c0))
        examples = [g0 + r for r0, r1 in runs for r in range(r0, r1)]
        # the states' dtype: float64 parts of float32 data are rounded once, here
        return _log_weights(out, c1 - c0, xb.shape[0], x.device, examples, c0).to(dtype), None

    return _stream(n, k0, k1, cfg, chunk, dtype, x.device, cfg.bytes_per_sample, bar)


def importance_log_likelihood(
    x: Tensor,
    log_weight_fn: Callable[[Tensor], Any],
    *,
    k: int = 5000,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_stats: bool = False,
    memory_budget: int | None = None,
    bytes_per_sample: int | None = None,
    shard: str | None = "examples",
    group=None,
    target_stderr: float | None = None,
) -> Tensor | LogLikelihoodStats:
    """log p(x) of any model with a tractable proposal, by importance
    sampling streamed over K: log p̂(x) = log (1/K) Σ_k w_k per example, where
    the model draws each sample and gives its log-weight log w_k. For a
    hierarchical VAE, log w = log p(x | z) + Σ_l [log p(z_l | z_<l) − log q(z_l | x, z_<l)]
    with z_l drawn from q top-down; for a flow, log p(x) itself (K = 1).
    :func:`log_likelihood` is this function for a single-level VAE whose
    encoder and decoder fastvae calls itself.

    Args:
        x: the batch (B, *event), any dtype (the model's input as it takes it).
        log_weight_fn: x_rep -> log-weights. x_rep is the batch repeated for
            a chunk of n samples, shape (n, B', *event): a read-only view of
            x (stride 0 over n; ``x_rep.reshape(n * B', *event)`` folds the
            samples into the batch, in a copy). B' = B unless the batch is
            split (a memory budget too small for one sample of every example,
            or shard="examples" over torch.distributed): rows are always
            whole examples, so the function must treat each example on its
            own (no batch statistics; put the model in eval mode). It draws
            its own samples with torch's random functions (torch.randn and
            the like, on x's device), and returns each sample's log-weight,
            shape (n, B'), or its parts as a dict, tuple or list of (n, B')
            tensors that are summed, e.g. ``{"log_px_z": ..., "group_1":
            log_p1 - log_q1, ...}``. A log-weight must be finite, or -inf
            for a weight of 0; +inf or NaN raises ValueError naming the part,
            the sample and the example. Any floating dtype: the log-mean-exp
            accumulates in float32 (float64 for float64 log-weights).
        k: samples per example (K >= 1; 5000 is the usual report).
        chunk_size: samples per call of log_weight_fn. None picks the largest
            n for which a chunk fits ``memory_budget`` (and splits the batch
            when one sample of every example does not), from the memory the
            first three chunks (1, 2 and a quarter of the predicted chunk's
            samples of every example) are measured to use, or from
            bytes_per_sample. So memory is bounded by one
            chunk whatever K is.
        generator: the torch.Generator the call's one seed is drawn from
            (default: torch's default generator of x's device). Each chunk
            runs with torch's default generators (the CPU one and x's CUDA
            device's) seeded from that seed and the chunk's first sample, and
            restored after it: the same seed, k and chunking give the same
            result, and the caller's random state is left as it was. Another
            chunk size draws other, equally valid samples.
        progress: show a tqdm bar over the chunks.
        return_stats: return a :class:`LogLikelihoodStats` (estimate, its
            standard error, ESS, Pareto k̂) instead of the estimate alone.
        memory_budget: bytes per chunk for chunk_size=None; default as in
            :func:`log_likelihood` (``memory_budget_for``).
        bytes_per_sample: bytes log_weight_fn holds per sample of one example
            (its largest activations under no_grad), in place of the
            measurement.
        shard: under torch.distributed, as in :func:`log_likelihood`:
            "examples" splits the batch over the ranks, "samples" splits K,
            None computes everything on every rank. Every rank passes the
            same x and gets the whole batch's result; ranks draw from rank
            0's seed, chunk by chunk, so shard="samples" gives each rank its
            own samples.
        group: the torch.distributed process group (default: the world).
        target_stderr: stop sampling an example once its standard error
            reaches this (nats), as in :func:`log_likelihood`; log_weight_fn
            then receives only the examples still sampling.

    Returns:
        (B,) estimates log p̂(x) in nats, or LogLikelihoodStats with
        return_stats=True: float32, or float64 for float64 x (log-weights
        are rounded to that dtype before the log-mean-exp), on every path:
        chunked or not, a rank with no samples. Warns (EvaluationWarning)
        when the weights are degenerate (mean ESS/K below 5%), when an
        example's Pareto k̂ exceeds 0.7, and when target_stderr is not
        reached by k.

    Runs under torch.no_grad().
    """
    k = _validate.positive_int("k", k)
    if not callable(log_weight_fn):
        raise TypeError(f"log_weight_fn must be callable (x_rep -> log-weights (n, B)), got "
                        f"{type(log_weight_fn).__name__}")
    if chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    if memory_budget is not None:
        memory_budget = _validate.positive_int("memory_budget", memory_budget)
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor (B, *event), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (B, *event) with B >= 1, got {tuple(x.shape)}")
    cfg = _Config(k, "k", None, True, chunk_size, memory_budget, shard, group, None, pareto=True,
                  target_stderr=_target_stderr(target_stderr), bytes_per_sample=_bytes_per_sample(bytes_per_sample))
    _check_target_sharding(cfg)
    B = x.shape[0]
    with torch.no_grad():
        seed = int(_shared_seed(x, generator, cfg))
        dist_info = _distributed(cfg)
        rank, world = dist_info if dist_info is not None else (0, 1)
        b0, b1 = _split(B, rank, world) if dist_info is not None and shard == "examples" else (0, B)
        k0, k1 = _split(k, rank, world) if dist_info is not None and shard == "samples" else (0, k)
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(unit="chunk", desc="log-likelihood", leave=False)
        try:
            out = _weight_states(x[b0:b1], log_weight_fn, cfg, seed, b0, k0, k1, bar)
        finally:
            if bar is not None:
                bar.close()
        stats = _finish(out, B, cfg, dist_info)
    if stats.ess.numel() > 0:
        _warn_low_ess(_ess_fraction(stats), k, stacklevel=3)
        _warn_high_k(stats.pareto_k, stacklevel=3)
        _warn_target_missed(stats, cfg.target_stderr, k, stacklevel=3)
    return stats if return_stats else stats.log_likelihood
