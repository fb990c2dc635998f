"""DTR: Denoising Task Routing for Diffusion Models (Park et al., ICLR 2024).

Diffusion training is multi-task learning over the T denoising tasks (one per timestep). DTR gives every task its
own channel pathway through a single network: a fixed binary routing mask m_t activates a sliding window of
beta*C channels in each residual block, so that neighbouring timesteps share most channels (task affinity) and the
window drifts towards higher channels for noisier tasks (task weights, alpha). No parameters are added.

This file, in the paper's order: (1) routing masks and DTR blocks for DiT and ADM, (2) the loss with optional
Min-SNR / P2 / ANT-UW weighting, (3) the training loop (DiT train.py conventions), (4) the sampler with the ADM
`.npz` export, (5) main(). Paper equations that the text extraction lost are stated in SHARED SPEC and were checked
against byeongjun-park/DTR (`models/taskrouting.py`, `models/DiT/models.py`).

    python dtr.py                                                   # tiny DiT + DTR on the synthetic set, CPU
    torchrun --nproc_per_node=8 dtr.py --model DiT-L/2 --data <latent dir> --latent   # the paper's run
"""
import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ant_clustering import UncertaintyWeighting, cluster_losses, interval_index, stratified_timesteps, uniform_intervals
from common.builders import (MODEL_NAMES, cfg_label_dropout, create_dataset, create_model, load_vae,
                             prepare_batch, sample_to_npz, write_sample_grid)
from common.diffusion import create_diffusion, min_snr_weight, p2_weight
from common.dit import DiT
from common.train_utils import (TrainingRun, add_run_args, all_reduce_mean, autocast, cleanup_distributed, fail,
                                fill_defaults, infinite_loader, init_distributed, load_checkpoint, load_model_state,
                                make_ema, replicas_in_sync, seed_step, update_ema)
from common.unet import AttentionBlock, ResBlock

#################################################################################
#                      Routing masks (Sec. 4.2, Eq. 4)                          #
#################################################################################

def routing_mask(kind, num_channels, num_timesteps=1000, beta=0.8, alpha=4.0, seed=0):
    """Binary routing masks, row t = mask m_t of 0-indexed timestep t: FloatTensor[num_timesteps, num_channels].

    kind "dtr": a window of n = int(beta * C) active channels starting at round((t / (T-1))^alpha * (C - n))
    (Eq. 4 in the consistent form of the authors' code), so adjacent tasks share channels and high t uses the
    high-index end. "random": R-TR, n random channels per task (seeded, unlike upstream). "none": all ones.
    """
    C, T = num_channels, num_timesteps
    if kind == "none":
        return torch.ones(T, C)
    n = int(C * beta)
    if kind == "dtr":
        t = torch.arange(T, dtype=torch.float64)
        start = torch.round((t / (T - 1)) ** alpha * (C - n)).long()  # Eq. (4): task-weighted window position
        active = start[:, None] + torch.arange(n)[None, :]
    elif kind == "random":
        active = torch.rand(T, C, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)[:, :n]
    else:
        raise ValueError(f"unknown routing '{kind}'; choose dtr, random or none")
    return torch.zeros(T, C).scatter_(1, active, 1.0)


def save_mask_png(mask, path):
    """Render the (T, C) mask like the paper's Fig. 2: one row per timestep (t = 0 on top), white = active."""
    img = (mask.float().numpy() * 255).astype(np.uint8)
    Image.fromarray(img).save(path)


