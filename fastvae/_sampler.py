"""What the samplers' front ends share: z's dtype, the outputs and the noise
offsets of a forward, the samples of a backward, and the whole front end of a
family sampler of two (N, L) parameters (sample_location_scale,
sample_positive): its torch.library ops, the launches of their kernels, the
evaluation's strided draw, the autograd Function and the public function's
draw, and the ELBO's draw fused with a closed-form KL. A family's folder keeps
only its transform and its density (its kernels and oracle), its double
backward and its checks of the public arguments.

Element (k, n, l) of a draw takes the noise at offset0 + k * sample_stride +
n * row_stride + l (the training layout: offset0 = 0, sample_stride = N * L,
row_stride = L); docs/architecture.md, "The RNG contract".
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from ._op import define, draw_seed, flat, run, shaped

MAX_OFFSET = 2**63 - 1  # Philox offsets are int64 in the Triton kernels

_AUTOCAST_DEVICES = ("cpu", "cuda")


def z_dtype(mu: Tensor, logvar: Tensor) -> torch.dtype:
    """z's dtype. z is an activation the decoder consumes, and also the point
    where a prior's log p(z) is evaluated:
    - under torch.autocast (on mu's device type), the compute dtype (float32):
      the decoder's autocast matmuls round z to half precision themselves (a
      copy of K x B x L, small beside the decoder output), while a prior's
      log p(z) and log q(z) see the same unrounded z as the KL and the
      sampler's log-ratio, so the bound is the float32 bound of the rounded
      encoder and decoder outputs;
    - otherwise the encoder's dtype (mu's and logvar's, promoted): a model
      cast to half precision takes z as it is (its matmuls refuse float32)."""
    # (meta tensors have no autocast state to ask about)
    if mu.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(mu.device.type):
        return _backend.compute_dtype(mu, logvar)
    return mu.dtype if mu.dtype == logvar.dtype else torch.promote_types(mu.dtype, logvar.dtype)


def empty_z(backend: str, shape, like: Tensor, dtype: torch.dtype, z_type: torch.dtype) -> Tensor:
    """z of ``shape`` for a forward kernel: the C++ kernels write it in their
    compute type ``dtype`` and the caller casts it to ``z_type`` after
    (in_dtype; z is encoder-sized), the others in ``z_type`` directly."""
    return _backend.empty_output(shape, like=like, dtype=dtype if backend == "cpp" else z_type)


def check_offsets(offset0: int, sample_stride: int, row_stride: int, last: int) -> None:
    """A ValueError unless the strides are >= 0 and the noise offsets of a draw,
    offset0 to ``last``, lie in [0, 2**63 - 1]."""
    if min(offset0, sample_stride, row_stride) < 0 or last > MAX_OFFSET:
        raise ValueError(f"the noise offsets run from {offset0} to {last}: they must lie in [0, 2**63 - 1]")


def gradient_samples(grad_z: Tensor | None, grad_log_q: Tensor | None) -> int:
    """K of a backward: from whichever per-sample gradient is given, 0 with neither."""
    samples = grad_z if grad_z is not None else grad_log_q
    return 0 if samples is None else samples.shape[0]


def family_index_of(families: tuple[str, ...], family) -> int:
    """The kernels' index of a family name (its position in ``families``), or
    a ValueError naming the choices."""
    if family not in families:
        raise ValueError(f"family must be one of {families}, got {family!r}")
    return families.index(family)


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
        default the training layout's."""
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
        """The two gradients (N, L) from grad_z (K, N, L) and grad_log_q (K, N) (None: no gradient)."""
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
        return (z[0], log_q[0]) if n_samples is None else (z, log_q)


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
        backend = _backend.backend_for(p0.device)
        grads = [_backend.empty_output(p0.shape, like=p0) for _ in range(4 if need_dp else 2)]
        grads_by_name = dict(zip((f"d{n}" for n in self.names), grads + [None, None]))
        _backend.launch(backend, self.kernels[1], p0.numel() * (1 if grad_z is None else grad_z.shape[0]),
                        grad_z=None if grad_z is None else grad_z.contiguous(),
                        grad_kl=None if grad_kl is None else grad_kl.contiguous(),
                        **dict(zip(self.names, (p0, p1, prior0, prior1))), seed=seed, family=family,
                        kl_family=kl_family, **grads_by_name)
        return grads

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
