"""docs/migrating.md runs as written, and each of its patterns gives the
script's own loss.

Each section's blocks run after the page's first block, in a namespace of
their own. The check then feeds the noise fastvae drew (for a call made after
torch.manual_seed) to the *before* code through torch.randn_like, and
compares the two losses in float64 (the page's models converted after they
ran as written in float32): the same number up to rounding, or, where the
page says so, up to a stated constant."""
import math
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import reference

from conftest import INTERPRET
from helpers import philox_seed_of

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
pytest.importorskip("sklearn")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"


def _sections() -> tuple[str, dict[str, list[str]]]:
    """(the page's first block, {section title: its blocks})."""
    text = PAGE.read_text()
    head, *rest = re.split(r"^## ", text, flags=re.M)
    (prelude,) = re.findall(r"```python\n(.*?)```", head, re.S)
    sections = {}
    for part in rest:
        title, body = part.split("\n", 1)
        sections[title.strip()] = re.findall(r"```python\n(.*?)```", body, re.S)
    return prelude, sections


def run_section(*titles: str) -> dict:
    """The namespace after the first block and the sections' blocks ran as
    written (a section that continues another names both, in order)."""
    prelude, sections = _sections()
    ns: dict = {}
    exec(compile(prelude, str(PAGE), "exec"), ns)  # noqa: S102 (the page's own code)
    for title in titles:
        assert sections[title], f"section {title!r} has no code"
        for block in sections[title]:
            exec(compile(block, str(PAGE), "exec"), ns)  # noqa: S102
    return ns


def to_float64(ns: dict) -> torch.Tensor:
    """The section's modules, parameters and x in float64, in place: the
    comparisons below then see the mapping, not float32 rounding."""
    for value in ns.values():
        if isinstance(value, torch.nn.Parameter):
            value.data = value.data.double()
        elif isinstance(value, torch.nn.Module):
            value.double()
    ns["x"] = ns["x"].double()
    return ns["x"]


def drawn_noise(seed: int, n_samples: int, shape) -> torch.Tensor:
    """The eps a fastvae call draws right after torch.manual_seed(seed): (n_samples, *shape)."""
    return reference.sample_noise(philox_seed_of(seed), n_samples, torch.Size(shape), torch.float64, "cpu")


@contextmanager
def fed_noise(eps: torch.Tensor):
    """torch.randn_like returns eps (in the tensor's dtype): the *before* code's
    reparameterization draws what fastvae drew."""
    real = torch.randn_like

    def randn_like(t, *args, **kwargs):
        assert t.shape == eps.shape, (tuple(t.shape), tuple(eps.shape))
        return eps.to(t.dtype)

    torch.randn_like = randn_like
    try:
        yield
    finally:
        torch.randn_like = real


def close(actual, expected, rtol=1e-10):
    assert torch.isfinite(expected) and expected.abs() > 0.05, expected  # a real loss, not a vacuous 0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0.0)


def test_every_section_of_the_page_runs_and_is_checked():
    """Every section with code has a test below (a new pattern needs one)."""
    _, sections = _sections()
    with_code = {title for title, blocks in sections.items() if blocks}
    assert with_code == set(CHECKED), with_code ^ set(CHECKED)


def test_classic_bce_kld_vae():
    ns = run_section("The classic MLP VAE: BCE + KLD")
    x = to_float64(ns)
    torch.manual_seed(11)
    after = ns["loss_after"](ns["new_model"], x)
    with fed_noise(drawn_noise(11, 1, (x.shape[0], 20))[0]):
        before = ns["loss_before"](ns["model"], x)
    close(after, before)


def test_sigmoid_decoder_warns_then_works_as_bernoulli_probs():
    """The sigmoid decoder under likelihood="bernoulli" warns,
    naming both fixes; the Bernoulli(probs=) fix gives the script's loss."""
    ns = run_section("The classic MLP VAE: BCE + KLD", "Decoders that end in a sigmoid")
    x = to_float64(ns)
    model = ns["model"]
    mu, logvar = model.encode(x)
    with pytest.warns(UserWarning, match=r"did you apply a sigmoid\?.*drop the final Sigmoid.*Bernoulli\(probs="):
        fastvae.elbo(x, mu, logvar, model.decode, likelihood="bernoulli")
    torch.manual_seed(12)
    after = ns["loss_after_probs"](model, x)
    with fed_noise(drawn_noise(12, 1, mu.shape)[0]):
        before = ns["loss_before"](model, x)
    close(after, before)


