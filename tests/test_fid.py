"""FID / IS / precision-recall math, the FID Inception layout and the ADM .npz helpers, from first principles."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval import fid
from eval.fid import (compute_features, compute_statistics, frechet_distance, inception_score, load_images_npz,
                      load_statistics, precision_recall, save_adm_npz, save_statistics)
from eval.inception import FIDInception, preprocess, tf_avg_pool


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def random_orthogonal(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


#################################################################################
#                                 Frechet Distance                              #
#################################################################################

def test_frechet_commuting_covariances_match_closed_form():
    # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: sqrt(S1 S2) = Q diag(sqrt(ab)) Q^T, so
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q = random_orthogonal(rng, d)
    rotated = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_spd(rng, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 0.1 and d12 == pytest.approx(d21, rel=1e-8)
    # float32 inputs (as stored by some caches) are promoted to float64.
    assert frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2) == pytest.approx(d12, rel=1e-5)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_singular_covariance_is_finite():
    # 5 samples in 20 dimensions: rank-4 covariances, singular product.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 20)), rng.standard_normal((5, 20)) + 1.0
    value = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(value) and value > 0


def test_frechet_retries_with_eps_offset_when_sqrtm_fails(monkeypatch):
    # Make the first sqrtm return NaN: the retry must use (S1 + eps I)(S2 + eps I), whose closed form is known.
    real_sqrtm, calls = fid.linalg.sqrtm, []

    def flaky_sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    a, b, eps = np.array([1.0, 0.5]), np.array([2.0, 0.25]), 1e-2
    value = frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=eps)
    expected = np.sum(a + b - 2 * np.sqrt((a + eps) * (b + eps)))
    assert len(calls) == 2 and value == pytest.approx(expected, rel=1e-9)


def test_frechet_rejects_bad_statistics():
    with pytest.raises(ValueError, match="imaginary"):  # not PSD: sqrt of diag(-1, 1) is imaginary
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


#################################################################################
#                       Inception Score, Precision and Recall                   #
#################################################################################

def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((50, 1008)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_distinct_one_hot_is_number_of_classes():
    # Each split of 10 consecutive samples holds 10 distinct confident classes: IS = 10 in every split.
    labels = np.arange(100) % 10
    logits = np.zeros((100, 1008))
    logits[np.arange(100), labels] = 60.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(logits, splits=1)[0] == pytest.approx(10.0, rel=1e-9)


def test_inception_score_matches_hand_computation():
    # Two samples, p1 = (1, 0), p2 = (1/2, 1/2): p(y) = (3/4, 1/4);
    # KL1 = log(4/3), KL2 = 1/2 log(2/3) + 1/2 log(2); IS = exp((KL1 + KL2) / 2).
    logits = np.log(np.array([[1.0, 1e-300], [0.5, 0.5]]))
    kl1, kl2 = np.log(4 / 3), 0.5 * np.log(2 / 3) + 0.5 * np.log(2)
    assert inception_score(logits, splits=1)[0] == pytest.approx(np.exp((kl1 + kl2) / 2), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=10)


# Three 2-class predictions: a = (1, 0), b = (0, 1), c = (1/2, 1/2); logits -800 give exp(-800) = 0 in float64.
A, B, C = [0.0, -800.0], [-800.0, 0.0], [0.0, 0.0]
SAMPLES_ABCAA = np.array([A, B, C, A, A])


def test_inception_score_adm_split_size_matches_hand_computation():
    # split_size 2 -> {a, b}, {c, a}, {a} (ADM keeps the short last split). {a, b}: p(y) = (1/2, 1/2), KL = log 2
    # each, IS 2. {c, a}: p(y) = (3/4, 1/4), KL(c) = 1/2 log(4/3), KL(a) = log(4/3), IS (4/3)^(3/4). {a}: IS 1.
    scores = [2.0, (4 / 3) ** 0.75, 1.0]
    mean, std = inception_score(SAMPLES_ABCAA, split_size=2)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-12)
    # Default = ADM's split_size 5000: all five in one split, p(y) = (0.7, 0.3).
    kl_c = 0.5 * np.log(0.5 / 0.7) + 0.5 * np.log(0.5 / 0.3)
    one_split = np.exp((3 * np.log(1 / 0.7) + np.log(1 / 0.3) + kl_c) / 5)
    assert inception_score(SAMPLES_ABCAA) == pytest.approx((one_split, 0.0), rel=1e-12, abs=1e-12)


def test_inception_score_fixed_splits_matches_hand_computation():
    # splits=2 -> improved-gan bounds 0, 5 // 2 = 2, 5: {a, b} (IS 2) and {c, a, a}: p(y) = (5/6, 1/6),
    # KL(c) = 1/2 log(9/5), KL(a) = log(6/5).
    scores = [2.0, np.exp((0.5 * np.log(9 / 5) + 2 * np.log(6 / 5)) / 3)]
    mean, std = inception_score(SAMPLES_ABCAA, splits=2)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-12)
    with pytest.raises(ValueError, match="not both"):
        inception_score(SAMPLES_ABCAA, splits=2, split_size=2)


def test_inception_split_bounds_follow_adm_and_improved_gan():
    # ADM: 50K -> 10 splits, 10K -> 2 (SPEC), and a remainder becomes a short last split.
    assert fid.inception_split_bounds(50_000) == [(i, i + 5000) for i in range(0, 50_000, 5000)]
    assert fid.inception_split_bounds(10_000) == [(0, 5000), (5000, 10_000)]
    assert fid.inception_split_bounds(12_000) == [(0, 5000), (5000, 10_000), (10_000, 12_000)]
    assert fid.inception_split_bounds(3000) == [(0, 3000)]
    # improved-gan: i * N // splits.
    assert fid.inception_split_bounds(10, splits=3) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="splits <= N"):
        fid.inception_split_bounds(5, splits=6)


def test_precision_recall_identical_and_disjoint_clouds():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((40, 16))
    assert precision_recall(real, real.copy(), k=3, batch=7) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3, batch=7) == (0.0, 0.0)


def test_precision_recall_half_overlap():
    # real = A u B, fake = A u C with A, B, C far apart: half the fakes lie on the real manifold and vice versa.
    rng = np.random.default_rng(5)
    cluster_a, cluster_b, cluster_c = (rng.standard_normal((20, 8)) + offset for offset in (0.0, 50.0, -50.0))
    precision, recall = precision_recall(np.concatenate([cluster_a, cluster_b]),
                                         np.concatenate([cluster_a, cluster_c]), k=3, batch=9)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(0.5)


def test_precision_uses_kth_nearest_other_point_as_radius():
    # 1-D reals 0, 1, 3, 6, 10. k = 1: squared radii 1, 1, 4, 9, 16 -> fakes 12, 8.5, -0.9 inside; 15, -1.5 outside.
    # k = 2: squared radii 9, 4, 9, 16, 49 -> all five fakes inside.
    real = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    fake = np.array([[12.0], [8.5], [15.0], [-0.9], [-1.5]])
    assert precision_recall(real, fake, k=1)[0] == pytest.approx(3 / 5)
    assert precision_recall(real, fake, k=2)[0] == pytest.approx(1.0)


#################################################################################
#                                 FID Inception                                 #
#################################################################################

# Independent description of torchvision's Inception3 (inception.py): block type of each Mixed_* and the
# BasicConv2d children of each type. pytorch-fid's FID* blocks keep these children; AuxLogits is absent.
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
         ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
         ("Mixed_7c", "E")]
BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
CONV_KEYS = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def expected_inception_keys():
    convs = STEM + [f"{block}.{branch}" for block, kind in MIXED for branch in BRANCHES[kind]]
    return {f"{conv}.{key}" for conv in convs for key in CONV_KEYS} | {"fc.weight", "fc.bias"}


def test_inception_state_dict_keys_and_parameter_count():
    with torch.device("meta"):
        model = FIDInception()
    assert set(model.state_dict()) == expected_inception_keys()
    assert len(model.state_dict()) == 94 * 6 + 2
    # torchvision's inception_v3 has 27,161,264 parameters (weights meta); drop InceptionAux
    # (conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000) and widen fc to 1008 classes.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    expected = 27_161_264 - aux + 8 * (2048 + 1)
    assert sum(p.numel() for p in model.parameters()) == expected == 23_850_960


def test_inception_weight_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        FIDInception(str(tmp_path / "missing.pth"))
    # torchvision's Inception3 with its aux head is the wrong file: named in a one-line error, not a strict-load dump.
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768)}, tmp_path / "aux.pth")
    with pytest.raises(ValueError, match="unexpected, e.g. \\['AuxLogits.fc.weight'\\]"):
        FIDInception(str(tmp_path / "aux.pth"))
    model = FIDInception()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.bias"] = torch.arange(1008.0)
    torch.save(state, tmp_path / "fid.pth")  # an export without BN step counters, like old pytorch checkpoints
    model.load_weights(str(tmp_path / "fid.pth"))
    assert torch.equal(model.fc.bias, torch.arange(1008.0))


def bilinear_resize_1d(n_in, n_out):
    """Interpolation matrix of align_corners=False bilinear resizing: src = (i + 0.5) n_in / n_out - 0.5, >= 0."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(np.floor(src))
        hi, frac = min(lo + 1, n_in - 1), src - lo
        matrix[i, lo] += 1 - frac
        matrix[i, hi] += frac
    return matrix


