"""Dense metrics on hand-made predictions with answers computed by hand or by brute force."""
import math
import os
import re

import numpy as np
import pytest
import torch

from eval.dense_metrics import (DepthMeter, EdgeMeter, SaliencyMeter, SegMeter, correspond_pixels, delta_m,
                                depth_rmse, edge_nms, edge_orientation, format_table, labels_from_colours, max_f,
                                miou, normal_mean_error, ods_f, seg2bmap, thin)


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


def test_edge_nms_keeps_the_ridge_of_a_vertical_line():
    from scipy import ndimage
    gt = np.zeros((40, 40))
    gt[5:35, 20] = 1.0
    nms = edge_nms(ndimage.gaussian_filter(gt, 2.0))
    rows = nms[10:30]
    assert np.all(rows.argmax(1) == 20) and np.all((rows > 0).sum(1) == 1)


def test_edge_nms_follows_seism_orientation_on_a_horizontal_line():
    # SEISM's O = mod(atan(Oyy sign(-Oxy) / (Oxx + 1e-5)), pi) is 0 where Oxy == 0, so a perfectly horizontal
    # ridge is compared along itself and survives NMS whole; the per-threshold thinning narrows it later.
    from scipy import ndimage
    gt = np.zeros((40, 40))
    gt[20, :] = 1.0  # exactly constant along x, so Oxy == 0 everywhere
    blurred = ndimage.gaussian_filter(gt, 2.0)
    assert np.all(edge_orientation(blurred) == 0.0)
    nms = edge_nms(blurred)
    assert np.array_equal(nms[:, 10:30] > 0, blurred[:, 10:30].astype(np.float32) > 0)
    assert np.all(thin(nms > 0.02)[:, 10:30].sum(0) == 1)


def test_seg2bmap_marks_the_origin_side_of_each_label_change():
    seg = np.array([[1, 1, 2],
                    [1, 1, 2],
                    [3, 3, 3]])
    expected = np.array([[0, 1, 0],   # (0,1): E differs; (0,0): E, S, SE all 1 -> no boundary; (0,2): S same
                         [1, 1, 1],   # (1,0), (1,1): S (and E) differ; last column (1,2): S only, 2 vs 3
                         [0, 0, 0]], bool)  # last row: E only, corner never
    assert np.array_equal(seg2bmap(seg), expected)
    only_se = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 2]])
    assert seg2bmap(only_se)[1, 1] and seg2bmap(only_se).sum() == 3  # (1,1) by its SE neighbour alone


