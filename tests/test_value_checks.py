"""The common silent mistakes warn or raise, naming the argument
and the fix, without a host sync in the steady state of the CUDA path
(tests/test_launches.py counts none there)."""
import warnings

import pytest
import torch
from torch import nn

import fastvae
from fastvae import _value_checks

from conftest import INTERPRET

SIGMOID = "did you apply a sigmoid"
OUTSIDE = r"lies outside \[0, 1\]"


@pytest.fixture(autouse=True)
def every_call_checked():
    """On CUDA, and under the interpreter where the Triton backend stands in
    for it, the default checks only the first call: these tests see every
    call (the first-call rule has its own test). On the CPU backends "auto"
    checks every call already, as "always" does."""
    if INTERPRET or torch.cuda.is_available():
        fastvae.set_value_checks("always")


def _model(device, B=6, L=3, D=10):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(B, D, generator=g) > 0.5).float().to(device)
    mu = torch.randn(B, L, generator=g).to(device).requires_grad_()
    logvar = (0.3 * torch.randn(B, L, generator=g)).to(device).requires_grad_()
    W = torch.randn(L, D, generator=g).to(device)
    return x, mu, logvar, (lambda z: z @ W), (lambda z: torch.sigmoid(z @ W))


def _no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return fn()


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_sigmoid_decoder_under_bernoulli_warns(backend, objective):
    x, mu, logvar, logits_decoder, sigmoid_decoder = _model(backend[1])
    kw = {"k": 4} if objective == "iwae" else {}
    fn = getattr(fastvae, objective)
    _no_warning(lambda: fn(x, mu, logvar, logits_decoder, likelihood="bernoulli", **kw))
    with pytest.warns(UserWarning, match=rf"decode\(z\) \(likelihood='bernoulli'\): logits expected.*{SIGMOID}"):
        fn(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli", **kw)


def test_the_warning_points_at_the_users_line(backend):
    x, mu, logvar, _, sigmoid_decoder = _model(backend[1])
    with pytest.warns(UserWarning, match=SIGMOID) as record:
        fastvae.elbo(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli")
    assert record[0].filename == __file__


def test_raw_pixels_under_bernoulli_warn(backend):
    x, mu, logvar, decode, _ = _model(backend[1])
    with pytest.warns(UserWarning, match=rf"x \(likelihood='bernoulli'\) {OUTSIDE} \(min 0, max 16\).*Scale"):
        fastvae.elbo(x * 16, mu, logvar, decode, likelihood="bernoulli")


def test_bernoulli_log_prob_names_its_arguments(backend):
    device = backend[1]
    x = torch.rand(5, 7, device=device)
    _no_warning(lambda: fastvae.bernoulli_log_prob(x, torch.randn(3, 5, 7, device=device)))
    _no_warning(lambda: fastvae.bernoulli_log_prob(x, torch.zeros(3, 5, 7, device=device)))  # a zero-init layer
    with pytest.warns(UserWarning, match=rf"^logits: logits expected.*{SIGMOID}"):
        fastvae.bernoulli_log_prob(x, torch.rand(3, 5, 7, device=device))
    with pytest.warns(UserWarning, match=rf"^x {OUTSIDE}"):
        fastvae.bernoulli_log_prob(x - 0.5, torch.randn(3, 5, 7, device=device))


def test_pixels_outside_minus_one_one_under_the_logistic_mixture_warn(backend):
    """Raw 8-bit pixels, or pixels in [0, 1] scaled up wrong, all fall in the
    last bin: a finite number that is no log-likelihood of the images."""
    device = backend[1]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 4, 5), generator=g).float()
    pixels[0, 0, 0, :2] = torch.tensor([0.0, 255.0])
    params = torch.randn(2, 2, 30, 4, 5, generator=g).to(device)
    log_prob = fastvae.discretized_logistic_mixture_log_prob
    _no_warning(lambda: log_prob((pixels / 127.5 - 1).to(device), params))
    with pytest.warns(UserWarning, match=r"^x lies outside \[-1, 1\] \(min 0, max 255\).*p / 127.5 - 1"):
        log_prob(pixels.to(device), params)


def test_a_bernoulli_of_probs_is_not_taken_for_a_sigmoid_mistake(backend):
    """decode may return Bernoulli(probs=...): its logits may lie in [0, 1] legitimately."""
    x, mu, logvar, _, sigmoid_decoder = _model(backend[1])
    probs = lambda z: torch.distributions.Bernoulli(probs=0.5 + 0.2 * sigmoid_decoder(z))
    _no_warning(lambda: fastvae.elbo(x, mu, logvar, probs))


