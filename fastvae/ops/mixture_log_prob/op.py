"""mixture_log_prob's front end: the public function, the torch.library ops
fastvae::mixture_log_prob and fastvae::mixture_log_prob_backward, their
autograd Function (whose double backward is not_twice's named error), and the
checks on a mixture's parameters (also fastvae.priors').

The log density of a diagonal Gaussian mixture (a VampPrior
or a mixture-of-Gaussians prior),

    log p(z) = log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))),

for z (..., L) against U components with means, logvars (U, L) and mixture
logits (U,) (None: equal weights 1/U).

The kernels stream over the components with a running (max, sumexp)
log-sum-exp state per row of z, so memory is O(size of z + U * L): no
(..., U, L) differences and no (..., U) table of per-component terms. The
backward keeps only z and the output: it recomputes each component's term
from them, w = exp(term - out) (the posterior responsibility of component u),
and sums the gradients of means, logvars and logits over rows in per-thread
(per-program) partial sums reduced in a fixed order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _backend, _double_backward, _validate
from ..._launch import Launch, PlanCache, template
from ..._op import define, flat, run, shaped

# The plans of the ops' own calls (a compiled graph's nodes: a mixture prior's
# density) on the triton backend, per signature (bounded: fastvae._launch.PlanCache);
# ENABLED False sends every call the general way (the tests compare the two);
# ``empty`` allocates each output like a template the plan holds (the tests'
# fixture may poison it).
OP_PLANS, ENABLED, empty = PlanCache(), True, torch.empty_like
_DTYPES = (torch.float32, torch.float64)


class MixturePlan:
    """The launches of one signature of the ops' own calls: z (N, L), means and
    logvars (U, L) and logits (U,) or none, contiguous, of one float32 or
    float64 dtype, N U L > 0. The general launchers' variants (triton.py's
    forward_plan, dz_plan, params_plan) on the same arguments: the
    forward's, and the backward's two kernels for each set of gradients asked
    for (made at first use)."""

    __slots__ = ("N", "U", "L", "dtype", "device", "has_logits", "out_like", "dz_like", "dp_like", "dlogits_like",
                 "forward", "_backward")

    def __init__(self, z: Tensor, means: Tensor, has_logits: bool):
        kern = _backend.triton_module("mixture_log_prob")
        (N, L), U, dtype, device = z.shape, means.shape[0], z.dtype, z.device
        self.N, self.U, self.L, self.dtype, self.device, self.has_logits = N, U, L, dtype, device, has_logits
        self.out_like = template((N,), dtype, device)
        self.dz_like = template((N, L), dtype, device)
        self.dp_like = template((U, L), dtype, device)
        self.dlogits_like = template((U,), dtype, device)
        self.forward = Launch(kern._mixture_fwd_kernel, *kern.forward_plan(N, U, L, dtype, device, has_logits))
        self._backward: dict = {}

    def launches(self) -> list[Launch]:
        """Every Launch the plan holds: the forward's and the backward's made so
        far (benchmarks/bench_host_cost.py reads whether each launches directly)."""
        return [self.forward, *(launch for b in self._backward.values() for launch in b[:2] if launch is not None)]

    def backward(self, need: tuple[bool, bool, bool, bool]) -> tuple:
        """(the dz Launch or None, the parameters' Launch or None, their
        runtime integers, the partial sums' templates, the counters' (n,
        splits)) of the gradients ``need`` asks for (dz, dmeans, dlogvars, dlogits)."""
        entry = self._backward.get(need)
        if entry is None:
            kern = _backend.triton_module("mixture_log_prob")
            N, U, L, dtype, device = self.N, self.U, self.L, self.dtype, self.device
            dz = Launch(kern._mixture_dz_kernel, *kern.dz_plan(N, U, L, dtype, device, self.has_logits, False)) \
                if need[0] else None
            params = ints = parts = counters = None
            if any(need[1:]):
                grid, meta, ints, part_shapes, counters = kern.params_plan(N, U, L, dtype, device, self.has_logits,
                                                                           *need[1:])
                params = Launch(kern._mixture_params_kernel, grid, meta)
                acc = _backend.accumulation_dtype(dtype)
                parts = [template(shape, acc, device) for shape in part_shapes]
            entry = self._backward[need] = (dz, params, ints, parts, counters, kern.tile_counters)
        return entry

    def run_forward(self, z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None) -> Tensor:
        """_forward's out, launched from the plan."""
        out = empty(self.out_like)
        self.forward(z, means, logvars, means if logits is None else logits, out, self.N, self.U, self.L)
        return out

    def run_backward(self, grad_out: Tensor, z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None,
                     out: Tensor, need: tuple[bool, bool, bool, bool]) -> list[Tensor]:
        """_backward's gradients, launched from the plan."""
        dz_launch, params, ints, parts, counters, tile_counters = self.backward(need)
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # (N,) in any shape: read flat
        lg = means if logits is None else logits
        grads = [empty(like) if n else None
                 for like, n in zip((self.dz_like, self.dp_like, self.dp_like, self.dlogits_like), need)]
        dz, dmeans, dlogvars, dlogits = grads
        if dz_launch is not None:  # no cast: dz is in the accumulation dtype (float32, float64)
            dz_launch(g, z, means, logvars, lg, out, dz, dz, self.N, self.U, self.L)
        if params is not None:
            params(g, z, means, logvars, lg, out, means if dmeans is None else dmeans,
                   means if dlogvars is None else dlogvars, means if dlogits is None else dlogits,
                   *(empty(like) for like in parts), tile_counters(self.device, *counters), self.N, self.U, self.L,
                   *ints)
        return [t for t in grads if t is not None]


