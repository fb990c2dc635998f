"""TaskDiffusion: Multi-Task Dense Predictions via Unleashing the Power of Diffusion (Yang et al., ICLR 2025).

A ViT encodes the image once into multi-level features. All task labels are embedded together into one continuous
"cross-task map" z (cross-task label encoding); a diffusion decoder, conditioned on task-specific multi-level
features, denoises z and predicts every task's logits in one pass, mixing tasks through learned task-relation maps
A_i (task interaction) and levels through a per-task level weighting (level interaction). Training is one forward
at a random noise level with the ordinary task losses; inference runs 3 DDIM steps, re-encoding each prediction.

This file, in the paper's order: (1) the pixel-level encoder, cross-task label encoder and cross-task diffusion
decoder (Sec. 3.2), (2) the losses (Eq. 3), (3) the training loop (Algorithm 1), (4) the sampler (Algorithm 2) and
the evaluation, (5) --eval-only on our checkpoints or the authors' released ones (TASKDIFFUSION_KEY_MAP), (6) main().
Facts the paper lost are in the project SPEC (../shared/SPEC.md), checked against YuqiYang213/TaskDiffusion
(`models/transformers/TaskDiffusion_head.py`, `TaskDiffusion_baseline.py`, `configs/`, `utils/`); on shared
weights the model, the sampler and one training forward equal theirs to 1e-5 (tests/test_task_diffusion.py). The
input pipeline and the training augmentation are theirs too (data/dense.py).

    python task_diffusion.py            # tiny ViT on the synthetic set (CPU, minutes) vs. a --decoder none baseline
    torchrun --nproc_per_node=2 task_diffusion.py --dataset pascal --data-root <PASCAL-Context> --backbone vit-l \
        --backbone-weights vit_large_patch16_384.pth                                         # the paper's run
    python task_diffusion.py --eval-only --ckpt taskdiffusion_pascal_vitl.pth.tar --data-root <PASCAL-Context>
"""
import argparse
import math
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common.checkpoint_formats import TASKDIFFUSION_OURS_ONLY, taskdiffusion_layout, taskdiffusion_to_ours
from common.checkpoint_io import CheckpointError, read_checkpoint, strip_prefix
from common.training_run import (TrainingRun, add_run_args, all_reduce_mean, autocast, cleanup_distributed, end_of_step,
                                 fail, fill_defaults, finish_training, init_distributed, load_model_state, make_ema,
                                 one_line_errors, resume_training, run_dir_of, save_image_grid, seed_step, update_ema,
                                 wrap_ddp)
from common.training_run import training_module  # --compile, --grad-checkpoint
from common.vit import VisionTransformer, vit_base_patch16, vit_large_patch16
from data.dense import ImageNetStandardised, denormalize_tensor, random_flip_batch, training_loader
from eval.dense_metrics import (DepthMeter, EdgeMeter, NormalsMeter, SaliencyMeter, SegMeter, delta_m,
                                format_table)

CLASS_TASKS = ("semseg", "human_parts", "sal")  # discrete labels: embedding table, cross-entropy
CONTINUOUS_OUTPUTS = {"depth": 1, "normals": 3, "edge": 1}  # continuous labels: 1x1 conv, L1 / BCE
LOWER_IS_BETTER = ("depth", "normals")
IGNORE = 255

