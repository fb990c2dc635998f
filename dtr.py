"""DTR: Denoising Task Routing for Diffusion Models (Park et al., ICLR 2024).

Diffusion training is multi-task learning over the T denoising tasks (one per timestep). DTR gives every task its
own channel pathway through a single network: a fixed binary routing mask m_t activates a sliding window of
beta*C channels in each residual block, so that neighbouring timesteps share most channels (task affinity) and the
window drifts towards higher channels for noisier tasks (task weights, alpha). No parameters are added.

This file, in the paper's order: (1) routing masks and DTR blocks for DiT and ADM, (2) the loss with optional
Min-SNR / P2 / ANT-UW weighting, (3) the training loop (DiT train.py conventions), (4) the sampler with the ADM
`.npz` export, (5) main(). Paper equations that the text extraction lost are stated in the project SPEC
(../shared/SPEC.md) and were checked against byeongjun-park/DTR (`models/taskrouting.py`, `models/DiT/models.py`).

    python dtr.py                 # demo: tiny DiTs, DTR vs vanilla on the synthetic set, judged (compare.csv), CPU
    torchrun --nproc_per_node=8 dtr.py --model DiT-L/2 --data <latent dir> --latent   # the paper's run
"""
import argparse
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from ant_clustering import ClusterLoss, UncertaintyWeighting, mse_weight, uniform_intervals
from common.checkpoint_formats import model_from_checkpoint
from common.class_conditional_cli import (add_model_data_args, add_sampling_args, finish_args, sample_grid_writer,
                                          sample_main, start_training)
from common.diffusion import create_diffusion
from common.dit import DiT
from common.named_models import create_model
from common.training_run import (add_run_args, all_reduce_mean, all_reduce_mean_, autocast, cleanup_distributed,
                                 end_of_step, fail, finish_training, infinite_loader, init_distributed, make_ema,
                                 one_line_errors, resume_training, run_dir_of, update_ema, wrap_ddp)
from common.training_run import adamw, sampling_module, training_module  # the fast path
from common.unet import AttentionBlock, ResBlock
from data.labelled_images import create_dataset, fixed_batch, training_batch
from eval.demo_comparison import add_compare_args, comparison_requested, run_comparison

#################################################################################
#                      Routing masks (Sec. 4.2, Eq. 4)                          #
#################################################################################

def routing_mask(kind, num_channels, num_timesteps=1000, beta=0.8, alpha=4.0, seed=0, block=None):
    """Binary routing masks, row t = mask m_t of 0-indexed timestep t: FloatTensor[num_timesteps, num_channels].

    kind "dtr": a window of n = int(beta * C) active channels starting at round((t / (T-1))^alpha * (C - n))
    (Eq. 4 in the consistent form of the authors' code), so adjacent tasks share channels and high t uses the
    high-index end. "random": R-TR, n random channels per task, drawn from (seed, block) (upstream draws unseeded,
    one mask per block). "none": all ones.
    """
    C, T = num_channels, num_timesteps
    if kind == "none":
        return torch.ones(T, C)
    n = int(C * beta)
    if kind == "dtr":
        # Eq. (4): the task-weighted window position. np.linspace and np.round (half to even), as the authors'
        # create_mask_tasks, so the masks equal the ones their checkpoints store bit for bit.
        start = torch.from_numpy((np.linspace(0, 1, T) ** alpha * (C - n)).round().astype(np.int64))
        active = start[:, None] + torch.arange(n)[None, :]
    elif kind == "random":
        block_seed = int(np.random.SeedSequence([seed] + ([] if block is None else [block])).generate_state(1)[0])
        active = torch.rand(T, C, generator=torch.Generator().manual_seed(block_seed)).argsort(dim=1)[:, :n]
    else:
        raise ValueError(f"unknown routing '{kind}'; choose dtr, random or none")
    return torch.zeros(T, C).scatter_(1, active, 1.0)


def save_mask_png(mask, path):
    """Render the (T, C) mask like the paper's Fig. 2: one row per timestep (t = 0 on top), white = active."""
    img = (mask.float().numpy() * 255).astype(np.uint8)
    Image.fromarray(img).save(path)


