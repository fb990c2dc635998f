"""ADM U-Net (Dhariwal & Nichol 2021), a re-implementation of openai/guided-diffusion `guided_diffusion/unet.py`.

Module and parameter names are those of upstream (`input_blocks.N.M...`, `middle_block`, `output_blocks`, `out`,
`label_emb`), so guided-diffusion checkpoints load with `strict=True`. Helpers follow upstream `nn.py` and
`fp16_util.py`. Differences from upstream, none of which changes a parameter or a result:
- attention runs through F.scaled_dot_product_attention (same math as upstream's einsum formulation);
- gradient checkpointing uses torch.utils.checkpoint and honours `use_checkpoint` in AttentionBlock too
  (upstream always checkpoints attention); each block keeps it as `grad_checkpoint` (set by --grad-checkpoint);
- the timestep tensor `t` is passed down to every ResBlock / AttentionBlock, which apply `self.router(h, t)`
  after their first GroupNorm when a router is set (task routing, DTR; `router = None` is plain ADM);
- `forward(..., return_features=True)` also returns the middle-block and penultimate features (MT-Diffusion).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


#################################################################################
#                  Helpers (guided_diffusion/nn.py, fp16_util.py)               #
#################################################################################

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so fp16 torsos normalise stably."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """The standard normalisation layer: GroupNorm with 32 groups."""
    if channels % 32:
        raise ValueError(f"GroupNorm32 needs channels divisible by 32, got {channels}; use a multiple of 32")
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dims {dims}; use 1, 2 or 3")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dims {dims}; use 1, 2 or 3")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module):
    """Zero the parameters of a module and return it (residual branches start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embeddings [cos | sin] of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def convert_module_to_f16(module):
    """Cast conv weights to float16 (upstream fp16_util: only convolutions, norms and linears stay float32)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo convert_module_to_f16."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


#################################################################################
#                                  Attention                                    #
#################################################################################

def _attention(q, k, v):
    """softmax(q^T k / sqrt(ch)) applied to v, for (B, ch, T) inputs; returns (B, ch, T).

    Upstream scales q and k by ch^-1/4 each and takes the softmax in float32; SDPA's default 1/sqrt(ch) scale is
    the same product.
    """
    q, k, v = (z.transpose(1, 2)[:, None] for z in (q, k, v))  # (B, 1, T, ch): 4D lets SDPA use fused kernels
    return F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2)


class QKVAttentionLegacy(nn.Module):
    """QKV attention on an (N, H * 3 * C, T) input: heads are split before q, k, v (the original ADM layout)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attention(q, k, v).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """QKV attention on an (N, 3 * H * C, T) input: q, k, v are split before heads (`use_new_attention_order`)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (z.reshape(bs * self.n_heads, ch, length) for z in qkv.chunk(3, dim=1))
        return _attention(q, k, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a zero-initialised output projection."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}; "
                             f"pick num_head_channels dividing every level's width")
        else:
            self.num_heads = channels // num_head_channels
        self.grad_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        # new order: split qkv before heads; legacy: split heads before qkv (same params, different layout)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))
        self.router = None  # task-routing hook (dtr.py), see _forward

    def forward(self, x, t=None):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, t, use_reentrant=False)
        return self._forward(x, t)

    def _forward(self, x, t):
        b, c, *spatial = x.shape
        h = self.norm(x)  # GroupNorm on (B, C, *spatial) equals upstream's on the flattened (B, C, HW)
        if self.router is not None:
            # DTR (App. A.1): the routing mask sits right after the group normalisation layer of the block
            h = self.router(h, t)
        h = self.attention(self.qkv(h.reshape(b, c, -1)))
        h = self.proj_out(h)
        return x + h.reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions (classifier head)."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # prepend the mean token: (B, C, HW + 1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


#################################################################################
#                          Residual and resampling blocks                       #
#################################################################################

class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling (inner two dims for 3D), optionally followed by a 3x3 conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 conv or average pooling (inner two dims for 3D)."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally changing channels or resolution."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.grad_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        # scale-shift norm (FiLM): the embedding gives 2 * out_channels (scale, shift)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)
        self.router = None  # task-routing hook (dtr.py), see _forward

    def forward(self, x, emb, t=None):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, t, use_reentrant=False)
        return self._forward(x, emb, t)

    def _forward(self, x, emb, t):
        norm, act, conv = self.in_layers
        h = norm(x)
        if self.router is not None:
            # DTR (App. A.1): the routing mask sits right after the group normalisation layer of the block
            h = self.router(h, t)
        h = act(h)
        if self.updown:  # resample between the activation and the conv, as upstream
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding (and raw timesteps `t`) to the blocks that take them."""

    def forward(self, x, emb, t=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, t)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, t)
            else:
                x = layer(x)
        return x