class DiTRouter(nn.Module):
    """DTR for a DiT block (App. A, Eq. 8): out = Block(m_t * x, c) + (1 - m_t) * x.

    Since Block(x) = x + Attn(x) + MLP(...), this equals x + F(m_t * x) (Eq. 7): the residual branch reads only
    the channels of task t, while its output may write to all channels (it is not re-masked, as upstream)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)  # rebuilt from (beta, alpha, seed): not in checkpoints

    def forward(self, block, x, c, t):
        m = self.mask[t.long()].unsqueeze(1).to(x.dtype)  # (B, 1, C), indexed by the original training timestep
        return block(m * x, c) + (1 - m) * x  # Eq. (8)


class ChannelRouter(nn.Module):
    """DTR for an ADM ResBlock / AttentionBlock: h <- m_t * GroupNorm(z) inside the residual branch, i.e.
    z + Block(m_t * ...) (Eq. 3). The paper (App. A.1) puts the mask right after the group norm so masked channels
    do not disturb the normalisation statistics; upstream has no ADM code, so this placement follows the text."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, h, t):
        m = self.mask[t.long()].to(h.dtype)
        return h * m.view(*m.shape, *([1] * (h.ndim - 2)))


def add_task_routing(model, kind="dtr", beta=0.8, alpha=4.0, seed=0, num_timesteps=1000):
    """Attach routers to a common/ DiT or U-Net through its hook points; 'none' leaves the model vanilla."""
    if kind == "none":
        return model
    if isinstance(model, DiT):
        model.router = DiTRouter(routing_mask(kind, model.x_embedder.proj.out_channels, num_timesteps, beta, alpha, seed))
        return model
    routers = {}  # one mask per channel width, shared by every block of that width
    for module in model.modules():
        if isinstance(module, (ResBlock, AttentionBlock)):
            width = (module.in_layers[0] if isinstance(module, ResBlock) else module.norm).num_channels
            if width not in routers:
                routers[width] = ChannelRouter(routing_mask(kind, width, num_timesteps, beta, alpha, seed))
            module.router = routers[width]
    return model


#################################################################################
#          Representation analysis (Sec. 5.3, Fig. 6): CKA across timesteps     #
#################################################################################

def centred_gram(X):
    """Gram matrix K = X X^T of the column-centred (n, d) features: n x n whatever the width d."""
    X = X - X.mean(0)
    return X @ X.T


def linear_cka(X, Y):
    """Linear CKA (Kornblith et al. 2019) of (n, d) features: <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F), K centred Grams.

    Equal to ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features, but costs n x n, not d x d."""
    Kx, Ky = centred_gram(X), centred_gram(Y)
    return (Kx * Ky).sum() / (Kx.norm() * Ky.norm())


@torch.no_grad()
def timestep_cka(model, diffusion, x0, y, timesteps):
    """CKA between each DiT block's outputs at every pair of timesteps (same x0, same noise): [blocks, T', T']."""
    grams = []  # per timestep: the centred Gram matrix of each block's output, in block order
    targets = [model.router] if model.router is not None else list(model.blocks)  # a router's outputs are its blocks'
    handles = [m.register_forward_hook(lambda mod, inp, out: grams[-1].append(centred_gram(out.flatten(1).double())))
               for m in targets]
    noise = torch.randn_like(x0)
    model.eval()
    for t in timesteps:
        grams.append([])
        tt = torch.full((len(x0),), int(t), device=x0.device, dtype=torch.long)
        model(diffusion.q_sample(x0, tt, noise), tt, y)
    for h in handles:
        h.remove()
    K = torch.stack([torch.stack(g) for g in grams], dim=1).flatten(2)  # (blocks, T', n*n)
    K = K / K.norm(dim=2, keepdim=True)
    return (K @ K.transpose(1, 2)).float().cpu()  # [b, i, j] = CKA of block b between timesteps i and j


def save_cka_png(cka, path, scale=8):
    """One heat-map per block side by side (t = 0 top-left; white = 1), like the paper's Fig. 6."""
    tiles = [(c.clamp(0, 1).numpy() * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1) for c in cka]
    gap = np.zeros((tiles[0].shape[0], 4), dtype=np.uint8)
    Image.fromarray(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)).save(path)


#################################################################################
#                 Loss: eps-MSE + vb, optional task weighting                   #
#################################################################################