class DiTRouter(nn.Module):
    """DTR for the DiT blocks (App. A, Eq. 8): out = Block_i(m_t * x, c) + (1 - m_t) * x.

    Since Block(x) = x + Attn(x) + MLP(...), this equals x + F(m_t * x) (Eq. 7): the residual branch reads only
    the channels of task t, while its output may write to all channels (it is not re-masked, as upstream).
    masks: (T, C), one mask shared by every block (DTR), or (depth, T, C), one per block (R-TR, as upstream)."""

    def __init__(self, masks):
        super().__init__()
        # bool: a DiT-L R-TR set is 24 x 1000 x 1024; rebuilt from (beta, alpha, seed), so not in checkpoints
        self.register_buffer("masks", masks.bool(), persistent=False)

    def mask_of_block(self, index):
        """(T, C) float mask of block `index`."""
        return (self.masks if self.masks.ndim == 2 else self.masks[index]).float()

    def forward(self, block, x, c, t, index):
        masks = self.masks if self.masks.ndim == 2 else self.masks[index]
        m = masks[t.long()].unsqueeze(1).to(x.dtype)  # (B, 1, C), indexed by the original training timestep
        return block(m * x, c) + (1 - m) * x  # Eq. (8)


class ChannelRouter(nn.Module):
    """DTR for an ADM ResBlock / AttentionBlock: h <- m_t * GroupNorm(z) inside the residual branch, i.e.
    z + Block(m_t * ...) (Eq. 3). The paper (App. A.1) puts the mask right after the group norm so masked channels
    do not disturb the normalisation statistics; upstream has no ADM code, so this placement follows the text."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask.bool(), persistent=False)

    def forward(self, h, t):
        m = self.mask[t.long()].to(h.dtype)
        return h * m.view(*m.shape, *([1] * (h.ndim - 2)))


def add_task_routing(model, kind="dtr", beta=0.8, alpha=4.0, seed=0, num_timesteps=1000, masks=None):
    """Attach routers to a common/ DiT or U-Net through its hook points; 'none' leaves the model vanilla. DTR masks
    are shared (one per channel width); R-TR draws one per block from (seed, block index). `masks` (DiT only):
    adopt given (T, C) or (depth, T, C) masks instead, e.g. the R-TR masks stored in an authors' checkpoint."""
    if kind == "none":
        return model
    if isinstance(model, DiT):
        width, depth = model.x_embedder.proj.out_channels, len(model.blocks)
        if masks is None:
            masks = (routing_mask(kind, width, num_timesteps, beta, alpha, seed) if kind == "dtr" else
                     torch.stack([routing_mask(kind, width, num_timesteps, beta, alpha, seed, i) for i in range(depth)]))
        model.router = DiTRouter(masks)
        return model
    shared = {}  # DTR: one mask per channel width, shared by every block of that width
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    for i, module in enumerate(blocks):
        width = (module.in_layers[0] if isinstance(module, ResBlock) else module.norm).num_channels
        if kind == "random":
            module.router = ChannelRouter(routing_mask(kind, width, num_timesteps, beta, alpha, seed, i))
            continue
        if width not in shared:
            shared[width] = ChannelRouter(routing_mask(kind, width, num_timesteps, beta, alpha, seed))
        module.router = shared[width]
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

def training_loss(diffusion, model, x, y, t, args, uw=None, clusters=None):
    """Scalar loss of one batch: mean of (weighted mse + vb), or ANT-UW over k timestep clusters."""
    kind = "none" if args.loss_weight == "ant-uw" else args.loss_weight
    weight = mse_weight(kind, diffusion, t, args.min_snr_gamma, 1.0, args.p2_gamma)
    per_sample = diffusion.training_losses(model, x, t, dict(y=y), mse_weight=weight)["loss"]
    return per_sample.mean() if uw is None else uw(*clusters(per_sample, t))


#################################################################################
#                      Training loop (DiT train.py conventions)                 #
#################################################################################