def _op_plan(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None) -> MixturePlan | None:
    """The plan of a call of the ops themselves (MixtureLogProb hands them z
    (N, L) and the components as given, as a compiled graph calls them), or
    None (the general launch, which on CUDA pays the launch geometry and
    Triton's binding of the arguments at every call): on the triton backend,
    outside autocast, contiguous float32 or float64 tensors of one dtype and
    device, N U L > 0."""
    device = z.device
    if (not ENABLED or not _backend.op_plans_serve(device) or z.dtype not in _DTYPES or z.dim() != 2
            or means.dim() != 2 or z.numel() == 0 or means.numel() == 0 or means.shape[1] != z.shape[1]
            or logvars.shape != means.shape or (logits is not None and logits.shape != means.shape[:1])):
        return None
    for t in (z, means, logvars, logits):
        if t is not None and (t.dtype is not z.dtype or t.device != device or not t.is_contiguous()):
            return None
    key = (z.shape, means.shape, logits is not None, z.dtype, device)
    try:
        return OP_PLANS[key]
    except KeyError:
        return OP_PLANS.store(key, MixturePlan(z, means, logits is not None))


def _forward(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None) -> Tensor:
    """out (N,) for z (N, L), means and logvars (U, L), logits (U,) or None;
    from a plan where _op_plan takes the call (a compiled graph's node on CUDA)."""
    if (plan := _op_plan(z, means, logvars, logits)) is not None:
        return plan.run_forward(z, means, logvars, logits)
    backend = _backend.backend_for(z.device)
    dtype = _backend.compute_dtype(z, means, logvars, logits)
    z, means, logvars, logits = (_backend.kernel_input(backend, t, dtype) for t in (z, means, logvars, logits))
    N, L = z.shape
    U = means.shape[0]
    out = _backend.empty_output((N,), like=z, dtype=dtype)
    _backend.launch(
        backend, "mixture_log_prob_forward", N * U * max(L, 1),
        z=z.contiguous(), means=means.contiguous(), logvars=logvars.contiguous(),
        logits=None if logits is None else logits.contiguous(), out=out,
    )
    return out


def _backward(grad_out: Tensor, z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None, out: Tensor,
              need_dz: bool, need_dmeans: bool, need_dlogvars: bool, need_dlogits: bool) -> list[Tensor]:
    """The gradients asked for, in the order dz (N, L), dmeans, dlogvars (U, L),
    dlogits (U,); from a plan as the forward's."""
    need = (need_dz, need_dmeans, need_dlogvars, need_dlogits and logits is not None)
    if (any(need) and grad_out.dtype is z.dtype and out.dtype is z.dtype and out.is_contiguous()
            and (plan := _op_plan(z, means, logvars, logits)) is not None):
        return plan.run_backward(grad_out, z, means, logvars, logits, out, need)
    backend = _backend.backend_for(z.device)
    N, L = z.shape
    U = means.shape[0]
    need_dlogits = need_dlogits and logits is not None
    inputs = z, means, logvars, logits
    dtype = _backend.compute_dtype(*inputs)
    z, means, logvars, logits, out = (_backend.kernel_input(backend, t, dtype) for t in (*inputs, out))
    dz = _backend.empty_output((N, L), like=z) if need_dz else None
    dmeans = _backend.empty_output((U, L), like=means) if need_dmeans else None
    dlogvars = _backend.empty_output((U, L), like=logvars) if need_dlogvars else None
    dlogits = _backend.empty_output((U,), like=logits) if need_dlogits else None
    if need_dz or need_dmeans or need_dlogvars or need_dlogits:
        _backend.launch(
            backend, "mixture_log_prob_backward", N * U * max(L, 1),
            grad_out=grad_out.to(dtype).reshape(N).contiguous(), z=z.contiguous(), means=means.contiguous(),
            logvars=logvars.contiguous(), logits=None if logits is None else logits.contiguous(),
            out=out.contiguous(), dz=dz, dmeans=dmeans, dlogvars=dlogvars, dlogits=dlogits,
        )
    return [_backend.in_dtype(g, t.dtype) for g, t in zip((dz, dmeans, dlogvars, dlogits), inputs) if g is not None]


