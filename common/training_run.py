"""Run infrastructure shared by the paper scripts: DDP, EMA, results folders, logs, checkpoints, resume, signals.

Exact resume rests on two rules: every step's randomness is re-seeded from (seed, rank, step) (`seed_step`), and
the data order is a pure function of (seed, global batch index) (`ResumableSampler`). A resumed run therefore
draws exactly the batches and noise the uninterrupted one would have, with no RNG state to carry around.
"""
import argparse
import atexit
import contextlib
import copy
import csv
import errno
import functools
import glob
import math
import os
import re
import shutil
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
        set_cpu_threads()
    return rank, world_size, device


def set_cpu_threads():
    """CPU runs: OMP_NUM_THREADS torch threads when it is set (torchrun sets 1 per process), else half the cores
    (at least 1): on a loaded 2-core machine two threads ran 2-4x slower per step than one. Returns the count."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    return threads


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
            raise InputError(f"the dataset has {dataset_size} items, fewer than one global batch of "
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
    """The bare model inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, DDP) else model


#################################################################################
#               The fast path: --grad-checkpoint and --compile                   #
#################################################################################

def set_grad_checkpoint(model, enabled=True):
    """Switch gradient checkpointing on every block of `model` that has it (a `grad_checkpoint` attribute: DiT,
    the U-Net's ResBlock / AttentionBlock, the ViT). Returns how many modules were switched."""
    modules = [m for m in model.modules() if hasattr(m, "grad_checkpoint")]
    for m in modules:
        m.grad_checkpoint = enabled
    return len(modules)


def compile_module(module):
    """torch.compile with a one-line error where it cannot work: on CPU inductor compiles C++ at the first call."""
    device = next(module.parameters()).device
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise InputError("--compile on CPU needs a C++ compiler (g++ / clang++): install one or drop --compile")
    return torch.compile(module)


def training_module(ddp, args):
    """What the training loop calls: the (DDP-wrapped) model with --grad-checkpoint switched on its blocks, and
    with --compile compiled around the DDP wrap (dynamo's DDPOptimizer splits the graph at DDP's gradient buckets,
    so the all-reduce still overlaps backward). Routing masks are buffers indexed by the timestep tensor, so
    changing timesteps reuse one graph (tests/test_compile.py)."""
    if getattr(args, "grad_checkpoint", False) and not set_grad_checkpoint(unwrap(ddp)):
        raise InputError(f"{type(unwrap(ddp)).__name__} has no blocks to checkpoint; drop --grad-checkpoint")
    return compile_module(ddp) if getattr(args, "compile", False) else ddp


def adamw(params, lr, weight_decay=0.0):
    """AdamW as DiT's train.py (weight decay 0), as one fused kernel per step on CUDA: the update of a DiT-L's 458M
    parameters is memory-bound, and foreach kernels make it about a fifth of a fast step. params: tensors or groups."""
    params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=tensors[0].is_cuda or None)


def sampling_module(ema, args):
    """The EMA model for sampling: compiled with --compile (its in-place EMA updates reach the compiled graph,
    which reads the parameters at every call); the EMA module itself stays the one checkpoints store."""
    return compile_module(ema) if getattr(args, "compile", False) else ema


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
    g.add_argument("--steps", type=positive_int, help="training steps")
    g.add_argument("--global-batch-size", type=positive_int, help="summed over all ranks")
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--ema-decay", type=unit_float, help="in [0, 1]")
    g.add_argument("--num-workers", type=non_negative_int, help="data-loading processes per rank")
    g.add_argument("--log-every", type=positive_int)
    g.add_argument("--ckpt-every", type=positive_int)
    g.add_argument("--sample-every", type=positive_int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast on CUDA")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (around the DDP wrap) and the EMA model for sampling; "
                        "off by default: the first steps wait for compilation (about a minute), CPU runs need a C++ "
                        "compiler")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="gradient checkpointing of every transformer / U-Net block (torch.utils.checkpoint): "
                        "activations recomputed in backward, for less memory at about 1/3 more compute")
    return parser


def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


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


class InputError(ValueError):
    """Bad input the message explains (a data set too small for the batch, a model size the data cannot have,
    ...), raised where it is found; `one_line_errors` turns it into fail()'s one line."""