def mse_weights(kind, diffusion, t, min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """Per-sample weight of the eps-MSE: Min-SNR-gamma or P2 (None for the plain / ANT-UW loss)."""
    if kind in ("none", "ant-uw"):
        return None
    snr_t = torch.as_tensor(diffusion.snr, device=t.device)[t].float()
    if kind == "min-snr":
        return min_snr_weight(snr_t, min_snr_gamma)
    if kind == "p2":
        return p2_weight(snr_t, p2_k, p2_gamma)
    raise ValueError(f"unknown loss weighting '{kind}'")


def training_loss(diffusion, model, x, y, t, args, uw=None, cluster_of=None):
    """Scalar loss of one batch: mean of (weighted mse + vb), or ANT-UW over k timestep clusters."""
    terms = diffusion.training_losses(model, x, t, dict(y=y), mse_weight=mse_weights(
        args.loss_weight, diffusion, t, args.min_snr_gamma, 1.0, args.p2_gamma))
    if uw is None:
        return terms["loss"].mean(), terms
    losses, present = cluster_losses(terms["loss"], cluster_of[t], len(uw.log_vars))
    return uw(losses, present), terms


#################################################################################
#                      Training loop (DiT train.py conventions)                 #
#################################################################################

def train(args):
    rank, world_size, device = init_distributed()
    if args.global_batch_size % world_size:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes")
    batch_size = args.global_batch_size // world_size
    run = TrainingRun(args, f"dtr-{args.model}-{args.routing}", rank, world_size)
    dataset, channels, size, num_classes = create_dataset(args.data, args.image_size, args.num_classes, args.latent)
    args.input_shape, args.num_classes = [channels, size, size], num_classes  # saved with the args: sampling needs no data

    torch.manual_seed(args.seed)  # same initial weights on every rank and in every (re)run
    model = create_model(args.model, size, channels, num_classes, learn_sigma=True)
    add_task_routing(model, args.routing, args.beta, args.alpha, args.mask_seed).to(device)
    ema = make_ema(model)
    diffusion = create_diffusion("", args.noise_schedule, learn_sigma=True)
    uw, cluster_of = None, None
    if args.loss_weight == "ant-uw":  # ANT-UW with timestep clusters, k = 8 (DTR paper, Sec. 5)
        intervals = uniform_intervals(diffusion.num_timesteps, args.ant_k)
        cluster_of = interval_index(intervals, diffusion.num_timesteps).to(device)
        uw = UncertaintyWeighting(args.ant_k).to(device)
    groups = [{"params": model.parameters()}] + ([uw.param_group(lr=args.uw_lr)] if uw else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0)

    step = 0
    ckpt = run.load()
    if ckpt is not None:
        load_model_state(model, ckpt["model"], run.resume_path)
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if uw is not None:
            uw.load_state_dict(ckpt["uw"])
        step = ckpt["step"]
    # masks are buffers that never change: no need to broadcast them on every forward
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              broadcast_buffers=False) if world_size > 1 else model
    loader = infinite_loader(dataset, batch_size, rank, world_size, args.seed, step, args.num_workers, device)
    routers = [m for m in model.modules() if isinstance(m, (DiTRouter, ChannelRouter))]
    if rank == 0 and routers:
        save_mask_png(routers[0].mask.cpu(), os.path.join(run.dir, "routing_mask.png"))
    run.log(f"{args.model} + routing={args.routing} (beta={args.beta}, alpha={args.alpha}): "
            f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(dataset):,} training items; "
            f"world size {world_size}, batch {batch_size}/rank; results in {run.dir}")
    sample_kw = dict(input_shape=(channels, size, size), num_classes=num_classes, device=device,
                     noise_schedule=args.noise_schedule, num_steps=args.num_sampling_steps, sampler=args.sampler,
                     cfg_scale=args.cfg_scale, cfg_channels=None if args.cfg_channels == "all" else 3,
                     vae=load_vae(args.vae, device) if args.latent and args.vae else None)

    model.train()
    running = torch.zeros(2, device=device)  # (sum of losses, count): summed on-device, synced only when logging
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    while step < args.steps:
        seed_step(args.seed, rank, step)  # this step's noise, timesteps, flips and label drops depend on it alone
        x, y = prepare_batch(next(loader), device, args.latent)
        y = cfg_label_dropout(model, y)
        if uw is not None and batch_size % args.ant_k == 0:
            t = stratified_timesteps(intervals, batch_size, None, device)  # every cluster in every batch (ANT)
        else:
            t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)
        with autocast(device, args.bf16):
            loss, _ = training_loss(diffusion, ddp, x, y, t, args, uw, cluster_of)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if uw is not None and world_size > 1:  # the log-variances live outside DDP: average their grads by hand
            for p in uw.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
        opt.step()
        update_ema(ema, model, args.ema_decay)
        running += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            total = all_reduce_mean(running)
            extra = {f"uw_weight_{i}": w for i, w in enumerate(uw.weights().tolist())} if uw is not None else {}
            run.log_metrics(step, images_seen=args.global_batch_size, loss=(total[0] / total[1]).item(), **extra)
            running.zero_()
        stop = run.should_stop(step, device)
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            run.save(step, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                     **({"uw": uw.state_dict()} if uw is not None else {}))
        if rank == 0 and (step % args.sample_every == 0 or step == args.steps):
            write_sample_grid(ema, os.path.join(run.sample_dir, f"{step:07d}.png"), **sample_kw)
            run.log(f"sample grid {os.path.join(run.sample_dir, f'{step:07d}.png')}")
        if stop:
            run.log(f"stop signal received: checkpoint at step {step} written, exiting")
            break
    bar.close()
    if world_size > 1:
        run.log(f"replicas in sync: {replicas_in_sync(model)}")
    cleanup_distributed()
    return run.dir