def _backward_fake(grad_out, z, means, logvars, logits, out, need_dz, need_dmeans, need_dlogvars, need_dlogits):
    grads = []
    if need_dz:
        grads.append(torch.empty_like(z))
    grads += [torch.empty_like(t) for t, need in ((means, need_dmeans), (logvars, need_dlogvars)) if need]
    if need_dlogits and logits is not None:
        grads.append(torch.empty_like(logits))
    return grads


mixture_log_prob_op = define(
    "mixture_log_prob(Tensor z, Tensor means, Tensor logvars, Tensor? logits) -> Tensor",
    _forward,
    lambda z, means, logvars, logits: z.new_empty(z.shape[:1], dtype=_backend.compute_dtype(z, means, logvars, logits)),
)
mixture_log_prob_backward_op = define(
    "mixture_log_prob_backward(Tensor grad_out, Tensor z, Tensor means, Tensor logvars, Tensor? logits,"
    " Tensor out, bool need_dz, bool need_dmeans, bool need_dlogvars, bool need_dlogits) -> Tensor[]",
    _backward,
    _backward_fake,
)


class MixtureLogProb(torch.autograd.Function):
    """Autograd of fastvae::mixture_log_prob: saves z (as (N, L)), the
    parameters and the output (N,), never per-component terms."""

    @staticmethod
    def forward(ctx, z, means, logvars, logits):
        z2 = flat(z)
        out = run(mixture_log_prob_op, z2, means, logvars, logits)
        ctx.z_shape = z.shape
        ctx.save_for_backward(z2, means, logvars, logits, out, z)  # z itself links a double backward's error
        return shaped(out, z.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        z2, means, logvars, logits, out, z = ctx.saved_tensors
        need = ctx.needs_input_grad[:3] + (ctx.needs_input_grad[3] and logits is not None,)
        grads = iter(run(mixture_log_prob_backward_op, grad_out, z2, means, logvars, logits, out, *need))
        dz, dmeans, dlogvars, dlogits = (next(grads) if n else None for n in need)
        if dz is not None:
            dz = shaped(dz, ctx.z_shape)
        if torch.is_grad_enabled():  # create_graph=True: no closed form of the kernel's (N, U, L)-free backward
            return _double_backward.not_twice("mixture_log_prob", (dz, dmeans, dlogvars, dlogits),
                                              (grad_out, z, means, logvars, logits))
        return dz, dmeans, dlogvars, dlogits


# -- public function -----------------------------------------------------------


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, logits: Tensor | None = None) -> Tensor:
    """log sum_u softmax(logits)_u N(z; means_u, diag(exp(logvars_u))): the log
    density of a diagonal Gaussian mixture at z, summed over the L latent dims.

    Args:
        z: points of shape (..., L): any number of leading dims, none included.
        means, logvars: the U components' means and log-variances, shape (U, L).
        logits: mixture logits of shape (U,) (unnormalized log weights), or
            None for equal weights 1/U.

    Returns:
        Shape (...). Computed with a running log-sum-exp over the components,
        so a component far from z never underflows the result; memory is
        O(size of z + U * L). Differentiable in z, means, logvars and logits.
    """
    check_components(means, logvars, logits, z=z)
    L = means.shape[1]
    _validate.event_dim("z", z)
    if z.shape[-1] != L:
        raise ValueError(f"z of shape {tuple(z.shape)} must end in the latent dim L={L} of means {tuple(means.shape)}")
    return MixtureLogProb.apply(z, means, logvars, logits)


def check_components(means: Tensor, logvars: Tensor, logits: Tensor | None, **others: Tensor) -> None:
    """The checks on a mixture's parameters (also fastvae.priors.MixtureOfGaussians'),
    with ``others`` (z) held to their dtype and device."""
    tensors = dict(**others, means=means, logvars=logvars)
    if logits is not None:
        tensors["logits"] = logits
    _validate.float_tensors(**tensors)
    if means.dim() != 2:
        raise ValueError(f"means must be a 2-d (U, L) tensor, got shape {tuple(means.shape)}")
    _validate.same_shape(means=means, logvars=logvars)
    U = means.shape[0]
    if U < 1:
        raise ValueError("means must have at least one component (U >= 1), got shape (0, L)")
    if logits is not None and logits.shape != (U,):
        raise ValueError(f"logits must have shape ({U},) (one per component of means), got {tuple(logits.shape)}")
