"""Tests for common/unet.py (ADM U-Net, openai/guided-diffusion layout)."""
import math

import pytest
import torch

from common.unet import (AttentionBlock, EncoderUNetModel, QKVAttention, QKVAttentionLegacy, ResBlock, UNetModel,
                         timestep_embedding)


def tiny_unet(**kw):
    cfg = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
               attention_resolutions=(2,), channel_mult=(1, 2))
    cfg.update(kw)
    return UNetModel(**cfg)


def randomize_(model, std=0.2):
    """Overwrite every parameter with noise so zero-initialised branches contribute."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def inputs(batch=2, size=16, channels=3):
    return torch.randn(batch, channels, size, size), torch.tensor([3, 917])[:batch]


#################################################################################
#                                 Output shapes                                 #
#################################################################################

def test_shapes_conditional_and_unconditional():
    x, t = inputs()
    cond = tiny_unet(num_classes=10)
    assert cond(x, t, torch.tensor([1, 9])).shape == (2, 3, 16, 16)
    assert tiny_unet()(x, t).shape == (2, 3, 16, 16)
    # learn_sigma: out_channels = 2 * in_channels (eps and variance interpolation v)
    assert tiny_unet(out_channels=6)(x, t).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="num_classes"):
        cond(x, t)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_unet()(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("new_order", [False, True])
def test_shapes_scale_shift_and_resblock_updown(new_order):
    x, t = inputs(size=32)
    model = randomize_(UNetModel(32, 3, 32, 6, 2, (2, 4), channel_mult=(1, 2, 2), num_head_channels=32,
                                 use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=new_order))
    out, feats = model(x, t, return_features=True)
    assert out.shape == (2, 6, 32, 32)
    assert feats["middle"].shape == (2, 64, 8, 8)  # two downsamplings, last width 2 * 32
    assert feats["penultimate"].shape == (2, 32, 32, 32)
    # "penultimate" is exactly what self.out consumes, so a replica of `out` on it reproduces the output
    assert torch.equal(model.out(feats["penultimate"]), out)
    assert model.input_blocks[3][0].updown and model.output_blocks[2][-1].updown
    assert model.input_blocks[1][0].emb_layers[1].out_features == 2 * 32  # scale and shift


def test_zero_init_output_is_exactly_zero():
    x, t = inputs()
    model = tiny_unet(num_classes=10, use_scale_shift_norm=True)
    assert torch.count_nonzero(model(x, t, torch.tensor([0, 4]))) == 0
    assert torch.count_nonzero(EncoderUNetModel(16, 3, 32, 5, 1, (2,), channel_mult=(1, 2))(x, t)) == 0


#################################################################################
#                          Parameter names and counts                           #
#################################################################################

def _res_keys(prefix, skip=False):
    names = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    names += ["skip_connection"] if skip else []
    return {f"{prefix}.{n}.{w}" for n in names for w in ("weight", "bias")}


def _attn_keys(prefix):
    return {f"{prefix}.{n}.{w}" for n in ("norm", "qkv", "proj_out") for w in ("weight", "bias")}


def _wb(prefix):
    return {f"{prefix}.weight", f"{prefix}.bias"}


def test_state_dict_keys_are_exactly_upstream():
    # Derived by hand from guided-diffusion's construction loop for channel_mult (1, 2), 1 res block, attention at
    # ds = 2: input 0 conv | 1 res | 2 down | 3 res(32->64)+attn; middle res/attn/res; output blocks
    # 0 res(128->64)+attn | 1 res(96->64)+attn+upsample | 2 res(96->32) | 3 res(64->32).
    expected = {"label_emb.weight"} | _wb("time_embed.0") | _wb("time_embed.2") | _wb("out.0") | _wb("out.2")
    expected |= _wb("input_blocks.0.0") | _res_keys("input_blocks.1.0") | _wb("input_blocks.2.0.op")
    expected |= _res_keys("input_blocks.3.0", skip=True) | _attn_keys("input_blocks.3.1")
    expected |= _res_keys("middle_block.0") | _attn_keys("middle_block.1") | _res_keys("middle_block.2")
    expected |= _res_keys("output_blocks.0.0", skip=True) | _attn_keys("output_blocks.0.1")
    expected |= _res_keys("output_blocks.1.0", skip=True) | _attn_keys("output_blocks.1.1")
    expected |= _wb("output_blocks.1.2.conv")
    expected |= _res_keys("output_blocks.2.0", skip=True) | _res_keys("output_blocks.3.0", skip=True)
    sd = tiny_unet(num_classes=10).state_dict()
    assert set(sd) == expected
    assert sd["output_blocks.0.0.in_layers.2.weight"].shape == (64, 128, 3, 3)
    assert sd["output_blocks.0.0.skip_connection.weight"].shape == (64, 128, 1, 1)
    assert sd["middle_block.1.qkv.weight"].shape == (192, 64, 1)  # conv1d
    assert sd["out.2.weight"].shape == (3, 32, 3, 3)
    assert sd["label_emb.weight"].shape == (10, 128)


def test_resblock_updown_keys():
    sd = UNetModel(16, 3, 32, 3, 1, (), channel_mult=(1, 2), resblock_updown=True).state_dict()
    assert "input_blocks.2.0.in_layers.0.weight" in sd and "input_blocks.2.0.op.weight" not in sd
    assert "output_blocks.1.1.out_layers.3.weight" in sd  # the up-ResBlock sits after the (absent) attention
    assert not any("h_upd" in k or "x_upd" in k for k in sd)  # parameter-free resampling


def test_adm_imagenet64_param_count():
    # ADM ImageNet-64 (guided-diffusion README flags): 295.9M params (Karras et al. 2022, EDM Table 7; 296M in ADM).
    with torch.device("meta"):
        model = UNetModel(64, 3, 192, 6, 3, (64 // 32, 64 // 16, 64 // 8), channel_mult=(1, 2, 3, 4),
                          num_classes=1000, num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                          use_new_attention_order=True)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 295.9e6) / 295.9e6 < 0.01, n


#################################################################################
#                                  Attention                                    #
#################################################################################

def _einsum_attention(q, k, v):
    """guided-diffusion's formulation: both q and k scaled by ch^-1/4, softmax in float32."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = weight.float().softmax(dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


