"""FID, sFID, Inception Score and improved precision / recall, with ADM-style `.npz` sample files.

    python -m eval.fid samples.npz ref.npz --inception-weights pt_inception-2015-12-05-6726825d.pth \
        [--batch-size 50] [--device cuda] [--save-ref-stats ref_stats.npz] [--prefer-stored-stats] \
        [--is-split-size 5000 | --is-splits 10]

Each side is an ADM `.npz` (`arr_0`: uint8 NHWC images, optionally `mu`, `sigma`, `mu_s`, `sigma_s`), a statistics-only
`.npz` (`mu`, `sigma` [, `mu_s`, `sigma_s`]) or a folder of images. `arr_0` is streamed in batches and FID / sFID
statistics are accumulated batch by batch, so a 50K x 256^2 file (10 GB) is never held in memory; only the features
that precision / recall and the IS need are kept (float32). Features come from `eval.inception.FIDInception`
(pytorch-fid's network). Sources:
  - Frechet distance: mseitzer/pytorch-fid `calculate_frechet_distance` (= ADM `FIDStatistics.frechet_distance`);
  - sFID: ADM `evaluations/evaluator.py` (first 7 channels of mixed_6/conv, 17x17x7);
  - IS: improved-gan `inception_score/model.py`, softmax of the bias-free 1008-way logits, split like ADM's
    `compute_inception_score` (blocks of 5000 samples, SPEC) or into a fixed number of splits (--is-splits);
  - precision / recall: Kynkaanniemi et al. 2019 as in ADM's `ManifoldEstimator` (k = 3, squared distances).
Bad inputs (a path that is neither, a corrupt / truncated / non-uint8 `.npz`, a wrong weight file) end the command
with a one-line error and exit status 2.
"""
import argparse
import os
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from common.adm_npz import atomic_savez, check_images, save_adm_npz  # noqa: F401 (the writer of what this reads)
from common.training_run import fail

IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}  # pytorch-fid's list


#################################################################################
#                                 Frechet Distance                              #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                         f"vs {sigma2.shape}; compute both sides with the same feature layer")
    diff = mu1 - mu2
    # SciPy >= 1.16 deprecates sqrtm(disp=...): call it plainly and test the result for finiteness instead.
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product can be (nearly) singular, e.g. fewer samples than dimensions: regularise both covariances.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Round-off can leave a small imaginary part; a large one means the statistics are broken.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt(sigma1 sigma2) has imaginary component {np.max(np.abs(covmean.imag)):.3g}; "
                             f"check the covariances (symmetric PSD, same features)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features):
    """(N, D) features -> (mu, sigma): mean and unbiased covariance, float64 (as pytorch-fid / ADM)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature array, got shape {features.shape}; add more images")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStatistics:
    """Mean and unbiased covariance of features fed in batches, in float64, without keeping the features.

    Each batch is centred on its own mean and merged with Chan, Golub & LeVeque's pairwise update (1979, eq. 2.1):
    M2 = M2_a + M2_b + (mean_b - mean_a)(mean_b - mean_a)^T n_a n_b / n. Unlike sum(x x^T) - n mu mu^T this does not
    cancel catastrophically when the mean is large next to the spread. Sums live on the features' device.
    """

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, batch):
        x = torch.as_tensor(batch)
        if x.device.type == "mps":  # MPS has no float64
            x = x.cpu()
        x = x.reshape(len(x), -1).to(torch.float64)
        b = x.shape[0]
        if b == 0:
            return
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        if self.n == 0:
            self.n, self.mean, self.m2 = b, mean_b, centred.t() @ centred
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"feature size changed from {self.mean.shape[0]} to {mean_b.shape[0]} between batches")
        n = self.n + b
        delta = mean_b - self.mean
        # in place: a 2048 x 2048 float64 temporary is 33 MB, and one per term per batch adds up in the allocator
        self.m2.addmm_(centred.t(), centred).addr_(delta, delta, alpha=self.n * b / n)
        self.mean.add_(delta, alpha=b / n)
        self.n = n

    def finalize(self):
        """(mu, sigma) as float64 numpy arrays, sigma with the 1 / (N - 1) of np.cov."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}; add more images")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


