"""The eager CPU operators with C++ autograd (csrc/torch_ops.cpp, fastvae_cpp::*).

They run the same kernels as the ops' Python autograd.Functions, so on every
input they must give the same values and gradients bit for bit; the
Hypothesis tests of each op (tests/test_<op>.py) check both paths against
the float64 reference, since eager cpp calls take this one. Here: that the
right path is taken, the equality with the Function path, and the checks at
the C++ boundary.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastvae
from fastvae import _backend
from fastvae.ops.sample_normal.op import (
    sample_normal_of_scale_unchecked,
    sample_normal_unchecked,
    sample_normal_with_ratio_unchecked,
)

from helpers import op_cases

pytestmark = pytest.mark.skipif(
    not _backend.cpp_available() or not _backend.cpp_module().HAS_TORCH_OPS,
    reason="built without torch headers: no C++ operators")


@pytest.fixture
def function_path(monkeypatch):
    """Calls made inside ``with function_path():`` take the Python autograd.Functions."""
    @contextlib.contextmanager
    def disabled():
        with monkeypatch.context() as m:
            m.setattr(_backend, "torch_ops", lambda *t: None)
            yield
    return disabled


def _grads(fn, inputs, seed=0):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(1)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    nodes = _graph_nodes(total.grad_fn)
    grads = torch.autograd.grad(total, [t for t in leaves if t.requires_grad], allow_unused=True)
    return [o.detach() for o in outs], list(grads), nodes


def _graph_nodes(fn) -> set[str]:
    """The names of every autograd node behind fn."""
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    return seen


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(torch.nan_to_num(x, nan=7.0), torch.nan_to_num(y, nan=7.0))
            assert not torch.isnan(x).any()


def _both_paths(fn, inputs, function_path):
    assert _backend.torch_ops(inputs[-1]) is not None  # the C++ operator serves eager CPU calls
    fast = _grads(fn, inputs)
    with function_path():
        slow = _grads(fn, inputs)
    # each run took the path it was meant to, so the comparison compares two paths
    assert any("fastvae::torch_ops" in n for n in fast[2]), fast[2]
    assert not any("fastvae::torch_ops" in n for n in slow[2]), slow[2]
    _assert_same(fast[0], slow[0])
    _assert_same(fast[1], slow[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,n_samples", [((5, 3), None), ((5, 3), 4), ((2, 3, 7), 1), ((1, 1), 3), ((4, 0), 2)])
def test_sample_normal_matches_the_function(function_path, dtype, shape, n_samples):
    g = torch.Generator().manual_seed(2)
    mu, lv = torch.randn(shape, generator=g, dtype=dtype), 3 * torch.randn(shape, generator=g, dtype=dtype)
    _both_paths(lambda m, v: sample_normal_unchecked(m, v, n_samples, None), (mu, lv), function_path)


@pytest.mark.parametrize("stop_score", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_normal_with_ratio_matches_the_function(function_path, stop_score, dtype):
    g = torch.Generator().manual_seed(3)
    mu, lv = torch.randn(3, 4, 5, generator=g, dtype=dtype), torch.randn(3, 4, 5, generator=g, dtype=dtype)
    _both_paths(lambda m, v: sample_normal_with_ratio_unchecked(m, v, 6, stop_score, None), (mu, lv), function_path)


@pytest.mark.parametrize("exp_z", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,n_samples", [((5, 3), None), ((2, 3, 7), 4), ((1, 1), 1), ((4, 0), 2), ((70, 33), 1)])
def test_sample_normal_of_scale_takes_the_operator(function_path, dtype, shape, n_samples, exp_z):
    """(mu, scale) on the CPU takes fastvae_cpp::sample_normal_of_scale, which
    the Function path serves with the logvar 2 log(scale) (and with exp_z the
    exp of the draw) formed in torch: the same values and gradients to the
    rounding of the kernels' own log and exp (not bit for bit, unlike the
    operators above), never NaN."""
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(shape, generator=g, dtype=dtype)
    scale = torch.exp((0.5 if exp_z else 2) * torch.randn(shape, generator=g, dtype=dtype))
    assert _backend.torch_ops(mu, scale) is not None

    def fn(m, s):
        return sample_normal_of_scale_unchecked(m, s, n_samples, torch.Generator().manual_seed(3), exp_z)

    fast = _grads(fn, (mu, scale))
    with function_path():
        slow = _grads(fn, (mu, scale))
    assert any("fastvae::torch_ops" in n for n in fast[2]), fast[2]
    assert not any("fastvae::torch_ops" in n for n in slow[2]), slow[2]
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
        assert a.shape == b.shape and a.dtype == b.dtype and not torch.isnan(a).any()
        assert ((a - b).abs() <= rtol * (1 + b.abs())).all()


def test_sample_normal_of_scale_checks_its_arguments():
    """The operator's boundary refuses a scale of another shape, by name."""
    ops = _backend.torch_ops(torch.zeros(1))
    with pytest.raises(RuntimeError, match="scale: expected shape"):
        ops.sample_normal_of_scale(torch.zeros(3, 4), torch.ones(3, 5), 1, None)
    with pytest.raises(RuntimeError, match="n_samples must be >= 1"):
        ops.sample_normal_of_scale(torch.zeros(3, 4), torch.ones(3, 4), 1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_shape,logits_shape", [((6, 9), (6, 9)), ((6, 9), (4, 6, 9)), ((2, 3, 5), (7, 2, 3, 5)),
                                                  ((1, 9), (3, 1, 9))])
