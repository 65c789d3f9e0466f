"""The objectives' lean per-call path on the triton backend: plans.

A training loop calls ``fastvae.elbo`` / ``fastvae.iwae`` with the same
metadata step after step: the same shapes, dtypes and device, the same
likelihood, estimator and reduction. Everything that depends only on that
is worked out once per call signature and kept in a plan (as cuBLASLt plans
or FlashInfer's plan/run split do): the argument checks passed, the output
shapes and dtypes, and each kernel launch's grid and compile-time
parameters (the ``*_plan`` functions of the op folders'
``triton.py``, which the general launchers call on every call, so both paths
launch the same variants). The steady-state call looks the plan up, draws
the seed, allocates its outputs and launches, through two autograd nodes
(the math needs no more):

- ``Sample``, before the decoder: z, the KL and (iwae) the latent term
  log N(z; 0, I) - log q(z | x), from one sampling kernel; its backward is
  the sampler's backward kernel (DReG's weight on z's gradient applied there);
- ``ElboTail`` / ``IwaeTail``, after it: the likelihood, the log-mean-exp
  (iwae), the reduction and the combination into the bound, all in the
  kernels (kernels/_common.py's bound_epilogue: the likelihood kernel adds
  the latent term and, for elbo, reduces the rows; for iwae the log-mean-exp
  kernel reduces the columns); its backward kernels give the decoder
  output's gradient and the latent terms' (the KL's, or the latent
  log-ratio's, DReG's weight applied there) from the bound's scalar gradient.

The kernels are the general composition's (objectives.py over the ops'
Functions), in variants that also do what its torch ops after them do, so
the arithmetic is the same but for the order of the reduction's sum: values
and gradients equal the general path's bit for bit under the interpreter at
the tests' sizes, to a few ulp on a GPU, and the launches per call are fewer
(tests/test_plan.py, tests/test_launches.py). A create_graph=True backward
replays the general composition from the saved inputs and differentiates
that (its nodes' closed forms), so second derivatives are the general
path's. Anything the plans do not cover (another backend or prior, a full-
covariance posterior, half precision without autocast, torch.compile, a
decoder output that is not one contiguous tensor of x's shape, ...) takes the
general path, which needs no plan. Autocast is covered (the usual GPU
training): float32 x, a float32 or half-precision encoder, z and the KL in
float32, the likelihood kernels' variants of the decoder output's dtype.

Launches go through each kernel's ``run`` with the planned grid and
parameters: ``InterpretedFunction.run`` under TRITON_INTERPRET=1 (the CPU
proxy of the host cost, benchmarks/bench_host_cost.py), ``JITFunction.run`` on CUDA for the first
call of a plan, then the compiled kernel's launcher directly (``Launch``).
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import _backend, _double_backward, _op, _registry, _value_checks
from ._decoder import DECODER_DOCS, note_call
from ._launch import Launch, PlanCache, template
from .ops.sample_normal.op import double_backward as sample_normal_double_backward

# Every output the plans allocate is empty_like a template of its shape, dtype
# and device that the plan keeps (torch.empty_like costs about a third of
# torch.empty with a shape; _launch.template: one element behind it); the
# tests' fixture poisons them with NaN (conftest.py), as it does
# _backend.empty_output's.
empty = torch.empty_like


def _kernels(module: str):
    return _backend.triton_module(module)


# call signature -> Plan. The objectives read it with PLANS.get(key), a dict
# lookup and not a call into this module, so that the steady-state call enters
# this module once on the way down (run_elbo / run_iwae) and once on the way back
# up (the backward), and the objectives' module once each way. Bounded (each
# plan holds encoder-sized templates only).
PLANS = PlanCache()
# False: every call takes the general path (tests/test_plan.py compares the two)
ENABLED = True
# The cpp backend's location-scale kernels take a torch object's scale (or a
# Uniform's high - low) as it is, logging it per tile where the KL reads it:
# no log forward nor division backward in torch. False: the logs in torch (the
# benchmarks' A/B).
SCALE_IN_KERNELS = True
# Keeps a signature's plans and returns them; forget every plan (tests that
# change the kernels' geometry: FORCE_SPLITS)
store, clear = PLANS.store, PLANS.clear


# -- before the decoder: the sampler ----------------------------------------------


def in_stride(mu: Tensor, logvar: Tensor) -> int | None:
    """The stride, in elements, of the rows of L at which the sampler's kernels
    read mu and logvar (..., L) in place: L for contiguous tensors, 2 L for the
    halves of an encoder's output (h.chunk(2, -1)), any stride shared by both
    whose leading dimensions collapse into one; None where they do not (the
    plan copies them). The objectives' plan key holds both tensors' strides."""
    stride = mu.stride()
    if stride != logvar.stride() or mu.dim() == 0:
        return None
    shape = mu.shape
    if shape[-1] > 1 and stride[-1] != 1:
        return None
    row = step = None
    for size, st in zip(reversed(shape[:-1]), reversed(stride[:-1])):
        if size == 1:  # any stride: never stepped over
            continue
        if step is None:
            row = st
        elif st != step:
            return None
        step = st * size
    return shape[-1] if row is None else row


class SamplePlan:
    """The sampler's launches for mu, logvar (N, L) (any leading shape, one
    dtype: float32, float64, or half precision under autocast, whose z and
    KL are ``z_dtype``, float32) and K samples. The kernels read mu and
    logvar in place when their rows are ``in_stride`` elements apart (an
    encoder's halves, h.chunk(2, -1): 2 L; see ``in_stride``), else from
    contiguous copies made per call (``in_stride`` None)."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, n_samples: int | None,
                 with_ratio: bool, stop_score: bool, z_dtype: torch.dtype | None = None, in_stride: int | None = None):
        kern = _kernels("sample_normal")
        self.kern = kern
        L = shape[-1]
        N = shape.numel() // L if L else 0
        K = 1 if n_samples is None else n_samples
        self.N, self.L, self.K, self.n_samples = N, L, K, n_samples
        self.dtype, self.device = dtype, device
        self.with_ratio, self.stop_score = with_ratio, stop_score
        self.in_place = in_stride is not None
        self.mu_like = template(shape, dtype, device)  # the gradients' template: contiguous
        z_shape = shape if n_samples is None else torch.Size((K, *shape))
        # z, the KL and the log-ratio in the compute dtype: mu's, or float32 for
        # a half-precision encoder under autocast (ops/sample_normal/op.py's z_dtype)
        z_dtype = dtype if z_dtype is None else z_dtype
        self.z_like = template(z_shape, z_dtype, device)
        self.kl_like = template(shape[:-1], z_dtype, device)
        self.ratio_like = template((K, *shape[:-1]), z_dtype, device) if with_ratio else None
        # offset0, sample_stride, row_stride (the noise's), N, KN, L, in_stride (mu's rows in memory)
        self.in_stride = in_stride if self.in_place else L
        self.ints = (0, N * L, L, N, K * N, L, self.in_stride)
        self.forward = None
        if N * L > 0:
            grid, meta = kern.forward_plan(K, N, L, dtype, device, with_ratio, 0, N * L, L)
            self.forward = Launch(kern._sample_normal_fwd_kernel, grid, meta)
        self._backward: dict = {}

    def backward(self, has_grad_z: bool, has_grad_kl: bool, has_grad_ratio: bool, z_scale: bool = False):
        """(launch, part, counters, samples per split, splits, samples) of the
        backward kernel for the gradients given (``z_scale``: grad_z's rows
        weighted, DReG). Where a GPU splits the samples over programs (few
        rows, many samples: an IWAE at training sizes), the splits' partial
        sums and arrival counters are the plan's own, made once: zero between
        launches, so the plan serves one stream at a time, as the tail's
        reductions do. Otherwise they are placeholders the kernel never touches."""
        key = has_grad_z, has_grad_kl, has_grad_ratio, z_scale
        try:
            return self._backward[key]
        except KeyError:
            pass
        kern, N, L = self.kern, self.N, self.L
        K = self.K if has_grad_z or has_grad_ratio else 0
        grid, meta, blocks, splits, per_split = kern.backward_plan(
            K, N, L, self.dtype, self.device, has_grad_z, has_grad_kl, has_grad_ratio, self.stop_score, z_scale)
        part, counters = kern.split_buffers(N, L, self.dtype, self.device, blocks, splits, has_grad_ratio,
                                            self.stop_score)
        plan = Launch(kern._sample_normal_bwd_kernel, grid, meta), part, counters, per_split, splits, K
        self._backward[key] = plan
        return plan


