"""sample_normal: reparameterized Gaussian sampling with the analytic KL, fused.

The custom ops ``fastvae::sample_normal`` and ``fastvae::sample_normal_backward``
take the Philox seed as a 0-d int64 tensor, so the noise is a pure function of
(seed, element offset): the backward regenerates it and nothing of size
K x B x L is saved (only mu, logvar and the seed).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _validate
from ._backend import backend_for

_SEED_HIGH = 2**63 - 1


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A 0-d int64 Philox seed drawn from torch's generator (the default one of
    ``device``, or ``generator``), so torch.manual_seed makes runs repeatable
    and two calls get independent noise. Stays on the device: no host sync."""
    gen_device = device if generator is None else generator.device
    seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


def _flat(t: Tensor) -> Tensor:
    """(..., L) -> contiguous (N, L)."""
    L = t.shape[-1]
    return t.reshape(math.prod(t.shape[:-1]), L).contiguous()


# -- custom ops ----------------------------------------------------------------


@torch.library.custom_op("fastvae::sample_normal", mutates_args=(), device_types=("cpu", "cuda"))
def sample_normal_op(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int) -> tuple[Tensor, Tensor]:
    """z (n_samples, ..., L) and kl (...) for mu, logvar (..., L)."""
    backend = backend_for(mu.device)
    _validate.dtype_for_backend(backend, mu.dtype)
    mu2, lv2 = _flat(mu), _flat(logvar)
    N, L = mu2.shape
    z = _backend.empty_output((n_samples, N, L), like=mu)
    kl = _backend.empty_output((N,), like=mu)
    _backend.launch(
        backend, "sample_normal", "sample_normal_forward",
        mu2, lv2, _backend.Seed(seed), z, kl,
        work=z.numel(),
    )
    return z.reshape(n_samples, *mu.shape), kl.reshape(mu.shape[:-1])


@sample_normal_op.register_fake
def _(mu, logvar, seed, n_samples):
    return mu.new_empty((n_samples, *mu.shape)), mu.new_empty(mu.shape[:-1])


@torch.library.custom_op("fastvae::sample_normal_backward", mutates_args=(), device_types=("cpu", "cuda"))
def sample_normal_backward_op(dz: Tensor, dkl: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
    """dmu, dlogvar (..., L) from dz (K, ..., L) and dkl (...); eps is regenerated from seed."""
    backend = backend_for(mu.device)
    mu2, lv2 = _flat(mu), _flat(logvar)
    N, L = mu2.shape
    K = dz.shape[0]
    dz3 = dz.to(mu.dtype).reshape(K, N, L).contiguous()
    dkl1 = dkl.to(mu.dtype).reshape(N).contiguous()
    dmu = _backend.empty_output((N, L), like=mu)
    dlv = _backend.empty_output((N, L), like=mu)
    _backend.launch(
        backend, "sample_normal", "sample_normal_backward",
        dz3, dkl1, mu2, lv2, _backend.Seed(seed), dmu, dlv,
        work=dz3.numel(),
    )
    return dmu.reshape(mu.shape), dlv.reshape(mu.shape)


@sample_normal_backward_op.register_fake
def _(dz, dkl, mu, logvar, seed):
    return torch.empty_like(mu), torch.empty_like(logvar)


def _setup_context(ctx, inputs, output):
    mu, logvar, seed, n_samples = inputs
    ctx.save_for_backward(mu, logvar, seed)


def _backward(ctx, dz, dkl):
    mu, logvar, seed = ctx.saved_tensors
    dmu, dlogvar = sample_normal_backward_op(dz, dkl, mu, logvar, seed)
    return dmu, dlogvar, None, None


sample_normal_op.register_autograd(_backward, setup_context=_setup_context)


# -- public function -----------------------------------------------------------


def sample_normal(
    mu: Tensor,
    logvar: Tensor,
    n_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized samples from q = N(mu, diag(exp(logvar))) and KL(q || N(0, I)).

    Args:
        mu, logvar: encoder outputs of shape (..., L), same dtype and device.
        n_samples: None for one sample of shape (..., L); an int K >= 1 for
            z of shape (K, ..., L).
        generator: torch.Generator the Philox seed is drawn from (default: torch's
            default generator of mu's device, so torch.manual_seed applies).

    Returns:
        (z, kl): z = mu + exp(logvar / 2) * eps with eps ~ N(0, I), and the
        analytic kl = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar) over L, shape (...).

    Both outputs are differentiable with respect to mu and logvar. The noise is
    generated in the kernel by counter-based Philox and regenerated in the
    backward, so no K x ... x L noise tensor is stored.
    """
    _validate.float_tensors(mu=mu, logvar=logvar)
    _validate.event_dim("mu", mu)
    _validate.same_shape(mu=mu, logvar=logvar)
    if n_samples is not None:
        _validate.positive_int("n_samples", n_samples)
    seed = draw_seed(mu.device, generator)
    z, kl = sample_normal_op(mu, logvar, seed, 1 if n_samples is None else n_samples)
    return (z[0] if n_samples is None else z), kl