def test_mse_plus_kld_weight_is_a_scaled_gaussian_elbo():
    """mse + w KL = (2/D)(-ELBO_beta) - log 2 pi with beta = w D / 2,
    and = w (-ELBO) - (w D / 2) log(2 pi sigma^2) at the fixed sigma^2 = w D / 2;
    the learned variance at that value is the same likelihood."""
    ns = run_section("`F.mse_loss` + `kld_weight`: a Gaussian likelihood")
    x = to_float64(ns)
    shape = (x.shape[0], 8)
    torch.manual_seed(13)
    after = ns["loss_after"](x)
    with fed_noise(drawn_noise(13, 1, shape)[0]):
        before = ns["loss_before"](x)
    close(after, before)
    torch.manual_seed(13)
    close(ns["loss_fixed_variance"](x), before, rtol=1e-7)  # log sigma^2 is a float32 tensor on the page
    w, D, sigma2 = ns["kld_weight"], x.shape[1], ns["sigma2"]
    assert sigma2 == w * D / 2 and ns["beta"] == w * D / 2
    with torch.no_grad():
        ns["log_sigma2"].fill_(math.log(sigma2))
    torch.manual_seed(13)
    learned = ns["loss_learned_variance"](x)
    close(w * learned - w * D / 2 * math.log(2 * math.pi * sigma2), before)
    # and the value, not only the optimum, is the documented one: a different w is not
    torch.manual_seed(13)
    other = -(2 / D) * fastvae.elbo(x, *ns["encoder"](x).chunk(2, -1), ns["decoder"], likelihood="gaussian",
                                    beta=2 * w * D / 2) - math.log(2 * math.pi)
    assert not torch.allclose(other, before, rtol=1e-3)


def test_l1_loss_is_a_unit_scale_laplace_elbo():
    """F.l1_loss(reduction="sum") per example + beta KL = -ELBO_beta under a
    Laplace decoder of scale 1, minus D log 2; the learned scale at log b = 0
    (returned as a pair or as a torch Laplace) is the same likelihood."""
    ns = run_section("`F.l1_loss`: a Laplace likelihood")
    x = to_float64(ns)
    shape = (x.shape[0], 8)
    torch.manual_seed(16)
    after = ns["loss_after"](x)
    with fed_noise(drawn_noise(16, 1, shape)[0]):
        before = ns["loss_before"](x)
    close(after, before)
    beta, D = ns["beta"], x.shape[1]
    torch.manual_seed(16)
    unit = fastvae.elbo(x, *ns["encoder"](x).chunk(2, -1), ns["decoder"], likelihood="laplace")
    for name in ("loss_learned_scale", "loss_learned_scale_torch"):
        torch.manual_seed(16)
        close(ns[name](x), -unit)
    # and beta is the script's weight, not another
    torch.manual_seed(16)
    other = -fastvae.elbo(x, *ns["encoder"](x).chunk(2, -1), ns["decoder"], likelihood="laplace",
                          beta=2 * beta) - D * math.log(2)
    assert not torch.allclose(other, before, rtol=1e-3)


def test_iwae_of_expanded_copies_equals_encoding_once():
    ns = run_section("IWAE: encode once, not k copies of x")
    x = to_float64(ns)
    k = ns["k"]
    torch.manual_seed(14)
    after = ns["iwae_loss_after"](x, k)
    with fed_noise(drawn_noise(14, k, (x.shape[0], 8)).reshape(k * x.shape[0], 8)):
        before = ns["iwae_loss_before"](x, k)
    close(after, before)