def one_line_errors(main):
    """Decorator for a script's main(): an InputError, a full disk or a data folder that is a file end the program
    with one line and exit status 2 instead of a traceback (the one place that does this for every script)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as e:
            fail(str(e))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                fail(f"no space left on the device while writing {e.filename or 'a file'}; the partial file was "
                     f"removed and earlier checkpoints are intact: free some space, then --resume auto")
            raise
    return wrapper


#################################################################################
#                      Results folder, logs and checkpoints                     #
#################################################################################

TMP_PATTERN = re.compile(r".*\.tmp\d+(\.png)?")  # what save_atomic / save_image_grid write before their rename


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file, and
    a failed write (e.g. a full disk) removes its temp file before the error goes on."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and "No space left" in str(e):  # torch's zip writer wraps ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device", path) from None
        raise


def remove_stale_tmp_files(folder):
    """Delete temp files that writes killed before their rename left behind (they are never complete)."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if TMP_PATTERN.fullmatch(name):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def checkpoint_step(path):
    """The step in a checkpoint's file name, <run>/checkpoints/<step>.pt."""
    return int(os.path.basename(path)[:-3])


def latest_checkpoint(run_dir):
    """Path of the highest-step checkpoint in run_dir/checkpoints, or None."""
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    paths = [p for p in paths if re.fullmatch(r"\d+\.pt", os.path.basename(p))]
    return max(paths, key=checkpoint_step) if paths else None


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


def numbered_dir(root, name):
    """Make root/NNN-<name> with NNN one above the highest index in root: a deleted folder's number is never reused
    (counting folders would hand out the next run's number again and append to it)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
    os.makedirs(root, exist_ok=True)
    while True:
        taken = [int(m[1]) for d in os.listdir(root) for m in [re.match(r"(\d{3,})-", d)] if m]
        candidate = os.path.join(root, f"{max(taken, default=-1) + 1:03d}-{safe}")
        try:
            os.makedirs(candidate)  # exist_ok=False: a concurrent launch that took it makes us retry
            return candidate
        except FileExistsError:
            continue


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
        self._stop_group = None  # gloo group for the stop flag, made on first use
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
            for folder in (self.dir, self.ckpt_dir, self.sample_dir):
                for name in remove_stale_tmp_files(folder):
                    self.log(f"removed {name}, left by a write that was killed before it finished")
            if not self.resume_path:  # a run that fails before it logs a step leaves no folder behind
                atexit.register(self._remove_if_unused)
        self._csv_fields = None
        self._t0, self._last = time.time(), (time.time(), 0)
        if not torch.cuda.is_available():
            given = os.environ.get("OMP_NUM_THREADS")
            self.log(f"CPU run: {torch.get_num_threads()} torch thread(s) per process "
                     + (f"(OMP_NUM_THREADS={given})" if given else "(half the cores; set OMP_NUM_THREADS to change)"))
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # cluster pre-emption: checkpoint, then exit cleanly
            signal.signal(sig, self._on_signal)

    # ----- folders -----------------------------------------------------------
    def _new_dir(self, root, name):
        """numbered_dir on rank 0, broadcast to the other ranks."""
        path = [numbered_dir(root, name) if self.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(path, src=0)
        return path[0]

    def _remove_if_unused(self):
        """atexit (rank 0, fresh runs): delete the folder if the run ended before its first metrics row, sample or
        checkpoint (a failed start: bad flags found after the folder was made)."""
        used = os.path.exists(os.path.join(self.dir, "metrics.csv")) or latest_checkpoint(self.dir) or (
            os.path.isdir(self.sample_dir) and os.listdir(self.sample_dir))
        if not used and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

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

    def resumed_at(self, step):
        """After loading a checkpoint of `step`: time the first steps/s from here, and drop the metrics.csv rows
        of steps after it (steps the killed run made past its last checkpoint, which are replayed now)."""
        self._last = (time.time(), step)
        path = os.path.join(self.dir, "metrics.csv")
        if self.rank == 0 and os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
            if len(kept) != len(rows):
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
                os.replace(tmp, path)
                self.log(f"metrics.csv: dropped {len(rows) - len(kept)} row(s) after step {step}, replayed now")

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
        if not (isinstance(ckpt, dict) and {"model", "ema", "opt", "args", "step"} <= set(ckpt)):
            fail(f"--resume {self.resume_path} is not a training checkpoint of ours (model, ema, opt, args, step); "
                 f"authors' weights can be sampled with --sample-only --ckpt, not resumed")
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
        """True on every rank once any rank got SIGTERM/SIGUSR1. Under DDP the ranks agree after every step (a
        slow step must not outlast torchrun's grace period) through a one-number all-reduce in a CPU (gloo)
        group: no host-device sync on the GPU."""
        if not dist.is_initialized():
            return self.stop_requested
        if self._stop_group is None:
            self._stop_group = dist.new_group(backend="gloo")
        flag = torch.tensor([float(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
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
    run.resumed_at(ckpt["step"])
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