# Per data set: tasks, classes, loss weights w_s of Eq. (3), edge positive weight, odsF tolerance (configs/*.yml).
# Synthetic (ours): NYUD's weights plus PASCAL's saliency weight; edges are ~6% of the pixels, so PASCAL's positive
# weight 0.95; odsF tolerance ~1.8 px at 64 px.
DATASETS = {
    "pascal": dict(tasks=("semseg", "human_parts", "sal", "normals", "edge"),
                   classes={"semseg": 21, "human_parts": 7, "sal": 2}, edge_pos_weight=0.95, edge_max_dist=0.0075,
                   weights={"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0}),
    "nyud": dict(tasks=("semseg", "depth", "normals", "edge"), classes={"semseg": 40}, edge_pos_weight=0.90,
                 edge_max_dist=0.011, weights={"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}),
    "synthetic": dict(tasks=("semseg", "depth", "normals", "edge", "sal"), classes={"semseg": 5, "sal": 2},
                      edge_pos_weight=0.95, edge_max_dist=0.02,
                      weights={"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0, "sal": 5.0}),
}


def output_channels(dataset, tasks):
    """Logit channels per task: classes for discrete tasks, 1 or 3 for continuous ones."""
    classes = DATASETS[dataset]["classes"]
    return {task: classes[task] if task in CLASS_TASKS else CONTINUOUS_OUTPUTS[task] for task in tasks}


#################################################################################
#                 Noise schedule (Sec. 3.1, Eq. 1) and time pairs (Alg. 2)      #
#################################################################################

def cosine_log_snr(t, ns=0.0002, ds=0.00025):
    """gamma(t) of Eq. (1) as the continuous cosine log-SNR: -log(cos((t + ns) / (1 + ds) * pi / 2)^-2 - 1)."""
    return -torch.log(torch.clamp(torch.cos((t + ns) / (1 + ds) * math.pi / 2) ** -2 - 1, min=1e-5))


def alpha_sigma(log_snr):
    """alpha = sqrt(sigmoid(logsnr)) = sqrt(gamma(t)), sigma = sqrt(sigmoid(-logsnr)); alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def time_pairs(steps, t_diff=1):
    """Algorithm 2's asymmetric (t_now, t_next): t_now = 1 - k/steps, t_next = max(1 - (1 + k + t_diff)/steps, 0)."""
    return [(1 - k / steps, max(1 - (1 + k + t_diff) / steps, 0.0)) for k in range(steps)]


#################################################################################
#                         Building blocks (TaskDiffusion_head.py)               #
#################################################################################

class NormConv(nn.Module):
    """conv -> BatchNorm -> FiLM x * (1 + scale(t)) + shift(t) when time-conditioned (upstream Conv_withtime)."""

    def __init__(self, in_ch, out_ch, kernel_size, time_dim=None):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_ch)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch)) if time_dim else None

    def forward(self, x, t=None):
        x = self.norm(self.conv(x))
        if self.film is None:
            return x
        scale, shift = self.film(t)[:, :, None, None].chunk(2, dim=1)
        return x * (scale + 1) + shift


class ConvBlock(nn.Module):
    """The paper's Convolution-BatchNorm-GeLU-Convolution block, optionally FiLM-conditioned and residual."""

    def __init__(self, in_ch, mid_ch, out_ch, time_dim=None, k1=3, k2=1, shortcut=None):
        super().__init__()
        self.norm_conv = NormConv(in_ch, mid_ch, k1, time_dim)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, k2, padding=k2 // 2)
        self.shortcut = shortcut  # None, "identity" (Conv_MLP_withtime_res) or "conv" (Conv_MLP of the aux heads)
        self.proj = nn.Conv2d(in_ch, out_ch, 1) if shortcut == "conv" else None

    def forward(self, x, t=None):
        h = self.conv2(F.gelu(self.norm_conv(x, t)))
        if self.shortcut is None:
            return h
        return h + (self.proj(x) if self.proj is not None else x)


class PredictionHead(nn.Module):
    """Task head: 3 residual conv blocks, x4 bilinear upsampling before the last, then a 3x3 conv to the logits."""

    def __init__(self, dim, out_ch, time_dim=None, num_blocks=3):
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock(dim, dim, dim, time_dim, shortcut="identity")
                                     for _ in range(num_blocks)])
        self.pred = nn.Conv2d(dim, out_ch, 3, padding=1)

    def forward(self, x, t=None, upsample=True):
        for j, block in enumerate(self.blocks):
            if upsample and j == len(self.blocks) - 1:
                x = F.interpolate(x, scale_factor=4, mode="bilinear")
            x = block(x, t)
        return self.pred(x)


class LogSNREmbedding(nn.Module):
    """Learned sinusoidal embedding of log-SNR (8 learned frequencies, sin and cos, plus the input) + MLP."""

    def __init__(self, dim, sinusoidal_dim=16):
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(sinusoidal_dim // 2))
        self.mlp = nn.Sequential(nn.Linear(sinusoidal_dim + 1, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, log_snr):
        x = log_snr[:, None].float()
        angles = x * self.freqs[None] * 2 * math.pi
        return self.mlp(torch.cat([x, angles.sin(), angles.cos()], dim=1))


#################################################################################
#                   Pixel-level encoder (Sec. 3.2, TaskDiffusion_baseline.py)   #
#################################################################################

def create_vit(name, image_size, drop_path_rate=0.0):
    """Headless ViT-B/16, ViT-L/16 or our CPU-sized vit-tiny (D=96, 4 blocks, 3 heads, patch 8, every block a level).
    drop_path_rate: stochastic depth of the last block (utils/common_config.py get_backbone: 0.15)."""
    if name == "vit-b":
        return vit_base_patch16(img_size=image_size, num_classes=0, drop_path_rate=drop_path_rate)
    if name == "vit-l":
        return vit_large_patch16(img_size=image_size, num_classes=0, drop_path_rate=drop_path_rate)
    return VisionTransformer(img_size=image_size, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=0,
                             feature_layers=(1, 2, 3, 4), drop_path_rate=drop_path_rate)


# (blocks, width, patch) -> backbone name: what a checkpoint's ViT weights say about it (the heads they cannot).
BACKBONE_SHAPES = {(4, 96, 8): "vit-tiny", (12, 768, 16): "vit-b", (24, 1024, 16): "vit-l"}


class PixelEncoder(nn.Module):
    """Shared ViT -> 4 levels X^l (blocks 3/6/9/12 for ViT-B), each through a 1x1 conv to C channels."""

    def __init__(self, backbone, image_size, dim, drop_path_rate=0.0):
        super().__init__()
        self.vit = create_vit(backbone, image_size, drop_path_rate)
        # Patch tokens only (upstream): the class token gets no gradient, and DDP refuses unused parameters.
        self.vit.cls_token.requires_grad_(False)
        self.fuse = nn.ModuleList([nn.Conv2d(self.vit.embed_dim, dim, 1) for _ in self.vit.feature_layers])

    def forward(self, images):
        return [fuse(x) for fuse, x in zip(self.fuse, self.vit.forward_features(images))]


#################################################################################
#                   Cross-task label encoder (Sec. 3.2; SPEC)                   #
#################################################################################

def invalid_mask(task, labels):
    """1 where a continuous label is missing: depth <= 0, zero-norm or 255 normals, edge == 255."""
    if task == "depth":
        return (labels <= 0).float()
    if task == "normals":
        return ((labels.norm(dim=1, keepdim=True) == 0) | (labels == IGNORE).any(1, keepdim=True)).float()
    return (labels == IGNORE).float()


INVALID_LABEL_RULES = ("authors", "masked")


def encode_targets(targets, tasks, size, invalid_rule="authors"):
    """Ground truth -> label-encoder inputs at the feature grid: nearest class maps (255 -> extra index K),
    bilinear continuous maps with a bilinear 'invalid' fraction per pixel.

    invalid_rule="authors" is TaskDiffusion_head.py forward_train: the fraction of a pixel's channels equal to 255
    is its invalid weight and the values are interpolated as they are, 255 included; depth (invalid = 0) is never
    blended. "masked" (ours, deliberately different): every invalid convention counts (depth <= 0, zero-norm or
    255 normals, 255 edge) and invalid values are zeroed first, so that no 255 bleeds into the neighbouring cells
    of the stride-16 grid. Only training sees this (inference re-encodes predictions, which have no invalid pixels).
    """
    inputs = {}
    for task, classes in tasks.items():
        y = targets[task]
        if task in CLASS_TASKS:
            y = F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long()
            inputs[task] = torch.where(y == IGNORE, classes, y)
        else:
            y = y[:, None] if y.ndim == 3 else y
            y = y if y.is_floating_point() else y.float()
            if invalid_rule == "authors":
                invalid = (y == IGNORE).float().mean(dim=1, keepdim=True)
            else:
                invalid = invalid_mask(task, y)
                y = torch.where(invalid.bool(), torch.zeros_like(y), y)
            inputs[task] = (F.interpolate(y, size=size, mode="bilinear"),
                            F.interpolate(invalid, size=size, mode="bilinear"))
    return inputs


def reencode_predictions(logits, tasks):
    """Algorithm 2: predictions -> label-encoder inputs (argmax; saliency softmax[:, 1] > 0.85; depth clamp(0, 80);
    sigmoid edge; L2-normalised normals), as upstream ddim_sample."""
    inputs = {}
    for task in tasks:
        x = logits[task].float()
        if task == "sal":
            inputs[task] = (x.softmax(dim=1)[:, 1] > 0.85).long()
        elif task in CLASS_TASKS:
            inputs[task] = x.argmax(dim=1)
        else:
            x = {"depth": lambda v: v.clamp(0, 80), "edge": torch.sigmoid,
                 "normals": lambda v: F.normalize(v, dim=1)}[task](x)
            inputs[task] = (x, torch.zeros_like(x[:, :1]))
    return inputs


class CrossTaskLabelEncoder(nn.Module):
    """Labels -> one cross-task map z: per task a C/4 embedding (one-hot x 1x1 conv = an embedding table for
    discrete tasks), concat, 1x1 conv to C, then (sigmoid(z) * 2 - 1) * scale.

    joint=False is Table 3's ablation without cross-task encoding: z is the concatenation of the per-task embeddings.
    With saliency among several tasks its embedding is concatenated after the joint conv (Sec. 4.1, PASCAL).
    """

    def __init__(self, tasks, dim, scale=0.01, joint=True):
        super().__init__()
        self.tasks, self.scale, self.joint, emb = dict(tasks), scale, joint, dim // 4
        self.embeddings, self.invalid = nn.ModuleDict(), nn.ParameterDict()
        for task, channels in tasks.items():
            if task in CLASS_TASKS:  # index `classes` = the ignore label
                self.embeddings[task] = nn.Embedding(channels + 1, emb)
            else:
                self.embeddings[task] = nn.Conv2d(channels, emb, 1)
                self.invalid[task] = nn.Parameter(torch.randn(emb))  # learned "invalid" embedding
        self.separate = "sal" if joint and "sal" in tasks and len(tasks) > 1 else None
        if joint:
            self.fuse = nn.Conv2d(emb * (len(tasks) - (self.separate is not None)), dim, 1)
        self.out_channels = (dim + emb * (self.separate is not None)) if joint else emb * len(tasks)

    def forward(self, inputs):
        joint, separate = [], []
        for task in self.tasks:
            if task in CLASS_TASKS:
                e = self.embeddings[task](inputs[task]).permute(0, 3, 1, 2)
            else:
                values, invalid = inputs[task]
                e = self.embeddings[task](values)
                e = invalid * self.invalid[task][None, :, None, None] + (1 - invalid) * e  # blend ignored pixels
            (separate if task == self.separate else joint).append(e)
        z = torch.cat(separate + [self.fuse(torch.cat(joint, 1))], 1) if self.joint else torch.cat(joint, 1)
        return (torch.sigmoid(z) * 2 - 1) * self.scale  # normalise to [-1, 1], x scale (SNR control, Table 5)


#################################################################################
#            Task-specific branches, auxiliary heads, diffusion decoders        #
#################################################################################

class TaskBranches(nn.Module):
    """Task-specific multi-level features F_i^s: per level and task 2 conv blocks on the clean X^l (computed once).
    fused=True is the ablation baseline's F_s^fused: levels concatenated, 1x1 conv, then the 2 conv blocks."""

    def __init__(self, tasks, dim, num_levels, fused=False):
        super().__init__()
        self.fused = fused
        make = lambda: nn.Sequential(nn.Conv2d(num_levels * dim, dim, 1) if fused else nn.Identity(),
                                     ConvBlock(dim, dim, dim), ConvBlock(dim, dim, dim))
        self.branches = nn.ModuleDict({t: nn.ModuleList([make() for _ in range(1 if fused else num_levels)])
                                       for t in tasks})

    def forward(self, levels):
        """{task: [F per level]} (one entry when fused)."""
        if self.fused:
            levels = [torch.cat(levels, 1)]
        return {t: [b(x) for b, x in zip(branch, levels)] for t, branch in self.branches.items()}


class CrossTaskDecoder(nn.Module):
    """Cross-task diffusion decoder (Sec. 3.2, Fig. 2): per level concat(X^l, z_t) -> 1x1 conv -> 2 FiLM blocks ->
    task interaction with the F_i^b -> per-task level interaction -> task heads."""

    def __init__(self, tasks, dim, z_channels, num_levels, interaction="task", level_interaction=True):
        super().__init__()
        self.tasks, self.interaction, self.level_interaction = list(tasks), interaction, level_interaction
        S, L = len(tasks), num_levels
        self.time_embed = LogSNREmbedding(dim)
        self.inputs = nn.ModuleList([nn.Conv2d(dim + z_channels, dim, 1) for _ in range(L)])
        self.shared = nn.ModuleList([nn.ModuleList([ConvBlock(dim, dim, dim, dim) for _ in range(2)])
                                     for _ in range(L)])
        if interaction == "task":  # task-relation maps A_i: S*S channels
            self.relation = nn.ModuleList([NormConv(dim, S * S, 3, dim) for _ in range(L)])
        elif interaction == "concat":  # Table 4 ablation: concat(shared feature, F_i^a) -> 1x1 conv
            self.concat = nn.ModuleList([nn.ModuleDict({t: nn.Conv2d(2 * dim, dim, 1) for t in tasks})
                                         for _ in range(L)])
        else:  # "cross-attn" ablation: noisy-map feature as query, F_i^a as key/value
            self.attn = nn.ModuleList([nn.MultiheadAttention(dim, math.gcd(dim, 8), batch_first=True)
                                       for _ in range(L)])
        self.specific = nn.ModuleList([nn.ModuleDict({t: NormConv(dim, dim, 1, dim) for t in tasks})
                                       for _ in range(L)])
        if level_interaction:  # level-fusing maps M^s: L*C -> C (1x1) -> L (3x3)
            self.level_weights = nn.ModuleDict({t: ConvBlock(L * dim, dim, L, dim, k1=1, k2=3) for t in tasks})
        self.heads = nn.ModuleDict({t: PredictionHead(dim, c, dim) for t, c in tasks.items()})

    def interact(self, i, h, feats, t):
        """U_i^a for every task a at level i, and the relation maps A_i (B, S, S, h, w) for task interaction."""
        if self.interaction == "task":
            B, _, H, W = h.shape
            A = torch.sigmoid(self.relation[i](h, t)).view(B, len(self.tasks), len(self.tasks), 1, H, W)
            Fi = torch.stack([feats[b][i] for b in self.tasks], 1)  # (B, S, C, H, W)
            U = (A * Fi[:, None]).sum(2)  # U_i^a = sum_b A_i^{a,b} F_i^b (Sec. 3.2)
            return {a: U[:, k] for k, a in enumerate(self.tasks)}, A[:, :, :, 0]
        if self.interaction == "concat":
            return {a: self.concat[i][a](torch.cat([h, feats[a][i]], 1)) for a in self.tasks}, None
        q = h.flatten(2).transpose(1, 2)
        out = {}
        for a in self.tasks:
            kv = feats[a][i].flatten(2).transpose(1, 2)
            out[a] = (q + self.attn[i](q, kv, kv, need_weights=False)[0]).transpose(1, 2).reshape(h.shape)
        return out, None

    def forward(self, z_t, log_snr, levels, feats, upsample=True):
        t = self.time_embed(log_snr)
        per_level, relations = {a: [] for a in self.tasks}, []
        for i, x in enumerate(levels):
            h = self.inputs[i](torch.cat([x, z_t], 1))
            for block in self.shared[i]:
                h = block(h, t)
            U, A = self.interact(i, h, feats, t)
            relations.append(A)
            for a in self.tasks:
                per_level[a].append(self.specific[i][a](U[a], t))
        logits = {}
        for a in self.tasks:
            if self.level_interaction:
                # F'_s = sum_i M_i^s U_i^s; softmax over levels as the authors' code (the paper's text says sigmoid).
                M = self.level_weights[a](torch.cat(per_level[a], 1), t).softmax(dim=1)
                f = sum(M[:, i:i + 1] * u for i, u in enumerate(per_level[a]))
            else:
                f = torch.stack(per_level[a]).mean(0)  # ablation: equal level weights
            logits[a] = self.heads[a](f, t, upsample)
        return logits, relations if self.interaction == "task" else None


class TaskSpecificDecoder(nn.Module):
    """Table 3 ablation: one diffusion head per task on (F_s^fused, its own slice of z_t); no task interaction."""

    def __init__(self, tasks, dim):
        super().__init__()
        self.tasks, self.emb = list(tasks), dim // 4
        self.time_embed = LogSNREmbedding(dim)
        self.inputs = nn.ModuleDict({t: nn.Conv2d(dim + self.emb, dim, 1) for t in tasks})
        self.heads = nn.ModuleDict({t: PredictionHead(dim, c, dim) for t, c in tasks.items()})

    def forward(self, z_t, log_snr, levels, feats, upsample=True):
        t = self.time_embed(log_snr)
        z = z_t.split(self.emb, dim=1)  # task a reads only its own label embedding
        return {a: self.heads[a](self.inputs[a](torch.cat([feats[a][0], z[k]], 1)), t, upsample)
                for k, a in enumerate(self.tasks)}, None


class TaskDiffusion(nn.Module):
    """Pixel-level encoder + task branches + label encoder + diffusion decoder; decoder='none' is the ablation
    baseline (backbone + fused task branches + task heads, no diffusion)."""

    def __init__(self, tasks, backbone="vit-tiny", image_size=64, dim=64, decoder="cross-task", interaction="task",
                 level_interaction=True, scale=0.01, cross_task_encoding=True, drop_path_rate=0.0,
                 invalid_labels="authors"):
        super().__init__()
        if invalid_labels not in INVALID_LABEL_RULES:
            raise ValueError(f"invalid_labels {invalid_labels!r}: choose from {INVALID_LABEL_RULES}")
        self.tasks, self.decoder_kind, self.invalid_labels = dict(tasks), decoder, invalid_labels
        self.encoder = PixelEncoder(backbone, image_size, dim, drop_path_rate)
        L = len(self.encoder.fuse)
        cross = decoder == "cross-task"
        self.branches = TaskBranches(tasks, dim, L, fused=not cross)
        if decoder == "none":
            self.decoder = nn.ModuleDict({t: PredictionHead(dim, c) for t, c in tasks.items()})
            return
        aux_in = (L if cross else 1) * dim  # auxiliary heads: Conv_MLP (1x1 shortcut) + 3x3 conv on the x4 features
        self.aux_heads = nn.ModuleDict({t: nn.Sequential(ConvBlock(aux_in, dim, dim, shortcut="conv"),
                                                         nn.Conv2d(dim, c, 3, padding=1)) for t, c in tasks.items()})
        self.label_encoder = CrossTaskLabelEncoder(tasks, dim, scale, joint=cross and cross_task_encoding)
        self.decoder = (CrossTaskDecoder(tasks, dim, self.label_encoder.out_channels, L, interaction,
                                         level_interaction) if cross else TaskSpecificDecoder(tasks, dim))

    def condition(self, images):
        """The clean backbone levels X^l and task features F (computed once per image, reused by every step)."""
        levels = self.encoder(images)
        return levels, self.branches(levels)

    def forward(self, images, targets, t=None, noise=None):
        """Algorithm 1: logits (and auxiliary logits) at the image size for one random noise level per image
        (t ~ U(0, 0.999) and noise ~ N(0, I) unless given)."""
        levels, feats = self.condition(images)
        size = images.shape[-2:]
        if self.decoder_kind == "none":
            return resize({t: head(feats[t][0]) for t, head in self.decoder.items()}, size), {}
        x0 = self.label_encoder(encode_targets(targets, self.tasks, levels[0].shape[-2:], self.invalid_labels))
        if t is None:
            t = torch.rand(len(images), device=images.device) * 0.999  # continuous t ~ U(0, 0.999)
        log_snr = cosine_log_snr(t)
        alpha, sigma = (s[:, None, None, None] for s in alpha_sigma(log_snr))
        z_t = alpha * x0 + sigma * (torch.randn_like(x0) if noise is None else noise)  # Eq. (1)
        logits, _ = self.decoder(z_t, log_snr, levels, feats)  # the decoder predicts the task logits (x0-style)
        aux = {t: head(F.interpolate(torch.cat(feats[t], 1), scale_factor=4, mode="bilinear"))
               for t, head in self.aux_heads.items()}
        return resize(logits, size), resize(aux, size)


def resize(logits, size):
    """Bilinear resize of every task's logits to the input size (TaskDiffusion_wrapper.py)."""
    return {t: F.interpolate(x, size=size, mode="bilinear") if x.shape[-2:] != size else x for t, x in logits.items()}


#################################################################################
#                  Losses (Eq. 3, losses/loss_functions.py upstream)            #
#################################################################################

def task_loss(task, logits, target, edge_pos_weight=0.95):
    """L_s of one task: CE (ignore 255), class-balanced CE (saliency), L1 on normalised normals, masked L1 depth,
    positive-weighted BCE (edge). Sums are divided by the number of valid pixels, as upstream."""
    logits = logits.float()
    if task in CLASS_TASKS:
        target = target.long()
        valid = target != IGNORE
        n_valid = valid.sum().clamp(min=1)
        weight = None
        if task == "sal":  # class-balanced: w_pos = fraction of negatives
            w_pos = ((target == 0) & valid).sum() / n_valid
            weight = torch.stack([1 - w_pos, w_pos]).float()
        return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE, reduction="sum") / n_valid
    if task == "edge":
        valid = target != IGNORE
        w = edge_pos_weight  # w * positive term + (1 - w) * negative term, mean over valid pixels
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none",
                                                  pos_weight=torch.tensor(w / (1 - w), device=logits.device))
        return (loss * (1 - w) * valid).sum() / valid.sum().clamp(min=1)
    target = target[:, None] if target.ndim == 3 else target
    valid = 1 - invalid_mask(task, target)
    pred = F.normalize(logits, dim=1) if task == "normals" else logits
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp(min=1)


def multitask_loss(logits, targets, weights, edge_pos_weight):
    """Eq. (3): L_all = sum_s w_s L_s; returns (total, {task: L_s})."""
    losses = {t: task_loss(t, logits[t], targets[t], edge_pos_weight) for t in logits}
    return sum(weights[t] * loss for t, loss in losses.items()), losses


def training_loss(model, images, targets, dataset, aux_weight):
    """Algorithm 1's loss: Eq. (3) on the decoder's logits + aux_weight x Eq. (3) on the auxiliary heads."""
    spec = DATASETS[dataset]
    logits, aux = model(images, targets)
    loss, losses = multitask_loss(logits, targets, spec["weights"], spec["edge_pos_weight"])
    if aux:
        loss = loss + aux_weight * multitask_loss(aux, targets, spec["weights"], spec["edge_pos_weight"])[0]
    return loss, losses


#################################################################################
#                            Data helpers                                       #
#################################################################################

def create_dense_dataset(args, split):
    """Synthetic shapes (train seed 0, val seed 1; flipped on-device in training), or PASCAL-Context / NYUD-v2
    (data/dense.py): the authors' train transform with augmentation for "train", their valid transform (pad) else."""
    if args.dataset == "synthetic":
        from data.synthetic import SyntheticShapes
        n = 10_000 if split == "train" else args.num_eval
        return ImageNetStandardised(SyntheticShapes(n, args.image_size, seed=0 if split == "train" else 1, dense=True))
    from data.dense import NYUD, PascalContext
    try:
        cls = PascalContext if args.dataset == "pascal" else NYUD
        ds = cls(args.data_root, split, tasks=args.tasks, image_size=args.image_size, resize="pad",
                 augment=split == "train", seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if split != "train" and args.num_eval:
        ds = torch.utils.data.Subset(ds, range(min(args.num_eval, len(ds))))
    return ds


def to_device(batch, tasks, device):
    """(images, {task: target}) on the device."""
    return (batch["image"].to(device, non_blocking=True),
            {t: batch[t].to(device, non_blocking=True) for t in tasks})


#################################################################################
#                   Training loop (Algorithm 1, DiT train.py conventions)       #
#################################################################################

def build_model(args):
    """The model of parsed args (see parse_args): e.g. build_model(parse_args(["--backbone", "vit-b"]))."""
    return TaskDiffusion(output_channels(args.dataset, args.tasks), args.backbone, args.image_size, args.embed_dim,
                         args.decoder, args.interaction, not args.no_level_interaction, args.scale,
                         args.label_encoding == "cross-task", args.drop_path, args.invalid_labels)


def train(args, rank, world_size, device):
    """Train one model; returns (run, model, ema). Every rank returns; the caller tears the group down."""
    run = TrainingRun(args, f"taskdiffusion-{args.dataset}-{args.backbone}-{args.decoder}", rank, world_size,
                      script="task_diffusion")
    batch_size = run.batch_size
    dataset = create_dense_dataset(args, "train")
    tasks = output_channels(args.dataset, args.tasks)

    torch.manual_seed(args.seed)  # same initial weights on every rank and in every (re)run
    model = build_model(args)
    if args.backbone_weights:
        try:
            model.encoder.vit.load_timm_state_dict(args.backbone_weights)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--backbone-weights: {e}")
    model.to(device)
    ema = make_ema(model)
    # Adam with L2 weight decay 1e-6 as SPEC and the authors' configs (optimizer: adam); the issue said AdamW.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                           weight_decay=args.weight_decay)

    step = resume_training(run, model, ema, opt)
    ddp = training_module(wrap_ddp(model, device, world_size), args)  # BatchNorm statistics: DDP's default buffer broadcast keeps them equal
    loader = training_loader(dataset, batch_size, rank, world_size, args.seed, step, args.num_workers, device)
    run.log(f"TaskDiffusion {args.backbone} C={args.embed_dim} decoder={args.decoder} interaction={args.interaction} "
            f"level-interaction={not args.no_level_interaction} label-encoding={args.label_encoding} "
            f"drop-path={args.drop_path} invalid-labels={args.invalid_labels} "
            f"augmentation={'scale, crop, flip, photometric' if getattr(dataset, 'augment', False) else 'flip'} "
            f"tasks={','.join(tasks)}: {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"{len(dataset):,} training items; world size {world_size}, batch {batch_size}/rank; results in {run.dir}")
    show = next(iter(torch.utils.data.DataLoader(create_dense_dataset(args, "val"), batch_size=6))) \
        if rank == 0 else None

    running = torch.zeros(2 + len(tasks), device=device)  # (total, per-task..., count), synced only when logging

    def metrics():
        total = all_reduce_mean(running)
        values = (total[:-1] / total[-1]).tolist()
        running.zero_()
        return dict(loss=values[0], lr=opt.param_groups[0]["lr"], **{f"loss_{t}": v for t, v in zip(tasks, values[1:])})

    def state():
        return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict())

    def sample(path):
        model.eval()
        write_predictions(model, show, tasks, args, path)
        model.train()

    model.train()
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc=f"train {args.decoder}", dynamic_ncols=True)
    while step < args.steps:
        seed_step(args.seed, rank, step)  # this step's flips, drop-path masks, noise levels and noise: its own
        images, targets = to_device(next(loader), tasks, device)
        if args.dataset == "synthetic":  # PASCAL / NYUD are flipped (and scaled, cropped) by the loader
            images, targets = random_flip_batch(images, targets)
        for group in opt.param_groups:  # poly decay (utils/training_run.py PolynomialLR), a pure function of step
            group["lr"] = args.lr * (1 - min(step, args.decay_steps) / args.decay_steps) ** 0.9
        with autocast(device, args.bf16):
            loss, losses = training_loss(ddp, images, targets, args.dataset, args.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, model, args.ema_decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):  # BatchNorm statistics: copied, not averaged
            ema_buffer.copy_(buffer)
        running += torch.stack([loss.detach()] + [losses[t].detach() for t in tasks] + [loss.new_ones(())])
        step += 1
        bar.update(1)
        if end_of_step(run, args, step, device, metrics, state, sample, sample_last=False):  # evaluate() draws it
            break
    finish_training(run, model, bar)
    run.steps_done = step  # < args.steps when a stop signal ended the run early
    return run, model, ema


#################################################################################
#               Sampler (Algorithm 2), evaluation and pictures                  #
#################################################################################

@torch.no_grad()
def ddim_sample(model, images, steps=3, t_diff=1, generator=None, z=None):
    """Algorithm 2: z ~ N(0, I) (or the given z_T); per step decode, re-encode the prediction as x0, DDIM to t_next.
    Returns (last step's logits at the image size, per-step task-relation maps). Call model.eval() first."""
    levels, feats = model.condition(images)
    h, w = levels[0].shape[-2:]
    if z is None:
        z = torch.randn(len(images), model.label_encoder.out_channels, h, w, device=images.device,
                        generator=generator)
    pairs, relations = time_pairs(steps, t_diff), []
    for k, (t_now, t_next) in enumerate(pairs):
        last = k == len(pairs) - 1
        log_snr, log_snr_next = cosine_log_snr(torch.tensor([t_now, t_next], device=images.device))
        # x4 upsampling in the heads at the last step only: earlier predictions are re-encoded at the feature grid
        logits, A = model.decoder(z, log_snr.expand(len(images)), levels, feats, upsample=last)
        relations.append(A)
        if last:  # the final z would be unused
            if "depth" in logits:
                # TaskDiffusion_head.py ddim_sample re-encodes with an in-place clamp_(0, 80), so the depth it
                # returns is clamped before the wrapper's bilinear resize (which then cannot leave [0, 80])
                logits = {**logits, "depth": logits["depth"].clamp(0, 80)}
            break
        x0 = model.label_encoder(reencode_predictions(logits, model.tasks))
        (alpha, sigma), (alpha_next, sigma_next) = alpha_sigma(log_snr), alpha_sigma(log_snr_next)
        eps = (z - alpha * x0) / sigma.clamp(min=1e-8)
        z = alpha_next * x0 + sigma_next * eps  # DDIM update (eta = 0)
    return resize(logits, images.shape[-2:]), relations


def predict(model, images, steps=3, generator=None):
    """Inference for any --decoder: (logits at the image size, task-relation maps per step or None)."""
    if model.decoder_kind == "none":
        with torch.no_grad():
            return model(images, None)[0], None
    logits, relations = ddim_sample(model, images, steps, generator=generator)
    return logits, relations if relations[0] is not None else None


def prediction_maps(logits):
    """Logits -> metric inputs (upstream get_output): argmax, saliency/edge probabilities, unit normals, depth >= 0."""
    out = {}
    for t, x in logits.items():
        x = x.float()
        out[t] = (x.argmax(1) if t in ("semseg", "human_parts") else x.softmax(1)[:, 1] if t == "sal"
                  else torch.sigmoid(x[:, 0]) if t == "edge" else F.normalize(x, dim=1) if t == "normals"
                  else x.clamp(min=0))
    return out


def colourise(task, x):
    """A task map (B, ...) -> (B, 3, H, W) in [-1, 1] for the prediction grid."""
    x = x.float().cpu()
    if task in ("semseg", "human_parts"):
        palette = torch.rand(256, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
        palette[0], palette[IGNORE] = -1, 1
        return palette[x.long().clamp(0, 255)].permute(0, 3, 1, 2)
    if task == "normals":  # ignored pixels (255) black
        return torch.where((x == IGNORE).any(1, keepdim=True), -1.0, x.clamp(-1, 1))
    x = x[:, 0] if x.ndim == 4 else x
    if task == "depth":  # one fixed range for prediction and ground truth: near = bright, 10 m and missing = black
        x = torch.where(x > 0, 1 - x / 10, 0)
    x = torch.where(x == IGNORE, 0, x)
    return (x.clamp(0, 1) * 2 - 1)[:, None].repeat(1, 3, 1, 1)


def save_relations_png(relations, path, scale=8):
    """Fig. 3: the task-relation maps A_i of the first image: rows = task a, columns = (level i, task b)."""
    maps = torch.stack([A[0].float().cpu() for A in relations])  # (L, S, S, h, w)
    L, S, _, h, w = maps.shape
    maps = F.pad(maps, (0, 1, 0, 1), value=0.5)  # grey gaps
    img = maps.permute(1, 3, 0, 2, 4).reshape(S * (h + 1), L * S * (w + 1))
    img = (img.clamp(0, 1) * 255).byte().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    Image.fromarray(img.numpy()).save(path)


@torch.no_grad()
def write_predictions(model, batch, tasks, args, path, generator=None):
    """Prediction grid of one batch (rows: image, then per task prediction and ground truth); also the relation
    maps A_i of the first and last step next to it. Returns (metric inputs, targets)."""
    device = next(model.parameters()).device
    images, targets = to_device(batch, tasks, device)
    with autocast(device, args.bf16):
        logits, relations = predict(model, images, args.sampling_steps, generator)
    preds = prediction_maps(logits)
    if path is not None:
        tiles = [denormalize_tensor(images.float().cpu())] + [colourise(t, m) for t in tasks
                                                              for m in (preds[t], targets[t])]
        save_image_grid(torch.stack(tiles, 1).flatten(0, 1), path, nrow=len(tiles))
        for k in sorted({0, len(relations) - 1}) if relations else []:
            save_relations_png(relations[k], path.replace(".png", f"_task_relations_step{k + 1}.png"))
    return preds, targets


@torch.no_grad()
def evaluate(model, args, device, out_dir=None):
    """Metrics of every task over the validation set (dataset-level meters); PNGs of the first batch in out_dir."""
    tasks = output_channels(args.dataset, args.tasks)
    loader = torch.utils.data.DataLoader(create_dense_dataset(args, "val"), batch_size=args.eval_batch_size,
                                         num_workers=args.num_workers)
    # Boundaries as SEISM scores them: against seg2bmap of PASCAL-Context's LabelMap ("edge_segments") and of
    # NYUD's 0/255 edge PNG, both read as label maps; the synthetic set's own 2-px boundary maps as boundaries.
    edge_gt = "boundary" if args.dataset == "synthetic" else "segmentation"
    meters = {t: SegMeter(c) if t in ("semseg", "human_parts") else SaliencyMeter() if t == "sal"
              else NormalsMeter() if t == "normals" else DepthMeter() if t == "depth"
              else EdgeMeter(max_dist=DATASETS[args.dataset]["edge_max_dist"], gt_format=edge_gt,
                             workers=args.eval_workers) for t, c in tasks.items()}
    model.to(device).eval()
    generator = torch.Generator(device).manual_seed(args.seed)  # the same starting noise for every evaluation
    for i, batch in enumerate(loader):
        path = os.path.join(out_dir, "predictions.png") if i == 0 and out_dir else None
        preds, targets = write_predictions(model, batch, tasks, args, path, generator)
        for t, meter in meters.items():
            if t == "edge" and "edge_segments" in batch:
                segments = batch["edge_segments"]
                meter.update(preds[t], segments, valid=segments >= 0)
            else:
                meter.update(preds[t], targets[t])
    return {t: meter.result() for t, meter in meters.items()}


METRIC_NAMES = {"semseg": "semseg mIoU", "human_parts": "parts mIoU", "sal": "sal maxF", "normals": "normals mErr",
                "depth": "depth RMSE", "edge": "edge odsF"}


def results_table(rows, reference=None):
    """format_table of {name: {task: metric}} plus Delta_m (%) against the `reference` row."""
    table = {}
    for name, res in rows.items():
        table[name] = {METRIC_NAMES[t]: v for t, v in res.items()}
        if reference is not None:
            table[name]["Delta_m %"] = delta_m(res, rows[reference], LOWER_IS_BETTER)
    return format_table(table)


#################################################################################
#                                     main                                      #
#################################################################################

# Defaults: the paper's runs (Sec. 4.1: 40K iterations, batch 4, Adam; lr 1e-5 on NYUD-v2) vs. a CPU-sized demo.
PAPER = dict(steps=40_000, global_batch_size=4, lr=2e-5, ema_decay=0.9999, num_workers=4, log_every=100,
             ckpt_every=4_000, sample_every=4_000)
DEMO = dict(steps=300, global_batch_size=8, lr=1e-3, ema_decay=0.99, num_workers=0, log_every=25,
            ckpt_every=300, sample_every=100)
EMBED_DIM = {"vit-tiny": 32, "vit-b": 576, "vit-l": 376}  # C of configs/pascal/*.yml (NYUD ViT-L: 768); tiny: ours
IMAGE_SIZE = {"synthetic": [64], "pascal": [512], "nyud": [448, 576]}  # utils/config.py TRAIN/TEST.SCALE; ours: 64
SHAPE_FLAGS = ("dataset", "backbone", "embed_dim", "image_size", "tasks")  # what an authors' checkpoint fixes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default=None, help="default synthetic (or, with --eval-only, "
                   "what the checkpoint was trained on)")
    p.add_argument("--data-root", default=None, help="PASCAL-Context / NYUD-v2 folder (ATRC release layout)")
    p.add_argument("--tasks", default=None, help="comma-separated subset (default: all tasks of the data set)")
    p.add_argument("--image-size", type=int, nargs="+", default=None,
                   help="H [W] (default 64 synthetic, 512 PASCAL, 448 576 NYUD)")
    p.add_argument("--num-eval", type=int, default=None, help="validation images (default 96 synthetic, all else)")
    p.add_argument("--backbone", choices=["vit-tiny", "vit-b", "vit-l"], default=None,
                   help="default vit-tiny on synthetic, vit-l otherwise")
    p.add_argument("--backbone-weights", default=None, help="timm ViT state dict (.pth / .safetensors)")
    p.add_argument("--embed-dim", type=int, default=None, help="C (576 ViT-B, 376/768 ViT-L PASCAL/NYUD, 32 tiny)")
    p.add_argument("--decoder", choices=["cross-task", "task-specific", "none"], default="cross-task")
    p.add_argument("--interaction", choices=["task", "concat", "cross-attn"], default="task")
    p.add_argument("--no-level-interaction", action="store_true")
    p.add_argument("--label-encoding", choices=["cross-task", "separate"], default=None,
                   help="Table 3: separate = per-task maps, no joint conv (the default of --decoder task-specific)")
    p.add_argument("--scale", type=float, default=0.01, help="scaling factor of the cross-task map")
    p.add_argument("--aux-weight", type=float, default=None, help="default 0.125 (ViT-B, tiny) / 0.25 (ViT-L)")
    p.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth of the ViT's last block (default 0.15 PASCAL / NYUD, as the authors; "
                   "0 synthetic)")
    p.add_argument("--invalid-labels", choices=INVALID_LABEL_RULES, default="authors",
                   help="label encoding of invalid pixels in training: the authors' rule or ours (encode_targets)")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--grad-clip", type=float, default=10.0)
    p.add_argument("--decay-steps", type=int, default=None, help="poly LR horizon (default --steps)")
    p.add_argument("--sampling-steps", type=int, default=3, help="inference steps (--steps is training steps)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--eval-workers", type=int, default=None,
                   help="processes scoring boundary odsF (~1 s per 512 px image each; default: all cores on "
                        "PASCAL / NYUD, 0 = in this process on the synthetic set)")
    p.add_argument("--eval-weights", choices=["model", "ema"], default="model",
                   help="weights to evaluate (upstream keeps no EMA: model)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also train --decoder none for Delta_m (default: on for synthetic)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --ckpt and exit")
    p.add_argument("--ckpt", default=None)
    add_run_args(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv  # re-parsed with what an authors' checkpoint fixes (load_authors_model)
    args.given = [k for k in SHAPE_FLAGS if getattr(args, k) is not None]  # checked against an authors' checkpoint
    args.dataset = args.dataset or "synthetic"
    synthetic = args.dataset == "synthetic"
    known = DATASETS[args.dataset]["tasks"]
    tasks = args.tasks.split(",") if args.tasks else list(known)
    if not tasks or any(t not in known for t in tasks):
        p.error(f"unknown --tasks {args.tasks} for {args.dataset}; choose from {','.join(known)}")
    args.tasks = list(dict.fromkeys(tasks))
    args.backbone = args.backbone or ("vit-tiny" if synthetic else "vit-l")
    size = args.image_size or IMAGE_SIZE[args.dataset]
    patch = 8 if args.backbone == "vit-tiny" else 16
    if len(size) > 2 or any(s % patch for s in size):
        p.error(f"--image-size {size}: give H or H W, multiples of the patch size {patch} of {args.backbone}")
    args.image_size = size[0] if len(size) == 1 else tuple(size)
    args.embed_dim = args.embed_dim or (768 if (args.backbone, args.dataset) == ("vit-l", "nyud")
                                        else EMBED_DIM[args.backbone])
    if args.embed_dim % 4:
        p.error(f"--embed-dim {args.embed_dim} must be divisible by 4 (the per-task label embedding is C/4)")
    args.label_encoding = args.label_encoding or ("separate" if args.decoder == "task-specific" else "cross-task")
    if args.decoder == "task-specific" and args.label_encoding != "separate":
        p.error("--decoder task-specific reads each task's own label map: use --label-encoding separate")
    args.aux_weight = args.aux_weight if args.aux_weight is not None else (0.25 if args.backbone == "vit-l" else 0.125)
    args.drop_path = args.drop_path if args.drop_path is not None else (0.0 if synthetic else 0.15)
    if not 0 <= args.drop_path < 1:
        p.error(f"--drop-path {args.drop_path} must be in [0, 1)")
    fill_defaults(args, DEMO if synthetic else {**PAPER, "lr": 1e-5} if args.dataset == "nyud" else PAPER)
    args.decay_steps = args.decay_steps or args.steps
    args.num_eval = args.num_eval if args.num_eval is not None else (96 if synthetic else 0)
    if args.eval_workers is None:
        args.eval_workers = 0 if synthetic else os.cpu_count() or 1
    args.baseline = synthetic and args.decoder != "none" if args.baseline is None else args.baseline
    if not synthetic and not args.data_root and not (args.eval_only and args.ckpt):
        p.error(f"--dataset {args.dataset} needs --data-root PATH (or use --dataset synthetic)")
    if args.eval_only and not args.ckpt:
        p.error("--eval-only needs --ckpt PATH")
    if args.sampling_steps < 1:
        p.error("--sampling-steps must be >= 1")
    return args


#################################################################################
#          Checkpoints for --eval-only: ours, or the authors' released ones      #
#################################################################################

def _one_of(path, what, found, flag, given):
    """fail() when the user's flag contradicts what the checkpoint holds."""
    if flag in given and given[flag] != found:
        fail(f"'{path}' holds {what} {found}, but --{flag.replace('_', '-')} is {given[flag]}: drop the flag "
             f"or pass {found}")


def authors_config(state, path, args):
    """Read off the authors' weights what they fix (backbone, C, tasks and channels, hence the data set, the patch
    grid); flags may repeat it (a contradiction is a one-line error); the rest comes from flags and paper defaults."""
    given = {k: getattr(args, k) for k in args.given}
    for needed in ("backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.fea_fuse.0.weight"):
        if needed not in state:
            fail(f"'{path}' looks like the authors' format but has no '{needed}'; is it a TaskDiffusion checkpoint?")
    width, _, patch, _ = state["backbone.patch_embed.proj.weight"].shape
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks."))
    backbone = BACKBONE_SHAPES.get((blocks, width, patch))
    if backbone is None:
        known = ", ".join(f"{n} {s}" for s, n in BACKBONE_SHAPES.items())
        fail(f"'{path}': a ViT of {blocks} blocks, width {width}, patch {patch} is none of (blocks, width, patch) "
             f"{known}")
    _one_of(path, "backbone", backbone, "backbone", given)
    embed_dim = state["backbone.fea_fuse.0.weight"].shape[0]
    _one_of(path, "C =", embed_dim, "embed_dim", given)
    channels = {k.split(".")[2]: v.shape[0] for k, v in state.items()
                if re.fullmatch(r"heads\.pred_heads\.[a-z_]+\.weight", k)}
    if "human_parts" in channels or "sal" in channels or channels.get("semseg") == 21:
        dataset = "pascal"
    elif "depth" in channels or channels.get("semseg") == 40:
        dataset = "nyud"
    else:
        dataset = given.get("dataset")
        if dataset not in ("pascal", "nyud"):
            fail(f"'{path}': tasks {sorted(channels)} do not say PASCAL or NYUD; pass --dataset pascal|nyud")
    _one_of(path, "a model of the data set", dataset, "dataset", given)
    tasks = [t for t in DATASETS[dataset]["tasks"] if t in channels]  # their p.TASKS.NAMES order is the same
    if len(tasks) != len(channels) or output_channels(dataset, tasks) != {t: channels[t] for t in tasks}:
        fail(f"'{path}': heads {channels} do not fit {dataset} "
             f"({output_channels(dataset, DATASETS[dataset]['tasks'])})")
    if "tasks" in given and given["tasks"] != tasks:
        fail(f"'{path}' predicts {','.join(tasks)}, but --tasks is {','.join(given['tasks'])}: drop --tasks")
    size = given.get("image_size", IMAGE_SIZE[dataset])  # parse_args: an int or (H, W); the defaults: [H] or [H, W]
    size = [size, size] if isinstance(size, int) else list(size) if len(size) == 2 else [size[0], size[0]]
    tokens = state["backbone.pos_embed"].shape[1] - 1  # their pos_embed is fixed to the training grid
    if any(s % patch for s in size) or (size[0] // patch) * (size[1] // patch) != tokens:
        fail(f"'{path}' was trained on a grid of {tokens} patches of {patch} px; --image-size "
             f"{' '.join(map(str, size))} does not give it: pass the training size "
             f"({dataset}: {' '.join(map(str, IMAGE_SIZE[dataset]))})")
    return dict(dataset=dataset, backbone=backbone, embed_dim=embed_dim, tasks=tasks,
                image_size=size[0] if size[0] == size[1] else tuple(size))


def load_authors_model(state, path, args):
    """Our model for the authors' state dict, loaded through TASKDIFFUSION_KEY_MAP with strict key coverage:
    (model, its args). Their model is the full one: cross-task decoder, task and level interaction, C/4 labels."""
    if (args.decoder, args.interaction, args.no_level_interaction, args.label_encoding) != \
            ("cross-task", "task", False, "cross-task"):
        fail(f"'{path}' is the authors' full model: drop --decoder / --interaction / --no-level-interaction / "
             f"--label-encoding")
    config = authors_config(state, path, args)
    size = config["image_size"]
    # the user's flags again, plus what the weights fix: every default that depends on them follows (e.g. all
    # validation images for PASCAL / NYUD, where the synthetic default would be 96)
    targs = parse_args(args.argv + ["--dataset", config["dataset"], "--backbone", config["backbone"],
                                    "--embed-dim", str(config["embed_dim"]), "--tasks", ",".join(config["tasks"]),
                                    "--image-size", *map(str, [size] if isinstance(size, int) else size)])
    model = build_model(targs)
    converted, unmapped = taskdiffusion_to_ours(state)
    ours = model.state_dict()
    missing = [k for k in ours if k not in converted and k not in TASKDIFFUSION_OURS_ONLY]
    leftover = unmapped + [k for k in converted if k not in ours]
    if leftover or missing:
        fail(f"'{path}' does not cover the model key for key: {len(leftover)} left over (e.g. {leftover[:3]}), "
             f"{len(missing)} missing (e.g. {missing[:3]})")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(ours[k].shape)})" for k, v in converted.items()
             if v.shape != ours[k].shape]
    if wrong:
        fail(f"'{path}' does not fit {targs.backbone} C={targs.embed_dim} {targs.dataset} "
             f"{targs.image_size}: {len(wrong)} size mismatches, e.g. {'; '.join(wrong[:3])}")
    model.load_state_dict({**{k: ours[k] for k in TASKDIFFUSION_OURS_ONLY}, **converted}, strict=True)
    return model, targs


