"""The synthetic demos' comparison: a paper's method and vanilla DiT trained alike (same seed, same steps), the EMA
model of each drawing class-conditional samples from the same noise, judged by eval/shape_classifier.py (class
accuracy, FD-synthetic). Writes compare.csv, one labelled PNG grid (a row per class, the method beside vanilla) and
the judged samples (samples-<model>-seed<seed>.npz, ADM's uint8 arr_0 with the labels as arr_1); prints a table."""
import argparse
import contextlib
import csv
import multiprocessing
import os
import re
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from common.adm_npz import atomic_savez, to_uint8
from common.checkpoint_formats import model_from_checkpoint
from common.class_conditional_cli import sampling_kwargs
from common.sampling import sample_images
from common.training_run import (InputError, checkpoint_step, fail, init_distributed, latest_checkpoint, numbered_dir,
                                 positive_int)
from data.labelled_images import create_dataset
from data.synthetic import SHAPE_TYPES
from eval.shape_classifier import judge_samples, load_or_train_classifier

DEMO_CFG_SCALE = 3.0
COLUMNS = ("model", "{setting}", "steps", "accuracy", "fd_synthetic", "seed", "train_seconds")


def add_compare_args(p):
    """--compare (on by default for the bare command, the README's demo), --seeds and the number of judged samples."""
    g = p.add_argument_group("comparison (the no-argument demo)")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="train this method and vanilla alike, judge their samples with the shape classifier, write "
                        "compare.csv and compare.png (default: on when the script runs without arguments)")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="compare once per seed (implies --compare; default: --seed only)")
    g.add_argument("--compare-samples", type=positive_int, default=128,
                   help="class-conditional samples judged per model (classes in turn)")
    g.add_argument("--compare-workers", type=positive_int, default=None,
                   help="CPU: runs trained at once, each in its own process (default: the cores / torch threads, "
                        "2 on 2 cores; the results do not depend on it); GPU: one at a time")


def comparison_requested(args, argv=None):
    """--compare as given; else on for the bare command line (argv, default sys.argv[1:], empty) or with --seeds."""
    argv = sys.argv[1:] if argv is None else argv
    return args.compare if args.compare is not None else (len(argv) == 0 or args.seeds is not None)


def check_comparison(args):
    """One-line errors for flags the comparison cannot honour."""
    if args.data != "synthetic" or args.latent:
        fail("--compare judges samples with the synthetic set's shape classifier: use --data synthetic "
             "(or --no-compare)")
    if args.unconditional or args.num_classes == 1:
        fail("--compare judges class-conditional samples: drop --unconditional / --num-classes 1")
    if args.resume:
        fail("--compare trains fresh runs; drop --resume, or resume each run without --compare")
    if "WORLD_SIZE" in os.environ:
        fail("--compare runs in one process: launch it with python, or train each variant under torchrun "
             "without --compare")


@torch.no_grad()
def judged_samples(run_dir, args, script, prepare, device, seed):
    """--compare-samples class-conditional samples (labels 0, 1, ..., C-1, 0, ...) of a run's final EMA model, drawn
    with the command line's sampler from noise seeded by `seed`, as (uint8 NHWC, labels)."""
    model, targs, _ = model_from_checkpoint(latest_checkpoint(run_dir), device, args, script, prepare)
    labels = torch.arange(args.compare_samples, device=device) % targs.num_classes
    gen = torch.Generator(device=device).manual_seed(seed)  # the same noise for every variant
    images = sample_images(model, labels, tuple(targs.input_shape), generator=gen,
                           **sampling_kwargs(args, targs, device))
    return to_uint8(images).numpy(), labels.cpu().numpy()


