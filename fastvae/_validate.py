"""Argument checks shared by the public functions. Each error names the
offending argument with its shape, dtype or device. Checks look only at
metadata, never at values, so they cost no host synchronisation and trace
under torch.compile without a graph break."""
from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_tensors(**tensors: torch.Tensor) -> None:
    """All arguments are floating-point tensors on one device. Their dtypes
    may differ (bfloat16 logits with float32 x under autocast): every op
    reads each input in its own dtype and computes in
    ``_backend.compute_dtype`` of them all (docs/architecture.md, "Mixed
    precision")."""
    first_name, first = None, None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                f"float64), got dtype {t.dtype}"
            )
        if first is None:
            first_name, first = name, t
            continue
        if t.device != first.device:
            raise ValueError(f"device mismatch: {first_name} is on {first.device}, {name} is on {t.device}")


def flatten_events(t: torch.Tensor, name: str, event_dims) -> torch.Tensor:
    """t with its last ``event_dims`` dimensions merged into one (a view when
    t is contiguous): how the likelihood ops sum over an image's (C, H, W)."""
    event_dims = integer("event_dims", event_dims)
    if event_dims < 1:
        raise ValueError(f"event_dims must be >= 1, got {event_dims}")
    if t.dim() < event_dims:
        raise ValueError(f"{name} of shape {tuple(t.shape)} has fewer than event_dims={event_dims} dimensions")
    return t if event_dims == 1 else t.reshape(*t.shape[:t.dim() - event_dims], -1)


def same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(
                f"shape mismatch: {name0} has shape {tuple(t0.shape)}, {name} has shape {tuple(t.shape)}"
            )


def event_dim(name: str, t: torch.Tensor) -> None:
    if t.dim() < 1:
        raise ValueError(f"{name} must have a last (event) dimension, got a 0-d tensor")


def callable_arg(name: str, value, signature: str) -> None:
    """A callable, or a TypeError naming the argument and what it maps
    (``signature``, e.g. "z -> decoder output"): a module or function passed
    in the wrong place would otherwise fail deep inside fastvae as
    "'str' object is not callable"."""
    if not callable(value):
        raise TypeError(f"{name} must be callable ({signature}), got {type(value).__name__}")


def nonempty_batch(what: str, shape, batch_shape, reduction: str) -> None:
    """A batch of at least one example where ``reduction`` is "mean": the mean
    of no examples is NaN, which would reach the optimizer without an error.
    A shape check, never a read of a value: each dimension of ``batch_shape``
    is compared with 0 on its own, which a dimension torch.compile keeps
    dynamic answers statically (its sizes start at 2), where their product
    would be guarded on and the batch size made a constant. "sum" (0) and
    "none" (an empty tensor) are well defined on an empty batch and pass."""
    if reduction == "mean" and any(size == 0 for size in batch_shape):
        raise ValueError(f"{what} of shape {tuple(shape)} has an empty batch: reduction='mean' over no examples "
                         f"is NaN. Skip empty batches, or pass reduction='sum' (0) or 'none' (an empty tensor)")


def integer(name: str, value) -> int:
    """An integer scalar as users have it (int, NumPy integer, 0-d integer
    tensor) as an int; bools and floats are refused."""
    if type(value) is int:  # the common case, before the slower ABC check
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def boolean(name: str, value) -> bool:
    """A bool, or a TypeError naming the argument (a truthy string such as
    keepdim="yes" must not pass as True)."""
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def positive_int(name: str, value) -> int:
    value = integer(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def real(name: str, value, *, minimum: float | None = None, tensor_ok: bool = False):
    """A real scalar as users have it (int, float, NumPy scalar, 0-d tensor) as
    a float, checked to be finite and >= minimum. With tensor_ok a 0-d
    floating tensor stays a tensor, unchecked: reading its value would cost a
    host sync on a GPU, and a tensor changes value under torch.compile
    without a recompile (an annealing schedule)."""
    if type(value) is float:  # the common case, before the slower ABC check
        pass
    elif isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real scalar, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        if tensor_ok and value.dtype.is_floating_point:
            return value
        value = value.item()
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): int64's limit
        return 2**63 - 1


# read once: torch.compile cannot trace os.sysconf
_CPU_MEMORY = _physical_memory()


def device_memory(device: torch.device) -> int:
    """Bytes a tensor on ``device`` can never exceed: the GPU's memory, or the
    machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _CPU_MEMORY


def _size(nbytes: int) -> str:
    for unit, scale in (("EB", 2**60), ("PB", 2**50), ("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def sample_count(name: str, value, per_sample: int, like: torch.Tensor) -> int:
    """``value`` samples of ``per_sample`` elements each, materialized like
    ``like``, must fit in its device's memory: a huge k is refused here, with
    what it would need, instead of as an allocator error (or an int64
    overflow) deep inside torch or the user's decoder.

    The rule is the device's total memory, not what is free now: free memory
    changes from call to call, and a request above the total can never
    succeed, while one below it is left to the allocator. It also keeps every
    element count far below 2**63 (any device has less than 2**63 bytes).
    ``per_sample`` is the largest tensor the call materializes per sample
    (z, or the decoder output that must match x)."""
    value = positive_int(name, value)
    nbytes = value * per_sample * like.element_size()
    if nbytes <= 2**30:  # fits anywhere: no device query (which torch.compile could not trace)
        return value
    limit = device_memory(like.device)
    if nbytes > limit:
        raise ValueError(
            f"{name}={value} would need {value} x {per_sample} elements of {like.dtype} = {_size(nbytes)}, "
            f"more than the {_size(limit)} of {like.device}; lower {name} (fastvae.log_likelihood "
            f"streams over its samples in chunks)"
        )
    return value


def broadcasts_to(shape, target) -> bool:
    """shape broadcasts to target unchanged (torch.broadcast_shapes(shape,
    target) == target), checked in plain Python: torch.broadcast_shapes costs
    tens of microseconds per call, as much as a small op's kernel."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


# the likelihoods whose x may be an integer tensor: class indices, counts (the
# count ops read integer counts in the parameters' compute dtype); None: a
# decoder's torch distribution decides
INTEGER_DATA = (None, "categorical", "poisson", "negative_binomial", "zinb")


def data_tensor(name: str, t, likelihood=None) -> None:
    """The data x of an objective or evaluation: a floating-point tensor, or
    an integer one (class indices, counts) for the likelihoods of INTEGER_DATA."""
    if (likelihood in INTEGER_DATA and isinstance(t, torch.Tensor) and not t.dtype.is_floating_point
            and not t.dtype.is_complex and t.dtype != torch.bool):
        return
    float_tensors(**{name: t})


def decoder_shape_hint(x: torch.Tensor, sample_shape: tuple, batch_ndim: int, per_example: tuple) -> str:
    """The two remedies for a decoder output of the wrong shape, for the
    error's tail: the reshape lambda, and (where z has a sample or a second
    batch dimension to fold) the folded (S·B, ...) form that
    fastvae._decoder.unfold_samples reads. ``per_example``: the shape one
    example's output has (x's event shape; with the classes for categorical)."""
    lead = (*sample_shape, *x.shape[:batch_ndim])
    dims = ", ".join(str(d) for d in per_example)
    hint = (f" A decoder that runs on z.reshape(-1, L) (a conv net) can reshape its output back: "
            f"decode = lambda z: net(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], {dims})")
    if len(lead) > 1:
        n = math.prod(lead)
        hint += (f"; or return the folded rows as they are, shape ({n}, {dims}) with the samples first "
                 f"(z.reshape(-1, L)'s order), which fastvae reads as {lead}")
    return hint + " (docs/migrating.md)."