def test_qkv_attention_matches_einsum():
    bs, heads, ch, length = 2, 3, 8, 10
    qkv = torch.randn(bs, 3 * heads * ch, length, dtype=torch.float64)
    # legacy: heads first, then (q, k, v) inside each head
    q, k, v = qkv.reshape(bs * heads, 3 * ch, length).split(ch, dim=1)
    legacy_ref = _einsum_attention(q, k, v).reshape(bs, -1, length)
    # new order: (q, k, v) first, then heads
    q, k, v = (z.reshape(bs * heads, ch, length) for z in qkv.chunk(3, dim=1))
    new_ref = _einsum_attention(q, k, v).reshape(bs, -1, length)
    torch.testing.assert_close(QKVAttentionLegacy(heads)(qkv), legacy_ref)
    torch.testing.assert_close(QKVAttention(heads)(qkv), new_ref)
    assert not torch.allclose(legacy_ref, new_ref)  # the two layouts really differ


#################################################################################
#                                Routing hook                                   #
#################################################################################

def test_router_identity_is_bit_identical_and_zero_router_changes_output():
    x, t = inputs()
    model = randomize_(tiny_unet(use_scale_shift_norm=True, resblock_updown=True))
    base = model(x, t)
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert blocks and all(m.router is None for m in blocks)
    for m in blocks:
        m.router = lambda h, t: h
    assert torch.equal(model(x, t), base)
    for m in blocks:
        m.router = (lambda h, t: h * 0) if isinstance(m, ResBlock) else None
    assert not torch.allclose(model(x, t), base)


@pytest.mark.parametrize("down", [False, True])
def test_router_sits_right_after_the_first_groupnorm(down):
    x, t = torch.randn(2, 32, 8, 8), torch.tensor([5, 600])
    emb = torch.randn(2, 64)
    block = randomize_(ResBlock(32, 64, 0.0, out_channels=64, down=down))
    seen = {}

    def router(h, tt):
        seen["h"], seen["t"] = h, tt
        return h

    block.router = router
    block(x, emb, t)
    torch.testing.assert_close(seen["h"], block.in_layers[0](x))  # full resolution, before SiLU and resampling
    assert torch.equal(seen["t"], t)

    attn = randomize_(AttentionBlock(32, num_heads=2))
    attn.router = router
    attn(x, t)
    torch.testing.assert_close(seen["h"], attn.norm(x))  # spatial shape kept, before qkv
    assert torch.equal(seen["t"], t)


def test_router_receives_model_timesteps():
    x, t = inputs()
    model = tiny_unet()
    seen = []
    for m in model.modules():
        if isinstance(m, (ResBlock, AttentionBlock)):
            m.router = lambda h, tt: (seen.append(tt), h)[1]
    model(x, t)
    assert len(seen) == 12 and all(torch.equal(s, t) for s in seen)  # 8 ResBlocks + 4 AttentionBlocks


#################################################################################
#                    Classifier, checkpointing, fp16, embedding                 #
#################################################################################

@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_unet_pools(pool):
    x, t = inputs()
    model = EncoderUNetModel(16, 3, 32, 7, 1, (2,), channel_mult=(1, 2), num_head_channels=32, pool=pool,
                             use_scale_shift_norm=True, resblock_updown=True)
    assert model(x, t).shape == (2, 7)
    if pool == "attention":
        assert model.out[2].positional_embedding.shape == (64, 8 * 8 + 1)


def test_encoder_unet_rejects_unknown_pool():
    with pytest.raises(ValueError, match="pool"):
        EncoderUNetModel(16, 3, 32, 7, 1, (2,), channel_mult=(1, 2), pool="max")


def test_gradient_checkpointing_matches():
    x, t = inputs()
    plain = randomize_(tiny_unet(num_classes=10))
    ckpt = tiny_unet(num_classes=10, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    y = torch.tensor([2, 3])
    plain(x, t, y).square().sum().backward()
    ckpt(x, t, y).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_fp16_torso():
    x, t = inputs()
    ref = randomize_(tiny_unet(), std=0.05)
    half = tiny_unet(use_fp16=True)
    half.load_state_dict(ref.state_dict(), strict=True)
    assert half.dtype == torch.float16 and half.input_blocks[0][0].weight.dtype == torch.float16
    assert half.time_embed[0].weight.dtype == torch.float32 and half.out[2].weight.dtype == torch.float32
    out = half(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(x, t), atol=5e-2, rtol=5e-2)


def test_timestep_embedding():
    t = torch.tensor([0.0, 2.5, 999.0])
    emb = timestep_embedding(t, 7)  # odd dim: zero-padded last column
    assert emb.shape == (3, 7) and torch.all(emb[:, -1] == 0)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(3)])
    torch.testing.assert_close(emb[:, :3], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 3:6], torch.sin(t[:, None] * freqs))
