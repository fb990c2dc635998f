"""Dense metrics on hand-made predictions with answers computed by hand or by brute force."""
import math
import re

import numpy as np
import pytest
import torch

from eval.dense_metrics import (DepthMeter, EdgeMeter, SaliencyMeter, SegMeter, delta_m,
                                depth_rmse, edge_nms, format_table, max_f, miou, normal_mean_error, ods_f, thin)


#################################################################################
#                         mIoU                                                   #
#################################################################################

def test_miou_two_class_toy_by_hand():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3
    assert miou(pred, gt, num_classes=2) == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)


def test_miou_averages_over_all_classes_like_upstream_or_over_present_ones():
    # Hand-made confusion over 4 classes where class 3 never occurs and class 2 is only predicted.
    gt = np.array([[0, 0, 0, 1, 1, 1]])
    pred = np.array([[0, 0, 1, 1, 1, 2]])
    # class 0: TP 2, FN 1 -> 2/3; class 1: TP 2, FP 1, FN 1 -> 1/2; class 2: FP 1 -> 0; class 3: absent
    assert miou(pred, gt, 4) == pytest.approx((2 / 3 + 1 / 2 + 0 + 0) / 4 * 100)  # eval_semseg.py: all C
    assert miou(pred, gt, 4, average="present") == pytest.approx((2 / 3 + 1 / 2 + 0) / 3 * 100)
    meter = SegMeter(4)
    assert meter.result() == 0.0  # nothing seen: every class 0 / max(0, 1e-8), as upstream
    with pytest.raises(ValueError, match="average"):
        SegMeter(4, average="mean")


def test_miou_prediction_outside_class_range_is_a_false_negative_only():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 9, 1, -1]])  # 9 and -1 are no class: upstream's `pred == c` is false for every c
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 1, FN 1 -> 1/2 (no false positive anywhere)
    assert miou(pred, gt, 2) == pytest.approx(50.0)


def test_miou_ignores_255_and_perfect_is_100():
    gt = np.array([[0, 0, 1, 1, 255, 255]])
    pred = np.array([[0, 1, 1, 1, 0, 1]])  # wrong guesses on ignored pixels must not count
    assert miou(pred, gt, 2) == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)
    labels = np.random.default_rng(0).integers(0, 4, size=(2, 8, 8))
    assert miou(torch.from_numpy(labels), torch.from_numpy(labels), 4) == pytest.approx(100.0)


def test_miou_accepts_scores_and_pools_the_confusion_over_updates():
    gt = np.array([[[0, 0, 1, 1]]])
    scores = np.zeros((1, 2, 1, 4))
    scores[0, 0, 0, 0] = scores[0, 1, 0, 1:] = 1.0  # argmax = [0, 1, 1, 1]
    assert miou(scores, gt, 2) == pytest.approx((1 / 2 + 2 / 3) / 2 * 100)
    meter = SegMeter(2)
    meter.update(np.array([[0, 0]]), np.array([[0, 0]]))  # image 1: perfect class 0
    meter.update(np.array([[0, 0]]), np.array([[1, 1]]))  # image 2: class 1 always missed
    # pooled: class 0 TP 2 FP 2 -> 1/2; class 1 TP 0 -> 0  (a mean of per-image mIoUs would give 50)
    assert meter.result() == pytest.approx(25.0)


def test_miou_rejects_out_of_range_ground_truth():
    with pytest.raises(ValueError, match="num_classes"):
        miou(np.array([[0, 1]]), np.array([[0, 7]]), 2)


#################################################################################
#                         Saliency maxF                                          #
#################################################################################

def test_max_f_perfect_and_threshold_behaviour_by_hand():
    gt = np.array([1, 1, 0, 0.0])
    assert max_f(np.array([0.9, 0.4, 0.3, 0.1]), gt) == pytest.approx(100.0)  # 0.3 < t <= 0.4 separates
    gt = np.array([1, 1, 1, 0.0])
    pred = np.array([0.9, 0.6, 0.2, 0.5])
    f = lambda p, r, b2: (1 + b2) * p * r / (b2 * p + r)
    # t in (0.5, 0.6]: predicted {0.9, 0.6} -> P 1, R 2/3; best under beta^2 = 0.3 (precision-weighted)
    assert max_f(pred, gt) == pytest.approx(100 * f(1, 2 / 3, 0.3))
    # beta^2 = 1 prefers t <= 0.2: everything positive -> P 3/4, R 1
    assert max_f(pred, gt, beta2=1.0) == pytest.approx(100 * f(3 / 4, 1, 1.0))
    # a probability equal to a threshold counts as positive (>= as upstream): 0.5 alone passes t = 0.5
    assert max_f(np.array([0.5, 0.47]), np.array([1, 0.0])) == pytest.approx(100.0)


