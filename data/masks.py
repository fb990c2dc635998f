"""Inpainting masks (MT-Diffusion's masked-image training, App. E.2, and Fig. 10's half masks): float keep-masks
(n, 1, S, S), 1 where a pixel is kept, drawn from a torch generator."""
import torch


def patch_size(image_size, override=None):
    """App. E.2's 16 px patches at 64 px, scaled with the resolution (side S / 4): m patches then cover the same
    fraction of the image at every size, and m keeps its range U{0..10} (and 5..20 for Table 1)."""
    return override or max(1, round(16 * image_size / 64))


def random_patch_mask(n, max_patches, image_size, patch, generator=None, counts=None, device=None):
    """(n, 1, S, S) float keep-mask, App. E.2: m ~ U{0..max_patches} patches per image (or m = counts[b]), each
    zeroing x:min(x + p, S), y:min(y + p, S) at a corner (x, y) uniform over the image (overlaps allowed)."""
    if counts is None:
        counts = torch.randint(0, max_patches + 1, (n,), generator=generator, device=device)
    device = counts.device
    corners = torch.randint(0, image_size, (n, max_patches, 2), generator=generator, device=device)
    active = torch.arange(max_patches, device=device) < counts[:, None]  # (n, K): the first counts[b] patches
    pixels = torch.arange(image_size, device=device)
    inside = lambda start: (pixels >= start[..., None]) & (pixels < start[..., None] + patch)  # (n, K, S)
    rows, cols = inside(corners[..., 1]), inside(corners[..., 0])
    hole = (rows[..., :, None] & cols[..., None, :] & active[..., None, None]).any(dim=1)
    return (~hole).float()[:, None]


def half_mask(n, image_size, generator=None, device=None):
    """(n, 1, S, S) keep-mask of Fig. 10's half masking: one random half (left, right, top, bottom) zeroed each."""
    half, holes = image_size // 2, torch.zeros(4, image_size, image_size, dtype=torch.bool, device=device)
    holes[0, :, :half], holes[1, :, half:], holes[2, :half], holes[3, half:] = True, True, True, True
    return (~holes[torch.randint(0, 4, (n,), generator=generator, device=device)]).float()[:, None]