class Link:
    """What the tail tells the sampler's backward: DReG's per-sample weight
    of z's gradient (None for the other estimators)."""

    __slots__ = ("scale",)

    def __init__(self):
        self.scale = None


class Sample(torch.autograd.Function):
    """z, kl (and the latent term) of a SamplePlan: SampleNormal's and
    SampleNormalWithRatio's forward and backward kernels, without their
    per-call layout work (the plan did it)."""

    @staticmethod
    def forward(ctx, mu, logvar, seed, plan, link):
        # an encoder's halves (h.chunk(2, -1)) are read in place (the plan key
        # holds their strides); other strided inputs from contiguous copies,
        # made once here and kept for the backward (mu itself when contiguous)
        mu2, lv2 = (mu, logvar) if plan.in_place else (mu.contiguous(), logvar.contiguous())
        z, kl = empty(plan.z_like), empty(plan.kl_like)
        ratio = empty(plan.ratio_like) if plan.with_ratio else None
        if plan.forward is not None:
            plan.forward(mu2, lv2, seed, z, kl, kl if ratio is None else ratio, *plan.ints)
        else:
            plan.kern.sample_normal_forward(mu2, lv2, seed, 0, 0, 0, z.view(plan.K, plan.N, plan.L), kl, ratio)
        ctx.save_for_backward(mu2, lv2, seed, mu, logvar)  # the inputs, for a double backward
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.link = plan, link
        return (z, kl) if ratio is None else (z, kl, ratio)

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_ratio=None):
        if grad_z is None and grad_kl is None and grad_ratio is None:
            return None, None, None, None, None
        mu2, lv2, seed, mu, logvar = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.link.scale
        if grad_z is None:
            scale = None
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph
            if scale is not None:  # DReG: the path derivative weighted by w~^2
                grad_z = _double_backward.dreg_once(grad_z * scale.unsqueeze(-1))
            return (*sample_normal_double_backward(grad_z, grad_kl, grad_ratio, plan.stop_score, mu, logvar, seed,
                                                   plan.mu_like.view(plan.N, plan.L), plan.K), None, None, None)
        dmu, dlogvar = empty(plan.mu_like), empty(plan.mu_like)
        if plan.N * plan.L == 0:
            return dmu, dlogvar, None, None, None
        grad_z = None if grad_z is None else grad_z.contiguous()
        # DReG: the kernel weights grad_z's rows by w~ (the tail's ``link.scale``)
        run, part, counters, per_split, splits, K = plan.backward(grad_z is not None, grad_kl is not None,
                                                                  grad_ratio is not None, scale is not None)
        run(mu2 if grad_z is None else grad_z, mu2 if grad_kl is None else grad_kl,
            mu2 if grad_ratio is None else grad_ratio.contiguous(), mu2, lv2, seed, dmu, dlogvar, part, counters,
            mu2 if scale is None else scale, plan.N, plan.L, plan.N * plan.L, plan.in_stride, K, per_split, splits)
        return dmu, dlogvar, None, None, None


