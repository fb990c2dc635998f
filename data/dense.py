"""PASCAL-Context and NYUD-v2 multi-task readers in the ATRC / InvPT / TaskPrompter release layout, with the
TaskDiffusion authors' input pipeline (YuqiYang213/TaskDiffusion `utils/common_config.py`, `data/transforms.py`).

Each item is a dict like the synthetic dense set (data/synthetic.py, dense=True):
  image        (3, H, W) float32, ImageNet-standardised: (x / 255 - mean) / std, mean/std of IMAGENET_MEAN/STD
  semseg       (H, W) int64, 255 = ignore
  human_parts  (H, W) int64, 7 classes (background + 6 parts), all 255 where no person part is visible
  sal          (H, W) float32 in {0, 1}, 255 = ignore
  normals      (3, H, W) float32 in [-1, 1] (PNG -> 2 x / 255 - 1); 255 in all three channels marks invalid pixels
  edge         (H, W) float32 in {0, 1}, 255 = ignore
  depth        (H, W) float32 metres, 0 = invalid
  name         image id (str)
Padded pixels are ignored: 255 for semseg / human_parts / sal / edge / normals, depth 0, image 0 (the mean colour:
the authors pad after normalising). The last step is theirs too (AddIgnoreRegions): zero-norm normals become 255,
a human-parts map made only of 0 / 255 becomes all 255.

Evaluation (augment=False), to a fixed size (`image_size`, an int or (H, W); None keeps the native size):
  resize="pad"      normalise, then pad (centred) up to the size: the authors' valid transform (PASCAL images are
                    <= 500 px, padded to 512). Their PadImage never crops, so their model only accepts images of at
                    most the size (NYUD: 448x576); we centre-crop larger ones instead of failing. Labels are never
                    interpolated.
  resize="stretch"  resize to the size: bilinear for image / normals / depth, nearest for class and binary
                    maps; invalid depth / normal pixels stay invalid (their mask is resized with nearest). Ours.
Training (augment=True, the authors' train transform, on image and labels together): random scaling 0.5-2.0,
random crop to `image_size` re-drawn while one semseg class covers >= 75 % (their RandomCrop), horizontal flip
(normals' x negated), photometric distortion of the image only, then normalise, pad, ignore regions. The item's
randomness is np.random.default_rng([seed, step, index]), so a run is exactly resumable whatever the workers:
keys come as (index, step) from StepKeyedSampler.
Paths and label conventions follow prismformore/Multi-Task-Transformer `data/pascal_context.py`,
`TaskPrompter/data/nyud.py` and `data/transforms.py`.
"""
import os

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from common.morphology import thin
from common.training_run import ResumableSampler, infinite_loader, random_hflip

IGNORE_INDEX = 255


#################################################################################
#                         File readers and label conventions                     #
#################################################################################

def _read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def _read_png(path):
    """PNG as stored (palette indices for 'P' images, no colour conversion)."""
    return np.asarray(Image.open(path))


def _normals_from_png(png):
    """8-bit RGB normals -> [-1, 1] vectors, (H, W, 3) float32."""
    return (2.0 * png[..., :3].astype(np.float32) / 255.0 - 1.0).astype(np.float32)


def _edge_from_label_map(label_map):
    """Boundaries where the label changes: thin(|Laplacian(LabelMap)| > 0), as upstream's _load_edge.

    Upstream uses cv2.Laplacian (ksize 1 -> 4-neighbour kernel, BORDER_REFLECT_101 == scipy 'mirror') and
    skimage.morphology.thin (Guo-Hall, re-implemented in eval.dense_metrics.thin).
    """
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    laplacian = ndimage.convolve(label_map.astype(np.float64), kernel, mode="mirror")
    return thin(np.abs(laplacian) > 0).astype(np.float32)


# PASCAL-Part person parts -> 6 classes (Multi-Task-Transformer data/pascal_context.py, HUMAN_PART[6]):
# 1 head, 2 torso, 3 upper arm, 4 lower arm + hand, 5 upper leg, 6 lower leg + foot.
HUMAN_PART_CLASSES = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1, "rebrow": 1,
    "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "lhand": 4, "rlarm": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5, "llleg": 6, "lfoot": 6, "rlleg": 6, "rfoot": 6,
}
PERSON_CLASS = 15  # VOC index of "person" in the PASCAL-Part annotations


