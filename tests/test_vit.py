"""Tests for common/vit.py: timm-compatible ViT backbone, pos-embed resizing and multi-level features."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.safetensors_io import save_safetensors
from common.vit import Block, VisionTransformer, drop_path, resize_pos_embed, vit_base_patch16, vit_large_patch16


def tiny_vit(**kw):
    config = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    return VisionTransformer(**{**config, **kw})


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def vit_param_formula(dim, depth, num_tokens, num_classes, patch=16, in_ch=3, mlp_ratio=4):
    """Parameter count of a timm ViT written out term by term."""
    hidden = mlp_ratio * dim
    block = (2 * 2 * dim                     # norm1, norm2
             + 3 * dim * dim + 3 * dim      # qkv
             + dim * dim + dim              # proj
             + dim * hidden + hidden        # fc1
             + hidden * dim + dim)          # fc2
    head = dim * num_classes + num_classes if num_classes else 0
    return (in_ch * patch * patch * dim + dim) + dim + num_tokens * dim + depth * block + 2 * dim + head


#################################################################################
#                         Parameter counts and key names                        #
#################################################################################

def test_param_counts_match_published_timm_numbers():
    with torch.device("meta"):
        base_224 = vit_base_patch16(img_size=224)
        base_224_headless = vit_base_patch16(img_size=224, num_classes=0)
        base_384 = vit_base_patch16()
        large_224 = vit_large_patch16(img_size=224)
        large_384_headless = vit_large_patch16(num_classes=0)
    # Published timm counts: vit_base_patch16_224 86,567,656 (86.6M), headless 85.8M; vit_large_patch16_224 304.3M.
    assert num_params(base_224) == 86_567_656
    assert num_params(base_224_headless) == 85_798_656
    assert num_params(large_224) == 304_326_632
    # At 384 only pos_embed grows: (24^2 - 14^2) = 380 extra tokens.
    assert num_params(base_384) == 86_567_656 + 380 * 768
    assert num_params(base_384) == vit_param_formula(768, 12, 1 + 24 * 24, 1000)
    assert num_params(large_384_headless) == vit_param_formula(1024, 24, 1 + 24 * 24, 0)
    assert abs(num_params(large_384_headless) / 1e6 - 304) < 1


def test_state_dict_keys_match_timm_vit_base_patch16_384():
    with torch.device("meta"):
        model = vit_base_patch16()
    # Representative timm key list, written from timm's naming: VisionTransformer / Block / Attention / Mlp.
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias"}
    for i in range(12):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    state = model.state_dict()
    assert set(state) == expected
    assert state["pos_embed"].shape == (1, 577, 768)
    assert state["cls_token"].shape == (1, 1, 768)
    assert state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert state["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert state["blocks.11.mlp.fc1.weight"].shape == (3072, 768)
    assert state["head.weight"].shape == (1000, 768)
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6


#################################################################################
#                           Position embedding resizing                         #
#################################################################################

def cubic_weights(t, a=-0.75):
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch bicubic uses a = -0.75)."""
    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    return [k(1 + t), k(t), k(1 - t), k(2 - t)]