def test_saliency_meter_pools_counts_and_ignores_255():
    meter = SaliencyMeter()
    meter.update(np.array([0.9, 0.1, 0.9]), np.array([1, 0, 255]))
    meter.update(np.array([0.9, 0.1]), np.array([0, 1]))
    thresholds, precision, recall, _ = meter.curve()
    k = int(np.argmin(np.abs(thresholds - 0.5)))
    assert precision[k] == pytest.approx(1 / 2) and recall[k] == pytest.approx(1 / 2)
    assert len(thresholds) == 19 and thresholds[0] == pytest.approx(0.05) and thresholds[-1] == pytest.approx(0.95)


#################################################################################
#                         Normals and depth                                      #
#################################################################################

def test_normals_angles_identical_orthogonal_opposite():
    gt = np.zeros((3, 1, 4))
    gt[2] = 1.0  # +z everywhere
    assert normal_mean_error(gt * 3.0, gt) == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    ortho = np.zeros_like(gt)
    ortho[0] = 1.0
    assert normal_mean_error(ortho, gt) == pytest.approx(90.0)
    assert normal_mean_error(-gt, gt) == pytest.approx(180.0)
    tilted = np.zeros_like(gt)
    tilted[0], tilted[2] = 1.0, 1.0
    assert normal_mean_error(tilted, gt) == pytest.approx(45.0)


def test_normals_invalid_pixels_ignored_and_pooled():
    gt = np.zeros((1, 3, 1, 4))
    gt[0, 2, 0, :3] = 1.0  # last pixel: zero-norm GT = invalid
    pred = gt.copy()
    pred[0, :, 0, 3] = [1.0, 0.0, 0.0]
    assert normal_mean_error(pred, gt) == pytest.approx(0.0, abs=1e-6)
    pred[0, :, 0, 0] = [-1.0, 0.0, 0.0]  # one valid pixel at 90 deg out of three
    assert normal_mean_error(pred, gt) == pytest.approx(30.0)
    assert normal_mean_error(pred, gt, valid=np.array([[[False, True, True, True]]])) == pytest.approx(0.0, abs=1e-6)
    gt_padded = gt.copy()
    gt_padded[0, :, 0, 0] = 255.0  # upstream ignore value
    assert normal_mean_error(pred, gt_padded) == pytest.approx(0.0, abs=1e-6)


def test_depth_rmse_constant_offset_and_invalid_excluded():
    gt = np.full((2, 1, 3, 3), 2.0)
    assert depth_rmse(gt + 0.5, gt) == pytest.approx(0.5)
    gt[0, 0, 0, 0] = 0.0    # missing depth
    gt[1, 0, 0, 0] = 100.0  # beyond 80 m
    pred = gt + 0.5
    pred[0, 0, 0, 0] = pred[1, 0, 0, 0] = 1e3  # wild predictions on invalid pixels must not matter
    assert depth_rmse(pred, gt) == pytest.approx(0.5)
    valid = np.ones((2, 3, 3), bool)
    valid[0, 1, 1] = False
    assert depth_rmse(pred, gt, valid=valid) == pytest.approx(0.5)


def test_depth_meter_pools_squared_errors_over_the_dataset():
    meter = DepthMeter()
    meter.update(np.full((2, 2), 1.0 + 1.0), np.full((2, 2), 1.0))  # 4 pixels, error 1
    meter.update(np.full((1, 1), 5.0 + 3.0), np.full((1, 1), 5.0))  # 1 pixel, error 3
    assert meter.result() == pytest.approx(math.sqrt((4 * 1 + 9) / 5))


#################################################################################
#                         Thinning, NMS and boundary odsF                        #
#################################################################################

def test_thin_reference_example_and_bar_to_line():
    square = np.zeros((7, 7), bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), bool)  # skimage.morphology.thin docstring example (Guo-Hall)
    expected[[0, 1, 2, 3, 4], [1, 2, 3, 3, 3]] = True
    assert np.array_equal(thin(square), expected)
    bar = np.zeros((9, 20), bool)
    bar[3:6, 2:18] = True
    line = thin(bar)
    assert line.sum() >= 12 and (line & ~bar).sum() == 0
    assert np.all(line[:, 4:16].sum(0) == 1)  # exactly one pixel per column away from the ends


def test_edge_nms_keeps_ridge_of_blurred_line():
    from scipy import ndimage
    gt = np.zeros((40, 40))
    gt[20, 5:35] = 1.0
    nms = edge_nms(ndimage.gaussian_filter(gt, 2.0))
    columns = nms[:, 10:30]
    assert np.all(columns.argmax(0) == 20) and np.all((columns > 0).sum(0) == 1)


