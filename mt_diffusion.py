"""MT-Diffusion: "Diffusion Models for Multi-Modal Generative Modeling" (Chen et al., ICLR 2024).

A DDPM whose forward chain also injects encoded task data X = {x_1..x_N}: every step adds sum_i w_t^(i) E_i(x_i)
to the mean (Eq. 3), so the marginal z_t carries atilde_t^(i) E_i(x_i) (Eq. 4) and the reverse mean subtracts
w_t^(i) E_i(x_i) again (Eq. 5). Notation: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s; the paper's t runs
1..T, every table and `t` tensor here holds the 0-based index t - 1 (ADM / DiT), so `sched.alphas[0]` is alpha_1.
Theorem 2 has typos: the closed forms follow the project SPEC ("MT-Diffusion"). No official code exists.
"""
import argparse
import copy
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.diffusion import get_beta_schedule, mean_flat, space_timesteps
from common.named_models import ADM_CONFIGS, ADM_SMALL
from common.sampling import clips_predicted_x0, write_samples_npz
from common.training_run import (TrainingRun, add_run_args, all_reduce_mean, autocast, cleanup_distributed, end_of_step,
                                 fail, fill_defaults, finish_training, infinite_loader, init_distributed,
                                 load_checkpoint, load_model_state, make_ema, random_hflip, resume_training, run_dir_of,
                                 save_image_grid, seed_step, update_ema, wrap_ddp)
from common.training_run import adamw, training_module  # the fast path
from common.unet import EncoderUNetModel, UNetModel
from common.vae import load_vae
from data.image_folder import ImageFolder
from data.masks import half_mask, patch_size, random_patch_mask
from data.paired import DIRECTIONS, LAYOUTS, PairedImages, SyntheticPairs
from data.synthetic import SyntheticShapes
from eval.dense_metrics import SegMeter, labels_from_colours
from eval.image_metrics import psnr_db, ssim_map
from eval.shape_classifier import classifier_accuracy, judge_samples, load_or_train_classifier


#################################################################################
#                 1. Forward aggregation: Eq. (3), Eq. (4)                      #
#################################################################################

def task_weight_schedule(kind, num_timesteps, clamp=1.0, value=1.0):
    """Task weights w with w[t-1] = w_t for t = 1..T (float64): 'paper', 'constant' (w_t = value) or 'zero' (DDPM)."""
    T = num_timesteps
    if kind == "paper":
        # App. E: w_t = t / (T - t), small at small t so heterogeneous tasks stay out of the nearly clean steps. It
        # is 1 at t = T/2 and infinite at t = T, hence the clamp (default 1: the tail is then App. E's w_t = 1 case).
        # Even so atilde_t (Eq. 4) reaches ~150 (linear) / ~270 (cosine) at T = 1000: the injection accumulates
        # over the ~2/beta_t steps the chain remembers; `task_weights`' 'paper-rescaled' scales it to O(1).
        if clamp is None or not 0 < clamp < float("inf"):
            raise ValueError(f"clamp={clamp}: the 'paper' task weights t/(T-t) are infinite at t = T; pass a finite "
                             f"clamp > 0, e.g. clamp=1.0")
        t = torch.arange(1, T + 1, dtype=torch.float64)
        return torch.where(t < T, t / (T - t).clamp(min=1), torch.full_like(t, float("inf"))).clamp(max=clamp)
    if kind == "constant":
        return torch.full((T,), float(value), dtype=torch.float64)
    if kind == "zero":
        return torch.zeros(T, dtype=torch.float64)  # no task injection: plain DDPM
    raise ValueError(f"unknown task weight schedule '{kind}'; choose 'paper', 'constant' or 'zero'")


def aggregation_coefficients(alphas, w):
    """atilde[t-1] = atilde_t from alphas[t-1] = alpha_t and task weights w[t-1] = w_t shaped [T] or [T, M] (Eq. 4)."""
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64, device=alphas.device)
    if alphas.dim() != 1:
        raise ValueError(f"alphas must be 1-D [T], got shape {tuple(alphas.shape)}")
    if w.dim() not in (1, 2) or w.shape[0] != alphas.shape[0]:
        raise ValueError(f"w must be shaped [T] or [T, M] with T = {alphas.shape[0]}, got {tuple(w.shape)}")
    atilde, prev = torch.empty_like(w), torch.zeros_like(w[0])  # atilde_0 = 0
    for i in range(alphas.shape[0]):  # i = t - 1
        # Eq. (4) as derived in the appendix (Theorem 2's sqrt(abar_t) is a typo; SPEC):
        # atilde_t = sqrt(alpha_t) (w_t + atilde_{t-1})  <=>  atilde_t = sum_{s<=t} w_s prod_{r=s..t} sqrt(alpha_r)
        prev = atilde[i] = alphas[i].sqrt() * (w[i] + prev)
    return atilde


class MTSchedule:
    """Float64 tables of the forward process, indexed by 0-based t (index i <-> paper t = i + 1)."""

    def __init__(self, betas, w):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D array with 0 < beta < 1; use common.diffusion.get_beta_schedule")
        w = torch.as_tensor(w, dtype=torch.float64)
        self.w = w[:, None] if w.dim() == 1 else w  # (T, M); one column = one weight shared by every modality
        self.num_timesteps, self.betas, self.alphas = betas.shape[0], betas, 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # abar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.atilde = aggregation_coefficients(self.alphas, self.w)  # (T, M), Eq. (4)
        self.atilde_prev = torch.cat([torch.zeros_like(self.w[:1]), self.atilde[:-1]])  # atilde_0 = 0
        # Eq. (5): beta_tilde_t = (1 - alpha_t)(1 - abar_{t-1}) / (1 - abar_t); zero at t = 1
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def to(self, device):
        """Move every table to device once (no host-to-device copy per sampling step)."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self


def _extract(table, t, like):
    """table[t] for 0-based indices t (B,), cast to like's dtype and shaped (B, 1, ..., 1) to broadcast (ADM style)."""
    return table.to(t.device)[t].to(like.dtype).reshape(t.shape[0], *([1] * (like.dim() - 1)))


def _aggregate(table, t, encodings, like):
    """sum_i table[t, i] * E_i for a (T, M) table (w, atilde, ...); zero when there are no encodings."""
    encodings, columns = list(encodings), table.shape[1]
    if encodings and columns != 1 and len(encodings) != columns:
        raise ValueError(f"got {len(encodings)} encodings but the task weights have {columns} columns; pass one "
                         f"encoding per modality or a [T] weight shared by all")
    total = torch.zeros_like(like)
    for i, encoding in enumerate(encodings):
        if encoding.shape != like.shape:
            raise ValueError(f"encoding {i} has shape {tuple(encoding.shape)}, expected {tuple(like.shape)} (E_i(x_i) "
                             f"must live in the diffusion space of z)")
        total = total + _extract(table[:, i if columns > 1 else 0], t, like) * encoding
    return total


def q_mean_variance(sched, z0, encodings, t):
    """Mean and variance of q(z_t | z_0, X), Eq. (4): N(sqrt(abar_t) z_0 + sum_i atilde_t^(i) E_i, (1 - abar_t) I)."""
    mean = _extract(sched.alphas_cumprod.sqrt(), t, z0) * z0 + _aggregate(sched.atilde, t, encodings, z0)
    return mean, _extract(1.0 - sched.alphas_cumprod, t, z0).expand_as(z0)


def q_sample(sched, z0, encodings, t, noise=None):
    """z_t = sqrt(abar_t) z_0 + sum_i atilde_t^(i) E_i + sqrt(1 - abar_t) eps, Eq. (4); t is the 0-based index (B,)."""
    noise = torch.randn_like(z0) if noise is None else noise
    mean, variance = q_mean_variance(sched, z0, encodings, t)
    return mean + variance.sqrt() * noise