# The settings that define a run: `--resume` refuses a checkpoint trained with other values of any of them.
DEFINING = ("model", "routing", "beta", "alpha", "mask_seed", "loss_weight", "min_snr_gamma", "p2_gamma", "ant_k",
            "noise_schedule", "data", "latent", "vae_scale", "image_size", "num_classes", "unconditional",
            "global_batch_size")


def run_name(args):
    """Folder name with what tells runs apart, as the authors' results_dir (routing, beta, loss weight, schedule):
    a sweep of Fig. 4's beta / alpha grid gets one folder per point."""
    routing = {"dtr": f"dtr-beta{args.beta:g}-alpha{args.alpha:g}", "random": f"random-beta{args.beta:g}-seed"
               f"{args.mask_seed}", "none": "vanilla"}[args.routing]
    return f"dtr-{args.model}-{routing}-{args.loss_weight}-{args.noise_schedule or 'cosine'}"


def train(args):
    data = create_dataset(args.data, args.image_size, args.num_classes, args.latent)  # fails before any run folder
    run, device, batch_size, dataset = start_training(args, run_name(args), "dtr", DEFINING, data)
    if args.loss_weight == "ant-uw" and batch_size % args.ant_k:
        fail(f"--loss-weight ant-uw draws B/k timesteps per cluster: the per-rank batch {batch_size} is not "
             f"divisible by --ant-k {args.ant_k}; use a --global-batch-size that is a multiple of "
             f"{args.ant_k * run.world_size}")
    (channels, size, _), num_classes = args.input_shape, args.num_classes
    torch.manual_seed(args.seed)  # same initial weights on every rank and in every (re)run
    model = create_model(args.model, size, channels, num_classes, learn_sigma=True)
    add_task_routing(model, args.routing, args.beta, args.alpha, args.mask_seed).to(device)
    ema = make_ema(model)
    diffusion = create_diffusion("", args.noise_schedule, learn_sigma=True)
    clusters, uw = None, None
    if args.loss_weight == "ant-uw":  # ANT-UW with timestep clusters, k = 8 (DTR paper, Sec. 5)
        clusters = ClusterLoss(uniform_intervals(diffusion.num_timesteps, args.ant_k)).to(device)
        uw = UncertaintyWeighting(args.ant_k).to(device)
    groups = [{"params": model.parameters()}] + ([uw.param_group(lr=args.uw_lr)] if uw else [])
    opt = adamw(groups, lr=args.lr)
    step = resume_training(run, model, ema, opt, uw=uw)
    # masks are buffers that never change: no need to broadcast them on every forward
    ddp = training_module(wrap_ddp(model, device, run.world_size, broadcast_buffers=False), args)
    loader = infinite_loader(dataset, batch_size, run.rank, run.world_size, args.seed, step, args.num_workers, device)
    routers = [m for m in model.modules() if isinstance(m, (DiTRouter, ChannelRouter))]
    if run.rank == 0 and routers:
        first = routers[0].mask_of_block(0) if isinstance(routers[0], DiTRouter) else routers[0].mask.float()
        save_mask_png(first.cpu(), os.path.join(run.dir, "routing_mask.png"))
    run.log(f"{args.model} + routing={args.routing} (beta={args.beta}, alpha={args.alpha}): "
            f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(dataset):,} training items; "
            f"world size {run.world_size}, batch {batch_size}/rank; results in {run.dir}")
    sample = sample_grid_writer(sampling_module(ema, args), args, device)
    running = torch.zeros(2, device=device)  # (sum of losses, count): summed on-device, synced only when logging

    def metrics():
        total = all_reduce_mean(running).tolist()  # (a single process gets `running` itself back: read it first)
        running.zero_()
        extra = {f"uw_weight_{i}": w for i, w in enumerate(uw.weights().tolist())} if uw is not None else {}
        return dict(loss=total[0] / total[1], **extra)

    def state():
        extra = {"uw": uw.state_dict()} if uw is not None else {}
        return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), **extra)

    model.train()
    bar = tqdm(total=args.steps, initial=step, disable=run.rank != 0, desc="train", dynamic_ncols=True)
    while step < args.steps:
        x, y = training_batch(loader, model, args, run.rank, step, device)
        if clusters is not None:
            t = clusters.sample_timesteps(batch_size)  # every cluster in every batch (ANT)
        else:
            t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)
        with autocast(device, args.bf16):
            loss = training_loss(diffusion, ddp, x, y, t, args, uw, clusters)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if uw is not None:  # the log-variances live outside DDP: average their grads by hand
            all_reduce_mean_([p.grad for p in uw.parameters()])
        opt.step()
        update_ema(ema, model, args.ema_decay)
        running += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        step += 1
        bar.update(1)
        if end_of_step(run, args, step, device, metrics, state, sample):
            break
    finish_training(run, model, bar)
    cleanup_distributed()
    return run.dir


