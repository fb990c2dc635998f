"""FID, sFID, Inception Score and improved precision / recall, with ADM-style `.npz` sample files.

    python -m eval.fid samples.npz ref.npz --inception-weights pt_inception-2015-12-05-6726825d.pth \
        [--batch-size 50] [--device cuda] [--save-ref-stats ref_stats.npz] [--prefer-stored-stats]

Each side is an ADM `.npz` (`arr_0`: uint8 NHWC images, optionally `mu`, `sigma`, `mu_s`, `sigma_s`), a statistics-only
`.npz` (`mu`, `sigma` [, `mu_s`, `sigma_s`]) or a folder of images. Features come from `eval.inception.FIDInception`
(pytorch-fid's network). Sources:
  - Frechet distance: mseitzer/pytorch-fid `calculate_frechet_distance` (= ADM `FIDStatistics.frechet_distance`);
  - sFID: ADM `evaluations/evaluator.py` (first 7 channels of mixed_6/conv, 17x17x7);
  - IS: improved-gan `inception_score/model.py`, softmax of the bias-free 1008-way logits, 10 splits (SPEC);
  - precision / recall: Kynkaanniemi et al. 2019 as in ADM's `ManifoldEstimator` (k = 3, squared distances).
"""
import argparse
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

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


#################################################################################
#                       Inception Score, Precision and Recall                   #
#################################################################################

def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of the (N, C) logits; returns (mean, std) over splits."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if logits.ndim != 2 or n < splits:
        raise ValueError(f"need (N, classes) logits with N >= splits={splits}, got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for i in range(splits):  # improved-gan split boundaries: i * N // splits
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log of the split's marginal p(y)
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
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

def _check_images(images, what):
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3
            or images.shape[0] == 0):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{what} must be a non-empty uint8 array of shape (N, H, W, 3), got {dtype} {shape}; convert "
                         f"with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) and NCHW -> NHWC")


def _atomic_savez(path, **arrays):
    """np.savez to a temp file in the target folder, then rename: readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: np.savez then adds no suffix of its own
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)  # atomic on POSIX
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_adm_npz(path, images_uint8_nhwc):
    """Write images to an ADM sample file (key `arr_0`, uint8 NHWC) atomically (temp file + rename)."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"ADM sample files end in .npz, got {path!r}")
    _check_images(images_uint8_nhwc, "images")
    _atomic_savez(path, arr_0=images_uint8_nhwc)


def load_images_npz(path):
    """Read the uint8 NHWC images (`arr_0`) of an ADM sample / reference-batch file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such .npz file: {path!r}")
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path!r} has no images (keys {f.files}); ADM sample files store them under 'arr_0'")
        images = f["arr_0"]
    _check_images(images, f"{path!r}['arr_0']")
    return images


def save_statistics(path, mu, sigma, mu_s=None, sigma_s=None):
    """Cache reference statistics as .npz (`mu`, `sigma` and, for sFID, `mu_s`, `sigma_s`: ADM's key names)."""
    arrays = dict(mu=mu, sigma=sigma)
    if mu_s is not None:
        arrays.update(mu_s=mu_s, sigma_s=sigma_s)
    _atomic_savez(path, **arrays)


def load_statistics(path):
    """Stored statistics of a .npz: {"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}, each only when present."""
    stats = {}
    with np.load(path) as f:
        if "mu" in f.files and "sigma" in f.files:
            stats["pool"] = (f["mu"], f["sigma"])
        if "mu_s" in f.files and "sigma_s" in f.files:
            stats["spatial"] = (f["mu_s"], f["sigma_s"])
    return stats


#################################################################################
#                               Feature Extraction                              #
#################################################################################

def _folder_batches(folder, batch_size):
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {folder!r}")
    for start in range(0, len(files), batch_size):
        images = [np.asarray(Image.open(file).convert("RGB")) for file in files[start:start + batch_size]]
        if len({image.shape for image in images}) > 1:
            raise ValueError(f"images in {folder!r} differ in size; resize them to one size first")
        yield np.stack(images), len(files)


def _image_batches(source, batch_size):
    """Yield (uint8 NHWC batch, total count) from a folder, an ADM .npz or a uint8 array."""
    if isinstance(source, np.ndarray):
        _check_images(source, "source array")
        images = source
    elif os.path.isdir(source):
        yield from _folder_batches(source, batch_size)
        return
    elif str(source).endswith(".npz"):
        images = load_images_npz(source)
    else:
        raise FileNotFoundError(f"source {source!r} is neither an image folder, a .npz file nor a uint8 array")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], len(images)


