"""Tests for common/vae.py (SD AutoencoderKL) and common/safetensors_io.py (the file format it reads)."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from common.safetensors_io import load_safetensors, save_safetensors
from common.vae import SCALE_FACTOR, AutoencoderKL, Downsample, Upsample, infer_config

TINY = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY)


#################################################################################
#                                  safetensors                                  #
#################################################################################

def test_safetensors_round_trip_all_dtypes(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(2, 2, 2, dtype=torch.float64),
        "i64": torch.tensor([-(2 ** 40), 7]),
        "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # non-contiguous input must be written row-major
    }
    path = str(tmp_path / "t.safetensors")
    save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name

    # Check the written bytes against the format spec with an independent parse.
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    begin, end = header["i32"]["data_offsets"]
    assert header["i32"]["dtype"] == "I32" and header["i32"]["shape"] == [2, 2]
    assert struct.unpack("<4i", raw[8 + n + begin:8 + n + end]) == (1, -2, 3, 4)
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no holes
    assert 8 + n + spans[-1][1] == len(raw)


def test_safetensors_reads_hand_laid_bytes(tmp_path):
    data = (struct.pack("<3f", 1.0, -2.5, 0.125)            # a: F32 [3]
            + bytes.fromhex("003c00c0")                     # b: F16 [2] = 1.0, -2.0
            + bytes.fromhex("803f0040")                     # c: BF16 [2] = 1.0, 2.0
            + struct.pack("<2q", -3, 2 ** 33)               # d: I64 [1, 2]
            + bytes([1, 0]))                                # e: BOOL [2]
    header = {"__metadata__": {"note": "hand made"},
              "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
              "b": {"dtype": "F16", "shape": [2], "data_offsets": [12, 16]},
              "c": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]},
              "d": {"dtype": "I64", "shape": [1, 2], "data_offsets": [20, 36]},
              "e": {"dtype": "BOOL", "shape": [2], "data_offsets": [36, 38]}}
    header_bytes = json.dumps(header).encode() + b"   "  # trailing space padding is allowed
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    t = load_safetensors(str(path))
    assert set(t) == {"a", "b", "c", "d", "e"}
    assert t["a"].tolist() == [1.0, -2.5, 0.125] and t["a"].dtype == torch.float32
    assert t["b"].tolist() == [1.0, -2.0] and t["b"].dtype == torch.float16
    assert t["c"].tolist() == [1.0, 2.0] and t["c"].dtype == torch.bfloat16
    assert t["d"].tolist() == [[-3, 2 ** 33]] and t["d"].dtype == torch.int64
    assert t["e"].tolist() == [True, False]

    header["a"]["data_offsets"] = [0, 16]  # inconsistent with F32 [3]
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    with pytest.raises(ValueError, match="data_offsets"):
        load_safetensors(str(path))
    with pytest.raises(FileNotFoundError):
        load_safetensors(str(tmp_path / "missing.safetensors"))


#################################################################################
#                           diffusers key names                                 #
#################################################################################

def diffusers_keys(block_out_channels, layers_per_block):
    """AutoencoderKL keys written from diffusers' naming rules (Encoder/Decoder, *Block2D, ResnetBlock2D, Attention)."""
    def resnet(prefix, c_in, c_out):
        names = ["norm1", "conv1", "norm2", "conv2"] + (["conv_shortcut"] if c_in != c_out else [])
        return [f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")]

    def mid(prefix, c):
        keys = resnet(f"{prefix}.mid_block.resnets.0", c, c) + resnet(f"{prefix}.mid_block.resnets.1", c, c)
        attn = ["group_norm", "to_q", "to_k", "to_v", "to_out.0"]
        return keys + [f"{prefix}.mid_block.attentions.0.{n}.{p}" for n in attn for p in ("weight", "bias")]

    n, keys = len(block_out_channels), []
    for name in ["encoder.conv_in", "encoder.conv_norm_out", "encoder.conv_out", "quant_conv", "post_quant_conv",
                 "decoder.conv_in", "decoder.conv_norm_out", "decoder.conv_out"]:
        keys += [f"{name}.weight", f"{name}.bias"]
    c_prev = block_out_channels[0]
    for i, c in enumerate(block_out_channels):
        for j in range(layers_per_block):
            keys += resnet(f"encoder.down_blocks.{i}.resnets.{j}", c_prev if j == 0 else c, c)
        if i < n - 1:
            keys += [f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}" for p in ("weight", "bias")]
        c_prev = c
    keys += mid("encoder", block_out_channels[-1]) + mid("decoder", block_out_channels[-1])
    rev = list(reversed(block_out_channels))
    c_prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(layers_per_block + 1):
            keys += resnet(f"decoder.up_blocks.{i}.resnets.{j}", c_prev if j == 0 else c, c)
        if i < n - 1:
            keys += [f"decoder.up_blocks.{i}.upsamplers.0.conv.{p}" for p in ("weight", "bias")]
        c_prev = c
    return keys


def test_tiny_state_dict_keys_equal_diffusers_naming():
    keys = list(tiny_vae().state_dict())
    expected = diffusers_keys((16, 32, 32), 1)
    assert len(keys) == len(set(keys)) and len(expected) == len(set(expected))
    assert set(keys) == set(expected)


def test_full_sd_vae_param_count_and_shapes_on_meta():
    with torch.device("meta"):
        vae = AutoencoderKL()
        assert set(vae.state_dict()) == set(diffusers_keys((128, 256, 512, 512), 2))
        mean, std = vae.encode(torch.empty(2, 3, 256, 256))
        image = vae.decode(mean)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD v1 VAE, 83.65M
    assert mean.shape == std.shape == (2, 4, 32, 32)
    assert image.shape == (2, 3, 256, 256)
    assert vae.encoder.mid_block.attentions[0].to_q.weight.shape == (512, 512)
    assert vae.decoder.up_blocks[0].resnets[0].conv1.in_channels == 512
    assert vae.decoder.up_blocks[3].resnets[0].conv1.in_channels == 256


#################################################################################
#                          Forward pass: hand-made checks                       #
#################################################################################

def test_encode_decode_shapes_64px():
    vae = tiny_vae()
    with torch.no_grad():
        mean, std = vae.encode(torch.randn(1, 3, 64, 64))
        assert mean.shape == std.shape == (1, 4, 16, 16) and (std > 0).all()
        assert vae.decode(mean).shape == (1, 3, 64, 64)


def test_downsample_pads_only_right_and_bottom():
    down = Downsample(1)
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap reads x[2i, 2j]
        assert torch.equal(down(x), x[..., ::2, ::2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap reads x[2i+2, 2j+2], zero past the edge
        expected = F.pad(x, (0, 1, 0, 1))[..., 2::2, 2::2]
        assert torch.equal(down(x), expected) and (down(x)[..., -1, :] == 0).all()


def test_upsample_is_nearest_then_conv():
    up = Upsample(1)
    x = torch.randn(1, 1, 3, 5)
    with torch.no_grad():
        up.conv.bias.fill_(0.5)
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 2.0  # centre tap: output = 2 * nearest(x) + 0.5
        expected = 2 * x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1) + 0.5
        torch.testing.assert_close(up(x), expected)


def test_resnet_block_by_hand():
    """ResnetBlock2D: x' = shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), 1x1 shortcut when channels change."""
    block = tiny_vae().encoder.down_blocks[1].resnets[0]  # 16 -> 32 channels
    x = torch.randn(1, 16, 5, 6)

    def silu(t):
        return t * torch.sigmoid(t)

    with torch.no_grad():
        h = silu(F.group_norm(x, 8, block.norm1.weight, block.norm1.bias, eps=1e-6))
        h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
        h = silu(F.group_norm(h, 8, block.norm2.weight, block.norm2.bias, eps=1e-6))
        h = F.conv2d(h, block.conv2.weight, block.conv2.bias, padding=1)
        shortcut = torch.einsum("oi,bihw->bohw", block.conv_shortcut.weight[:, :, 0, 0], x)
        expected = shortcut + block.conv_shortcut.bias[:, None, None] + h
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_mid_attention_with_zero_queries_averages_values():
    """q = k = 0 gives uniform attention: out = x + W_o mean_pixels(W_v GN(x) + b_v) + b_o."""
    attn = tiny_vae().encoder.mid_block.attentions[0]
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.zero_()
            lin.bias.zero_()
        x = torch.randn(2, 32, 3, 4)
        h = F.group_norm(x, 8, attn.group_norm.weight, attn.group_norm.bias, eps=1e-6).flatten(2).transpose(1, 2)
        v_mean = (h @ attn.to_v.weight.T + attn.to_v.bias).mean(dim=1, keepdim=True)  # (B, 1, C)
        delta = v_mean @ attn.to_out[0].weight.T + attn.to_out[0].bias
        expected = x + delta.transpose(1, 2).reshape(2, 32, 1, 1)
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_posterior_clamp_and_latent_scaling():
    vae = tiny_vae()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 100.0, -100.0, math.log(4.0), 0.0]))
        mean, std = vae.encode(x)
        # logvar 100 -> clamped to 20 -> std e^10; logvar -100 -> -30 -> std e^-15; log 4 -> std 2.
        torch.testing.assert_close(mean[0, :, 0, 0], torch.tensor([0.5, -1.0, 2.0, 0.0]))
        torch.testing.assert_close(std[0, :, 0, 0], torch.tensor([math.exp(10), math.exp(-15), 2.0, 1.0]))

        assert SCALE_FACTOR == 0.18215
        torch.testing.assert_close(vae.encode_to_latent(x), mean * 0.18215)
        # Sampling: (latent / s - mean) / std is standard normal (256 draws per channel: 4 sigma bounds).
        gen = torch.Generator().manual_seed(0)
        samples = vae.encode_to_latent(x.expand(16, -1, -1, -1), sample=True, generator=gen)
        z = (samples / 0.18215 - mean) / std
        for channel in (2, 3):
            assert abs(z[:, channel].mean().item()) < 0.25 and abs(z[:, channel].std().item() - 1) < 0.18

        latent = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(vae.decode_from_latent(latent), vae.decode(latent / 0.18215).clamp(-1, 1))


