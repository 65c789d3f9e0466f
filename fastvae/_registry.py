"""The op registry: every op, its kernels, and each kernel's argument names.

An op in a folder of its own (fastvae/ops/<op>/) describes itself in its
``__init__.py`` (``OP``, ``KERNELS``, ``BENCH``: fastvae/_spec.py), read here
once at import; the entries below are the ops not yet moved to a folder.
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

from . import ops as _ops
from ._spec import Bench, Kernel, Op  # noqa: F401 (the registry's types, read from here)


def _k(name: str, module: str, args: str) -> Kernel:
    return Kernel(name, module, tuple(args.split()))


def _described(name: str):
    """The description of the op in fastvae/ops/<name>/ (its ``__init__``)."""
    return importlib.import_module(f"{_ops.__name__}.{name}")


# the ops that live in a folder of their own, by name
FOLDERS: dict[str, object] = {name: _described(name) for name in _ops.FOLDERS}

KERNELS: dict[str, Kernel] = {k.name: k for k in (
    # the noise stream's fills, shared infrastructure of every sampler and owned by no
    # op (kernels/philox.py, csrc/philox.cpp, the reference's from fastvae/_philox.py):
    # the evaluation's strided fill (fastvae/_noise.py) and the uniforms' test hook;
    # sample_normal's aot cases compile them
    _k("randn_fill", "philox", "seed offset0 out row_stride"),
    _k("uniform_fill", "philox", "seed offset0 u1 u2"),
    _k("gaussian_log_prob_forward", "gaussian_log_prob", "x mean var_param softplus_mode delta out"),
    _k("gaussian_log_prob_backward", "gaussian_log_prob",
       "grad_out x mean var_param softplus_mode delta dx dmean dvar_param"),
    _k("bernoulli_log_prob_forward", "bernoulli_log_prob", "x logits out"),
    _k("bernoulli_log_prob_backward", "bernoulli_log_prob", "grad_out x logits dx dlogits"),
    _k("logmeanexp_forward", "logmeanexp", "lw lw_max sumexp out ess"),
    _k("logmeanexp_backward", "logmeanexp", "lw lw_max sumexp grad_out grad_sumexp ess dlw"),
    # the evaluation's chunk: the states of lw (+ latent) and of twice that, merged
    # into running states in place (sq_*: the state of 2 lw, i.e. of w^2)
    _k("logmeanexp_accumulate", "logmeanexp", "lw latent lw_max sumexp sq_max sq_sumexp first"),
    _k("importance_weights_backward", "logmeanexp", "grad_w w dlw"),
    # the count likelihoods (issue 27): log_theta (K, P, D) or per gene (D,); counts get no gradient
    _k("poisson_log_prob_forward", "poisson_log_prob", "x log_rate out"),
    _k("poisson_log_prob_backward", "poisson_log_prob", "grad_out x log_rate dlog_rate"),
    _k("negative_binomial_log_prob_forward", "negative_binomial_log_prob", "x log_mean log_theta out"),
    _k("negative_binomial_log_prob_backward", "negative_binomial_log_prob",
       "grad_out x log_mean log_theta dlog_mean dlog_theta"),
    _k("zinb_log_prob_forward", "zinb_log_prob", "x log_mean log_theta zi_logits out"),
    _k("zinb_log_prob_backward", "zinb_log_prob",
       "grad_out x log_mean log_theta zi_logits dlog_mean dlog_theta dzi_logits"),
    _k("continuous_bernoulli_log_prob_forward", "continuous_bernoulli_log_prob", "x logits out"),
    _k("continuous_bernoulli_log_prob_backward", "continuous_bernoulli_log_prob", "grad_out x logits dx dlogits"),
    _k("discretized_logistic_mixture_log_prob_forward", "discretized_logistic_mixture_log_prob",
       "x params means log_scales num_bins out"),
    _k("discretized_logistic_mixture_log_prob_backward", "discretized_logistic_mixture_log_prob",
       "grad_out x params means log_scales num_bins dparams dmeans dlog_scales"),
)}

OPS: dict[str, Op] = {op.name: op for op in (
    Op("gaussian_log_prob", ("gaussian_log_prob_forward", "gaussian_log_prob_backward"),
       "tests/test_gaussian_log_prob.py", "gaussian_log_prob", torch_ops=("gaussian_log_prob",),
       likelihood="gaussian"),
    Op("bernoulli_log_prob", ("bernoulli_log_prob_forward", "bernoulli_log_prob_backward"),
       "tests/test_bernoulli_log_prob.py", "bernoulli_log_prob", torch_ops=("bernoulli_log_prob",),
       likelihood="bernoulli"),
    Op("logmeanexp", ("logmeanexp_forward", "logmeanexp_backward", "logmeanexp_accumulate"),
       "tests/test_logmeanexp.py", "logmeanexp", launches=(1, 2, 0), torch_ops=("logmeanexp",)),
    # forward: the log-mean-exp state, then its backward kernel at gradient 1 (a ones_like)
    Op("importance_weights", ("importance_weights_backward", "logmeanexp_backward"),
       "tests/test_logmeanexp.py", "logmeanexp", launches=(2, 1, 1), other_kernels=("ones_like",)),
    Op("effective_sample_size", ("logmeanexp_forward", "logmeanexp_backward"),
       "tests/test_logmeanexp.py", "logmeanexp"),
    Op("poisson_log_prob", ("poisson_log_prob_forward", "poisson_log_prob_backward"),
       "tests/test_poisson_log_prob.py", "poisson_log_prob", likelihood="poisson"),
    Op("negative_binomial_log_prob", ("negative_binomial_log_prob_forward", "negative_binomial_log_prob_backward"),
       "tests/test_negative_binomial_log_prob.py", "negative_binomial_log_prob", likelihood="negative_binomial"),
    Op("zinb_log_prob", ("zinb_log_prob_forward", "zinb_log_prob_backward"), "tests/test_zinb_log_prob.py",
       "zinb_log_prob", likelihood="zinb"),
    Op("continuous_bernoulli_log_prob",
       ("continuous_bernoulli_log_prob_forward", "continuous_bernoulli_log_prob_backward"),
       "tests/test_continuous_bernoulli_log_prob.py", "continuous_bernoulli_log_prob",
       likelihood="continuous_bernoulli"),
    Op("discretized_logistic_mixture_log_prob", ("discretized_logistic_mixture_log_prob_forward",
                                                 "discretized_logistic_mixture_log_prob_backward"),
       "tests/test_discretized_logistic_mixture_log_prob.py", "discretized_logistic_mixture_log_prob",
       double_backward="not_twice", likelihood="discretized_logistic_mixture"),
)}
for _spec_module in FOLDERS.values():
    OPS[_spec_module.OP.name] = _spec_module.OP
    KERNELS.update((k.name, k) for k in _spec_module.KERNELS)

# Derived lists: the C++ operators by name (fastvae/_backend.py loads them).
TORCH_OPS = tuple(name for op in OPS.values() for name in op.torch_ops)

# What fastvae._C binds besides the kernels: the CPU noise's instruction-set
# switch (which path runs, which paths this CPU has, forcing one for tests and
# benchmarks) and the raw Philox words that check each path bit for bit.
CPP_CONTROLS = ("noise_isa", "noise_isas", "set_noise_isa", "philox_words")

# Test modules above the ops that reach a Triton kernel: run under the
# interpreter too, next to every op's own test module.
# test_launches.py counts what each call launches on the CUDA path (issue 23);
# test_double_backward.py checks every op's create_graph gradient (issue 25).
INTERPRETED_TESTS = tuple(f"tests/test_{name}.py" for name in (
    "philox", "objectives", "evaluation", "priors", "launches", "double_backward", "value_checks", "autocast",
    "layouts", "plan", "latents"))


def interpreter_test_modules() -> list[str]:
    """Every test module the Triton interpreter run must include, in order,
    as paths from the repository root."""
    seen = dict.fromkeys(op.test for op in OPS.values())
    seen.update(dict.fromkeys(INTERPRETED_TESTS))
    return list(seen)