def forward_step(sched, z_prev, encodings, t, noise=None):
    """One step z_{t-1} -> z_t of Eq. (3), SPEC form: N(sqrt(alpha_t)(z_{t-1} + sum_i w_t^(i) E_i), (1 - alpha_t) I)."""
    noise = torch.randn_like(z_prev) if noise is None else noise
    mean = _extract(sched.alphas.sqrt(), t, z_prev) * (z_prev + _aggregate(sched.w, t, encodings, z_prev))
    return mean + _extract((1.0 - sched.alphas).sqrt(), t, z_prev) * noise


def respace(sched, num_steps):
    """(chain, kept): the Markov chain of sched observed at num_steps kept 0-based timesteps (ADM's respacing
    extended to Eq. 3/4), and the kept indices. Keeping w_t at the kept steps (as DDPM keeps beta_t) would be wrong:
    the skipped steps inject task data too. Composing Eq. (3) from k_{i-1} to k_i gives one step of the same form,
      z_{k_i} = sqrt(alpha'_i) (z_{k_{i-1}} + w'_i E) + sqrt(1 - alpha'_i) eps,  alpha'_i = abar_{k_i} / abar_{k_{i-1}},
      w'_i = atilde_{k_i} / sqrt(alpha'_i) - atilde_{k_{i-1}}   (Eq. 4 recursion solved for w),
    so the new chain has abar' = abar[kept] and atilde' = atilde[kept], and Eq. (5) holds on it unchanged."""
    kept = sorted(space_timesteps(sched.num_timesteps, str(num_steps)))
    if kept[-1] != sched.num_timesteps - 1:  # the prior (prior_sample) is the marginal at T only
        raise ValueError(f"respacing to {num_steps} steps drops t = T; use at least 2 sampling steps")
    kept = torch.tensor(kept, device=sched.betas.device)
    abar, atilde = sched.alphas_cumprod[kept], sched.atilde[kept]
    alphas = abar / torch.cat([abar.new_ones(1), abar[:-1]])
    w = atilde / alphas.sqrt()[:, None] - torch.cat([torch.zeros_like(atilde[:1]), atilde[:-1]])
    return MTSchedule(1.0 - alphas, w).to(sched.betas.device), kept


def task_weights(kind, betas, clamp=1.0, value=1.0, atilde_max=1.0):
    """w_t of Eq. (3) for --task-weight: 'paper' is exactly App. E's clamped t/(T-t); 'paper-rescaled' is that shape
    times the one factor that makes max_t atilde_t = atilde_max (atilde is linear in w); 'constant' / 'zero'."""
    # The raw paper weights make z_t ~99% injected signal mid-chain (atilde ~150-270 vs. noise std <= 1), so the eps
    # target is a small part of the input (in bf16 the resolution of a value ~270 is ~1, the size of the noise).
    # The rescaled schedule (factor 3.7e-3 for cosine, T = 1000, atilde_max = 1) keeps t / (T - t) and puts
    # atilde_t E in O(1). README: what each does to training.
    if kind == "paper-rescaled":
        w = task_weight_schedule("paper", len(betas), clamp=clamp)
        return w * (atilde_max / aggregation_coefficients(1.0 - torch.as_tensor(betas), w).max())
    return task_weight_schedule(kind, len(betas), clamp=clamp, value=value)


#################################################################################
#                  2. Reverse process: Eq. (5), Algorithm 1                     #
#################################################################################

def q_posterior(sched, z0, z_t, encodings, t):
    """Mean and variance of q(z_{t-1} | z_t, z_0, X) (x0-form of Eq. 5), by Gaussian conditioning."""
    # Prior z_{t-1} ~ N(m, (1 - abar_{t-1}) I), m = sqrt(abar_{t-1}) z_0 + atilde_{t-1} E (Eq. 4); likelihood
    # z_t | z_{t-1} ~ N(sqrt(alpha_t)(z_{t-1} + w_t E), (1 - alpha_t) I) (Eq. 3). Precisions add to
    # (1 - abar_t) / ((1 - alpha_t)(1 - abar_{t-1})), so var = beta_tilde_t and
    #   mean = [sqrt(abar_{t-1})(1 - alpha_t) z_0 + sqrt(alpha_t)(1 - abar_{t-1}) z_t
    #           + sum_i ((1 - alpha_t) atilde_{t-1}^(i) - alpha_t (1 - abar_{t-1}) w_t^(i)) E_i] / (1 - abar_t).
    # With atilde_{t-1} = atilde_t / sqrt(alpha_t) - w_t the E coefficient is Eq. (5)'s; Eq. (5)'s z_t coefficient
    # sqrt(abar_t)(1 - abar_{t-1}) is a typo for sqrt(alpha_t)(1 - abar_{t-1}). E = 0 gives DDPM's posterior.
    alpha, abar, abar_prev = sched.alphas, sched.alphas_cumprod, sched.alphas_cumprod_prev
    coef_z0 = abar_prev.sqrt() * (1.0 - alpha) / (1.0 - abar)
    coef_zt = alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar)
    coef_e = ((1.0 - alpha)[:, None] * sched.atilde_prev
              - (alpha * (1.0 - abar_prev))[:, None] * sched.w) / (1.0 - abar)[:, None]
    mean = _extract(coef_z0, t, z0) * z0 + _extract(coef_zt, t, z_t) * z_t + _aggregate(coef_e, t, encodings, z_t)
    return mean, _extract(sched.posterior_variance, t, z_t).expand_as(z_t)


def predict_z0_from_eps(sched, z_t, eps, encodings, t):
    """z_0 = (z_t - sum_i atilde_t^(i) E_i - sqrt(1 - abar_t) eps) / sqrt(abar_t): Eq. (4) solved for z_0 (Eq. 10)."""
    noise_part = _extract((1.0 - sched.alphas_cumprod).sqrt(), t, z_t) * eps
    residual = z_t - _aggregate(sched.atilde, t, encodings, z_t) - noise_part
    return residual / _extract(sched.alphas_cumprod.sqrt(), t, z_t)


def posterior_mean_variance(sched, z_t, eps, encodings, t):
    """Eps-form of Eq. (5): mean (z_t - (1 - alpha_t)/sqrt(1 - abar_t) eps) / sqrt(alpha_t) - sum_i w_t^(i) E_i,
    variance beta_tilde_t."""
    alpha, abar = sched.alphas, sched.alphas_cumprod
    mean = (z_t - _extract((1.0 - alpha) / (1.0 - abar).sqrt(), t, z_t) * eps) / _extract(alpha.sqrt(), t, z_t)
    mean = mean - _aggregate(sched.w, t, encodings, z_t)
    return mean, _extract(sched.posterior_variance, t, z_t).expand_as(z_t)


def reverse_step(sched, z_t, eps, encodings, t, noise=None, clip_denoised=False):
    """Algorithm 1 line 12: z_{t-1} = mu(z_t, eps) + sqrt(beta_tilde_t) * noise, no noise at the last step (t = 1).
    clip_denoised: ADM's clip_denoised, mu from the x0-form of Eq. (5) with z_0 = Eq. (10) clamped to [-1, 1]."""
    # The paper writes "+ beta_tilde_t eps" and (1 - alpha_t)/sqrt(1 - alpha_t); SPEC: the std is sqrt(beta_tilde_t)
    # and the eps coefficient is (1 - alpha_t)/sqrt(1 - abar_t), as in Eq. (5). Both forms agree unless the clamp
    # acts; without it the 1/sqrt(alpha'_t) of a respaced cosine chain's last steps (alpha' ~ 0.03) amplifies the
    # eps error of an undertrained model into colour noise (measured: masked-region PSNR 4.9 dB vs 16.9 dB clamped).
    if clip_denoised:
        z0 = predict_z0_from_eps(sched, z_t, eps, encodings, t).clamp(-1, 1)
        mean, variance = q_posterior(sched, z0, z_t, encodings, t)
    else:
        mean, variance = posterior_mean_variance(sched, z_t, eps, encodings, t)
    noise = torch.randn_like(z_t) if noise is None else noise
    not_last = (t != 0).to(z_t.dtype).reshape(t.shape[0], *([1] * (z_t.dim() - 1)))  # Algorithm 1 line 6
    return mean + not_last * variance.sqrt() * noise