def _human_parts_from_mat(path, shape):
    """Paint the parts of every annotated person (zeros when there is none: `_add_ignore_regions` then ignores all).

    The .mat holds anno -> objects (class, class_ind, mask, parts) -> parts (part_name, mask); fields are read by
    position as upstream.
    """
    objects = scipy.io.loadmat(path)["anno"][0][0][1][0]
    target = np.zeros(shape, dtype=np.int64)
    for obj in objects:
        if int(obj[1][0][0]) != PERSON_CLASS or len(obj[3]) == 0:
            continue
        for part in obj[3][0]:
            name = str(part[0][0])
            if name not in HUMAN_PART_CLASSES:
                raise ValueError(f"{path}: unknown human part '{name}'; expected one of {sorted(HUMAN_PART_CLASSES)}")
            target[part[1].astype(bool)] = HUMAN_PART_CLASSES[name]
    return target


# PASCAL-Context label ids whose distilled normals are kept (others are zeroed = invalid). Upstream builds this
# list at run time from data/db_info/{nyu,context}_classes.json (classes present in both NYU and Context, minus
# "unknown", plus "tvmonitor" = 427); it is expanded here so no JSON is needed
# (source: SimonVandenhende/Multi-Task-Learning-PyTorch data/db_info/*.json).
NORMALS_VALID_CONTEXT_CLASSES = frozenset([
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55,
    56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115,
    122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197,
    199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255,
    260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379,
    380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440,
    441, 442, 443, 444, 446, 454, 457,
])


#################################################################################
#                    Normalisation, fixed-size sample, ignore regions            #
#################################################################################

