"""Encode an ImageNet-style folder (or the synthetic set) into SD-VAE latent shards for `dtr.py --latent`.

    python data/extract_latents.py --data <image folder> --out <latent dir> --vae <sd-vae-ft-ema weights>
    torchrun --nproc_per_node=8 data/extract_latents.py --data <image folder> --out <latent dir> --vae <weights>

Items are cut into shards of --shard-size consecutive indices; rank r encodes shards r, r + N, r + 2N, ... and writes
each one atomically, so a rerun (any number of processes) skips finished shards. After a barrier rank 0 writes
manifest.json, which marks the directory complete. Each item stores the posterior N(mean, std^2) of the image and
of its horizontal flip (the SD VAE is not flip-equivariant: its downsampling pads right/bottom only), so training
keeps both the flip augmentation and posterior sampling (data/latents.py `sample_latents`). Format: data/latents.py.
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as `python data/extract_latents.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from common.training_run import autocast, cleanup_distributed, fail, init_distributed
from common.vae import load_vae
from data.latents import ARRAY_KEYS, atomic_write, save_shard, write_manifest

SETTINGS_FILE = "extraction.json"  # the settings of the first run: a rerun must match them to reuse its shards


#################################################################################
#                          Items, shards and ranks                              #
#################################################################################

def build_dataset(data, image_size, num_samples=10_000, num_classes=4):
    """(dataset of (image in [-1, 1], label), class names) for --data synthetic or an image folder."""
    if data == "synthetic":
        from data.synthetic import SHAPE_TYPES, SyntheticShapes
        return SyntheticShapes(num_samples, image_size, num_classes=num_classes), list(SHAPE_TYPES[:num_classes])
    from data.image_folder import ImageFolder
    try:
        ds = ImageFolder(data, image_size)  # ADM center crop, as DiT's extract_features / train.py
    except FileNotFoundError as e:
        fail(str(e))
    return ds, list(ds.classes)


def shard_bounds(num_items, shard_size):
    """[(start, end)] of consecutive index ranges: shard s holds items start..end-1."""
    return [(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def shards_of_rank(num_shards, rank, world_size):
    """Round-robin: disjoint over ranks, together all shards, and balanced when a rerun finds some done."""
    return list(range(rank, num_shards, world_size))


def shard_name(s):
    return f"shard_{s:05d}.npz"


#################################################################################
#                                 Encoding                                      #
#################################################################################

@torch.no_grad()
def encode_with_flip(vae, x, bf16=False):
    """Posterior mean/std of a batch and of its horizontal flip in one VAE pass: {key: float32 (n, 4, h, w)}."""
    with autocast(x.device, bf16):  # bf16 on CUDA when asked; a no-op on CPU (fp32)
        mean, std = vae.encode(torch.cat([x, x.flip(-1)]))
    mean, std, n = mean.float(), std.float(), len(x)
    return {"mean": mean[:n], "std": std[:n], "mean_flip": mean[n:], "std_flip": std[n:]}


def check_settings(out, settings):
    """Fail if `out` holds shards of an extraction with other settings (they would mix silently)."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        previous = json.load(f)
    changed = [k for k in settings if previous.get(k) != settings[k]]
    if changed:
        diff = "; ".join(f"{k} {previous.get(k)!r} there, {settings[k]!r} now" for k in changed)
        fail(f"'{out}' holds latents extracted with other settings ({diff}); pass a new --out or the same settings")