def test_preprocess_matches_hand_bilinear_resize_and_scaling():
    rng = np.random.default_rng(6)
    image = rng.uniform(0, 1, (1, 3, 5, 7))
    rows, cols = bilinear_resize_1d(5, 299), bilinear_resize_1d(7, 299)
    expected = 2 * np.einsum("ih,chw,jw->cij", rows, image[0], cols) - 1
    got = preprocess(torch.tensor(image, dtype=torch.float64))
    assert got.shape == (1, 3, 299, 299)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-12)
    assert torch.allclose(preprocess(torch.full((1, 3, 64, 64), 0.25)), torch.tensor(-0.5))  # 2 * 0.25 - 1


def test_tf_pooling_quirks():
    # TF averages only over real pixels: a constant map stays constant at the border (zero padding would give 4/9
    # in the corners). Mixed_7b averages, Mixed_7c max-pools (pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2).
    assert torch.equal(tf_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert tf_avg_pool(x)[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    with torch.device("meta"):
        model = FIDInception()
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")


@pytest.mark.slow
def test_inception_forward_shapes_and_outputs():
    model = FIDInception()
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("mixed_6_conv", o))
    model.Mixed_7c.register_forward_hook(lambda m, i, o: captured.setdefault("mixed_10", o))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 7 * 17 * 17)
    assert captured["mixed_6_conv"].shape == (2, 192, 17, 17) and captured["mixed_10"].shape == (2, 2048, 8, 8)
    # sFID = first 7 channels of mixed_6/conv in TF's NHWC order: element (h, w, c) at index (h * 17 + w) * 7 + c.
    conv = captured["mixed_6_conv"]
    assert torch.equal(out["spatial"][1, (3 * 17 + 5) * 7 + 6], conv[1, 6, 3, 5])
    assert torch.allclose(out["pool"], captured["mixed_10"].mean(dim=(2, 3)))
    assert torch.allclose(out["logits"] - out["logits_unbiased"], model.fc.bias.expand(2, -1), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


#################################################################################
#                        .npz Files and Feature Extraction                      #
#################################################################################

def test_adm_npz_round_trip(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    path = str(tmp_path / "samples.npz")
    save_adm_npz(path, images)
    assert os.listdir(tmp_path) == ["samples.npz"]  # the temp file was renamed, nothing left behind
    with np.load(path) as f:
        assert f.files == ["arr_0"]
    np.testing.assert_array_equal(load_images_npz(path), images)
    with pytest.raises(ValueError, match="uint8"):
        save_adm_npz(path, images.astype(np.float32))
    with pytest.raises(ValueError, match=".npz"):
        save_adm_npz(str(tmp_path / "samples.npy"), images)
    np.savez(tmp_path / "other.npz", images=images)
    with pytest.raises(ValueError, match="arr_0"):
        load_images_npz(str(tmp_path / "other.npz"))


def test_statistics_cache_is_used_without_a_network(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma, mu_s, sigma_s = rng.standard_normal(4), np.eye(4), rng.standard_normal(3), 2 * np.eye(3)
    path = str(tmp_path / "ref_stats.npz")
    save_statistics(path, mu, sigma, mu_s, sigma_s)
    stats = load_statistics(path)
    np.testing.assert_array_equal(stats["pool"][0], mu)
    np.testing.assert_array_equal(stats["spatial"][1], sigma_s)
    got_mu, got_sigma = compute_statistics(path, model=None, feature="spatial")  # model=None: must not be used
    np.testing.assert_array_equal(got_mu, mu_s)
    np.testing.assert_array_equal(got_sigma, sigma_s)


class MeanColour(torch.nn.Module):
    """Stand-in feature network: per-channel mean of the [0, 1] input."""

    def forward(self, x):
        return {"pool": x.mean(dim=(2, 3))}


def test_compute_features_folder_npz_and_array_agree(tmp_path):
    images = np.random.default_rng(9).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    save_adm_npz(str(tmp_path / "samples.npz"), images)
    expected = images.reshape(5, -1, 3).mean(axis=1) / 255.0  # uint8 -> [0, 1] before the network
    for source in (images, str(tmp_path / "samples.npz"), str(folder)):
        feats = compute_features(source, MeanColour(), batch_size=2)
        np.testing.assert_allclose(feats["pool"], expected, atol=1e-6)
    mu, sigma = compute_statistics(images, MeanColour(), batch_size=3)
    np.testing.assert_allclose(mu, expected.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(expected, rowvar=False), atol=1e-6)


def test_cli_with_statistics_only_files(tmp_path, capsys):
    rng = np.random.default_rng(10)
    mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
    save_statistics(str(tmp_path / "a.npz"), mu1, np.eye(4), np.zeros(3), np.eye(3))
    save_statistics(str(tmp_path / "b.npz"), mu2, np.eye(4), np.ones(3), np.eye(3))
    (tmp_path / "weights.pth").write_bytes(b"")  # never loaded: statistics-only inputs need no network
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception-weights", str(tmp_path / "weights.pth")])
    out = capsys.readouterr().out
    assert f"FID: {np.sum((mu1 - mu2) ** 2):.4f}" in out
    assert "sFID: 3.0000" in out
    assert "Skipped: Inception Score" in out and "precision/recall" in out
    assert "samples statistics" in out and "mu/sigma stored in the file; mu_s/sigma_s stored in the file" in out


#################################################################################
#                          Streaming 50K-sample .npz Files                      #
#################################################################################

def pixel_features(images):
    """The float32 [0, 1] pixels of uint8 NHWC images in the network's NCHW order, flattened, computed in numpy."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.float32) / np.float32(255)


class PixelInception(torch.nn.Module):
    """Stand-in for FIDInception whose features pixel_features() reproduces: pool = first 6 values, spatial = the
    squares of the next 4, logits = 20 x the first 5."""

    def __init__(self, weights_path=None):
        super().__init__()

    def forward(self, x):
        flat = x.flatten(1)
        return dict(pool=flat[:, :6], spatial=flat[:, 6:10] ** 2, logits=20 * flat[:, :5],
                    logits_unbiased=20 * flat[:, :5])


def test_npz_streaming_statistics_match_whole_array(tmp_path):
    images = np.random.default_rng(11).integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    save_adm_npz(str(tmp_path / "stored.npz"), images)
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=images)  # zipfile inflates a member as it is read
    feats = pixel_features(images)
    expected = {"pool": fid.feature_statistics(feats[:, :6]), "spatial": fid.feature_statistics(feats[:, 6:10] ** 2)}
    for name in ("stored.npz", "deflated.npz"):
        for batch_size in (1, 4, 23, 50):  # one image per batch, a short last batch, one batch, more than N
            kept, stats = fid.extract_features(str(tmp_path / name), PixelInception(), batch_size,
                                               keep=["pool"], statistics=["pool", "spatial"])
            assert kept["pool"].dtype == np.float32 and set(kept) == {"pool"}
            np.testing.assert_array_equal(kept["pool"], feats[:, :6])
            for feature, (mu, sigma) in expected.items():
                np.testing.assert_allclose(stats[feature][0], mu, rtol=1e-10, atol=1e-13)
                np.testing.assert_allclose(stats[feature][1], sigma, rtol=1e-9, atol=1e-13)
    mu, sigma = compute_statistics(str(tmp_path / "stored.npz"), PixelInception(), batch_size=5, feature="spatial")
    np.testing.assert_allclose(sigma, expected["spatial"][1], rtol=1e-9, atol=1e-13)


def test_running_statistics_keep_precision_far_from_the_origin():
    # Features of spread 1 around 1e6: the one-pass sum(x x^T) - n mu mu^T formula loses ~1e-4 here in float64.
    x = np.random.default_rng(12).standard_normal((1000, 3)) + 1e6
    running = fid.RunningStatistics()
    for start in range(0, 1000, 64):
        running.update(torch.from_numpy(x[start:start + 64]))
    mu, sigma = running.finalize()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_npz_streaming_never_holds_the_whole_array(tmp_path):
    import tracemalloc
    images = np.random.default_rng(13).integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)  # 3 MB
    save_adm_npz(str(tmp_path / "stored.npz"), images)
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=images)

    def peak_bytes(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # control: the whole-array read is visible to tracemalloc
    assert peak_bytes(lambda: load_images_npz(str(tmp_path / "stored.npz"))) >= images.nbytes
    for name in ("stored.npz", "deflated.npz"):
        peak = peak_bytes(lambda: compute_statistics(str(tmp_path / name), MeanColour(), batch_size=8))
        # 8 images are 24 KB; zipfile / zlib buffers add a constant ~0.15 MB whatever the file's size
        assert peak < images.nbytes / 10, (name, peak)


#################################################################################
#                        Command Line: Inputs and Reports                       #
#################################################################################

@pytest.fixture
def stand_in_network(monkeypatch, tmp_path):
    """main() with PixelInception in place of FIDInception; returns the (empty, existing) weight file path."""
    import eval.inception
    monkeypatch.setattr(eval.inception, "FIDInception", PixelInception)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    return str(weights)


def cli_error(capsys, argv):
    """Run main(argv), expect exit status 2 and return its single `error:` line (tqdm may also write to stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def write_images_npz(path, n=10, seed=14, size=4):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    save_adm_npz(str(path), images)
    return images


@pytest.mark.parametrize("kind", ["npy", "png"])
def test_cli_rejects_input_that_is_neither_folder_nor_npz(tmp_path, capsys, stand_in_network, kind):
    images = write_images_npz(tmp_path / "ref.npz")
    path = tmp_path / f"samples.{kind}"
    if kind == "npy":
        np.save(path, images)
    else:
        Image.fromarray(images[0]).save(path)
    line = cli_error(capsys, [path, tmp_path / "ref.npz", "--inception-weights", stand_in_network])
    assert str(path) in line and "neither a folder of images nor an .npz file" in line


def test_cli_rejects_missing_input(tmp_path, capsys, stand_in_network):
    write_images_npz(tmp_path / "samples.npz")
    line = cli_error(capsys, [tmp_path / "samples.npz", tmp_path / "nope.npz", "--inception-weights",
                              stand_in_network])
    assert str(tmp_path / "nope.npz") in line and "no such file or folder" in line


def npz_bytes_with_short_or_long_arr_0(images, extra):
    """A zip whose arr_0.npy header announces 10 images but whose data holds len(images) images (+ extra bytes)."""
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10, *images.shape[1:])})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("arr_0.npy", header.getvalue() + images.tobytes() + extra)
    return buffer.getvalue()


@pytest.mark.parametrize("damage, message", [
    ("garbage", "not a readable zip archive"),
    ("truncated", "corrupt or truncated"),       # the zip directory at the end is gone
    ("flipped bytes", "reading images 9-9 of arr_0 failed (BadZipFile: Bad CRC-32"),  # checked at the member's end
    ("short arr_0", "arr_0 ends after 5 of the 10 images"),
    ("long arr_0", "more bytes than its header's shape"),
])
def test_cli_rejects_corrupt_or_truncated_npz(tmp_path, capsys, stand_in_network, damage, message):
    # 32 x 32 images: 30 KB, more than zipfile's 4 KB read-ahead, so damage near the end is met while streaming
    images = write_images_npz(tmp_path / "good.npz", size=32)
    good = (tmp_path / "good.npz").read_bytes()
    data = {"garbage": b"not a zip archive at all",
            "truncated": good[:len(good) // 2],
            "flipped bytes": good.replace(images[7].tobytes(), bytes(255 - images[7])),
            "short arr_0": npz_bytes_with_short_or_long_arr_0(images[:5], b""),
            "long arr_0": npz_bytes_with_short_or_long_arr_0(images, b"xx")}[damage]
    (tmp_path / "bad.npz").write_bytes(data)
    line = cli_error(capsys, [tmp_path / "bad.npz", tmp_path / "good.npz", "--inception-weights", stand_in_network,
                              "--batch-size", "3"])
    assert str(tmp_path / "bad.npz") in line and "not a valid ADM batch (arr_0 uint8 NHWC with 3 channels)" in line
    assert message in line


@pytest.mark.parametrize("arrays, message", [
    (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "arr_0 is float32 (4, 8, 8, 3)"),
    (dict(arr_0=np.zeros((4, 8, 8, 4), np.uint8)), "arr_0 is uint8 (4, 8, 8, 4)"),
    (dict(arr_0=np.zeros((4, 8, 3), np.uint8)), "arr_0 is uint8 (4, 8, 3)"),  # 3 channels but no width
    (dict(arr_0=np.asfortranarray(np.zeros((4, 8, 8, 3), np.uint8))), "Fortran order"),
    (dict(arr_0=np.array([None, 1], dtype=object)), "object array"),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8)), "neither arr_0 nor mu/sigma"),
])
def test_cli_rejects_npz_that_is_not_uint8_nhwc(tmp_path, capsys, stand_in_network, arrays, message):
    write_images_npz(tmp_path / "good.npz")
    np.savez(tmp_path / "bad.npz", **arrays)
    line = cli_error(capsys, [tmp_path / "good.npz", tmp_path / "bad.npz", "--inception-weights", stand_in_network])
    assert str(tmp_path / "bad.npz") in line and "not a valid ADM batch (arr_0 uint8 NHWC with 3 channels)" in line
    assert message in line


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"these are not torch weights", "not a readable torch weight file"),
    ({"AuxLogits.fc.weight": torch.zeros(2, 2)}, "not pytorch-fid's FID Inception state dict"),
    (torch.zeros(3), "holds a Tensor, not a state dict"),
])
def test_cli_rejects_bad_inception_weights(tmp_path, capsys, content, message):
    write_images_npz(tmp_path / "samples.npz")
    weights = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    elif content is not None:
        torch.save(content, weights)
    line = cli_error(capsys, [tmp_path / "samples.npz", tmp_path / "samples.npz", "--inception-weights", weights])
    assert str(weights) in line and message in line and "pt_inception-2015-12-05-6726825d.pth" in line