def prior_sample(sched, encodings, shape, generator=None, device=None, dtype=None):
    """z_T ~ N(atilde_T E(X), (1 - abar_T) I), the forward marginal at T (SPEC; N(0, I) only when E(X) = 0)."""
    # Algorithm 1 line 1 starts from N(0, I), which mismatches Eq. (4) at T whenever E(X) != 0. sqrt(abar_T) z_0 is
    # dropped: z_0 is unknown and abar_T ~ 4e-5 (linear, T = 1000), as in DDPM.
    encodings = list(encodings)
    if encodings:
        device, dtype = device or encodings[0].device, dtype or encodings[0].dtype
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype or torch.get_default_dtype())
    t_last = torch.full((shape[0],), sched.num_timesteps - 1, dtype=torch.long, device=noise.device)
    mean, variance = q_mean_variance(sched, torch.zeros_like(noise), encodings, t_last)
    return mean + variance.sqrt() * noise


def sample_loop(sched, eps_fn, encodings, shape, generator=None, known=None, clip_denoised=False, start=None):
    """Algorithm 1: ancestral sampling z_T -> z_0 with eps_fn(z_t, t_index) -> eps_hat; returns z_0.

    eps_fn may instead return (eps_hat, new_encodings) to re-estimate E(X) from the task heads (Algorithm 1 lines
    7-10); the step itself uses the encodings from before the update, the next step the new ones.
    known = (mask, z0_known), constrained restoration (Sec. 4.1, mask 1 where z0 is known): the paper gives no
    mechanism (App. E.2 only says the -X model learns to keep the unmasked region), so we replace the known region
    of z_{t-1} after every step but the last by a fresh sample of its forward marginal q(z_{t-1} | z0_known, X)
    (Eq. 4), as in RePaint's replacement. The returned z_0 is the model's own last step everywhere: how well it
    matches z0_known is the model's consistency, and the caller pastes the known region back (restore).
    start = (z, i): begin at chain index i from z instead of the prior (SDEdit).
    """
    encodings, (mask, z0_known) = list(encodings), known or (None, None)
    if known is not None and tuple(z0_known.shape) != tuple(shape):
        raise ValueError(f"known z0 has shape {tuple(z0_known.shape)}, expected the sample shape {tuple(shape)}")
    if known is not None and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("known mask must hold only 0 (generate) and 1 (keep); threshold it first")
    mask = mask.bool() if known is not None else None
    like = z0_known if known is not None else (encodings[0] if encodings else torch.empty(0))
    z = prior_sample(sched, encodings, shape, generator, like.device, like.dtype) if start is None else start[0]
    randn = lambda: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)

    def keep_known(z, index):  # the known region at 0-based `index`: its forward marginal (none after the last step)
        if known is None or index < 0:
            return z
        level = torch.full((shape[0],), index, dtype=torch.long, device=z.device)
        return torch.where(mask, q_sample(sched, z0_known, encodings, level, randn()), z)

    first = sched.num_timesteps - 1 if start is None else start[1]
    z = keep_known(z, first)
    for i in range(first, -1, -1):
        t = torch.full((shape[0],), i, dtype=torch.long, device=z.device)
        out = eps_fn(z, t)
        eps, new_encodings = out if isinstance(out, tuple) else (out, None)
        z = keep_known(reverse_step(sched, z, eps, encodings, t, randn(), clip_denoised), i - 1)
        encodings = list(new_encodings) if new_encodings is not None else encodings
    return z


#################################################################################
#            3. Encoders E_i: stop-gradient maps into the diffusion space       #
#################################################################################

@torch.no_grad()
def unet_label_encoder(unet, y, shape):
    """Fig. 3 choice 3 / App. E.3: E(y) = the shared U-Net's output for a zero image at t = 0 with y through the
    class embedding (our ADM U-Net has no cross-attention). no_grad = Fig. 3's stop-gradient; eval mode so that E
    is a deterministic function of y (no dropout)."""
    was_training = unet.training
    zeros = torch.zeros(shape[0], unet.in_channels, *shape[2:], device=y.device)
    out = unet.eval()(zeros, torch.zeros_like(y), y)[:, :shape[1]].float()
    unet.train(was_training)
    return out


def to_diffusion_space(images, vae):
    """Pixels in [-1, 1] -> diffusion space: identity (Fig. 3 choice 1), or with --latent 0.18215 * the frozen
    SD-VAE posterior mean (App. E.1 uses LDM's kl-f8 encoder as E; no_grad inside)."""
    return images if vae is None else vae.encode_to_latent(images)


def to_pixels(z, vae):
    return z.clamp(-1, 1) if vae is None else vae.decode_from_latent(z)


#################################################################################
#            4. Reverse model: shared ADM U-Net + modality heads D_i            #
#################################################################################

# ADM-T: not in the paper, a U-Net that trains in minutes on a CPU (the no-argument demo).
UNET_CONFIGS = {"ADM-S": ADM_SMALL, "ADM-T": dict(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4,),
                                                  num_res_blocks=1, num_head_channels=32)}
# guided-diffusion create_classifier's channel_mult by image size (the -E head); (1, 2, 2) below 64 px (ours)
CLASSIFIER_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


def create_unet(name, image_size, channels, in_channels, num_classes=None):
    """eps_theta: "ADM" = guided-diffusion's config for the resolution (at 64 px exactly App. E.2's 192 channels and
    3 res blocks), ADM-S or ADM-T. Eq. (6) has no vb term, so learn_sigma = False (App. E.1)."""
    if name == "ADM" and image_size not in ADM_CONFIGS:
        fail(f"--model ADM has configs for sizes {sorted(ADM_CONFIGS)} (latent side with --latent); use ADM-S/ADM-T")
    cfg = ADM_CONFIGS[image_size] if name == "ADM" else UNET_CONFIGS[name]
    return UNetModel(image_size=image_size, in_channels=in_channels, out_channels=channels,
                     dropout=0.1 if name == "ADM" else 0.0, num_classes=num_classes, use_scale_shift_norm=True,
                     resblock_updown=True, use_new_attention_order=True, **cfg)


class MTDiffusionModel(nn.Module):
    """eps_theta(z_t, t) (-U) or eps_theta(z_t, X, t) (-X: E(X) as extra input channels) plus one modality head
    D_1 reading the "penultimate" features, the pooled "middle" block or the U-Net "output" (Sec. 2.2.3, Fig. 3)."""

    def __init__(self, unet, head, head_input, variant):
        super().__init__()
        self.unet, self.head, self.head_input, self.variant = unet, head, head_input, variant

    def forward(self, z_t, t, encodings):
        x = torch.cat([z_t, *encodings], dim=1) if self.variant == "X" else z_t
        # image-label: the U-Net is class-conditional only to encode labels (unet_label_encoder); eps always gets
        # the extra null row, so the label rows get no gradient and stay a fixed random part of the encoder
        y = None if self.unet.num_classes is None else torch.full_like(t, self.unet.num_classes - 1)
        out, features = self.unet(x, t, y, return_features=True)
        if self.head_input == "output":
            return out, self.head(out, t)  # -E: the classifier reads the U-Net output at the same t
        if self.head_input == "middle":
            return out, self.head(features["middle"].mean(dim=(2, 3)))  # global average pool of the middle block
        return out, self.head(features["penultimate"])