#################################################################################
#                 Sampler: DDPM-250 / DDIM with cfg, ADM .npz export            #
#################################################################################

def routing_of_stored_masks(masks, beta, alpha, path):
    """The routing an authors' DTR checkpoint was trained with, from the (depth, T, C) masks it stores: "none"
    (all ones), "dtr" (one window mask shared by all blocks; checked against the masks rebuilt from beta, alpha)
    or "random" (R-TR: a mask per block, adopted as stored: unseeded upstream, they cannot be rebuilt)."""
    depth, T, C = masks.shape
    if bool((masks == 1).all()):
        return "none"
    active = masks.sum(-1)
    n = int(active[0, 0])
    if not bool(((masks == 0) | (masks == 1)).all()) or not bool((active == n).all()):
        fail(f"{path}: its routing buffers are not binary masks with the same number of active channels per task")
    if not bool((masks == masks[:1]).all()):
        return "random"
    rebuilt = routing_mask("dtr", C, T, beta, alpha)
    if not torch.equal(masks[0], rebuilt):
        fail(f"{path}: its stored DTR masks ({n} of {C} channels active, beta ~ {n / C:.3f}) differ from the masks "
             f"rebuilt with --beta {beta} --alpha {alpha}; pass the --beta / --alpha it was trained with")
    return "dtr"


def checkpoint_routing(args):
    """model_from_checkpoint's `prepare` for dtr.py: the routing of a checkpoint in any layout (ours: rebuilt from
    its args; the DTR authors': read off the stored masks; official DiT / ANT weights: vanilla unless --routing)."""
    def prepare(model, targs, masks):
        if targs.format == "ours":
            return add_task_routing(model, targs.routing, targs.beta, targs.alpha, targs.mask_seed)
        settings = targs.settings
        targs.beta = args.beta or settings.get("config.models.routing.sharing_ratio", 0.8)
        targs.alpha = args.alpha or 4.0  # the authors' create_mask_tasks default; their config does not set it
        targs.mask_seed = None
        if masks is None:  # weights without masks: a vanilla DiT unless --routing says how it was trained
            targs.routing = args.routing or "none"
            return add_task_routing(model, targs.routing, targs.beta, targs.alpha, args.mask_seed or 0)
        targs.routing = routing_of_stored_masks(masks, targs.beta, targs.alpha, args.ckpt)
        if args.routing not in (None, targs.routing):
            fail(f"{args.ckpt} stores {targs.routing} routing masks, not --routing {args.routing}")
        print(f"routing: {targs.routing} (read off the stored masks"
              + (", adopted as stored)" if targs.routing == "random" else f", beta {targs.beta}, alpha {targs.alpha})"))
        return add_task_routing(model, targs.routing, targs.beta, targs.alpha,
                                masks=masks if targs.routing == "random" else None)
    return prepare


#################################################################################
#                                     main                                      #
#################################################################################

# Defaults: the paper's ImageNet-256 run (App. C) on real data; a CPU-sized demo on --data synthetic.
PAPER = dict(steps=400_000, global_batch_size=256, lr=1e-4, ema_decay=0.9999, num_workers=4, log_every=100,
             ckpt_every=50_000, sample_every=10_000, image_size=256, num_sampling_steps=250)