class FamilySamplePlan:
    """The launches before the decoder for a latent family's posterior, a
    location-scale family's (loc, log_scale), the exponential's log-rate or
    a Weibull's or Kumaraswamy's (log p0, log p1) (N, L), N L > 0 (float32
    or float64), and K samples, against a prior of its closed-form KL (its
    own family; a Beta for the Kumaraswamy), one for every row ((L,):
    ``p_shared``) or one per row ((N, L)). A location-scale family's:
    sample_location_scale's _kl kernels, the draw (z alone: the bound needs
    no log q) and family_kl's closed form summed over L in one kernel each
    way. A positive family's: the sampler's forward and backward kernels and
    family_kl's, its backward adding q's gradients to the sampler's (the
    general launchers' sample_positive_kl). The same variants as the general
    launchers' (sample_location_scale's kl_*_plan; kernels/sampler.py's
    family_*_plan, family_kl's *_plan). ``q_scale``: the posterior comes as
    its scale (or rate; a positive pair's two parameters), whose log the plan
    takes (a torch object's), else as its log; ``q_high``: as (low, high),
    a torch Uniform's, whose log(high - low) the plan takes. ``cpp``: the cpp backend's:
    one C++ call each way, the sampler's _kl kernels (sample_location_scale's,
    or sample_positive's), which run the KL inside the sampler's loops
    (nothing to plan but the layout)."""

    def __init__(self, sampler: str, family: int, kl_family: int, shape: torch.Size, dtype: torch.dtype,
                 device: torch.device, n_samples: int | None, p_shared: bool, q_scale: bool, general,
                 cpp: bool = False, q_high: bool = False):
        self.has_loc = sampler == "sample_location_scale"  # else the positive families' log parameters
        # two log parameters (the Weibull's, the Kumaraswamy's), the first in the location's place: a torch
        # object's two parameters are logged, as the exponential's rate and a location-scale family's scale
        self.pair = not self.has_loc and family != 0
        self.cpp = cpp
        L = shape[-1]
        N = shape.numel() // L
        K = 1 if n_samples is None else n_samples
        self.N, self.L, self.K, self.n_samples = N, L, K, n_samples
        self.family, self.kl_family, self.p_shared, self.q_scale = family, kl_family, p_shared, q_scale
        self.q_high = q_high
        self.prior_log = [None, None]  # _prior_log's kept (key, the prior's parameter, its log) by slot
        self.dtype, self.device = dtype, device
        self.general = general  # the general composition (objectives), which a create_graph backward replays
        self.mu_like = template(shape, dtype, device)
        self.z_like = template(shape if n_samples is None else (K, *shape), dtype, device)
        self.kl_like = template(shape[:-1], dtype, device)
        self.ints = (0, N * L, L, N, K * N, L)  # offset0, sample_stride, row_stride, N, KN, L
        if cpp:
            self.kl_kernels = f"{sampler}_kl_forward", f"{sampler}_kl_backward"
            return
        self.sampler = _kernels("sample_family")
        self.sums = self.sampler.SPLIT_SUMS[sampler]  # a split backward's partial sums per element
        self._backward = None
        self._kl_backward: dict = {}
        if self.has_loc:  # the draw and the KL in one kernel each way
            grid, meta = self.sampler.kl_forward_plan(K, N, L, dtype, device, family, kl_family, p_shared)
            self.forward = Launch(self.sampler._sample_location_scale_kl_fwd_kernel, grid, meta)
            return
        kernels = _kernels("sampler")
        self.kernel_names = f"_{sampler}_fwd_kernel", f"_{sampler}_bwd_kernel"
        self.kl = _kernels("family_kl")
        grid, meta = kernels.family_forward_plan(K, N, L, dtype, device, family, False, 0, N * L, L)
        self.forward = Launch(getattr(self.sampler, self.kernel_names[0]), grid, meta)
        grid, meta = self.kl.forward_plan(N, L, dtype, kl_family, p_shared, True)
        self.kl_forward = Launch(self.kl._family_kl_fwd_kernel, grid, meta)

    def backward(self):
        """(launch, partial sums, counters, samples per split, splits) of the
        sampler's backward from grad_z: made at the first backward, kept."""
        if self._backward is None:
            kernels = _kernels("sampler")
            grid, meta, blocks, splits, per_split = kernels.family_backward_plan(
                self.K, self.N, self.L, self.dtype, self.device, self.family, True, False, False)
            part, counters = kernels.family_split_buffers(self.sums, self.N, self.L, self.dtype, self.device, blocks,
                                                          splits)
            self._backward = (Launch(getattr(self.sampler, self.kernel_names[1]), grid, meta), part, counters,
                              per_split, splits)
        return self._backward

    def fused_backward(self, has_grad_z: bool, has_grad_kl: bool, has_dp: bool):
        """(launch, partial sums, counters, samples per split, splits) of a
        location-scale family's draw and KL gradients in one kernel, per
        variant: made at its first backward, kept."""
        key = has_grad_z, has_grad_kl, has_dp
        made = self._kl_backward.get(key)
        if made is None:
            K = self.K if has_grad_z else 0
            grid, meta, blocks, splits, per_split = self.sampler.kl_backward_plan(
                K, self.N, self.L, self.dtype, self.device, self.family, self.kl_family, self.p_shared, *key)
            part, counters = _kernels("sampler").family_split_buffers(2, self.N, self.L, self.dtype, self.device,
                                                                      blocks, splits)
            made = self._kl_backward[key] = (Launch(self.sampler._sample_location_scale_kl_bwd_kernel, grid, meta),
                                             part, counters, K, per_split, splits)
        return made

    def kl_backward(self, has_dp: bool, accumulate: bool) -> Launch:
        """family_kl's backward, with the prior's gradients (``has_dp``) or
        without, adding q's to the sampler's (``accumulate``) or not."""
        launch = self._kl_backward.get((has_dp, accumulate))
        if launch is None:
            grid, meta = self.kl.backward_plan(self.N, self.L, self.dtype, self.kl_family, self.p_shared, True,
                                               has_dp, accumulate)
            launch = self._kl_backward[has_dp, accumulate] = Launch(self.kl._family_kl_bwd_kernel, grid, meta)
        return launch


