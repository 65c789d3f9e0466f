"""The front ends of sample_location_scale and sample_positive: their
public functions, torch.library ops and autograd Functions (double backwards
included), on one shared front end of a family sampler of two (N, L)
parameters (``FamilySampler``: its ops, the launches of their kernels, the
evaluation's strided draw, the Function and the public function's draw;
``FamilyKLSampler``: the ELBO's draw fused with family_kl's closed form).
Each op adds only its double backward and its checks of the public
arguments.

Element (k, n, l) of a draw takes the noise at offset0 + k * sample_stride +
n * row_stride + l (the training layout: offset0 = 0, sample_stride = N * L,
row_stride = L); docs/architecture.md, "The RNG contract".

sample_location_scale: reparameterized samples of a location-scale latent
family with log q(z) from the noise that drew them, fused.
z = loc + exp(log_scale) * e with e = F^-1(u) the standardized family's
inverse CDF (uniform on (0, 1), Laplace, logistic, Gumbel, Cauchy) of the
element's Philox uniform, and log q(z) = sum_l(log f(e) - log_scale) per
sample from that e: exact however small the scale, never (z - loc) / scale
divided back out. The custom ops ``fastvae::sample_location_scale`` and
``fastvae::sample_location_scale_backward`` take the family as an int (a
compile-time variant of one C++ and one Triton kernel pair) and the Philox
seed as a 0-d int64 tensor: the backward regenerates e and nothing of size
K x N x L is saved (only loc, log_scale and the seed).

The uniforms (docs/architecture.md, "The RNG contract"): element i takes the
folded word x of lane i % 4 of Philox counter i // 4 and maps it into the
open (0, 1) as u = (x + 1/2) / 2**31 and v = 1 - u = (2**31 - 1/2 - x) / 2**31,
each from the integer (float32: in float32 arithmetic, at most 1 - 2**-24), so
u and v lie in [2**-32, 1 - 2**-32] and the tails are clipped there
(docs/internals/latents.md gives each family's largest |e|).

sample_positive: reparameterized samples of the positive inverse-CDF latent
families with log q(z) from the noise that drew them, fused. Every family is
a transform of the Exp(1) variate t = -log u of the element's Philox uniform
(-log1p(-v) above 1/2, so the upper tail keeps its bits):

- "exponential" (log_rate): z = t / rate, log f = log rate - t;
- "weibull" (log_scale, log_concentration k): z = scale * t^(1/k),
  log f = log k - log scale + (1 - 1/k) log t - t;
- "kumaraswamy" (log_a, log_b) on (0, 1): z = (1 - u^(1/b))^(1/a) in log
  space, log z = log(m) / a with m = -expm1(-t / b) (log1p(-e^(-t/b)) above
  t / b = log 2), log f = log a + log b + (1 - 1/a) log m - t + t / b. log q is
  taken from log z, never from z, so it is finite for every a, b; z itself is
  exp(log z) clamped into [tiny, 1 - ulp] of the compute dtype (float32:
  [2**-126, 1 - 2**-24]), which a, b in [1e-3, 1e3] reach at the extreme
  uniforms (docs/internals/latents.md).

The custom ops ``fastvae::sample_positive`` and ``fastvae::sample_positive_backward``
take the family as an int (a compile-time variant of one C++ and one Triton
kernel pair), the two log parameters (exponential ignores the second) and the
Philox seed as a 0-d int64 tensor: the backward regenerates t and nothing of
size K x N x L is saved. The uniforms are sample_location_scale's (element i:
lane i % 4 of Philox counter i // 4, u = (x + 1/2) / 2**31 in [2**-32, 1 - 2**-32]):
t lies in [2.3e-10, 22.18], the tails clipped there.

sample_concrete: reparameterized relaxed-categorical (Concrete /
Gumbel-softmax) samples with log q(z) from the noise that drew them, fused;
the public function, the torch.library ops and their autograd
Function (whose double backward is refused by name).

For logits (..., L, C) and a temperature lambda, each latent draws C Exp(1)
variates t_c = -log u_c (-log1p(-v_c) above 1/2: the Gumbel g_c = -log t_c
keeps its upper tail) from C consecutive Philox uniforms, and

    y = (logits - log t) / lambda,   z = softmax(y) on the simplex,
    log q(z) = lgamma(C) + (C - 1) log lambda - sum_c log z_c
               + sum_c log t_c - C log sum_c t_c,

(the kernels subtract the latent's largest logit before dividing by lambda:
z and log q depend on the logits' differences only, and y stays finite for
logits of any size at any temperature),

the Concrete density (Maddison et al. 2017) written through the noise: its
sum_c pi_c z_c^-lambda is proportional to sum_c t_c, so log q is never taken
from z (which underflows as lambda -> 0). A -inf logit masks its category:
z_c = 0 and the density is the Concrete's on the other C' categories.
``hard=True`` is the straight-through estimator: the one-hot of argmax z
forward, the relaxed z's gradient backward (log q stays the relaxed one).

The custom ops ``fastvae::sample_concrete`` and ``fastvae::sample_concrete_backward``
take the logits (N, L, C), the temperature (N, L) (no gradient) and the Philox
seed as a 0-d int64 tensor: the backward regenerates t and nothing of size
K x N x L x C is saved. (On the CPU the relaxed z it returns, which the
decoder holds for its own backward anyway, is kept and read in place of
regenerating the noise, which there costs about as much as the rest: by the
eager C++ operator (the folder's torch_op.cpp) and, through the backward op's
``z``, by the compiled graph's C++ twin.) Element (k, n, l, c) uses the uniform at offset
k * N * L * C + n * L * C + l * C + c (sample_location_scale's uniforms).

Given a prior log-pmf ``log_p`` ((C,) or (L, C); the ops take it as (L, C)),
the same launches also give and differentiate the analytic categorical KL of
each row, kl = sum_l sum_c pi_c (log pi_c - log p_c), pi = softmax(logits): what
an ELBO against a OneHotCategorical (or a BinaryConcrete's Bernoulli) prior
optimizes, otherwise about 8 torch ops forward and as many backward. It has no
noise: one value per row of the batch, whatever the sample count. A learned
prior (log_p requiring grad) gets d log_p_c = -sum_rows grad_kl pi_c from two
torch ops in the Python Function's backward; the C++ operator serves the others.

A Gumbel-softmax VAE's step at small sizes is host-bound on a GPU, so eager
calls on the triton backend keep a plan per call signature (ConcretePlan,
below, as sample_normal_kl's): the same kernel variants on the same
arguments, launched through the compiled kernel's launcher directly.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ... import _backend, _validate, _value_checks
from ..._double_backward import _acc, not_twice, replay_inputs
from ..._families import KL_FAMILIES, LOCATION_SCALE_FAMILIES, POSITIVE_FAMILIES
from ..._launch import Launch, PlanCache, template
from ..._op import SEED_HIGH, define, draw_seed, flat, run, shaped
from ..._sampler import check_offsets, empty_z, gradient_samples, z_dtype
from ..family_kl.op import FamilyKL, prior_layout

# a declared use (docs/architecture.md, "Layers"): sample_positive's double backward's closed forms
from . import positive_terms


def _family_index_of(families: tuple[str, ...], family) -> int:
    """The kernels' index of a family name (its position in ``families``), or
    a ValueError naming the choices."""
    if family not in families:
        raise ValueError(f"family must be one of {families}, got {family!r}")
    return families.index(family)


class _FamilySamplerPlan:
    """The launches of one signature of a family sampler's own ops
    (FamilySampler._op_plan: the draw with log q at the training layout's
    offsets, and its backward): the general launchers' variants
    (kernels/sampler.py's family_forward_plan, family_backward_plan) on the
    same arguments, the backward's per variant with its partial sums and
    arrival counters (back at 0 after each launch), made at first use."""

    __slots__ = ("name", "N", "L", "K", "dtype", "device", "family", "z_like", "log_q_like", "d_like", "forward",
                 "fwd_ints", "_backward")

    def __init__(self, name: str, p0: Tensor, family: int, n_samples: int):
        (N, L), dtype, device = p0.shape, p0.dtype, p0.device
        self.name, self.N, self.L, self.K, self.dtype, self.device = name, N, L, n_samples, dtype, device
        self.family = family
        self.z_like = template((n_samples, N, L), dtype, device)
        self.log_q_like = template((n_samples, N), dtype, device)
        self.d_like = template((N, L), dtype, device)
        grid, meta = _backend.triton_module("sampler").family_forward_plan(n_samples, N, L, dtype, device, family,
                                                                           True, 0, N * L, L)
        self.forward = Launch(getattr(_backend.triton_module("sample_family"), f"_{name}_fwd_kernel"), grid, meta)
        self.fwd_ints = (0, N * L, L, N, n_samples * N, L)  # offset0, sample_stride, row_stride, N, K N, L
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *(b[0] for b in self._backward.values())]

    def backward(self, has_grad_z: bool, has_grad_log_q: bool, stop_score: bool) -> tuple:
        """(Launch, partial sums, counters, samples per split, splits) of one backward variant."""
        key = has_grad_z, has_grad_log_q, stop_score
        made = self._backward.get(key)
        if made is None:
            sampler, kern = _backend.triton_module("sampler"), _backend.triton_module("sample_family")
            grid, meta, blocks, splits, per_split = sampler.family_backward_plan(
                self.K, self.N, self.L, self.dtype, self.device, self.family, *key)
            part, counters = sampler.family_split_buffers(kern.SPLIT_SUMS[self.name], self.N, self.L, self.dtype,
                                                          self.device, blocks, splits)
            made = self._backward[key] = (Launch(getattr(kern, f"_{self.name}_bwd_kernel"), grid, meta), part,
                                          counters, per_split, splits)
        return made

    def run_forward(self, p0: Tensor, p1: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
        """(z, log q): the general launcher's one kernel."""
        z, log_q = empty(self.z_like), empty(self.log_q_like)
        self.forward(p0, p1, seed, z, log_q, *self.fwd_ints)
        return z, log_q

    def run_backward(self, grad_z: Tensor | None, grad_log_q: Tensor | None, p0: Tensor, p1: Tensor, seed: Tensor,
                     stop_score: bool) -> tuple[Tensor, Tensor]:
        """The two gradients: the general launcher's one kernel (an absent gradient's pointer is p0's)."""
        launch, part, counters, per_split, splits = self.backward(grad_z is not None, grad_log_q is not None,
                                                                  stop_score)
        d0, d1 = empty(self.d_like), empty(self.d_like)
        launch(p0 if grad_z is None else grad_z.contiguous(), p0 if grad_log_q is None else grad_log_q.contiguous(),
               p0, p1, seed, d0, d1, part, counters, self.N, self.L, self.N * self.L, self.K, per_split, splits)
        return d0, d1


class FamilySampler:
    """The front end of a family sampler ``name`` of two (N, L) parameters
    ``params`` (their gradients ``d<param>``), whose kernels <name>_forward and
    <name>_backward take the family as an int: the torch.library ops
    ``fastvae::<name>`` (z (K, N, L), log q (K, N)) and
    ``fastvae::<name>_backward`` (the two gradients), and the evaluation's
    strided draw (``at``)."""

    def __init__(self, name: str, params: tuple[str, str]):
        self.name = name
        self.params = params
        self.grads = tuple(f"d{p}" for p in params)
        self.kernels = f"{name}_forward", f"{name}_backward"
        a, b = params
        self.op = define(
            f"{name}(Tensor {a}, Tensor {b}, Tensor seed, int family, int n_samples) -> (Tensor, Tensor)",
            lambda p0, p1, seed, family, n_samples: self.draw(p0, p1, seed, family, n_samples),
            self._fake,
        )
        self.backward_op = define(
            f"{name}_backward(Tensor {a}, Tensor {b}, Tensor seed, int family, Tensor? grad_z,"
            " Tensor? grad_log_q, bool stop_score) -> (Tensor, Tensor)",
            self._backward,
            lambda p0, p1, seed, family, grad_z, grad_log_q, stop_score: (torch.empty_like(p0),
                                                                           torch.empty_like(p1)),
        )

    def draw(self, p0: Tensor, p1: Tensor, seed: Tensor, family: int, n_samples: int,
             offsets: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
        """(z (n_samples, N, L), log q (n_samples, N)) for p0, p1 (N, L) at the
        noise offsets offset0 + k * sample_stride + n * row_stride + l of
        ``offsets`` (offset0, sample_stride, row_stride), checked, or by
        default the training layout's, where a call _op_plan takes (the op's
        own, a compiled graph's node on CUDA) launches from its plan."""
        if offsets is None and (plan := self._op_plan(p0, p1, family, n_samples)) is not None:
            return plan.run_forward(p0, p1, seed)
        backend = _backend.backend_for(p0.device)
        dtype = _backend.compute_dtype(p0, p1)
        a = _backend.kernel_input(backend, flat(p0), dtype)
        b = _backend.kernel_input(backend, flat(p1), dtype)
        N, L = a.shape
        z_type = z_dtype(p0, p1)
        z = empty_z(backend, (n_samples, N, L), p0, dtype, z_type)
        log_q = _backend.empty_output((n_samples, N), like=p0, dtype=dtype)
        if offsets is None:
            offset0, sample_stride, row_stride = 0, N * L, L
        else:
            if z.numel() == 0:
                return _backend.in_dtype(z, z_type), log_q.zero_()
            offset0, sample_stride, row_stride = offsets
            check_offsets(offset0, sample_stride, row_stride,
                          offset0 + (n_samples - 1) * sample_stride + (N - 1) * row_stride + L - 1)
        p0_name, p1_name = self.params
        _backend.launch(backend, self.kernels[0], z.numel(), **{
            p0_name: a, p1_name: b, "seed": seed, "family": family, "offset0": offset0,
            "sample_stride": sample_stride, "row_stride": row_stride, "z": z, "log_q": log_q})
        return _backend.in_dtype(z, z_type), log_q

    def _backward(self, p0: Tensor, p1: Tensor, seed: Tensor, family: int, grad_z: Tensor | None,
                  grad_log_q: Tensor | None, stop_score: bool) -> tuple[Tensor, Tensor]:
        """The two gradients (N, L) from grad_z (K, N, L) and grad_log_q (K, N)
        (None: no gradient); from a plan as the draw's."""
        grads = [g for g in (grad_z, grad_log_q) if g is not None]
        if grads and all(g.dtype is p0.dtype for g in grads) and (
                plan := self._op_plan(p0, p1, family, gradient_samples(grad_z, grad_log_q))) is not None:
            return plan.run_backward(grad_z, grad_log_q, p0, p1, seed, stop_score)
        backend = _backend.backend_for(p0.device)
        dtype = _backend.compute_dtype(p0, p1)
        a = _backend.kernel_input(backend, flat(p0), dtype)
        b = _backend.kernel_input(backend, flat(p1), dtype)
        grad_z, grad_log_q = (_backend.kernel_input(backend, g, dtype) for g in (grad_z, grad_log_q))
        N, L = a.shape
        K = gradient_samples(grad_z, grad_log_q)
        da = _backend.empty_output((N, L), like=a)
        db = _backend.empty_output((N, L), like=b)
        _backend.launch(
            backend, self.kernels[1], max(K, 1) * N * L,
            grad_z=None if grad_z is None else grad_z.reshape(K, N, L).contiguous(),
            grad_log_q=None if grad_log_q is None else grad_log_q.reshape(K, N).contiguous(),
            **{self.params[0]: a, self.params[1]: b}, seed=seed, family=family, stop_score=stop_score,
            **{self.grads[0]: da, self.grads[1]: db},
        )
        return _backend.in_dtype(da, p0.dtype), _backend.in_dtype(db, p1.dtype)

    def _op_plan(self, p0: Tensor, p1: Tensor, family: int, n_samples: int) -> _FamilySamplerPlan | None:
        """The plan of a call of the sampler's ops themselves at the training
        layout's offsets (a compiled graph's nodes: p0, p1 (N, L) as the
        Function lays them out), or None (the general launch, which on CUDA
        pays the launch geometry and Triton's binding of the arguments at every
        call): on the triton backend, outside autocast, contiguous float32 or
        float64 parameters of one dtype and device, N L > 0, n_samples >= 1."""
        device = p0.device
        if (not ENABLED or not _backend.op_plans_serve(device) or p0.dtype not in _DTYPES or p0.dim() != 2
                or p0.numel() == 0 or n_samples < 1 or p1.dtype is not p0.dtype or p1.shape != p0.shape
                or p1.device != device or not p0.is_contiguous() or not p1.is_contiguous()):
            return None
        key = (self.name, "log q", p0.shape, p0.dtype, device, family, n_samples)
        try:
            return OP_PLANS[key]
        except KeyError:
            return OP_PLANS.store(key, _FamilySamplerPlan(self.name, p0, family, n_samples))

    @staticmethod
    def _fake(p0: Tensor, p1: Tensor, seed: Tensor, family: int, n_samples: int):
        dtype = _backend.compute_dtype(p0, p1)
        return (p0.new_empty((n_samples, *p0.shape), dtype=z_dtype(p0, p1)),
                p0.new_empty((n_samples, *p0.shape[:-1]), dtype=dtype))

    def at(self, family: int, p0: Tensor, p1: Tensor, seed: Tensor, n_samples: int, *, offset0: int,
           sample_stride: int, row_stride: int) -> tuple[Tensor, Tensor]:
        """(z (n_samples, N, L), log q (n_samples, N)) for p0, p1 (N, L) at the
        noise offsets offset0 + k * sample_stride + n * row_stride + l: the
        evaluation's example-major layout, drawn where it is used. No gradient."""
        return self.draw(p0.detach(), p1.detach(), seed, family, n_samples, (offset0, sample_stride, row_stride))

    def function(self, name: str, double_backward, stand_in_second: int | None = None) -> type:
        """The autograd Function ``name`` of the sampler: (z (K, ..., L),
        log q (K, ...)) of (p0, p1, seed, family, n_samples, stop_score),
        saving the parameters as (N, L) and the seed only. ``stop_score``
        (STL / DReG): log q's gradient reaches the parameters only along z.
        ``double_backward(grad_z, grad_log_q, stop_score, family, p0, p1, seed,
        n_samples, shape)`` gives the gradients with a graph (create_graph=True);
        the family ``stand_in_second``, if any, reads no second parameter (it
        gets no gradient)."""
        sampler = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, p0, p1, seed, family, n_samples, stop_score):
                a, b = flat(p0), flat(p1)
                z, log_q = run(sampler.op, a, b, seed, family, n_samples)
                ctx.save_for_backward(a, b, seed, p0, p1)
                ctx.set_materialize_grads(False)
                ctx.shape, ctx.family, ctx.n_samples, ctx.stop_score = p0.shape, family, n_samples, stop_score
                return shaped(z, (n_samples, *p0.shape)), shaped(log_q, (n_samples, *p0.shape[:-1]))

            @staticmethod
            def backward(ctx, grad_z, grad_log_q):
                if grad_z is None and grad_log_q is None:
                    return None, None, None, None, None, None
                a, b, seed, p0, p1 = ctx.saved_tensors
                K = ctx.n_samples
                if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
                    d0, d1 = double_backward(grad_z, grad_log_q, bool(ctx.stop_score), ctx.family, p0, p1, seed,
                                             K, ctx.shape)
                else:
                    N, L = a.shape
                    d0, d1 = run(sampler.backward_op, a, b, seed, ctx.family,
                                 None if grad_z is None else shaped(grad_z, (K, N, L)),
                                 None if grad_log_q is None else shaped(grad_log_q, (K, N)), bool(ctx.stop_score))
                    d0, d1 = shaped(d0, ctx.shape), shaped(d1, ctx.shape)
                if ctx.family == stand_in_second:
                    d1 = None
                return d0, d1, None, None, None, None

        Function.__name__ = Function.__qualname__ = name
        self.autograd = Function
        return Function

    def unchecked(self, family: int, p0: Tensor, p1: Tensor, n_samples: int, stop_score: bool,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(z (K, ..., L), log q (K, ...)) through the autograd Function, for
        arguments the caller has validated (the latents' records)."""
        return self.autograd.apply(p0, p1, draw_seed(p0.device, generator), family, n_samples, stop_score)

    def sample(self, family: int, p0: Tensor, p1: Tensor, n_samples: int | None,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The public function's draw after its checks of the family and the
        parameters: (z, log q), one sample shaped like p0 for n_samples None,
        else K of them, (K, ..., L) and (K, ...)."""
        K = 1 if n_samples is None else _validate.sample_count("n_samples", n_samples, p0.numel(), p0)
        z, log_q = self.autograd.apply(p0, p1, draw_seed(p0.device, generator), family, K, False)
        return (z.squeeze(0), log_q.squeeze(0)) if n_samples is None else (z, log_q)  # views backward as views


class _LocationScaleKLPlan:
    """The launches of one signature of the location-scale sampler's fused
    draw and KL ops (FamilyKLSampler._op_plan): the forward kernel's, and a
    backward's per variant with its partial sums and arrival counters (the
    counters are back at 0 after each launch, as _plan.FamilySamplePlan's)."""

    __slots__ = ("kern", "N", "L", "K", "dtype", "device", "family", "kl_family", "p_shared", "z_like",
                 "kl_like", "d_like", "forward", "fwd_ints", "_backward")

    def __init__(self, p0: Tensor, family: int, kl_family: int, n_samples: int, p_shared: bool):
        kern = self.kern = _backend.triton_module("sample_family")
        (N, L), dtype, device = p0.shape, p0.dtype, p0.device
        self.N, self.L, self.K, self.dtype, self.device = N, L, n_samples, dtype, device
        self.family, self.kl_family, self.p_shared = family, kl_family, p_shared
        self.z_like = template((n_samples, N, L), dtype, device)
        self.kl_like = template((N,), dtype, device)
        self.d_like = template((N, L), dtype, device)
        grid, meta = kern.kl_forward_plan(n_samples, N, L, dtype, device, family, kl_family, p_shared)
        self.forward = Launch(kern._sample_location_scale_kl_fwd_kernel, grid, meta)
        self.fwd_ints = (N * L, N, n_samples * N, L)
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *(b[0] for b in self._backward.values())]

    def backward(self, K: int, has_grad_z: bool, has_grad_kl: bool, has_dp: bool) -> tuple:
        """(Launch, partial sums, counters, samples per split, splits) of one
        backward variant over K samples (0 without grad_z), made at first use."""
        key = K, has_grad_z, has_grad_kl, has_dp
        made = self._backward.get(key)
        if made is None:
            kern = self.kern
            grid, meta, blocks, splits, per_split = kern.kl_backward_plan(
                K, self.N, self.L, self.dtype, self.device, self.family, self.kl_family, self.p_shared,
                has_grad_z, has_grad_kl, has_dp)
            part, counters = _backend.triton_module("sampler").family_split_buffers(
                2, self.N, self.L, self.dtype, self.device, blocks, splits)
            made = self._backward[key] = (Launch(kern._sample_location_scale_kl_bwd_kernel, grid, meta), part,
                                          counters, per_split, splits)
        return made

    def run_forward(self, p0: Tensor, p1: Tensor, prior0: Tensor, prior1: Tensor, seed: Tensor):
        """(z, kl): the general launcher's one kernel."""
        z, kl = empty(self.z_like), empty(self.kl_like)
        self.forward(p0, p1, prior0, prior1, seed, z, kl, *self.fwd_ints)
        return z, kl

    def run_backward(self, grad_z: Tensor | None, grad_kl: Tensor | None, p0: Tensor, p1: Tensor, prior0: Tensor,
                     prior1: Tensor, seed: Tensor, need_dp: bool) -> list[Tensor]:
        """[d loc, d log_scale] (+ the prior's with need_dp): the general launcher's one kernel."""
        K = 0 if grad_z is None else grad_z.shape[0]
        run_backward, part, counters, per_split, splits = self.backward(K, grad_z is not None, grad_kl is not None,
                                                                        need_dp)
        grads = [empty(self.d_like) for _ in range(4 if need_dp else 2)]
        d_loc, d_ls = grads[:2]
        run_backward(p0 if grad_z is None else grad_z.contiguous(), p0 if grad_kl is None else grad_kl.contiguous(),
                     p0, p1, prior0, prior1, seed, d_loc, d_ls, *(grads[2:] if need_dp else (d_loc, d_ls)), part,
                     counters, self.N, self.L, self.N * self.L, K, per_split, splits)
        return grads


class _PositiveKLPlan:
    """The launches of one signature of the positive sampler's fused draw and
    KL ops (FamilyKLSampler._op_plan): the general launchers'
    (sample_positive_kl_forward, _backward in triton.py) two kernels each
    way, the sampler's and family_kl's, on the same arguments: the draw's
    forward, family_kl's forward, the sampler's backward (its partial sums
    and arrival counters, back at 0 after each launch) and family_kl's
    backward adding q's gradients to the sampler's. The exponential reads its
    log-rates alone: its second parameters are stand-ins, as the general
    launchers take them."""

    __slots__ = ("N", "L", "K", "dtype", "device", "family", "exponential", "p_shared", "kl_kern", "kl_family",
                 "z_like", "kl_like", "d_like", "forward", "kl_forward", "fwd_ints", "_backward", "_kl_backward")

    def __init__(self, p0: Tensor, family: int, kl_family: int, n_samples: int, p_shared: bool):
        kern = _backend.triton_module("sample_family")
        self.kl_kern = _backend.triton_module("family_kl")
        (N, L), dtype, device = p0.shape, p0.dtype, p0.device
        self.N, self.L, self.K, self.dtype, self.device = N, L, n_samples, dtype, device
        self.family, self.kl_family = family, kl_family
        self.exponential, self.p_shared = kl_family == _EXPONENTIAL_KL, p_shared
        self.z_like = template((n_samples, N, L), dtype, device)
        self.kl_like = template((N,), dtype, device)
        self.d_like = template((N, L), dtype, device)
        grid, meta = _backend.triton_module("sampler").family_forward_plan(n_samples, N, L, dtype, device, family,
                                                                           False, 0, N * L, L)
        self.forward = Launch(kern._sample_positive_fwd_kernel, grid, meta)
        self.fwd_ints = (0, N * L, L, N, n_samples * N, L)  # offset0, sample_stride, row_stride, N, K N, L
        grid, meta = self.kl_kern.forward_plan(N, L, dtype, kl_family, p_shared, True)
        self.kl_forward = Launch(self.kl_kern._family_kl_fwd_kernel, grid, meta)
        self._backward = None
        self._kl_backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, self.kl_forward, *(() if self._backward is None else self._backward[:1]),
                *self._kl_backward.values()]

    def sampler_backward(self) -> tuple:
        """(Launch, partial sums, counters, samples per split, splits) of the
        sampler's backward from grad_z: made at the first backward, kept."""
        if self._backward is None:
            sampler = _backend.triton_module("sampler")
            grid, meta, blocks, splits, per_split = sampler.family_backward_plan(
                self.K, self.N, self.L, self.dtype, self.device, self.family, True, False, False)
            part, counters = sampler.family_split_buffers(2, self.N, self.L, self.dtype, self.device, blocks, splits)
            kernel = _backend.triton_module("sample_family")._sample_positive_bwd_kernel
            self._backward = (Launch(kernel, grid, meta), part, counters, per_split, splits)
        return self._backward

    def kl_backward(self, need_dp: bool) -> Launch:
        """family_kl's backward adding q's gradients to the sampler's, with the
        prior's (``need_dp``) or without: made at first use, kept."""
        launch = self._kl_backward.get(need_dp)
        if launch is None:
            grid, meta = self.kl_kern.backward_plan(self.N, self.L, self.dtype, self.kl_family, self.p_shared, True,
                                                    need_dp, True)
            launch = self._kl_backward[need_dp] = Launch(self.kl_kern._family_kl_bwd_kernel, grid, meta)
        return launch

    def _kl_args(self, p0: Tensor, p1: Tensor, prior0: Tensor, prior1: Tensor) -> tuple:
        """family_kl's (q_loc, q_log_param, p_loc, p_log_param): the exponential's log-rates in both places."""
        if self.exponential:
            return p0, p0, prior0, prior0
        return p0, p1, prior0, prior1

    def run_forward(self, p0: Tensor, p1: Tensor, prior0: Tensor, prior1: Tensor, seed: Tensor):
        """(z, kl): the draw (no log q: z stands in for it), then the KL summed over L."""
        z, kl = empty(self.z_like), empty(self.kl_like)
        self.forward(p0, p1, seed, z, z, *self.fwd_ints)
        self.kl_forward(*self._kl_args(p0, p1, prior0, prior1), kl, self.N, self.L)
        return z, kl

    def run_backward(self, grad_z: Tensor | None, grad_kl: Tensor | None, p0: Tensor, p1: Tensor, prior0: Tensor,
                     prior1: Tensor, seed: Tensor, need_dp: bool) -> list[Tensor]:
        """[d log_p0, d log_p1] (+ the prior's with need_dp), as
        sample_positive_kl_backward writes them: the sampler's (0 without
        grad_z), then family_kl's added (the prior's 0 without grad_kl, and
        the exponential's second 0)."""
        grads = [empty(self.d_like) for _ in range(4 if need_dp else 2)]
        d0, d1 = grads[:2]
        if grad_z is not None:
            run, part, counters, per_split, splits = self.sampler_backward()
            run(grad_z.contiguous(), p0, p0, p1, seed, d0, d1, part, counters, self.N, self.L, self.N * self.L,
                self.K, per_split, splits)
        else:
            d0.zero_()
            d1.zero_()
        if need_dp and (grad_kl is None or self.exponential):
            grads[2].zero_()
            grads[3].zero_()
        if grad_kl is None:
            return grads
        # the exponential's kernel reads and writes no location: its pointers are the log-rates'
        dq = (d0, d0) if self.exponential else (d0, d1)
        if not need_dp:
            dp = dq  # stand-ins the kernel's variant never writes
        else:
            dp = (grads[2], grads[2]) if self.exponential else (grads[2], grads[3])
        self.kl_backward(need_dp)(grad_kl.contiguous(), *self._kl_args(p0, p1, prior0, prior1), *dq, *dp, self.N,
                                  self.L)
        return grads


class FamilyKLSampler:
    """The front end of a family sampler's ELBO draw fused with family_kl's
    closed form (its kernels <name>_kl_forward and <name>_kl_backward, named
    as _spec.family_sampler_kl_kernels names them): the torch.library ops
    ``fastvae::<name>_kl`` (z (K, N, L), the KL summed over L (N,)) and
    ``fastvae::<name>_kl_backward`` (q's gradients, the sampler's plus the
    KL's, then the prior's per row where asked), and their autograd Function.

    ``sampler``: the FamilySampler (its Function replays a create_graph
    backward); ``kl_apply``, ``prior_layout``: family_kl's Function's apply
    and its prior layout (the ops layer above passes them in);
    ``kl_parameters(kl_family, p0, p1, prior0, prior1)``: FamilyKL's
    (q_loc, q_log_param, p_loc, p_log_param) of the sampler's parameters."""

    def __init__(self, sampler: FamilySampler, kl_apply, prior_layout, kl_parameters):
        self.sampler, self.kl_apply = sampler, kl_apply
        self.prior_layout, self.kl_parameters = prior_layout, kl_parameters
        name, (a, b) = sampler.name, sampler.params
        self.kernels = f"{name}_kl_forward", f"{name}_kl_backward"
        self.names = (a, b, f"prior_{a}", f"prior_{b}")
        self.op = define(
            f"{name}_kl(Tensor {a}, Tensor {b}, Tensor prior_{a}, Tensor prior_{b}, Tensor seed, int family,"
            " int kl_family, int n_samples) -> (Tensor, Tensor)",
            self._forward,
            lambda p0, p1, prior0, prior1, seed, family, kl_family, n_samples: (
                p0.new_empty((n_samples, *p0.shape)), p0.new_empty(p0.shape[:1])),
        )
        self.backward_op = define(
            f"{name}_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor {a}, Tensor {b}, Tensor prior_{a},"
            f" Tensor prior_{b}, Tensor seed, int family, int kl_family, bool need_dp) -> Tensor[]",
            self._backward,
            lambda grad_z, grad_kl, p0, p1, prior0, prior1, seed, family, kl_family, need_dp: [
                torch.empty_like(p0) for _ in range(4 if need_dp else 2)],
        )

    def _forward(self, p0: Tensor, p1: Tensor, prior0: Tensor, prior1: Tensor, seed: Tensor, family: int,
                 kl_family: int, n_samples: int) -> tuple[Tensor, Tensor]:
        """(z (n_samples, N, L), kl (N,)) for q's (N, L) and the prior's (L,) or
        (N, L), one float32 or float64 dtype: the draw at the training layout's
        offsets and family_kl's closed form summed over L."""
        if (plan := self._op_plan(p0, p1, prior0, prior1, family, kl_family, n_samples)) is not None:
            return plan.run_forward(p0, p1, prior0, prior1, seed)
        backend = _backend.backend_for(p0.device)
        N, L = p0.shape
        z = _backend.empty_output((n_samples, N, L), like=p0)
        kl = _backend.empty_output((N,), like=p0)
        _backend.launch(backend, self.kernels[0], z.numel(), **dict(zip(self.names, (p0, p1, prior0, prior1))),
                        seed=seed, family=family, kl_family=kl_family, z=z, kl=kl)
        return z, kl

    def _backward(self, grad_z: Tensor | None, grad_kl: Tensor | None, p0: Tensor, p1: Tensor, prior0: Tensor,
                  prior1: Tensor, seed: Tensor, family: int, kl_family: int, need_dp: bool) -> list[Tensor]:
        """[d p0, d p1] (N, L), the sampler's plus the KL's, then (need_dp) the
        prior's per row (N, L), whatever its layout."""
        if (grad_kl is not None or not need_dp) and (grad_z is not None or grad_kl is not None) and all(
                g is None or g.dtype is p0.dtype for g in (grad_z, grad_kl)):
            K = 0 if grad_z is None else grad_z.shape[0]
            plan = self._op_plan(p0, p1, prior0, prior1, family, kl_family, max(K, 1))
            if plan is not None:
                return plan.run_backward(grad_z, grad_kl, p0, p1, prior0, prior1, seed, need_dp)
        backend = _backend.backend_for(p0.device)
        grads = [_backend.empty_output(p0.shape, like=p0) for _ in range(4 if need_dp else 2)]
        grads_by_name = dict(zip((f"d{n}" for n in self.names), grads + [None, None]))
        _backend.launch(backend, self.kernels[1], p0.numel() * (1 if grad_z is None else grad_z.shape[0]),
                        grad_z=None if grad_z is None else grad_z.contiguous(),
                        grad_kl=None if grad_kl is None else grad_kl.contiguous(),
                        **dict(zip(self.names, (p0, p1, prior0, prior1))), seed=seed, family=family,
                        kl_family=kl_family, **grads_by_name)
        return grads

    def _op_plan(self, p0: Tensor, p1: Tensor, prior0: Tensor, prior1: Tensor, family: int, kl_family: int,
                 n_samples: int) -> _LocationScaleKLPlan | _PositiveKLPlan | None:
        """The plan of a call of the sampler's fused ops themselves (a
        compiled graph's nodes: q's (N, L) and the prior's (L,) or (N, L) as
        the Function lays them out), or None (the general launch): on the
        triton backend, outside autocast, contiguous float32 or float64
        tensors of one dtype and device, N L > 0, n_samples >= 1. The
        launches are the general launchers' variants on the same arguments
        (the location-scale sampler's one kernel each way, the positive
        sampler's and family_kl's two): the same bits."""
        device = p0.device
        if (not ENABLED or not _backend.op_plans_serve(device)
                or p0.dtype not in _DTYPES or p0.dim() != 2 or p0.numel() == 0 or n_samples < 1
                or prior1.dim() not in (1, 2)
                or any(t.dtype is not p0.dtype or t.device != device or not t.is_contiguous()
                       for t in (p0, p1, prior0, prior1))
                or p1.shape != p0.shape or prior0.shape != prior1.shape
                or prior1.shape != (p0.shape if prior1.dim() == 2 else p0.shape[1:])):
            return None
        key = (self.sampler.name, p0.shape, p0.dtype, device, prior1.dim(), family, kl_family, n_samples)
        try:
            return OP_PLANS[key]
        except KeyError:
            cls = _LocationScaleKLPlan if self.sampler.name == "sample_location_scale" else _PositiveKLPlan
            return OP_PLANS.store(key, cls(p0, family, kl_family, n_samples, prior1.dim() == 1))

    def function(self, name: str) -> type:
        """The autograd Function ``name``: (z (K, ..., L), KL(q || p) (...)) of
        (p0, p1, prior0, prior1, seed, family, kl_family, n_samples), the
        prior's each broadcastable to q's shape, drawn and computed in one
        pass each way: z is the sampler's Function's, the KL FamilyKL's, the
        gradients their sum, bit for bit. Saves q and the prior in the
        kernels' layout and the seed; a create_graph backward replays the two
        Functions."""
        fused = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, p0, p1, prior0, prior1, seed, family, kl_family, n_samples):
                shape = p0.shape
                a, b = flat(p0), flat(p1)
                _, _, p_loc, p_lp = fused.kl_parameters(kl_family, None, None, prior0, prior1)
                pa, pb = fused.prior_layout(p_loc, p_lp, shape)
                if pa is None:  # a family with no location: its one prior parameter twice (the kernels read one)
                    pa = pb
                z, kl = run(fused.op, a, b, pa, pb, seed, family, kl_family, n_samples)
                ctx.save_for_backward(a, b, pa, pb, seed, p0, p1, prior0, prior1)
                ctx.set_materialize_grads(False)
                ctx.family, ctx.kl_family, ctx.n_samples, ctx.shape = family, kl_family, n_samples, shape
                return shaped(z, (n_samples, *shape)), shaped(kl, shape[:-1])

            @staticmethod
            def backward(ctx, grad_z, grad_kl):
                none = (None,) * 4  # seed, family, kl_family, n_samples
                if grad_z is None and grad_kl is None:
                    return (None,) * 8
                a, b, pa, pb, seed, *inputs = ctx.saved_tensors
                needs, K, shape = ctx.needs_input_grad[:4], ctx.n_samples, ctx.shape
                if torch.is_grad_enabled():  # create_graph=True: the two Functions, whose gradients have a graph
                    with torch.enable_grad():
                        inputs = replay_inputs(*inputs)
                        z, _ = fused.sampler.autograd.apply(inputs[0], inputs[1], seed, ctx.family, K, False)
                        kl = fused.kl_apply(ctx.kl_family, True, *fused.kl_parameters(ctx.kl_family, *inputs))
                    outs = [(o, g) for o, g in ((z, grad_z), (kl, grad_kl)) if g is not None]
                    wanted = [t for t, need in zip(inputs, needs) if need]
                    got = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs],
                                                   create_graph=True, allow_unused=True))
                    grads = [next(got) if need else None for need in needs]
                    return (*(torch.zeros_like(t) if need and d is None else d
                              for t, d, need in zip(inputs, grads, needs)), *none)
                N, L = a.shape
                need_dp = grad_kl is not None and (needs[2] or needs[3])
                grads = run(fused.backward_op, None if grad_z is None else shaped(grad_z, (K, N, L)),
                            None if grad_kl is None else shaped(grad_kl, (N,)), a, b, pa, pb, seed, ctx.family,
                            ctx.kl_family, need_dp)
                out = [shaped(grads[0], shape), shaped(grads[1], shape), None, None]
                if need_dp:  # the prior's, summed back to its shape
                    out[2:] = [shaped(d, shape).sum_to_size(t.shape) for d, t in zip(grads[2:], inputs[2:])]
                return (*(d if need else None for d, need in zip(out, needs)), *none)

        Function.__name__ = Function.__qualname__ = name
        self.autograd = Function
        return Function

    def unchecked(self, family: int, kl_family: int, p0: Tensor, p1: Tensor, prior0: Tensor, prior1: Tensor,
                  n_samples: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(z (K, ..., L), KL (...)) through the autograd Function, for
        arguments the caller has validated (the latents' records): every
        tensor float32 or float64, one dtype and device, the prior's
        broadcastable to q's shape."""
        return self.autograd.apply(p0, p1, prior0, prior1, draw_seed(p0.device, generator), family, kl_family,
                                   n_samples)


# -- sample_location_scale ---------------------------------------------------------


def location_scale_index(family) -> int:
    """The kernels' index of a family name, or a ValueError naming the choices."""
    return _family_index_of(LOCATION_SCALE_FAMILIES, family)


LOCATION_SCALE_SAMPLER = FamilySampler("sample_location_scale", ("loc", "log_scale"))
sample_location_scale_op = LOCATION_SCALE_SAMPLER.op
sample_location_scale_backward_op = LOCATION_SCALE_SAMPLER.backward_op


def _score(family: int, e: Tensor) -> Tensor:
    """psi(e) = d log f / de of the standardized family, from e (the double
    backward's closed form; the kernels take it from the uniforms)."""
    if family == 0:
        return torch.zeros_like(e)
    if family == 1:
        return -torch.sign(e)
    if family == 2:
        return -torch.tanh(0.5 * e)
    if family == 3:
        return torch.expm1(-e)
    return -2.0 * e / (1.0 + e * e)


def _location_scale_double_backward(grad_z, grad_log_q, stop_score, family, loc, log_scale, seed, n_samples, shape):
    """The gradients as differentiable torch ops (create_graph=True): e comes
    from the sampling op itself at loc = 0, log_scale = 0 (z is e bit for bit)
    and enters as a constant; the same closed forms as the kernels."""
    acc = _backend.compute_dtype(loc, log_scale)
    zero = torch.zeros(flat(loc).shape, dtype=acc, device=loc.device)
    with torch.no_grad():
        e = run(sample_location_scale_op, zero, zero, seed, family, n_samples)[0].to(acc)
    e = e.reshape(n_samples, *shape)
    ls = _acc(log_scale)
    s = torch.exp(ls)
    dloc = torch.zeros_like(s)
    dls = torch.zeros_like(s)
    if grad_z is not None:
        gz = _acc(grad_z).reshape(n_samples, *shape)
        dloc = dloc + gz.sum(0)
        dls = dls + s * (gz * e).sum(0)
    if grad_log_q is not None:
        gq = _acc(grad_log_q).reshape(n_samples, *shape[:-1]).unsqueeze(-1)
        if stop_score:
            psi = _score(family, e)
            score = (gq * psi).sum(0)
            dloc = dloc + torch.where(score == 0, 0.0, score * torch.exp(-ls))
            dls = dls + (gq * psi * e).sum(0)
        else:
            dls = dls - gq.sum(0).expand_as(dls)
    return dloc.to(loc.dtype), dls.to(log_scale.dtype)


# Autograd of fastvae::sample_location_scale: (z (K, ..., L), log q (K, ...)), saving
# loc and log_scale as (N, L) and the seed only; with stop_score (STL / DReG)
# d/dz log q = psi(e) / scale from the regenerated e.
SampleLocationScale = LOCATION_SCALE_SAMPLER.function("SampleLocationScale", _location_scale_double_backward)


def sample_location_scale(
    family: str,
    loc: Tensor,
    log_scale: Tensor,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized samples of a location-scale family and their log-density.

    Args:
        family: "uniform" (on (loc, loc + scale)), "laplace", "logistic",
            "gumbel" or "cauchy".
        loc, log_scale: (..., L) on one device; scale = exp(log_scale).
        n_samples: None for one sample shaped like loc; an int K >= 1 for (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from.

    Returns:
        (z, log_q): z = loc + exp(log_scale) * F^-1(u), and log q(z) summed
        over L (shape (...) or (K, ...)) from the e that drew z. Both are
        differentiable in loc and log_scale; the noise is regenerated in the
        backward, never stored.
    """
    index = location_scale_index(family)
    _validate.float_tensors(loc=loc, log_scale=log_scale)
    _validate.event_dim("loc", loc)
    _validate.same_shape(loc=loc, log_scale=log_scale)
    return LOCATION_SCALE_SAMPLER.sample(index, loc, log_scale, n_samples, generator)


# (z (K, ..., L), log q (K, ...)) of (family, loc, log_scale, n_samples, stop_score, generator)
# for arguments the caller has validated (the latents' records)
sample_location_scale_unchecked = LOCATION_SCALE_SAMPLER.unchecked


# (z (n_samples, N, L), log q (n_samples, N)) for loc, log_scale (N, L) at the noise offsets
# offset0 + k * sample_stride + n * row_stride + l: the evaluation's layout. No gradient.
location_scale_at = LOCATION_SCALE_SAMPLER.at


# -- the draw with the log-ratio to the family's own prior (cpp) ---------------------

LOG_2 = math.log(2.0)
LOG_PI = math.log(math.pi)


def prior_log_density(family: int, z: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """log p(z) summed over L for a prior of the location-scale family
    ``family`` with parameters (a, b) broadcasting against z (..., L): its
    location and scale, or the uniform's low and high (-inf outside
    [low, high), as torch's). Torch ops: the fused ratio's oracle and its
    create_graph replay."""
    if family == 0:
        inside = (z >= a) & (z < b)
        return (torch.where(inside, 0.0, -math.inf) - torch.log(b - a)).sum(-1)
    t = (z - a) / b
    if family == 1:
        log_f = -t.abs() - LOG_2
    elif family == 2:
        a_t = t.abs()  # the density is even; torch's softplus drops log1p(e^-x) above 20
        log_f = -a_t - 2.0 * torch.log1p(torch.exp(-a_t))
    elif family == 3:
        log_f = -t - torch.exp(-t)
    else:
        log_f = -LOG_PI - torch.log1p(t * t)
    return (log_f - torch.log(b)).sum(-1)


class SampleLocationScaleRatio(torch.autograd.Function):
    """(z (K, ..., L), log q(z) - log p(z) (K, ...)) of a location-scale
    posterior (loc, log_scale (..., L)) and a prior of its own family with
    parameters (prior_a, prior_b) of shape (L,) (location and scale, or the
    uniform's low and high), in one pass each way: sample_location_scale's
    C++ kernels with their prior_a, prior_b options, which take the prior's
    log-density and its gradients in the draw's own loops. z is
    sample_location_scale's at the same seed, bit for bit. ``stop_score``
    stops log q's parameters' score alone (STL / DReG): z's path, through
    log q and log p, and the prior's gradients are kept. The cpp backend's,
    float32 or float64 tensors of one dtype, N L > 0: the caller checks. A
    create_graph backward replays sample_location_scale's Function and
    prior_log_density."""

    @staticmethod
    def forward(ctx, loc, log_scale, prior_a, prior_b, seed, family, n_samples, stop_score):
        a, b = flat(loc), flat(log_scale)
        pa, pb = prior_a.contiguous(), prior_b.contiguous()
        N, L = a.shape
        z = _backend.empty_output((n_samples, N, L), like=a)
        ratio = _backend.empty_output((n_samples, N), like=a)
        _backend.launch_cpp("sample_location_scale_forward", z.numel(), {"prior_a": pa, "prior_b": pb}, loc=a,
                            log_scale=b, seed=seed, family=family, offset0=0, sample_stride=N * L, row_stride=L,
                            z=z, log_q=ratio)
        ctx.save_for_backward(a, b, pa, pb, seed, loc, log_scale, prior_a, prior_b)
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.family, ctx.n_samples, ctx.stop_score = loc.shape, family, n_samples, stop_score
        return z.view(n_samples, *loc.shape), ratio.view(n_samples, *loc.shape[:-1])

    @staticmethod
    def backward(ctx, grad_z, grad_ratio):
        none = (None,) * 4  # seed, family, n_samples, stop_score
        if grad_z is None and grad_ratio is None:
            return (None,) * 8
        a, b, pa, pb, seed, *inputs = ctx.saved_tensors
        needs, K, shape = ctx.needs_input_grad[:4], ctx.n_samples, ctx.shape
        if torch.is_grad_enabled():  # create_graph=True: the composition's graph
            with torch.enable_grad():
                inputs = replay_inputs(*inputs)
                z, log_q = SampleLocationScale.apply(inputs[0], inputs[1], seed, ctx.family, K, ctx.stop_score)
                ratio = log_q - prior_log_density(ctx.family, z, inputs[2], inputs[3])
            outs = [(o, g) for o, g in ((z, grad_z), (ratio, grad_ratio)) if g is not None]
            wanted = [t for t, need in zip(inputs, needs) if need]
            got = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], create_graph=True,
                                           allow_unused=True))
            grads = [next(got) if need else None for need in needs]
            return (*(torch.zeros_like(t) if need and d is None else d for t, d, need in zip(inputs, grads, needs)),
                    *none)
        N, L = a.shape
        need_dp = needs[2] or needs[3]
        dloc, dls = _backend.empty_output((N, L), like=a), _backend.empty_output((N, L), like=a)
        options = {"prior_a": pa, "prior_b": pb}
        if need_dp:
            options.update(dprior_a=_backend.empty_output((N, L), like=a),
                           dprior_b=_backend.empty_output((N, L), like=a))
        _backend.launch_cpp(
            "sample_location_scale_backward", K * N * L, options,
            grad_z=None if grad_z is None else grad_z.to(a.dtype).reshape(K, N, L).contiguous(),
            grad_log_q=None if grad_ratio is None else grad_ratio.to(a.dtype).reshape(K, N).contiguous(),
            loc=a, log_scale=b, seed=seed, family=ctx.family, stop_score=bool(ctx.stop_score), dloc=dloc,
            dlog_scale=dls)
        out = [dloc.view(shape), dls.view(shape), None, None]
        if need_dp:  # per element, summed over the rows here
            out[2:] = [options["dprior_a"].sum(0), options["dprior_b"].sum(0)]
        return (*(d if need else None for d, need in zip(out, needs)), *none)


def location_scale_ratio_at(family: int, loc: Tensor, log_scale: Tensor, prior_a: Tensor, prior_b: Tensor,
                            seed: Tensor, n_samples: int, *, offset0: int, sample_stride: int,
                            row_stride: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, N, L), log q(z) - log p(z) (n_samples, N)) for loc,
    log_scale (N, L) at the noise offsets offset0 + k * sample_stride + n *
    row_stride + l (the evaluation's layout: location_scale_at's z, bit for
    bit), p of the family's own with parameters (prior_a, prior_b) (L,): the
    C++ forward with its prior options, as SampleLocationScaleRatio's (whose
    conditions the caller checks). No gradient."""
    a, b = flat(loc.detach()), flat(log_scale.detach())
    N, L = a.shape
    z = _backend.empty_output((n_samples, N, L), like=a)
    ratio = _backend.empty_output((n_samples, N), like=a)
    if z.numel() == 0:
        return z, ratio.zero_()
    check_offsets(offset0, sample_stride, row_stride,
                  offset0 + (n_samples - 1) * sample_stride + (N - 1) * row_stride + L - 1)
    _backend.launch_cpp("sample_location_scale_forward", z.numel(),
                        {"prior_a": prior_a.detach().contiguous(), "prior_b": prior_b.detach().contiguous()},
                        loc=a, log_scale=b, seed=seed, family=family, offset0=offset0, sample_stride=sample_stride,
                        row_stride=row_stride, z=z, log_q=ratio)
    return z, ratio


def sample_location_scale_ratio_unchecked(family: int, loc: Tensor, log_scale: Tensor, prior_a: Tensor,
                                          prior_b: Tensor, n_samples: int, stop_score: bool,
                                          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(z (K, ..., L), log q(z) - log p(z) (K, ...)) through
    SampleLocationScaleRatio, for arguments the caller has checked."""
    return SampleLocationScaleRatio.apply(loc, log_scale, prior_a, prior_b, draw_seed(loc.device, generator), family,
                                          n_samples, stop_score)


# -- the draw with the closed-form KL fused (sample_location_scale_kl_*) -------------


# the ELBO's draw against a prior of a family with a location (family_kl's (loc,
# log_scale) against (prior_loc, prior_log_scale)): z is SampleLocationScale's, the
# KL FamilyKL's, the gradients their sum, bit for bit, in one pass each way
LOCATION_SCALE_KL = FamilyKLSampler(LOCATION_SCALE_SAMPLER, FamilyKL.apply, prior_layout,
                                    lambda kl_family, *params: params)
SampleLocationScaleKL = LOCATION_SCALE_KL.function("SampleLocationScaleKL")

# (z (K, ..., L), KL (...)) of (family, kl_family, loc, log_scale, prior_loc,
# prior_log_scale, n_samples, generator) for arguments the caller has validated
sample_location_scale_kl_unchecked = LOCATION_SCALE_KL.unchecked


# -- sample_positive ---------------------------------------------------------------


PARAMETERS = {"exponential": ("log_rate",), "weibull": ("log_scale", "log_concentration"),
              "kumaraswamy": ("log_a", "log_b")}


def positive_index(family) -> int:
    """The kernels' index of a family name, or a ValueError naming the choices."""
    return _family_index_of(POSITIVE_FAMILIES, family)


POSITIVE_SAMPLER = FamilySampler("sample_positive", ("log_p0", "log_p1"))
sample_positive_op, sample_positive_backward_op = POSITIVE_SAMPLER.op, POSITIVE_SAMPLER.backward_op


def _positive_double_backward(grad_z, grad_log_q, stop_score, family, log_p0, log_p1, seed, n_samples, shape):
    """The gradients as differentiable torch ops (create_graph=True): t comes
    from the sampling op itself (exponential at log_rate = 0: z is t bit for
    bit) and enters as a constant; the oracle's positive_terms' closed forms."""
    acc = _backend.compute_dtype(log_p0, log_p1)
    zero = torch.zeros(flat(log_p0).shape, dtype=acc, device=log_p0.device)
    with torch.no_grad():
        t = run(sample_positive_op, zero, zero, seed, 0, n_samples)[0].to(acc)
    t = t.reshape(n_samples, *shape)
    p0, p1 = _acc(log_p0), _acc(log_p1)
    z, _, c0, c1, f0, f1, s0, s1 = positive_terms(family, t, torch.log(t), p0, p1, acc)
    d0 = torch.zeros_like(p0 + p1)
    d1 = torch.zeros_like(d0)
    if grad_z is not None:
        gz = _acc(grad_z).reshape(n_samples, *shape) * z
        d0, d1 = d0 + (gz * c0).sum(0), d1 + (gz * c1).sum(0)
    if grad_log_q is not None:
        gq = _acc(grad_log_q).reshape(n_samples, *shape[:-1]).unsqueeze(-1)
        d0 = d0 + (gq * (s0 if stop_score else f0)).sum(0)
        d1 = d1 + (gq * (s1 if stop_score else f1)).sum(0)
    return d0.to(log_p0.dtype), d1.to(log_p1.dtype)


# Autograd of fastvae::sample_positive: (z (K, ..., L), log q (K, ...)), saving the
# log parameters as (N, L) and the seed only; the exponential's second
# parameter is a stand-in and gets no gradient.
SamplePositive = POSITIVE_SAMPLER.function("SamplePositive", _positive_double_backward, stand_in_second=0)


def check_params(family: str, log_param: Tensor, log_param2: Tensor | None) -> tuple[int, Tensor, Tensor]:
    """(index, log_p0, log_p1) of a family's log parameters, checked by name
    (dtype, shape, finite values); exponential's second is a detached alias
    of log_p0 (read by no formula; not log_p0 itself, which torch.compile
    cannot trace into one Function twice)."""
    index = positive_index(family)
    names = PARAMETERS[family]
    if len(names) == 1:
        if log_param2 is not None:
            raise ValueError(f"the {family} family takes one parameter ({names[0]}), got a second")
        _validate.float_tensors(**{names[0]: log_param})
        _validate.event_dim(names[0], log_param)
        _value_checks.finite_log_param(log_param, names[0])
        return index, log_param, log_param.detach()
    if log_param2 is None:
        raise ValueError(f"the {family} family takes two parameters ({', '.join(names)}), got one")
    _validate.float_tensors(**{names[0]: log_param, names[1]: log_param2})
    _validate.event_dim(names[0], log_param)
    _validate.same_shape(**{names[0]: log_param, names[1]: log_param2})
    _value_checks.finite_log_param(log_param, names[0])
    _value_checks.finite_log_param(log_param2, names[1])
    return index, log_param, log_param2


def sample_positive(
    family: str,
    log_param: Tensor,
    log_param2: Tensor | None = None,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized samples of a positive family and their log-density.

    Args:
        family: "exponential" (log_param = log rate), "weibull" (log scale,
            log concentration) or "kumaraswamy" (log a, log b), as an encoder
            outputs them.
        log_param, log_param2: (..., L) on one device (log_param2 None for
            the exponential); every finite value is valid.
        n_samples: None for one sample shaped like log_param; an int K >= 1 for (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from.

    Returns:
        (z, log_q): z the family's inverse CDF of the uniforms, and log q(z)
        summed over L (shape (...) or (K, ...)) from the t that drew z. Both
        are differentiable in the log parameters; the noise is regenerated in
        the backward, never stored.
    """
    index, p0, p1 = check_params(family, log_param, log_param2)
    return POSITIVE_SAMPLER.sample(index, p0, p1, n_samples, generator)


# (z (K, ..., L), log q (K, ...)) of (family, log_p0, log_p1, n_samples, stop_score, generator)
# for arguments the caller has validated (the latents' records)
sample_positive_unchecked = POSITIVE_SAMPLER.unchecked


# (z (n_samples, N, L), log q (n_samples, N)) for log_p0, log_p1 (N, L) at the noise offsets
# offset0 + k * sample_stride + n * row_stride + l: the evaluation's layout. No gradient.
positive_at = POSITIVE_SAMPLER.at


# -- the draw with the closed-form KL fused (sample_positive_kl_*) -------------------


_EXPONENTIAL_KL = KL_FAMILIES.index("exponential")


def _kl_parameters(kl_family: int, p0, p1, prior0, prior1) -> tuple:
    """FamilyKL's (q_loc, q_log_param, p_loc, p_log_param): the exponential's
    log-rates alone, the Weibull's and the Kumaraswamy's pairs with their
    priors' (a Weibull's, a Beta's) as (loc, log_param)."""
    return (None, p0, None, prior0) if kl_family == _EXPONENTIAL_KL else (p0, p1, prior0, prior1)


# the ELBO's draw against a prior of the family's KL (the exponential's log-rate, a
# Weibull's (log scale, log concentration) for the Weibull, or a Beta's (log alpha,
# log beta) for the Kumaraswamy): z is SamplePositive's, the KL
# FamilyKL's, the gradients their sum, bit for bit, in one pass each way. The
# exponential's second parameters are stand-ins (detached aliases of the first),
# which get no gradient
POSITIVE_KL = FamilyKLSampler(POSITIVE_SAMPLER, FamilyKL.apply, prior_layout, _kl_parameters)
SamplePositiveKL = POSITIVE_KL.function("SamplePositiveKL")

# (z (K, ..., L), KL (...)) of (family, kl_family, log_p0, log_p1, prior_log_p0,
# prior_log_p1, n_samples, generator) for arguments the caller has validated
sample_positive_kl_unchecked = POSITIVE_KL.unchecked


# -- sample_concrete ---------------------------------------------------------------

_NOT_TWICE = ("its backward is a kernel with no differentiable form. Differentiate it once, or use "
              "fastvae.ops.sample_family.sample_concrete (plain PyTorch) where a second derivative is needed")


# The elements each element counts as in the cpp backend's thread rule
# (_backend.num_threads): sample_family.h's kConcreteWork, which says why.
_CONCRETE_WORK = 4


def _flat3(t: Tensor) -> Tensor:
    """(..., L, C) -> contiguous (N, L, C) (N spelled out: -1 is ambiguous when L = 0)."""
    return t.reshape(math.prod(t.shape[:-2]), *t.shape[-2:]).contiguous()


def _z_dtype(logits: Tensor) -> torch.dtype:
    """z's dtype, sample_normal's z_dtype rule: the compute dtype under
    torch.autocast (float32 for half-precision logits, float64 stays float64),
    else the logits' dtype."""
    return z_dtype(logits, logits)


def _forward(logits: Tensor, temperature: Tensor, seed: Tensor, hard: bool, n_samples: int,
             log_p: Tensor | None = None, keep_relaxed: bool = False) -> list[Tensor]:
    """[z (K, N, L, C), log_q (K, N), kl, relaxed] for logits (N, L, C),
    temperature (N, L): kl (N,) with the prior log-pmf log_p (L, C), else an
    empty (0,) tensor; relaxed, with hard and keep_relaxed, the relaxed z
    (K, N, L, C) whose argmax the one-hot z is (the backward's z; the C++
    twin writes it in the same pass, here a relaxed launch on the same noise
    draws it), else an empty (0,) tensor. A call _op_plan takes (a compiled
    graph's node on CUDA) launches from its plan."""
    if (plan := _op_plan(logits, temperature, n_samples, hard, False, log_p, keep_relaxed)) is not None:
        z, log_q = empty(plan.z_like), empty(plan.log_q_like)
        kl = empty(plan.kl_like) if plan.with_kl else logits.new_empty((0,))
        plan.forward(logits, temperature, seed, z, log_q, logits if log_p is None else log_p,
                     z if log_p is None else kl, *plan.fwd_ints)
        return [z, log_q, kl, logits.new_empty((0,))]
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(logits)
    a = _backend.kernel_input(backend, logits.contiguous(), dtype)
    lam = temperature.to(dtype).contiguous()
    N, L, C = a.shape
    z = empty_z(backend, (n_samples, N, L, C), logits, dtype, _z_dtype(logits))
    log_q = _backend.empty_output((n_samples, N), like=logits, dtype=dtype)
    # the Triton kernels read a prior expanded over the latents in place (no copy launched)
    lp = None if log_p is None else _backend.kernel_input(
        backend, log_p if backend == "triton" else log_p.contiguous(), dtype)
    kl = (logits.new_empty((0,), dtype=dtype) if lp is None
          else _backend.empty_output((N,), like=logits, dtype=dtype))
    _backend.launch(backend, "sample_concrete_forward", _CONCRETE_WORK * z.numel(), logits=a, temperature=lam,
                    seed=seed, hard=hard, offset0=0, sample_stride=N * L * C, row_stride=L * C, z=z, log_q=log_q,
                    log_p=lp, kl=None if lp is None else kl)
    relaxed = logits.new_empty((0,), dtype=dtype)
    if hard and keep_relaxed:
        relaxed = _backend.empty_output((n_samples, N, L, C), like=logits, dtype=dtype)
        _backend.launch(backend, "sample_concrete_forward", _CONCRETE_WORK * relaxed.numel(), logits=a,
                        temperature=lam, seed=seed, hard=False, offset0=0, sample_stride=N * L * C,
                        row_stride=L * C, z=relaxed, log_q=torch.empty_like(log_q), log_p=None, kl=None)
    return [_backend.in_dtype(z, _z_dtype(logits)), log_q, kl, relaxed]


def _backward(logits: Tensor, temperature: Tensor, seed: Tensor, grad_z: Tensor | None, grad_log_q: Tensor | None,
              stop_score: bool, grad_kl: Tensor | None = None, log_p: Tensor | None = None,
              z: Tensor | None = None) -> Tensor:
    """dlogits (N, L, C) from grad_z (K, N, L, C), grad_log_q (K, N) and grad_kl
    (N,) (None: no gradient; grad_kl needs the prior log-pmf log_p (L, C)).
    ``z``, the forward's relaxed z (K, N, L, C), is what the kernels would
    regenerate, bit for bit: the C++ twin reads it, these backends regenerate.
    A call _op_plan takes launches from its plan, as the forward's."""
    if grad_kl is not None and log_p is None:
        raise ValueError("grad_kl: the KL's gradient needs the prior's log_p")
    K = gradient_samples(grad_z, grad_log_q)
    if (all(g is None or g.dtype is logits.dtype for g in (grad_z, grad_log_q, grad_kl))  # (z: regenerated here)
            and (plan := _op_plan(logits, temperature, max(K, 1), False, stop_score,
                                  None if grad_kl is None else log_p, False)) is not None):
        gz, gq, gk = (logits if g is None else g.contiguous() for g in (grad_z, grad_log_q, grad_kl))
        d = empty(plan.d_like)
        plan.backward(grad_z is not None, grad_log_q is not None, grad_kl is not None)(
            gz, gq, logits, temperature, seed, d, gk, logits if grad_kl is None else log_p, plan.N, plan.L,
            plan.N * plan.L, plan.C, K, plan.lp_stride if grad_kl is not None else 0)
        return d
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(logits)
    a = _backend.kernel_input(backend, logits.contiguous(), dtype)
    lam = temperature.to(dtype).contiguous()
    grad_z, grad_log_q, grad_kl = (None if g is None else _backend.kernel_input(backend, g, dtype).contiguous()
                                   for g in (grad_z, grad_log_q, grad_kl))
    lp = None if grad_kl is None else _backend.kernel_input(
        backend, log_p if backend == "triton" else log_p.contiguous(), dtype)
    d = _backend.empty_output(a.shape, like=a)
    _backend.launch(backend, "sample_concrete_backward", _CONCRETE_WORK * max(K, 1) * a.numel(), grad_z=grad_z,
                    grad_log_q=grad_log_q, logits=a, temperature=lam, seed=seed, stop_score=stop_score, dlogits=d,
                    grad_kl=grad_kl, log_p=lp)
    return _backend.in_dtype(d, logits.dtype)


def _fake(logits: Tensor, temperature: Tensor, seed: Tensor, hard: bool, n_samples: int, log_p: Tensor | None = None,
          keep_relaxed: bool = False):
    dtype = _backend.compute_dtype(logits)
    relaxed = (n_samples, *logits.shape) if hard and keep_relaxed else (0,)
    return (logits.new_empty((n_samples, *logits.shape), dtype=_z_dtype(logits)),
            logits.new_empty((n_samples, logits.shape[0]), dtype=dtype),
            logits.new_empty((logits.shape[0],) if log_p is not None else (0,), dtype=dtype),
            logits.new_empty(relaxed, dtype=dtype))


sample_concrete_op = define(
    "sample_concrete(Tensor logits, Tensor temperature, Tensor seed, bool hard, int n_samples, Tensor? log_p=None,"
    " bool keep_relaxed=False) -> (Tensor, Tensor, Tensor, Tensor)",
    lambda logits, temperature, seed, hard, n_samples, log_p=None, keep_relaxed=False: tuple(
        _forward(logits, temperature, seed, hard, n_samples, log_p, keep_relaxed)),
    _fake,
    cpu=lambda logits, temperature, seed, hard, n_samples, log_p=None, keep_relaxed=False: (
        logits, temperature, log_p),
)
sample_concrete_backward_op = define(
    "sample_concrete_backward(Tensor logits, Tensor temperature, Tensor seed, Tensor? grad_z, Tensor? grad_log_q,"
    " bool stop_score, Tensor? grad_kl=None, Tensor? log_p=None, Tensor? z=None) -> Tensor",
    _backward,
    lambda logits, temperature, seed, grad_z, grad_log_q, stop_score, grad_kl=None, log_p=None, z=None:
        torch.empty_like(logits),
    cpu=lambda logits, temperature, seed, grad_z, grad_log_q, stop_score, grad_kl=None, log_p=None, z=None: (
        logits, temperature, grad_z, grad_log_q, grad_kl, log_p, z),
)


class SampleConcrete(torch.autograd.Function):
    """Autograd of fastvae::sample_concrete: (z (K, ..., L, C), log q (K, ...)),
    and with a prior log-pmf log_p (L, C) the analytic categorical KL (...),
    saving the logits, the temperature, the seed and log_p only. ``stop_score``
    (STL / DReG): log q's gradient reaches the logits only along z."""

    @staticmethod
    def forward(ctx, logits, temperature, seed, hard, n_samples, stop_score, log_p=None):
        a = _flat3(logits)
        lam = temperature.reshape(a.shape[:2])
        # on the CPU the relaxed z spares the backward the noise's regeneration (about
        # 60% of its time): z itself when relaxed, at no memory cost where the decoder
        # keeps z anyway; a copy the C++ twin writes beside the one-hot when hard. CUDA
        # regenerates (Philox costs less there than reading z back)
        keep_z = a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
        keep_relaxed = keep_z and hard and ctx.needs_input_grad[0]
        z, log_q, kl, relaxed = run(sample_concrete_op, a, lam, seed, hard, n_samples, log_p, keep_relaxed)
        ctx.save_for_backward(a, lam, seed, log_p, relaxed if keep_relaxed else z if keep_z and not hard else None)
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.n_samples, ctx.stop_score = logits.shape, n_samples, stop_score
        z, log_q = shaped(z, (n_samples, *logits.shape)), shaped(log_q, (n_samples, *logits.shape[:-2]))
        return (z, log_q) if log_p is None else (z, log_q, shaped(kl, logits.shape[:-2]))

    @staticmethod
    def backward(ctx, grad_z, grad_log_q, grad_kl=None):
        if grad_z is None and grad_log_q is None and grad_kl is None:
            return None, None, None, None, None, None, None
        a, lam, seed, log_p, z = ctx.saved_tensors
        K = ctx.n_samples
        N, L, C = a.shape
        gk = None if grad_kl is None else shaped(grad_kl.detach(), (N,))
        with torch.no_grad():
            d = run(sample_concrete_backward_op, a.detach(), lam, seed,
                    None if grad_z is None else shaped(grad_z.detach(), (K, N, L, C)),
                    None if grad_log_q is None else shaped(grad_log_q.detach(), (K, N)), bool(ctx.stop_score),
                    gk, None if gk is None else log_p.detach(),
                    None if z is None or (grad_z is None and grad_log_q is None) else z.detach())
            dlog_p = None
            if gk is not None and ctx.needs_input_grad[6]:  # a learned prior: -sum over rows of grad_kl pi
                pi = torch.softmax(a.detach().to(_backend.compute_dtype(a)), -1)
                dlog_p = -torch.einsum("n,nlc->lc", gk.to(pi.dtype), pi).to(log_p.dtype)
        d = shaped(d, ctx.shape)
        if torch.is_grad_enabled():  # create_graph=True: the kernel's numbers, then a named error
            d, dlog_p = not_twice("sample_concrete", (d, dlog_p), (a, grad_z, grad_log_q, grad_kl, log_p), _NOT_TWICE)
        return d, None, None, None, None, None, dlog_p


# -- the plans: eager calls on the triton backend ---------------------------------
# A Gumbel-softmax VAE's step at small sizes is host-bound on a GPU: the
# general path's per-call layout work and Triton's general launcher cost more
# than the kernels. So eager calls of sample_concrete_unchecked (the public
# function after its checks, and the Concrete latents) on the triton backend
# keep a plan per call signature (the tensors' shapes, strides, dtypes and
# devices, K, hard, stop_score): its first call works out the outputs'
# templates and both kernels' grids and compile-time parameters (triton.py's
# concrete_forward_launch / concrete_backward_launch, which the general launchers call too, so
# both paths launch the same variants on the same arguments); later calls
# allocate and launch through fastvae._launch.Launch (on CUDA the compiled
# kernel's launcher directly), with one autograd node of their own
# (PlannedSampleConcrete). Values and gradients are the general path's bit for
# bit (test_sample_concrete.py). Other backends, torch.compile, functorch
# transforms, tracing, tensor subclasses, half precision, autocast, mixed
# dtypes, empty tensors and a learned prior (log_p requiring grad, whose
# gradient the general Function gives) take the general path.

# The Concrete's plans (a bounded fastvae._launch.PlanCache): None for a
# signature the general path serves; ENABLED False turns them all off (the
# tests compare both paths); outputs come from ``empty``, empty_like the
# plan's templates (the tests' fixture may poison it).
PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
# the op's own calls' plans (_op_plan): a compiled graph's nodes
OP_PLANS = PlanCache()


class ConcretePlan:
    """The launches of one call signature: logits (..., L, C) and the
    temperature (..., L) of one float32 or float64 dtype, read in place where
    contiguous (``copy``: which to copy, as the general path's contiguous()
    does), the prior log-pmf, if any, read in place at its row stride
    (``lp_stride``, 0 for a (C,) prior)."""

    __slots__ = ("kern", "N", "L", "C", "K", "dtype", "device", "copy", "with_kl", "stop_score", "z_like",
                 "log_q_like", "kl_like", "d_like", "forward", "fwd_ints", "lp_stride", "_backward")

    def __init__(self, logits: Tensor, temperature: Tensor, n_samples: int | None, hard: bool, stop_score: bool,
                 log_p: Tensor | None):
        kern = self.kern = _backend.triton_module("sample_family")
        shape, dtype, device = logits.shape, logits.dtype, logits.device
        N, (L, C) = math.prod(shape[:-2]), shape[-2:]
        K = 1 if n_samples is None else n_samples
        self.N, self.L, self.C, self.K, self.dtype, self.device = N, L, C, K, dtype, device
        self.copy = (not logits.is_contiguous(), not temperature.is_contiguous())
        self.with_kl, self.stop_score = log_p is not None, stop_score
        self.lp_stride = 0 if log_p is None else log_p.expand(L, C).stride(0)
        samples = () if n_samples is None else (K,)
        self.z_like = template((*samples, *shape), _z_dtype(logits), device)
        self.log_q_like = template((*samples, *shape[:-2]), dtype, device)
        self.kl_like = template(shape[:-2], dtype, device)
        self.d_like = template(shape, dtype, device)
        grid, meta = kern.concrete_forward_launch(K, N, L, C, dtype, device.type, hard, True, log_p is not None)
        self.forward = Launch(kern._sample_concrete_fwd_kernel, grid, meta)
        self.fwd_ints = (0, N * L * C, L * C, N, K * N, L, C, self.lp_stride)
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *self._backward.values()]

    def backward(self, has_grad_z: bool, has_grad_q: bool, has_grad_kl: bool) -> Launch:
        """The backward kernel's launch for the gradients given (made at first use)."""
        key = has_grad_z, has_grad_q, has_grad_kl
        launch = self._backward.get(key)
        if launch is None:
            grid, meta = self.kern.concrete_backward_launch(self.N, self.L, self.C, self.dtype, self.device.type,
                                                            has_grad_z, has_grad_q, has_grad_kl, self.stop_score)
            launch = self._backward[key] = Launch(self.kern._sample_concrete_bwd_kernel, grid, meta)
        return launch


class PlannedSampleConcrete(torch.autograd.Function):
    """SampleConcrete's forward and backward kernels launched from a
    ConcretePlan, without its per-call layout work (the plan did it); its
    double backward is refused as SampleConcrete's is."""

    @staticmethod
    def forward(ctx, logits, temperature, seed, log_p, plan):
        a = logits.contiguous() if plan.copy[0] else logits
        lam = temperature.contiguous() if plan.copy[1] else temperature
        z, log_q = empty(plan.z_like), empty(plan.log_q_like)
        kl = empty(plan.kl_like) if plan.with_kl else None
        plan.forward(a, lam, seed, z, log_q, a if kl is None else log_p, z if kl is None else kl, *plan.fwd_ints)
        ctx.save_for_backward(a, lam, seed, log_p)
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        return (z, log_q) if kl is None else (z, log_q, kl)

    @staticmethod
    def backward(ctx, grad_z, grad_log_q, grad_kl=None):
        if grad_z is None and grad_log_q is None and grad_kl is None:
            return None, None, None, None, None
        a, lam, seed, log_p = ctx.saved_tensors
        plan = ctx.plan
        gz = a if grad_z is None else grad_z.detach().contiguous()
        gq = a if grad_log_q is None else grad_log_q.detach().contiguous()
        gk = a if grad_kl is None else grad_kl.detach().contiguous()
        d = empty(plan.d_like)
        K = plan.K if grad_z is not None or grad_log_q is not None else 0
        plan.backward(grad_z is not None, grad_log_q is not None, grad_kl is not None)(
            gz, gq, a.detach(), lam, seed, d, gk, a if grad_kl is None else log_p, plan.N, plan.L, plan.N * plan.L,
            plan.C, K, plan.lp_stride if grad_kl is not None else 0)
        if torch.is_grad_enabled():  # create_graph=True: the kernel's numbers, then a named error
            d = not_twice("sample_concrete", (d,), (a, grad_z, grad_log_q, grad_kl, log_p), _NOT_TWICE)[0]
        return d, None, None, None, None


# Function.apply without its Python wrapper (which binds default arguments and
# unwraps dead functorch wrappers): the plans serve only plain tensors outside
# functorch transforms
planned_apply = super(torch.autograd.Function, PlannedSampleConcrete).apply
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_DTYPES = (torch.float32, torch.float64)


def _plan_for(logits, temperature, n_samples, hard, stop_score, generator, log_p):
    """The plan of this call's signature, or None (the general path): plain
    tensors on the triton backend in eager mode, without autocast, logits,
    temperature (of logits.shape[:-1]) and log_p (not learned, broadcasting
    to (L, C) with unit column stride) of one float32 or float64 dtype,
    n_samples None or an int >= 1, no empty dimension, the default or a
    torch.Generator."""
    plain = _backend.PLAIN_TYPES
    # compiling first: Dynamo then reads no further (torch 2.7's cannot trace a frozenset's `in`)
    if (_backend.compiling() or type(logits) not in plain or type(temperature) not in plain
            or (log_p is not None and (type(log_p) not in plain or log_p.requires_grad))
            or (n_samples is not None and type(n_samples) is not int) or type(hard) is not bool
            or type(stop_score) is not bool or (generator is not None and type(generator) is not torch.Generator)):
        return None
    device = logits.device
    if ((_backend._chosen.get(device.type) or _backend.backend_for(device, warn=False)) != "triton"
            or torch._C._get_tracing_state() is not None or torch._C._are_functorch_transforms_active()
            or _wrapped(logits) or _wrapped(temperature) or (log_p is not None and _wrapped(log_p))):
        return None
    autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device.type)
    key = (logits.shape, logits.stride(), logits.dtype, device, temperature.shape, temperature.stride(),
           temperature.dtype, temperature.device, n_samples, hard, stop_score, autocast,
           None if log_p is None else (log_p.shape, log_p.stride(), log_p.dtype, log_p.device))
    try:
        return PLANS[key]
    except KeyError:
        pass
    dtype = logits.dtype
    plan = None
    if (not autocast and dtype in _DTYPES and logits.dim() >= 2 and temperature.dtype is dtype
            and temperature.device == device and temperature.shape == logits.shape[:-1] and logits.numel() > 0
            and (n_samples is None or n_samples >= 1)
            and (log_p is None or (log_p.dtype is dtype and log_p.device == device and log_p.dim() in (1, 2)
                                   and _validate.broadcasts_to(log_p.shape, logits.shape[-2:])
                                   and log_p.expand(logits.shape[-2:]).stride(1) == 1))):
        plan = ConcretePlan(logits, temperature, n_samples, hard, stop_score, log_p)
    return PLANS.store(key, plan)


def _op_plan(a: Tensor, lam: Tensor, n_samples: int, hard: bool, stop_score: bool, log_p: Tensor | None,
             keep_relaxed: bool) -> ConcretePlan | None:
    """The plan of a call of the op itself, or None (its general launch). A
    compiled graph calls the op with what SampleConcrete hands it, the
    contiguous logits (N, L, C) and temperature (N, L): on CUDA its general
    launch would pay, at every step, the launch geometry, the layout work
    and Triton's binding of the arguments, which the plan did once. Taken
    on the triton backend, outside autocast, for float32 or float64 tensors
    of one dtype, contiguous, with n_samples >= 1, no relaxed z to keep and
    log_p (L, C) of unit column stride; the launches are the eager plans'
    (the same kernels and arguments as the general launch: the same bits)."""
    device = a.device
    if (not ENABLED or keep_relaxed or not _backend.op_plans_serve(device) or a.dtype not in _DTYPES
            or lam.dtype is not a.dtype or a.dim() != 3 or not a.is_contiguous() or not lam.is_contiguous()
            or a.numel() == 0 or n_samples < 1
            or (log_p is not None and (log_p.dtype is not a.dtype or log_p.stride(1) != 1))):
        return None
    key = (a.shape, a.dtype, device, lam.shape, n_samples, hard, stop_score,
           None if log_p is None else log_p.stride(0))
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, ConcretePlan(a, lam, n_samples, hard, stop_score, log_p))


def _planned(plan: ConcretePlan, logits, temperature, generator, log_p) -> tuple[Tensor, ...]:
    """sample_concrete_unchecked once its plan is found."""
    if generator is None:  # draw_seed's draw, without its checks of the generator (the default one)
        seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=plan.device)
    else:
        seed = draw_seed(plan.device, generator)
    return planned_apply(logits, temperature, seed, log_p, plan)


def _check_logits(t: Tensor, name: str = "logits") -> None:
    """Raise when a relaxed categorical's logits hold a NaN or +inf, or when a
    latent has every category masked (-inf): z would be NaN. What is read is
    the value checks' policy (fastvae/_value_checks.py): on the CPU the
    leading latents (``prefix``: a view of whole rows; a mistake of the
    encoder shows in any of them), not a pass over the whole tensor each
    call."""
    if not _value_checks.should_check("concrete logits", t) or t.numel() == 0:
        return
    d = _value_checks.prefix(t)
    if d.dim() < 2 or d.shape[-1] != t.shape[-1]:  # more categories than the prefix: whole latents
        d = t.detach()
    # one reduction and a sum in the common case: each latent's max is finite
    # exactly when it has no NaN (amax propagates it), no +inf and a finite
    # category, and then so is their sum (unless it overflows, which only
    # sends the call to the exact checks below)
    if math.isfinite(d.amax(-1).sum().item()):
        return
    if bool(torch.isnan(d).any()) or bool((d == math.inf).any()):
        raise ValueError(f"{name} must be finite or -inf (a masked category): got a NaN or +inf")
    if bool((d == -math.inf).all(-1).any()):
        raise ValueError(f"{name} has a latent with every category -inf (masked): at least one must be finite")


def check_args(logits: Tensor, temperature) -> Tensor:
    """The temperature as a tensor of logits.shape[:-1] in the logits' compute
    dtype, after the checks by name: logits a float tensor (..., L, C) with
    C >= 2, no NaN or +inf (-inf masks a category, not all of a latent's);
    temperature a positive finite float or tensor broadcasting to (..., L),
    without gradient."""
    _validate.float_tensors(logits=logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., L, C) (a latent's C categories last), "
                         f"got {tuple(logits.shape)}")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits must have C >= 2 categories in the last dimension, got shape {tuple(logits.shape)}")
    dtype = _backend.compute_dtype(logits)
    if isinstance(temperature, Tensor):
        if temperature.requires_grad:
            raise ValueError("temperature must not require grad: sample_concrete gives no gradient to the "
                             "temperature (pass temperature.detach())")
        if not temperature.is_floating_point() and temperature.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"temperature must be a float or a floating-point tensor, got {temperature.dtype}")
        if temperature.device != logits.device:
            raise ValueError(f"temperature is on {temperature.device}, logits on {logits.device}")
        try:
            lam = torch.broadcast_to(temperature.to(dtype), logits.shape[:-1])
        except RuntimeError:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)} does not broadcast to the latents' "
                             f"shape {tuple(logits.shape[:-1])}") from None
        if not _backend.compiling() and lam.numel():
            lo, hi = torch.aminmax(lam.detach())
            if not (lo.item() > 0 and math.isfinite(hi.item())):
                raise ValueError(f"temperature must be > 0 and finite, got values in "
                                 f"[{lo.item():.3g}, {hi.item():.3g}]")
    else:
        # a Python or NumPy number (an annealing schedule's np.float32), as torch's relaxed distributions take
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
        temperature = float(temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
        lam = torch.full(logits.shape[:-1], float(temperature), dtype=dtype, device=logits.device)
    _check_logits(logits, "logits")
    return lam


def check_log_p(log_p: Tensor, logits: Tensor) -> Tensor:
    """A prior log-pmf as the ops take it: log_p broadcast to (L, C) (a view),
    after the checks by name: a float tensor on the logits' device of shape
    (C,) or (L, C), no NaN or +inf (-inf: a category the prior rules out)."""
    _validate.float_tensors(log_p=log_p)
    L, C = logits.shape[-2:]
    if log_p.device != logits.device:
        raise ValueError(f"log_p is on {log_p.device}, logits on {logits.device}")
    if log_p.dim() not in (1, 2) or not _validate.broadcasts_to(log_p.shape, (L, C)):
        raise ValueError(f"log_p must be a prior log-pmf of shape (C,) or (L, C) = ({L}, {C}), "
                         f"got {tuple(log_p.shape)}")
    if _value_checks.should_check("concrete log_p", log_p) and log_p.numel():
        d = log_p.detach()
        if bool(torch.isnan(d).any()) or bool((d == math.inf).any()):
            raise ValueError("log_p must be finite or -inf (a category the prior rules out): got a NaN or +inf")
    return log_p.expand(L, C)


def sample_concrete(
    logits: Tensor,
    temperature: float | Tensor,
    n_samples: int | None = None,
    *,
    hard: bool = False,
    generator: torch.Generator | None = None,
    log_p: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Reparameterized relaxed one-hot samples (Concrete / Gumbel-softmax) and their log-density.

    Args:
        logits: (..., L, C): L latents of C >= 2 categories each, unnormalized
            log-probabilities; -inf masks a category (z_c = 0), NaN and +inf
            are refused.
        temperature: > 0, a float or a tensor broadcasting to (..., L) (no
            gradient flows to it).
        n_samples: None for one sample shaped like logits; an int K >= 1 for (K, ..., L, C).
        hard: straight-through: z is the one-hot of the relaxed sample's
            argmax, its gradient the relaxed sample's; log q is the relaxed one.
        generator: torch.Generator the Philox seed is drawn from.
        log_p: a categorical prior's log-pmf, (C,) or (L, C) (normalized; -inf
            rules a category out): adds the analytic KL(Cat(softmax(logits)) || p)
            summed over the L latents, computed in the same kernels.

    Returns:
        (z, log_q): z on the simplex, (..., L, C) or (K, ..., L, C), and log q(z)
        of the relaxed sample summed over the L latents, (...) or (K, ...),
        computed from the Gumbel noise that drew z. Both are differentiable in
        the logits. On CUDA the backward regenerates the noise; on the CPU
        it reads the relaxed z (z itself, or with hard=True a copy kept
        beside the one-hot).
        With log_p, (z, log_q, kl): kl = sum_l sum_c pi_c (log pi_c - log p_c),
        pi = softmax(logits), of shape (...) (no noise: one value per row
        whatever n_samples), differentiable in the logits and in log_p.
    """
    lam = check_args(logits, temperature)
    if n_samples is not None:
        n_samples = _validate.sample_count("n_samples", n_samples, logits.numel(), logits)
    if log_p is not None:
        log_p = check_log_p(log_p, logits)
    return sample_concrete_unchecked(logits, lam, n_samples, hard, False, generator, log_p)


def sample_concrete_unchecked(logits: Tensor, temperature: Tensor, n_samples: int | None, hard: bool,
                              stop_score: bool, generator: torch.Generator | None,
                              log_p: Tensor | None = None) -> tuple[Tensor, ...]:
    """(z (K, ..., L, C), log q (K, ...)) for arguments the caller has validated
    (temperature a tensor of logits.shape[:-1]); n_samples None: one sample,
    (..., L, C) and (...). With log_p (a prior log-pmf broadcasting to (L, C)),
    (z, log q, kl (...)). Eager CPU calls take the C++ operator
    (csrc/torch_ops.cpp), the same kernels without the Python Function's host
    path (and with no indexing op for n_samples None); a learned prior (log_p
    requiring grad) takes the Python Function, whose backward gives d log_p.
    Eager calls on the triton backend launch from a plan of their call
    signature (see the plans above)."""
    if ENABLED and (plan := _plan_for(logits, temperature, n_samples, hard, stop_score, generator,
                                      log_p)) is not None:
        return _planned(plan, logits, temperature, generator, log_p)
    seed = draw_seed(logits.device, generator)
    if log_p is not None:
        log_p = log_p.to(temperature.dtype).expand(logits.shape[-2:])
    ops = _backend.torch_ops(logits, temperature)
    if ops is not None and (log_p is None or not log_p.requires_grad):
        out = ops.sample_concrete(logits, temperature, int(seed), bool(hard), n_samples, stop_score, log_p)
        return out[:2] if log_p is None else out
    out = SampleConcrete.apply(logits, temperature, seed, bool(hard), 1 if n_samples is None else n_samples,
                               stop_score, log_p)
    if n_samples is None:  # squeeze, not [0]: a view whose backward is a view too, not a zero-filled scatter
        return (out[0].squeeze(0), out[1].squeeze(0), *out[2:])
    return out


def concrete_at(logits: Tensor, temperature: Tensor, seed: Tensor, n_samples: int, hard: bool, *, offset0: int,
                sample_stride: int, row_stride: int) -> tuple[Tensor, Tensor]:
    """(z (n_samples, N, L, C), log q (n_samples, N)) at the noise offsets offset0 +
    k * sample_stride + n * row_stride + l * C + c: the evaluation's layout. No gradient."""
    backend = _backend.backend_for(logits.device)
    dtype = _backend.compute_dtype(logits)
    a = _backend.kernel_input(backend, _flat3(logits.detach()), dtype)
    lam = temperature.detach().reshape(a.shape[:2]).to(dtype).contiguous()
    N, L, C = a.shape
    z = empty_z(backend, (n_samples, N, L, C), logits, dtype, _z_dtype(logits))
    log_q = _backend.empty_output((n_samples, N), like=logits, dtype=dtype)
    if z.numel() == 0:
        return _backend.in_dtype(z, _z_dtype(logits)), log_q.zero_()
    check_offsets(offset0, sample_stride, row_stride,
                  offset0 + (n_samples - 1) * sample_stride + (N - 1) * row_stride + L * C - 1)
    _backend.launch(backend, "sample_concrete_forward", _CONCRETE_WORK * z.numel(), logits=a, temperature=lam,
                    seed=seed, hard=hard, offset0=offset0, sample_stride=sample_stride, row_stride=row_stride, z=z,
                    log_q=log_q, log_p=None, kl=None)
    return _backend.in_dtype(z, _z_dtype(logits)), log_q
