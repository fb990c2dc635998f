"""Vision Transformer (ViT) backbone for TaskDiffusion, with timm parameter names.

Parameter names match timm's `VisionTransformer` (huggingface/pytorch-image-models
`timm/models/vision_transformer.py`), so a `vit_base_patch16_384` / `vit_large_patch16_384` state dict
loads with strict=True. Multi-level features follow TaskDiffusion (YuqiYang213/TaskDiffusion
`models/transformers/TaskDiffusion_baseline.py`): patch tokens only (no class token) plus the resized
`pos_embed[:, 1:]`, block outputs after blocks 3/6/9 (ViT-B) or 6/12/18 (ViT-L), and the last block
after the final LayerNorm, each reshaped to a (B, D, H/16, W/16) map.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.transformer import Attention, Mlp, PatchEmbed

LAYER_NORM_EPS = 1e-6  # timm ViT: partial(nn.LayerNorm, eps=1e-6)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


#################################################################################
#                          Position Embedding Resizing                          #
#################################################################################

def resize_pos_embed(pos_embed, new_grid_hw, num_prefix_tokens=1, old_grid_hw=None, antialias=False):
    """Bicubically resample the grid part of a (1, prefix + H*W, D) position embedding to `new_grid_hw`.

    The prefix (class token) rows are kept as they are. The old grid is assumed square unless given.
    antialias=False follows the timm version TaskDiffusion uses (`resize_pos_embed`, align_corners=False);
    newer timm (`resample_abs_pos_embed`) passes antialias=True, which uses a different cubic kernel.
    """
    new_h, new_w = _pair(new_grid_hw)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid_hw is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"pos_embed has {grid.shape[1]} grid tokens, not a square; pass old_grid_hw=(H, W)")
        old_grid_hw = (side, side)
    old_h, old_w = old_grid_hw
    if old_h * old_w != grid.shape[1]:
        raise ValueError(f"old_grid_hw {old_grid_hw} does not match the {grid.shape[1]} grid tokens of pos_embed")
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2).float()  # interpolate wants float32
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


#################################################################################
#                                  ViT Block                                    #
#################################################################################

def drop_path(x, rate, training):
    """Stochastic depth (timm `drop_path`, scale_by_keep=True): zero a residual branch per sample with
    probability `rate` and divide the kept ones by 1 - rate, so the expected value is unchanged."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))) (timm `Block`, no layer
    scale). Both branches share the rate but draw their own masks, as timm's (one DropPath module called twice)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate_gelu=False)  # ViT uses the exact GELU
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


#################################################################################
#                              Vision Transformer                               #
#################################################################################

