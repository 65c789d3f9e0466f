"""The op registry: every op, its kernels, and each kernel's argument names.

Every op lives in a folder of its own (fastvae/ops/<op>/, or a family's,
fastvae/ops/<family>/) and describes itself in its ``__init__.py`` (``OP`` or
``OPS``, ``KERNELS``, ``BENCH``: fastvae/_spec.py), read here once at import;
the only entries written here are the noise stream's fills, which no op owns.
This is the one place a kernel's arguments are defined. The front end calls
every backend by keyword from it (``_backend.launch``), and
``tests/test_registry.py`` fails when the reference function, the Triton
launcher or the C++ binding spells them differently. The public op list
(``backend_info``), the interpreter test run and the benchmark list derive
from ``OPS``.

Argument names follow three rules:
- the upstream gradient of an output ``o`` is ``grad_o`` (``grad_out`` for an
  op's main output ``out``);
- the gradient a backward kernel writes for an input ``i`` is ``d<i>``;
- the streaming log-sum-exp state is ``lw_max`` and ``sumexp`` everywhere.
Outputs are written in place by the kernel; optional tensors may be None.
"""
from __future__ import annotations

import importlib
import importlib.util

from . import ops as _ops
from ._spec import Bench, Kernel, Op  # noqa: F401 (the registry's types, read from here)


def _k(name: str, module: str, args: str) -> Kernel:
    return Kernel(name, module, tuple(args.split()))


def _described(name: str):
    """The description of the op in fastvae/ops/<name>/ (its ``__init__``)."""
    return importlib.import_module(f"{_ops.__name__}.{name}")


# the op folders by name: each describes one op (``OP``), or a family of ops that
# share kernels or code (``OPS``: logmeanexp, importance_weights and effective_sample_size)
FOLDERS: dict[str, object] = {name: _described(name) for name in _ops.FOLDERS}


def folder_ops(name: str) -> tuple[Op, ...]:
    """The ops the folder fastvae/ops/<name>/ describes: its ``OPS``, else its ``OP``."""
    description = FOLDERS[name]
    return getattr(description, "OPS", None) or (description.OP,)


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    # the noise stream's fills, shared infrastructure of every sampler and owned by no
    # op (kernels/philox.py, csrc/philox.cpp, the reference's from fastvae/_philox.py):
    # the evaluation's strided fill (fastvae/_noise.py) and the uniforms' test hook;
    # sample_normal's aot cases compile them
    _k("randn_fill", "philox", "seed offset0 out row_stride"),
    _k("uniform_fill", "philox", "seed offset0 u1 u2"),
)}

# every op, from its folder's description, and the folder that holds it (its
# own name, or its family's)
OPS: dict[str, Op] = {}
FOLDER_OF: dict[str, str] = {}
for _name, _description in FOLDERS.items():
    for _op in folder_ops(_name):
        OPS[_op.name] = _op
        FOLDER_OF[_op.name] = _name
    KERNELS.update((k.name, k) for k in _description.KERNELS)

# Derived lists: the C++ operators by name (fastvae/_backend.py loads them).
TORCH_OPS = tuple(name for op in OPS.values() for name in op.torch_ops)

# The likelihoods the objectives' plans fuse into their tail: likelihood= name -> the op
# that declares it (Op.plan_tail). The plans read these and nothing else of the op.
PLAN_TAILS: dict[str, Op] = {op.likelihood: op for op in OPS.values()
                             if op.likelihood is not None and op.plan_tail is not None}


def plan_stores(name: str = "OP_PLANS") -> list:
    """Every loaded op front end's (fastvae/ops/<folder>/op.py) plan store
    ``name``: OP_PLANS, the plans of the ops' own calls (a compiled graph's
    nodes), or PLANS, their eager calls'. An op keeps a store where it plans
    its launches; a module not imported yet holds no plan."""
    import sys
    modules = (sys.modules.get(f"{_ops.__name__}.{folder}.op") for folder in FOLDERS)
    return [getattr(m, name) for m in modules if m is not None and hasattr(m, name)]


def plan_switches() -> list:
    """The op front ends whose ``ENABLED`` switches their plans (the
    benchmarks and tests compare planned and general launches), loaded or not."""
    modules = [importlib.import_module(f"{_ops.__name__}.{folder}.op") for folder in FOLDERS
               if importlib.util.find_spec(f"{_ops.__name__}.{folder}.op") is not None]
    return [m for m in modules if hasattr(m, "ENABLED")]


def plan_tail(likelihood: str) -> type:
    """The fused tail class of ``likelihood`` (its op's ``plan_tail``, in its
    folder's op.py: _spec.FusedTail says what it provides), imported on the
    first plan that asks; KeyError where no op declares one."""
    op = PLAN_TAILS[likelihood]
    module = importlib.import_module(f"{_ops.__name__}.{FOLDER_OF[op.name]}.op")
    return getattr(module, op.plan_tail)

# What fastvae._C binds besides the kernels: the CPU noise's instruction-set
# switch (which path runs, which paths this CPU has, forcing one for tests and
# benchmarks) and the raw Philox words that check each path bit for bit.
CPP_CONTROLS = ("noise_isa", "noise_isas", "set_noise_isa", "philox_words")