def test_bernoulli_log_prob_matches_the_function(function_path, dtype, x_shape, logits_shape):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(x_shape, generator=g, dtype=dtype)
    logits = 5 * torch.randn(logits_shape, generator=g, dtype=dtype)
    logits.view(-1)[0] = float("inf")  # a saturated logit: 0 or -inf, never NaN
    x.view(-1)[0] = 1.0
    _both_paths(fastvae.bernoulli_log_prob, (x, logits), function_path)
    _both_paths(lambda lg: fastvae.bernoulli_log_prob(x, lg), (logits,), function_path)  # no dx wanted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape,logits_shape", [((6, 9), (6, 9)), ((6, 9), (4, 6, 9)), ((1, 9), (3, 1, 9))])
def test_bernoulli_log_prob_of_half_precision_logits_matches_the_function(function_path, dtype, x_shape,
                                                                           logits_shape):
    """Half-precision logits against float32 x (autocast's decoder output on
    the CPU) take the C++ operator too, read as stored: the Function's values
    and gradients bit for bit (a float32 result, dlogits in the logits' dtype),
    and its second derivatives."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(x_shape, generator=g)
    logits = (5 * torch.randn(logits_shape, generator=g)).to(dtype)
    logits.view(-1)[0] = float("inf")
    x.view(-1)[0] = 1.0
    for fn, inputs in ((fastvae.bernoulli_log_prob, (x, logits)),
                       (lambda lg: fastvae.bernoulli_log_prob(x, lg), (logits,))):
        fast = _grads(fn, inputs)
        with function_path():
            slow = _grads(fn, inputs)
        assert any("fastvae::torch_ops" in n for n in fast[2]), fast[2]
        assert not any("fastvae::torch_ops" in n for n in slow[2]), slow[2]
        assert fast[0][0].dtype == torch.float32 and fast[1][-1].dtype == dtype
        _assert_same(fast[0], slow[0])
        _assert_same(fast[1], slow[1])
    second = []
    for path in (contextlib.nullcontext, function_path):
        finite = logits.clone()
        finite.view(-1)[0] = 2.0
        xl, ll = x.clone().requires_grad_(), finite.requires_grad_()
        with path():
            out = fastvae.bernoulli_log_prob(xl, ll)
        gx, gl = torch.autograd.grad(out.sum(), (xl, ll), create_graph=True)
        second.append(torch.autograd.grad((gx * gx).sum() + (gl.float() * gl.float()).sum(), (xl, ll)))
    for a, b in zip(*second):
        assert a.dtype == b.dtype and not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_shape,mean_shape", [((6, 9), (6, 9)), ((6, 9), (4, 6, 9)), ((2, 3, 5), (7, 2, 3, 5))])
@pytest.mark.parametrize("variance", ["unit", "scale", "per_dim", "per_row", "per_element", "softplus", "softplus_row"])
def test_gaussian_log_prob_matches_the_function(function_path, dtype, x_shape, mean_shape, variance):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    mean = torch.randn(mean_shape, generator=g, dtype=dtype)
    D = mean_shape[-1]
    var = {"per_dim": torch.randn(D, generator=g, dtype=dtype),
           "per_row": torch.randn(x_shape, generator=g, dtype=dtype),
           "per_element": torch.randn(mean_shape, generator=g, dtype=dtype),
           "softplus": torch.randn(mean_shape, generator=g, dtype=dtype),
           "softplus_row": torch.randn(x_shape, generator=g, dtype=dtype)}.get(variance)
    if variance == "unit":
        fn = fastvae.gaussian_log_prob
    elif variance == "scale":
        fn = lambda a, m: fastvae.gaussian_log_prob(a, m, scale=0.3)
    elif variance.startswith("softplus"):
        fn = lambda a, m, v: fastvae.gaussian_log_prob(a, m, softplus_var=v, delta=1e-3)
    else:
        fn = lambda a, m, v: fastvae.gaussian_log_prob(a, m, v)
    inputs = (x, mean) if var is None else (x, mean, var)
    _both_paths(fn, inputs, function_path)
    # without dx and dvar_param: only the mean's gradient is computed
    _both_paths(lambda m: fn(x, m, *inputs[2:]), (mean,), function_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5), (7, 3), (4, 2, 3), (50, 1)])
def test_logmeanexp_matches_the_function(function_path, dtype, shape):
    g = torch.Generator().manual_seed(8)
    lw = 30 * torch.randn(shape, generator=g, dtype=dtype)
    lw[:, 0] = float("-inf")  # an all -inf column: -inf, zero gradient, never NaN
    lw[0, -1] = float("-inf")
    _both_paths(lambda t: fastvae.logmeanexp(t), (lw,), function_path)
    _both_paths(lambda t: fastvae.logmeanexp(t, dim=-1), (lw,), function_path)
    # the state, whose sumexp carries gradient and lw_max none
    _both_paths(lambda t: tuple(fastvae.logmeanexp_state(t))[:2], (lw,), function_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 7), (1, 1)])
def test_kl_normal_matches_the_function(function_path, dtype, shape):
    g = torch.Generator().manual_seed(9)
    mu, lv = torch.randn(shape, generator=g, dtype=dtype), 10 * torch.randn(shape, generator=g, dtype=dtype)
    pm, plv = torch.randn(shape[-1], generator=g, dtype=dtype), torch.randn(shape[-1], generator=g, dtype=dtype)
    _both_paths(fastvae.kl_normal, (mu, lv), function_path)
    _both_paths(fastvae.kl_normal, (mu, lv, pm, plv), function_path)  # a learned (L,) prior, its gradients too
    _both_paths(lambda m, v: fastvae.kl_normal(m, v, pm, plv), (mu, lv), function_path)


def test_objectives_match_the_function_path(function_path):
    """elbo and iwae (all estimators) give the same bound and gradients on either path."""
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(7, 10, generator=g) > 0.5).float()
    mu, lv = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    w = torch.randn(3, 10, generator=g)
    for fn in (lambda m, v: fastvae.elbo(x, m, v, lambda z: z @ w, likelihood="bernoulli", n_samples=2),
               *(lambda m, v, e=e: fastvae.iwae(x, m, v, lambda z: z @ w, k=5, likelihood="bernoulli", estimator=e)
                 for e in ("iwae", "dreg", "stl"))):
        _both_paths(fn, (mu, lv), function_path)
    # free bits: the per-dimension KL from kl_normal
    _both_paths(lambda m, v: fastvae.elbo(x, m, v, lambda z: z @ w, likelihood="bernoulli", free_bits=0.5),
                (mu, lv), function_path)
    # a Gaussian decoder with a learned per-dimension variance
    log_sigma = torch.randn(10, generator=g)
    _both_paths(lambda m, v, s: fastvae.elbo(x, m, v, lambda z: (z @ w, s), likelihood="gaussian"),
                (mu, lv, log_sigma), function_path)


class _Subclass(torch.Tensor):
    """A tensor subclass: the operators leave it to the Functions."""


def test_parameters_take_the_operators():
    """An nn.Parameter (logits learned directly, a learned prior's location)
    is a plain tensor to the kernels: the C++ operator serves it, with the
    values and gradients of the same call on a plain tensor."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, 3, generator=g)
    results = []
    for leaf in (torch.nn.Parameter(logits.clone()), logits.clone().requires_grad_()):
        z, log_q = fastvae.sample_concrete(leaf, 0.5, generator=torch.Generator().manual_seed(1))
        assert any("fastvae::torch_ops" in n for n in _graph_nodes(z.grad_fn))
        (z * torch.arange(3.0)).sum().add(log_q.sum()).backward()
        results.append((z.detach(), log_q.detach(), leaf.grad))
    _assert_same(results[0], results[1])


def test_the_function_path_serves_what_the_operators_do_not():
    cpu = torch.zeros(2, 3)
    assert _backend.torch_ops(cpu) is not None
    assert _backend.torch_ops(cpu.half()) is None  # dtypes the kernels do not take
    assert _backend.torch_ops(torch.nn.Parameter(cpu)) is not None  # a plain tensor marked as a module's
    assert _backend.torch_ops(cpu.as_subclass(_Subclass)) is None  # tensor subclasses
    assert _backend.torch_ops(torch.zeros(2, 3, device="meta")) is None
    with fastvae.use_backend("reference"):
        assert _backend.torch_ops(cpu) is None
    compiled = torch.compile(lambda t: _backend.torch_ops(t) is None, fullgraph=True, backend="eager")
    assert compiled(cpu)


def test_outputs_in_their_shape_are_not_views():
    """As with the Python Functions, an output that already has its user's shape
    is returned as is, so it can be modified in place (a view of a custom
    Function's output cannot)."""
    mu, lv = torch.zeros(3, 2, requires_grad=True), torch.zeros(3, 2, requires_grad=True)
    z, kl = fastvae.sample_normal(mu, lv, 4)
    z.clamp_(-1, 1)
    kl.mul_(2)
    logits = torch.zeros(4, 3, 5, requires_grad=True)
    fastvae.bernoulli_log_prob(torch.ones(3, 5), logits).add_(1)
    fastvae.gaussian_log_prob(torch.ones(3, 5), logits).add_(1)
    (z.sum() + kl.sum()).backward()
    assert mu.grad is not None


def test_a_jit_trace_keeps_drawing_new_noise():
    """The operators take the seed as an int, which torch.jit.trace would freeze
    into the graph: while tracing, the Function path (a seed tensor) serves."""
    mu, lv = torch.zeros(3, 2), torch.zeros(3, 2)
    traced = torch.jit.trace(lambda m, v: fastvae.sample_normal(m, v)[0], (mu, lv), check_trace=False)
    assert not torch.equal(traced(mu, lv), traced(mu, lv))


def test_the_boundary_checks_before_touching_memory():
    ops = torch.ops.fastvae_cpp
    mu = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="logvar: expected shape"):
        ops.sample_normal(mu, torch.zeros(4, 2), 1, None)
    with pytest.raises(RuntimeError, match="logvar: expected dtype"):
        ops.sample_normal(mu, mu.double(), 1, None)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ops.sample_normal(mu.half(), mu.half(), 1, None)
    with pytest.raises(RuntimeError, match="n_samples must be >= 1"):
        ops.sample_normal(mu, mu, 1, 0)
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        ops.sample_normal_with_ratio(mu, mu, -1, 2, False)
    with pytest.raises(RuntimeError, match="overflows"):
        ops.sample_normal(mu, mu, 1, 2**62)
    with pytest.raises(RuntimeError, match="must have the shape of logits"):
        ops.bernoulli_log_prob(torch.zeros(4, 2), torch.zeros(3, 4, 3))
    with pytest.raises(RuntimeError, match="x: expected dtype"):
        ops.bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="x: expected dtype"):  # half-precision logits: float32 x
        ops.bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x: the cpp backend supports float32 and float64"):
        ops.bernoulli_log_prob(torch.zeros(4, 3, dtype=torch.bfloat16), torch.zeros(4, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="logits: the cpp backend supports float32, float64, bfloat16"):
        ops.bernoulli_log_prob(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="first .sample. dimension"):
        ops.bernoulli_log_prob(torch.zeros(()), torch.zeros(3))
    with pytest.raises(RuntimeError, match="neither per element, per x row nor per dimension"):
        ops.gaussian_log_prob(torch.zeros(4, 3), torch.zeros(2, 4, 3), torch.zeros(5), False, 1e-6)
    with pytest.raises(RuntimeError, match=r"lw: expected \(K, ...\) with K >= 1"):
        ops.logmeanexp(torch.zeros(0, 3))
    with pytest.raises(RuntimeError, match="prior_mu and prior_logvar: expected mu's shape"):
        ops.kl_normal(mu, mu, torch.zeros(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="must both be given or both be None"):
        ops.kl_normal(mu, mu, mu, None)
    with pytest.raises(RuntimeError, match="delta must be finite and at least the smallest normal"):
        ops.gaussian_log_prob(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3), True, 0.0)


def test_misaligned_and_strided_inputs_are_copied():
    """A view of a byte buffer at an odd offset, and a non-contiguous chunk, give the same results."""
    g = torch.Generator().manual_seed(6)
    mu = torch.randn(5, 3, generator=g)
    raw = bytearray(mu.numel() * 4 + 1)
    odd = torch.frombuffer(raw, dtype=torch.float32, offset=1, count=mu.numel()).view(5, 3)
    odd.copy_(mu)
    assert odd.data_ptr() % 4 != 0
    wide = torch.cat([mu, torch.zeros(5, 3)], 1)[:, :3]
    assert not wide.is_contiguous()
    ref = torch.ops.fastvae_cpp.sample_normal(mu, mu, 9, 2)
    for other in (odd, wide):
        out = torch.ops.fastvae_cpp.sample_normal(other, other, 9, 2)
        assert all(torch.equal(a, b) for a, b in zip(ref, out))


# -- the graph ops (fastvae_cpu::*): what torch.compile's graph calls on the cpp backend --

def _twin_op_cases():
    """(name, args) per twin: the Python op's schema and layout (tests/test_compile.py
    checks the compiled graph calls them and matches eager bit for bit)."""
    g = torch.Generator().manual_seed(8)
    mu, lv = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)
    m2, l2 = mu.reshape(12, 6), lv.reshape(12, 6)
    return [
        *(case for cases in op_cases("twin_op_cases").values() for case in cases(m2, l2)),
    ]