def model_for_eval(args):
    """--eval-only's model: (model, its args, a label for the table, results folder) from our checkpoint or the
    authors' (the format is detected and logged in one line, as is what was skipped)."""
    try:
        obj, skipped_classes = read_checkpoint(args.ckpt)
    except CheckpointError as e:
        fail(str(e))
    kind = taskdiffusion_layout(obj)
    if kind == "ours":
        # flags added after a checkpoint was written take their defaults (eval ignores drop-path / invalid-labels)
        defaults = vars(parse_args(["--dataset", obj["args"]["dataset"], "--data-root", "unused"]))
        targs = argparse.Namespace(**{**defaults, **obj["args"], "num_eval": args.num_eval,
                                      "sampling_steps": args.sampling_steps, "eval_batch_size": args.eval_batch_size,
                                      "eval_workers": args.eval_workers,
                                      "data_root": args.data_root or obj["args"]["data_root"]})
        model = build_model(targs)
        load_model_state(model, obj[args.eval_weights], args.ckpt)
        print(f"read '{args.ckpt}': our checkpoint format (step {obj['step']}, '{args.eval_weights}' weights)")
        return model, targs, f"{targs.decoder} @ {obj['step']}", run_dir_of(args.ckpt)
    if kind != "authors":
        found = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        fail(f"'{args.ckpt}' is in no known format: expected ours (a dict with model, ema, args, step) or the "
             f"authors' ({{'model': state dict with backbone.* and heads.* keys}}); found {found}")
    state = strip_prefix(obj.get("model", obj), "module.")
    model, targs = load_authors_model(state, args.ckpt, args)
    print(f"read '{args.ckpt}': the authors' checkpoint format ({len(state)} tensors -> {targs.backbone}, "
          f"C={targs.embed_dim}, {targs.dataset} {','.join(targs.tasks)}, image {targs.image_size}, "
          f"{targs.sampling_steps} sampling steps)")
    ignored = [k for k in obj if k != "model"] if "model" in obj else []
    if ignored or skipped_classes:
        print(f"ignored in '{args.ckpt}': {', '.join(ignored) or '-'}; pickled classes not loaded: "
              f"{', '.join(skipped_classes) or '-'}")
    out_dir = os.path.join(args.results_dir, "eval-" + os.path.basename(args.ckpt).split(".")[0])
    return model, targs, f"authors' {os.path.basename(args.ckpt)}", out_dir


