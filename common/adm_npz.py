"""The ADM evaluator's sample file (openai/guided-diffusion `evaluations/`): a `.npz` whose `arr_0` is uint8 NHWC
images, written atomically; and the authors' rounding of model outputs in [-1, 1] to those uint8 values."""
import os
import tempfile

import numpy as np
import torch


# Images in [-1, 1] -> uint8 exactly as the authors' sample_ddp.py: DiT / DTR truncate clamp(127.5 x + 128, 0, 255)
# (= round(127.5 (x + 1)) up to ties); ANT rounds it, half a grey level brighter on average. Their FIDs come from these.
QUANTIZERS = {"dit": torch.floor, "ant": torch.round}


def to_uint8(images, quantize="dit"):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 on the CPU, rounded as the authors' QUANTIZERS[quantize]."""
    return QUANTIZERS[quantize]((127.5 * images + 128.0).clamp(0, 255)).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def check_images(images, what):
    """ValueError unless `images` is what an ADM sample file holds: a non-empty uint8 (N, H, W, 3) array."""
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3
            or images.shape[0] == 0):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{what} must be a non-empty uint8 array of shape (N, H, W, 3), got {dtype} {shape}; convert "
                         f"with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) and NCHW -> NHWC")


def atomic_savez(path, **arrays):
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
    check_images(images_uint8_nhwc, "images")
    atomic_savez(path, arr_0=images_uint8_nhwc)