def test_encoders_that_sample():
    """The restructured step gives the script's loss, and the
    sampling encoder passed as it is gets an error naming the fix."""
    ns = run_section("Encoders that sample")
    x = to_float64(ns)
    shape = (x.shape[0], 8)
    torch.manual_seed(15)
    after = ns["loss_after"](ns["new_encoder"], x)
    eps = drawn_noise(15, 1, shape)[0]
    with fed_noise(eps):
        before = ns["loss_before"](x)
        torch.manual_seed(15)
        as_is = ns["loss_after"](lambda t: ns["encoder"](t)[1:], x)  # the encoder's own z is ignored
    close(after, before)
    close(as_is, before)
    encoder, decoder = ns["encoder"], ns["decoder"]
    with fed_noise(eps), pytest.raises(TypeError, match=r"(?s)3 items.*encoder that samples.*\[1:\]"):
        fastvae.log_likelihood(x, encoder, decoder, k=4, likelihood="bernoulli")
    with fed_noise(eps), pytest.raises(TypeError, match=r"(?s)tuple of 3 items.*fastvae draws z.*\[1:\]"):
        fastvae.elbo(x, encoder(x), decoder, likelihood="bernoulli")
    assert ns["ll"].shape == (x.shape[0],) and torch.isfinite(ns["ll"]).all()


def test_kl_warmup_with_beta():
    """fastvae.iwae(beta=) gives the warm-up script's tempered
    IWAE loss; fastvae.elbo(beta=) the warm-up ELBO."""
    ns = run_section("KL warm-up with `beta=`")
    x = to_float64(ns)
    k, B = ns["k"], x.shape[0]
    for step in (0, 250, 1000, 3000):
        torch.manual_seed(16)
        after = ns["warmup_loss_after"](x, step)
        with fed_noise(drawn_noise(16, k, (B, 8))):
            before = ns["warmup_loss_before"](x, step)
        close(after, before)
    torch.manual_seed(17)
    after = ns["warmup_elbo_loss"](x, 250)
    mu, logvar = ns["encoder"](x).chunk(2, dim=-1)
    z = mu + torch.exp(0.5 * logvar) * drawn_noise(17, 1, mu.shape)[0]
    rec = -F.binary_cross_entropy_with_logits(ns["decoder"](z), x, reduction="none").sum(-1)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), -1)
    close(after, -(rec - 0.25 * kl).mean())


def test_conv_decoder_folding_the_samples():
    """The folded conv decoder gives the reshaped one's bound bit
    for bit, and both the hand-written IWAE's."""
    ns = run_section("Convolutional decoders that fold the samples into the batch")
    x = to_float64(ns)
    images = x.view(-1, 1, 8, 8)
    k, L = ns["k"], ns["L"]
    mu, logvar = ns["conv_encoder"](images).chunk(2, dim=-1)
    torch.manual_seed(18)
    folded = fastvae.iwae(images, mu, logvar, ns["folded"], k=k, likelihood="bernoulli")
    torch.manual_seed(18)
    unfolded = fastvae.iwae(images, mu, logvar, ns["unfolded"], k=k, likelihood="bernoulli")
    assert torch.equal(folded, unfolded)
    eps = drawn_noise(18, k, mu.shape)
    z = mu + torch.exp(0.5 * logvar) * eps
    logits = ns["net"](z.reshape(-1, L)).reshape(k, -1, 1, 8, 8)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, images.expand(k, -1, -1, -1, -1),
                                                   reduction="none").sum((-3, -2, -1))
    log_w = log_px_z + (-0.5 * z ** 2 + 0.5 * eps ** 2 + 0.5 * logvar).sum(-1)  # log p(z) - log q(z | x)
    close(folded, (torch.logsumexp(log_w, 0) - math.log(k)).mean())


CHECKED = {
    "The classic MLP VAE: BCE + KLD": test_classic_bce_kld_vae,
    "Decoders that end in a sigmoid": test_sigmoid_decoder_warns_then_works_as_bernoulli_probs,
    "`F.mse_loss` + `kld_weight`: a Gaussian likelihood": test_mse_plus_kld_weight_is_a_scaled_gaussian_elbo,
    "`F.l1_loss`: a Laplace likelihood": test_l1_loss_is_a_unit_scale_laplace_elbo,
    "IWAE: encode once, not k copies of x": test_iwae_of_expanded_copies_equals_encoding_once,
    "Encoders that sample": test_encoders_that_sample,
    "KL warm-up with `beta=`": test_kl_warmup_with_beta,
    "Convolutional decoders that fold the samples into the batch": test_conv_decoder_folding_the_samples,
}