# Where code outside an op's folder names the op or something of its folder, and why
# (tests/test_op_ownership.py fails on a use not declared here and on a declaration no code
# makes). A distribution or objective calling an op's public function is the layering at work;
# the rest is what the op record does not yet own: the plans' launches of the training path's
# kernels, the samplers' shared pieces, closed forms another op's backward reuses.
USES: dict[tuple[str, str], str] = {
    # the objectives and distributions call the ops' front ends
    ("distributions", "sample_normal"): "DiagonalNormal's rsample and sample_with_kl are the op",
    ("distributions", "sample_normal_tril"): "TrilNormal's rsample and sample_with_kl are the op",
    ("distributions", "kl_normal"): "DiagonalNormal's closed-form KL against a Gaussian prior is the op",
    ("distributions", "gaussian_log_prob"): "DiagonalNormal.log_prob is the op on z",
    ("latents", "sample_normal"): "the normal transforms (log-normal, logistic-normal) sample through it",
    ("latents", "kl_normal"): "the normal transforms' KL is their normals' KL",
    ("latents", "sample_family"): "LocationScale's, Positive's and Concrete's samples (and their fused draw and "
                                  "KL), family index and parameter table, argument checks, evaluation draws and "
                                  "Positive's median",
    ("latents", "stick_breaking"): "the logistic-normal posterior's z is the op (latents.stick_breaking)",
    ("latents", "family_kl"): "the location-scale and exponential records' closed-form KL is the op",
    ("priors", "kl_normal"): "a Gaussian prior's closed-form KL is the op",
    ("priors", "mixture_log_prob"): "MixturePrior.log_prob is the op, with its component checks",
    ("objectives", "sample_normal"): "the general path's Gaussian posterior samples through the op's "
                                     "unchecked functions (checked once per call)",
    ("objectives", "sample_normal_tril"): "a full-covariance posterior's Function for the DReG weight",
    ("objectives", "kl_normal"): "the per-dimension KL of free bits against a Gaussian prior",
    ("objectives", "logmeanexp"): "the IWAE bound's log-mean-exp with its state and the weights' Functions",
    ("evaluation", "logmeanexp"): "log p(x) streams the log-mean-exp state over chunks and ranks",
    ("evaluation", "sample_normal"): "the evaluation draws at its own offsets (sample_at)",
    ("_decoder", "count_log_prob"): "a dict of named count parameters and scvi-tools' distributions imply "
                                    "their count likelihood",
    ("demo", "sample_normal"): "the demo prints which backend runs the sampler",
    ("demo", "logmeanexp"): "the demo prints which ops its bound runs",
    # the plans launch the training path's kernels themselves
    ("_plan", "sample_normal"): "SamplePlan launches the sampler's kernels; a create_graph backward replays "
                                "the op's double backward",
    ("_plan", "logmeanexp"): "the IWAE tail launches the log-mean-exp kernels",
    ("_plan", "sample_family"): "FamilySamplePlan launches a location-scale family's or the exponential's "
                                "sampler kernels (on the cpp backend, their fused KL kernels)",
    ("_plan", "family_kl"): "FamilySamplePlan launches the family's closed-form KL kernels, adding q's gradient "
                            "to the sampler's",
    ("objectives", "sample_family"): "the family plans' create_graph replay runs the samplers' Functions, and "
                                     "their key a location-scale family's index",
    ("objectives", "stick_breaking"): "a logistic-normal posterior's decoder input on the Gaussian plans is the op "
                                      "(latents.stick_breaking)",
    ("objectives", "family_kl"): "the family plans' replay runs the op's Function with the prior in its layout",
    ("_plan_ops", "sample_normal"): "the graph ops of the compiled path launch the sampler's kernel",
    ("kernels.aot", "sample_normal"): "the noise fills' ahead-of-time cases take the sampler's shapes",
    # the sampler's noise and kl_normal's gradient, which other ops reuse
    ("ops.sample_normal_kl.op", "sample_normal"): "the double backward regenerates eps with the sampler's noise",
    ("ops.sample_normal_tril.op", "sample_normal"): "the double backward regenerates eps with the sampler's noise",
    ("ops.sample_normal", "kl_normal"): "the oracle's KL gradient is kl_normal's",
    ("ops.sample_normal.op", "kl_normal"): "the double backward's KL gradient is kl_normal's",
    ("ops/sample_normal/sample_normal.cpp", "kl_normal"): "the fused KL's C++ gradient is kl_normal's",
    ("ops.sample_family", "family_kl"): "the fused KL kernels' oracle is family_kl's after the draw",
    ("ops.sample_family.op", "family_kl"): "the fused draw and KL take the prior in family_kl's layout and "
                                           "replay FamilyKL for a create_graph backward",
    ("ops.sample_family.triton", "family_kl"): "the fused KL kernels launch family_kl's after the draw",
    ("ops/sample_family/sample_family.cpp", "family_kl"): "the fused KL runs family_kl's rows and gradients "
                                                          "inside the sampler's loops",
    ("ops/sample_family/bind.cpp", "family_kl"): "the fused KL bindings check family_kl's families",
    # shared math that one op holds
    ("ops.family_kl.triton", "count_log_prob"): "the Gumbel KL's lgamma and digamma of positive arguments",
    ("ops/family_kl/family_kl.cpp", "count_log_prob"): "the Gumbel KL's lgamma and digamma of positive arguments",
}

# Test modules above the ops that reach a Triton kernel: run under the
# interpreter too, next to every op's own test module.
# test_launches.py counts what each call launches on the CUDA path;
# test_double_backward.py checks every op's create_graph gradient.
INTERPRETED_TESTS = tuple(f"tests/test_{name}.py" for name in (
    "philox", "objectives", "evaluation", "priors", "launches", "double_backward", "value_checks", "autocast",
    "layouts", "plan", "latents", "compile_changes"))


def interpreter_test_modules() -> list[str]:
    """Every test module the Triton interpreter run must include, in order,
    as paths from the repository root."""
    seen = dict.fromkeys(op.test for op in OPS.values())
    seen.update(dict.fromkeys(INTERPRETED_TESTS))
    return list(seen)
