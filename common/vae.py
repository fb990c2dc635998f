"""Stable Diffusion VAE (AutoencoderKL, `sd-vae-ft-ema` / `sd-vae-ft-mse`) without the diffusers package.

Module and parameter names follow diffusers (huggingface/diffusers `models/autoencoders/autoencoder_kl.py`,
`vae.py`, `unets/unet_2d_blocks.py`, `resnet.py`, `attention_processor.py`), so `state_dict()` keys equal
diffusers' AutoencoderKL keys. `from_pretrained_file` also reads the deprecated diffusers attention names and
the original CompVis/LDM checkpoint layout (mapping as in diffusers' `convert_ldm_vae_checkpoint`).
"""
import json
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.safetensors_io import load_safetensors
from common.training_run import fail

SCALE_FACTOR = 0.18215  # SD v1 latent scaling (diffusers config `scaling_factor`)
GROUP_NORM_EPS = 1e-6  # diffusers Encoder/Decoder pass resnet_eps=1e-6 everywhere
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this range


def _group_norm(channels, num_groups):
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=GROUP_NORM_EPS, affine=True)


#################################################################################
#                                Building Blocks                                #
#################################################################################

class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3 twice plus a (1x1-conv) shortcut (diffusers `ResnetBlock2D` without time embedding)."""

    def __init__(self, in_channels, out_channels, num_groups):
        super().__init__()
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels with a residual (diffusers `Attention`, VAE mid block)."""

    def __init__(self, channels, num_groups):
        super().__init__()
        self.group_norm = _group_norm(channels, num_groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers: [Linear, Dropout]

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # Softmax in float32 like diffusers' upcast_softmax=True (the VAE attention overflows in fp16).
        h = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)  # scale 1/sqrt(C)
        h = self.to_out[0](h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (0, 1, 0, 1): right and bottom only, as in LDM."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    """`num_layers` resnets, then an optional downsampler (diffusers `DownEncoderBlock2D`)."""

    def __init__(self, in_channels, out_channels, num_layers, num_groups, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nn.Module):
    """`num_layers` resnets, then an optional upsampler (diffusers `UpDecoderBlock2D`)."""

    def __init__(self, in_channels, out_channels, num_layers, num_groups, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers `UNetMidBlock2D`, one head)."""

    def __init__(self, channels, num_groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, num_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, num_groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


#################################################################################
#                               Encoder / Decoder                               #
#################################################################################

class Encoder(nn.Module):
    """Image (B, 3, H, W) -> Gaussian moments (B, 2 * latent, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, num_groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        channels_in = [block_out_channels[0]] + list(block_out_channels[:-1])
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(c_in, c_out, layers_per_block, num_groups, add_downsample=i < len(block_out_channels) - 1)
            for i, (c_in, c_out) in enumerate(zip(channels_in, block_out_channels))])
        self.mid_block = MidBlock(block_out_channels[-1], num_groups)
        self.conv_norm_out = _group_norm(block_out_channels[-1], num_groups)
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)  # double_z

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h * 2^(L-1), w * 2^(L-1)); up blocks run from deepest to finest."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, num_groups):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = MidBlock(reversed_channels[0], num_groups)
        channels_in = [reversed_channels[0]] + reversed_channels[:-1]
        # layers_per_block + 1 resnets per up block, as in diffusers/LDM.
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(c_in, c_out, layers_per_block + 1, num_groups, add_upsample=i < len(block_out_channels) - 1)
            for i, (c_in, c_out) in enumerate(zip(channels_in, reversed_channels))])
        self.conv_norm_out = _group_norm(block_out_channels[0], num_groups)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


#################################################################################
#                                 AutoencoderKL                                 #
#################################################################################

class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder of Stable Diffusion; defaults are the SD v1 VAE (83.65M parameters)."""

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, scaling_factor=SCALE_FACTOR):
        super().__init__()
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(f"every block_out_channels {tuple(block_out_channels)} must be divisible by "
                             f"norm_num_groups={norm_num_groups}; pick a smaller norm_num_groups")
        self.block_out_channels = tuple(block_out_channels)
        self.scaling_factor = scaling_factor
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """Posterior q(z | x) = N(mean, std^2) for images x in [-1, 1]; returns (mean, std)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        return mean, torch.exp(0.5 * logvar)

    def decode(self, z):
        """Unscaled latent z -> image in (roughly) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample=False, generator=None):
        return self.decode(self._latent(x, sample, generator))

    def _latent(self, x, sample, generator):
        mean, std = self.encode(x)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    @torch.no_grad()
    def encode_to_latent(self, x, sample=False, generator=None):
        """x in [-1, 1] -> scaling_factor * (posterior mean, or a sample if sample=True); no gradient (frozen VAE)."""
        return self._latent(x, sample, generator) * self.scaling_factor

    @torch.no_grad()
    def decode_from_latent(self, z):
        """Scaled latent -> image in [-1, 1] (divide by scaling_factor, decode, clamp); no gradient."""
        return self.decode(z / self.scaling_factor).clamp(-1.0, 1.0)

    # ---------------------------------------------------------------- loading pretrained weights
    @classmethod
    def from_pretrained_file(cls, path, weights_only=True, **config):
        """Load a diffusers `.bin`/`.safetensors` or an LDM `.ckpt`; the architecture is read off the weights
        (`infer_config`), except norm_num_groups (not stored; SD's 32). Explicit `config` kwargs take precedence."""
        raw = read_state_dict_file(path, weights_only)
        state_dict = to_diffusers_state_dict(raw, count_levels(raw))
        model = cls(**{**infer_config(state_dict), **config})
        missing, unexpected = _key_mismatch(model.state_dict().keys(), state_dict.keys())
        if missing or unexpected:
            raise ValueError(f"{path!r} does not match AutoencoderKL{tuple(model.block_out_channels)}: missing "
                             f"{missing[:4]} ({len(missing)} in all), unexpected {unexpected[:4]} "
                             f"({len(unexpected)} in all); pass the matching config (block_out_channels, ...)")
        model.load_state_dict(state_dict, strict=True)
        return model