#################################################################################
#                           Checkpoint formats                                  #
#################################################################################

# Hand-written table: diffusers name -> original LDM/CompVis name, for the TINY config (3 levels, 1 layer).
# Decoder up blocks are stored in reverse: diffusers up_blocks.0 (deepest) is LDM up.2.
LDM_NAMES = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.down_blocks.0.resnets.0": "encoder.down.0.block.0",
    "encoder.down_blocks.0.downsamplers.0.conv": "encoder.down.0.downsample.conv",
    "encoder.down_blocks.1.resnets.0": "encoder.down.1.block.0",
    "encoder.down_blocks.1.downsamplers.0.conv": "encoder.down.1.downsample.conv",
    "encoder.down_blocks.2.resnets.0": "encoder.down.2.block.0",
    "encoder.mid_block.resnets.0": "encoder.mid.block_1",
    "encoder.mid_block.attentions.0.group_norm": "encoder.mid.attn_1.norm",
    "encoder.mid_block.attentions.0.to_q": "encoder.mid.attn_1.q",
    "encoder.mid_block.attentions.0.to_k": "encoder.mid.attn_1.k",
    "encoder.mid_block.attentions.0.to_v": "encoder.mid.attn_1.v",
    "encoder.mid_block.attentions.0.to_out.0": "encoder.mid.attn_1.proj_out",
    "encoder.mid_block.resnets.1": "encoder.mid.block_2",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.mid_block.resnets.0": "decoder.mid.block_1",
    "decoder.mid_block.attentions.0.group_norm": "decoder.mid.attn_1.norm",
    "decoder.mid_block.attentions.0.to_q": "decoder.mid.attn_1.q",
    "decoder.mid_block.attentions.0.to_k": "decoder.mid.attn_1.k",
    "decoder.mid_block.attentions.0.to_v": "decoder.mid.attn_1.v",
    "decoder.mid_block.attentions.0.to_out.0": "decoder.mid.attn_1.proj_out",
    "decoder.mid_block.resnets.1": "decoder.mid.block_2",
    "decoder.up_blocks.0.resnets.0": "decoder.up.2.block.0",
    "decoder.up_blocks.0.resnets.1": "decoder.up.2.block.1",
    "decoder.up_blocks.0.upsamplers.0.conv": "decoder.up.2.upsample.conv",
    "decoder.up_blocks.1.resnets.0": "decoder.up.1.block.0",
    "decoder.up_blocks.1.resnets.1": "decoder.up.1.block.1",
    "decoder.up_blocks.1.upsamplers.0.conv": "decoder.up.1.upsample.conv",
    "decoder.up_blocks.2.resnets.0": "decoder.up.0.block.0",
    "decoder.up_blocks.2.resnets.1": "decoder.up.0.block.1",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
}
LDM_LEAVES = {"conv_shortcut": "nin_shortcut"}  # resnet children that LDM names differently