def evaluate_checkpoint(args):
    """--eval-only: rebuild the model from the checkpoint (ours or the authors'), evaluate, print the table."""
    _, _, device = init_distributed()
    model, targs, label, out_dir = model_for_eval(args)
    if targs.dataset != "synthetic" and not targs.data_root:
        fail(f"--eval-only with '{args.ckpt}' needs --data-root PATH of the {targs.dataset} release")
    os.makedirs(out_dir, exist_ok=True)
    results = evaluate(model, targs, device, out_dir)
    print(results_table({label: results}))
    return results


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        return evaluate_checkpoint(args)
    rank, world_size, device = init_distributed()
    runs = {}
    for decoder in [args.decoder] + (["none"] if args.baseline else []):
        run_args = argparse.Namespace(**{**vars(args), "decoder": decoder,
                                         "label_encoding": "cross-task" if decoder == "none" else args.label_encoding})
        name = "TaskDiffusion" if decoder != "none" else "baseline (--decoder none)"
        run, model, ema = train(run_args, rank, world_size, device)
        if run.steps_done < run_args.steps:  # stopped by a signal: neither the next model nor an evaluation
            run.log(f"stopped at step {run.steps_done}; continue with the same flags and --resume auto")
            cleanup_distributed()
            return None
        runs[name] = (run, ema if args.eval_weights == "ema" else model, run_args)
    cleanup_distributed()  # evaluation on rank 0 alone, after the group is gone: it cannot time out a collective
    if rank != 0:
        return None
    rows = {}
    for name, (run, model, run_args) in runs.items():
        rows[name] = evaluate(model, run_args, device, run.dir)
        run.log("evaluation:\n" + results_table({name: rows[name]}))
    table = results_table(rows, "baseline (--decoder none)" if len(rows) > 1 else None)
    print(table + "\nodsF: SEISM's procedure in Python (eval/dense_metrics.py EdgeMeter)")
    run_dir = next(iter(runs.values()))[0].dir
    with open(os.path.join(run_dir, "results.txt"), "w") as f:
        f.write(table + "\n")
    return run_dir


if __name__ == "__main__":
    main()
