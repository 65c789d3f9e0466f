"""The ops that live in a folder of their own: fastvae/ops/<op>/ holds
everything of one op ("one op, one place"; docs/architecture.md,
"Adding an op"), or fastvae/ops/<family>/ everything of a family of ops that
share kernels or code (its description's ``OPS`` in place of ``OP``; its files
named after the family):

- ``__init__.py``: its description (``OP``, ``KERNELS`` with their argument
  names, ``BENCH``: fastvae/_spec.py; the ahead-of-time cases ``aot_calls``)
  and its oracle, the plain-PyTorch formulas the reference backend runs;
- ``op.py``: the public function, the torch.library ops and their Function;
- ``triton.py``: the Triton kernels;
- ``<op>.h``, ``<op>.cpp``, ``bind.cpp``: the C++ kernels and their binding;
  ``torch_op.cpp``: the eager CPU operator and its graph twins, if it has one;
- ``test_<op>.py``: its tests, and its cases of the suite-wide checks.

Nothing here imports the ops: ``_registry`` reads each folder's description.
"""
import pkgutil

FOLDERS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))
