"""PASCAL-Context and NYUD-v2 multi-task readers in the ATRC / InvPT / TaskPrompter release layout.

Each item is a dict like the synthetic dense set (data/synthetic.py, dense=True):
  image        (3, H, W) float32 in [-1, 1]
  semseg       (H, W) int64, 255 = ignore
  human_parts  (H, W) int64, 7 classes (background + 6 parts), all 255 on images without annotated people
  sal          (H, W) float32 in {0, 1}
  normals      (3, H, W) float32 in [-1, 1] (PNG -> 2 x / 255 - 1); the zero vector marks invalid pixels
  edge         (H, W) float32 in {0, 1}
  depth        (H, W) float32 metres, 0 = invalid
  name         image id (str)
Padded pixels (resize="pad") are ignored everywhere: 255 for semseg / human_parts / sal / edge, a zero normal,
depth 0, image -1 (black, as upstream pads raw pixels with 0).

Fixed size (`image_size`, an int or (H, W); None keeps the native size):
  resize="pad"      pad (centred) up to the size, centre-crop if larger: upstream's evaluation transform for
                    PASCAL (every image is <= 500 px, padded to 512). Labels are never interpolated.
  resize="stretch"  resize to the size: bilinear for image / normals / depth, nearest for class and binary
                    maps; invalid depth / normal pixels stay invalid (their mask is resized with nearest).
No random augmentation here: scaling / cropping / flipping belong to the training loop (flips on-device, see
data/synthetic.py). Paths and label conventions follow prismformore/Multi-Task-Transformer `data/pascal_context.py`,
`TaskPrompter/data/nyud.py` and `data/transforms.py` (AddIgnoreRegions, PadImage).
"""
import os

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from eval.dense_metrics import thin

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
    """Paint the parts of every annotated person; all-ignore when no person part is annotated.

    The .mat holds anno -> objects (class, class_ind, mask, parts) -> parts (part_name, mask); fields are read by
    position as upstream. Upstream returns zeros for images without person parts and AddIgnoreRegions turns a
    map made only of 0 / 255 into all-255; the same rule is applied here.
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
    if np.all((target == 0) | (target == IGNORE_INDEX)):
        target[:] = IGNORE_INDEX
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
#                         Fixed-size sample (pad / crop or resize)               #
#################################################################################

# How each key is padded and resized: (pad value, "linear" | "nearest").
_KEY_RULES = {
    "image": (-1.0, "linear"), "normals": (0.0, "linear"), "depth": (0.0, "linear"),
    "semseg": (IGNORE_INDEX, "nearest"), "human_parts": (IGNORE_INDEX, "nearest"),
    "sal": (IGNORE_INDEX, "nearest"), "edge": (IGNORE_INDEX, "nearest"),
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


def _to_tensors(sample, name):
    """numpy (H, W[, C]) maps -> torch tensors with the dtypes of the synthetic dense set."""
    out = {"image": torch.from_numpy(sample["image"].transpose(2, 0, 1).copy())}
    for key in ("semseg", "human_parts"):
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
#                         PASCAL-Context                                         #
#################################################################################

class PascalContext(torch.utils.data.Dataset):
    """PASCAL-Context multi-task set: 4998 train / 5105 val images, semseg 21 classes, human parts 7 classes."""

    TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
    NUM_CLASSES = {"semseg": 21, "human_parts": 7}
    LAYOUT = ("JPEGImages/, ImageSets/Context/{train,val}.txt, semseg/VOC12/ or semseg/pascal-context/, "
              "human_parts/, pascal-context/trainval/, normals_distill/, sal_distill/")
    _TASK_FOLDERS = {"semseg": "semseg/VOC12|semseg/pascal-context", "human_parts": "human_parts",
                     "sal": "sal_distill", "normals": "normals_distill", "edge": "pascal-context/trainval"}

    def __init__(self, root, split="train", tasks=TASKS, image_size=512, resize="pad"):
        _check_args(tasks, self.TASKS, resize, "PascalContext")
        self.root, self.tasks, self.resize = root, tuple(tasks), resize
        self.size = _parse_size(image_size)
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

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        paths = self._paths(image_id)
        image = _read_rgb(paths["image"])
        shape = image.shape[:2]
        sample = {"image": image.astype(np.float32) / 127.5 - 1.0}
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
        for key, array in sample.items():
            if array.shape[:2] != shape:
                raise ValueError(f"PascalContext: '{key}' of {image_id} is {array.shape[:2]}, image is {shape}")
        if self.size is not None:
            sample = _fit(sample, self.size, self.resize)
        return _to_tensors(sample, image_id)


#################################################################################
#                         NYUD-v2                                                #
#################################################################################

class NYUD(torch.utils.data.Dataset):
    """NYUD-v2 multi-task set: 795 train / 654 val images (480x640), semseg 40 classes, depth in metres."""

    TASKS = ("semseg", "depth", "normals", "edge")
    NUM_CLASSES = {"semseg": 40}
    LAYOUT = "images/, segmentation/, depth/, normals/, edge/, gt_sets/{train,val}.txt"
    _TASK_FILES = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
                   "normals": ("normals", ".png"), "edge": ("edge", ".png")}

    def __init__(self, root, split="train", tasks=TASKS, image_size=(448, 576), resize="pad"):
        _check_args(tasks, self.TASKS, resize, "NYUD")
        self.root, self.tasks, self.resize = root, tuple(tasks), resize
        self.size = _parse_size(image_size)
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

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        paths = self._paths(image_id)
        image = _read_rgb(paths["image"])
        sample = {"image": image.astype(np.float32) / 127.5 - 1.0}
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
        if self.size is not None:
            sample = _fit(sample, self.size, self.resize)
        return _to_tensors(sample, image_id)
