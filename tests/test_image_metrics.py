"""eval/image_metrics.py: PSNR from its definition, SSIM against a pixel-by-pixel evaluation of Wang et al. (2004)."""
import math

import numpy as np
import torch

from eval.image_metrics import psnr_db, ssim_map


def test_psnr_of_a_constant_offset_and_of_a_hole():
    a = torch.rand(2, 3, 8, 8) * 2 - 1
    b = a + torch.tensor([0.1, 0.5]).view(2, 1, 1, 1)  # MSE = d^2 -> PSNR = 10 log10(4 / d^2)
    np.testing.assert_allclose(psnr_db(b, a).numpy(), [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.25)],
                               rtol=1e-5)
    hole = torch.zeros(2, 1, 8, 8)
    hole[:, :, :4] = 1  # only the top half counts: an error in the bottom half is invisible
    c = a.clone()
    c[:, :, :4] += 0.2
    c[:, :, 4:] += 1.0
    np.testing.assert_allclose(psnr_db(c, a, hole).numpy(), [10 * math.log10(4 / 0.04)] * 2, rtol=1e-5)


def test_ssim_identical_is_one_and_constant_images_match_the_closed_form():
    a = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(ssim_map(a, a), torch.ones_like(a))
    # constant images: variances and covariance vanish, SSIM = (2 x y + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    s = ssim_map(torch.full((1, 1, 12, 12), x, dtype=torch.float64), torch.full((1, 1, 12, 12), y, dtype=torch.float64))
    torch.testing.assert_close(s, torch.full_like(s, (2 * x * y + c1) / (x * x + y * y + c1)))


def test_ssim_matches_a_direct_windowed_computation():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 20, 20, generator=gen, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    got = ssim_map(a, b)
    offsets = np.arange(-5, 6)
    w = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w, w) / w.sum() ** 2  # 11 x 11 Gaussian, sigma 1.5, sums to 1
    c1, c2 = 0.02 ** 2, 0.06 ** 2
    for ch, i, j in [(0, 10, 10), (1, 7, 12), (1, 5, 5)]:  # interior pixels: the window needs no padding
        pa, pb = a[0, ch, i - 5:i + 6, j - 5:j + 6].numpy(), b[0, ch, i - 5:i + 6, j - 5:j + 6].numpy()
        mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
        var_a, var_b = (w * (pa - mu_a) ** 2).sum(), (w * (pb - mu_b) ** 2).sum()
        cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
        want = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        assert abs(got[0, ch, i, j].item() - want) < 1e-10
