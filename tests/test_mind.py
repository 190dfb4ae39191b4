"""MIND-SSC: shape, range, invariance to intensity mappings, sensitivity to structure."""

from __future__ import annotations

import torch

from synthvox.registration.mind import mind_ssc


def _phantom(n: int = 24) -> torch.Tensor:
    x, y, z = torch.meshgrid(*(torch.arange(float(n)),) * 3, indexing="ij")
    img = ((x - n / 2) ** 2 + (y - n / 2) ** 2 + (z - n / 2) ** 2 < (n / 3) ** 2).float()
    img += 0.5 * ((x - 6) ** 2 + (y - 8) ** 2 + (z - 10) ** 2 < 16).float()
    return img[None]


def test_shape_range_and_batch():
    img = _phantom()
    m = mind_ssc(img)
    assert m.shape == (12, 24, 24, 24)
    assert float(m.min()) > 0 and float(m.max()) <= 1.0 + 1e-6
    mb = mind_ssc(torch.stack([img, img]))
    assert mb.shape == (2, 12, 24, 24, 24)
    assert torch.allclose(mb[0], m, atol=1e-5)


def test_invariant_to_affine_intensity_change_and_sensitive_to_shift():
    img = _phantom()
    a = mind_ssc(img)
    b = mind_ssc(3.0 * img + 7.0)
    assert torch.allclose(a, b, atol=1e-4)
    shifted = mind_ssc(torch.roll(img, 3, dims=1))
    assert float((a - shifted).abs().mean()) > 10 * float((a - b).abs().mean()) + 1e-3


def test_constant_image_is_finite():
    m = mind_ssc(torch.ones(1, 10, 10, 10))
    assert torch.isfinite(m).all()


def test_contrast_inversion_keeps_descriptors_similar():
    # MIND compares patch distances, which are the same for an inverted image
    img = _phantom()
    a, b = mind_ssc(img), mind_ssc(1.0 - img)
    assert torch.allclose(a, b, atol=1e-4)
