"""The OpenMP wait policy, set before torch loads its OpenMP runtime, and a
warning where it came too late.

OpenMP threads that wait by spinning (libgomp's default, for a while after
each parallel region) take their cores from every other process: under a
concurrent CPU load on 2 cores, torch's 2 threads (which also run the C++
kernels' parallel loops: one OpenMP runtime serves both) made the digits
training step several times slower than 1 thread; waiting passively, not.
The runtime reads the policy once, when torch loads it, so this applies only
where fastvae is imported before torch (``python -m fastvae``, a script whose
first import is fastvae), and never overrides a policy the environment sets.
Elsewhere, set ``OMP_WAIT_POLICY=passive`` in the environment (README,
Threads).

Once torch has loaded the runtime nothing changes its policy: libgomp has no
setter (OpenMP defines none), reads OMP_WAIT_POLICY and GOMP_SPINCOUNT from
the environment only at its start, and keeps the spin count in a variable it
does not export. Setting either variable after ``import torch`` left the
step as slow as before (the figures: README, "Threads on a busy machine").
So where torch came first, warn_if_spinning says so once, at the first call
on CPU tensors, when the machine is busy enough for the spinning to cost:
this module imports nothing, so that it runs before torch.
"""
import os
import sys

POLICY_SET_HERE = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
if POLICY_SET_HERE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# the environment variables that set how libgomp's idle threads wait: one set by the user is their choice
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_warned = False


class ThreadsWarning(RuntimeWarning):
    """OpenMP threads that spin on a machine whose other processes need the cores."""


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def spinning_cost() -> str | None:
    """Why this process's idle OpenMP threads would take cores other
    processes are using, or None: torch was loaded before fastvae with no
    wait policy in the environment (so libgomp spins), torch runs more than
    one thread, and the 1-minute load average counts more runnable threads
    than the cores leave room for. The load includes this process's own
    running thread, hence the 1 subtracted: the others' load plus torch's
    threads above the core count means a spinning thread steals a core."""
    import torch

    if POLICY_SET_HERE or any(name in os.environ for name in _WAIT_VARIABLES):
        return None
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return None
    cores = _cores()
    if load - 1 + threads <= cores:
        return None
    return (f"torch was imported before fastvae with no OMP_WAIT_POLICY set, so the OpenMP runtime's idle "
            f"threads spin, and this machine is busy (load average {load:.1f} on {cores} cores, torch using "
            f"{threads} threads): the spinning takes the cores your own threads need, and a CPU training step "
            f"can run several times slower. The runtime read its policy when torch loaded and cannot change it "
            f"now: start Python with OMP_WAIT_POLICY=passive (OMP_WAIT_POLICY=passive python train.py), or "
            f"import fastvae before torch; from inside this process, torch.set_num_threads(1) avoids it. "
            f"Setting OMP_WAIT_POLICY (to passive or active) silences this warning (README, 'Threads on a "
            f"busy machine')")


def warn_if_spinning() -> None:
    """Warn once per process (ThreadsWarning) where spinning_cost finds a
    cost; the backend's first choice for CPU tensors calls it, so a
    steady-state call pays nothing."""
    global _warned
    if _warned:
        return
    _warned = True
    if (message := spinning_cost()) is not None:
        import warnings

        warnings.warn(message, ThreadsWarning, stacklevel=_callers_level())


def _callers_level() -> int:
    """The stacklevel of the first frame outside fastvae (the user's call,
    which the warning then names), from warn_if_spinning's caller on."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 2  # warn_if_spinning's frame is level 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