def to_ldm(state):
    out = {}
    for key, value in state.items():
        module, leaf, param = key.rsplit(".", 2) if key.count(".") >= 2 else (None, *key.split("."))
        if module is not None and f"{module}.{leaf}" in LDM_NAMES:
            module, leaf = None, f"{module}.{leaf}"
        new = LDM_NAMES[leaf] if module is None else f"{LDM_NAMES[module]}.{LDM_LEAVES.get(leaf, leaf)}"
        if ".attn_1." in new and param == "weight" and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convs
        out[f"{new}.{param}"] = value
    return out


def reference_outputs(vae):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return vae.encode(x), vae.decode(z)


def assert_same_outputs(a, b):
    (mean_a, std_a), img_a = a
    (mean_b, std_b), img_b = b
    assert torch.equal(mean_a, mean_b) and torch.equal(std_a, std_b) and torch.equal(img_a, img_b)


def test_reload_from_every_checkpoint_format(tmp_path):
    source = tiny_vae(seed=0)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    expected = reference_outputs(source)
    assert not torch.equal(tiny_vae(seed=1).quant_conv.weight, source.quant_conv.weight)  # loads must matter

    # 1) our safetensors writer, current diffusers names
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_safetensors(state, path)
    torch.manual_seed(1)
    assert_same_outputs(reference_outputs(AutoencoderKL.from_pretrained_file(path, **TINY)), expected)

    # 2) diffusers < 0.14 `.bin` with the deprecated attention names
    old = {}
    for key, value in state.items():
        for new_name, old_name in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    path = str(tmp_path / "diffusion_pytorch_model.bin")
    torch.save(old, path)
    torch.manual_seed(1)
    assert_same_outputs(reference_outputs(AutoencoderKL.from_pretrained_file(path, **TINY)), expected)

    # 3) full LDM/SD `.ckpt`: Lightning "state_dict", first_stage_model. prefix, UNet keys to ignore
    ldm = to_ldm(state)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    ckpt = {"global_step": 1, "state_dict": {**{f"first_stage_model.{k}": v for k, v in ldm.items()},
                                             "model.diffusion_model.out.0.weight": torch.zeros(3)}}
    path = str(tmp_path / "sd.ckpt")
    torch.save(ckpt, path)
    torch.manual_seed(1)
    assert_same_outputs(reference_outputs(AutoencoderKL.from_pretrained_file(path, **TINY)), expected)

    # 4) a bare LDM VAE file (no prefix) with training-only loss entries, as safetensors
    path = str(tmp_path / "vae-ldm.safetensors")
    save_safetensors({**ldm, "loss.logvar": torch.zeros(())}, path)
    torch.manual_seed(1)
    assert_same_outputs(reference_outputs(AutoencoderKL.from_pretrained_file(path, **TINY)), expected)