#################################################################################
#                                Encoder (torso)                                #
#################################################################################

def _build_encoder(model, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
                   conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
                   resblock_updown, use_new_attention_order, time_embed_dim):
    """Set `input_blocks` and `middle_block` on `model` (shared by UNetModel and EncoderUNetModel, as upstream).

    Returns (ch, ds, input_block_chans): the final width, the total downsample factor, the skip widths.
    """
    def res_block(ch_in, ch_out, **kw):
        return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims, use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm, **kw)

    def attn_block(ch):
        return AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels,
                              use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

    ch = int(channel_mult[0] * model_channels)
    model.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    model._feature_size = ch
    input_block_chans = [ch]
    ds = 1  # current downsample factor; attention_resolutions lists the factors that get attention
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attn_block(ch))
            model.input_blocks.append(TimestepEmbedSequential(*layers))
            model._feature_size += ch
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
            model.input_blocks.append(TimestepEmbedSequential(down))
            input_block_chans.append(ch)
            ds *= 2
            model._feature_size += ch

    model.middle_block = TimestepEmbedSequential(res_block(ch, ch), attn_block(ch), res_block(ch, ch))
    model._feature_size += ch
    return ch, ds, input_block_chans


#################################################################################
#                                    U-Net                                      #
#################################################################################

class UNetModel(nn.Module):
    """The full ADM U-Net with attention and timestep (and optional class) embedding.

    attention_resolutions are downsample factors (4 = attention at image_size / 4), as upstream.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch, ds, input_block_chans = _build_encoder(
            self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, time_embed_dim)

        # Decoder: num_res_blocks + 1 blocks per level, each fed the matching skip from input_blocks.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [ResBlock(ch + ich, time_embed_dim, dropout, out_channels=int(model_channels * mult),
                                   dims=dims, use_checkpoint=use_checkpoint,
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, num_head_channels=num_head_channels,
                                                 use_checkpoint=use_checkpoint,
                                                 use_new_attention_order=use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, time_embed_dim, dropout, out_channels=ch, dims=dims,
                                 use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, up=True)
                        if resblock_updown else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, int(channel_mult[0] * model_channels), out_channels, 3, padding=1)),
        )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self):
        """Cast the torso (input, middle, output blocks) to float16, as upstream."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f32)

    def forward(self, x, timesteps, y=None, return_features=False):
        """x: (N, C, H, W), timesteps: (N,), y: (N,) labels iff class-conditional.

        Returns the output, or (output, {"middle": ..., "penultimate": ...}) when return_features is True.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass labels y if and only if the model was built with num_classes "
                             f"(num_classes={self.num_classes}, y given: {y is not None})")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, timesteps)
            hs.append(h)
        h = self.middle_block(h, emb, timesteps)
        middle = h
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, timesteps)
        h = h.type(x.dtype)
        out = self.out(h)
        if return_features:
            return out, {"middle": middle, "penultimate": h}
        return out


#################################################################################
#                          Encoder U-Net (classifier)                           #
#################################################################################

class EncoderUNetModel(nn.Module):
    """The half U-Net (input blocks + middle block) with a pooled head, used as the noisy-image classifier."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, use_checkpoint=False,
                 use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False, pool="adaptive"):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(f"unknown pool '{pool}'; choose 'adaptive', 'attention', 'spatial' or 'spatial_v2'")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (e.g. 64)")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        ch, ds, _ = _build_encoder(
            self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, time_embed_dim)

        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":  # MLP on the spatial means of every block's output, concatenated
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels),
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, out_channels),
            )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self):
        """Cast the torso (input and middle blocks) to float16, as upstream."""
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16."""
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(convert_module_to_f32)

    def forward(self, x, timesteps):
        """x: (N, C, H, W), timesteps: (N,) -> logits (N, out_channels)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        results = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, timesteps)
            if spatial:
                results.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb, timesteps)
        if spatial:
            results.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(results, dim=-1))
        return self.out(h.type(x.dtype))