# The authors normalise with ImageNet statistics (utils/common_config.py, transforms.Normalize) for released and our
# own runs alike: the released weights expect it, and padding after it gives the mean colour, not black.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize_image(rgb):
    """(H, W, 3) RGB in [0, 255] -> float32 (x / 255 - mean) / std, in the authors' order of float32 operations."""
    return (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def normalize_tensor(image01):
    """(..., 3, H, W) tensor in [0, 1] -> ImageNet-standardised (for the synthetic set, generated in [-1, 1])."""
    mean, std = (torch.as_tensor(v, device=image01.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (image01 - mean) / std


def denormalize_tensor(image):
    """Inverse of the normalisation, mapped to [-1, 1] for pictures: (..., 3, H, W) -> (x * std + mean) * 2 - 1."""
    mean, std = (torch.as_tensor(v, device=image.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (image * std + mean) * 2 - 1


# How each key is padded and resized: (pad value, "linear" | "nearest"). The image is padded after normalising, so
# 0 is the mean colour (transforms.PadImage); normals are padded with the zero vector, which becomes 255 afterwards.
_KEY_RULES = {
    "image": (0.0, "linear"), "normals": (0.0, "linear"), "depth": (0.0, "linear"),
    "semseg": (IGNORE_INDEX, "nearest"), "human_parts": (IGNORE_INDEX, "nearest"),
    "sal": (IGNORE_INDEX, "nearest"), "edge": (IGNORE_INDEX, "nearest"),
    "edge_segments": (-1, "nearest"),  # Context label ids reach 459: padding is -1, not 255
}


def _pad_or_crop(array, size, fill):
    """Centre-pad (with `fill`) and/or centre-crop a (H, W, ...) array to `size`."""
    height, width = array.shape[:2]
    out = np.full(size + array.shape[2:], fill, dtype=array.dtype)
    dh, dw = size[0] - height, size[1] - width
    src = slice(max(-dh, 0) // 2, max(-dh, 0) // 2 + min(height, size[0])), \
        slice(max(-dw, 0) // 2, max(-dw, 0) // 2 + min(width, size[1]))
    dst = slice(max(dh, 0) // 2, max(dh, 0) // 2 + min(height, size[0])), \
        slice(max(dw, 0) // 2, max(dw, 0) // 2 + min(width, size[1]))
    out[dst] = array[src]
    return out


def _resize(array, size, mode):
    """Resize a (H, W) or (H, W, C) array: bilinear (align_corners=False) or nearest."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None, None] if array.ndim == 2 else tensor.permute(2, 0, 1)[None]
    if mode == "linear":
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    else:
        tensor = F.interpolate(tensor, size=size, mode="nearest")
    out = tensor[0, 0] if array.ndim == 2 else tensor[0].permute(1, 2, 0)
    return out.numpy().astype(array.dtype)


def _fit(sample, size, resize):
    """Bring every map of a (H, W[, C]) numpy sample to `size`."""
    out = {}
    for key, array in sample.items():
        fill, mode = _KEY_RULES[key]
        if resize == "pad":
            out[key] = _pad_or_crop(array, size, fill)
            continue
        resized = _resize(array, size, mode)
        if key in ("depth", "normals"):  # keep invalid pixels invalid instead of blending them in
            valid = array > 0 if key == "depth" else np.linalg.norm(array, axis=-1) > 0
            valid = _resize(valid.astype(np.float32), size, "nearest") > 0.5
            resized[~valid] = 0
        out[key] = resized
    return out


def _add_ignore_regions(sample):
    """The authors' last label step (transforms.AddIgnoreRegions): zero-norm normals -> 255 in all three channels;
    a human-parts map of only background / ignore (no person part left, e.g. after a crop) -> all 255."""
    if "normals" in sample:
        normals = sample["normals"]
        sample["normals"] = np.where((np.linalg.norm(normals, axis=-1) == 0)[..., None], np.float32(IGNORE_INDEX),
                                     normals).astype(np.float32)
    if "human_parts" in sample:
        parts = sample["human_parts"]
        if np.all((parts == 0) | (parts == IGNORE_INDEX)):
            sample["human_parts"] = np.full_like(parts, IGNORE_INDEX)
    return sample


def _to_tensors(sample, name):
    """numpy (H, W[, C]) maps -> torch tensors with the dtypes of the synthetic dense set."""
    out = {"image": torch.from_numpy(sample["image"].transpose(2, 0, 1).copy())}
    for key in ("semseg", "human_parts", "edge_segments"):
        if key in sample:
            out[key] = torch.from_numpy(sample[key].astype(np.int64))
    for key in ("sal", "edge", "depth"):
        if key in sample:
            out[key] = torch.from_numpy(sample[key].astype(np.float32))
    if "normals" in sample:
        out["normals"] = torch.from_numpy(sample["normals"].transpose(2, 0, 1).astype(np.float32))
    out["name"] = name
    return out


def _parse_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int, (H, W) or None, got {image_size!r}")
    return tuple(int(s) for s in image_size)


def _check_args(tasks, all_tasks, resize, dataset):
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"{dataset}: unknown task(s) {unknown}; choose from {list(all_tasks)}")
    if resize not in ("pad", "stretch"):
        raise ValueError(f"{dataset}: resize must be 'pad' or 'stretch', got {resize!r}")


def _check_folders(root, required, layout, dataset):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset} root '{root}' does not exist; expected a folder with {layout}")
    missing = [sub for sub in required if not any(os.path.isdir(os.path.join(root, s)) for s in sub.split("|"))]
    if missing:
        raise FileNotFoundError(f"{dataset} root '{root}' lacks sub-folder(s) {', '.join(missing)}; "
                                f"expected the ATRC release layout: {layout}")


def _read_split(root, split_dir, split, dataset):
    path = os.path.join(root, split_dir, split + ".txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: split file '{path}' not found; expected {split_dir}/train.txt and val.txt")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _require_file(path, dataset):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: missing file '{path}'; is the release fully extracted?")
    return path


#################################################################################
#          Training augmentation (the authors' data/transforms.py, ATRC's)       #
#################################################################################
# All functions take and return numpy samples {key: (H, W[, C])}, the image still in [0, 255]. Labels are resized
# with nearest, the image bilinearly (RandomScaling's cv2 modes: INTER_NEAREST for every label, depth and normals
# included, INTER_LINEAR for the image; torch's "nearest" and "bilinear" (align_corners=False) compute the same
# source pixels as these).

def random_scale(sample, rng, factors=(0.5, 2.0)):
    """RandomScaling: one factor s ~ U(0.5, 2.0) for all maps, new size int(H s) x int(W s); depth / s (a closer
    view of the same scene)."""
    scale = rng.uniform(*factors)
    height, width = sample["image"].shape[:2]
    size = (int(height * scale), int(width * scale))
    out = {}
    for key, array in sample.items():
        out[key] = _resize(array, size, "linear" if key == "image" else "nearest")
        if key == "depth":
            out[key] = out[key] / np.float32(scale)  # 0 (invalid) stays 0
    return out


def _crop_location(shape, size, rng):
    """RandomCrop.get_random_crop_loc: uniform offsets in [0, max(H - h, 0)] x [0, max(W - w, 0)]; None when the
    map already has the crop size."""
    if tuple(shape[:2]) == tuple(size):
        return None
    top = int(rng.integers(0, max(shape[0] - size[0], 0) + 1))
    left = int(rng.integers(0, max(shape[1] - size[1], 0) + 1))
    return top, left


def _crop(array, location, size):
    if location is None:
        return array
    top, left = location
    return array[top:top + size[0], left:left + size[1]]  # shorter where the map is smaller: padded later


def _class_ratio_ok(semseg, cat_max_ratio):
    """RandomCrop's test: at least two classes (255 not counted) and none covering cat_max_ratio or more."""
    labels, counts = np.unique(semseg, return_counts=True)
    counts = counts[labels != IGNORE_INDEX]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(sample, size, rng, cat_max_ratio=0.75, tries=10):
    """RandomCrop(size, cat_max_ratio=0.75): draw a crop; while its semseg fails the class-ratio test, re-draw, at
    most `tries` times (the last re-draw is kept untested, as theirs). Without semseg the first crop is kept."""
    location = _crop_location(sample["image"].shape, size, rng)
    if cat_max_ratio < 1.0 and "semseg" in sample:
        for _ in range(tries):
            if _class_ratio_ok(_crop(sample["semseg"], location, size), cat_max_ratio):
                break
            location = _crop_location(sample["image"].shape, size, rng)
    return {key: _crop(array, location, size) for key, array in sample.items()}


def random_flip(sample, rng):
    """RandomHorizontalFlip(p=0.5) of every map; a mirrored surface faces the other way, so normals' x is negated."""
    if rng.random() >= 0.5:
        return sample
    out = {key: array[:, ::-1].copy() for key, array in sample.items()}
    if "normals" in out:
        out["normals"][..., 0] *= -1
    return out


def _convert(channel, alpha=1.0, beta=0.0):
    """PhotoMetricDistortion.convert: x * alpha + beta, clipped to [0, 255], truncated to uint8."""
    return np.clip(channel.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def rgb_to_hsv_u8(rgb):
    """OpenCV's 8-bit COLOR_RGB2HSV (H in [0, 180), S and V in [0, 255]) with its fixed-point tables
    (color_hsv.simd.hpp, RGB2HSV_b: 12-bit reciprocal tables rounded to nearest), so that the distortion matches
    the authors' cv2 calls without depending on OpenCV."""
    shift = 12
    divisor = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        s_table = np.where(divisor > 0, np.rint((255 << shift) / divisor), 0).astype(np.int64)
        h_table = np.where(divisor > 0, np.rint((180 << shift) / (6.0 * divisor)), 0).astype(np.int64)
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * s_table[v] + (1 << (shift - 1))) >> shift
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * h_table[diff] + (1 << (shift - 1))) >> shift
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb_u8(hsv):
    """OpenCV's 8-bit COLOR_HSV2RGB as its vector path computes it (HSV2RGB_b + HSV2RGB_simd of 4.x, x86 wheels):
    float32 sector formula with h / 30, the two products s * h fused with the subtraction (FMA, emulated in
    float64), x 255 and truncated. Its scalar tail (the last width mod 16-64 pixels of a row) rounds instead:
    at most 1 off there; bit-exact otherwise (checked against opencv-python 4.7, the authors' version)."""
    f32, one = np.float32, np.float32(1.0)
    h = hsv[..., 0].astype(f32) * (f32(6.0) / f32(180.0))
    s = hsv[..., 1].astype(f32) * (one / f32(255.0))
    v = hsv[..., 2].astype(f32) * (one / f32(255.0))
    sector = np.trunc(h)
    f = h - sector
    fused = lambda a, b: (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)  # fma(-a, b, 1)
    tab = np.stack([v, v * (one - s), v * fused(s, f), v * fused(s, one - f)], axis=-1)
    # per sector: which of tab gives (b, g, r) (OpenCV's sector_data)
    order = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    bgr = np.take_along_axis(tab, order[sector.astype(np.int64) % 6], axis=-1)
    return np.clip(np.trunc(bgr[..., ::-1] * f32(255.0)), 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """PhotoMetricDistortion on the image only: brightness +-32, contrast x U(0.5, 1.5) (first or last, 50/50),
    saturation x U(0.5, 1.5), hue +- 18 (of 180), each with p = 0.5; float [0, 255] in, integral float32 out
    (theirs truncates to uint8 first, also when no step fires; it has no channel swap)."""
    img = image.astype(np.uint8)
    if rng.random() < 0.5:
        img = _convert(img, beta=rng.uniform(-brightness, brightness))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = _convert(img, alpha=rng.uniform(*contrast))
    if rng.random() < 0.5:
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        img = hsv_to_rgb_u8(hsv)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue, hue)) % 180  # randint(-18, 17)
        img = hsv_to_rgb_u8(hsv)
    if not contrast_first and rng.random() < 0.5:
        img = _convert(img, alpha=rng.uniform(*contrast))
    return img.astype(np.float32)


def augment(sample, size, rng):
    """The authors' train transform up to Normalize: scale, crop (class-ratio rule), flip, photometric."""
    sample = random_crop(random_scale(sample, rng), size, rng)
    sample = random_flip(sample, rng)
    sample["image"] = photometric_distortion(sample["image"], rng)
    return sample


class StepKeyedSampler(torch.utils.data.Sampler):
    """Wraps a sampler that yields `batch_size` indices per step from step `start_step` on (common.training_run
    ResumableSampler) and yields (index, step) keys: an augmented item then depends on (seed, step, index) only."""

    def __init__(self, sampler, batch_size, start_step=0):
        self.sampler, self.batch_size, self.start_step = sampler, batch_size, start_step

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            yield index, self.start_step + position // self.batch_size


#################################################################################
#                         Common item pipeline                                   #
#################################################################################

class _DenseDataset(torch.utils.data.Dataset):
    """Shared __getitem__: read the raw sample (`_read`), then the authors' train or valid transform."""

    def _setup(self, image_size, resize, augment, seed, dataset):
        self.size = _parse_size(image_size)
        self.resize, self.augment, self.seed = resize, augment, seed
        if augment and self.size is None:
            raise ValueError(f"{dataset}: augment=True crops to image_size; give an image_size")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        if self.augment:
            if not isinstance(key, (tuple, list)):
                raise TypeError(f"augment=True needs (index, step) keys, got {key!r}: load it with "
                                f"data.dense.StepKeyedSampler so that every step draws new augmentations")
            index, step = int(key[0]), int(key[1])
        else:
            index = int(key)
        sample, name = self._read(index)
        if self.augment:
            sample = augment(sample, self.size, np.random.default_rng([self.seed, step, index]))
        sample["image"] = normalize_image(sample["image"])
        if self.augment:
            sample = {k: _pad_or_crop(a, self.size, _KEY_RULES[k][0]) for k, a in sample.items()}
        elif self.size is not None:
            sample = _fit(sample, self.size, self.resize)
        return _to_tensors(_add_ignore_regions(sample), name)


#################################################################################
#                         PASCAL-Context                                         #
#################################################################################

class PascalContext(_DenseDataset):
    """PASCAL-Context multi-task set: 4998 train / 5105 val images, semseg 21 classes, human parts 7 classes."""

    TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
    NUM_CLASSES = {"semseg": 21, "human_parts": 7}
    LAYOUT = ("JPEGImages/, ImageSets/Context/{train,val}.txt, semseg/VOC12/ or semseg/pascal-context/, "
              "human_parts/, pascal-context/trainval/, normals_distill/, sal_distill/")
    _TASK_FOLDERS = {"semseg": "semseg/VOC12|semseg/pascal-context", "human_parts": "human_parts",
                     "sal": "sal_distill", "normals": "normals_distill", "edge": "pascal-context/trainval"}

    def __init__(self, root, split="train", tasks=TASKS, image_size=512, resize="pad", augment=False, seed=0):
        _check_args(tasks, self.TASKS, resize, "PascalContext")
        self.root, self.tasks = root, tuple(tasks)
        self._setup(image_size, resize, augment, seed, "PascalContext")
        required = ["JPEGImages", "ImageSets/Context"] + [self._TASK_FOLDERS[t] for t in self.tasks]
        if "normals" in self.tasks:  # normals are masked with the Context label map
            required.append("pascal-context/trainval")
        _check_folders(root, list(dict.fromkeys(required)), self.LAYOUT, "PascalContext")
        self.ids = _read_split(root, "ImageSets/Context", split, "PascalContext")
        for image_id in self.ids:  # fail now rather than in the middle of an epoch
            for path in self._paths(image_id).values():
                _require_file(path, "PascalContext")

    def _paths(self, image_id):
        paths = {"image": os.path.join(self.root, "JPEGImages", image_id + ".jpg")}
        if "semseg" in self.tasks:
            voc = os.path.join(self.root, "semseg", "VOC12", image_id + ".png")
            context = os.path.join(self.root, "semseg", "pascal-context", image_id + ".png")
            paths["semseg"] = voc if os.path.isfile(voc) else context  # VOC12 first, as upstream
        if "human_parts" in self.tasks:
            paths["human_parts"] = os.path.join(self.root, "human_parts", image_id + ".mat")
        if "sal" in self.tasks:
            paths["sal"] = os.path.join(self.root, "sal_distill", image_id + ".png")
        if "normals" in self.tasks:
            paths["normals"] = os.path.join(self.root, "normals_distill", image_id + ".png")
        if "edge" in self.tasks or "normals" in self.tasks:
            paths["label_map"] = os.path.join(self.root, "pascal-context", "trainval", image_id + ".mat")
        return paths

    def _read(self, index):
        """(numpy sample at the native size, image float32 in [0, 255]; image id)."""
        image_id = self.ids[index]
        paths = self._paths(image_id)
        image = _read_rgb(paths["image"])
        shape = image.shape[:2]
        sample = {"image": image.astype(np.float32)}
        label_map = scipy.io.loadmat(paths["label_map"])["LabelMap"] if "label_map" in paths else None
        if "semseg" in self.tasks:
            sample["semseg"] = _read_png(paths["semseg"]).astype(np.int64)
        if "human_parts" in self.tasks:
            sample["human_parts"] = _human_parts_from_mat(paths["human_parts"], shape)
        if "sal" in self.tasks:
            sal = _read_png(paths["sal"])
            sal = sal[..., 0] if sal.ndim == 3 else sal
            sample["sal"] = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.float32)  # upstream threshold 0.5
        if "normals" in self.tasks:
            normals = _normals_from_png(_read_png(paths["normals"]))
            valid = np.isin(label_map, list(NORMALS_VALID_CONTEXT_CLASSES))
            sample["normals"] = np.where(valid[..., None], normals, 0.0).astype(np.float32)
        if "edge" in self.tasks:
            sample["edge"] = _edge_from_label_map(label_map)
            if not self.augment:  # what SEISM scores PASCAL boundaries against: seg2bmap of the LabelMap
                sample["edge_segments"] = label_map.astype(np.int64)
        for key, array in sample.items():
            if array.shape[:2] != shape:
                raise ValueError(f"PascalContext: '{key}' of {image_id} is {array.shape[:2]}, image is {shape}")
        return sample, image_id


#################################################################################
#                         NYUD-v2                                                #
#################################################################################

class NYUD(_DenseDataset):
    """NYUD-v2 multi-task set: 795 train / 654 val images (480x640), semseg 40 classes, depth in metres."""

    TASKS = ("semseg", "depth", "normals", "edge")
    NUM_CLASSES = {"semseg": 40}
    LAYOUT = "images/, segmentation/, depth/, normals/, edge/, gt_sets/{train,val}.txt"
    _TASK_FILES = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
                   "normals": ("normals", ".png"), "edge": ("edge", ".png")}

    def __init__(self, root, split="train", tasks=TASKS, image_size=(448, 576), resize="pad", augment=False, seed=0):
        _check_args(tasks, self.TASKS, resize, "NYUD")
        self.root, self.tasks = root, tuple(tasks)
        self._setup(image_size, resize, augment, seed, "NYUD")
        required = ["images", "gt_sets"] + [self._TASK_FILES[t][0] for t in self.tasks]
        _check_folders(root, required, self.LAYOUT, "NYUD")
        self.ids = _read_split(root, "gt_sets", split, "NYUD")
        for image_id in self.ids:
            for path in self._paths(image_id).values():
                _require_file(path, "NYUD")

    def _paths(self, image_id):
        paths = {"image": os.path.join(self.root, "images", image_id + ".png")}
        for task in self.tasks:
            folder, ext = self._TASK_FILES[task]
            paths[task] = os.path.join(self.root, folder, image_id + ext)
        return paths

    def _read(self, index):
        """(numpy sample at the native size, image float32 in [0, 255]; image id)."""
        image_id = self.ids[index]
        paths = self._paths(image_id)
        image = _read_rgb(paths["image"])
        sample = {"image": image.astype(np.float32)}
        if "semseg" in self.tasks:
            # 40 classes without background: label - 1, and 0 (unlabelled) -> 255 (TaskPrompter data/nyud.py).
            semseg = _read_png(paths["semseg"]).astype(np.int64) - 1
            sample["semseg"] = np.where(semseg < 0, IGNORE_INDEX, semseg)
        if "depth" in self.tasks:
            depth = np.load(paths["depth"]).astype(np.float32)
            sample["depth"] = depth[..., 0] if depth.ndim == 3 else depth
        if "normals" in self.tasks:
            sample["normals"] = _normals_from_png(_read_png(paths["normals"]))
        if "edge" in self.tasks:
            edge = _read_png(paths["edge"])
            edge = edge[..., 0] if edge.ndim == 3 else edge
            sample["edge"] = (edge.astype(np.float32) / 255.0 > 0.5).astype(np.float32)  # stored as 0 / 255
        for key, array in sample.items():
            if array.shape[:2] != image.shape[:2]:
                raise ValueError(f"NYUD: '{key}' of {image_id} is {array.shape[:2]}, image is {image.shape[:2]}")
        return sample, image_id


#################################################################################
#            Loading for training (resumable order, on-device flips)            #
#################################################################################

class ImageNetStandardised(torch.utils.data.Dataset):
    """The synthetic dense set with its [-1, 1] image standardised like PASCAL / NYUD above: one input
    convention for every data set, so the same model code and the same --backbone-weights fit all of them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        item["image"] = normalize_tensor((item["image"] + 1) / 2)
        return item


def training_loader(dataset, batch_size, rank, world_size, seed, start_step, num_workers, device):
    """Endless, exactly resumable per-rank batches (common.training_run.infinite_loader); an augmenting data set gets
    (index, step) keys instead of indices, so its random crops depend on (seed, step, index) only."""
    if not getattr(dataset, "augment", False):
        return infinite_loader(dataset, batch_size, rank, world_size, seed, start_step, num_workers, device)
    sampler = StepKeyedSampler(ResumableSampler(len(dataset), batch_size, rank, world_size, seed, start_step),
                               batch_size, start_step)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0))


def random_flip_batch(images, targets):
    """Horizontal flip with p = 0.5 per image, on-device, of the image and every label; normals negate n_x."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    out = {t: random_hflip(y, flip) for t, y in targets.items()}
    if "normals" in out:  # a mirrored surface faces the other way along x
        sign = torch.tensor([-1.0, 1.0, 1.0], device=images.device).view(1, 3, 1, 1)
        out["normals"] = torch.where(flip.view(-1, 1, 1, 1), out["normals"] * sign, out["normals"])
    return random_hflip(images, flip), out