def infer_config(state_dict):
    """AutoencoderKL kwargs implied by a diffusers-keyed state dict ({} for the parts it lacks)."""
    levels = sorted({int(m[1]) for k in state_dict for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    config = {}
    if levels and all(f"encoder.down_blocks.{i}.resnets.0.conv2.weight" in state_dict for i in levels):
        config["block_out_channels"] = tuple(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]
                                             for i in levels)
        config["layers_per_block"] = len({k.split(".")[4] for k in state_dict
                                          if k.startswith("encoder.down_blocks.0.resnets.")})
    for name, key, dim in [("in_channels", "encoder.conv_in.weight", 1), ("out_channels", "decoder.conv_out.weight", 0),
                           ("latent_channels", "post_quant_conv.weight", 0)]:
        if key in state_dict:
            config[name] = state_dict[key].shape[dim]
    return config


def count_levels(state_dict):
    """Number of encoder resolution levels in a state dict of any supported key layout (0 if none is found)."""
    pattern = re.compile(r"(?:first_stage_model\.)?encoder\.down(?:_blocks)?\.(\d+)\.")
    return len({m[1] for k in state_dict for m in [pattern.match(k)] if m})


def _key_mismatch(expected, found):
    expected, found = set(expected), set(found)
    return sorted(expected - found), sorted(found - expected)


#################################################################################
#                          Checkpoint Formats / Conversion                      #
#################################################################################

def read_state_dict_file(path, weights_only=True):
    """Read raw tensors from `.safetensors` (our reader) or a torch pickle (`.bin`, `.ckpt`, `.pt`, `.pth`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no VAE weights at {path!r}; download e.g. stabilityai/sd-vae-ft-mse first")
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # an unpickling error names the offending class; keep the message to one line
        raise ValueError(f"cannot read {path!r} with torch.load(weights_only={weights_only}) "
                         f"({str(e).splitlines()[0]}); pass weights_only=False only if you trust the file") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning / LDM checkpoints
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


# Deprecated diffusers (< 0.14) attention names -> current ones (diffusers
# `ModelMixin._convert_deprecated_attention_blocks`).
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Original LDM attention names (ldm/modules/diffusionmodules/model.py `AttnBlock`) -> diffusers.
_LDM_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_NON_VAE_PREFIXES = ("loss.", "model_ema.")  # training-only entries of LDM autoencoder checkpoints


def to_diffusers_state_dict(state_dict, num_levels):
    """Map any supported key layout (LDM, deprecated or current diffusers) to current diffusers keys."""
    prefix = "first_stage_model."  # a full SD checkpoint: keep only the VAE part
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    is_ldm = any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in state_dict)
    converted = {}
    for key, value in state_dict.items():
        if is_ldm:
            if key.startswith(_LDM_NON_VAE_PREFIXES):
                continue
            key = _ldm_key_to_diffusers(key, num_levels)
        else:
            key = _deprecated_key_to_current(key)
        if ".attentions.0.to_" in key and key.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # LDM stores q/k/v/proj_out as 1x1 convs; diffusers uses Linear
        converted[key] = value
    return converted


def _deprecated_key_to_current(key):
    match = re.fullmatch(r"(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    if match is None:
        return key
    return f"{match[1]}.{_DEPRECATED_ATTENTION_NAMES[match[2]]}.{match[3]}"


def _ldm_key_to_diffusers(key, num_levels):
    """One LDM VAE key -> the diffusers key (decoder `up.{i}` is stored finest-first, diffusers deepest-first)."""
    rules = [
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
        (r"encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0."),
        (r"(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
         lambda m: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION_NAMES[m[2]]}."),
        (r"(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
    ]
    for pattern, replacement in rules:
        key = re.sub(r"^" + pattern, replacement, key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


#################################################################################
#                 Loading a local weight file (one-line errors)                 #
#################################################################################

def vae_config_scale(path):
    """`scaling_factor` of the diffusers config.json next to a VAE weight file (SD: 0.18215, SDXL: 0.13025), or
    None when there is no config beside it."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            value = json.load(f).get("scaling_factor")
    except (OSError, ValueError, AttributeError):
        fail(f"{config} (next to the VAE weights) is not a readable diffusers config; fix or remove it")
    return None if value is None else float(value)


def load_vae(path, device, scale=None):
    """The frozen SD VAE (common/vae.py) from a local weight file, for encoding/decoding latents; one-line errors.
    Its latent scale: `scale` if given, else the config.json beside the file, else SD's 0.18215."""
    if not path or not os.path.isfile(path):
        fail(f"no VAE weights at {path!r}; pass --vae PATH to a local sd-vae-ft-ema / sd-vae-ft-mse / sdxl-vae file "
             f"(diffusers diffusion_pytorch_model.safetensors / .bin, or an LDM .ckpt)")
    try:
        vae = AutoencoderKL.from_pretrained_file(path)  # architecture read off the weights
    except ValueError as e:
        fail(str(e))
    configured = vae_config_scale(path)
    vae.scaling_factor = scale if scale is not None else configured if configured is not None else SCALE_FACTOR
    if configured is not None and abs(configured - vae.scaling_factor) > 1e-9:
        print(f"warning: {path}'s config.json says scaling_factor {configured}, using {vae.scaling_factor} "
              f"(the scale the latents were made with)", file=sys.stderr)
    return vae.to(device).eval().requires_grad_(False)
