"""Dense multi-task metrics of TaskDiffusion / InvPT / MTI-Net (PASCAL-Context, NYUD-v2), in numpy/scipy.

Units, as the papers report them:
  mIoU, maxF, odsF   percent (0..100, higher is better)
  normals mErr       degrees (lower is better)
  depth RMSE         metres  (lower is better)
  Delta_m            percent (positive = better than the single-task baselines)

Every metric is accumulated over a dataset by a small meter (`update(pred, gt)` per batch, `result()` at the
end); the function forms (`miou`, `max_f`, ...) are one-image/one-batch wrappers. Torch tensors are accepted
anywhere and converted to numpy. Definitions follow prismformore/Multi-Task-Transformer `evaluation/eval_*.py`
(also used by YuqiYang213/TaskDiffusion); the boundary odsF follows the MATLAB SEISM evaluation the papers use,
step by step (see `EdgeMeter` for the procedure and the few remaining differences).
"""
import math

import numpy as np
import torch
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from common.morphology import thin


def _to_numpy(x):
    """torch.Tensor / array-like -> numpy array (no copy for numpy input)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _squeeze_channel(x):
    """(B, 1, H, W) -> (B, H, W) so scalar maps can come with or without their channel axis."""
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def _check_same_shape(pred, gt, what):
    if pred.shape != gt.shape:
        raise ValueError(f"{what}: prediction shape {pred.shape} != ground-truth shape {gt.shape}; "
                         f"resize the prediction to the label size first")


#################################################################################
#                       Semantic segmentation / human parts (mIoU)                #
#################################################################################

class SegMeter:
    """Confusion-matrix mIoU in percent, pixels pooled over the dataset, as TaskDiffusion's evaluator.

    `average="all"` (default, evaluation/eval_semseg.py and eval_human_parts.py): mean over all C classes of
    TP / max(TP + FP + FN, 1e-8), so a class absent from both prediction and ground truth scores 0.
    `average="present"`: mean over the classes that occur in prediction or ground truth only (ours before;
    higher on subsets that miss classes, equal on a full val set where every class occurs).
    Ignored pixels (gt == ignore_index) are dropped whatever the prediction; a prediction outside [0, C) on a
    valid pixel is a false negative of its GT class and no class's false positive, as upstream's per-class
    `pred == c` tests give. Deliberate difference: a GT label outside [0, C) that is not ignore_index raises
    (upstream silently counts it as a false positive of the predicted class), since it means a wrong C.
    """

    AVERAGES = ("all", "present")

    def __init__(self, num_classes, ignore_index=255, average="all"):
        if average not in self.AVERAGES:
            raise ValueError(f"SegMeter: average={average!r}; use one of {self.AVERAGES}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.average = average
        # Column `num_classes` collects predictions outside [0, C) (they still count as false negatives).
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, pred, gt):
        """pred: class indices shaped like gt, or scores with an extra class axis at -3 (argmax taken)."""
        pred, gt = _to_numpy(pred), _squeeze_channel(_to_numpy(gt))
        if pred.ndim == gt.ndim + 1:  # (B, C, H, W) scores against (B, H, W) labels
            pred = pred.argmax(axis=-3)
        pred = _squeeze_channel(pred)
        _check_same_shape(pred, gt, "SegMeter")
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred[valid]
        if gt.size and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(f"SegMeter: ground-truth label {gt.max()} outside [0, {self.num_classes}) "
                             f"and not ignore_index={self.ignore_index}; check num_classes")
        pred = np.where((pred >= 0) & (pred < self.num_classes), pred, self.num_classes)
        flat = gt * (self.num_classes + 1) + pred
        self.confusion += np.bincount(flat, minlength=self.confusion.size).reshape(self.confusion.shape)

    def per_class_iou(self):
        """IoU per class (nan for classes absent from both prediction and ground truth)."""
        tp = np.diag(self.confusion[:, :self.num_classes]).astype(np.float64)
        fn = self.confusion.sum(1) - tp
        fp = self.confusion[:, :self.num_classes].sum(0) - tp
        union = tp + fp + fn
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def result(self):
        iou = self.per_class_iou()
        if self.average == "all":  # eval_semseg.py get_score: np.mean over every class, absent ones as 0
            return float(np.nan_to_num(iou, nan=0.0).mean() * 100)
        return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self):
        """Per-pixel accuracy (Zhu et al. 2017's FCN scores): correctly labelled valid pixels / valid pixels."""
        return float(np.diag(self.confusion[:, :self.num_classes]).sum() / max(self.confusion.sum(), 1))

    def class_accuracy(self):
        """Per-class accuracy: the mean over the classes present in the ground truth of their pixels' recall."""
        total = self.confusion.sum(1)
        recall = np.diag(self.confusion[:, :self.num_classes]) / np.maximum(total, 1)
        return float(recall[total > 0].mean()) if (total > 0).any() else float("nan")


def labels_from_colours(images, palette):
    """Colour-coded label maps (N, 3, H, W) -> class indices (N, H, W): each pixel's nearest palette colour
    (palette (K, 3), same value range as images); reads generated maps whose colours are only approximate."""
    palette = torch.as_tensor(palette, dtype=torch.float32, device=images.device)
    distance = ((images.float()[:, None] - palette[None, :, :, None, None]) ** 2).sum(dim=2)  # (N, K, H, W)
    return distance.argmin(dim=1)


def miou(pred, gt, num_classes, ignore_index=255, average="all"):
    """mIoU in percent of one image or batch (pixels pooled); `average` as in SegMeter."""
    meter = SegMeter(num_classes, ignore_index, average)
    meter.update(pred, gt)
    return meter.result()


#################################################################################
#                         Saliency (maxF, beta^2 = 0.3)                          #
#################################################################################

class SaliencyMeter:
    """maxF over thresholds 0.05..0.95 (step 0.05) with dataset-level TP/FP/FN counts, in percent."""

    def __init__(self, beta2=0.3, ignore_index=255):
        self.beta2 = beta2
        self.ignore_index = ignore_index
        # torch.arange(0.05, 1, 0.05) upstream (evaluation/eval_sal.py); rounded to avoid 0.15000000000000002.
        self.thresholds = np.round(np.arange(1, 20) * 0.05, 6)
        self.true_positives = np.zeros(len(self.thresholds))
        self.predicted_positives = np.zeros(len(self.thresholds))
        self.actual_positives = 0.0

    def update(self, pred_prob, gt):
        """pred_prob: saliency probability in [0, 1] shaped like gt; gt: {0, 1} with ignore_index."""
        pred, gt = _squeeze_channel(_to_numpy(pred_prob)), _squeeze_channel(_to_numpy(gt))
        _check_same_shape(pred, gt, "SaliencyMeter")
        valid = gt != self.ignore_index
        pred, gt = pred[valid].astype(np.float64), gt[valid] > 0.5
        for k, threshold in enumerate(self.thresholds):
            positive = pred >= threshold  # `>=` as upstream
            self.true_positives[k] += np.sum(positive & gt)
            self.predicted_positives[k] += np.sum(positive)
        self.actual_positives += np.sum(gt)

    def curve(self):
        """(thresholds, precision, recall, F) arrays; F = (1 + b2) P R / (b2 P + R), 0 where undefined."""
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = self.true_positives / self.predicted_positives
            recall = self.true_positives / self.actual_positives
            f = (1 + self.beta2) * precision * recall / (self.beta2 * precision + recall)
        return self.thresholds, precision, recall, np.nan_to_num(f)

    def result(self):
        return float(self.curve()[3].max() * 100)


def max_f(pred_prob, gt, beta2=0.3):
    """Saliency maxF in percent of one image or batch (pixels pooled)."""
    meter = SaliencyMeter(beta2)
    meter.update(pred_prob, gt)
    return meter.result()


#################################################################################
#                         Surface normals (mean angular error)                   #
#################################################################################

def _unit(v, axis):
    norm = np.linalg.norm(v, axis=axis, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


class NormalsMeter:
    """Mean angle (degrees) between L2-normalised prediction and ground truth, pooled over valid pixels."""

    def __init__(self):
        self.sum_degrees = 0.0
        self.count = 0

    def update(self, pred, gt, valid=None):
        """pred, gt: (3, H, W) or (B, 3, H, W); invalid pixels: zero-norm GT, GT == 255 (padding), ~valid."""
        pred, gt = _to_numpy(pred).astype(np.float64), _to_numpy(gt).astype(np.float64)
        _check_same_shape(pred, gt, "NormalsMeter")
        if gt.ndim < 3 or gt.shape[-3] != 3:
            raise ValueError(f"NormalsMeter: expected (..., 3, H, W) normals, got shape {gt.shape}")
        mask = (np.linalg.norm(gt, axis=-3) > 0) & ~np.any(gt == 255, axis=-3)
        if valid is not None:
            mask &= _squeeze_channel(_to_numpy(valid)).astype(bool)
        p, g = _unit(pred, -3), _unit(gt, -3)
        # 2 atan2(|p - g|, |p + g|) is the angle between unit vectors, stable near 0 and 180 degrees
        # (evaluation/eval_normals.py NormalsMeter).
        angle = 2 * np.arctan2(np.linalg.norm(p - g, axis=-3), np.linalg.norm(p + g, axis=-3))
        self.sum_degrees += np.degrees(angle[mask]).sum()
        self.count += int(mask.sum())

    def result(self):
        return self.sum_degrees / self.count if self.count else float("nan")


def normal_mean_error(pred, gt, valid=None):
    """Mean angular error in degrees of one image or batch."""
    meter = NormalsMeter()
    meter.update(pred, gt, valid)
    return meter.result()


#################################################################################
#                         Depth (RMSE over 0 < gt < 80 m)                        #
#################################################################################

class DepthMeter:
    """RMSE in metres pooled over all valid pixels of the dataset (not a mean of per-image RMSEs)."""

    def __init__(self, min_depth=0.0, max_depth=80.0):
        # TaskDiffusion utils/config.py: depth_min = 0, depth_max = 80, mask = min < gt < max.
        self.min_depth, self.max_depth = min_depth, max_depth
        self.sum_squared_error = 0.0
        self.count = 0

    def update(self, pred, gt, valid=None):
        """pred, gt: depth maps in metres, (H, W), (B, H, W) or (B, 1, H, W). Clamp pred >= 0 beforehand
        as upstream's get_output does if you want identical numbers."""
        pred, gt = _squeeze_channel(_to_numpy(pred)), _squeeze_channel(_to_numpy(gt))
        _check_same_shape(pred, gt, "DepthMeter")
        pred, gt = pred.astype(np.float64), gt.astype(np.float64)
        mask = np.isfinite(gt) & (gt > self.min_depth) & (gt < self.max_depth)
        if valid is not None:
            mask &= _squeeze_channel(_to_numpy(valid)).astype(bool)
        self.sum_squared_error += np.sum((pred[mask] - gt[mask]) ** 2)
        self.count += int(mask.sum())

    def result(self):
        return math.sqrt(self.sum_squared_error / self.count) if self.count else float("nan")


def depth_rmse(pred, gt, valid=None):
    """Depth RMSE in metres of one image or batch."""
    meter = DepthMeter()
    meter.update(pred, gt, valid)
    return meter.result()


#################################################################################
#                        Edge non-maximum suppression                           #
#################################################################################

def _conv_tri(image, radius):
    """Piotr Dollar's convTri: separable triangle filter [1..r+1..r]/(r+1)^2, symmetric padding."""
    if radius == 0:
        return image
    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float64)
    kernel /= kernel.sum()
    out = ndimage.convolve1d(image, kernel, axis=0, mode="reflect")  # scipy 'reflect' = MATLAB 'symmetric'
    return ndimage.convolve1d(out, kernel, axis=1, mode="reflect")


def _conv_tri_running_sums(image, radius):
    """convTri(I, r) for integer r >= 1 in float32 with the running sums of Dollar's convConst.cpp (convTri /
    convTriY), operation for operation, so that O = f(convTri(E, 4)) rounds as in SEISM; a direct convolution
    differs by ~1e-7, enough to flip sign(-Oxy) (and O) at a fraction of a per mille of the pixels."""
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    if min(height, width) < 4 or 2 * radius + 1 >= min(height, width):  # convTri.m falls back to convn
        return _conv_tri(image.astype(np.float64), radius).astype(np.float32)
    r = radius + 1
    nrm = np.float32(1.0) / np.float32(r * r * r * r)
    two, minus_two = np.float32(2), np.float32(-2)
    rows_x = np.empty_like(image)  # the horizontal pass, column by column (vectors over the rows)
    t = image[:, 0].copy()
    u = t.copy()
    for i in range(1, r):
        t = t + image[:, i]
        u = u + t
    u = nrm * (two * u - t)
    t = np.zeros(height, np.float32)
    rows_x[:, 0] = u
    for i in range(1, width):
        left = image[:, i - 1 - r] if i > r else image[:, r - i]
        right = image[:, i - 1 + r] if i <= width - r else image[:, 2 * width - r - i]
        t = t + ((left + right) + minus_two * image[:, i - 1])
        u = u + nrm * t
        rows_x[:, i] = u
    out = np.empty_like(image)  # convTriY on every column at once (vectors over the columns)
    src = rows_x
    t = src[0].copy()
    u = t.copy()
    for j in range(1, r):
        t = t + src[j]
        u = u + t
    u = two * u - t
    t = np.zeros(width, np.float32)
    out[0] = u
    for j in range(1, height):
        a = src[r - j] if j < r + 1 else src[j - r - 1]
        b = src[r - 1 + j] if j < height - r + 1 else src[2 * height - r - j]
        t = t + ((a + b) - two * src[j - 1])
        u = u + t
        out[j] = u
    return out


def edge_orientation(edge):
    """Edge normal angle in [0, pi) (x = column axis, y = row axis) as SEISM's read_one_cont_png.m.

    [Ox, Oy] = gradient2(convTri(E, 4)); Oxx = d/dx Ox; [Oxy, Oyy] = gradient2(Oy);
    O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi), in single precision. Kept verbatim although it is exact
    only for axis-aligned and 45-degree ridges: with Oxy == 0 (a ridge constant along x) O is 0, so a
    perfectly horizontal edge is compared along itself and not thinned by NMS (thinning does it later).
    """
    smooth = _conv_tri_running_sums(edge, 4)
    # np.gradient = MATLAB gradient / gradient2: central differences inside, one-sided at the border.
    o_x, o_y = np.gradient(smooth, axis=1), np.gradient(smooth, axis=0)
    o_xx, o_xy, o_yy = np.gradient(o_x, axis=1), np.gradient(o_y, axis=1), np.gradient(o_y, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.mod(np.arctan(o_yy * np.sign(-o_xy) / (o_xx + np.float32(1e-5))), np.float32(np.pi))
    # 0/0 only when Oxx == -1e-5 exactly; MATLAB would then read memory at a NaN offset, we pick 0.
    return np.where(np.isfinite(angle), angle, np.float32(0)).astype(np.float32)


def _interp(image, cols, rows):
    """edgesNmsMex.cpp interp(): bilinear lookup at (x = cols, y = rows), clamped to [0, size - 1.001]."""
    height, width = image.shape
    x = np.clip(cols, np.float32(0), np.float32(width - 1.001))
    y = np.clip(rows, np.float32(0), np.float32(height - 1.001))
    x0, y0 = x.astype(np.int64), y.astype(np.int64)  # truncation = floor for x, y >= 0
    dx0, dy0 = x - x0, y - y0
    dx1, dy1 = np.float32(1) - dx0, np.float32(1) - dy0
    return (image[y0, x0] * dx1 * dy1 + image[y0, x0 + 1] * dx0 * dy1
            + image[y0 + 1, x0] * dx1 * dy0 + image[y0 + 1, x0 + 1] * dx0 * dy0)


def edge_nms(edge_prob, radius=1, border=5, multiplier=1.01, smooth_radius=0, orientation=None):
    """Non-maximum suppression of a soft edge map, as SEISM's read_one_cont_png.m + edgesNmsMex.cpp (float32).

    O = `edge_orientation(E)` (or `orientation`); a pixel e > 0 is zeroed if m * e < E interpolated at
    +-d (d = 1..r) along (cos O, sin O); then the `border` pixels nearest each image side are scaled by
    (distance to the side) / border, columns first. SEISM does not pre-smooth E; `smooth_radius=1` gives the
    convTri(E, 1) of HED/SE's nms_process.m instead.
    """
    edge = np.asarray(edge_prob, dtype=np.float32)
    if smooth_radius:
        edge = _conv_tri(edge.astype(np.float64), smooth_radius).astype(np.float32)
    angle = edge_orientation(edge) if orientation is None else np.asarray(orientation, dtype=np.float32)
    out = edge.copy()
    rows, cols = np.nonzero(edge)
    e = edge[rows, cols] * np.float32(multiplier)
    cos_o, sin_o = np.cos(angle[rows, cols]), np.sin(angle[rows, cols])
    rows_f, cols_f = rows.astype(np.float32), cols.astype(np.float32)
    suppress = np.zeros(rows.size, dtype=bool)
    for d in range(-radius, radius + 1):
        if d:
            suppress |= e < _interp(edge, cols_f + np.float32(d) * cos_o, rows_f + np.float32(d) * sin_o)
    out[rows[suppress], cols[suppress]] = 0
    height, width = out.shape
    s = min(border, width // 2, height // 2)
    if s > 0:  # edgesNmsMex: suppress noisy estimates near the image boundary with a linear ramp
        ramp = np.arange(s, dtype=np.float32) / np.float32(s)
        out[:, :s] *= ramp[None, :]
        out[:, width - s:] *= ramp[None, ::-1]
        out[:s] *= ramp[:, None]
        out[height - s:] *= ramp[::-1, None]
    return out


def seg2bmap(seg):
    """BSDS seg2bmap.m: a pixel is boundary if its E, S or SE neighbour has another label (last row: E only,
    last column: S only, corner: never), i.e. 1-pixel boundaries offset half a pixel towards the origin."""
    seg = np.asarray(seg)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    bmap = (seg != east) | (seg != south) | (seg != south_east)
    bmap[-1, :] = seg[-1, :] != east[-1, :]
    bmap[:, -1] = seg[:, -1] != south[:, -1]
    bmap[-1, -1] = False
    return bmap


#################################################################################
#                   One-to-one pixel correspondence (BSDS correspondPixels)      #
#################################################################################

def _diagonal(shape):
    """Image diagonal as correspondPixels.cc computes it, sqrt(rows^2 + cols^2) (hypot may differ by an ulp)."""
    return math.sqrt(shape[0] * shape[0] + shape[1] * shape[1])


def _disc_offsets(radius):
    """(dr, dc) with dr^2 + dc^2 <= radius^2, the match window of BSDS match.cc."""
    r = int(math.ceil(radius))
    dr, dc = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dr ** 2 + dc ** 2 <= radius ** 2
    return dr[inside], dc[inside]


def _candidate_pairs(pred_rc, gt_index, radius):
    """(pred node, GT node) for every predicted pixel and GT pixel within `radius` (Euclidean, in pixels)."""
    height, width = gt_index.shape
    pred_nodes, gt_nodes = [], []
    for dr, dc in zip(*_disc_offsets(radius)):
        r, c = pred_rc[:, 0] + dr, pred_rc[:, 1] + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        nodes = np.flatnonzero(inside)
        hit = gt_index[r[nodes], c[nodes]]
        pred_nodes.append(nodes[hit >= 0])
        gt_nodes.append(hit[hit >= 0])
    return np.concatenate(pred_nodes), np.concatenate(gt_nodes)


def _matching_size(pred_nodes, gt_nodes, num_pred, num_gt):
    """Cardinality of a maximum bipartite matching of the candidate pairs, as a unit-capacity max flow
    source -> predicted -> GT -> sink solved by Dinic's algorithm (Hopcroft-Karp's O(E sqrt V) bound).

    Not csgraph.maximum_bipartite_matching: on these geometric graphs it took minutes for 3k x 3k nodes
    (scipy 1.17), where Dinic takes milliseconds.
    """
    if pred_nodes.size == 0:
        return 0
    source, sink = num_pred + num_gt, num_pred + num_gt + 1
    rows = np.concatenate([np.full(num_pred, source), pred_nodes, num_pred + np.arange(num_gt)])
    cols = np.concatenate([np.arange(num_pred), num_pred + gt_nodes, np.full(num_gt, sink)])
    graph = sparse.csr_matrix((np.ones(rows.size, dtype=np.int32), (rows, cols)), shape=(sink + 1, sink + 1))
    return int(csgraph.maximum_flow(graph, source, sink, method="dinic").flow_value)


def correspond_pixels(pred_edge, gt_edge, max_dist=0.0075):
    """Number of one-to-one matches between two binary edge maps, as BSDS correspondPixels(E, G, maxDist).

    Radius = max_dist * image diagonal (pixels); a predicted and a GT pixel may match if their Euclidean
    distance is <= radius. BSDS solves a min-cost assignment where each unmatched pixel costs 100 * radius
    and a match costs its distance; as any match is cheaper than two outliers (distance <= radius < 200 *
    radius), its optimum has the maximum number of matches, so the count is that of a maximum-cardinality
    matching of the candidate graph (see EdgeMeter for the one place BSDS can fall short of it).
    """
    pred_edge, gt_edge = np.asarray(pred_edge, bool), np.asarray(gt_edge, bool)
    _check_same_shape(pred_edge, gt_edge, "correspond_pixels")
    gt_index = np.full(gt_edge.shape, -1, dtype=np.int64)
    gt_index[gt_edge] = np.arange(int(gt_edge.sum()))
    pred_rc = np.argwhere(pred_edge)
    radius = max_dist * _diagonal(pred_edge.shape)
    pairs = _candidate_pairs(pred_rc, gt_index, radius)
    return _matching_size(*pairs, len(pred_rc), int(gt_edge.sum()))


#################################################################################
#                         Boundary detection (odsF)                              #
#################################################################################

# SEISM parameters/HED.txt, the list the Boundary-Detection-Evaluation-Tools wrapper used by TaskDiffusion
# (and InvPT / TaskPrompter) evaluates with: 0.001, 0.01, 0.02, ..., 0.99, 0.999 (101 values).
SEISM_THRESHOLDS = np.array([0.001] + [k / 100 for k in range(1, 100)] + [0.999])


def _edge_image_counts(prob, gt, valid, thresholds, max_dist, nms, thin_pred, quantize, gt_format):
    """(sumR, cntR, sumP[k], cntP[k]) of one image: SEISM read_one_cont_png + edgesEvalImg at every threshold."""
    rows, cols = np.nonzero(valid)
    box = slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
    prob, gt, valid = prob[box], gt[box], valid[box]
    if quantize:  # the authors' PNG: uint8(255 * sigmoid) truncated, read back with im2single
        # (+1e-6 so that maps that already are k / 255 keep their k despite rounding)
        prob = np.floor(np.clip(prob.astype(np.float64), 0, 1) * 255 + 1e-6).astype(np.float32) / np.float32(255)
    edge = np.where(valid, prob, 0).astype(np.float32)
    if nms:
        edge = edge_nms(edge)
    boundary = seg2bmap(gt) if gt_format == "segmentation" else gt > 0.5
    gt_edge = thin(boundary & valid)  # edgesEvalImg: G = bwmorph(seg2bmap(G), 'thin', Inf)
    gt_index = np.full(gt_edge.shape, -1, dtype=np.int64)
    num_gt = int(gt_edge.sum())
    gt_index[gt_edge] = np.arange(num_gt)
    radius = max_dist * _diagonal(edge.shape)  # correspondPixels: maxDist * diagonal of the (cropped) image
    levels = np.float32(thresholds)  # MATLAB compares the single-precision map with single(threshold)
    count_pred, count_match = np.zeros(len(levels)), np.zeros(len(levels))
    # Graph once over every pixel that survives the lowest threshold and lies within reach of the GT; each
    # threshold takes a subset of rows (thinning only removes pixels, so thin(E > t) lies inside E > min(t)).
    support = edge > levels.min()
    if num_gt:  # only pixels within the radius of a GT pixel can be matched
        disc = np.zeros((2 * int(math.ceil(radius)) + 1,) * 2, dtype=bool)
        dr, dc = _disc_offsets(radius)
        disc[dr + int(math.ceil(radius)), dc + int(math.ceil(radius))] = True
        support &= ndimage.binary_dilation(gt_edge, structure=disc)
    else:
        support[:] = False
    pixel_node = np.full(edge.shape, -1, dtype=np.int64)
    support_rc = np.argwhere(support)
    pixel_node[support] = np.arange(len(support_rc))
    pred_nodes, gt_nodes = _candidate_pairs(support_rc, gt_index, radius)
    previous = None
    for k in np.argsort(levels)[::-1]:  # decreasing thresholds; an unchanged binary map reuses its counts
        binary = edge > levels[k]
        key = int(binary.sum())
        if previous is not None and previous[0] == key:  # nested sets of equal size are equal
            count_pred[k], count_match[k] = previous[1], previous[2]
            continue
        predicted = thin(binary) if thin_pred else binary
        chosen = np.zeros(len(support_rc), dtype=bool)
        nodes = pixel_node[predicted]
        chosen[nodes[nodes >= 0]] = True
        keep = chosen[pred_nodes]
        count_pred[k] = predicted.sum()
        count_match[k] = _matching_size(pred_nodes[keep], gt_nodes[keep], len(support_rc), num_gt)
        previous = (key, count_pred[k], count_match[k])
    return num_gt, count_match, count_pred, count_match


def _edge_image_counts_star(job):
    return _edge_image_counts(*job)


class EdgeMeter:
    """Boundary odsF in percent as SEISM (jponttuset/seism via prismformore/Boundary-Detection-Evaluation-Tools).

    Per image, in SEISM's order (read_one_cont_png.m, eval_cont.m, edgesEvalImg.m, correspondPixels):
      1. crop to the bounding box of the valid pixels (gt != ignore_index, or `valid`): the authors save
         predictions cropped to the original image size, so padding never reaches SEISM;
      2. `quantize`: E = floor(255 p) / 255 in float32 (their uint8 PNG read with im2single);
      3. `nms`: E = edge_nms(E) (orientation from convTri(E, 4) Hessian, r = 1, border 5, m = 1.01);
      4. for each threshold t (SEISM_THRESHOLDS: HED.txt, 0.001, 0.01..0.99, 0.999): binary B = E > t, then
         `thin_pred`: B = thin(B) (edgesEvalImg thins per threshold: bwmorph(E1, 'thin', Inf));
      5. GT: `gt_format="boundary"` takes gt > 0.5 as the boundary map, `"segmentation"` takes gt as a label
         map and its seg2bmap (SEISM's PASCAL-Context LabelMap, and NYUD, whose 0/255 edge PNG SEISM also
         reads as a segmentation); either way thinned: G = thin(.);
      6. one-to-one matching of B and G within radius = max_dist * diagonal of the cropped image
         (0.0075 PASCAL, 0.011 NYUD) with correspondPixels' outlier cost 100 * radius: count = maximum
         bipartite matching (`correspond_pixels`, Dinic max flow); cntP = cntR = #matches, sumP = |B|, sumR = |G|.
    Over the dataset: counts summed per threshold, P = sum cntP / sum sumP, R = sum cntR / sum sumR
    (gather_measure.m: R = 1, P = 0 if sumR = 0; R = 0, P = 1 if sumP = 0), F = 2PR / (P + R),
    odsF = max over thresholds (general_ods.m).

    Remaining differences from the MATLAB run: (a) BSDS links each unmatched pixel to only 6 random
    outlier nodes (match.cc `degree`, RNG seeded from the clock) plus an expensive overlay; when a random
    outlier node has no partner the assignment can drop a match, so BSDS counts can be a few per mille lower
    than the maximum matching and vary between runs; (b) convTri / atan / cos in float32 may round
    differently from Dollar's SSE code, which can flip sign(-Oxy) where Oxy is ~1e-7 and so change O;
    (c) the image is the GT's valid box, where the authors crop the centre of the padded prediction.
    Checked against SEISM's own MATLAB code run in GNU Octave (tests/fixtures/odsf_seism_reference.npz):
    NMS, thinning, sumP and sumR identical; cntP up to 6 per image-threshold above BSDS's (item a); odsF
    +0.04 (maxDist 0.0075) and +0.03 (0.011) points on 25 synthetic label maps.
    GT matters: PASCAL-Context's SEISM GT is thin(seg2bmap(LabelMap)); the dataset's thin(|Laplacian|) edge
    maps sit up to a pixel elsewhere, so pass the label map with gt_format="segmentation" for paper numbers.
    `num_thresholds=K` replaces the list by BSDS's linspace(1/(K+1), K/(K+1), K).
    `workers=N` scores images in N spawned processes (results independent of N).
    """

    GT_FORMATS = ("boundary", "segmentation")

    def __init__(self, max_dist=0.0075, num_thresholds=None, nms=True, thin=True, ignore_index=255,
                 quantize=True, gt_format="boundary", thresholds=None, workers=0):
        if gt_format not in self.GT_FORMATS:
            raise ValueError(f"EdgeMeter: gt_format={gt_format!r}; use one of {self.GT_FORMATS}")
        if num_thresholds is not None and thresholds is not None:
            raise ValueError("EdgeMeter: pass either num_thresholds or thresholds, not both")
        self.max_dist = max_dist
        self.nms = nms
        self.thin = thin
        self.ignore_index = ignore_index
        self.quantize = quantize
        self.gt_format = gt_format
        if thresholds is not None:
            self.thresholds = np.asarray(thresholds, dtype=np.float64)
        elif num_thresholds is not None:
            self.thresholds = np.linspace(1 / (num_thresholds + 1), num_thresholds / (num_thresholds + 1),
                                          num_thresholds)
        else:
            self.thresholds = SEISM_THRESHOLDS.copy()
        self.matched_pred = np.zeros(len(self.thresholds))  # cntP: predicted pixels matched to a GT pixel
        self.total_pred = np.zeros(len(self.thresholds))    # sumP
        self.matched_gt = np.zeros(len(self.thresholds))    # cntR: GT pixels matched to a prediction
        self.total_gt = 0.0                                 # sumR
        self.workers = workers
        self._pool, self._pending = None, []

    def _job(self, prob, gt, valid):
        return (prob, gt, valid, self.thresholds, self.max_dist, self.nms, self.thin, self.quantize,
                self.gt_format)

    def _add(self, counts):
        sum_r, cnt_r, sum_p, cnt_p = counts
        self.total_gt += sum_r
        self.matched_gt += cnt_r
        self.total_pred += sum_p
        self.matched_pred += cnt_p

    def _drain(self, keep=0):
        while len(self._pending) > keep:
            self._add(self._pending.pop(0).result())

    def update(self, pred_prob, gt, valid=None):
        """pred_prob: edge probability in [0, 1]; gt: {0, 1} boundary map (or label map, see gt_format) with
        ignore_index; valid: optional mask of evaluated pixels; (H, W) or batched."""
        pred, gt = _squeeze_channel(_to_numpy(pred_prob)), _squeeze_channel(_to_numpy(gt))
        _check_same_shape(pred, gt, "EdgeMeter")
        valid = gt != self.ignore_index if valid is None else _squeeze_channel(_to_numpy(valid)).astype(bool)
        _check_same_shape(valid, gt, "EdgeMeter valid mask")
        if pred.ndim == 2:
            pred, gt, valid = pred[None], gt[None], valid[None]
        for prob_image, gt_image, valid_image in zip(pred, gt, valid):
            if not valid_image.any():
                continue  # the authors write no prediction for an image without valid GT
            job = self._job(prob_image, gt_image, valid_image)
            if not self.workers:
                self._add(_edge_image_counts(*job))
                continue
            if self._pool is None:
                import concurrent.futures
                import multiprocessing
                # spawn, not fork: the caller may hold CUDA or threads; workers only need numpy/scipy.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"))
            self._pending.append(self._pool.submit(_edge_image_counts_star, job))
            self._drain(keep=4 * self.workers)  # bound the images held in memory

    def close(self):
        """Wait for queued images and shut the worker pool down (result() calls it)."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def curve(self):
        """(thresholds, precision, recall, F) from the dataset counts, with gather_measure.m's conventions."""
        self.close()
        precision = np.zeros(len(self.thresholds))
        recall = np.zeros(len(self.thresholds))
        for k in range(len(self.thresholds)):
            if self.total_gt == 0:
                recall[k], precision[k] = 1.0, 0.0
            elif self.total_pred[k] == 0:
                recall[k], precision[k] = 0.0, 1.0
            else:
                recall[k] = self.matched_gt[k] / self.total_gt
                precision[k] = self.matched_pred[k] / self.total_pred[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return self.thresholds, precision, recall, f

    def result(self):
        return float(self.curve()[3].max() * 100)


def ods_f(pred_prob, gt, max_dist=0.0075, **kwargs):
    """Boundary odsF in percent of one image or batch (SEISM procedure, see EdgeMeter)."""
    meter = EdgeMeter(max_dist=max_dist, **kwargs)
    meter.update(pred_prob, gt)
    return meter.result()


#################################################################################
#                         Multi-task gain and reporting                          #
#################################################################################

def delta_m(results, single_task, lower_is_better):
    """Multi-task gain in percent (Maninis et al. 2019): (1/S) sum_s (-1)^l_s (M_s - M_single,s) / M_single,s * 100.

    l_s = 1 for metrics where lower is better (normals mErr, depth RMSE). Positive = better than single-task
    learning; TaskDiffusion's Table 1 reports Delta_m = -1.11 for its ViT-L model (slightly worse than the
    single-task baselines). `results` / `single_task`: {task: value}; `lower_is_better`: {task: bool} or the
    collection of task names where lower is better.
    """
    if not results:
        raise ValueError("delta_m: `results` is empty; pass {task: metric value}")
    missing = [task for task in results if task not in single_task]
    if missing:
        raise ValueError(f"delta_m: no single-task baseline for {missing}; add them to `single_task`")
    if isinstance(lower_is_better, dict):
        lower = {task for task, flag in lower_is_better.items() if flag}
    else:
        lower = set(lower_is_better)
    total = 0.0
    for task, value in results.items():
        base = single_task[task]
        if base == 0:
            raise ValueError(f"delta_m: single-task value of '{task}' is 0; relative gain is undefined")
        sign = -1.0 if task in lower else 1.0
        total += sign * (value - base) / base
    return total / len(results) * 100


def format_table(rows):
    """Aligned text table from {row name: {metric: value}}; columns in first-seen order, '-' where missing."""
    columns = []
    for metrics in rows.values():
        columns += [name for name in metrics if name not in columns]

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return f"{value:.2f}"
        return "-" if value is None else str(value)

    table = [[""] + columns] + [[name] + [cell(m.get(c)) for c in columns] for name, m in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