def test_each_kind_warns_once(backend):
    x, mu, logvar, _, sigmoid_decoder = _model(backend[1])
    with pytest.warns(UserWarning, match=SIGMOID):
        fastvae.elbo(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli")
    _no_warning(lambda: fastvae.elbo(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli"))


def test_a_non_positive_scale_tensor_raises(backend):
    device = backend[1]
    x, mean = torch.randn(4, 5, device=device), torch.randn(2, 4, 5, device=device)
    scale = torch.full((5,), 0.5, device=device)
    fastvae.gaussian_log_prob(x, mean, scale=scale)
    for bad in (-0.5, 0.0):
        scale[2] = bad
        with pytest.raises(ValueError, match=r"scale must be > 0 \(a standard deviation\)"):
            fastvae.gaussian_log_prob(x, mean, scale=scale)
    fastvae.set_value_checks("never")  # off: the NaN the check exists to prevent
    assert torch.isnan(fastvae.gaussian_log_prob(x, mean, scale=scale)).all()


def test_checks_can_be_switched_off(backend):
    x, mu, logvar, _, sigmoid_decoder = _model(backend[1])
    fastvae.set_value_checks("never")
    _no_warning(lambda: fastvae.elbo(x * 16, mu, logvar, sigmoid_decoder, likelihood="bernoulli"))
    with pytest.raises(ValueError, match="mode must be one of"):
        fastvae.set_value_checks("sometimes")


@pytest.mark.skipif(not INTERPRET, reason="the Triton backend stands in for CUDA under the interpreter")
def test_on_the_cuda_path_only_the_first_call_is_checked():
    """A mistake made from the second call on is not seen: the check costs a
    host sync, paid once per process; "always" pays it at every call."""
    fastvae.set_value_checks("auto")
    x, mu, logvar, decode, sigmoid_decoder = _model("cpu")
    fastvae.elbo(x, mu, logvar, decode, likelihood="bernoulli")  # the one check, clean
    _no_warning(lambda: fastvae.elbo(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli"))
    fastvae.set_value_checks("always")
    with pytest.warns(UserWarning, match=SIGMOID):
        fastvae.elbo(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli")


@pytest.mark.skipif(INTERPRET, reason="CPU tensors on the cpp and reference backends")
def test_on_cpu_every_call_is_checked():
    x, mu, logvar, decode, sigmoid_decoder = _model("cpu")
    fastvae.elbo(x, mu, logvar, decode, likelihood="bernoulli")
    with pytest.warns(UserWarning, match=SIGMOID):
        fastvae.elbo(x, mu, logvar, sigmoid_decoder, likelihood="bernoulli")


def test_the_check_reads_a_bounded_prefix():
    """A small tensor whole, of a big one at most PREFIX values, as a view
    whatever the layout (no copy of a big tensor)."""
    for shape in [(3, 5000), (7, 300, 64), (20000,), (2, 3), (100, 64)]:
        t = torch.randn(*shape)
        for view in (t, t.transpose(0, -1) if t.dim() > 1 else t):
            head = _value_checks.prefix(view)
            assert 0 < head.numel() <= (t.numel() if t.numel() <= _value_checks.WHOLE else _value_checks.PREFIX)
            assert head.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def test_the_digits_mistakes_warn(backend):
    """Probabilities as Bernoulli logits and data outside [0, 1], on a model of
    the demo's shape: each warns."""
    torch.manual_seed(0)
    device = backend[1]
    enc, dec = nn.Linear(64, 8).to(device), nn.Linear(4, 64).to(device)
    x = torch.randint(0, 17, (20, 64)).float().to(device)
    mu, logvar = enc(x / 16).chunk(2, -1)
    with pytest.warns(UserWarning, match=SIGMOID):
        fastvae.elbo(x / 16, mu, logvar, nn.Sequential(dec, nn.Sigmoid()), likelihood="bernoulli")
    with pytest.warns(UserWarning, match=OUTSIDE):
        fastvae.elbo(x, mu, logvar, dec, likelihood="bernoulli")


def test_continuous_bernoulli_has_its_own_slot_and_words(backend):
    """A Bernoulli warning spends the Bernoulli's slot only: 0..255 data under
    the continuous Bernoulli still warns afterwards, in its own words."""
    device = backend[1]
    x255 = torch.randint(0, 256, (4, 9)).float().to(device)
    logits = torch.randn(4, 9).to(device)
    with pytest.warns(UserWarning, match="the Bernoulli likelihood takes binary data"):
        fastvae.bernoulli_log_prob(x255, logits)
    with pytest.warns(UserWarning, match=r"continuous Bernoulli likelihood is a density on \[0, 1\]") as record:
        fastvae.continuous_bernoulli_log_prob(x255, logits)
    assert not any("binary data" in str(w.message) for w in record)
    with pytest.warns(UserWarning, match=r"ContinuousBernoulli\(probs=\.\.\.\)"):
        fastvae.continuous_bernoulli_log_prob(torch.rand(4, 9).to(device), torch.sigmoid(logits))


@pytest.mark.parametrize("likelihood", ["poisson", "negative_binomial", "zinb"])
def test_non_integer_counts_warn_in_ops_objectives_and_evaluation(backend, likelihood):
    """log1p-normalized expression under a count likelihood gives a finite,
    meaningless number: the op, the objectives and the evaluation warn, each
    likelihood in its own slot; raw counts (integer-valued floats) do not."""
    device = backend[1]
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.rand(3, 8, generator=g) * 5, generator=g).to(device)
    normalized = torch.log1p(counts / counts.sum(-1, keepdim=True) * 1e4)
    params = [torch.randn(3, 8, generator=g).to(device) for _ in range({"poisson": 1, "negative_binomial": 2,
                                                                         "zinb": 3}[likelihood])]
    op = getattr(fastvae, f"{likelihood}_log_prob")
    _no_warning(lambda: op(counts, *params))
    with pytest.warns(UserWarning, match=rf"x holds a non-integer value .*likelihood='{likelihood}'.*raw counts"):
        op(normalized, *params)
    fastvae.set_value_checks("auto")  # the slot is spent once warned; the objectives' check is the same one
    if backend[0] == "triton":
        # on the triton backend (CUDA, the interpreter) "auto" checks the first call of each kind only,
        # which the integer-count elbo call below spends before the non-integer iwae call
        fastvae.set_value_checks("always")
    L = 2
    mu = torch.zeros(3, L, device=device, requires_grad=True)
    logvar = torch.zeros(3, L, device=device)
    W = torch.randn(L, 8, generator=g).to(device)

    def decode(z):
        h = z @ W
        return h if likelihood == "poisson" else (h, torch.zeros_like(h)) if likelihood == "negative_binomial" \
            else (h, torch.zeros_like(h), torch.zeros_like(h) - 2)

    _no_warning(lambda: fastvae.elbo(counts, mu, logvar, decode, likelihood=likelihood))
    with pytest.warns(UserWarning, match=rf"x \(likelihood='{likelihood}'\) holds a non-integer value"):
        fastvae.iwae(normalized, mu, logvar, decode, k=3, likelihood=likelihood)
    fastvae.set_value_checks("always")
    with pytest.warns(UserWarning, match="non-integer"):
        fastvae.log_likelihood(normalized, lambda x: (mu.detach(), logvar), decode, k=4, likelihood=likelihood)


def test_negative_counts_still_raise(backend):
    device = backend[1]
    with pytest.raises(ValueError, match="x must hold counts >= 0"):
        fastvae.poisson_log_prob(torch.tensor([[1.0, -2.0]], device=device), torch.zeros(1, 2, device=device))


def test_a_decoder_distribution_built_from_sigmoid_logits_is_checked(backend):
    """Bernoulli(logits=torch.sigmoid(h)) is the sigmoid mistake inside a
    distribution: it warns as a raw output does. Bernoulli(probs=...) does not."""
    x, mu, logvar, logits_decoder, _ = _model(backend[1])
    td = torch.distributions
    _no_warning(lambda: fastvae.elbo(x, mu, logvar, lambda z: td.Bernoulli(probs=torch.sigmoid(logits_decoder(z)))))
    _no_warning(lambda: fastvae.elbo(x, mu, logvar, lambda z: td.Independent(
        td.Bernoulli(logits=logits_decoder(z)), 1)))
    with pytest.warns(UserWarning, match=SIGMOID):
        fastvae.elbo(x, mu, logvar, lambda z: td.Independent(td.Bernoulli(logits=torch.sigmoid(logits_decoder(z))), 1))
    with pytest.warns(UserWarning, match=SIGMOID):
        fastvae.iwae(x, mu, logvar, lambda z: td.ContinuousBernoulli(logits=torch.sigmoid(logits_decoder(z))), k=2)
