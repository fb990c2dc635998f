"""Run infrastructure shared by the paper scripts: DDP, EMA, results folders, logs, checkpoints, resume, signals.

Exact resume rests on two rules: every step's randomness is re-seeded from (seed, rank, step) (`seed_step`), and
the data order is a pure function of (seed, global batch index) (`ResumableSampler`). A resumed run therefore
draws exactly the batches and noise the uninterrupted one would have, with no RNG state to carry around.
"""
import contextlib
import copy
import csv
import glob
import os
import re
import signal
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image
from tqdm.auto import tqdm

from common.checkpoint_io import CheckpointError, read_checkpoint


#################################################################################
#                              Distributed setup                                #
#################################################################################

def init_distributed():
    """Init torch.distributed from torchrun's env vars (nccl on CUDA, gloo on CPU); unlaunched = world size 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world_size, local_rank = 0, 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts; the heavy matmuls run in bf16
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(x):
    """Average a tensor over ranks (no-op for a single process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def all_reduce_mean_(tensors):
    """Average tensors over ranks in place (gradients kept outside DDP); None entries and one process: no-op."""
    if dist.is_initialized():
        for x in tensors:
            if x is not None:
                dist.all_reduce(x)
                x /= dist.get_world_size()


@torch.no_grad()
def replicas_in_sync(model):
    """True if every rank holds bit-identical weights (compares a checksum of all parameters across ranks)."""
    if not dist.is_initialized():
        return True
    vec = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    mine = torch.stack([vec.sum(), (vec * torch.arange(1, len(vec) + 1, device=vec.device) % 9973).sum()])
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def seed_step(seed, rank, step):
    """Re-seed torch for one training step: its randomness becomes a pure function of (seed, rank, step)."""
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63))


#################################################################################
#                               Data order                                      #
#################################################################################

class ResumableSampler(torch.utils.data.Sampler):
    """Endless index stream: epoch e is a permutation seeded by (seed, e), cut into global batches split over
    ranks (drop-last). Starting at `start_batch` replays exactly the stream an uninterrupted run would see."""

    def __init__(self, dataset_size, batch_size, rank=0, world_size=1, seed=0, start_batch=0):
        self.batches_per_epoch = dataset_size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {dataset_size} items, fewer than one global batch of "
                             f"{batch_size * world_size}; lower --global-batch-size")
        self.size, self.batch_size, self.rank, self.world_size = dataset_size, batch_size, rank, world_size
        self.seed, self.start_batch = seed, start_batch

    def __iter__(self):
        epoch, first = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            for b in range(first, self.batches_per_epoch):
                start = (b * self.world_size + self.rank) * self.batch_size
                yield from perm[start:start + self.batch_size].tolist()
            epoch, first = epoch + 1, 0


def infinite_loader(dataset, batch_size, rank, world_size, seed, start_batch, num_workers=0, device=None):
    """A DataLoader over ResumableSampler: an endless, resumable iterator of per-rank batches."""
    sampler = ResumableSampler(len(dataset), batch_size, rank, world_size, seed, start_batch)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda", persistent_workers=num_workers > 0))


def random_hflip(x, flip=None):
    """Flip each image of a batch horizontally with p = 0.5 (done on-device so the data order stays exact); pass
    the (B,) bool `flip` of one draw to flip several tensors alike (an image and its label maps)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5 if flip is None else flip
    return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


#################################################################################
#                          EMA, precision, sanity                               #
#################################################################################

def make_ema(model):
    """A frozen copy of the model for the exponential moving average of its weights."""
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model (DiT train.py), as one fused multi-tensor op."""
    ema_params = OrderedDict(ema_model.named_parameters())
    pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def autocast(device, enabled):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op on CPU or when disabled."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


#################################################################################
#                     Command line shared by the four scripts                   #
#################################################################################

RUN_DEFAULTS = ("steps", "global_batch_size", "lr", "ema_decay", "num_workers", "log_every", "ckpt_every",
                "sample_every")


