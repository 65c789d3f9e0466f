"""The OpenMP wait policy, set before torch loads its OpenMP runtime.

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
"""
import os
import sys

POLICY_SET_HERE = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
if POLICY_SET_HERE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