def test_mismatched_checkpoint_raises_one_line_error(tmp_path):
    state = tiny_vae().state_dict()
    path = str(tmp_path / "bad.bin")
    torch.save({k: v for k, v in state.items() if "quant_conv" not in k}, path)
    with pytest.raises(ValueError, match="missing") as info:
        AutoencoderKL.from_pretrained_file(path, **TINY)
    assert "\n" not in str(info.value) and "post_quant_conv.bias" in str(info.value)
    with pytest.raises(ValueError, match="missing"):  # right file, wrong config
        path = str(tmp_path / "ok.bin")
        torch.save(state, path)
        AutoencoderKL.from_pretrained_file(path, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    with pytest.raises(FileNotFoundError):
        AutoencoderKL.from_pretrained_file(str(tmp_path / "nope.bin"), **TINY)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(block_out_channels=(16, 20), norm_num_groups=8)


def test_config_is_read_off_the_weights(tmp_path):
    """from_pretrained_file(path) alone rebuilds a non-default architecture; norm_num_groups is not in the weights."""
    torch.manual_seed(0)
    small = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=3, latent_channels=3)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        mean, std = small.encode(x)
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_safetensors(small.state_dict(), path)
    loaded = AutoencoderKL.from_pretrained_file(path)
    assert loaded.block_out_channels == (32, 64) and len(loaded.encoder.down_blocks[0].resnets) == 3
    assert loaded.post_quant_conv.in_channels == 3 and len(loaded.decoder.up_blocks[1].resnets) == 4
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x), (mean, std)))
    with torch.device("meta"):
        assert infer_config(AutoencoderKL().state_dict()) == dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3,
            latent_channels=4)

    # LDM layout: the level count (which reverses the decoder's up.i) also comes from the file.
    source = tiny_vae()
    path = str(tmp_path / "sd.ckpt")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in to_ldm(source.state_dict()).items()}}, path)
    with pytest.raises(ValueError, match="norm_num_groups"):  # 16-channel blocks cannot use SD's 32 groups
        AutoencoderKL.from_pretrained_file(path)
    loaded = AutoencoderKL.from_pretrained_file(path, norm_num_groups=8)
    assert loaded.block_out_channels == (16, 32, 32)
    assert_same_outputs(reference_outputs(loaded), reference_outputs(source))
