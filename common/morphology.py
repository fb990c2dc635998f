"""Binary thinning to 1-pixel curves (MATLAB bwmorph 'thin'): shared by the dense labels (data/dense.py, edge maps
from label maps) and the boundary metric (eval/dense_metrics.py, SEISM's thinning of predictions and ground truth)."""
import numpy as np


def _thinning_luts():
    """Deletion look-up tables of Guo & Hall (1989) two-subiteration thinning (as skimage.morphology.thin).

    Neighbour bit i of the 8-neighbourhood code: 0 E, 1 NE, 2 N, 3 NW, 4 W, 5 SW, 6 S, 7 SE (x1..x8 in the paper).
    """
    lut_first, lut_second = np.zeros(256, bool), np.zeros(256, bool)
    for code in range(256):
        x = [(code >> i) & 1 for i in range(8)]
        # G1: exactly one 8-connected run of foreground around the pixel (crossing number X_H = 1).
        crossing = sum(1 for i in (0, 2, 4, 6) if not x[i] and (x[i + 1] or x[(i + 2) % 8]))
        # G2: 2 <= min(n1, n2) <= 3, i.e. neither an end point nor an interior pixel.
        n1 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[k - 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if x[k] or x[(k + 1) % 8])
        g12 = crossing == 1 and min(n1, n2) in (2, 3)
        # G3 / G3': delete only from the south-east (first) or north-west (second) side.
        lut_first[code] = g12 and not ((x[1] or x[2] or not x[7]) and x[0])
        lut_second[code] = g12 and not ((x[5] or x[6] or not x[3]) and x[4])
    return lut_first, lut_second


_THIN_LUTS = _thinning_luts()
# (row, col) offset of neighbour bit i, in the bit order of _thinning_luts.
_NEIGHBOUR_OFFSETS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def thin(mask, max_iter=None):
    """Morphological thinning of a binary image to 1-pixel-wide, 8-connected curves (Guo & Hall 1989).

    The algorithm of MATLAB's bwmorph(BW, 'thin', Inf) and skimage.morphology.thin (outside the image = 0).
    Only contour pixels are examined: a pixel whose 4 neighbours are all foreground has crossing number 0
    and is never deleted, so each pass costs O(contour) and a filled blob O(area) in all.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"thin() expects a 2-D binary image, got shape {mask.shape}")
    padded = np.pad(mask, 1).astype(np.uint8)
    width = padded.shape[1]
    flat = padded.ravel()
    shifts = np.array([dr * width + dc for dr, dc in _NEIGHBOUR_OFFSETS])
    four = shifts[[0, 2, 4, 6]]
    fg = np.flatnonzero(flat)
    candidate = np.zeros(flat.size, dtype=bool)
    cand = fg[(flat[fg[:, None] + four] == 0).any(1)] if fg.size else fg
    candidate[cand] = True
    iteration, changed = 0, True
    while changed and (max_iter is None or iteration < max_iter):
        changed = False
        for lut in _THIN_LUTS:
            # Both subiterations delete in parallel: every code is read before any pixel is removed.
            codes = np.zeros(cand.size, dtype=np.int64)
            for bit, shift in enumerate(shifts):
                codes |= flat[cand + shift].astype(np.int64) << bit
            delete = lut[codes]
            if not delete.any():
                continue
            gone = cand[delete]
            flat[gone] = 0
            candidate[gone] = False
            # Foreground 4-neighbours of deleted pixels now touch the background: they become candidates.
            exposed = (gone[:, None] + four).ravel()
            exposed = exposed[(flat[exposed] > 0) & ~candidate[exposed]]
            candidate[exposed] = True
            cand = np.concatenate([cand[~delete], np.unique(exposed)])
            changed = True
        iteration += 1
    return padded[1:-1, 1:-1].astype(bool)