#################################################################################
#                       Inception Score, Precision and Recall                   #
#################################################################################

ADM_IS_SPLIT_SIZE = 5000  # ADM evaluator.py compute_inception_score(split_size=5000): 50K -> 10 splits, 10K -> 2


def inception_split_bounds(n, splits=None, split_size=None):
    """[(start, stop)] of the IS splits of n samples: ADM's consecutive blocks of `split_size` (the last one holds the
    remainder), or, with `splits`, improved-gan's `splits` near-equal parts. Default: ADM with split_size 5000."""
    if splits is not None and split_size is not None:
        raise ValueError("give either splits (a fixed number) or split_size (ADM), not both")
    if splits is not None:
        if not 1 <= splits <= n:
            raise ValueError(f"need 1 <= splits <= N = {n} samples, got splits={splits}")
        # improved-gan inception_score/model.py: part i = preds[i * N // splits:(i + 1) * N // splits]
        return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    split_size = ADM_IS_SPLIT_SIZE if split_size is None else split_size
    if split_size < 1 or n < 1:
        raise ValueError(f"need split_size >= 1 and N >= 1 samples, got split_size={split_size}, N={n}")
    # ADM evaluator.py: for i in range(0, N, split_size): part = preds[i:i + split_size] (a short last part stays)
    return [(i, min(i + split_size, n)) for i in range(0, n, split_size)]


def inception_score(logits, splits=None, split_size=None):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of the (N, C) logits (see inception_split_bounds); returns the
    unweighted (mean, std) over splits: ADM reports the mean (np.mean(scores)), improved-gan also the std."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"need (N, classes) logits, got shape {logits.shape}")
    scores = []
    for start, stop in inception_split_bounds(len(logits), splits, split_size):
        # float64 one split at a time: 50K x 1008 logits stay float32, a split's log-softmax is 40 MB
        part = torch.log_softmax(torch.as_tensor(logits[start:stop], dtype=torch.float64), dim=1)
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log of the split's marginal p(y)
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()  # improved-gan: mean_x sum_y p log(p / p(y))
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a, b):
    """Pairwise squared Euclidean distances (|a|^2 - 2ab + |b|^2, clamped at 0) as in ADM's DistanceBlock."""
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1)[None]
    return d2.clamp_min_(0)


