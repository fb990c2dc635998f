"""Dense multi-task metrics of TaskDiffusion / InvPT / MTI-Net (PASCAL-Context, NYUD-v2), in numpy/scipy.

Units, as the papers report them:
  mIoU, maxF, odsF   percent (0..100, higher is better)
  normals mErr       degrees (lower is better)
  depth RMSE         metres  (lower is better)
  Delta_m            percent (positive = better than the single-task baselines)

Every metric is accumulated over a dataset by a small meter (`update(pred, gt)` per batch, `result()` at the
end); the function forms (`miou`, `max_f`, ...) are one-image/one-batch wrappers. Torch tensors are accepted
anywhere and converted to numpy. Definitions follow prismformore/Multi-Task-Transformer `evaluation/eval_*.py`
(also used by YuqiYang213/TaskDiffusion); the boundary metric is a documented pure-Python approximation of the
MATLAB SEISM evaluation the papers use (see `EdgeMeter`).
"""
import math

import numpy as np
from scipy import ndimage


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
#                   Binary thinning and edge non-maximum suppression              #
#################################################################################

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
_NEIGHBOUR_WEIGHTS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(mask, max_iter=None):
    """Morphological thinning of a binary image to 1-pixel-wide, 8-connected curves (Guo & Hall 1989)."""
    skeleton = np.asarray(mask, dtype=bool).astype(np.uint8)
    if skeleton.ndim != 2:
        raise ValueError(f"thin() expects a 2-D binary image, got shape {skeleton.shape}")
    iteration, changed = 0, True
    while changed and (max_iter is None or iteration < max_iter):
        before = skeleton.sum()
        for lut in _THIN_LUTS:
            codes = ndimage.correlate(skeleton, _NEIGHBOUR_WEIGHTS, mode="constant")
            skeleton[lut[codes] & (skeleton > 0)] = 0
        changed, iteration = skeleton.sum() != before, iteration + 1
    return skeleton.astype(bool)


def _conv_tri(image, radius):
    """Piotr Dollar's convTri: separable triangle filter [1..r+1..r]/(r+1)^2, symmetric padding."""
    if radius == 0:
        return image
    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float64)
    kernel /= kernel.sum()
    out = ndimage.convolve1d(image, kernel, axis=0, mode="reflect")
    return ndimage.convolve1d(out, kernel, axis=1, mode="reflect")