def _prior_log(plan: FamilySamplePlan, p_b: Tensor, slot: int) -> Tensor:
    """log of a torch prior's parameter ``p_b`` (its scale or rate: slot 0; a
    positive pair's first parameter: slot 1), kept on the plan for the
    next call while p_b holds the same values: a training loop's prior is a
    fixed tensor, which torch's distribution hands back as a new view of it at
    every construction, so its log would otherwise cost a torch op (a launch,
    on a GPU) a step. The same values: the same memory (the plan keeps p_b, so
    its memory is not reused) and the same version of it (an in-place write
    bumps the version that every view of the memory shares). A prior that
    requires grad (a learned one: new values every step) or an inference
    tensor (no version kept) is not kept."""
    key = None if p_b.requires_grad or p_b.is_inference() else (p_b.data_ptr(), p_b._version, p_b.shape,
                                                                  p_b.stride(), p_b.dtype)
    kept = plan.prior_log[slot]
    if key is not None and kept is not None and kept[0] == key:
        return kept[2]
    log = torch.log(p_b)
    if key is not None and not torch.is_inference_mode_enabled():
        plan.prior_log[slot] = (key, p_b, log)
    return log


class FamilySample(torch.autograd.Function):
    """z and the closed-form KL of a FamilySamplePlan: its kernels, the
    general path's (SampleLocationScaleKL, or SamplePositiveKL) without their
    per-call layout work. q comes
    as (loc, its scale or, without the plan's q_scale, its log-scale), a
    torch Uniform's (low, high) with the plan's q_high (``check_width``: its
    high - low's value check, the general path's, run here on the width taken),
    (None, the exponential's rate or log-rate) or a positive pair's (p0, p1)
    (with q_scale both logged, as the general path's records log a torch
    object's), the prior likewise (its scales: ``p_scale``) in the kernels'
    layout ((L,) or (N, L), contiguous); the logs are taken here and
    differentiated as autograd would (grad / scale), and q's gradients are
    the sampler's plus the KL's, added in the backward kernel that writes
    them last."""

    @staticmethod
    def forward(ctx, loc, q_b, p_loc, p_b, seed, plan, p_scale, check_width):
        width = None
        # the cpp kernels take the scale (or width) as it is: `log_scale` then holds it
        of_scale = plan.cpp and plan.has_loc and (plan.q_scale or plan.q_high) and SCALE_IN_KERNELS
        if plan.q_high:  # one pass for the width: the check reads the one the log takes
            width = q_b - loc
            if check_width:
                _value_checks.positive_scale(width, "the posterior's high - low (torch Uniform)")
            log_scale = width if of_scale else torch.log(width)
        else:
            log_scale = torch.log(q_b) if plan.q_scale and not of_scale else q_b
        p_log_scale = _prior_log(plan, p_b, 0) if p_scale else p_b
        # a positive pair's first log parameter, in the location's place
        log_loc = torch.log(loc) if plan.pair and plan.q_scale else loc
        p_log_loc = _prior_log(plan, p_loc, 1) if plan.pair and p_scale else p_loc
        z, kl = empty(plan.z_like), empty(plan.kl_like)
        if plan.cpp:
            N, L = plan.N, plan.L
            _backend.launch_cpp(plan.kl_kernels[0], z.numel(), _SCALE_OPTIONS[of_scale],
                                **_cpp_parameters(plan.has_loc, _rows(log_loc, N, L), _rows(log_scale, N, L),
                                                  p_log_loc, p_log_scale),
                                seed=seed, family=plan.family, kl_family=plan.kl_family, z=z.view(plan.K, N, L),
                                kl=kl.view(N))
        elif plan.has_loc:
            plan.forward(loc, log_scale, p_loc, p_log_scale, seed, z, kl, plan.N * plan.L, plan.N, plan.K * plan.N,
                         plan.L)
        else:  # the positive sampler: (log p0, log p1), the exponential's one parameter twice
            q0 = log_scale if log_loc is None else log_loc
            plan.forward(q0, log_scale, seed, z, z, *plan.ints)
            plan.kl_forward(q0, log_scale, log_scale if p_log_loc is None else p_log_loc, p_log_scale, kl, plan.N,
                            plan.L)
        ctx.save_for_backward(log_loc, log_scale, p_log_loc, p_log_scale, seed, loc, q_b, p_loc, p_b, width)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.p_scale, ctx.of_scale = plan, p_scale, of_scale
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        log_loc, log_scale, p_log_loc, p_log_scale, seed, loc, q_b, p_loc, p_b, width = ctx.saved_tensors
        plan, needs = ctx.plan, ctx.needs_input_grad
        if grad_z is None and grad_kl is None:
            return None, None, None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: the general composition's graph
            with torch.enable_grad():
                # from aliases of the inputs: one input may be a function of another (a torch
                # Uniform's high = low + width), and the gradient in an input itself must not
                # take the paths through the other, which autograd adds to it outside this node
                loc, q_b, p_loc, p_b = (None if t is None else t.view_as(t) for t in (loc, q_b, p_loc, p_b))
                ls = torch.log(q_b - loc) if plan.q_high else torch.log(q_b) if plan.q_scale else q_b
                p_ls = torch.log(p_b) if ctx.p_scale else p_b
                q0 = torch.log(loc) if plan.pair and plan.q_scale else loc
                p0 = torch.log(p_loc) if plan.pair and ctx.p_scale else p_loc
                z, kl = plan.general(plan.family, plan.kl_family, q0, ls, p0, p_ls, seed, plan.n_samples)
            outs = [(o, g) for o, g in ((z, grad_z), (kl, grad_kl)) if g is not None]
            inputs = (loc, q_b, p_loc, p_b)
            wrt = [t for t, need in zip(inputs, needs[:4]) if need]
            got = iter(torch.autograd.grad([o for o, _ in outs], wrt, [g for _, g in outs], create_graph=True,
                                           allow_unused=True))
            return (*(next(got) if need else None for need in needs[:4]), None, None, None, None)
        dloc, dls = empty(plan.mu_like), empty(plan.mu_like)
        has_dp = grad_kl is not None and (needs[2] or needs[3])
        dp_loc, dp_ls = (empty(plan.mu_like), empty(plan.mu_like)) if has_dp else (None, None)
        if plan.cpp:
            N, L, K = plan.N, plan.L, plan.K
            _backend.launch_cpp(
                plan.kl_kernels[1], max(K, 1) * N * L, _SCALE_OPTIONS[ctx.of_scale],
                grad_z=None if grad_z is None else grad_z.contiguous().view(K, N, L),
                grad_kl=None if grad_kl is None else grad_kl.contiguous().view(N),
                **_cpp_parameters(plan.has_loc, _rows(log_loc, N, L), _rows(log_scale, N, L), p_log_loc,
                                  p_log_scale),
                seed=seed, family=plan.family, kl_family=plan.kl_family,
                **_cpp_gradients(plan.has_loc, plan.pair, *(_rows(t, N, L) for t in (dloc, dls, dp_loc, dp_ls))))
        elif plan.has_loc:
            run, part, counters, K, per_split, splits = plan.fused_backward(grad_z is not None, grad_kl is not None,
                                                                            has_dp)
            run(loc if grad_z is None else grad_z.contiguous(), loc if grad_kl is None else grad_kl.contiguous(), loc,
                log_scale, p_loc, p_log_scale, seed, dloc, dls, dloc if dp_loc is None else dp_loc,
                dls if dp_ls is None else dp_ls, part, counters, plan.N, plan.L, plan.N * plan.L, K, per_split,
                splits)
        else:  # the positive sampler: the exponential's takes its one parameter twice and writes a second
            # gradient to scratch (dloc)
            q0 = log_scale if log_loc is None else log_loc
            if grad_z is not None:
                run, part, counters, per_split, splits = plan.backward()
                d0, d1 = (dls, dloc) if log_loc is None else (dloc, dls)
                run(grad_z.contiguous(), q0, q0, log_scale, seed, d0, d1, part, counters, plan.N,
                    plan.L, plan.N * plan.L, plan.K, per_split, splits)
            if grad_kl is not None:
                plan.kl_backward(has_dp, grad_z is not None)(
                    grad_kl.contiguous(), q0, log_scale, log_scale if p_log_loc is None else p_log_loc, p_log_scale,
                    dloc, dls, dls if dp_loc is None else dp_loc, dls if dp_ls is None else dp_ls, plan.N, plan.L)
        if has_dp and plan.p_shared:  # the prior's, summed back to its (L,)
            dp_loc, dp_ls = (None if p_loc is None else dp_loc.sum(0)), dp_ls.sum(0)
        if dp_ls is not None and ctx.p_scale:
            dp_ls = dp_ls / p_b
            if plan.pair:
                dp_loc = dp_loc / p_loc
        # the logs' gradients as autograd's (grad / scale), in the kernels' own
        # buffers: high - low's, d/dhigh = t = grad / width and d/dlow = dloc - t
        # (autograd's dloc + (-t), the same bits)
        if plan.q_high:
            if not ctx.of_scale:  # (else the kernel's gradient is the width's already)
                dls = dls.div_(width)
            dloc = dloc.sub_(dls)
        elif plan.q_scale and not ctx.of_scale:  # (of_scale: the kernel's gradient is the scale's already)
            dls = dls.div_(q_b)
            if plan.pair:
                dloc = dloc.div_(loc)
        return (dloc if needs[0] else None, dls if needs[1] else None, dp_loc if needs[2] else None,
                dp_ls if needs[3] else None, None, None, None, None)


