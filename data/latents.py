"""Pre-extracted VAE latent shards (for `dtr.py --latent`), their writer and the per-batch posterior sampling.

On-disk format (written by `LatentShardWriter`, e.g. from data/extract_latents.py):
  root/manifest.json   {"num_samples": N, "latent_shape": [4, 32, 32], "scale_factor": 0.18215,
                        "shards": ["shard_00000.npz", ...], "flip": true, "stores": "mean_std",
                        "shard_sizes": [n_0, ...], "num_classes": K, "class_names": [...]}
                       ("shard_sizes", "num_classes", "class_names" optional; extra keys are allowed)
  root/shard_00000.npz uncompressed npz with
      mean, std            (n, 4, h, w) float16  the VAE posterior N(mean, std^2) of the image
      mean_flip, std_flip  (n, 4, h, w) float16  the same for the horizontally flipped image (when "flip")
      label                (n,) int64
Latents are stored unscaled; `sample_latents` multiplies by scale_factor (SD VAE: 0.18215).

Reading: `LatentDataset[i]` returns a dict of the stored arrays of item i (float16 tensors + int label); the random
part (flip with p = 0.5, z = mean + std * eps) happens on the whole batch in the training loop with
`sample_latents(batch, generator)`, so that a resumed run with a restored generator is exact. Shards are opened
lazily: the arrays of an uncompressed npz are memory-mapped in place (np.load cannot mmap npz members); a
compressed shard is loaded whole and only the last one is cached.
"""
import bisect
import json
import os
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

SD_SCALE_FACTOR = 0.18215  # Stable Diffusion's AutoencoderKL latent scale (CompVis/stable-diffusion configs)
ARRAY_KEYS = ("mean", "std", "mean_flip", "std_flip", "label")


def missing_latents_error(root, what):
    return FileNotFoundError(f"latent directory '{root}' {what}; extract latents first with "
                             f"`python data/extract_latents.py --data <image folder> --out {root}`")


#################################################################################
#                                   Writing                                     #
#################################################################################