@torch.no_grad()
def compute_features(source, model, batch_size=50, device="cpu", verbose=False):
    """Inception features of every image of `source`: dict of float64 arrays pool (N, 2048), spatial (N, 2023),
    logits (N, 1008), logits_unbiased (N, 1008)."""
    model = model.to(device).eval()
    outputs = {}
    progress = tqdm(desc="inception features", unit="img", disable=not verbose)
    for images, total in _image_batches(source, batch_size):
        progress.total = total
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
        for name, value in model(x).items():
            outputs.setdefault(name, []).append(value.double().cpu().numpy())
        progress.update(len(images))
    progress.close()
    return {name: np.concatenate(values) for name, values in outputs.items()}


def compute_statistics(source, model, batch_size=50, device="cpu", feature="pool", prefer_stored=False):
    """(mu, sigma) of one feature ("pool" for FID, "spatial" for sFID). A statistics-only .npz (a reference cache)
    returns its stored values; one that also holds images is recomputed unless prefer_stored=True."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        stored = load_statistics(source)
        with np.load(source) as f:
            has_images = "arr_0" in f.files
        if feature in stored and (prefer_stored or not has_images):
            return stored[feature]
    return feature_statistics(compute_features(source, model, batch_size, device)[feature])


#################################################################################
#                                 Command Line                                  #
#################################################################################

def _describe(path, get_model, args):
    """Features (None without images) and {"pool", "spatial"} statistics of one side of the comparison."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path!r}")
    stored, has_images = {}, os.path.isdir(path)
    if path.endswith(".npz"):
        stored = load_statistics(path)
        with np.load(path) as f:
            has_images = "arr_0" in f.files
        if not has_images and not stored:
            raise ValueError(f"{path!r} holds neither images ('arr_0') nor statistics ('mu', 'sigma')")
    feats, stats = None, {}
    if has_images:
        feats = compute_features(path, get_model(), args.batch_size, args.device, verbose=True)
        stats = {name: feature_statistics(feats[name]) for name in ("pool", "spatial")}
    if args.prefer_stored_stats or not has_images:
        stats.update(stored)
    return feats, stats


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
    args = parser.parse_args(argv)

    from eval.inception import FIDInception, FID_WEIGHTS_URL
    if not os.path.isfile(args.inception_weights):
        raise FileNotFoundError(f"FID Inception weights not found at {args.inception_weights!r}: download "
                                f"{FID_WEIGHTS_URL} once by hand and pass its local path")
    models = []  # built on first use: two statistics-only files need no network

    def get_model():
        if not models:
            models.append(FIDInception(args.inception_weights))
        return models[0]

    sample_feats, sample_stats = _describe(args.samples, get_model, args)
    ref_feats, ref_stats = _describe(args.reference, get_model, args)
    if args.save_ref_stats and "pool" in ref_stats:
        save_statistics(args.save_ref_stats, *ref_stats["pool"], *ref_stats.get("spatial", (None, None)))

    skipped = []
    if "pool" in sample_stats and "pool" in ref_stats:
        print(f"FID: {frechet_distance(*sample_stats['pool'], *ref_stats['pool']):.4f}")
    else:
        skipped.append("FID")
    if "spatial" in sample_stats and "spatial" in ref_stats:
        print(f"sFID: {frechet_distance(*sample_stats['spatial'], *ref_stats['spatial']):.4f}")
    else:
        skipped.append("sFID (needs mu_s/sigma_s or images on both sides)")
    if sample_feats is not None:
        print("Inception Score: {:.4f} +- {:.4f}".format(*inception_score(sample_feats["logits_unbiased"])))
    else:
        skipped.append("Inception Score (needs sample images)")
    if sample_feats is not None and ref_feats is not None:
        precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], device=args.device)
        print(f"Precision: {precision:.4f}\nRecall: {recall:.4f}")
    else:
        skipped.append("precision/recall (need images on both sides)")
    if skipped:
        print("Skipped: " + "; ".join(skipped))


if __name__ == "__main__":
    main()
