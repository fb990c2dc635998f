"""ImageNet-style class folders -> (image, label) with the ADM / DiT center-crop preprocessing.

Layout: `root/<class name>/**/<image>`; classes are the sorted sub-folder names (index = position), images are found
recursively with the usual extensions. A flat folder with images and no sub-folders (FFHQ-style) is one class, 0;
when sub-folders exist, images lying directly in root are ignored (as torchvision's ImageFolder does).
Images are float (3, size, size) tensors in [-1, 1]. An unreadable or corrupt file is reported once with
`warnings.warn` and the next readable item is returned in its place, so an epoch never crashes on one bad file.
Horizontal flips are NOT done here: the training loops flip batches on the device, so a resumed run is exact.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")  # as torchvision


#################################################################################
#                          Reading and preprocessing                            #
#################################################################################

class UnreadableImageError(OSError):
    """A file that PIL cannot decode (corrupt, truncated or not an image)."""


def list_images(folder):
    """Sorted paths of all images under folder, recursively (hidden folders skipped, symlinks followed)."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return paths


def load_rgb(path):
    """Decode an image file fully into RGB, raising UnreadableImageError for anything PIL cannot read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode, so truncation shows up here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"skipping unreadable image '{path}' ({type(err).__name__}: {err}); "
                                   f"the next readable item is used instead") from err


def center_crop_arr(pil_image, image_size):
    """ADM's center crop (as facebookresearch/DiT train.py, from openai/guided-diffusion image_datasets.py).

    Halve with BOX filtering while the short side is >= 2 * image_size (good anti-aliasing), then BICUBIC-resize so
    the short side equals image_size, then take the central image_size x image_size crop. Returns uint8 (H, W, 3).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def to_tensor(arr):
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1] (ADM: x / 127.5 - 1)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1


def next_readable(idx, num_items, read_item, unreadable):
    """read_item(j) for the first j = idx, idx + 1, ... (mod num_items) that reads; warn once per bad item."""
    for k in range(num_items):
        j = (idx + k) % num_items
        if j in unreadable:
            continue
        try:
            return read_item(j)
        except UnreadableImageError as err:
            unreadable.add(j)
            warnings.warn(str(err))
    raise RuntimeError(f"none of the {num_items} images could be read; check the data folder")


def check_data_dir(root, layout_hint):
    """Raise the one-line error every data loader uses for a missing folder."""
    if os.path.isfile(root):
        raise FileNotFoundError(f"--data '{root}' is a file, not a folder; pass --data synthetic or {layout_hint}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory '{root}' does not exist; pass --data synthetic or {layout_hint}")


#################################################################################
#                                    Dataset                                    #
#################################################################################

class ImageFolder(Dataset):
    """One class per sub-folder of root (sorted names -> 0, 1, ...), or one class for a flat folder of images."""

    def __init__(self, root, image_size):
        check_data_dir(root, "a folder with one sub-folder per class")
        self.root, self.image_size = root, image_size
        subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if subdirs:
            self.classes = subdirs
            per_class = [list_images(os.path.join(root, d)) for d in subdirs]
            self.samples = [(p, label) for label, paths in enumerate(per_class) for p in paths]
            empty = [d for d, paths in zip(subdirs, per_class) if not paths]
            if empty and self.samples:  # kept as classes so that the indices match the sorted folder names
                warnings.warn(f"{len(empty)} class folder(s) under '{root}' hold no images, e.g. '{empty[0]}'")
        else:  # flat folder, e.g. FFHQ
            self.classes = ["."]
            self.samples = [(p, 0) for p in list_images(root)]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under '{root}'; expected "
                                    f"root/<class>/<image> or a flat folder of images")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.unreadable = set()  # indices already reported, skipped silently afterwards

    def __len__(self):
        return len(self.samples)

    def read(self, idx):
        path, label = self.samples[idx]
        return to_tensor(center_crop_arr(load_rgb(path), self.image_size)), label

    def __getitem__(self, idx):
        return next_readable(idx, len(self.samples), self.read, self.unreadable)