def manifold_radii(features, k=3, batch=1000):
    """Squared distance from each point to its k-th nearest *other* point (index k of the sorted row, 0 is itself)."""
    if features.shape[0] <= k:
        raise ValueError(f"need more than k={k} feature vectors to estimate a manifold, got {features.shape[0]}")
    radii = []
    for start in range(0, features.shape[0], batch):
        d2 = _squared_distances(features[start:start + batch], features)
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def fraction_in_manifold(queries, features, radii, batch=1000):
    """Fraction of queries inside at least one ball B(features_j, radius_j) (squared distances on both sides)."""
    inside = []
    for start in range(0, queries.shape[0], batch):
        d2 = _squared_distances(queries[start:start + batch], features)
        inside.append((d2 <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats, fake_feats, k=3, batch=1000, device="cpu"):
    """Improved precision (fakes on the real manifold) and recall (reals on the fake manifold), Kynkaanniemi 2019."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (N, D) real and fake features of one D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    real_radii, fake_radii = manifold_radii(real, k, batch), manifold_radii(fake, k, batch)
    precision = fraction_in_manifold(fake, real, real_radii, batch)
    recall = fraction_in_manifold(real, fake, fake_radii, batch)
    return precision, recall


#################################################################################
#                             ADM .npz Sample Files                             #
#################################################################################

ADM_BATCH = "not a valid ADM batch (arr_0 uint8 NHWC with 3 channels)"


class InputError(ValueError):
    """A sample / reference input that cannot be used as given; the command line prints it as one line."""


# What a damaged zip / .npy member raises while being opened or read (zlib.error: a corrupt deflate stream).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError)


def npz_members(path):
    """Array names of a .npz (zip members without `.npy`); InputError if it is not a readable zip archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [name[:-4] for name in zf.namelist() if name.endswith(".npy")]
    except _READ_ERRORS as e:
        raise InputError(f"{path}: {ADM_BATCH} nor a statistics file: not a readable zip archive "
                         f"({type(e).__name__}: {e}); the file is corrupt or truncated, write it again") from None


class NpzImages:
    """Streams `arr_0` of an ADM .npz in batches without reading the whole array (10 GB for 50K at 256^2).

    Like ADM's StreamingNpzArrayReader (evaluator.py): open the zip member, parse the .npy header, then read
    batch-sized byte ranges; zipfile decompresses a deflated member on the fly, so np.savez_compressed files stream
    too (ADM's reader accepts them the same way). The member's CRC is checked once the last byte has been read.
    """

    def __init__(self, path):
        self.path = path
        self._zip = self._member = None
        try:
            self._zip = zipfile.ZipFile(path)
            if "arr_0.npy" not in self._zip.namelist():
                raise InputError(f"{path}: {ADM_BATCH}: it has no arr_0 (members {self._zip.namelist()})")
            self._member = self._zip.open("arr_0.npy")
            version = np.lib.format.read_magic(self._member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._member)
            else:  # 3.0 only adds utf8 field names of structured dtypes: never a uint8 image array
                raise InputError(f"{path}: {ADM_BATCH}: arr_0 has .npy format version {version}")
        except InputError:
            self.close()
            raise
        except _READ_ERRORS as e:
            self.close()
            raise InputError(f"{path}: {ADM_BATCH}: cannot read arr_0 ({type(e).__name__}: {e}); the file is corrupt "
                             f"or truncated, write it again") from None
        if dtype.hasobject:  # pickled Python objects: never unpickled, whatever they hold
            self.close()
            raise InputError(f"{path}: {ADM_BATCH}: arr_0 is an object array {shape}; save the uint8 images instead")
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
            self.close()
            raise InputError(f"{path}: {ADM_BATCH}: arr_0 is {dtype} {shape}; convert with "
                             f"((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) and NCHW -> NHWC")
        if fortran:  # rows of a Fortran-ordered array are not contiguous byte ranges: it cannot be streamed
            self.close()
            raise InputError(f"{path}: {ADM_BATCH}: arr_0 is stored in Fortran order; save "
                             f"np.ascontiguousarray(images) instead")
        self.shape = tuple(shape)
        self.num_images = shape[0]
        self._image_bytes = int(np.prod(shape[1:]))
        self._next = 0

    def _read_exactly(self, size):
        buf = bytearray(size)  # writable, so torch.from_numpy of the batch does not warn
        view, got = memoryview(buf), 0
        try:
            while got < size:
                count = self._member.readinto(view[got:])
                if not count:
                    raise InputError(f"{self.path}: {ADM_BATCH}: arr_0 ends after "
                                     f"{self._next + got // self._image_bytes} of the {self.num_images} images "
                                     f"its header announces; the file is truncated, write it again")
                got += count
            if self._next * self._image_bytes + size == self.num_images * self._image_bytes:
                # past the last image: reach the member's end, which makes zipfile check its CRC
                if self._member.read(1):
                    raise InputError(f"{self.path}: {ADM_BATCH}: arr_0 holds more bytes than its header's shape "
                                     f"{self.shape}")
        except _READ_ERRORS as e:
            if isinstance(e, InputError):
                raise
            last = self._next + size // self._image_bytes - 1  # a CRC mismatch shows only at the member's end
            raise InputError(f"{self.path}: {ADM_BATCH}: reading images {self._next}-{last} of arr_0 failed "
                             f"({type(e).__name__}: {e}); the file is corrupt, write it again") from None
        return buf

    def batches(self, batch_size):
        """Yield consecutive uint8 (B, H, W, 3) batches of at most batch_size images, once."""
        if self._next:
            raise RuntimeError("NpzImages.batches() streams the file once; open a new NpzImages to read it again")
        while self._next < self.num_images:
            count = min(batch_size, self.num_images - self._next)
            buf = self._read_exactly(count * self._image_bytes)
            self._next += count
            yield np.frombuffer(buf, np.uint8).reshape(count, *self.shape[1:])

    def close(self):
        for handle in (self._member, self._zip):
            if handle is not None:
                handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_images_npz(path):
    """Read the uint8 NHWC images (`arr_0`) of an ADM sample / reference-batch file, whole."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such .npz file: {path!r}")
    with NpzImages(path) as reader:
        return next(reader.batches(reader.num_images))


def save_statistics(path, mu, sigma, mu_s=None, sigma_s=None):
    """Cache reference statistics as .npz (`mu`, `sigma` and, for sFID, `mu_s`, `sigma_s`: ADM's key names)."""
    arrays = dict(mu=mu, sigma=sigma)
    if mu_s is not None:
        arrays.update(mu_s=mu_s, sigma_s=sigma_s)
    atomic_savez(path, **arrays)


STORED_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # ADM evaluator.py read_statistics


def load_statistics(path):
    """Stored statistics of a .npz: {"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}, each only when present."""
    stats = {}
    try:
        with np.load(path, allow_pickle=False) as f:  # np.load reads a member only when it is indexed
            for feature, (mu, sigma) in STORED_KEYS.items():
                if mu in f.files and sigma in f.files:
                    stats[feature] = (f[mu], f[sigma])
    except _READ_ERRORS as e:
        raise InputError(f"{path}: {ADM_BATCH} nor a statistics file: reading its stored statistics failed "
                         f"({type(e).__name__}: {e})") from None
    return stats



#################################################################################
#                               Feature Extraction                              #
#################################################################################

class _ArrayImages:
    """An in-memory uint8 NHWC array behind the same interface as NpzImages."""

    def __init__(self, images):
        check_images(images, "source array")
        self.images, self.num_images = images, len(images)

    def batches(self, batch_size):
        for start in range(0, self.num_images, batch_size):
            yield self.images[start:start + batch_size]

    def close(self):
        pass


class _FolderImages:
    """The images of a folder (pytorch-fid's extensions), sorted by name, read batch by batch."""

    def __init__(self, folder):
        self.folder = folder
        self.files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise InputError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
        self.num_images = len(self.files)

    def _read(self, file):
        try:
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise InputError(f"{file}: not a readable image ({type(e).__name__}: {e}); remove or replace it") from None

    def batches(self, batch_size):
        shape = None
        for start in range(0, self.num_images, batch_size):
            images = [self._read(file) for file in self.files[start:start + batch_size]]
            shape = shape or images[0].shape
            odd = next((f for f, im in zip(self.files[start:], images) if im.shape != shape), None)
            if odd is not None:
                raise InputError(f"{self.folder}: images differ in size ({odd} is not {shape[1]}x{shape[0]}); resize "
                                 f"them to one size first")
            yield np.stack(images)

    def close(self):
        pass


def open_images(source):
    """A reader (num_images, batches(batch_size), close()) of a folder, an ADM .npz (streamed) or a uint8 array."""
    if isinstance(source, np.ndarray):
        return _ArrayImages(source)
    if os.path.isdir(source):
        return _FolderImages(source)
    if str(source).endswith(".npz") and os.path.isfile(source):
        return NpzImages(source)
    raise FileNotFoundError(f"source {source!r} is neither an image folder, a .npz file nor a uint8 array")


@torch.no_grad()
def extract_features(source, model, batch_size=50, device="cpu", keep=None, statistics=(), verbose=False):
    """One pass of `model` over the images of `source`: ({name: float32 (N, D)} for the outputs in `keep` (None:
    all), {name: (mu, sigma)} accumulated in float64 for the outputs in `statistics`). Only one batch of images and
    the kept features are held in memory."""
    model = model.to(device).eval()
    reader = open_images(source)
    kept, running, start = {}, {name: RunningStatistics() for name in statistics}, 0
    progress = tqdm(desc="inception features", unit="img", total=reader.num_images, disable=not verbose)
    try:
        for images in reader.batches(batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
            outputs = model(x)
            missing = [name for name in (*running, *(keep or ())) if name not in outputs]
            if missing:
                raise ValueError(f"the feature model returns {sorted(outputs)}, not {missing}")
            for name, value in outputs.items():
                value = value.reshape(len(value), -1)
                if name in running:
                    running[name].update(value)
                if keep is None or name in keep:
                    if name not in kept:  # preallocated: concatenating per-batch pieces would double the peak
                        kept[name] = np.empty((reader.num_images, value.shape[1]), np.float32)
                    kept[name][start:start + len(value)] = value.float().cpu().numpy()
            start += len(images)
            progress.update(len(images))
    finally:
        progress.close()
        reader.close()
    return kept, {name: stats.finalize() for name, stats in running.items()}


def compute_features(source, model, batch_size=50, device="cpu", verbose=False):
    """Inception features of every image of `source`: dict of float32 arrays pool (N, 2048), spatial (N, 2023),
    logits (N, 1008), logits_unbiased (N, 1008)."""
    return extract_features(source, model, batch_size, device, keep=None, verbose=verbose)[0]


def compute_statistics(source, model, batch_size=50, device="cpu", feature="pool", prefer_stored=False):
    """(mu, sigma) of one feature ("pool" for FID, "spatial" for sFID), streamed. A statistics-only .npz (a reference
    cache) returns its stored values; one that also holds images is recomputed unless prefer_stored=True."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        stored = load_statistics(source)
        if feature in stored and (prefer_stored or "arr_0" not in npz_members(source)):
            return stored[feature]
    return extract_features(source, model, batch_size, device, keep=(), statistics=(feature,))[1][feature]


#################################################################################
#                                 Command Line                                  #
#################################################################################

def inspect_input(path):
    """What one command-line input holds, checked before any feature is computed: {"num_images": 0 if none,
    "stored": load_statistics(...)}. InputError (one line, naming the file) for anything unusable."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        num_images, stored = _FolderImages(path).num_images, {}
    elif not path.endswith(".npz"):
        raise InputError(f"{path}: neither a folder of images nor an .npz file (ADM batch: arr_0 uint8 NHWC, 3 "
                         f"channels; or statistics: mu, sigma [, mu_s, sigma_s]); convert it to one of those")
    else:
        members, num_images = npz_members(path), 0
        if "arr_0" in members:
            with NpzImages(path) as reader:  # parses and checks the header; reads no image data
                num_images = reader.num_images
        stored = load_statistics(path)
        if not num_images and not stored:
            raise InputError(f"{path}: {ADM_BATCH} nor a statistics file: it holds neither arr_0 nor mu/sigma "
                             f"(members {members})")
    if num_images == 1:
        raise InputError(f"{path}: one image gives no covariance; FID needs at least 2 (ADM uses 50K samples)")
    return dict(num_images=num_images, stored=stored)


def describe_input(path, info, model, batch_size=50, device="cpu", prefer_stored=False, keep=(), verbose=False):
    """Kept features, {"pool", "spatial"} statistics and a line saying which statistics are stored / recomputed, for
    one input already checked by inspect_input."""
    stored, n = info["stored"], info["num_images"]
    # ADM's evaluator uses stored mu/sigma whenever the file has them; we recompute from images unless asked not to
    use_stored = [f for f in STORED_KEYS if f in stored and (prefer_stored or not n)]
    recompute = [f for f in STORED_KEYS if n and f not in use_stored]
    feats, stats = {}, {}
    if n:
        feats, stats = extract_features(path, model, batch_size, device, keep=keep, statistics=recompute,
                                        verbose=verbose)
    stats.update({f: stored[f] for f in use_stored})
    names = {"pool": "mu/sigma", "spatial": "mu_s/sigma_s"}
    parts = [f"{names[f]} stored in the file" for f in use_stored]
    parts += [f"{names[f]} recomputed from its {n} images" for f in recompute]
    unused = [names[f] for f in stored if f not in use_stored]
    note = "; ".join(parts) + (f" (stored {', '.join(unused)} not used: --prefer-stored-stats uses them)"
                               if unused else "")
    return feats, stats, note


def _load_inception(weights_path):
    from eval.inception import FIDInception
    try:
        return FIDInception(weights_path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID / sFID / IS / precision / recall of samples against a reference")
    parser.add_argument("samples", help="ADM .npz (arr_0 uint8 NHWC), statistics .npz or image folder")
    parser.add_argument("reference", help="ADM reference batch .npz, statistics .npz or image folder")
    parser.add_argument("--inception-weights", required=True,
                        help="local pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception weights)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save-ref-stats", default=None, help="write the reference mu/sigma(/mu_s/sigma_s) here")
    parser.add_argument("--prefer-stored-stats", action="store_true",
                        help="use mu/sigma stored in a .npz even when it also has images (ADM's evaluator does)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--is-split-size", type=int, default=None,
                       help=f"Inception Score over consecutive splits of this many samples, the last one holding "
                            f"the remainder (default {ADM_IS_SPLIT_SIZE}, ADM's evaluator: 50K -> 10 splits)")
    split.add_argument("--is-splits", type=int, default=None,
                       help="Inception Score over this fixed number of near-equal splits (improved-gan: 10)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, value in (("--is-split-size", args.is_split_size), ("--is-splits", args.is_splits)):
        if value is not None and value < 1:
            fail(f"{flag} must be >= 1, got {value}")

    from eval.inception import FID_WEIGHTS_URL
    if not os.path.isfile(args.inception_weights):
        fail(f"FID Inception weights not found at {args.inception_weights!r}: download {FID_WEIGHTS_URL} once by "
             f"hand and pass its local path with --inception-weights")
    try:  # both inputs are checked before the first image is read
        info = {"samples": inspect_input(args.samples), "reference": inspect_input(args.reference)}
    except InputError as e:
        fail(str(e))
    num_samples = info["samples"]["num_images"]
    if num_samples and args.is_splits is not None and args.is_splits > num_samples:
        fail(f"--is-splits {args.is_splits} is more than the {num_samples} sample images; pass a smaller number")
    # precision / recall: k = 3 nearest other points need at least 4 images a side
    have_images = all(info[side]["num_images"] > 3 for side in info)
    model = _load_inception(args.inception_weights) if any(info[s]["num_images"] for s in info) else None

    results = {}
    try:
        for side, path in (("samples", args.samples), ("reference", args.reference)):
            keep = (["pool"] if have_images else []) + (["logits_unbiased"] if side == "samples" else [])
            feats, stats, note = describe_input(path, info[side], model, args.batch_size, args.device,
                                                args.prefer_stored_stats, keep, verbose=True)
            print(f"{side} statistics ({path}): {note}")
            results[side] = feats, stats
    except InputError as e:
        fail(str(e))
    (sample_feats, sample_stats), (ref_feats, ref_stats) = results["samples"], results["reference"]
    if args.save_ref_stats and "pool" in ref_stats:
        save_statistics(args.save_ref_stats, *ref_stats["pool"], *ref_stats.get("spatial", (None, None)))

    skipped = []
    for feature, label in (("pool", "FID"), ("spatial", "sFID")):
        if feature in sample_stats and feature in ref_stats:
            try:
                print(f"{label}: {frechet_distance(*sample_stats[feature], *ref_stats[feature]):.4f}")
            except ValueError as e:  # stored statistics of another feature layer or broken covariances
                fail(f"{label} of {args.samples} vs {args.reference}: {e}")
        else:
            skipped.append(f"{label} (needs {STORED_KEYS[feature][0]}/{STORED_KEYS[feature][1]} or images on both "
                           f"sides)")
    if "logits_unbiased" in sample_feats:
        bounds = inception_split_bounds(num_samples, args.is_splits, args.is_split_size)
        mean, std = inception_score(sample_feats["logits_unbiased"], args.is_splits, args.is_split_size)
        how = (f"{args.is_splits} fixed splits (improved-gan)" if args.is_splits is not None else
               f"ADM split size {args.is_split_size or ADM_IS_SPLIT_SIZE}")
        sizes = sorted({stop - start for start, stop in bounds}, reverse=True)
        print(f"Inception Score: {mean:.4f} +- {std:.4f} ({how}: {len(bounds)} splits of "
              f"{' / '.join(map(str, sizes))} samples, unweighted mean)")
    else:
        skipped.append("Inception Score (needs sample images)")
    if have_images:
        precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], device=args.device)
        print(f"Precision: {precision:.4f}\nRecall: {recall:.4f}")
    else:
        skipped.append("precision/recall (need at least 4 images on both sides)")
    if skipped:
        print("Skipped: " + "; ".join(skipped))


if __name__ == "__main__":
    main()
