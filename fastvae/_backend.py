"""Which implementation serves an op: the backend choice, the loaders of the
compiled extension and of the Triton kernels, and output allocation.

Automatic choice: CUDA tensors -> "triton", CPU tensors -> "cpp".
FASTVAE_BACKEND=reference|cpp|triton overrides it (read at every call, so it
can be changed at run time). "triton" on CPU tensors runs the Triton
interpreter, which needs TRITON_INTERPRET=1 set before Triton is imported.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

from typing import NamedTuple

import torch

BACKENDS = ("reference", "cpp", "triton")
OPS = ("sample_normal", "kl_normal", "gaussian_log_prob", "bernoulli_log_prob",
       "logmeanexp", "importance_weights", "effective_sample_size", "latent_log_ratio")

_BUILD_HINT = (
    "fastvae's C++ extension (fastvae._C) is not built or failed to load{why}. "
    "Build it with `pip install -e .` (or `python setup.py build_ext --inplace`) from the "
    "fastvae source tree; set FASTVAE_BACKEND=reference to run the slow plain-PyTorch ops instead."
)


@functools.cache
def _load_cpp():
    """The extension module, or the ImportError that explains why it is missing."""
    try:
        return importlib.import_module("fastvae._C")
    except ImportError as err:
        return err


def cpp_module():
    """fastvae._C, or a RuntimeError that says how to build it."""
    mod = _load_cpp()
    if isinstance(mod, ImportError):
        raise RuntimeError(_BUILD_HINT.format(why=f" ({mod})")) from mod
    return mod


def cpp_available() -> bool:
    return not isinstance(_load_cpp(), ImportError)


@functools.cache
def triton_module(op: str):
    """fastvae.kernels.<op> (imports Triton on first use)."""
    return importlib.import_module(f"fastvae.kernels.{op}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _warn_missing_cpp() -> None:
    warnings.warn(
        _BUILD_HINT.format(why="") + " Falling back to the reference backend for CPU tensors.",
        RuntimeWarning,
        stacklevel=4,
    )


def requested_backend() -> str | None:
    """The FASTVAE_BACKEND override, validated; None when unset or empty."""
    name = os.environ.get("FASTVAE_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTVAE_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def backend_for(device: torch.device | str, *, warn: bool = True) -> str:
    """The backend that runs ops on tensors of this device."""
    device_type = torch.device(device).type
    name = requested_backend()
    if name is None:
        if device_type == "cuda":
            return "triton"
        if cpp_available():
            return "cpp"
        if warn:
            _warn_missing_cpp()
        return "reference"
    if name == "cpp" and device_type != "cpu":
        raise ValueError(f"FASTVAE_BACKEND=cpp serves CPU tensors only, got a {device_type} tensor")
    if name == "triton" and device_type == "cpu" and not _interpreting():
        raise RuntimeError(
            "FASTVAE_BACKEND=triton on CPU tensors runs the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before Python starts"
        )
    if name == "triton" and device_type not in ("cpu", "cuda"):
        raise ValueError(f"the triton backend serves CUDA tensors, got a {device_type} tensor")
    return name


def backend_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which backend serves each op for tensors on ``device``, e.g.
    ``{"sample_normal": "cpp", "kl_normal": "cpp"}``; a missing C++ extension
    shows as ``"reference (cpp extension missing)"``."""
    name = backend_for(device, warn=False)
    if name == "reference" and requested_backend() is None:
        name = "reference (cpp extension missing)"
    return {op: name for op in OPS}


def empty_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fresh output buffer for a kernel to fill, on like's device with like's
    dtype (or ``dtype``). Every op allocates through here so that tests can
    poison outputs with NaN and catch unwritten elements."""
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions and noise run in float32, or float64 for float64 inputs
    (never in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Seed(NamedTuple):
    """A Philox seed argument of a kernel: the 0-d int64 tensor itself for the
    Triton kernels (no host sync), its value for the cpp and reference ones."""

    tensor: torch.Tensor


def launch(backend: str, op: str, kernel: str, *args, work: int) -> None:
    """Runs ``kernel`` (e.g. "sample_normal_forward") of ``op`` on ``backend``
    with the same arguments on every backend: tensors (None for an absent
    optional one), Python scalars and Seed. The cpp backend gets the tensors
    as NumPy views and a thread count for ``work`` elements."""
    if backend == "cpp":
        cpp_args = (int(a.tensor) if isinstance(a, Seed) else numpy_view(a) if isinstance(a, torch.Tensor) or a is None
                    else a for a in args)
        getattr(cpp_module(), kernel)(*cpp_args, num_threads(work))
    elif backend == "triton":
        getattr(triton_module(op), kernel)(*(a.tensor if isinstance(a, Seed) else a for a in args))
    else:
        from . import reference

        getattr(reference, kernel)(*(int(a.tensor) if isinstance(a, Seed) else a for a in args))


def numpy_view(t: torch.Tensor | None):
    """The zero-copy NumPy view the cpp backend takes (None stays None)."""
    return None if t is None else t.detach().numpy()


# Elements a cpp kernel call must have per extra OpenMP thread. Waking a thread
# costs microseconds, and far more when the other cores are busy (the team
# waits at the barrier for a descheduled thread), while a kernel covers
# 16384 elements in about 10-50 us: smaller calls run on the calling thread.
MIN_WORK_PER_THREAD = 1 << 14


def num_threads(work: int) -> int:
    """OpenMP threads for a cpp kernel over ``work`` elements: torch.get_num_threads(),
    but only as many as there are MIN_WORK_PER_THREAD elements for."""
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))
