"""Diffusion Transformer (DiT), a re-implementation of facebookresearch/DiT `models.py`.

Class, attribute and parameter names match upstream exactly, so official checkpoints load with
`model.load_state_dict(state_dict, strict=True)`. Differences from upstream: the transformer layers
come from common/transformer.py (timm names, attention via F.scaled_dot_product_attention), a
`router` hook for task routing (used by dtr.py), optional gradient checkpointing, and
`forward_with_cfg(..., guided_channels)`.
"""
import math

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from common.diffusion import cfg_combine
from common.transformer import Attention, Mlp, PatchEmbed


def modulate(x, shift, scale):
    # adaLN: per-sample shift/scale broadcast over the token axis.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) possibly fractional timesteps -> (N, dim) features [cos(t * f_k), sin(t * f_k)].

        f_k = max_period^(-k / half), k = 0..half-1 (GLIDE's `timestep_embedding`; cos first, as upstream).
        """
        half = dim // 2
        # built on t's device: a CPU tensor moved there would be a host-to-device copy (and sync) per forward
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:  # pad an odd dim with one zero column
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # features are float32; match a .double()/.half() model


class LabelEmbedder(nn.Module):
    """Embeds class labels; label dropout to the null class `num_classes` enables classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0  # one extra row for the null class
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class, at random (p = dropout_prob) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            # Upstream draws on the CPU; drawing on labels.device avoids a device mismatch in torch.where.
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def check_labels(self, labels):
        """A readable error for out-of-range labels; on CPU only (on CUDA it would cost a host-device sync every
        step) and not under torch.compile (a data-dependent branch breaks the graph)."""
        num_rows = self.embedding_table.num_embeddings
        if labels.is_cuda or torch.compiler.is_compiling() or not labels.numel():
            return
        if labels.min() < 0 or labels.max() >= num_rows:
            raise ValueError(f"class labels must lie in [0, {num_rows - 1}] "
                             f"(null class = num_classes = {self.num_classes} needs class_dropout_prob > 0)")

    def forward(self, labels, train, force_drop_ids=None):
        self.check_labels(labels)
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT paper, Sec. 3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), approximate_gelu=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a linear map from tokens to patches of out_channels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; predicts eps (and, with learn_sigma, the variance)."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding, stored as a frozen Parameter like upstream so the checkpoint key matches.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # Task-routing hook (set by dtr.py): if not None, forward runs block i as router(block, x, c, t, i) with
        # t the raw (B,) timesteps given to forward, so the router can pick block i's per-timestep channel mask.
        self.router = None
        self.grad_checkpoint = False  # recompute block activations in backward to save memory (--grad-checkpoint)
        self.initialize_weights()

    def initialize_weights(self):
        # Transformer linears: xavier-uniform weights, zero biases.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Fixed sin-cos positional embedding.
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like an nn.Linear (instead of nn.Conv2d).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # Label embedding table and timestep MLP: normal(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation so every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero output layer: a fresh model predicts exactly zero.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) patch tokens -> (N, C, H, W) image."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], f"{x.shape[1]} tokens do not form a square grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _run_block(self, block, x, c, t, index):
        if self.router is None:
            return block(x, c)
        return self.router(block, x, c, t, index)

    def forward(self, x, t, y):
        """x: (N, C, H, W) images or latents, t: (N,) timesteps, y: (N,) class labels -> (N, out_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"expected x of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}; build the model with matching input_size/in_channels")
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / patch_size ** 2
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpoint and torch.is_grad_enabled():
                h = checkpoint(self._run_block, block, h, c, t, i, use_reentrant=False)
            else:
                h = self._run_block(block, h, c, t, i)
        h = self.final_layer(h, c)  # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(h)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=3):
        """Batched cond/uncond forward for classifier-free guidance: y's second half must be the null class.

        Returns eps_uncond + cfg_scale * (eps_cond - eps_uncond) on the guided channels, for both halves.
        """
        # Upstream guides only model_out[:, :3] "for exact reproducibility reasons" (a leftover from DiT's
        # development), leaving the 4th latent eps channel unguided; guided_channels=3 reproduces that.
        # guided_channels=None guides all in_channels eps channels, as DTR upstream does. The remaining
        # channels (the learned-sigma half, and unguided eps channels) pass through from the forward pass.
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (cond half, uncond half), got {len(x)}")
        n_guided = self.in_channels if guided_channels is None else guided_channels
        if not 0 < n_guided <= self.in_channels:
            raise ValueError(f"guided_channels must be in 1..{self.in_channels} or None (all eps channels), "
                             f"got {guided_channels}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        return cfg_combine(self.forward(combined, t, y), cfg_scale, n_guided)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# Numpy, as upstream (from facebookresearch/mae util/pos_embed.py).

def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    """(grid_size**2 [+ extra_tokens], embed_dim) embedding; token i sits at row i // grid_size, col i % grid_size."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, so grid[0] holds the column index
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    """First half of the channels encodes grid[0] (column), second half grid[1] (row)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a 2-D sin-cos embedding, got {embed_dim}")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M,) positions -> (M, embed_dim) = [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k / embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos embedding, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

def DiT_XL_2(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)

def DiT_XL_4(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)

def DiT_XL_8(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)

def DiT_L_2(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)

def DiT_L_4(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)

def DiT_L_8(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)

def DiT_B_2(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)

def DiT_B_4(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)

def DiT_B_8(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)

def DiT_S_2(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)

def DiT_S_4(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)

def DiT_S_8(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
