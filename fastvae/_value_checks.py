"""Checks of argument values that catch the common silent mistakes: the policy
of when a value is read, and the rules that several ops share (a non-positive
``scale``, a positive parameter, a non-finite log-space parameter). A rule of
one op lives in its folder (probabilities passed as Bernoulli logits, data
outside [0, 1] under the Bernoulli likelihood: fastvae/ops/bernoulli_likelihood/
op.py) and asks ``should_check`` first, ``warn`` to warn.

Reading a value costs a host sync on a GPU, which the training step must not
pay. So, under the default policy ("auto"):

- CPU tensors on the cpp or reference backend are checked on every call. The
  check reads the whole tensor up to WHOLE values, else about PREFIX leading
  values (a view, no copy): about 3 torch ops' worth of host time per check
  (~5 us against ~0.7 ms for the digits ELBO step); the mistakes it looks for
  are properties of the model or the data, visible in any slice of it.
- Anything else (CUDA tensors; CPU tensors on the Triton backend, which is how
  the tests run the CUDA path) is checked on the first call of each kind only:
  one sync per process, never in the steady state of a training loop.

``set_value_checks("always")`` checks every call everywhere (a sync per check
on a GPU), ``"never"`` turns the checks off. Nothing is checked while
torch.compile or torch.jit traces (a value-dependent branch would break the
graph). The first two kinds warn (a legitimate model can produce them); a
non-positive scale raises, since the result would be NaN.
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import torch
from torch import Tensor

from . import _backend

MODES = ("auto", "always", "never")
# leading values a check reads: enough to see a structural mistake, cheap on any tensor
PREFIX = 4096
# a tensor up to this size is read whole: slicing a view costs ~3 us, more than
# reading the extra values (aminmax: ~1.8 us at 4096 values, ~5 us at 16384)
WHOLE = 3 * PREFIX

_mode = "auto"
_checked_once: set[str] = set()  # kinds already checked once on the sync-costly path
_warned: set[str] = set()  # kinds that warned: once per process is enough, and no check after
# bumped whenever settled()'s answer may change (the mode, or a kind checked or
# warned): the objectives' plans ask settled() again only then, and otherwise
# read this number, which keeps their steady-state call out of this module
epoch = 0
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def set_value_checks(mode: str) -> None:
    """How fastvae checks argument values for the common silent mistakes.

    "auto" (default): every call for CPU tensors, the first call of each kind
    for CUDA tensors (one host sync per process); "always": every call (one
    host sync per check on a GPU); "never": no value checks.
    """
    global _mode, epoch
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _mode = mode
    epoch += 1
    _checked_once.clear()
    _warned.clear()


def warn(kind: str, message: str) -> None:
    """Warn once per kind, attributed to the first frame outside fastvae (the
    user's call, however deep inside fastvae the check ran)."""
    global epoch
    _warned.add(kind)
    epoch += 1
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


def should_check(kind: str, t: Tensor) -> bool:
    """Whether a rule of this kind (its slot: once checked on the sync-costly
    path, or once warned, it is not checked again) reads t's values now, by
    the policy above; a True on the sync-costly path marks the kind checked."""
    global epoch
    if _mode == "never" or kind in _warned or t.numel() == 0 or t.device.type == "meta":
        return False
    if _backend.compiling() or torch.jit.is_tracing():
        return False
    if _mode == "always":
        return True
    if t.device.type == "cpu" and _backend.backend_for(t.device) != "triton":
        return True
    if kind in _checked_once:
        return False
    _checked_once.add(kind)
    epoch += 1
    return True


def settled(*kinds: str) -> bool:
    """Whether no check of these kinds would run again on the triton backend
    (mode "never", or each kind checked once or warned): then the objectives'
    plans skip the checks' calls (fastvae/_plan.py)."""
    if _mode == "never":
        return True
    return _mode == "auto" and all(k in _checked_once or k in _warned for k in kinds)


def prefix(t: Tensor) -> Tensor:
    """t itself up to WHOLE values, else at most PREFIX leading values of t,
    as a view (narrowed along the leading dimensions, so it never copies,
    contiguous or not)."""
    t = t.detach()
    if t.numel() <= WHOLE:
        return t
    while t.dim() > 1 and t.numel() > PREFIX:
        per_row = t.numel() // t.shape[0]
        if per_row <= PREFIX:
            return t.narrow(0, 0, PREFIX // per_row)
        t = t[0]
    return t if t.numel() <= PREFIX else t[:PREFIX]


def value_range(t: Tensor) -> tuple[float, float]:
    lo, hi = torch.aminmax(prefix(t))
    return lo.item(), hi.item()


def positive_scale(scale: Tensor, name: str = "scale") -> None:
    """Raise when a tensor standard deviation has a non-positive value (its
    log would be NaN), as a float scale <= 0 does."""
    if not should_check("scale", scale):
        return
    lo = torch.min(prefix(scale)).item()
    if not lo > 0.0:  # also NaN
        raise ValueError(
            f"{name} must be > 0 (a standard deviation), got a value of {lo:.3g}; for a learned scale use "
            f"e.g. softplus(param) or exp(param), or pass logvar= instead")


def finite_log_param(t: Tensor, name: str) -> None:
    """Raise when a log-space parameter (a positive latent family's log rate,
    log scale, log concentration, log a or log b) holds a NaN or an infinity:
    the sample and log q would be NaN or infinite."""
    if not should_check("log parameter", t):
        return
    lo, hi = value_range(t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite (a log-space parameter), got values in [{lo:.3g}, {hi:.3g}]")


def positive_param(t: Tensor, name: str, zero_ok: bool = False) -> None:
    """Raise when a torch distribution's positive parameter (rate, scale,
    concentration) is <= 0 or NaN: its log would be NaN or -inf.
    zero_ok: only < 0 or NaN raises (a mean or rate of 0, whose log -inf the
    count likelihoods take as the limit)."""
    if not should_check("positive parameter", t):
        return
    lo = torch.min(prefix(t)).item()
    if not (lo >= 0.0 if zero_ok else lo > 0.0):
        raise ValueError(f"{name} must be {'>=' if zero_ok else '>'} 0, got a value of {lo:.3g}")