def create_mt_model(args, channels, size, num_classes, embed_dim):
    """Shared U-Net + the head D_1 of --setting (Sec. 4, App. E.1-E.4)."""
    labels = args.setting == "image-label"
    in_channels = channels * (2 if args.variant == "X" else 1)
    unet = create_unet(args.model, size, channels, in_channels, num_classes + 1 if labels else None)
    if args.setting in IMAGE_SETTINGS:  # App. E.1/E.2: a replica of the output block (GroupNorm, SiLU, conv)
        return MTDiffusionModel(unet, copy.deepcopy(unet.out), "penultimate", args.variant)
    middle = unet.middle_block[-1].out_channels
    if labels and args.label_head == "M":  # App. E.3 -M: one fully connected layer on the middle block
        return MTDiffusionModel(unet, nn.Linear(middle, num_classes), "middle", args.variant)
    if labels:  # App. E.3 -E: guided-diffusion's classifier on the U-Net output with the appendix's flags
        depth, width = (4, 128) if args.model == "ADM" else (1, 32)
        attention_ds = tuple(size // r for r in (32, 16, 8) if r <= size)  # attention at 32/16/8 px
        head = EncoderUNetModel(size, channels, width, num_classes, depth, attention_ds, pool="attention",
                                channel_mult=CLASSIFIER_MULT.get(size, (1, 2, 2)), num_head_channels=min(64, width),
                                use_scale_shift_norm=True, resblock_updown=True)
        return MTDiffusionModel(unet, head, "output", args.variant)
    # App. E.4: a two-layer MLP 1024-ReLU-1024 on the middle block (last layer sized to the given embedding)
    head = nn.Sequential(nn.Linear(middle, 1024), nn.ReLU(), nn.Linear(1024, embed_dim))
    return MTDiffusionModel(unet, head, "middle", args.variant)


#################################################################################
#               5. Loss, Eq. (6), and training loop, Algorithm 2                #
#################################################################################

def training_losses(model, sched, z0, encodings, target, t, decoder_loss, decoder_weight=0.1, noise=None):
    """Per-sample terms of Eq. (6): eps-MSE on z_t ~ q(z_t | z_0, X) + lambda * the decoder loss (lambda = 0.1)."""
    noise = torch.randn_like(z0) if noise is None else noise
    z_t = q_sample(sched, z0, encodings, t, noise)  # Algorithm 2 line 6, Eq. (4)
    eps, pred = model(z_t, t, encodings)  # line 8
    mse = mean_flat((eps.float() - noise) ** 2)
    if decoder_loss == "ce":  # KL(one-hot q(x_i) || p_theta(x_i | z_t)) = cross-entropy
        decoder = F.cross_entropy(pred.float(), target, reduction="none")
    else:  # Gaussian p_theta(x_i | z_t): the KL is the MSE up to constants
        decoder = mean_flat((pred.float() - target) ** 2)
    return {"loss": mse + decoder_weight * decoder, "mse": mse, "decoder": decoder}


class Task:
    """One --setting: how a batch becomes z_0 and the modality x_1, its encoder E_1 and the decoder's target."""

    def __init__(self, args, num_classes, z_shape, device, vae=None, embeddings=None, eval_embeddings=None):
        self.setting, self.num_classes, self.z_shape, self.vae = args.setting, num_classes, z_shape, vae
        self.image_size = args.image_size
        self.decoder_loss = "ce" if args.setting == "image-label" else "mse"
        self.max_patches, self.patch_size = args.max_patches, patch_size(args.image_size, args.patch_size)
        self.embeddings, self.eval_embeddings = embeddings, eval_embeddings  # (N, D) on device, or None
        if args.setting == "image-representation":  # fixed N(0, 1) projections, part of E (seed 0 in every run)
            self.embed_dim = embeddings.shape[1] if embeddings is not None else args.embed_dim
            gen = torch.Generator().manual_seed(0)
            self.projection = torch.randn(self.embed_dim, math.prod(z_shape), generator=gen).to(device)
            self.demo_projection = torch.randn(num_classes + 6, self.embed_dim, generator=gen).to(device)

    def prepare(self, batch, device, flip=True, held_out=False):
        """(z_0, x_1) of a loader batch: flips on-device (pairs flipped together), masks drawn from torch's RNG;
        held_out: the batch is from the evaluation set (its --eval-embeddings rows)."""
        a, b, *index = (v.to(device, non_blocking=True) for v in batch)
        if flip and self.setting == "translation":
            a, b = random_hflip(torch.cat([a, b], dim=1)).split(a.shape[1], dim=1)  # one flip for both sides
        elif flip:
            a = random_hflip(a)
        if self.setting == "translation":  # (source, target): generate the target, the source is x_1
            return to_diffusion_space(b, self.vae), a
        z0 = to_diffusion_space(a, self.vae)
        if self.setting in ("masked-image", "restoration"):  # App. E.2: m ~ U{0..10} zeroed patches
            return z0, a * random_patch_mask(len(a), self.max_patches, a.shape[-1], self.patch_size, device=device)
        if self.setting == "image-label":
            return z0, b
        if self.embeddings is not None:
            return z0, (self.eval_embeddings if held_out else self.embeddings)[index[0]]
        # synthetic stand-in for a CLIP embedding: a fixed projection of [one-hot label, channel means and stds]
        stats = torch.cat([F.one_hot(b, self.num_classes).float(), a.mean((2, 3)), a.std((2, 3))], dim=1)
        return z0, stats @ self.demo_projection

    @torch.no_grad()
    def encode(self, x, unet):
        """E_1(x_1), Algorithm 2 line 4; never carries a gradient (Fig. 3's stop-gradient)."""
        shape = (x.shape[0], *self.z_shape)
        if self.setting == "image-label":
            return unet_label_encoder(unet, x, shape)
        if self.setting == "image-representation":
            # E(e) = P^T (e / |e|), entries ~N(0, 1): a parameter-free stand-in for App. E.4's cross-attention route
            return (F.normalize(x.float(), dim=1) @ self.projection).reshape(shape)
        return to_diffusion_space(x, self.vae)

    @property
    def clip_denoised(self):
        """Whether samplers clamp the predicted z_0 to [-1, 1]: for pixels, never for SD-VAE latents (~[-4, 4])."""
        return clips_predicted_x0(latent=self.vae is not None)

    def init_modality(self, n, generator, device):
        """Algorithm 1 line 3: a random label or embedding when x_1 is not given."""
        if self.setting == "image-label":
            return torch.randint(0, self.num_classes, (n,), generator=generator, device=device)
        return torch.randn(n, self.embed_dim, generator=generator, device=device)

    def from_head(self, pred):
        """Algorithm 1 line 10: x_1 re-estimated from the head output (argmax for labels)."""
        return pred.argmax(dim=1) if self.setting == "image-label" else pred.float()


def train(args):
    rank, world_size, device = init_distributed()
    run = TrainingRun(args, f"mt-{args.setting}-{args.variant}", rank, world_size)
    batch_size = run.batch_size
    dataset, eval_set, task, model, sched = build(args, device)
    ema = make_ema(model)
    opt = adamw(model.parameters(), lr=args.lr)

    step = resume_training(run, model, ema, opt)
    ddp = training_module(wrap_ddp(model, device, world_size), args)
    loader = infinite_loader(dataset, batch_size, rank, world_size, args.seed, step, args.num_workers, device)
    run.log(f"MT-Diffusion-{args.variant} {args.setting} ({args.model}, head {type(model.head).__name__} on "
            f"{model.head_input}): {sum(p.numel() for p in model.parameters()):,} parameters; {len(dataset):,} "
            f"items; task weights {args.task_weight} (max atilde {float(sched.atilde.max()):.3g}); world size "
            f"{world_size}, batch {batch_size}/rank; results in {run.dir}")
    show = next(iter(torch.utils.data.DataLoader(eval_set, batch_size=8)))

    running = torch.zeros(4, device=device)  # (loss, mse, decoder, count): summed on-device, synced when logging

    def metrics():
        total = all_reduce_mean(running)
        loss_avg, mse_avg, decoder_avg = (total[:3] / total[3]).tolist()
        running.zero_()
        return dict(loss=loss_avg, mse=mse_avg, decoder=decoder_avg)

    def state():
        return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict())

    def sample(path):
        sample_grid(args, ema, task, sched, show, path, run.log)

    model.train()
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    while step < args.steps:
        seed_step(args.seed, rank, step)  # this step's noise, timesteps, flips and masks depend on it alone
        z0, x = task.prepare(next(loader), device)  # Algorithm 2 line 2
        encodings = [task.encode(x, model.unet)]  # line 4, no gradient
        t = torch.randint(0, sched.num_timesteps, (z0.shape[0],), device=device)  # line 3
        with autocast(device, args.bf16):
            target = encodings[0] if args.setting in IMAGE_SETTINGS else x  # D_1 predicts E(x) for images
            terms = training_losses(ddp, sched, z0, encodings, target, t, task.decoder_loss, args.decoder_weight)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # line 9
        opt.step()
        update_ema(ema, model, args.ema_decay)
        running += torch.stack([loss.detach(), terms["mse"].detach().mean(), terms["decoder"].detach().mean(),
                                torch.ones((), device=device)])
        step += 1
        bar.update(1)
        if end_of_step(run, args, step, device, metrics, state, sample, sample_last=False):  # final_evaluation draws it
            break
    finish_training(run, model, bar)
    cleanup_distributed()
    if rank == 0 and step == args.steps:  # rank 0 alone, after the group is gone: long evaluations cannot time out
        final_evaluation(args, ema, task, sched, eval_set, show, run.dir, step, run.log)
    return run.dir