#################################################################################
#                 Sampler: DDPM-250 / DDIM with cfg, ADM .npz export            #
#################################################################################

def load_trained(ckpt_path, device):
    """(EMA model with its routing rebuilt, training args, checkpoint) from a dtr.py checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    targs = argparse.Namespace(**ckpt["args"])
    (channels, size, _), num_classes = targs.input_shape, targs.num_classes
    model = create_model(targs.model, size, channels, num_classes, learn_sigma=True)
    add_task_routing(model, targs.routing, targs.beta, targs.alpha, targs.mask_seed)
    load_model_state(model, ckpt["ema"], ckpt_path)
    return model.to(device).eval(), targs, ckpt


def sample(args):
    """DiT sample_ddp.py for a DTR checkpoint: EMA weights, routing rebuilt from the checkpoint's args."""
    rank, world_size, device = init_distributed()
    model, targs, ckpt = load_trained(args.ckpt, device)
    (channels, size, _), num_classes = targs.input_shape, targs.num_classes
    if targs.latent and not args.vae:
        fail("this checkpoint was trained on VAE latents; pass --vae PATH to the SD VAE weights to decode")
    vae = load_vae(args.vae, device) if targs.latent else None
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))),
                           f"samples-{ckpt['step']:07d}-{args.sampler}{args.num_sampling_steps}-cfg{args.cfg_scale}")
    path = sample_to_npz(model, out_dir, args.num_samples, args.sample_batch_size, (channels, size, size),
                         num_classes, device, rank, world_size, args.seed, noise_schedule=targs.noise_schedule,
                         num_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                         cfg_channels=None if args.cfg_channels == "all" else 3, vae=vae, progress=False)
    if rank == 0:
        print(f"wrote {path}")
    cleanup_distributed()
    return path


#################################################################################
#                                     main                                      #
#################################################################################