# The demo: the most steps that train DTR and vanilla side by side in ~5 minutes on 2 cores (README, "The demo").
DEMO = dict(steps=2000, global_batch_size=32, lr=2e-3, ema_decay=0.99, num_workers=0, log_every=100,
            ckpt_every=2000, sample_every=2000, image_size=16, num_sampling_steps=50)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_data_args(p)
    p.add_argument("--routing", choices=["dtr", "random", "none"], default=None,
                   help="default dtr for training; an authors' checkpoint's routing is read off its masks")
    p.add_argument("--beta", type=float, default=None, help="fraction of active channels per task (default 0.8)")
    p.add_argument("--alpha", type=float, default=None, help="window drift exponent, task weights (default 4)")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the random (R-TR) masks")
    p.add_argument("--loss-weight", choices=["none", "min-snr", "p2", "ant-uw"], default="none")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--p2-gamma", type=float, default=1.0)
    p.add_argument("--ant-k", type=int, default=8, help="timestep clusters for ANT-UW")
    p.add_argument("--uw-lr", type=float, default=0.025, help="lr of the ANT-UW log-variances")
    add_sampling_args(p, cfg_channels="all")
    p.add_argument("--cka", action="store_true", help="write the Fig. 6 CKA heat-maps of --ckpt and exit")
    add_run_args(p)
    add_compare_args(p)
    args = finish_args(p, p.parse_args(argv), DEMO, PAPER)
    if (args.sample_only or args.cka) and not args.ckpt:
        p.error("--sample-only and --cka need --ckpt PATH")
    args.compare = comparison_requested(args, argv) and not (args.sample_only or args.cka)
    if not (args.sample_only or args.cka):  # training: the paper's routing unless told otherwise
        args.routing, args.beta, args.alpha = args.routing or "dtr", args.beta or 0.8, args.alpha or 4.0
    if args.compare and args.routing == "none":
        p.error("--compare trains vanilla beside a routed DiT: use --routing dtr or random")
    return args


def cka_analysis(args, num_images=64, num_timesteps=20):
    """Fig. 6 for a checkpoint: per-block CKA across timesteps on one batch of training data, as a PNG."""
    _, _, device = init_distributed()
    model, targs, step = model_from_checkpoint(args.ckpt, device, args, "dtr", checkpoint_routing(args))
    if not isinstance(model, DiT):
        fail("--cka analyses DiT blocks (as the paper's Fig. 6); this checkpoint is an ADM U-Net")
    data = targs.data if targs.format == "ours" and args.data == "synthetic" else args.data
    if data == "synthetic" and targs.format != "ours":
        fail("--cka of an authors' checkpoint needs the training data: pass --data <latent dir> --latent")
    dataset, *_ = create_dataset(data, targs.image_size if targs.format == "ours" else args.image_size,
                                 targs.num_classes, targs.latent)
    x, y = fixed_batch(dataset, num_images, device, targs.latent, getattr(targs, "vae_scale", None))
    timesteps = np.linspace(0, 999, num_timesteps).round().astype(int)
    cka = timestep_cka(model, create_diffusion("", targs.noise_schedule), x, y, timesteps)
    out = run_dir_of(args.ckpt) if targs.format == "ours" else args.results_dir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"cka-{step:07d}.png")
    save_cka_png(cka, path)
    print(f"wrote {path} ({cka.shape[0]} blocks x {num_timesteps} timesteps)")
    return path


def compare(args):
    """The demo (Sec. 5's claim at CPU scale): this routing and vanilla DiT trained alike, their samples judged by
    the shape classifier (eval/demo_comparison.py); returns the comparison folder."""
    name = {"dtr": "DTR", "random": "R-TR"}[args.routing]
    variants = [(name, dict(routing=args.routing)), ("vanilla", dict(routing="none"))]
    return run_comparison(train, args, variants, "dtr", checkpoint_routing(args), setting="routing")


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    if args.cka:
        return cka_analysis(args)
    if args.sample_only:  # EMA weights, routing rebuilt or read off the file
        return sample_main(args, "dtr", checkpoint_routing(args))
    return compare(args) if args.compare else train(args)


if __name__ == "__main__":
    main()