_SCALE_OPTIONS = ({}, {"of_scale": True})  # launch_cpp's options: the second parameter as its log, as itself


def _rows(t: Tensor | None, N: int, L: int) -> Tensor | None:
    """A q-shaped tensor as the kernels' (N, L) view."""
    return None if t is None else t.view(N, L)


def _cpp_parameters(has_loc: bool, loc, log_scale, p_loc, p_log_scale) -> dict:
    """The fused C++ kernels' parameters by name: sample_location_scale_kl's,
    or sample_positive_kl's: a positive pair's (loc: its first log
    parameter), or the exponential's log-rates (loc None) and stand-ins that
    no formula reads (the log-rates again)."""
    if has_loc:
        return dict(loc=loc, log_scale=log_scale, prior_loc=p_loc, prior_log_scale=p_log_scale)
    if loc is not None:
        return dict(log_p0=loc, log_p1=log_scale, prior_log_p0=p_loc, prior_log_p1=p_log_scale)
    return dict(log_p0=log_scale, log_p1=log_scale, prior_log_p0=p_log_scale, prior_log_p1=p_log_scale)


def _cpp_gradients(has_loc: bool, pair: bool, dloc, dls, dp_loc, dp_ls) -> dict:
    """The fused C++ backward's gradients by name, as _cpp_parameters; the
    exponential's stand-ins' (0) go to the buffers of the locations it has not."""
    if has_loc:
        return dict(dloc=dloc, dlog_scale=dls, dprior_loc=dp_loc, dprior_log_scale=dp_ls)
    if pair:
        return dict(dlog_p0=dloc, dlog_p1=dls, dprior_log_p0=dp_loc, dprior_log_p1=dp_ls)
    return dict(dlog_p0=dls, dlog_p1=dloc, dprior_log_p0=dp_ls, dprior_log_p1=dp_loc)


# -- after the decoder: likelihood, log-mean-exp, reduction, the bound ----------------