def add_run_args(parser):
    """Flags every training script shares. Those left at None get per-script defaults from `fill_defaults`."""
    g = parser.add_argument_group("run")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the newest matching run) or PATH")
    g.add_argument("--steps", type=int, help="training steps")
    g.add_argument("--global-batch-size", type=int, help="summed over all ranks")
    g.add_argument("--lr", type=float)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--num-workers", type=int, help="data-loading processes per rank")
    g.add_argument("--log-every", type=int)
    g.add_argument("--ckpt-every", type=int)
    g.add_argument("--sample-every", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast on CUDA")
    return parser


def fill_defaults(args, defaults):
    """Set every run flag the user left unset from `defaults` (a dict keyed like RUN_DEFAULTS)."""
    for key in RUN_DEFAULTS:
        if getattr(args, key, None) is None:
            setattr(args, key, defaults[key])
    return args


def fail(message):
    """Exit with a one-line error (no traceback) for bad user input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


#################################################################################
#                      Results folder, logs and checkpoints                     #
#################################################################################

def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def latest_checkpoint(run_dir):
    """Path of the highest-step checkpoint in run_dir/checkpoints, or None."""
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    paths = [p for p in paths if re.fullmatch(r"\d+\.pt", os.path.basename(p))]
    return max(paths, key=lambda p: int(os.path.basename(p)[:-3])) if paths else None


def run_dir_of(ckpt_path):
    """The run folder results/NNN-<name>/ of a checkpoint results/NNN-<name>/checkpoints/<step>.pt."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))


def load_checkpoint(path):
    """Load a checkpoint dict on CPU (no pickled code runs: common/checkpoint_io) with a one-line error if it is
    missing or unreadable."""
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist; pass --resume auto or an existing .pt file")
    try:
        ckpt, skipped = read_checkpoint(path)
    except CheckpointError as e:
        fail(f"{e}; delete it to resume from an earlier one")
    if skipped:  # e.g. an authors' omegaconf config: its values stay readable, its code is never run
        print(f"read {path}: kept as inert data the pickled objects of {', '.join(skipped)}")
    return ckpt


def load_model_state(model, state, path="checkpoint"):
    """load_state_dict(strict=True) with a one-line error naming a few mismatched keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:3]
        fail(f"{path} does not match this model (check --model / --image-size / --num-classes): "
             + " ".join(s.strip() for s in first)[:300])


def save_image_grid(images, path, nrow=8):
    """Write a batch (N, C, H, W) in [-1, 1] as one PNG grid (2-px gaps)."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + 2) + 2, ncol * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = images[i]
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)