# Defaults: the paper's ImageNet-256 run (App. C) on real data; a CPU-sized demo on --data synthetic.
PAPER = dict(steps=400_000, global_batch_size=256, lr=1e-4, ema_decay=0.9999, num_workers=4, log_every=100,
             ckpt_every=50_000, sample_every=10_000)
DEMO = dict(steps=800, global_batch_size=32, lr=1e-3, ema_decay=0.995, num_workers=0, log_every=50,
            ckpt_every=400, sample_every=400)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="DiT-Ti/4", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--routing", choices=["dtr", "random", "none"], default="dtr")
    p.add_argument("--beta", type=float, default=0.8, help="fraction of active channels per task")
    p.add_argument("--alpha", type=float, default=4.0, help="window drift exponent (task weights)")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the random (R-TR) masks")
    p.add_argument("--loss-weight", choices=["none", "min-snr", "p2", "ant-uw"], default="none")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--p2-gamma", type=float, default=1.0)
    p.add_argument("--ant-k", type=int, default=8, help="timestep clusters for ANT-UW")
    p.add_argument("--uw-lr", type=float, default=0.025, help="lr of the ANT-UW log-variances")
    p.add_argument("--data", default="synthetic", help="'synthetic', an image folder, or a latent dir (--latent)")
    p.add_argument("--latent", action="store_true", help="--data holds VAE latents (data/extract_latents.py)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 32 synthetic, 256 folders)")
    p.add_argument("--num-classes", type=int, default=None, help="synthetic set only (default 4)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"], default="cosine",
                   help="paper: cosine (the authors' example script uses linear)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--num-sampling-steps", type=int, default=None, help="default 250 (paper); 50 on synthetic")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--cfg-channels", choices=["3", "all"], default="all",
                   help="guide all eps channels (DTR upstream) or the first 3 (a DiT leftover)")
    p.add_argument("--sample-only", action="store_true", help="sample --num-samples from --ckpt, write .npz")
    p.add_argument("--cka", action="store_true", help="write the Fig. 6 CKA heat-maps of --ckpt and exit")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--sample-batch-size", type=int, default=32)
    p.add_argument("--vae", default=None, help="SD VAE weights (latent checkpoints)")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.model not in MODEL_NAMES:
        p.error(f"unknown --model '{args.model}'; choose one of: {', '.join(MODEL_NAMES)}")
    synthetic = args.data == "synthetic"
    fill_defaults(args, DEMO if synthetic else PAPER)
    args.image_size = args.image_size or (32 if synthetic else 256)
    args.num_sampling_steps = args.num_sampling_steps or (50 if synthetic else 250)
    if (args.sample_only or args.cka) and not args.ckpt:
        p.error("--sample-only and --cka need --ckpt PATH")
    return args


def cka_analysis(args, num_images=64, num_timesteps=20):
    """Fig. 6 for a checkpoint: per-block CKA across timesteps on one batch of training data, as a PNG."""
    _, _, device = init_distributed()
    model, targs, ckpt = load_trained(args.ckpt, device)
    if not isinstance(model, DiT):
        fail("--cka analyses DiT blocks (as the paper's Fig. 6); this checkpoint is an ADM U-Net")
    dataset, *_ = create_dataset(targs.data, targs.image_size, targs.num_classes, targs.latent)
    batch = next(infinite_loader(dataset, min(num_images, len(dataset)), 0, 1, 0, 0))
    x, y = prepare_batch(batch, device, targs.latent, flip=False)
    timesteps = np.linspace(0, 999, num_timesteps).round().astype(int)
    cka = timestep_cka(model, create_diffusion("", targs.noise_schedule), x, y, timesteps)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))), f"cka-{ckpt['step']:07d}.png")
    save_cka_png(cka, path)
    print(f"wrote {path} ({cka.shape[0]} blocks x {num_timesteps} timesteps)")
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.cka:
        return cka_analysis(args)
    return sample(args) if args.sample_only else train(args)


if __name__ == "__main__":
    main()