def from_uint8(images):
    """uint8 NHWC -> float (N, C, H, W) in [-1, 1], the judge's input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def run_comparison(train, args, variants, script, prepare, setting):
    """Train every variant (name, {arg: value}) per seed with `train(args) -> run dir` inside one comparison
    folder, judge each run's samples and write compare.csv / compare.png there; returns the folder."""
    check_comparison(args)
    # the judged samples are guided at scale 3 unless --cfg-scale (tuned for the demo: README, Demo)
    args.cfg_scale = DEMO_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    _, _, device = init_distributed()
    seeds = args.seeds or [args.seed]
    out = numbered_dir(args.results_dir, f"{script}-compare-{args.model}")
    num_classes = create_dataset(args.data, args.image_size, args.num_classes)[3]
    judge = load_or_train_classifier(num_classes, args.image_size, args.results_dir, device)
    jobs = [(seed, name, argparse.Namespace(**{**vars(args), **overrides, "seed": seed, "results_dir": out}))
            for seed in seeds for name, overrides in variants]
    workers = 1 if device.type == "cuda" else min(len(jobs), args.compare_workers or max(
        1, (os.cpu_count() or 1) // torch.get_num_threads()))
    trained = train_jobs(train, [(f"{name}-seed{seed}", vargs) for seed, name, vargs in jobs], out, workers)
    rows, grid = [], []
    for (seed, name, vargs), (run_dir, seconds) in zip(jobs, trained):
        images, labels = judged_samples(run_dir, args, script, prepare, device, seed)
        atomic_savez(os.path.join(out, f"samples-{name}-seed{seed}.npz"), arr_0=images, arr_1=labels)
        scores = judge_samples(judge, from_uint8(images), torch.from_numpy(labels))
        rows.append({"model": name, setting: getattr(vargs, setting), "steps": args.steps, **scores, "seed": seed,
                     "train_seconds": round(seconds, 1)})
        if seed == seeds[0]:
            grid.append((name, images, labels))
    write_csv(rows, os.path.join(out, "compare.csv"), setting)
    save_comparison_grid(grid, os.path.join(out, "compare.png"), SHAPE_TYPES[:num_classes])
    print(comparison_table(rows, setting))
    print(f"wrote {os.path.join(out, 'compare.csv')} and {os.path.join(out, 'compare.png')}")
    return out


def timed_train(train, vargs):
    """(run dir, seconds) of one training run."""
    start = time.time()
    return train(vargs), time.time() - start


def train_quietly(train, vargs, console):
    """timed_train in a worker process, its console (log lines, bars, a one-line error) written to `console`; a
    one-line error comes back to the parent as an InputError with that line."""
    with open(console, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return timed_train(train, vargs)
        except SystemExit as e:
            if e.code in (0, None):
                raise
    last = (open(console).read().strip().splitlines() or ["exit status 2"])[-1]
    raise InputError(f"{last.removeprefix('error: ')} (run console: {console})")


def run_folders(out):
    return {d for d in os.listdir(out) if re.match(r"\d{3,}-", d) and os.path.isdir(os.path.join(out, d))}


def logged_step(run_dir):
    """The last step in a run's metrics.csv (0 before its first row)."""
    try:
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            last = f.read().strip().rsplit("\n", 1)[-1].split(",", 1)[0]
        return int(last) if last.isdigit() else 0
    except OSError:
        return 0


def train_jobs(train, jobs, out, workers):
    """Train the runs `jobs` ((label, argument namespace), all in folder `out`) and return [(run dir, seconds)].
    With workers > 1 (CPU) they train in that many spawned processes, one console file each (<out>/<label>.out); each
    starts once the one before has made its numbered folder, so the numbers follow the job order whatever the
    timing, and every run is the same as trained alone. The parent's bar counts the steps the runs have logged.
    SIGTERM / SIGUSR1 reach every run (passed on to the processes): each checkpoints, and the comparison stops."""
    if workers == 1:
        trained = []
        for _, vargs in jobs:  # a run stopped by SIGTERM returns early: the comparison stops there
            trained.append(timed_train(train, vargs))
            check_finished(trained[-1][0], vargs.steps, out)
        return trained
    print(f"training {len(jobs)} runs, {workers} at a time in their own processes; their consoles: {out}/*.out")
    dirs, futures, stop = [], [], []

    def forward_stop(signum, frame):  # each training process checkpoints and stops, as a run alone would
        stop.append(signum)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)
    handlers = {sig: signal.signal(sig, forward_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool, \
                tqdm(total=sum(v.steps for _, v in jobs), desc="train (all runs)") as bar:
            def poll():
                bar.update(sum(logged_step(os.path.join(out, d)) for d in dirs) - bar.n)
                time.sleep(0.2)
            for label, vargs in jobs:
                if stop:
                    break
                before = run_folders(out)
                futures.append(pool.submit(train_quietly, train, vargs, os.path.join(out, f"{label}.out")))
                while not (new := run_folders(out) - before) and not futures[-1].done():
                    poll()
                dirs += sorted(new)
            while not all(f.done() for f in futures):
                poll()
            try:
                trained = [f.result() for f in futures]
            except BrokenProcessPool:  # a signal that came before a run set up its handler ended that process
                if stop:
                    fail(stopped_message(out))
                raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for (run_dir, _), (_, vargs) in zip(trained, jobs):
        check_finished(run_dir, vargs.steps, out)
    if stop:  # every started run had finished: still, the user asked to stop
        fail(stopped_message(out))
    return trained


def stopped_message(out):
    return (f"stopped by a signal before the comparison finished; the runs' checkpoints are in {out}: --compare "
            f"starts fresh runs, so run the command again (or resume a run alone, without --compare)")


def check_finished(run_dir, steps, out):
    """One line and exit when a run stopped before `steps` (a stop signal): its checkpoints stay in `out`."""
    ckpt = latest_checkpoint(run_dir)
    if not ckpt or checkpoint_step(ckpt) < steps:
        fail(stopped_message(out))


def write_csv(rows, path, setting):
    columns = [c.format(setting=setting) for c in COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def comparison_table(rows, setting):
    """The rows as a Markdown table; with several seeds, a mean +- standard deviation line per model after them."""
    lines = [f"| model | {setting} | steps | seed | shape accuracy | FD-synthetic | train s |", "|---" * 7 + "|"]
    lines += [f"| {r['model']} | {r[setting]} | {r['steps']} | {r['seed']} | {r['accuracy']:.3f} | "
              f"{r['fd_synthetic']:.2f} | {r['train_seconds']:.0f} |" for r in rows]
    for name in dict.fromkeys(r["model"] for r in rows) if len({r["seed"] for r in rows}) > 1 else ():
        acc, fd = zip(*((r["accuracy"], r["fd_synthetic"]) for r in rows if r["model"] == name))
        lines.append(f"| {name} | mean +- sd | | {len(acc)} seeds | {statistics.mean(acc):.3f} +- "
                     f"{statistics.stdev(acc):.3f} | {statistics.mean(fd):.2f} +- {statistics.stdev(fd):.2f} | |")
    return "\n".join(lines)


def save_comparison_grid(models, path, class_names, per_class=8, tile=64, gap=12):
    """One row per class, each model's block of `per_class` samples side by side, the model names on top and the
    class names on the left (PIL's default font); tiles upscaled to `tile` px (nearest) so shapes can be seen."""
    font = ImageFont.load_default()
    per_class = min([per_class] + [int((labels == c).sum()) for _, _, labels in models for c in range(len(class_names))])
    left, top = 80, 24
    block = per_class * (tile + 2)
    canvas = Image.new("RGB", (left + len(models) * (block + gap), top + len(class_names) * (tile + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for m, (name, images, labels) in enumerate(models):
        x0 = left + m * (block + gap)
        draw.text((x0, 6), name, fill="black", font=font)
        for c, class_name in enumerate(class_names):
            y0 = top + c * (tile + 2)
            if m == 0:
                draw.text((6, y0 + tile // 2 - 6), class_name, fill="black", font=font)
            for i, image in enumerate(images[labels == c][:per_class]):
                canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x0 + i * (tile + 2), y0))
    canvas.save(path)