class VisionTransformer(nn.Module):
    """ViT with a class token and learned absolute position embedding; `head` is nn.Identity when num_classes=0.
    drop_path_rate: stochastic depth of the last block, linear from 0 at the first (TaskDiffusion trains with 0.15)."""

    def __init__(self, img_size=384, patch_size=16, in_channels=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, num_classes=1000, feature_layers=None, drop_path_rate=0.0):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {drop_path_rate} must be in [0, 1)")
        img_h, img_w = _pair(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.grid_size = (img_h // patch_size, img_w // patch_size)  # grid that `pos_embed` is stored for
        self.feature_layers = tuple(feature_layers) if feature_layers is not None else (depth,)

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        # timm's stochastic depth decay rule (TaskDiffusion_baseline.py too): torch.linspace(0, rate, depth) per block
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpoint = False  # recompute block activations in backward to save memory (--grad-checkpoint)
        self.initialize_weights()

    def initialize_weights(self):
        # timm's default ("") init: trunc-normal(0.02) for Linear and pos_embed, normal(1e-6) for cls_token.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    # ---------------------------------------------------------------- position embedding
    def pos_embed_for_grid(self, grid_hw):
        """The (1, 1 + H*W, D) position embedding for a patch grid of size `grid_hw` (resized on the fly)."""
        if tuple(grid_hw) == self.grid_size:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid_hw, old_grid_hw=self.grid_size)

    @torch.no_grad()
    def set_input_size(self, img_size):
        """Permanently resize `pos_embed` to `img_size`, as TaskDiffusion does once when loading weights."""
        img_h, img_w = _pair(img_size)
        if img_h % self.patch_size or img_w % self.patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by the patch size {self.patch_size}")
        grid = (img_h // self.patch_size, img_w // self.patch_size)
        self.pos_embed = nn.Parameter(self.pos_embed_for_grid(grid).clone())
        self.grid_size = grid

    # ---------------------------------------------------------------- forward passes
    def forward_features(self, x, layers=None, with_cls_token=False):
        """List of (B, D, H/p, W/p) maps after the blocks with the given 1-based indices (default: feature_layers).

        The map of the last block (index = depth) is taken after the final norm. with_cls_token=False
        follows TaskDiffusion (patch tokens + pos_embed[:, 1:] only); True runs timm's full sequence.
        """
        layers = self.feature_layers if layers is None else tuple(layers)
        if not layers or any(not 1 <= k <= self.depth for k in layers):
            raise ValueError(f"layers {layers} must be 1-based block indices in 1..{self.depth}")
        B, _, H, W = x.shape
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        tokens = self.patch_embed(x)  # raises if H or W is not a multiple of the patch size
        pos_embed = self.pos_embed_for_grid((grid_h, grid_w))
        if with_cls_token:
            tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1) + pos_embed
        else:
            tokens = tokens + pos_embed[:, 1:]
        num_prefix = 1 if with_cls_token else 0

        wanted, features = set(layers), {}
        for index, block in enumerate(self.blocks[:max(layers)], start=1):
            tokens = self._run_block(block, tokens)
            if index in wanted:
                out = self.norm(tokens) if index == self.depth else tokens
                out = out[:, num_prefix:].transpose(1, 2).reshape(B, self.embed_dim, grid_h, grid_w)
                features[index] = out
        return [features[k] for k in layers]

    def forward(self, x):
        """Image classification as timm (class-token pooling): (B, 3, H, W) -> (B, num_classes) logits."""
        B = x.shape[0]
        tokens = self.patch_embed(x)
        pos_embed = self.pos_embed_for_grid((x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size))
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1) + pos_embed
        for block in self.blocks:
            tokens = self._run_block(block, tokens)
        return self.head(self.norm(tokens)[:, 0])

    def _run_block(self, block, tokens):
        if self.grad_checkpoint and torch.is_grad_enabled():
            # the recomputation replays the RNG state (preserve_rng_state): the same drop-path masks as the forward
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    # ---------------------------------------------------------------- loading timm weights
    def load_timm_state_dict(self, state_dict):
        """Load timm ViT weights (a dict, or a path to `.safetensors`/`.pth`); returns self.

        `head.*` is dropped when this model is headless (num_classes=0); `pos_embed` is resized when the
        checkpoint was trained at another resolution (timm's `checkpoint_filter_fn` does the same).
        """
        if isinstance(state_dict, (str, os.PathLike)):
            state_dict = _read_weights_file(state_dict)
        state_dict = dict(state_dict.get("model", state_dict))  # DeiT-style files wrap the weights in "model"
        has_head = isinstance(self.head, nn.Linear)
        if not has_head:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        elif "head.weight" not in state_dict:
            raise ValueError("the state dict has no classifier head; build the model with num_classes=0")
        elif state_dict["head.weight"].shape != self.head.weight.shape:
            raise ValueError(f"head has {state_dict['head.weight'].shape[0]} classes in the file but "
                             f"{self.head.weight.shape[0]} in the model; pass num_classes to match, or 0 to drop it")
        pos_embed = state_dict.get("pos_embed")
        if pos_embed is not None and pos_embed.shape != self.pos_embed.shape:
            state_dict["pos_embed"] = resize_pos_embed(pos_embed, self.grid_size)
        missing, unexpected = _key_mismatch(self.state_dict().keys(), state_dict.keys())
        if missing or unexpected:
            raise ValueError(f"not a matching timm ViT state dict: missing {missing[:4]} ({len(missing)} in all), "
                             f"unexpected {unexpected[:4]} ({len(unexpected)} in all); check depth/embed_dim")
        self.load_state_dict(state_dict, strict=True)
        return self


def _key_mismatch(expected, found):
    expected, found = set(expected), set(found)
    return sorted(expected - found), sorted(found - expected)


def _read_weights_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}; download the timm checkpoint first")
    if str(path).endswith(".safetensors"):
        from common.safetensors_io import load_safetensors
        return load_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


#################################################################################
#                                 ViT Configs                                   #
#################################################################################

def vit_base_patch16(**kwargs):
    """ViT-B/16 (timm `vit_base_patch16_384`): D=768, 12 blocks, 12 heads; features after blocks 3/6/9/12."""
    config = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, feature_layers=(3, 6, 9, 12))
    return VisionTransformer(**{**config, **kwargs})


def vit_large_patch16(**kwargs):
    """ViT-L/16 (timm `vit_large_patch16_384`): D=1024, 24 blocks, 16 heads; features after blocks 6/12/18/24."""
    config = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, feature_layers=(6, 12, 18, 24))
    return VisionTransformer(**{**config, **kwargs})