#################################################################################
#        6. Settings (Sec. 4, App. E): masks, data, Algorithm 1, evaluation     #
#################################################################################

SETTINGS = ("masked-image", "restoration", "image-label", "translation", "image-representation")
IMAGE_SETTINGS = ("masked-image", "restoration", "translation")  # x_1 is an image: identity / VAE encoder


class IndexedDataset(torch.utils.data.Dataset):
    """A dataset's items with their index appended, to look up each image's --embeddings row."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return (*self.dataset[idx], idx)


def task_dataset(args, data, seed=0):
    """(dataset, num_classes): (image, label) items, or (source, target) pairs for translation. seed picks the
    synthetic items: seed 1 is the held-out set of a run trained on seed 0."""
    if args.setting == "translation":
        if data == "synthetic":  # semantic colour map -> image
            return SyntheticPairs(10_000, args.image_size, seed, args.num_classes or 4, args.direction), 0
        return PairedImages(data, args.image_size, args.paired_layout, args.direction), 0
    if data == "synthetic":
        dataset = SyntheticShapes(10_000, args.image_size, seed, args.num_classes or 4)
        num_classes = dataset.num_classes
    else:
        dataset = ImageFolder(data, args.image_size)
        num_classes = len(dataset.classes)
    return (IndexedDataset(dataset) if args.embeddings else dataset), num_classes


def load_embeddings(path, num_items, device):
    """--embeddings: an (N, D) .npy array whose row i embeds dataset item i (App. E.4: CLIP image embeddings)."""
    if not os.path.isfile(path):
        fail(f"--embeddings '{path}' does not exist; pass an (N, D) .npy file with one row per dataset item")
    table = np.load(path)
    if table.ndim != 2 or table.shape[0] != num_items:
        fail(f"--embeddings '{path}' has shape {table.shape}; expected ({num_items}, D), one row per dataset item "
             f"in dataset order")
    return torch.from_numpy(table).float().to(device)


def build(args, device):
    """Data, task, reverse model and forward schedule of a run (shared by training and --eval-only)."""
    dataset, num_classes = task_dataset(args, args.data)
    vae = load_vae(args.vae, device) if args.latent else None  # frozen; one-line error without --vae
    # held out: synthetic items of another seed or --eval-data; with --embeddings only if --eval-embeddings gives
    # their rows, else the evaluation reads training items (and says so in the metric names)
    eval_set, embeddings, eval_embeddings = task_dataset(args, args.eval_data or args.data, seed=1)[0], None, None
    if args.embeddings:
        embeddings = load_embeddings(args.embeddings, len(dataset), device)
        eval_embeddings = load_embeddings(args.eval_embeddings, len(eval_set), device) if args.eval_embeddings \
            else embeddings
        eval_set = eval_set if args.eval_embeddings else dataset
    s = args.image_size
    z_shape = (4, s // 8, s // 8) if args.latent else (3, s, s)  # the image, or the SD-VAE latent
    task = Task(args, num_classes, z_shape, device, vae, embeddings, eval_embeddings)
    torch.manual_seed(args.seed)  # same initial weights on every rank and in every (re)run
    model = create_mt_model(args, z_shape[0], z_shape[1], num_classes, getattr(task, "embed_dim", 0)).to(device)
    betas = get_beta_schedule(args.noise_schedule)
    weights = task_weights(args.task_weight, betas, args.weight_clamp, args.weight_value, args.atilde_max)
    sched = MTSchedule(betas, weights).to(device)
    return dataset, eval_set, task, model, sched


@torch.no_grad()
def mt_sample(model, chain, encodings, shape, clip_denoised, generator=None, known=None, task=None, x=None,
              start=None):
    """Algorithm 1 on chain = respace(...); returns (z_0, x_1). clip_denoised: Task.clip_denoised (pixels yes,
    latents no). With task given, x_1 is not initially available: it starts at x (line 3) and is re-estimated from
    the head at every step (lines 7-10). known, start: as sample_loop."""
    sched, timestep_map = chain
    state = {"x": x, "encodings": list(encodings)}

    def eps_fn(z, i):
        eps, pred = model(z, timestep_map[i], state["encodings"])  # the model runs on the training timestep
        if task is None:
            return eps.float()
        state["x"] = task.from_head(pred)
        state["encodings"] = [task.encode(state["x"], model.unet)]
        return eps.float(), state["encodings"]

    z0 = sample_loop(sched, eps_fn, encodings, shape, generator, known, clip_denoised, start)
    return z0, state["x"]


@torch.no_grad()
def generate(model, task, chain, n, generator, sources=None):
    """(images in pixels, x_1) of Algorithm 1 for the setting: from a complete mask (masked settings, E(X) = 0,
    as Table 2's -X), translations of `sources`, or joint samples with x_1 from the head (x_1 None otherwise)."""
    device, shape = chain[0].betas.device, (n, *task.z_shape)
    if task.setting == "translation":
        encodings, joint = [task.encode(sources, model.unet)], None
    elif task.setting in ("masked-image", "restoration"):
        encodings, joint = [task.encode(torch.zeros(n, 3, task.image_size, task.image_size, device=device),
                                        model.unet)], None
    else:
        joint = task.init_modality(n, generator, device)
        encodings = [task.encode(joint, model.unet)]
    z0, x = mt_sample(model, chain, encodings, shape, task.clip_denoised, generator, task=task if joint is not None
                      else None, x=joint)
    return to_pixels(z0, task.vae), x


def restore(model, task, chain, images, keep, generator=None):
    """Constrained restoration (Sec. 4.1): z_0 given x_1 = images * keep, keeping the known region (sample_loop).
    Returns (restored, raw): raw is the model's decoded z_0, restored the same with the known pixels pasted back
    (with --latent a latent cell is known only when all its pixels are), so unmasked pixels are kept exactly."""
    encoding = task.encode(images * keep, model.unet)
    factor = images.shape[-1] // encoding.shape[-1]
    known = keep if factor == 1 else 1 - F.max_pool2d(1 - keep, factor)
    z0, _ = mt_sample(model, chain, [encoding], encoding.shape, task.clip_denoised, generator, known=(known, encoding))
    raw = to_pixels(z0, task.vae)
    return torch.where(keep.bool(), images, raw), raw


def sdedit_minus(model, task, chain, images, keep, generator=None, strength=0.5):
    """Table 1's SDEdit- baseline (Meng et al.; the paper gives no details, this is our reading): the masked image
    noised by the forward marginal to t0 = strength * T and denoised from there by the same model given a
    complete mask (E = 0, Table 2's unconditional use), with no known region and no paste-back."""
    sched, timestep_map = chain
    z0 = to_diffusion_space(images * keep, task.vae)
    blank = [torch.zeros_like(z0)]
    first = max(int((timestep_map <= strength * timestep_map[-1]).sum()) - 1, 0)  # chain index of t0
    level = torch.full((len(z0),), first, dtype=torch.long, device=z0.device)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    start = (q_sample(sched, z0, blank, level, noise), first)
    z, _ = mt_sample(model, chain, blank, z0.shape, task.clip_denoised, generator, start=start)
    return to_pixels(z, task.vae)


def restoration_metrics(restored, raw, original, keep):
    """Per image: PSNR and mean SSIM over the masked pixels (NaN without any), and the model's own consistency:
    the mean absolute error of raw (before paste-back) on the unmasked pixels (NaN without any)."""
    hole = (1 - keep).expand_as(original)
    ssim = (ssim_map(restored, original) * hole).sum(dim=(1, 2, 3)) / hole.sum(dim=(1, 2, 3))
    known_error = ((raw - original).abs() * (1 - hole)).sum(dim=(1, 2, 3)) / (1 - hole).sum(dim=(1, 2, 3))
    return psnr_db(restored, original, hole), ssim, known_error


@torch.no_grad()
def sample_grid(args, model, task, sched, show, path, log):
    """The setting's picture (fixed seed). Masked-image rows: original / masked / restored / generated from a
    complete mask; translation rows: source / target / generated; joint settings: images (labels in the log)."""
    device = sched.betas.device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    chain = respace(sched, args.num_sampling_steps)
    a, b = show[0].to(device), show[1].to(device)
    was_training = model.training
    model.eval()
    if task.setting in ("masked-image", "restoration"):
        keep = random_patch_mask(a.shape[0], args.max_patches, a.shape[-1], task.patch_size, gen, device=device)
        rows = [a, a * keep, restore(model, task, chain, a, keep, gen)[0], generate(model, task, chain, len(a), gen)[0]]
    elif task.setting == "translation":  # Algorithm 1 with the source known
        rows = [a, b, generate(model, task, chain, len(a), gen, sources=a)[0]]
    else:  # joint generation: x_1 starts random and follows the head
        images, x = generate(model, task, chain, len(a), gen)
        rows = [images]
        if task.setting == "image-label":
            log(f"joint samples: generated labels {x.tolist()}")
    save_image_grid(torch.cat(rows), path, nrow=a.shape[0])
    model.train(was_training)
    log(f"sample grid {path}")


def eval_batches(args, eval_set):
    subset = torch.utils.data.Subset(eval_set, range(min(args.eval_samples, len(eval_set))))
    return torch.utils.data.DataLoader(subset, batch_size=args.eval_batch_size)


@torch.no_grad()
def head_metrics(args, model, task, sched, eval_set):
    """D_1 on held-out items at the paper's t = 1 with x_1 unknown (E = 0; w_1 ~ 0, so z_1 barely depends on it):
    top-1 / top-5 label accuracy (Fig. 6; top-5 with more than 5 classes), or embedding MSE and cosine similarity."""
    device, C = sched.betas.device, task.num_classes
    totals = torch.zeros(3, device=device)
    for batch in eval_batches(args, eval_set):
        z0, x = task.prepare(batch, device, flip=False, held_out=True)
        t, zeros = torch.zeros(z0.shape[0], dtype=torch.long, device=device), torch.zeros_like(z0)
        _, pred = model(q_sample(sched, z0, [zeros], t), t, [zeros])
        if task.decoder_loss == "ce":
            top = pred.topk(min(5, C), dim=1).indices == x[:, None]
            totals[0], totals[1] = totals[0] + top[:, 0].sum(), totals[1] + top.any(dim=1).sum()
        else:
            totals[0] += mean_flat((pred - x) ** 2).sum()
            totals[1] += F.cosine_similarity(pred, x).sum()
        totals[2] += len(x)
    v = (totals[:2] / totals[2]).tolist()
    if task.decoder_loss == "ce":
        return {"label_top1": v[0], **({"label_top5": v[1]} if C > 5 else {})}
    suffix = "" if task.eval_embeddings is not task.embeddings or task.embeddings is None else "_train"
    return {f"embedding_mse{suffix}": v[0], f"embedding_cosine{suffix}": v[1]}


@torch.no_grad()
def restoration_table(args, model, task, sched, eval_set, lpips=None, judge=None):
    """Table 1 protocol on held-out images, per mask of --eval-restoration (exactly m patches, or "half", Fig. 10):
    PSNR / SSIM over the masked pixels and the model's consistency on the known ones before paste-back, for
    MT-Diffusion and the SDEdit- baseline; LPIPS of both and of the masked image to the original; with a judge
    (synthetic data) the class accuracy of the restored images."""
    device = sched.betas.device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    chain, rows = respace(sched, args.num_sampling_steps), []
    for m in args.eval_restoration:
        values, restored_all, labels = [], [], []
        for images, y, *_ in eval_batches(args, eval_set):
            images, n = images.to(device), len(images)
            keep = half_mask(n, images.shape[-1], gen, device) if m == "half" else random_patch_mask(
                n, m, images.shape[-1], task.patch_size, gen, torch.full((n,), m, device=device))
            restored, raw = restore(model, task, chain, images, keep, gen)
            edited = sdedit_minus(model, task, chain, images, keep, gen, args.sdedit_strength)
            per_image = [*restoration_metrics(restored, raw, images, keep), *restoration_metrics(edited, edited,
                                                                                                  images, keep)]
            if lpips is not None:
                per_image += [lpips(restored, images), lpips(images * keep, images), lpips(edited, images)]
            values.append(torch.stack(per_image, dim=1))
            restored_all.append(restored.cpu()), labels.append(y)
        v = torch.cat(values).nanmean(dim=0).tolist()
        row = dict(mask=f"m{m}" if m != "half" else m, psnr_masked=v[0], ssim_masked=v[1], known_error=v[2],
                   sdedit_psnr_masked=v[3], sdedit_ssim_masked=v[4], sdedit_known_error=v[5])
        if lpips is not None:
            row.update(lpips=v[6], lpips_clean_masked=v[7], lpips_sdedit=v[8])
        if judge is not None:
            row["judge_accuracy"] = classifier_accuracy(judge, torch.cat(restored_all), torch.cat(labels))
        rows.append(row)
    return rows


@torch.no_grad()
def translation_metrics(args, model, task, sched, eval_set, palette=None):
    """Held-out translations: PSNR to the target, and with a label palette (targets are colour-coded label maps,
    Table 4 after Zhu et al. 2017) per-pixel accuracy, per-class accuracy and class IoU of the translated maps,
    each pixel read as its nearest palette colour, pooled over the set."""
    device = sched.betas.device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    chain, psnr, meter = respace(sched, args.num_sampling_steps), [], None if palette is None else SegMeter(len(palette))
    for source, target, *_ in eval_batches(args, eval_set):
        source, target = source.to(device), target.to(device)
        out = generate(model, task, chain, len(source), gen, sources=source)[0]
        psnr.append(psnr_db(out, target))
        if meter is not None:
            meter.update(labels_from_colours(out, palette), labels_from_colours(target, palette))
    metrics = dict(psnr_translation=float(torch.cat(psnr).mean()))
    if meter is not None:
        metrics.update(pixel_accuracy=meter.pixel_accuracy(), class_accuracy=meter.class_accuracy(),
                       class_iou=meter.result() / 100)
    return metrics


@torch.no_grad()
def judge_metrics(args, model, task, sched, judge):
    """The shared judge (eval/shape_classifier.py) on --eval-samples generated images: FD-synthetic to held-out
    synthetic images, and for image-label the accuracy of the generated labels (the judge is independent)."""
    gen = torch.Generator(device=sched.betas.device).manual_seed(args.seed + 1)
    chain, images, labels = respace(sched, args.num_sampling_steps), [], []
    for start in range(0, args.eval_samples, args.eval_batch_size):
        x, y = generate(model, task, chain, min(args.eval_batch_size, args.eval_samples - start), gen)
        images.append(x.cpu()), labels.append(y.cpu() if task.setting == "image-label" else torch.zeros(len(x)))
    scores = judge_samples(judge, torch.cat(images), torch.cat(labels))
    return {"fd_synthetic": scores["fd_synthetic"],
            **({"generated_label_accuracy": scores["accuracy"]} if task.setting == "image-label" else {})}


def label_palette(args, eval_set):
    """Colours of the label classes when translation targets are label maps: synthetic --direction BtoA, or
    --label-palette (a (K, 3) uint8 .npy)."""
    if args.label_palette:
        return torch.from_numpy(np.load(args.label_palette)).float() / 127.5 - 1
    return getattr(eval_set, "palette", None) if args.direction == "BtoA" else None


def final_evaluation(args, model, task, sched, eval_set, show, out_dir, step, log):
    """After training (or --eval-only): the sample grid, then held-out metrics of the setting, the Table 1 protocol
    for the masked settings, and the shared judge's scores on synthetic data."""
    model.eval()
    device, metrics = sched.betas.device, {}
    path = os.path.join(out_dir, "samples", f"{step:07d}.png")
    sample_grid(args, model, task, sched, show, path, log)
    judge = None
    if args.data == "synthetic" and task.setting != "translation":  # the judge knows single-shape images only
        judge = load_or_train_classifier(task.num_classes, args.image_size, args.results_dir, device)
        metrics.update(judge_metrics(args, model, task, sched, judge))
    if task.setting in ("image-label", "image-representation"):
        metrics.update(head_metrics(args, model, task, sched, eval_set))
    if task.setting == "translation":
        metrics.update(translation_metrics(args, model, task, sched, eval_set, label_palette(args, eval_set)))
    if args.eval_restoration:
        lpips = None
        if args.lpips_weights:
            from eval.lpips import LPIPS
            lpips = LPIPS(args.lpips_net, args.lpips_backbone, args.lpips_weights).to(device)
        rows = restoration_table(args, model, task, sched, eval_set, lpips, judge)
        with open(os.path.join(out_dir, "restoration.csv"), "w") as f:
            f.write(",".join(rows[0]) + "\n" + "".join(",".join(v if isinstance(v, str) else f"{v:.6g}"
                                                                for v in r.values()) + "\n" for r in rows))
        for r in rows:
            log("restoration " + " ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.4g}" for k, v in r.items()))
            metrics.update({f"{k}_{r['mask']}": v for k, v in r.items() if k != "mask"})
    with open(os.path.join(out_dir, "eval.csv"), "w") as f:
        f.write("step,metric,value\n" + "".join(f"{step},{k},{v:.6g}\n" for k, v in metrics.items()))
    log(f"evaluation at step {step} on {min(args.eval_samples, len(eval_set))} held-out items, picture {path}: "
        + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def write_fid_samples(args, model, task, sched, eval_set, out_dir, rank, world_size):
    """Tables 2/3 and Table 4's FID/IS: --num-fid-samples generated images (translations of held-out sources) as
    an ADM .npz through common.sampling.write_samples_npz (sharded over ranks), for eval/fid.py; translation also
    writes the held-out targets it translated, as the reference batch."""
    device = sched.betas.device
    chain, position = respace(sched, args.num_sampling_steps), [rank]  # ranks take interleaved held-out items

    def items(n, column):
        idx = [(position[0] + world_size * k) % len(eval_set) for k in range(n)]
        return torch.stack([eval_set[i][column] for i in idx]).to(device)

    def draw(n, gen):
        sources = items(n, 0) if task.setting == "translation" else None
        position[0] += world_size * n
        return generate(model, task, chain, n, gen, sources=sources)[0]
    folder = os.path.join(out_dir, f"fid-samples-{args.num_sampling_steps}")
    paths = [write_samples_npz(draw, folder, args.num_fid_samples, args.eval_batch_size, device, rank, world_size,
                               args.seed, desc="fid samples")]
    if task.setting == "translation":
        position[0] = rank

        def targets(n, gen):
            out = items(n, 1)
            position[0] += world_size * n
            return out
        paths.append(write_samples_npz(targets, os.path.join(folder, "targets"), args.num_fid_samples,
                                       args.eval_batch_size, device, rank, world_size, args.seed, desc="targets"))
    return paths


def evaluate_checkpoint(args):
    """--eval-only: final_evaluation of --ckpt's EMA weights, into <run>/eval-<step>/ (model flags from the ckpt);
    with --num-fid-samples every rank also draws its share of the .npz first."""
    rank, world_size, device = init_distributed()
    ckpt = load_checkpoint(args.ckpt)
    run_args = argparse.Namespace(**ckpt["args"])
    for key in EVAL_FLAGS:  # how to evaluate comes from this command line, what was trained from the checkpoint
        setattr(run_args, key, getattr(args, key))
    _, eval_set, task, model, sched = build(run_args, device)
    load_model_state(model, ckpt["ema"], args.ckpt)
    model.eval()
    out_dir = os.path.join(run_dir_of(args.ckpt), f"eval-{ckpt['step']:07d}")
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    if args.num_fid_samples:
        paths = write_fid_samples(run_args, model, task, sched, eval_set, out_dir, rank, world_size)
        if rank == 0:
            print("wrote " + " ".join(paths))
    if rank == 0:
        show = next(iter(torch.utils.data.DataLoader(eval_set, batch_size=8)))
        final_evaluation(run_args, model, task, sched, eval_set, show, out_dir, ckpt["step"], print)
    cleanup_distributed()
    return out_dir


#################################################################################
#                                 7. main                                       #
#################################################################################

# The paper's runs (App. E: 8 GPUs, batch 64 unless stated; E.2/E.3 lr 7e-5, batch 80/75; E.1 lr 1e-4, batch 32;
# E.4 lr 1e-5, batch 2048; Table 2 compares at 1M iterations), and a CPU-sized demo on --data synthetic.
PAPER = dict(steps=1_000_000, global_batch_size=80, lr=7e-5, ema_decay=0.9999, num_workers=4, log_every=100,
             ckpt_every=50_000, sample_every=10_000)
PAPER_BY_SETTING = {"image-label": dict(global_batch_size=75), "translation": dict(global_batch_size=32, lr=1e-4),
                    "image-representation": dict(global_batch_size=2048, lr=1e-5)}
DEMO = dict(steps=1000, global_batch_size=16, lr=1e-3, ema_decay=0.995, num_workers=0, log_every=50,
            ckpt_every=500, sample_every=500)
EVAL_FLAGS = ("num_sampling_steps", "eval_restoration", "eval_samples", "eval_batch_size", "lpips_net",
              "lpips_backbone", "lpips_weights", "vae", "eval_data", "seed", "sdedit_strength", "label_palette",
              "eval_embeddings", "num_fid_samples")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setting", choices=SETTINGS, default="masked-image")
    p.add_argument("--variant", choices=["U", "X"], default=None, help="U: eps(z_t, t); X: eps(z_t, X, t), E(X) as "
                   "extra input channels (default X for the image settings, U otherwise)")
    p.add_argument("--label-head", choices=["M", "E"], default="M", help="image-label: M = linear layer on the "
                   "middle block, E = classifier on the U-Net output")
    p.add_argument("--model", choices=["ADM", "ADM-S", "ADM-T"], default=None, help="default ADM-T on synthetic")
    p.add_argument("--task-weight", choices=["paper", "paper-rescaled", "constant", "zero"], default=None,
                   help="w_t of Eq. (3): paper = App. E's t/(T-t) clamped at --weight-clamp (atilde up to ~150-270; "
                   "default of the paper runs), paper-rescaled = the same shape scaled to max atilde = --atilde-max "
                   "(default on synthetic), constant (--weight-value) or zero (plain DDPM)")
    p.add_argument("--weight-clamp", type=float, default=1.0, help="clamp of t/(T-t), which is infinite at t = T")
    p.add_argument("--weight-value", type=float, default=1.0, help="w_t of --task-weight constant")
    p.add_argument("--atilde-max", type=float, default=1.0, help="--task-weight paper-rescaled: max_t atilde_t")
    p.add_argument("--decoder-weight", type=float, default=0.1, help="lambda of Eq. (6)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"], default=None, help="default cosine (App. "
                   "E.2/E.3), linear for translation (E.1)")
    p.add_argument("--data", default="synthetic", help="'synthetic', a class-folder tree, or image pairs (translation)")
    p.add_argument("--eval-data", default=None, help="held-out data (default: other synthetic items, or --data)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 32 synthetic, 64 otherwise)")
    p.add_argument("--num-classes", type=int, default=None, help="synthetic set only (default 4)")
    p.add_argument("--paired-layout", choices=LAYOUTS, default="side-by-side")
    p.add_argument("--direction", choices=DIRECTIONS, default="AtoB")
    p.add_argument("--latent", action="store_true", help="diffuse SD-VAE latents (E = the VAE encoder); needs --vae")
    p.add_argument("--vae", default=None, help="SD-VAE weights file")
    p.add_argument("--embeddings", default=None, help="image-representation: (N, D) .npy, row i embeds item i")
    p.add_argument("--embed-dim", type=int, default=32, help="size of the synthetic demo embedding")
    p.add_argument("--max-patches", type=int, default=10, help="training masks: m ~ U{0..max} patches (App. E.2)")
    p.add_argument("--patch-size", type=int, default=None, help="default image size / 4 (16 px at 64 px)")
    p.add_argument("--num-sampling-steps", type=int, default=None, help="default 1000 (App. C); 100 on synthetic")
    p.add_argument("--eval-restoration", default=None, help="Table 1: comma-separated patch counts and/or 'half' "
                   "(Fig. 10); default 5,10,15,20,half for restoration, 10,half for masked-image")
    p.add_argument("--sdedit-strength", type=float, default=0.5, help="SDEdit- baseline: noise level t0 / T")
    p.add_argument("--label-palette", default=None, help="translation: (K, 3) uint8 .npy of the target label "
                   "colours, for Table 4's label metrics (synthetic --direction BtoA has its own)")
    p.add_argument("--eval-embeddings", default=None, help="image-representation: (N, D) .npy rows of --eval-data")
    p.add_argument("--num-fid-samples", type=int, default=0, help="--eval-only: also write this many samples as an "
                   "ADM .npz for eval/fid.py (Tables 2/3: 5K/50K; torchrun shards them)")
    p.add_argument("--eval-samples", type=int, default=None, help="held-out items evaluated (1000; 64 synthetic)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    p.add_argument("--lpips-backbone", default=None, help="torchvision alexnet / vgg16 .pth (LPIPS)")
    p.add_argument("--lpips-weights", default=None, help="lpips v0.1 lin weights .pth (LPIPS)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --ckpt (EMA weights) instead of training")
    p.add_argument("--ckpt", default=None)
    add_run_args(p)
    args = p.parse_args(argv)
    synthetic = args.data == "synthetic"
    masked = args.setting in ("masked-image", "restoration")
    fill_defaults(args, DEMO if synthetic else {**PAPER, **PAPER_BY_SETTING.get(args.setting, {})})
    args.task_weight = args.task_weight or ("paper-rescaled" if synthetic else "paper")
    args.variant = args.variant or ("X" if args.setting in IMAGE_SETTINGS else "U")
    args.model = args.model or ("ADM-T" if synthetic else "ADM")
    args.image_size = args.image_size or (32 if synthetic else 64)
    args.noise_schedule = args.noise_schedule or ("linear" if args.setting == "translation" else "cosine")
    args.num_sampling_steps = args.num_sampling_steps or (100 if synthetic else 1000)
    args.eval_samples = args.eval_samples or (64 if synthetic else 1000)
    if args.eval_restoration is None and masked:
        args.eval_restoration = "5,10,15,20,half" if args.setting == "restoration" else "10,half"
    if args.eval_restoration and not masked:
        p.error("--eval-restoration needs --setting masked-image or restoration")
    try:
        args.eval_restoration = [m if m == "half" else int(m) for m in (args.eval_restoration or "").split(",") if m]
    except ValueError:
        p.error(f"--eval-restoration '{args.eval_restoration}' must be comma-separated patch counts or 'half', e.g. "
                f"5,10,15,20,half")
    if bool(args.lpips_weights) != bool(args.lpips_backbone):
        p.error("LPIPS needs both --lpips-backbone (torchvision .pth) and --lpips-weights (lpips v0.1 .pth)")
    if (args.embeddings or args.eval_embeddings) and args.setting != "image-representation":
        p.error("--embeddings and --eval-embeddings are for --setting image-representation")
    if args.eval_embeddings and not (args.embeddings and args.eval_data):
        p.error("--eval-embeddings needs --embeddings and --eval-data (its rows embed the --eval-data items)")
    if not 0 < args.sdedit_strength <= 1 or args.num_fid_samples < 0:
        p.error("--sdedit-strength must be in (0, 1] and --num-fid-samples >= 0")
    if args.latent and args.image_size % 8:
        p.error(f"--latent needs --image-size divisible by 8 (the VAE downsamples 8x), got {args.image_size}")
    if args.task_weight.startswith("paper") and not 0 < args.weight_clamp < float("inf"):
        p.error(f"--weight-clamp {args.weight_clamp}: t/(T-t) is infinite at t = T; pass a finite clamp > 0")
    if args.atilde_max <= 0 or args.max_patches < 0:
        p.error("--atilde-max must be > 0 and --max-patches >= 0")
    if not 2 <= args.num_sampling_steps <= 1000:
        p.error(f"--num-sampling-steps {args.num_sampling_steps}: pick 2..1000 (the respaced chain keeps t = T)")
    if args.eval_only and not args.ckpt:
        p.error("--eval-only needs --ckpt PATH")
    return args


def main(argv=None):
    args = parse_args(argv)
    return evaluate_checkpoint(args) if args.eval_only else train(args)


if __name__ == "__main__":
    main()