class TrainingRun:
    """One run's folder `results/NNN-<name>/` with log.txt, metrics.csv, checkpoints/ and samples/.

    Rank 0 writes; every rank can call every method. `--resume auto` reuses the newest folder of the same name.
    `batch_size` is the per-rank share of --global-batch-size.
    """

    def __init__(self, args, name, rank=0, world_size=1, script=None, defining=()):
        self.rank, self.world_size, self.args = rank, world_size, args
        self.script = script  # the producing script, stored in every checkpoint
        self.defining = tuple(defining)  # args that define the run: a resume must not change them
        if args.global_batch_size % world_size:
            fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes")
        self.batch_size = args.global_batch_size // world_size
        self.stop_requested = False
        self.resume_path = self._resume_path(args, name)
        if self.resume_path:
            self.dir = run_dir_of(self.resume_path)
        else:
            self.dir = self._new_dir(args.results_dir, name)
        self.ckpt_dir = os.path.join(self.dir, "checkpoints")
        self.sample_dir = os.path.join(self.dir, "samples")
        if rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            os.makedirs(self.sample_dir, exist_ok=True)
        self._csv_fields = None
        self._t0, self._last = time.time(), (time.time(), 0)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # cluster pre-emption: checkpoint, then exit cleanly
            signal.signal(sig, self._on_signal)

    # ----- folders -----------------------------------------------------------
    def _new_dir(self, root, name):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
        path = [None]
        if self.rank == 0:
            os.makedirs(root, exist_ok=True)
            idx = len(glob.glob(os.path.join(root, "[0-9][0-9][0-9]-*")))
            path[0] = os.path.join(root, f"{idx:03d}-{safe}")
            os.makedirs(path[0], exist_ok=True)
        if dist.is_initialized():
            dist.broadcast_object_list(path, src=0)
        return path[0]

    def _resume_path(self, args, name):
        if not args.resume:
            return None
        if args.resume != "auto":
            if not os.path.isfile(args.resume):
                fail(f"--resume '{args.resume}' does not exist; pass --resume auto or a checkpoint .pt file")
            return args.resume
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
        runs = sorted(glob.glob(os.path.join(args.results_dir, f"[0-9][0-9][0-9]-{safe}")))
        ckpts = [c for c in (latest_checkpoint(r) for r in reversed(runs)) if c]
        return ckpts[0] if ckpts else None  # nothing to resume: start fresh

    # ----- logging -----------------------------------------------------------
    def log(self, message):
        if self.rank != 0:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        tqdm.write(line)  # prints above the progress bar instead of breaking it
        with open(os.path.join(self.dir, "log.txt"), "a") as f:
            f.write(line + "\n")

    def log_metrics(self, step, images_seen=None, **values):
        """Append one row to metrics.csv (adds steps/s, images/s and peak GPU memory) and a line to log.txt."""
        now = time.time()
        steps_per_sec = (step - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, step)
        row = {"step": step, **{k: float(v) for k, v in values.items()}, "steps_per_sec": steps_per_sec}
        if images_seen is not None:
            row["images_per_sec"] = steps_per_sec * images_seen
        if torch.cuda.is_available():
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        bad = [k for k, v in values.items() if not np.isfinite(float(v))]
        if bad:  # the metrics are all-reduced: every rank stops here together
            self._diverged(step, ", ".join(bad))
        if self.rank == 0:
            path = os.path.join(self.dir, "metrics.csv")
            if self._csv_fields is None:
                self._csv_fields = list(row)
                if os.path.exists(path):  # resuming: keep the existing header
                    with open(path) as f:
                        self._csv_fields = next(csv.reader(f), self._csv_fields)
            new = not os.path.exists(path)
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self._csv_fields, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
        self.log(f"step {step:07d} " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

    # ----- checkpoints -------------------------------------------------------
    def _diverged(self, step, what):
        """Stop the run (exit status 3, no traceback) on a NaN/inf; earlier checkpoints stay as they are."""
        message = (f"step {step}: non-finite {what}; stopping. The last good checkpoint is kept in {self.ckpt_dir}; "
                   f"lower --lr or check the data, then --resume auto")
        self.log(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(3)

    def save(self, step, **state):
        """Write checkpoints/<step>.pt atomically (rank 0): DiT's {model, ema, opt, args, step} plus extras.
        Weights with a NaN/inf are never written (checked on every rank, so all of them stop together)."""
        finite = [torch.isfinite(v).all() for v in state.get("model", {}).values() if v.is_floating_point()]
        if finite and not bool(torch.stack(finite).all()):  # one host-device sync for the whole model
            self._diverged(step, "model weights (not checkpointed)")
        if self.rank == 0:
            path = os.path.join(self.ckpt_dir, f"{step:07d}.pt")
            save_atomic({**state, "args": vars(self.args), "step": step, "script": self.script}, path)
            self.log(f"saved checkpoint {path}")
        if dist.is_initialized():
            dist.barrier()

    def load(self):
        """The checkpoint to resume from (dict) or None for a fresh run."""
        if not self.resume_path:
            return None
        self.log(f"resuming from {self.resume_path}")
        ckpt = load_checkpoint(self.resume_path)
        self.check_resume(ckpt)
        return ckpt

    def check_resume(self, ckpt):
        """Refuse (one line listing the flags) to resume a checkpoint of another script or with other settings."""
        producer = ckpt.get("script")
        if self.script is not None and producer not in (None, self.script):
            fail(f"--resume {self.resume_path} was written by {producer}.py, not {self.script}.py")
        stored = ckpt.get("args", {})
        differ = [key for key in self.defining if key in stored and stored[key] != getattr(self.args, key, None)]
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {stored[k]} (now {getattr(self.args, k, None)})"
                              for k in differ)
            fail(f"--resume {self.resume_path} was trained with other settings: {flags}; resume with its settings, "
                 f"or start a new run without --resume")

    # ----- signals -----------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.stop_requested = True

    def should_stop(self, step, device):
        """True on every rank once any rank got SIGTERM/SIGUSR1. Under DDP the ranks agree through a tiny
        all-reduce every 10 steps (not every step: it would add a host-device sync to each step)."""
        if not dist.is_initialized():
            return self.stop_requested
        if step % 10:
            return False
        flag = torch.tensor([float(self.stop_requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


#################################################################################
#            The loop's bookkeeping (DiT train.py), shared by all scripts       #
#################################################################################
# Each script keeps its own loop body (the paper's loss and update); what happens around it is the same everywhere.

def resume_training(run, model, ema, opt, **extras):
    """Load the checkpoint to resume from (if any) into model, EMA, optimiser and every extra with a
    load_state_dict (None is skipped); returns the step to continue from, 0 for a fresh run."""
    ckpt = run.load()
    if ckpt is None:
        return 0
    load_model_state(model, ckpt["model"], run.resume_path)
    ema.load_state_dict(ckpt["ema"])
    # The optimiser state (moments) resumes; its hyperparameters are the ones of this command line (--lr, ...).
    current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(ckpt["opt"])
    for i, (group, wanted) in enumerate(zip(opt.param_groups, current)):
        changed = {k: (group.get(k), v) for k, v in wanted.items() if group.get(k) != v}
        group.update(wanted)
        if changed:
            run.log(f"optimiser group {i}: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                    + " (from this command line)")
    for key, obj in extras.items():
        if obj is not None:
            if key not in ckpt:
                fail(f"{run.resume_path} has no '{key}' state: resume it with the flags it was trained with")
            obj.load_state_dict(ckpt[key])
    return ckpt["step"]


def wrap_ddp(model, device, world_size, **ddp_kwargs):
    """DistributedDataParallel under torchrun, the bare model for a single process."""
    if world_size == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kwargs)


def end_of_step(run, args, step, device, metrics, state, sample=None, sample_last=True):
    """The periodic work after optimiser step `step`: a metrics row every --log-every (metrics() -> dict, called
    only then: it may all-reduce), a checkpoint (state() -> dict) every --ckpt-every, at the end and on a stop
    signal, and on rank 0 sample(path) writing a PNG every --sample-every (and at the last step unless
    sample_last=False: a script whose final evaluation draws it). Returns True when the run must stop."""
    last = step == args.steps
    if step % args.log_every == 0 or last:
        run.log_metrics(step, images_seen=args.global_batch_size, **metrics())
    stop = run.should_stop(step, device)
    if step % args.ckpt_every == 0 or last or stop:
        run.save(step, **state())
    sample_due = sample_last if last else step % args.sample_every == 0
    if run.rank == 0 and sample is not None and sample_due:
        path = os.path.join(run.sample_dir, f"{step:07d}.png")
        sample(path)
        run.log(f"samples {path}")
    if stop:
        run.log(f"stop signal received: checkpoint at step {step} written, exiting")
    return stop


def finish_training(run, model, bar):
    """Close the progress bar and log whether the DDP replicas agree (the caller leaves the process group)."""
    bar.close()
    if run.world_size > 1:
        run.log(f"replicas in sync: {replicas_in_sync(model)}")