@pytest.mark.parametrize("case", range(len(_twin_op_cases())))
def test_graph_ops_match_the_python_ops_bit_for_bit_and_pass_opcheck(case):
    """Each fastvae_cpu::<op> gives what fastvae::<op> gives on the cpp backend
    (same kernels: equal bits, dtypes and shapes), in float32 and float64, and
    torch.library.opcheck passes (schema, fake, no aliasing)."""
    name, args = _twin_op_cases()[case]
    fastvae._backend.set_backend(None)
    for dtype in (torch.float32, torch.float64):
        typed = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        ours = getattr(torch.ops.fastvae_cpu, name)(*typed)
        python = getattr(torch.ops.fastvae, name)(*typed)
        ours, python = ([ours], [python]) if isinstance(ours, torch.Tensor) else (ours, python)
        assert len(ours) == len(python)
        for a, b in zip(ours, python):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        torch.library.opcheck(getattr(torch.ops.fastvae_cpu, name).default, typed)


def test_graph_ops_check_their_arguments():
    ops = torch.ops.fastvae_cpu
    mu = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="seed: expected a 0-d int64 CPU tensor"):
        ops.sample_normal(mu, mu, torch.tensor(1.0), 2)
    with pytest.raises(RuntimeError, match="logvar: expected shape"):
        ops.sample_normal(mu, torch.zeros(4, 2), torch.tensor(1), 2)
    with pytest.raises(RuntimeError, match=r"logits: expected a 3-d \(K, P, D\) tensor"):
        ops.bernoulli_log_prob(mu, mu)
    with pytest.raises(RuntimeError, match=r"var_param: expected \(K, P, D\), \(P, D\) or \(D,\)"):
        ops.gaussian_log_prob(mu, mu[None], torch.zeros(1, 1, 4, 3), False, 1e-6)
    with pytest.raises(RuntimeError, match="grad_kl: expected shape"):
        ops.kl_normal_backward(torch.zeros(3), mu, mu, None, None)


def test_graph_ops_read_the_seed_where_it_lies():
    """The graph ops read their 0-d seed tensor's element in place (no
    dispatcher call): a seed that is a view into a larger tensor (an offset
    into its storage) draws the same noise as the same value alone, forward
    and backward."""
    ops = torch.ops.fastvae_cpu
    g = torch.Generator().manual_seed(8)
    mu, lv = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    alone, view = torch.tensor(123), torch.tensor([7, 123, 9])[1]
    assert view.storage_offset() == 1 and view.dim() == 0
    z, kl = ops.sample_normal(mu, lv, alone, 2)
    z2, kl2 = ops.sample_normal(mu, lv, view, 2)
    assert torch.equal(z, z2) and torch.equal(kl, kl2)
    assert not torch.equal(z, ops.sample_normal(mu, lv, torch.tensor(124), 2)[0])
    gz = torch.randn(2, 5, 3, generator=g)
    for a, b in zip(ops.sample_normal_backward(mu, lv, alone, gz, kl, None, False),
                    ops.sample_normal_backward(mu, lv, view, gz, kl, None, False)):
        assert torch.equal(a, b) and not torch.isnan(a).any()
