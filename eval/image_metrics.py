"""Full-reference image metrics for restoration (MT-Diffusion, Table 1): PSNR and SSIM, in torch.

Images are (B, C, H, W) in [-1, 1], so the data range is 2. SSIM follows Wang et al. (2004), "Image Quality
Assessment: From Error Visibility to Structural Similarity", with their constants (11 x 11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03), computed per channel; borders are replicated so the map keeps the image size
(reference implementations that crop the 5-pixel border average over fewer pixels).
"""
import torch
import torch.nn.functional as F


def psnr_db(a, b, hole=None):
    """Per-image PSNR in dB of images in [-1, 1] (data range 2), over the pixels where hole = 1 (default all)."""
    hole = torch.ones_like(a) if hole is None else hole.expand_as(a)
    mse = ((a - b) ** 2 * hole).sum(dim=(1, 2, 3)) / hole.sum(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse)  # PSNR = 10 log10(R^2 / MSE), R = 2


def ssim_map(a, b, data_range=2.0):
    """Per-pixel SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, per channel,
    borders replicated."""
    g = torch.exp(-(torch.arange(11, device=a.device, dtype=a.dtype) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(a.shape[1], 1, 11, 11)
    blur = lambda v: F.conv2d(F.pad(v, (5, 5, 5, 5), mode="replicate"), window, groups=a.shape[1])
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    # SSIM, Eq. (13) of Wang et al.: (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))
    return (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
