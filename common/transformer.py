"""Transformer layers shared by DiT (common/dit.py) and the ViT backbone (common/vit.py).

Parameter names follow timm (`qkv`, `proj`, `fc1`, `fc2`, `proj` of PatchEmbed) so that official
DiT checkpoints and timm ViT state dicts load with strict=True. Attention runs through
F.scaled_dot_product_attention, which picks the fused flash / memory-efficient kernel on GPU.
"""
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention, timm layout: one fused qkv projection and an output projection."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two-layer MLP, timm layout (fc1 -> act -> fc2)."""

    def __init__(self, in_features, hidden_features, approximate_gelu=False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        # DiT uses the tanh approximation of GELU, ViT the exact one.
        self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Image -> sequence of patch tokens (B, H/p * W/p, dim) via a strided conv, timm layout."""

    def __init__(self, patch_size, in_channels, dim, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)
