"""pix2pix-style image pairs for image-to-image translation -> (source, target), both (3, size, size) in [-1, 1].

Layouts:
  "side-by-side": every image under root (recursively) is A|B, the left half A and the right half B (pix2pix's
                  facades / maps / edges2shoes release);
  "two-folders":  root/A/** and root/B/** hold the two sides as separate files paired by relative path without
                  extension (A/x.jpg <-> B/x.png); unpaired files are skipped with one warning. A B image whose size
                  differs from its A image is resized to A's size first so the pair stays pixel-aligned.
direction "AtoB" returns (A, B), "BtoA" returns (B, A). Both sides get the same ADM center crop (see image_folder).
Unreadable files are reported once and the next readable pair is returned, as in ImageFolder.
`SyntheticPairs` needs no files: (semseg as a colour map, image) from SyntheticShapes(dense=True).
Horizontal flips are NOT done here: the training loops flip batches on the device, so a resumed run is exact.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.image_folder import (IMG_EXTENSIONS, center_crop_arr, check_data_dir, list_images, load_rgb,
                               next_readable, to_tensor)
from data.synthetic import SyntheticShapes

LAYOUTS = ("side-by-side", "two-folders")
DIRECTIONS = ("AtoB", "BtoA")


#################################################################################
#                               Paired image files                              #
#################################################################################

class PairedImages(Dataset):
    """(source, target) pairs from A|B files or from root/A and root/B folders with matching names."""

    def __init__(self, root, image_size, layout="side-by-side", direction="AtoB"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction '{direction}'; choose one of {', '.join(DIRECTIONS)}")
        check_data_dir(root, "a folder of side-by-side A|B images (or with A/ and B/ sub-folders)")
        self.root, self.image_size, self.layout, self.direction = root, image_size, layout, direction
        if layout == "side-by-side":
            self.pairs = [(p, None) for p in list_images(root)]
        else:
            self.pairs = self.match_folders(root)
        if not self.pairs:
            raise FileNotFoundError(f"no {layout} image pairs ({', '.join(IMG_EXTENSIONS)}) found under '{root}'")
        self.unreadable = set()

    @staticmethod
    def match_folders(root):
        """[(A path, B path)] for files under root/A and root/B with the same relative path minus extension."""
        dir_a, dir_b = os.path.join(root, "A"), os.path.join(root, "B")
        if not (os.path.isdir(dir_a) and os.path.isdir(dir_b)):
            raise FileNotFoundError(f"'{root}' has no A/ and B/ sub-folders; put the pairs there or pass "
                                    f"layout='side-by-side' for A|B images in one file")
        key = lambda path, top: os.path.splitext(os.path.relpath(path, top))[0]
        files_a = {key(p, dir_a): p for p in list_images(dir_a)}
        files_b = {key(p, dir_b): p for p in list_images(dir_b)}
        common = sorted(files_a.keys() & files_b.keys())
        unpaired = len(files_a) + len(files_b) - 2 * len(common)
        if unpaired and common:
            warnings.warn(f"{unpaired} file(s) under '{root}/A' and '{root}/B' have no partner and are skipped")
        return [(files_a[k], files_b[k]) for k in common]

    def __len__(self):
        return len(self.pairs)

    def read(self, idx):
        path_a, path_b = self.pairs[idx]
        image = load_rgb(path_a)
        if path_b is None:  # A|B in one file
            half, height = image.width // 2, image.height
            image_a, image_b = image.crop((0, 0, half, height)), image.crop((half, 0, 2 * half, height))
        else:
            image_a, image_b = image, load_rgb(path_b)
            if image_b.size != image_a.size:
                image_b = image_b.resize(image_a.size, resample=Image.BICUBIC)
        a = to_tensor(center_crop_arr(image_a, self.image_size))
        b = to_tensor(center_crop_arr(image_b, self.image_size))
        return (a, b) if self.direction == "AtoB" else (b, a)

    def __getitem__(self, idx):
        return next_readable(idx, len(self.pairs), self.read, self.unreadable)


#################################################################################
#                         Synthetic pairs (no files)                            #
#################################################################################

def voc_palette(num_colors):
    """The PASCAL VOC colour map (bit-interleaved class index), uint8 (num_colors, 3); class 0 is black."""
    palette = np.zeros((num_colors, 3), np.uint8)
    for i in range(num_colors):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        palette[i] = rgb
    return palette


class SyntheticPairs(Dataset):
    """(semantic map as a VOC-palette colour image, the photo-like image), both (3, H, W) in [-1, 1]; swapped for
    direction "BtoA" (image -> label map, Table 4's direction)."""

    def __init__(self, num_samples=10000, image_size=32, seed=0, num_classes=4, direction="AtoB"):
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction '{direction}'; choose one of {', '.join(DIRECTIONS)}")
        self.shapes = SyntheticShapes(num_samples, image_size, seed, num_classes, dense=True)
        self.direction = direction
        self.palette = torch.from_numpy(voc_palette(num_classes + 1)).float() / 127.5 - 1  # (classes, 3)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, idx):
        item = self.shapes[idx]
        colours = self.palette[item["semseg"]].permute(2, 0, 1).contiguous()
        return (colours, item["image"]) if self.direction == "AtoB" else (item["image"], colours)
