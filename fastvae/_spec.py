"""What an op's description is made of: its kernels with their argument
names, the op itself, and its benchmark row.

Every op lives in a folder of its own (fastvae/ops/<op>/, docs/architecture.md)
and describes itself with these in its ``__init__.py``; ``_registry`` collects
those descriptions. Imports nothing
of fastvae, so that every layer may read it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Kernel(NamedTuple):
    """One kernel: the function of this name in its op's oracle (the reference
    backend: ``fastvae.ops.<module>``; ``fastvae.reference`` for the noise
    stream's fills), in its Triton module (``fastvae.ops.<module>.triton``;
    ``fastvae.kernels.philox`` for the fills) and in ``fastvae._C`` (which adds a trailing
    ``n_threads``, except for the serial test hook uniform_fill)."""

    name: str
    # the op folder that owns it: fastvae/ops/<module>/ (triton.py, the oracle in
    # __init__.py); "philox" for the noise stream's fills, which no op owns
    module: str
    args: tuple[str, ...]
    # keyword arguments of its Triton launcher alone, after args: the
    # objectives' bound fused into the kernel (kernels/_common.py's
    # bound_epilogue), which only their plans (fastvae/_plan.py) pass
    bound: tuple[str, ...] = ()
    # keyword arguments of its C++ function alone, after n_threads: a form of its
    # inputs that the other backends do not take (the family samplers' fused
    # KL kernels' of_scale, a torch object's scale read as it is, which only
    # the eager plans pass through _backend.launch_cpp)
    cpp_options: tuple[str, ...] = ()
    # a heavy kernel: one of a K x B x rows problem, bound by memory bandwidth on a GPU; the
    # rows' length ("D", a decoder output's, or "L", a latent's). tests/test_aot.py asserts that
    # it runs at least 4 warps a program and a wave over the SMs wherever the problem has the
    # elements for them. None: a light kernel (a reduction over B rows, the noise fills)
    heavy: str | None = None
    # a heavy kernel that reads its contiguous float32 rows 128 bits at a time wherever their
    # length is a multiple of 4 (tests/test_aot.py finds LDG.E.128 in its SASS)
    vector_loads: bool = False


# Kernel.bound of a likelihood's forward and backward: the latent term, its
# weight, and the divisor of the reduced bound (forward) or of its gradient
BOUND_FORWARD = ("term", "weight", "divisor")
BOUND_BACKWARD = ("dterm", "weight", "g_divisor")


class Op(NamedTuple):
    """A public op, described once: its kernels, the test module that checks it
    (also run under the Triton interpreter), its benchmark, and the facts the
    suite's per-op lists derive from (tests/test_registry.py fails when an op
    is missing from one of them)."""

    name: str
    kernels: tuple[str, ...]
    test: str  # its test module, from the repository root
    benchmark: str | None  # its Bench (an op's folder), else benchmarks/bench_<benchmark>.py
    # on the CUDA path, per forward + backward: Triton launches forward, Triton
    # launches backward, other kernels (the seed's randint, ``other_kernels``)
    # (tests/test_launches.py asserts them as ceilings)
    launches: tuple[int, int, int] = (1, 1, 0)
    # the Function's create_graph=True branch: "closed form" (fastvae/_double_backward.py,
    # a gradgradcheck case in tests/test_double_backward.py) or "not_twice" (a named
    # error, tested there as test_<op>_raises_...)
    double_backward: str = "closed form"
    # the eager CPU operators of csrc/torch_ops.cpp (torch.ops.fastvae_cpp.<name>) that serve it
    torch_ops: tuple[str, ...] = ()
    # aten kernels it may launch on CUDA besides the seed's randint
    other_kernels: tuple[str, ...] = ()
    # the likelihood= name it computes log p(x | z) for after the user's decoder (an entry of
    # _decoder's likelihood table; tests/test_registry.py checks the two agree), None for an op
    # that is no decoder likelihood (mixture_log_prob is a prior's log p(z))
    likelihood: str | None = None
    # with a likelihood: the function of the folder's op.py that takes a decoder output there,
    # route(x, out, sample_shape, batch_ndim, probs_given) -> log p(x | z) (its shape checked, its
    # event flattened: fastvae/_likelihood_layout.py), and the dimensions that output has beyond
    # x's (the categorical's classes); fastvae/_decoder.py builds its likelihood table from these
    route: str = "decoder_route"
    class_dims: int = 0
    # with a likelihood: the class of the folder's op.py that fuses it into the objectives' plans'
    # tail (its kernels launched with the bound's epilogue, kernels/_common.py's bound_epilogue):
    # fastvae/_plan.py's TailPlan makes one per plan and calls it, and calls with this likelihood
    # take the plans' short path. None: the general tail. What the class provides is FusedTail's
    # (below); tests/test_plan.py checks every declared one
    plan_tail: str | None = None
    # an op of the training path, which benchmarks/gpu_model.py models on an H100:
    # (shape, dtype) -> its fewest bytes "forward" and "backward" at a K x B x L x D problem
    # (shape: a dict of those four) in a dtype (its name), which is its folder's Bench.min_bytes
    # at that problem; None: an op the model leaves out
    model_bytes: Callable | None = None
    # the op's torch.library ops (fastvae::<name>, forward and backward) whose implementation launches
    # from its own plans (its folder's OP_PLANS) on the triton backend: each gets a torch.library.triton_op
    # twin fastvae_triton::<name> (fastvae/_triton_ops.py), the same implementation with the plan's
    # launches through wrap_triton, which a compiled graph on CUDA calls under
    # set_compiled_nodes("triton_op"); tests/test_triton_ops.py checks every one
    triton_ops: tuple[str, ...] = ()


class FusedTail:
    """What an Op's ``plan_tail`` class provides: the fused tail of its
    likelihood, for x (P, D) against a decoder output of K samples ((K, P, D)
    as the kernels read it), in one dtype. fastvae/_plan.py's TailPlan makes
    one per plan and keeps what every likelihood shares (the bound's reduction
    buffers and counter, the latent term's weight, the log-mean-exp); the
    class holds its own kernels' Launches and their integer arguments.
    Documentation only: a tail need not derive from it.

    ``__init__(K, P, D, dtype, out_dtype, device, reduce, iwae, out_shape,
    lead, placeholder, counters)``: plans the launches. dtype is the compute
    dtype (x's, the rows', the bound's), out_dtype the decoder output's (a
    half-precision one under autocast picks its kernels' variants); reduce:
    the forward reduces the rows to the bound (the elbo's), else it writes
    them; iwae: the backward reads a gradient per row (the log-mean-exp's),
    else the bound's scalar gradient; out_shape (None where the plan only
    launches, as tests do) the decoder output's shape the call passes, of
    which the first ``lead`` dimensions are rows; placeholder (an
    accumulation-dtype (1,) tensor) and counters (an int32 (1,) tensor) are
    the plan's stand-ins for the buffers a kernel variant never touches.

    ``programs``: the programs of its reducing forward, one partial sum each.

    ``fit(out)``: (the tensor the kernels read, ``aux`` or None) where the
    call's decoder output ``out`` fits the plan, else None (the general tail
    runs). The steady-state call's one question per call: keep it flat. The
    compiled path's graph ops (fastvae/_plan_ops.py) skip it and pass one
    contiguous tensor of out_shape with aux None: that must be a decoder
    output the likelihood takes alone.

    ``forward(x, out, aux, res, term, part, counter, term_bits, divisor)``:
    launches the forward on fit's pair, writing log p(x | z) + w term per row
    to res, or (reduce) their sum over divisor, with the partial sums ``part``
    and the arrival ``counter`` (placeholders otherwise); w: the float64 of
    term_bits.

    ``backward(grad, x, out, aux, dout, dterm, term_bits, divisor)``: launches
    the backward: dout, the decoder output's gradient, and (dterm not dout)
    the latent term's.

    ``general_output(out, aux)``: the decoder output as the general tail
    reads it, from fit's pair (a create_graph=True backward replays that)."""


# the methods every plan_tail class defines (FusedTail's; tests/test_plan.py)
FUSED_TAIL_METHODS = ("fit", "forward", "backward", "general_output")


class Bench(NamedTuple):
    """An op's benchmark row (benchmarks/bench_op.py runs it; benchmarks/README.md
    says what the columns mean): the op against the same formula in eager torch
    (and torch.compile of it) at a small size, where the per-call cost is most
    of the time, and a large one, where bandwidth is. A size is a dict of the
    parameters ``inputs`` reads (its integers, and any other choice a case
    makes: a family, a mode), shown as the case's label."""

    # the table's title; a {name} in it is the first size's value (of a dimension the sizes share)
    title: str
    # the full run's sizes: each a case, its dimensions (and any other figure it records
    # with its results, as mixture_log_prob's io_mb) by name
    sizes: tuple[dict, ...]
    quick: tuple[dict, ...]  # --quick (a smoke run)
    # (size, device) -> (the call's arguments, the tensors it differentiates, the incoming gradients)
    inputs: Callable
    eager: Callable  # the formula in eager torch, called with the same arguments
    # size -> the bytes a kernel must move at least, for "forward", "backward" and "fwd+bwd"
    min_bytes: Callable
    # the public function, fastvae.<fastvae>; a family's row may name several, which
    # ``call`` then takes first, in order
    fastvae: str | tuple[str, ...]
    # the names of a size that label its case ("K=1"); None: all of them ("B=100,L=8")
    label_keys: tuple[str, ...] | None = None
    # how the arguments call it where that is not fastvae.<fastvae>(*arguments) (a
    # keyword argument, an argument the eager formula takes another way):
    # (the function, *arguments) -> its outputs
    call: Callable | None = None
    # timed repeats (--repeats overrides): a count for every size, or size -> its count;
    # None: 200 below 10,000 elements (the product of a size's integers), else 20
    repeats: int | Callable | None = None