def atomic_write(path, write):
    """Call write(file) on a temporary file next to path, then rename it into place (no half-written files)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def as_numpy(x, dtype):
    return (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)).astype(dtype, copy=False)


def save_shard(path, arrays):
    """Write {name: array} as an uncompressed npz (memory-mappable by LatentDataset), atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def write_manifest(root, shards, shard_sizes, latent_shape, scale_factor=SD_SCALE_FACTOR, flip=True, extra=None):
    """Write root/manifest.json atomically; a latent directory counts as complete only once it exists."""
    manifest = {"num_samples": sum(shard_sizes), "latent_shape": list(latent_shape), "scale_factor": scale_factor,
                "shards": list(shards), "flip": flip, "stores": "mean_std", "shard_sizes": list(shard_sizes),
                **(extra or {})}
    atomic_write(os.path.join(root, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


class LatentShardWriter:
    """Buffers latents and writes shard_XXXXX.npz files of shard_size items; close() writes the manifest."""

    def __init__(self, root, latent_shape, shard_size=10000, scale_factor=SD_SCALE_FACTOR, flip=True, extra=None):
        self.root, self.latent_shape, self.shard_size = root, tuple(latent_shape), shard_size
        self.scale_factor, self.flip, self.extra = scale_factor, flip, dict(extra or {})
        self.buffer = {k: [] for k in ARRAY_KEYS}
        self.buffered, self.shards, self.shard_sizes = 0, [], []
        os.makedirs(root, exist_ok=True)

    def add(self, mean, std, mean_flip, std_flip, label):
        """Add a batch (n, *latent_shape) with labels (n,), or one item (*latent_shape) with an int label."""
        arrays = {"mean": mean, "std": std, "mean_flip": mean_flip, "std_flip": std_flip}
        if not self.flip:
            arrays = {k: v for k, v in arrays.items() if not k.endswith("_flip")}
        elif mean_flip is None or std_flip is None:
            raise ValueError("mean_flip / std_flip are missing; pass them or create the writer with flip=False")
        arrays = {k: as_numpy(v, np.float16) for k, v in arrays.items()}
        single = arrays["mean"].shape == self.latent_shape
        labels = as_numpy(label, np.int64).reshape(-1)
        for k, v in arrays.items():
            v = v[None] if single else v
            if v.shape[1:] != self.latent_shape or len(v) != len(labels):
                raise ValueError(f"{k} has shape {tuple(v.shape)}, expected ({len(labels)}, "
                                 f"{', '.join(map(str, self.latent_shape))}) to match latent_shape and the labels")
            self.buffer[k].append(v)
        self.buffer["label"].append(labels)
        self.buffered += len(labels)
        while self.buffered >= self.shard_size:
            self.write_shard(self.shard_size)

    def write_shard(self, n):
        """Write the first n buffered items as the next shard."""
        arrays = {k: np.concatenate(v) for k, v in self.buffer.items() if v}
        self.buffer = {k: [arrays[k][n:]] if k in arrays else [] for k in ARRAY_KEYS}
        name = f"shard_{len(self.shards):05d}.npz"
        save_shard(os.path.join(self.root, name), {k: a[:n] for k, a in arrays.items()})
        self.shards.append(name)
        self.shard_sizes.append(n)
        self.buffered -= n

    def close(self):
        """Flush the last (partial) shard and write manifest.json; the directory is complete only after this."""
        if self.buffered:
            self.write_shard(self.buffered)
        if not self.shards:
            raise ValueError(f"no latents were added to '{self.root}'; call add() before close()")
        write_manifest(self.root, self.shards, self.shard_sizes, self.latent_shape, self.scale_factor, self.flip,
                       self.extra)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:  # an interrupted extraction leaves no manifest, so it is never mistaken for complete
            self.close()


#################################################################################
#                                   Reading                                     #
#################################################################################

def memmap_npz(path):
    """{name: read-only np.memmap} for an uncompressed npz, or None when a member is compressed / not mappable."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            # Local file header: 30 fixed bytes, then the name and the extra field (their lengths at 26 and 28).
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
            f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            if fortran or dtype.hasobject:
                return None
            arrays[info.filename[:-4]] = np.memmap(path, dtype, "r", offset=f.tell(), shape=shape)
    return arrays


class LatentDataset(Dataset):
    """Items {"mean", "std", "mean_flip", "std_flip": float16 (4, h, w), "label": int} read lazily from shards.

    sample_posterior=False drops the std arrays (z = mean); flip=False (or a manifest without flips) drops the
    flipped arrays; sample_latents() follows whichever keys are present.
    """

    def __init__(self, root, sample_posterior=True, flip=True):
        if not os.path.isdir(root):
            raise missing_latents_error(root, "does not exist")
        manifest_path = os.path.join(root, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise missing_latents_error(root, "has no manifest.json (extraction missing or unfinished)")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        self.root = root
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.scale_factor = float(self.manifest.get("scale_factor", SD_SCALE_FACTOR))
        self.shards = self.manifest["shards"]
        for name in self.shards:
            if not os.path.isfile(os.path.join(root, name)):
                raise missing_latents_error(root, f"lacks {name} listed in manifest.json")
        sizes = self.manifest.get("shard_sizes") or [self.count(name) for name in self.shards]
        self.offsets = np.cumsum([0] + list(sizes)).tolist()
        if self.offsets[-1] != self.manifest["num_samples"]:
            raise ValueError(f"'{manifest_path}' says num_samples={self.manifest['num_samples']} but the shards "
                             f"hold {self.offsets[-1]}; re-run data/extract_latents.py")
        self.keys = ["mean"] + (["std"] if sample_posterior else [])
        if flip and self.manifest.get("flip", False):
            self.keys += ["mean_flip"] + (["std_flip"] if sample_posterior else [])
        self.mapped = {}  # shard index -> memmaps (cheap: nothing is read until indexed)
        self.loaded = (None, None)  # (shard index, arrays) of the last compressed shard
        self.class_names = self.manifest.get("class_names")
        self.num_classes = int(self.manifest.get("num_classes") or (len(self.class_names) if self.class_names else 0)
                               or 1 + max(int(np.max(self.shard(s)["label"])) for s in range(len(self.shards))))

    def __getstate__(self):
        # DataLoader workers started by spawn/forkserver get a pickled copy: send no mapped or loaded arrays.
        return {**self.__dict__, "mapped": {}, "loaded": (None, None)}

    def count(self, name):
        with np.load(os.path.join(self.root, name)) as shard:
            return len(shard["label"])

    def shard(self, s):
        """The arrays of shard s: memory-mapped when possible, else loaded (only the last one is cached)."""
        if s in self.mapped:
            return self.mapped[s]
        if self.loaded[0] == s:
            return self.loaded[1]
        path = os.path.join(self.root, self.shards[s])
        arrays = memmap_npz(path)
        if arrays is not None:
            self.mapped[s] = arrays
            return arrays
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        self.loaded = (s, arrays)
        return arrays

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, idx):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} latents")
        idx %= len(self)
        s = bisect.bisect_right(self.offsets, idx) - 1
        arrays, i = self.shard(s), idx - self.offsets[s]
        item = {k: torch.from_numpy(np.array(arrays[k][i])) for k in self.keys}
        item["label"] = int(arrays["label"][i])
        return item


#################################################################################
#                        Flip + posterior sampling (batch)                      #
#################################################################################

def sample_latents(batch, generator=None, scale_factor=SD_SCALE_FACTOR):
    """(scale_factor * z, labels) for a collated batch: per item the flipped latents with p = 0.5 (when present),
    then z = mean + std * eps, eps ~ N(0, I) (z = mean when std is absent). Draws the flips first, then eps."""
    mean = batch["mean"]
    if mean.dim() != 4:
        raise ValueError(f"batch['mean'] has shape {tuple(mean.shape)}; expected (B, C, H, W) from a DataLoader")
    rng_device = generator.device if generator is not None else mean.device
    std = batch.get("std")
    mean = mean.float()
    std = std.float() if std is not None else None
    if "mean_flip" in batch:
        use_flip = (torch.rand(mean.shape[0], generator=generator, device=rng_device) < 0.5).to(mean.device)
        pick = use_flip.view(-1, 1, 1, 1)
        mean = torch.where(pick, batch["mean_flip"].float(), mean)
        if std is not None:
            std = torch.where(pick, batch["std_flip"].float(), std)
    if std is not None:
        eps = torch.randn(mean.shape, generator=generator, device=rng_device).to(mean.device)
        mean = mean + std * eps
    return mean * scale_factor, batch["label"]
