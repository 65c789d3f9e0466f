"""Comparison against the float64 reference with a per-element, condition-aware
tolerance: |actual - expected| <= rtol * scale, where scale bounds the size of
the terms that produced the value (so a sum of large terms that cancels is
judged against the terms, not against its small result). NaN never passes."""
import torch

# Relative tolerance per dtype of the tensor under test (computed from the
# float64 reference, so this is the kernel's own rounding error).
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def assert_close(actual, expected, scale, name=""):
    rtol = RTOL[actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    s = scale.detach().double().cpu().expand_as(e)
    assert not torch.isnan(a).any(), f"{name}: NaN at {torch.isnan(a).nonzero()[:5].tolist()}"
    assert torch.isfinite(e).all(), f"{name}: reference is not finite (bad test input)"
    # tiny floor for the output dtype's smallest normal numbers
    tiny = torch.finfo(actual.dtype).tiny
    err = (a - e).abs()
    bound = rtol * s + tiny
    bad = ~(err <= bound)
    if bad.any():
        i = int(torch.argmax((err / bound).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements off; worst at flat index {i}: "
            f"actual {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
            f"error {err.flatten()[i].item():.3e} > bound {bound.flatten()[i].item():.3e}"
        )


def seed_tensor(value, device):
    return torch.tensor(value, dtype=torch.int64, device=device)