def extract(args):
    rank, world_size, device = init_distributed()
    dataset, class_names = build_dataset(args.data, args.image_size, args.num_samples, args.num_classes)
    vae = load_vae(args.vae, device, args.vae_scale)  # one-line error for a missing / mismatched weight file
    factor = 2 ** (len(vae.block_out_channels) - 1)
    if args.image_size % factor:
        fail(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {factor}")
    latent_shape = [vae.post_quant_conv.in_channels, args.image_size // factor, args.image_size // factor]
    settings = dict(data="synthetic" if args.data == "synthetic" else os.path.abspath(args.data),
                    num_items=len(dataset), image_size=args.image_size, shard_size=args.shard_size,
                    latent_shape=latent_shape, vae=os.path.abspath(args.vae), scale_factor=vae.scaling_factor)
    check_settings(args.out, settings)  # every rank checks, so every rank stops on a mismatch
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        atomic_write(os.path.join(args.out, SETTINGS_FILE), lambda f: f.write(json.dumps(settings, indent=1).encode()))
    if dist.is_initialized():
        dist.barrier()

    bounds = shard_bounds(len(dataset), args.shard_size)
    mine = shards_of_rank(len(bounds), rank, world_size)
    todo = [s for s in mine if not os.path.isfile(os.path.join(args.out, shard_name(s)))]  # atomic: exists = done
    indices = [i for s in todo for i in range(*bounds[s])]
    if rank == 0:
        print(f"{len(dataset):,} items -> {len(bounds)} shards of {latent_shape} latents in {args.out}; "
              f"{world_size} process(es); rank 0 has {len(todo)} of its {len(mine)} shards to do", flush=True)
    loader = DataLoader(Subset(dataset, indices), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    buffer, buffered = {k: [] for k in ARRAY_KEYS}, 0
    bar = tqdm(total=len(indices), disable=rank != 0, unit="img", desc=f"encoding (rank 0 of {world_size})")
    for x, y in loader:
        for k, v in encode_with_flip(vae, x.to(device, non_blocking=True), args.bf16).items():
            buffer[k].append(v.cpu().numpy().astype(np.float16))
        buffer["label"].append(np.asarray(y, dtype=np.int64))
        buffered += len(y)
        bar.update(len(y))
        while todo and buffered >= bounds[todo[0]][1] - bounds[todo[0]][0]:  # the oldest open shard is full
            n = bounds[todo[0]][1] - bounds[todo[0]][0]
            arrays = {k: np.concatenate(v) for k, v in buffer.items()}
            save_shard(os.path.join(args.out, shard_name(todo.pop(0))), {k: a[:n] for k, a in arrays.items()})
            buffer, buffered = {k: [a[n:]] for k, a in arrays.items()}, buffered - n
    bar.close()
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk

    if rank == 0:
        names = [shard_name(s) for s in range(len(bounds))]
        missing = [n for n in names if not os.path.isfile(os.path.join(args.out, n))]
        if missing:
            fail(f"{len(missing)} shard(s) are missing, e.g. {missing[0]}; rerun the same command to finish them")
        for name in os.listdir(args.out):  # leftovers of interrupted atomic writes
            if ".tmp" in name:
                os.remove(os.path.join(args.out, name))
        write_manifest(args.out, names, [end - start for start, end in bounds], latent_shape, vae.scaling_factor,
                       flip=True, extra=dict(num_classes=len(class_names), class_names=class_names,
                                             image_size=args.image_size, source=settings["data"], vae=settings["vae"]))
        print(f"wrote {len(dataset):,} latents to {args.out}; train with "
              f"`python dtr.py --latent --data {args.out} --vae {args.vae}`", flush=True)
    cleanup_distributed()
    return args.out


#################################################################################
#                                     main                                      #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder root/<class>/<image>, or 'synthetic'")
    p.add_argument("--out", required=True, help="latent directory to write (reruns resume it)")
    p.add_argument("--vae", required=True, help="local SD VAE weights (.safetensors / .bin / LDM .ckpt)")
    p.add_argument("--image-size", type=int, default=256, help="ADM center crop size (latents are 1/8 of it)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE pass per process (x2 with flips)")
    p.add_argument("--shard-size", type=int, default=10_000, help="items per shard file (the resume unit)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes (default 4 CUDA, 0 CPU)")
    p.add_argument("--num-samples", type=int, default=10_000, help="--data synthetic only")
    p.add_argument("--num-classes", type=int, default=4, help="--data synthetic only")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (CUDA only; default fp32)")
    p.add_argument("--vae-scale", type=float, default=None,
                   help="latent scale recorded in the manifest (default: the VAE's config.json, else SD's 0.18215; "
                        "SDXL VAE: 0.13025)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.shard_size < 1:
        p.error("--batch-size and --shard-size must be positive")
    if args.num_workers is None:
        args.num_workers = 4 if torch.cuda.is_available() else 0
    return args


def main(argv=None):
    return extract(parse_args(argv))


if __name__ == "__main__":
    main()