class TailPlan:
    """The launches after the decoder for x (P, D) against a decoder output
    (K, P, D) of one dtype: the likelihood's fused tail (its op's
    ``plan_tail`` class, _spec.FusedTail: its kernels, and which decoder
    outputs fit them, which ``fit`` tells per call) and for iwae the
    log-mean-exp over K. The likelihood kernel adds the latent term to each
    row's log-likelihood (- beta KL, or + the latent log-ratio), and the last
    kernel (the likelihood's for elbo, the log-mean-exp's for iwae) reduces the
    rows to the bound's mean or sum (kernels/_common.py's bound_epilogue);
    their backward kernels read the reduced bound's scalar gradient and write
    the latent term's. This plan keeps what every likelihood shares: the
    reduction's buffers and counter, the latent term's weight, the
    log-mean-exp's launches and DReG's weights. ``general`` is the general
    composition of the same tail (objectives._general_elbo_tail /
    _general_iwae_tail), which a create_graph=True backward replays: passed in
    by the objectives, the layer above this one."""

    def __init__(self, likelihood: str, K: int, P: int, D: int, dtype: torch.dtype, device: torch.device,
                 reduction: str, batch_shape: torch.Size, iwae: bool, general=None, out_shape=None,
                 out_dtype: torch.dtype | None = None):
        self.likelihood, self.K, self.P, self.D = likelihood, K, P, D
        # the decoder output's dtype, which picks the likelihood kernels' variants (a
        # half-precision output under autocast); ``dtype`` is the compute dtype
        # (x's, the log-probabilities', the bound's)
        self.out_dtype = odt = dtype if out_dtype is None else out_dtype
        self.general = general
        self.dtype, self.device, self.reduction, self.iwae = dtype, device, reduction, iwae
        # the bound reduced to a scalar in a kernel: its rows' (or columns') sum over divisor
        self.reduced = reduction != "none"
        self.divisor = P if reduction == "mean" else 1
        self.bound_like = template((), dtype, device) if self.reduced else None
        self.term_like = template((K, *batch_shape) if iwae else batch_shape, dtype, device)
        common = _kernels("_common")  # the kernels' shared helpers (Triton: imported by the first plan)
        self.float64_bits = common.float64_bits
        self.beta, self.term_bits = 1.0, common.float64_bits(-1.0)  # elbo: the KL's weight -beta, float64 bits
        # the likelihood kernel's own reduction: elbo's; iwae's is the log-mean-exp's
        reduce = self.reduced and not iwae
        acc = _backend.accumulation_dtype(dtype)
        # the stand-ins for the buffers a likelihood kernel's variant never touches
        placeholder = torch.empty((1,), dtype=acc, device=device)
        counters = torch.empty((1,), dtype=torch.int32, device=device)
        # the reductions' arrival counter, zero between launches, and (below) their
        # partial sums: the plan's own, so a plan serves one stream at a time (a
        # training loop's; a CUDA graph captures their addresses, as it does the
        # templates')
        self.counter = common.tile_counters(device, 1)
        # the likelihood's own part, from its op folder (KeyError: a likelihood
        # the objectives' checks let through without a plan_tail)
        self.lik = lik = _registry.plan_tail(likelihood)(
            K, P, D, dtype, odt, device, reduce, iwae, out_shape, len(batch_shape) + iwae, placeholder, counters)
        # the steady-state call's question, asked of the likelihood's tail without a layer between
        self.fit = lik.fit
        self.lik_forward, self.lik_backward = lik.forward, lik.backward
        # the elbo's partial sums: one a program of the likelihood's forward
        self.parts = common.bound_parts(lik.programs, dtype, device) if reduce else None
        if iwae:  # the log-mean-exp's value (or the bound) and column state
            self.value_like = template(batch_shape, dtype, device)
            self.state_like = template((P,), acc, device)
            lme = _kernels("logmeanexp")
            planned = lme.forward_plan(K, P, dtype, device, self.reduced)
            self.lme_forward = self.lme_split = None
            if planned is not None:
                grid, meta, rows = planned
                self.lme_forward = Launch(lme._logmeanexp_fwd_kernel, grid, meta)
                self.lme_ints = (K, P, rows, 1, self.divisor)
                self.lme_parts = common.bound_parts(grid[0], dtype, device) if self.reduced else None
            else:  # a GPU splits the columns over programs (many samples, few rows): two launches
                grid, meta, finish_grid, finish_meta, splits, rows = lme.split_plan(K, P, dtype, device)
                self.lme_split = (Launch(lme._logmeanexp_fwd_kernel, grid, meta),
                                  Launch(lme._logmeanexp_finish_kernel, finish_grid, finish_meta))
                self.lme_split_ints = (K, P, rows, 1, 1), (K, P, splits, 1)
                # the splits' partial column states (max, sum of exp): the plan's own, as its other buffers
                self.lme_split_parts = torch.empty((2, splits, P), dtype=acc, device=device)
            # the backward at a gradient per column (DReG's weights, reduction="none") or at the
            # bound's scalar gradient; with DReG's weighted dlw or without: (g_scalar, weighted) -> launch
            self.lme_backward = {}
            for g_scalar, weighted in itertools.product((False, True), repeat=2):
                grid, meta = lme.backward_plan(K, P, dtype, device, False, False, g_scalar, weighted)
                self.lme_backward[g_scalar, weighted] = Launch(lme._logmeanexp_bwd_kernel, grid, meta)
            self.ones = torch.ones((P,), dtype=acc, device=device)  # DReG's weights: the backward at grad 1

    def weight_bits(self, beta: float) -> int:
        """The float64 bits of -beta, the KL's weight (elbo), kept for the last beta."""
        if beta != self.beta:
            self.beta, self.term_bits = beta, self.float64_bits(-beta)
        return self.term_bits

    def log_prob(self, x: Tensor, out: Tensor, aux: Tensor | None, term: Tensor, term_bits: int,
                 reduce: bool) -> Tensor:
        """log p(x | z) + w term for the decoder output ``out`` and ``aux``
        as fit gives them (aux None: a tensor the likelihood reads alone, as
        the logits), w the float64 of term_bits: per row (K, P), or with
        ``reduce`` their sum over divisor, a scalar."""
        if reduce:
            res, part, counter = empty(self.bound_like), self.parts, self.counter
        else:
            res = empty(self.term_like)
            part = counter = res  # placeholders the kernel never touches, as the launchers pass
        self.lik_forward(x, out, aux, res, term, part, counter, term_bits, self.divisor)
        return res

    def log_prob_backward(self, grad: Tensor, x: Tensor, out: Tensor, aux: Tensor | None, dterm: Tensor | None,
                          term_bits: int) -> Tensor:
        """The gradient of the decoder output ``out`` (log_prob's) given the
        rows' gradient ``grad`` (K, P), or (elbo, reduced) the bound's scalar
        one; for elbo ``dterm`` <- the KL's (w times each row's gradient)."""
        dout = empty(out)
        if dterm is None:
            dterm = dout  # a placeholder the kernel never touches, as the launchers pass
        self.lik_backward(grad, x, out, aux, dout, dterm, term_bits, self.divisor)
        return dout

    def log_mean_exp(self, lw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """iwae: the bound (reduced, or per column) of the rows ``lw`` (K, P),
        with the log-mean-exp's state (lw_max, sumexp) that its backward reads."""
        lw_max, sumexp = empty(self.state_like), empty(self.state_like)
        if self.lme_forward is not None:
            if self.reduced:
                value, part = empty(self.bound_like), self.lme_parts
            else:  # no reduction: a placeholder the kernel never touches, as the launcher passes
                value, part = empty(self.value_like), sumexp
            self.lme_forward(lw, lw, part, sumexp, sumexp, lw_max, sumexp, value, sumexp, sumexp, sumexp,
                             self.counter if self.reduced else sumexp, *self.lme_ints)
        else:  # columns split over programs: two launches, then the reduction
            value = empty(self.value_like)
            (split, finish), (split_ints, finish_ints) = self.lme_split, self.lme_split_ints
            part_m, part_s = self.lme_split_parts
            split(lw, lw, part_m, part_s, part_s, lw_max, sumexp, value, sumexp, sumexp, sumexp, sumexp, *split_ints)
            finish(part_m, part_s, part_s, lw_max, sumexp, value, sumexp, sumexp, sumexp, *finish_ints)
            if self.reduced:
                value = value.mean() if self.reduction == "mean" else value.sum()
        return value, lw_max, sumexp

    def dreg_weights(self, lw: Tensor, lw_max: Tensor, sumexp: Tensor) -> Tensor:
        """DReG's normalized weights (K, P): the log-mean-exp's backward at gradient 1."""
        scale = empty(lw)
        self.lme_backward[False, False](lw, lw_max, sumexp, self.ones, self.ones, self.ones, scale, scale,
                                        self.K, self.P, 1)
        return scale


def _replay_grads(bound: Tensor, inputs: tuple, needs: tuple, grad: Tensor) -> list:
    """create_graph=True: the gradients of the general composition's ``bound``
    (rebuilt from the saved inputs), with their graph."""
    wrt = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(bound, wrt, grad, create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in needs]


class ElboTail(torch.autograd.Function):
    """reduce(log p(x | z) - beta * kl), n_samples = 1: the likelihood's
    forward kernel, which subtracts beta * kl from each row and reduces the
    rows; the backward is the likelihood's backward kernel, which divides the
    bound's gradient among the rows and writes the KL's."""

    @staticmethod
    def forward(ctx, x, out, kl, plan, beta, aux):
        bits = plan.weight_bits(beta)
        bound = plan.log_prob(x, out, aux, kl, bits, plan.reduced)
        ctx.save_for_backward(x, out, kl)
        ctx.plan, ctx.beta, ctx.bits, ctx.aux = plan, beta, bits, aux
        return bound

    @staticmethod
    def backward(ctx, g):
        plan, beta = ctx.plan, ctx.beta
        x, out, kl = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the general composition's graph
            with torch.enable_grad():
                dec = plan.lik.general_output(out, ctx.aux)
                bound = plan.general(x, dec, kl, plan.likelihood, beta, plan.reduction)
            dx, dout, dkl = _replay_grads(bound, (x, out, kl), ctx.needs_input_grad[:3], g)
            return dx, dout, dkl, None, None, None
        dkl = empty(kl)  # written whether or not asked for: one kernel variant
        dout = plan.log_prob_backward(g.contiguous(), x, out, ctx.aux, dkl, ctx.bits)
        needs = ctx.needs_input_grad
        return None, dout if needs[1] else None, dkl if needs[2] else None, None, None, None


class IwaeTail(torch.autograd.Function):
    """reduce(logmeanexp_k(log p(x | z) + latent_k)): the likelihood's forward
    kernel, which adds the latent term, then the log-mean-exp kernel, which
    reduces the columns, as objectives._iwae composes them; with DReG also the
    normalized weights (the log-mean-exp backward kernel at gradient 1) that
    scale the encoder's gradients (``link.scale``)."""

    @staticmethod
    def forward(ctx, x, out, latent, plan, link, dreg, aux):
        lw = plan.log_prob(x, out, aux, latent, ONE_BITS, False)
        value, lw_max, sumexp = plan.log_mean_exp(lw)
        if dreg and latent.requires_grad:
            link.scale = plan.dreg_weights(lw, lw_max, sumexp)
        ctx.save_for_backward(x, out, latent, lw, lw_max, sumexp)
        ctx.plan, ctx.link, ctx.aux = plan, link, aux
        return value

    @staticmethod
    def backward(ctx, g):
        plan, scale = ctx.plan, ctx.link.scale
        x, out, latent, lw, lw_max, sumexp = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the general composition's graph
            with torch.enable_grad():
                dec = plan.lik.general_output(out, ctx.aux)
                bound = plan.general(x, dec, latent, plan.likelihood, plan.reduction)
            dx, dout, dlatent = _replay_grads(bound, (x, out, latent), ctx.needs_input_grad[:3], g)
            if scale is not None and dlatent is not None:
                dlatent = _double_backward.dreg_once(dlatent * scale)
            return dx, dout, dlatent, None, None, None, None
        dlw = empty(lw)
        g = g.contiguous()
        # the reduced bound's gradient divided among the columns, and DReG's latent
        # gradient dlw w~, in the kernel
        weighted = scale is not None and ctx.needs_input_grad[2]
        dlatent = empty(lw) if weighted else dlw
        plan.lme_backward[plan.reduced, weighted](lw, lw_max, sumexp, g, g, g, dlw, dlatent, plan.K, plan.P,
                                                  plan.divisor)
        if not ctx.needs_input_grad[2]:
            dlatent = None
        dout = plan.log_prob_backward(dlw, x, out, ctx.aux, None, 0) if ctx.needs_input_grad[1] else None
        return None, dout, dlatent, None, None, None, None


ONE_BITS = 0x3FF0000000000000  # iwae: the latent term's weight, +1 (kernels._common.float64_bits(1.0))


# -- the steady-state call -------------------------------------------------------------


class Plan:
    """What fastvae.elbo / fastvae.iwae keep per call signature (PLANS): the
    sampler's plan and the tail's (either None: on the cpp backend the plan is
    the checks alone; without a tail plan, several ELBO samples or an empty
    batch, the general tail runs), the likelihood, the reduction, the number of
    samples (n_samples or k), DReG, and ``general``: the objectives' general
    composition of the tail (the layer above this one passes it in), which
    also serves a decoder output the tail plan does not fit."""

    __slots__ = ("sample", "tail", "likelihood", "reduction", "n", "dreg", "general")

    def __init__(self, sample: SamplePlan | None, tail: TailPlan | None, likelihood: str, reduction: str, n: int,
                 dreg: bool, general):
        self.sample, self.tail, self.likelihood, self.reduction = sample, tail, likelihood, reduction
        self.n, self.dreg, self.general = n, dreg, general


NO_LINK = Link()  # no DReG weight: never written


def launches(plan) -> list[Launch]:
    """Every Launch ``plan`` holds (a Plan, or the SamplePlan or TailPlan that
    a graph op of fastvae/_plan_ops.py keeps), made or not yet called: tests/test_plan.py
    and benchmarks/bench_host_cost.py read from each whether it launches
    directly (``direct``) after its first call."""
    found: list[Launch] = []

    def walk(value) -> None:
        if isinstance(value, Launch):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for part in (plan.sample, plan.tail) if isinstance(plan, Plan) else (plan,):
        if part is not None:
            walk(list(vars(part).values()))
            if isinstance(part, TailPlan):  # the likelihood's own launches
                walk(list(vars(part.lik).values()))
    return found


def _seed(device: torch.device, generator) -> Tensor:
    """_op.draw_seed's seed; with torch's default generator drawn here (the
    same call), so that the steady-state call stays in this module."""
    if generator is None:
        return torch.randint(0, _op.SEED_HIGH, (), dtype=torch.int64, device=device)
    return _op.draw_seed(device, generator)


def run_elbo(plan: Plan, x: Tensor, mu: Tensor, logvar: Tensor, decode, beta: float, generator) -> Tensor:
    """fastvae.elbo once the objectives found its plan (triton backend): the
    sampler's node, the decoder, the tail's node."""
    z, kl = sample(mu, logvar, _seed(mu.device, generator), plan.sample, NO_LINK)
    try:  # free until it raises: no call on the hot path (benchmarks/path_trace.py)
        out = decode(z)
    except Exception as error:
        note_call(error, decode, z, "decode", "z", None if plan.n == 1 else "n_samples", DECODER_DOCS)
        raise
    tail = plan.tail
    if tail is not None and (fit := tail.fit(out)) is not None:
        return elbo_tail(x, fit[0], kl, tail, beta, fit[1])
    return plan.general(x, out, kl, plan.likelihood, beta, plan.reduction, plan.n)


def run_iwae(plan: Plan, x: Tensor, mu: Tensor, logvar: Tensor, decode, generator) -> Tensor:
    """fastvae.iwae (alpha = 0, beta = 1) once the objectives found its plan
    (triton backend): the sampler's node, the decoder, the tail's node; with
    DReG the tail hands the sampler's backward its weights (Link)."""
    link = Link() if plan.dreg else NO_LINK
    z, _, latent = sample(mu, logvar, _seed(mu.device, generator), plan.sample, link)
    try:  # free until it raises: no call on the hot path (benchmarks/path_trace.py)
        out = decode(z)
    except Exception as error:
        note_call(error, decode, z, "decode", "z", "k", DECODER_DOCS)
        raise
    tail = plan.tail
    if tail is not None and (fit := tail.fit(out)) is not None:
        return iwae_tail(x, fit[0], latent, tail, link, plan.dreg, fit[1])
    return plan.general(x, out, latent, plan.likelihood, plan.reduction, z if plan.dreg else None)


def run_family_elbo(plan: Plan, x: Tensor, loc: Tensor | None, q_b: Tensor, p_loc: Tensor | None, p_b: Tensor,
                    p_scale: bool, decode, beta: float, generator, check_width: bool = False) -> Tensor:
    """fastvae.elbo of a latent family's posterior against a prior of its
    own family once the objectives found its plan (triton backend): the
    sampler's and the KL's node, the decoder, the tail's node (FamilySample
    says what loc, q_b, p_b and p_scale are)."""
    z, kl = family_sample(loc, q_b, p_loc, p_b, _seed(q_b.device, generator), plan.sample, p_scale, check_width)
    try:  # free until it raises: no call on the hot path (benchmarks/path_trace.py)
        out = decode(z)
    except Exception as error:
        note_call(error, decode, z, "decode", "z", None if plan.n == 1 else "n_samples", DECODER_DOCS)
        raise
    tail = plan.tail
    if tail is not None and (fit := tail.fit(out)) is not None:
        return elbo_tail(x, fit[0], kl, tail, beta, fit[1])
    return plan.general(x, out, kl, plan.likelihood, beta, plan.reduction, plan.n)


# Function.apply without its Python wrapper (which binds default arguments and
# unwraps dead functorch wrappers, a third of a small Function's cost): the
# objectives call these only outside functorch transforms, with plain tensors.
sample = super(torch.autograd.Function, Sample).apply
elbo_tail = super(torch.autograd.Function, ElboTail).apply
iwae_tail = super(torch.autograd.Function, IwaeTail).apply
family_sample = super(torch.autograd.Function, FamilySample).apply