def _augmenting_path_matching(pred_rc, gt_rc, radius):
    """Maximum matching by Kuhn's algorithm: try an augmenting path from every predicted pixel in turn."""
    near = [[j for j, g in enumerate(gt_rc) if (p[0] - g[0]) ** 2 + (p[1] - g[1]) ** 2 <= radius ** 2]
            for p in pred_rc]
    owner = {}  # GT index -> predicted index

    def augment(i, seen):
        for j in near[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False
    return sum(augment(i, set()) for i in range(len(pred_rc)))


def test_correspond_pixels_by_hand():
    size = 20  # radius = max_dist * 20 sqrt(2)
    reach = 1.5 / (size * math.sqrt(2))  # max_dist for a 1.5 px radius
    gt = np.zeros((size, size), bool)
    gt[10, 4:14] = True
    assert correspond_pixels(np.roll(gt, 1, axis=0), gt, max_dist=reach) == 10  # shifted 1 px <= 1.5 px
    assert correspond_pixels(np.roll(gt, 2, axis=0), gt, max_dist=reach) == 0   # 2 px > 1.5 px
    one_gt = np.zeros((size, size), bool)
    one_gt[5, 5] = True
    two_pred = np.zeros((size, size), bool)
    two_pred[5, 4] = two_pred[5, 6] = True  # both within reach of the single GT pixel: one match, not two
    assert correspond_pixels(two_pred, one_gt, max_dist=reach) == 1
    # p0 = (8, 9) reaches g0 = (8, 8) and g1 = (8, 10); p1 = (8, 7) reaches g0 only: 2 needs p0 -> g1
    gt2 = np.zeros((size, size), bool)
    gt2[8, 8] = gt2[8, 10] = True
    pred2 = np.zeros((size, size), bool)
    pred2[8, 9] = pred2[8, 7] = True
    assert correspond_pixels(pred2, gt2, max_dist=1.0 / (size * math.sqrt(2))) == 2


def test_correspond_pixels_against_brute_force_on_random_maps():
    rng = np.random.default_rng(3)
    for trial in range(150):
        shape = (int(rng.integers(5, 16)), int(rng.integers(5, 16)))
        pred = rng.random(shape) < rng.uniform(0.05, 0.25)
        gt = rng.random(shape) < rng.uniform(0.05, 0.25)
        radius = float(rng.choice([1.2, 1.5, 2.3, 2.9]))  # away from lattice distances (1, sqrt 2, 2, ...)
        max_dist = radius / math.sqrt(shape[0] ** 2 + shape[1] ** 2)
        expected = _augmenting_path_matching(np.argwhere(pred), np.argwhere(gt), radius)
        assert correspond_pixels(pred, gt, max_dist=max_dist) == expected, trial


def test_correspond_pixels_includes_pixels_exactly_at_the_radius():
    gt = np.zeros((3, 4), bool)  # diagonal 5: max_dist 0.4 -> radius exactly 2.0 px, as match.cc's d2 <= r^2
    gt[0, 0] = True
    pred = np.zeros((3, 4), bool)
    pred[2, 0] = True
    assert correspond_pixels(pred, gt, max_dist=0.4) == 1
    assert correspond_pixels(pred, gt, max_dist=0.39) == 0


def test_edge_meter_one_to_one_counts_by_hand():
    gt = np.zeros((30, 40))
    gt[15, 10:30] = 1.0
    pred = np.zeros((30, 40))
    pred[14, 10:30] = pred[16, 10:30] = 0.8  # a double response, one line on each side of the boundary
    meter = EdgeMeter(max_dist=1.5 / 50, thresholds=[0.5], nms=False)  # radius 1.5 px (diagonal 50)
    meter.update(pred, gt)
    _, precision, recall, f = meter.curve()
    # 20 GT pixels, 40 predicted: only 20 can be matched one-to-one (a nearest-pixel test would give P = 1)
    assert (meter.total_gt, meter.total_pred[0], meter.matched_pred[0]) == (20, 40, 20)
    assert precision[0] == pytest.approx(0.5) and recall[0] == pytest.approx(1.0)
    assert meter.result() == pytest.approx(100 * 2 * 0.5 / 1.5)


def test_edge_meter_thins_each_threshold_and_the_ground_truth():
    gt = np.zeros((30, 40))
    gt[14:16, 10:30] = 1.0  # a 2-pixel-thick GT band is thinned to one line before matching
    pred = np.zeros((30, 40))
    pred[13:16, 10:30] = 0.9  # a 3-pixel-thick response: thinned per threshold
    meter = EdgeMeter(max_dist=1.5 / 50, thresholds=[0.5], nms=False)
    meter.update(pred, gt)
    assert meter.total_gt == thin(gt > 0).sum() < 40 and meter.total_pred[0] == thin(pred > 0.5).sum() < 60
    assert meter.matched_pred[0] == min(meter.total_gt, meter.total_pred[0])  # two lines 1 px apart
    unthinned = EdgeMeter(max_dist=1.5 / 50, thresholds=[0.5], nms=False, thin=False)
    unthinned.update(pred, gt)
    assert unthinned.total_pred[0] == 60


def test_edge_meter_quantizes_like_the_authors_png():
    gt = np.zeros((20, 20))
    gt[10, 5:15] = 1.0
    pred = gt * 0.2035  # 255 * 0.2035 = 51.9 -> uint8 51 -> 51 / 255 = 0.2, which is not > 0.20
    kwargs = dict(max_dist=0.05, thresholds=[0.19, 0.20], nms=False)
    quantized, exact = EdgeMeter(**kwargs), EdgeMeter(quantize=False, **kwargs)
    quantized.update(pred, gt)
    exact.update(pred, gt)
    assert list(quantized.total_pred) == [10, 0] and list(exact.total_pred) == [10, 10]


def test_edge_meter_dataset_conventions_of_gather_measure():
    meter = EdgeMeter(max_dist=0.05, thresholds=[0.5], nms=False)
    meter.update(np.zeros((20, 20)), np.zeros((20, 20)))  # no GT boundary anywhere: R = 1, P = 0
    _, precision, recall, f = meter.curve()
    assert (precision[0], recall[0], f[0]) == (0.0, 1.0, 0.0)
    gt = np.zeros((20, 20))
    gt[10, 5:15] = 1.0
    meter = EdgeMeter(max_dist=0.05, thresholds=[0.5], nms=False)
    meter.update(np.zeros((20, 20)), gt)  # nothing predicted: R = 0, P = 1
    _, precision, recall, _ = meter.curve()
    assert (precision[0], recall[0]) == (1.0, 0.0)
    thresholds = EdgeMeter().thresholds  # SEISM parameters/HED.txt
    assert len(thresholds) == 101 and thresholds[[0, 1, -2, -1]].tolist() == [0.001, 0.01, 0.99, 0.999]


def test_edge_meter_workers_give_the_serial_counts():
    rng = np.random.default_rng(5)
    gts = (rng.random((3, 48, 64)) < 0.04).astype(float)
    preds = np.clip(gts * 0.7 + rng.random((3, 48, 64)) * 0.4, 0, 1)
    serial, pooled = EdgeMeter(max_dist=0.03), EdgeMeter(max_dist=0.03, workers=1)
    for meter in (serial, pooled):
        meter.update(preds[:2], gts[:2])
        meter.update(preds[2], gts[2])
    pooled.close()
    assert np.array_equal(pooled.matched_pred, serial.matched_pred) and pooled.total_gt == serial.total_gt
    assert np.array_equal(pooled.total_pred, serial.total_pred) and pooled.result() == serial.result()


# tests/fixtures/odsf_seism_reference.npz was made by running SEISM's own MATLAB code under GNU Octave 7.3
# (read_one_cont_png.m, edgesEvalImg.m, eval_cont.m, seg2bmap.m and the edgesNmsMex / convConst mex files of
# prismformore/Boundary-Detection-Evaluation-Tools, BSDS correspondPixels built from match.cc / csa.cc,
# bwmorph of Octave's image package) on two synthetic 120x160 label maps with 8-bit edge maps at maxDist 0.0075.
_SEISM = os.path.join(os.path.dirname(__file__), "fixtures", "odsf_seism_reference.npz")


def test_thin_equals_bwmorph_on_the_reference_masks():
    ref = np.load(_SEISM)
    for mask, expected in zip(ref["thin_in"], ref["bwmorph_thin"]):
        assert np.array_equal(thin(mask), expected)


def test_edge_nms_equals_seism_edgesNmsMex():
    ref = np.load(_SEISM)
    for pred, expected in [(ref["pred0"], ref["seism_nms0"]), (ref["pred1"], ref["seism_nms1"]),
                           (ref["hline"], ref["seism_nms_hline"])]:
        nms = edge_nms(pred.astype(np.float32) / np.float32(255))  # im2single of the PNG
        assert np.array_equal(nms > 0, expected > 0)
        assert np.abs(nms - expected).max() <= 1e-7


def test_edge_meter_reproduces_seism_counts():
    ref = np.load(_SEISM)
    counts = ref["seism_counts"]  # (image, threshold, [cntR sumR cntP sumP]) from eval_cont.m
    for i in range(2):
        meter = EdgeMeter(gt_format="segmentation")
        meter.update(ref[f"pred{i}"] / 255.0, ref[f"seg{i}"], valid=np.ones(ref[f"seg{i}"].shape, bool))
        assert np.array_equal(meter.total_pred, counts[i, :, 3])  # sumP: NMS, '>' threshold, thinning
        assert meter.total_gt == counts[i, 0, 1]  # sumR: thin(seg2bmap(LabelMap))
        # cntP = cntR: BSDS's random sparse outlier graph can only lose matches against the maximum matching
        extra = meter.matched_pred - counts[i, :, 2]
        assert extra.min() >= 0 and extra.max() <= 0.005 * counts[i, :, 3].max()
        seism = counts[i].astype(float)
        recall, precision = seism[:, 0] / seism[:, 1], seism[:, 2] / np.maximum(seism[:, 3], 1)
        seism_f = np.max(np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0))
        assert abs(meter.result() - 100 * seism_f) < 0.1


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


def test_fcn_scores_pixel_and_class_accuracy():
    # Zhu et al. 2017's label scores from the pooled confusion matrix, counted by hand: gt 0 0 0 1 1 2 (class 3
    # absent from the ground truth), pred 0 0 1 1 3 2 -> 4/6 pixels right; recalls 2/3, 1/2, 1/1 over present classes
    meter = SegMeter(4)
    meter.update(np.array([[0, 0, 1, 1, 3, 2]]), np.array([[0, 0, 0, 1, 1, 2]]))
    assert meter.pixel_accuracy() == pytest.approx(4 / 6)
    assert meter.class_accuracy() == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # IoU: class 0 2/3, class 1 1/3, class 2 1, class 3 0 (a false positive only)
    assert meter.result() == pytest.approx(100 * (2 / 3 + 1 / 3 + 1 + 0) / 4)


def test_labels_from_colours_reads_the_nearest_palette_colour():
    palette = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]])
    labels = torch.tensor([[[0, 1], [2, 1]]])
    images = palette[labels].permute(0, 3, 1, 2) + 0.3 * torch.tensor([1.0, -1.0, 0.5])[None, :, None, None]
    assert torch.equal(labels_from_colours(images, palette), labels)