def edge_nms(edge_prob, radius=1, border=5, multiplier=1.01):
    """Non-maximum suppression of a soft edge map, after the nms_process.m step run before SEISM.

    Upstream (MATLAB, Dollar's toolbox): E = convTri(E, 1); O from the Hessian of convTri(E, 4);
    E = edgesNmsMex(E, O, r=1, s=5, m=1.01). A pixel survives if m * E >= E interpolated at +-d along the
    edge normal, d = 1..r; pixels within `border` of the image edge are scaled by (distance / border).
    Deviation: the normal is the Hessian eigenvector of the largest |curvature| instead of
    mod(atan(Oyy sign(-Oxy) / (Oxx + 1e-5)), pi), which is exact only for axis-aligned and 45-degree edges
    and picks the wrong axis for horizontal edges when Oxy is exactly 0.
    """
    edge = _conv_tri(np.asarray(edge_prob, dtype=np.float64), 1)
    smooth = _conv_tri(edge, 4)
    d_row, d_col = np.gradient(smooth)
    h_rr, h_rc = np.gradient(d_row)
    _, h_cc = np.gradient(d_col)
    # For a ridge along direction phi the Hessian is f''(n) n n^T with n its normal, on the crest (f'' < 0) and
    # in the tails (f'' > 0) alike: the normal is the eigenvector of the largest |eigenvalue|. The larger
    # eigenvalue's eigenvector has angle 0.5 atan2(2 Hxy, Hxx - Hyy), the smaller one is perpendicular.
    half_trace, half_gap = (h_cc + h_rr) / 2, np.hypot((h_cc - h_rr) / 2, h_rc)
    larger_wins = np.abs(half_trace + half_gap) >= np.abs(half_trace - half_gap)
    normal = 0.5 * np.arctan2(2 * h_rc, h_cc - h_rr) + np.where(larger_wins, 0.0, np.pi / 2)
    cos_n, sin_n = np.cos(normal), np.sin(normal)
    rows, cols = np.indices(edge.shape, dtype=np.float64)
    keep = np.ones(edge.shape, dtype=bool)
    for d in range(-radius, radius + 1):
        if d == 0:
            continue
        neighbour = ndimage.map_coordinates(edge, [rows + d * sin_n, cols + d * cos_n], order=1, mode="nearest")
        keep &= edge * multiplier >= neighbour
    out = np.where(keep, edge, 0.0)
    height, width = out.shape
    s = min(border, height // 2, width // 2)
    if s > 0:  # edgesNmsMex: suppress noisy estimates near the image boundary with a linear ramp
        ramp = np.arange(s) / s
        out[:s] *= ramp[:, None]
        out[height - s:] *= ramp[::-1, None]
        out[:, :s] *= ramp[None, :]
        out[:, width - s:] *= ramp[None, ::-1]
    return out


#################################################################################
#                         Boundary detection (odsF)                              #
#################################################################################

class EdgeMeter:
    """Boundary odsF in percent: best F-measure over thresholds with counts pooled over the dataset.

    Per image: crop to the bounding box of non-ignored GT pixels (removes padding), optionally apply `edge_nms`,
    then for each threshold t a pixel is predicted if its value >= t (thresholds linspace(1/(n+1), n/(n+1), n),
    0.01..0.99 for the 99 of SEISM/BSDS). Tolerance = max_dist * image diagonal (0.0075 PASCAL, 0.011 NYUD).
    Precision counts predicted pixels within tolerance of a GT boundary pixel (scipy distance_transform_edt of
    the GT), recall counts GT pixels within tolerance of a predicted pixel. odsF = max_t 2PR / (P + R).

    How this differs from SEISM (correspondPixels / BSDS benchmark):
      * no one-to-one bipartite matching: several predicted pixels may match the same GT pixel and one predicted
        pixel may "cover" many GT pixels, so double/thick responses near a boundary are not penalised as false
        positives and the score is slightly optimistic (by how much depends on how thick the responses are);
      * with `thin=False` (default) the binarised NMS map is not re-thinned per threshold; the nested threshold
        sets then allow all thresholds in one pass (a disc max-filter replaces the per-threshold distance
        transform). `thin=True` binarises, thins (`thin`) and distance-transforms at every threshold, like
        SEISM's thinpb path, at ~100x the cost;
      * the NMS orientation estimate differs slightly (see `edge_nms`).
    Use it for relative comparisons; report the MATLAB SEISM number for paper tables.
    """

    def __init__(self, max_dist=0.0075, num_thresholds=99, nms=True, thin=False, ignore_index=255):
        self.max_dist = max_dist
        self.nms = nms
        self.thin = thin
        self.ignore_index = ignore_index
        self.thresholds = np.linspace(1 / (num_thresholds + 1), num_thresholds / (num_thresholds + 1),
                                      num_thresholds)
        self.matched_pred = np.zeros(num_thresholds)   # predicted pixels near a GT boundary
        self.total_pred = np.zeros(num_thresholds)
        self.matched_gt = np.zeros(num_thresholds)     # GT pixels near a predicted boundary
        self.total_gt = 0.0

    def _count_at_least(self, values):
        """Number of values >= each threshold."""
        values = np.sort(values.ravel())
        return values.size - np.searchsorted(values, self.thresholds, side="left")

    def _update_image(self, prob, gt):
        valid = gt != self.ignore_index
        if not valid.any():
            return
        rows, cols = np.nonzero(valid)
        box = slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
        prob, gt, valid = prob[box].astype(np.float64), gt[box], valid[box]
        gt_edge = (gt > 0.5) & valid
        if self.nms:
            prob = edge_nms(prob)
        prob = np.where(valid, prob, 0.0)
        tolerance = self.max_dist * math.hypot(*prob.shape)
        dist_to_gt = ndimage.distance_transform_edt(~gt_edge) if gt_edge.any() else np.full(prob.shape, np.inf)
        self.total_gt += gt_edge.sum()
        if self.thin:
            for k, threshold in enumerate(self.thresholds):
                pred_edge = thin(prob >= threshold)
                self.total_pred[k] += pred_edge.sum()
                self.matched_pred[k] += np.sum(pred_edge & (dist_to_gt <= tolerance))
                if pred_edge.any():
                    dist_to_pred = ndimage.distance_transform_edt(~pred_edge)
                    self.matched_gt[k] += np.sum(gt_edge & (dist_to_pred <= tolerance))
            return
        self.total_pred += self._count_at_least(prob[prob > 0])
        self.matched_pred += self._count_at_least(prob[(prob > 0) & (dist_to_gt <= tolerance)])
        # A GT pixel is recalled at threshold t iff the largest prediction within the tolerance disc is >= t.
        r = int(math.floor(tolerance))
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = dy ** 2 + dx ** 2 <= tolerance ** 2
        nearby_max = ndimage.maximum_filter(prob, footprint=disc, mode="constant", cval=0.0)
        self.matched_gt += self._count_at_least(nearby_max[gt_edge & (nearby_max > 0)])

    def update(self, pred_prob, gt):
        """pred_prob: edge probability in [0, 1]; gt: {0, 1} boundary map with ignore_index; (H, W) or batched."""
        pred, gt = _squeeze_channel(_to_numpy(pred_prob)), _squeeze_channel(_to_numpy(gt))
        _check_same_shape(pred, gt, "EdgeMeter")
        if pred.ndim == 2:
            pred, gt = pred[None], gt[None]
        for prob_image, gt_image in zip(pred, gt):
            self._update_image(prob_image, gt_image)

    def curve(self):
        """(thresholds, precision, recall, F) with F = 2PR / (P + R), 0 where undefined."""
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = self.matched_pred / self.total_pred
            recall = self.matched_gt / self.total_gt
            f = 2 * precision * recall / (precision + recall)
        return self.thresholds, precision, recall, np.nan_to_num(f)

    def result(self):
        return float(self.curve()[3].max() * 100)


def ods_f(pred_prob, gt, max_dist=0.0075, **kwargs):
    """Boundary odsF in percent of one image or batch (see EdgeMeter for the approximation)."""
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