def bicubic_matrix(n_in, n_out):
    """(n_out, n_in) 1-D resampling matrix: align_corners=False, border taps clamped to the edge."""
    M = np.zeros((n_out, n_in))
    for j in range(n_out):
        src = (j + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for offset, w in zip(range(-1, 3), cubic_weights(src - base)):
            M[j, min(max(base + offset, 0), n_in - 1)] += w
    return M


def test_resize_pos_embed_matches_brute_force_bicubic():
    dim, old, new = 3, (4, 4), (6, 7)
    pos = torch.randn(1, 1 + 16, dim, dtype=torch.float64)
    out = resize_pos_embed(pos, new, num_prefix_tokens=1)
    assert out.shape == (1, 1 + 42, dim)
    assert torch.equal(out[:, :1], pos[:, :1])  # class token row untouched
    grid = pos[0, 1:].reshape(*old, dim).numpy()
    Mh, Mw = bicubic_matrix(old[0], new[0]), bicubic_matrix(old[1], new[1])
    expected = np.einsum("ih,jw,hwc->ijc", Mh, Mw, grid).reshape(1, -1, dim)
    np.testing.assert_allclose(out[:, 1:].numpy(), expected, atol=1e-5)


def test_resize_pos_embed_identity_and_constant():
    pos = torch.randn(1, 1 + 24 * 24, 8)
    assert torch.allclose(resize_pos_embed(pos, (24, 24)), pos, atol=1e-6)
    const = torch.full((1, 1 + 24 * 24, 8), 0.37)
    for grid in [(32, 32), (28, 36), (12, 20)]:
        out = resize_pos_embed(const, grid)
        assert out.shape == (1, 1 + grid[0] * grid[1], 8)
        assert torch.allclose(out, torch.full_like(out, 0.37), atol=1e-6)


def test_resize_pos_embed_rejects_non_square_without_old_grid():
    with pytest.raises(ValueError, match="old_grid_hw"):
        resize_pos_embed(torch.zeros(1, 1 + 12, 4), (4, 4))


#################################################################################
#                               Multi-level features                            #
#################################################################################

def test_forward_features_shapes_64x96():
    with torch.device("meta"):
        base = vit_base_patch16(num_classes=0)
        feats = base.forward_features(torch.empty(2, 3, 64, 96))
    assert [f.shape for f in feats] == [(2, 768, 4, 6)] * 4
    model = tiny_vit(feature_layers=(1, 2, 4))
    feats = model.forward_features(torch.randn(2, 3, 64, 96))
    assert [f.shape for f in feats] == [(2, 32, 4, 6)] * 3


def manual_block(block, x):
    """One pre-norm ViT block written out with explicit softmax attention and exact GELU."""
    B, N, D = x.shape
    heads = block.attn.num_heads
    h = F.layer_norm(x, (D,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = [t.reshape(B, N, heads, D // heads).transpose(1, 2) for t in qkv.split(D, dim=-1)]
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(B, N, D)
    x = x + h @ block.attn.proj.weight.T + block.attn.proj.bias
    h = F.layer_norm(x, (D,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    h = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return x + h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize("with_cls_token", [False, True])
def test_feature_layer_k_equals_first_k_blocks_by_hand(with_cls_token):
    model = tiny_vit().double()
    with torch.no_grad():  # make LayerNorm affine params non-trivial so the final norm is visible
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    feats = model.forward_features(x, layers=(1, 3, 4), with_cls_token=with_cls_token)

    # Hand-made patchify: 16x16 patches, flatten (c, ph, pw), linear projection.
    B, p, gh, gw = 2, 16, 3, 5
    patches = x.reshape(B, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 3 * p * p)
    tokens = patches @ model.patch_embed.proj.weight.reshape(32, -1).T + model.patch_embed.proj.bias
    pos = resize_pos_embed(model.pos_embed, (gh, gw))
    if with_cls_token:
        tokens = torch.cat([model.cls_token.expand(B, -1, -1), tokens], 1) + pos
    else:
        tokens = tokens + pos[:, 1:]
    start = 1 if with_cls_token else 0
    with torch.no_grad():
        for k, feat in zip((1, 3, 4), feats):
            h = tokens
            for block in model.blocks[:k]:
                h = manual_block(block, h)
            if k == model.depth:
                h = F.layer_norm(h, (32,), model.norm.weight, model.norm.bias, eps=1e-6)
            expected = h[:, start:].transpose(1, 2).reshape(B, 32, gh, gw)
            torch.testing.assert_close(feat, expected, rtol=1e-9, atol=1e-9)


def test_set_input_size_keeps_features():
    model = tiny_vit()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = model.forward_features(x)
        model.set_input_size((64, 96))
        after = model.forward_features(x)
    assert model.pos_embed.shape == (1, 1 + 4 * 6, 32) and model.grid_size == (4, 6)
    torch.testing.assert_close(after[0], before[0])


def test_bad_inputs_raise_clear_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="1..4"):
        model.forward_features(torch.randn(1, 3, 32, 32), layers=(0, 2))
    with pytest.raises(ValueError, match="divisible"):
        model.forward_features(torch.randn(1, 3, 40, 32))


#################################################################################
#                          Stochastic depth (drop path)                         #
#################################################################################

def test_drop_path_rates_are_linear_per_block_and_eval_is_identity():
    model = tiny_vit(drop_path_rate=0.15)
    # timm / TaskDiffusion_baseline.py: torch.linspace(0, 0.15, 4) = 0, 0.05, 0.10, 0.15 (first block never drops)
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.05, 0.10, 0.15])
    plain = tiny_vit()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval().forward_features(x), plain.forward_features(x)))
        torch.manual_seed(0)
        trained = model.train().forward_features(x)  # train mode does drop: some sample's features change
        assert not torch.equal(trained[-1], plain.eval().forward_features(x)[-1])
    with pytest.raises(ValueError, match="drop_path_rate"):
        tiny_vit(drop_path_rate=1.0)


def test_drop_path_keeps_the_expected_value():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4).expand(40_000, 3, 4)
    out = drop_path(x, 0.3, training=True)
    dropped = (out == 0).flatten(1).all(1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.01  # whole samples are dropped, at the given rate
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.7)  # the kept ones are scaled by 1 / keep
    torch.testing.assert_close(out.mean(0), x[0], atol=0.02, rtol=0)  # E[drop_path(x)] = x (Monte-Carlo)
    # Block wiring: with the MLP branch silenced, E[block(x)] = x + attn(norm1(x)) = the eval output
    block = Block(4, 2, drop_path_rate=0.5)
    torch.nn.init.zeros_(block.mlp.fc2.weight)
    torch.nn.init.zeros_(block.mlp.fc2.bias)
    tokens = torch.randn(1, 3, 4).expand(40_000, 3, 4)
    with torch.no_grad():
        expected = block.eval()(tokens[:1])[0]
        samples = block.train()(tokens)
    torch.testing.assert_close(samples.mean(0), expected, atol=0.03, rtol=0)
    assert (samples - samples[0]).abs().max() > 0.1  # and single samples do differ


#################################################################################
#                              Loading timm weights                             #
#################################################################################

def test_load_timm_state_dict_head_and_pos_embed(tmp_path):
    source = tiny_vit(img_size=64, num_classes=10)  # stands in for a timm checkpoint at another resolution
    state = {k: v.clone() for k, v in source.state_dict().items()}

    headless = tiny_vit(img_size=(48, 80)).load_timm_state_dict(state)  # head.* dropped, pos_embed resized
    assert torch.equal(headless.blocks[2].mlp.fc2.weight, source.blocks[2].mlp.fc2.weight)
    torch.testing.assert_close(headless.pos_embed, resize_pos_embed(source.pos_embed, (3, 5)))

    path = tmp_path / "vit.safetensors"
    save_safetensors(state, str(path))
    with_head = tiny_vit(num_classes=10).load_timm_state_dict(str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(with_head(x), source(x))

    with pytest.raises(ValueError, match="num_classes"):
        tiny_vit(num_classes=5).load_timm_state_dict(state)
    with pytest.raises(ValueError, match="num_classes=0"):
        tiny_vit(num_classes=10).load_timm_state_dict({k: v for k, v in state.items() if not k.startswith("head")})
    with pytest.raises(ValueError, match="missing"):
        tiny_vit(depth=5).load_timm_state_dict(state)