def test_cli_says_whether_stored_or_recomputed_statistics_were_used(tmp_path, capsys, stand_in_network):
    samples, reference = write_images_npz(tmp_path / "s.npz", 12, 15), write_images_npz(tmp_path / "r.npz", 12, 16)
    mu_ref, sigma_ref = np.full(6, 0.5), 0.1 * np.eye(6)
    np.savez(tmp_path / "r.npz", arr_0=reference, mu=mu_ref, sigma=sigma_ref)  # an ADM reference batch: images + stats
    fs, fr = pixel_features(samples)[:, :6], pixel_features(reference)[:, :6]
    args = [tmp_path / "s.npz", tmp_path / "r.npz", "--inception-weights", stand_in_network]

    fid.main([str(a) for a in args])
    out = capsys.readouterr().out
    assert (f"reference statistics ({tmp_path / 'r.npz'}): mu/sigma recomputed from its 12 images; mu_s/sigma_s "
            f"recomputed from its 12 images (stored mu/sigma not used" in out)
    assert f"samples statistics ({tmp_path / 's.npz'}): mu/sigma recomputed from its 12 images" in out
    recomputed = frechet_distance(*fid.feature_statistics(fs), *fid.feature_statistics(fr))
    assert f"FID: {recomputed:.4f}" in out

    fid.main([str(a) for a in args] + ["--prefer-stored-stats"])
    out = capsys.readouterr().out
    assert (f"reference statistics ({tmp_path / 'r.npz'}): mu/sigma stored in the file; mu_s/sigma_s recomputed "
            f"from its 12 images\n" in out)
    stored = frechet_distance(*fid.feature_statistics(fs), mu_ref, sigma_ref)
    assert f"FID: {stored:.4f}" in out and f"{stored:.4f}" != f"{recomputed:.4f}"