def _square_outline(size, lo, hi):
    gt = np.zeros((size, size))
    gt[lo, lo:hi + 1] = gt[hi, lo:hi + 1] = gt[lo:hi + 1, lo] = gt[lo:hi + 1, hi] = 1.0
    return gt


def test_ods_f_perfect_shifted_and_far():
    gt = _square_outline(160, 40, 120)  # tolerance = 0.0075 * 160 * sqrt(2) = 1.7 px
    assert ods_f(gt, gt) == pytest.approx(100.0)
    assert ods_f(np.roll(gt, 1, axis=0), gt) == pytest.approx(100.0)
    line = np.zeros((160, 160))
    line[30:130, 50] = 1.0
    assert ods_f(np.roll(line, 40, axis=1), line) == pytest.approx(0.0)
    soft = np.roll(gt, 1, axis=1) * 0.7 + 0.05 * np.random.default_rng(0).random(gt.shape)
    assert ods_f(soft, gt) > 95.0


def test_edge_matching_against_brute_force():
    rng = np.random.default_rng(1)
    gt = (rng.random((40, 40)) < 0.03).astype(float)
    pred = (rng.random((40, 40)) < 0.03).astype(float)
    meter = EdgeMeter(max_dist=0.05, num_thresholds=9, nms=False)  # tolerance 0.05 * 40 sqrt(2) = 2.83 px
    meter.update(pred, gt)
    g, p = np.argwhere(gt > 0), np.argwhere(pred > 0)
    dist = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    tol = 0.05 * math.hypot(40, 40)
    precision = np.mean(dist.min(1) <= tol)
    recall = np.mean(dist.min(0) <= tol)
    assert meter.result() == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    thin_meter = EdgeMeter(max_dist=0.05, num_thresholds=9, nms=False, thin=True)
    thin_meter.update(pred, gt)  # isolated pixels survive thinning, so both paths agree
    assert thin_meter.result() == pytest.approx(meter.result())


def test_edge_meter_crops_padding_and_pools_images():
    gt = _square_outline(64, 16, 48)
    padded_gt = np.full((80, 80), 255.0)
    padded_gt[8:72, 8:72] = gt
    padded_pred = np.zeros((80, 80))
    padded_pred[8:72, 8:72] = gt
    padded_pred[:8] = 1.0  # junk in the ignored padding
    meter = EdgeMeter(max_dist=0.02)
    meter.update(torch.from_numpy(padded_pred)[None, None], torch.from_numpy(padded_gt)[None, None])
    assert meter.result() == pytest.approx(100.0)
    meter.update(np.zeros((64, 64)), gt)  # a second image with no response halves the pooled recall
    _, precision, recall, _ = meter.curve()
    assert recall.max() == pytest.approx(0.5) and np.nanmax(precision) == pytest.approx(1.0)


#################################################################################
#                         Delta_m and table                                      #
#################################################################################

def test_delta_m_hand_example_and_paper_table():
    # +10 % on a higher-is-better metric, 20 % worse on a lower-is-better one -> mean -5 %
    assert delta_m({"a": 110.0, "b": 12.0}, {"a": 100.0, "b": 10.0}, {"b"}) == pytest.approx(-5.0)
    assert delta_m({"b": 8.0}, {"b": 10.0}, {"b": True}) == pytest.approx(20.0)
    # TaskDiffusion Table 1 (ViT-L, PASCAL-Context): single-task vs. ours -> Delta_m = -1.11
    single = {"semseg": 81.62, "human_parts": 72.21, "sal": 84.34, "normals": 13.59, "edge": 76.79}
    ours = {"semseg": 81.21, "human_parts": 69.62, "sal": 84.94, "normals": 13.55, "edge": 74.89}
    assert round(delta_m(ours, single, {"normals"}), 2) == -1.11
    with pytest.raises(ValueError, match="single_task"):
        delta_m({"depth": 0.5}, single, {"depth"})


def test_format_table_aligns_columns():
    text = format_table({"single": {"semseg": 81.62, "normals": 13.59}, "ours": {"semseg": 81.2, "edge": 74.89}})
    header, rule, *body = text.splitlines()
    assert header.split() == ["semseg", "normals", "edge"] and set(rule) <= {"-", " "}
    assert body[0].split() == ["single", "81.62", "13.59", "-"] and body[1].split() == ["ours", "81.20", "-", "74.89"]
    ends = lambda line: [m.end() for m in re.finditer(r"\S+", line)]
    for line in body:  # numbers are right-aligned under their header
        assert ends(line)[1:] == ends(header)