def test_cli_inception_score_split_modes(tmp_path, capsys, stand_in_network):
    samples = write_images_npz(tmp_path / "s.npz", 12, 17)
    logits = 20 * pixel_features(samples)[:, :5]
    base = [str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--inception-weights", stand_in_network]
    for extra, text, kwargs in [([], "ADM split size 5000: 1 splits of 12 samples", {}),
                                (["--is-split-size", "5"], "ADM split size 5: 3 splits of 5 / 2 samples",
                                 dict(split_size=5)),
                                (["--is-splits", "4"], "4 fixed splits (improved-gan): 4 splits of 3 samples",
                                 dict(splits=4))]:
        fid.main(base + extra)
        out = capsys.readouterr().out
        mean, std = inception_score(logits, **kwargs)
        assert f"Inception Score: {mean:.4f} +- {std:.4f} ({text}, unweighted mean)" in out, out
    assert "more than the 12 sample images" in cli_error(capsys, base + ["--is-splits", "13"])
    assert "--is-split-size must be >= 1" in cli_error(capsys, base + ["--is-split-size", "0"])
    with pytest.raises(SystemExit):  # argparse: the two modes exclude each other
        fid.main(base + ["--is-splits", "4", "--is-split-size", "5"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_fidmem_measures_the_kept_features_and_removes_its_file(tmp_path, capsys):
    import argparse
    from eval import bench
    results = {}
    bench.bench_fidmem(argparse.Namespace(quick=True, fidmem_samples=40, fidmem_size=16, fidmem_dir=str(tmp_path)),
                       torch.device("cpu"), results)
    assert "[fidmem] 40 x 16x16x3 .npz" in capsys.readouterr().out
    # what the measured pass must hold: the kept pool (2048) and IS logits (1008) of 40 samples, in float32
    assert results["fidmem_traced_gb"] * 1e9 >= 40 * (2048 + 1008) * 4
    assert os.listdir(tmp_path) == []
