"""PASCAL-Context / NYUD-v2 readers on tiny fake trees in the ATRC release layout; the authors' input pipeline
(ImageNet normalisation, padding after it, ignore regions) and training augmentation (scale, crop with the class-ratio
rule, flip, photometric distortion with OpenCV's HSV conversions checked against cv2 4.7 outputs)."""
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from data import dense
from data.dense import NORMALS_VALID_CONTEXT_CLASSES, NYUD, PascalContext, StepKeyedSampler

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet (utils/common_config.py)


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _human_parts_mat(path, shape, people):
    """PASCAL-Part style anno struct; `people` = list of (class_ind, [(part name, mask)])."""
    part_dtype = [("part_name", "O"), ("mask", "O")]
    object_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objects = np.zeros((1, len(people)), dtype=object_dtype)
    for i, (class_ind, parts) in enumerate(people):
        part_array = np.zeros((1, len(parts)), dtype=part_dtype) if parts else np.zeros((0, 0))
        for j, (name, mask) in enumerate(parts):
            part_array[0, j] = (name, mask.astype(np.uint8))
        union = np.zeros(shape, np.uint8)
        for _, mask in parts:
            union |= mask.astype(np.uint8)
        objects[0, i] = ("person" if class_ind == 15 else "dog", np.array([[class_ind]]), union, part_array)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("x", objects)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {"anno": anno})


#################################################################################
#                         PASCAL-Context                                         #
#################################################################################

H, W = 12, 20  # native size of the fake PASCAL images


@pytest.fixture
def pascal_root(tmp_path):
    root = tmp_path / "PASCAL_MT"
    rng = np.random.default_rng(0)
    ids = ["2008_000001", "2008_000002"]
    os.makedirs(root / "ImageSets" / "Context")
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(ids) + "\n")
    for k, image_id in enumerate(ids):
        os.makedirs(root / "JPEGImages", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        semseg = np.zeros((H, W), np.uint8)
        semseg[:, W // 2:] = 15
        semseg[0, 0] = 255
        folder = "VOC12" if k == 0 else "pascal-context"  # both semseg locations are accepted
        _write_png(str(root / "semseg" / folder / f"{image_id}.png"), semseg)
        # Context label map: left half person (284, normals valid), right half aeroplane (2, not valid)
        label_map = np.full((H, W), 284, np.uint16)
        label_map[:, W // 2:] = 2
        os.makedirs(root / "pascal-context" / "trainval", exist_ok=True)
        scipy.io.savemat(str(root / "pascal-context" / "trainval" / f"{image_id}.mat"), {"LabelMap": label_map})
        normals = np.zeros((H, W, 3), np.uint8)
        normals[..., 0], normals[..., 1], normals[..., 2] = 0, 255, 51
        _write_png(str(root / "normals_distill" / f"{image_id}.png"), normals)
        sal = np.full((H, W), 100, np.uint8)
        sal[:4] = 200
        _write_png(str(root / "sal_distill" / f"{image_id}.png"), sal)
        head, arm, leg = (np.zeros((H, W), bool) for _ in range(3))
        head[1:3, 1:3], arm[4:6, 1:3], leg[8:10, 1:3] = True, True, True
        people = [(15, [("hair", head), ("ruarm", arm), ("llleg", leg)]), (12, [])] if k == 0 else [(12, [])]
        _human_parts_mat(str(root / "human_parts" / f"{image_id}.mat"), (H, W), people)
    return str(root)


def test_pascal_shapes_dtypes_and_padding(pascal_root):
    data = PascalContext(pascal_root, split="val", image_size=24)
    assert len(data) == 2
    item = data[0]
    assert item["name"] == "2008_000001"
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    for key in ("semseg", "human_parts"):
        assert item[key].shape == (24, 24) and item[key].dtype == torch.int64
    for key in ("sal", "edge"):
        assert item[key].shape == (24, 24) and item[key].dtype == torch.float32
    assert item["normals"].shape == (3, 24, 24) and item["normals"].dtype == torch.float32
    top, left = (24 - H) // 2, (24 - W) // 2  # centred padding, labels ignored outside
    inside = (slice(top, top + H), slice(left, left + W))
    pad = torch.ones(24, 24, dtype=torch.bool)
    pad[inside] = False
    for key in ("semseg", "human_parts", "sal", "edge"):
        assert torch.all(item[key][pad] == 255)
    # padded after normalising: the mean colour (0), not black; padded normals are ignored (255)
    assert torch.all(item["image"][:, pad] == 0) and torch.all(item["normals"][:, pad] == 255)
    rgb = np.asarray(Image.open(os.path.join(pascal_root, "JPEGImages", "2008_000001.jpg")).convert("RGB"))
    expected = (rgb / 255 - MEAN) / STD  # the decoded JPEG, standardised
    torch.testing.assert_close(item["image"][:, inside[0], inside[1]].permute(1, 2, 0).double(),
                               torch.from_numpy(expected), atol=1e-5, rtol=0)
    semseg = item["semseg"][inside]
    assert semseg[0, 0] == 255 and torch.all(semseg[1:, : W // 2] == 0) and torch.all(semseg[:, W // 2:] == 15)
    # the LabelMap itself rides along for SEISM's boundary GT (seg2bmap of it), padded with -1 (ids reach 459)
    segments = item["edge_segments"]
    assert segments.dtype == torch.int64 and torch.all(segments[pad] == -1)
    assert torch.all(segments[inside][:, : W // 2] == 284) and torch.all(segments[inside][:, W // 2:] == 2)


def test_pascal_label_conventions(pascal_root):
    data = PascalContext(pascal_root, split="val", image_size=None)
    item = data[0]
    assert item["image"].shape == (3, H, W)
    parts = item["human_parts"]  # hair -> head (1), ruarm -> upper arm (3), llleg -> lower leg (6)
    assert parts[1, 1] == 1 and parts[4, 1] == 3 and parts[8, 1] == 6 and parts[0, 10] == 0
    assert set(parts.unique().tolist()) == {0, 1, 3, 6}
    assert torch.all(data[1]["human_parts"] == 255)  # no person parts -> whole map ignored
    sal = item["sal"]  # PNG 200 -> 1, 100 -> 0 (threshold 0.5)
    assert torch.all(sal[:4] == 1) and torch.all(sal[4:] == 0)
    normals = item["normals"]  # 2 x / 255 - 1 on valid Context classes, 255 (ignored) elsewhere
    expected = torch.tensor([-1.0, 1.0, 2 * 51 / 255 - 1])
    assert torch.allclose(normals[:, 5, 2], expected) and torch.all(normals[:, :, W // 2:] == 255)
    assert 284 in NORMALS_VALID_CONTEXT_CLASSES and 2 not in NORMALS_VALID_CONTEXT_CLASSES
    edge = item["edge"]  # one thin vertical boundary between the two Context regions
    assert set(edge.unique().tolist()) == {0.0, 1.0}
    columns = torch.nonzero(edge)[:, 1]
    assert set(columns.tolist()) <= {W // 2 - 1, W // 2}
    assert torch.all(edge.sum(1) <= 1) and edge.sum() >= H - 2  # thinned to 1 px (ends may shorten)


def test_pascal_stretch_resize_keeps_label_values(pascal_root):
    data = PascalContext(pascal_root, split="val", image_size=(16, 32), resize="stretch")
    item = data[0]
    assert item["image"].shape == (3, 16, 32) and item["semseg"].shape == (16, 32)
    assert set(item["semseg"].unique().tolist()) <= {0, 15, 255}
    assert set(item["sal"].unique().tolist()) <= {0.0, 1.0}
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 32) and batch["name"] == ["2008_000001", "2008_000002"]


def test_pascal_missing_folders_and_bad_arguments(pascal_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages/"):
        PascalContext(str(tmp_path / "nowhere"), split="val")
    os.rename(os.path.join(pascal_root, "sal_distill"), os.path.join(pascal_root, "moved"))
    with pytest.raises(FileNotFoundError, match="sal_distill"):
        PascalContext(pascal_root, split="val")
    assert len(PascalContext(pascal_root, split="val", tasks=("semseg", "edge"))) == 2  # sal not needed
    with pytest.raises(FileNotFoundError, match="train.txt"):
        PascalContext(pascal_root, split="train", tasks=("semseg",))
    with pytest.raises(ValueError, match="unknown task"):
        PascalContext(pascal_root, split="val", tasks=("depth",))


#################################################################################
#                         NYUD-v2                                                #
#################################################################################

@pytest.fixture
def nyud_root(tmp_path):
    root = tmp_path / "NYUD_MT"
    rng = np.random.default_rng(1)
    os.makedirs(root / "gt_sets")
    (root / "gt_sets" / "train.txt").write_text("0001\n0002\n")
    for image_id in ("0001", "0002"):
        image = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
        image[2, 3] = (200, 100, 50)  # the hand-computed pixel of test_nyud_native_size_and_conventions
        _write_png(str(root / "images" / f"{image_id}.png"), image)
        semseg = np.zeros((10, 14), np.uint8)
        semseg[:, 7:] = 3
        semseg[:, 10:] = 40
        _write_png(str(root / "segmentation" / f"{image_id}.png"), semseg)
        depth = np.full((10, 14), 2.5, np.float32)
        depth[0, 0] = 0.0
        os.makedirs(root / "depth", exist_ok=True)
        np.save(root / "depth" / f"{image_id}.npy", depth)
        normals = np.full((10, 14, 3), 255, np.uint8)
        normals[..., 0] = 0
        _write_png(str(root / "normals" / f"{image_id}.png"), normals)
        edge = np.zeros((10, 14), np.uint8)
        edge[:, 7] = 255
        _write_png(str(root / "edge" / f"{image_id}.png"), edge)
    return str(root)


def test_nyud_native_size_and_conventions(nyud_root):
    item = NYUD(nyud_root, split="train", image_size=None)[0]
    assert item["image"].shape == (3, 10, 14)
    # RGB (200, 100, 50) by hand: (200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225
    torch.testing.assert_close(item["image"][:, 2, 3], torch.tensor([1.3070468, -0.2850140, -0.9329847]),
                               atol=1e-6, rtol=0)
    semseg = item["semseg"]  # label - 1, with 0 (unlabelled) -> 255
    assert semseg.dtype == torch.int64
    assert torch.all(semseg[:, :7] == 255) and torch.all(semseg[:, 7:10] == 2) and torch.all(semseg[:, 10:] == 39)
    assert item["depth"].dtype == torch.float32 and item["depth"][0, 0] == 0 and item["depth"][5, 5] == 2.5
    assert torch.allclose(item["normals"][:, 3, 3], torch.tensor([-1.0, 1.0, 1.0]))
    assert torch.all(item["edge"][:, 7] == 1) and item["edge"].sum() == 10


def test_nyud_crop_pad_and_stretch(nyud_root):
    cropped = NYUD(nyud_root, split="train", image_size=(8, 12))[1]
    assert cropped["image"].shape == (3, 8, 12) and cropped["depth"].shape == (8, 12)
    assert torch.all(cropped["edge"][:, 6] == 1)  # centre crop drops one column on each side
    padded = NYUD(nyud_root, split="train", image_size=(12, 16))[0]
    assert torch.all(padded["semseg"][0] == 255) and torch.all(padded["depth"][0] == 0)
    assert torch.all(padded["image"][:, 0] == 0) and torch.all(padded["normals"][:, 0] == 255)  # row 0 is padding
    torch.testing.assert_close(padded["image"][:, 3, 4], torch.tensor([1.3070468, -0.2850140, -0.9329847]),
                               atol=1e-6, rtol=0)  # the same pixel, shifted by the centred padding (1, 1)
    stretched = NYUD(nyud_root, split="train", image_size=(20, 28), resize="stretch")[0]
    depth = stretched["depth"]
    assert depth.shape == (20, 28) and torch.all(depth[:2, :2] == 0)  # invalid depth stays invalid
    assert torch.allclose(depth[5:, 5:], torch.tensor(2.5))
    assert set(stretched["semseg"].unique().tolist()) <= {255, 2, 39}


def test_nyud_missing_folder_message(nyud_root):
    os.rename(os.path.join(nyud_root, "depth"), os.path.join(nyud_root, "moved"))
    with pytest.raises(FileNotFoundError, match=r"depth.*gt_sets/\{train,val\}\.txt"):
        NYUD(nyud_root, split="train")
    assert len(NYUD(nyud_root, split="train", tasks=("semseg", "normals", "edge"))) == 2


#################################################################################
#                  Training augmentation (the authors' transforms)               #
#################################################################################

def _sample(h=40, w=60, seed=0):
    """A numpy sample in the reader's layout with asymmetric maps; image channels 0/1 encode row/column."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([rows, cols, rng.integers(0, 256, (h, w))], -1).astype(np.float32)
    semseg = np.where(cols < w // 3, 3, np.where(rows < h // 2, 7, 12)).astype(np.int64)
    semseg[0, :5] = 255
    normals = rng.normal(size=(h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return {"image": image, "semseg": semseg, "human_parts": np.where(cols > w - 6, 2, 0).astype(np.int64),
            "sal": (cols > w // 2).astype(np.float32), "edge": (rows % 7 == 0).astype(np.float32),
            "depth": (1 + rows + cols / 10).astype(np.float32), "normals": normals}


def test_flip_mirrors_every_map_alike_and_negates_normals_x():
    sample, outcomes = _sample(), set()
    for seed in range(12):
        out = dense.random_flip({k: v.copy() for k, v in sample.items()}, np.random.default_rng(seed))
        flipped = not np.array_equal(out["image"], sample["image"])
        outcomes.add(flipped)
        mirror = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
        for key in ("image", "semseg", "human_parts", "sal", "edge", "depth"):
            assert np.array_equal(out[key], mirror(sample[key])), key
        expected = mirror(sample["normals"]).copy()
        expected[..., 0] *= -1 if flipped else 1  # a mirrored surface faces the other way along x
        assert np.array_equal(out["normals"], expected)
    assert outcomes == {True, False}


def test_scaling_keeps_class_maps_integral_and_divides_depth():
    sample = _sample()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        scale = np.random.default_rng(seed).uniform(0.5, 2.0)
        out = dense.random_scale(sample, rng)
        size = (int(40 * scale), int(60 * scale))  # RandomScaling: int(H s) x int(W s)
        assert all(a.shape[:2] == size for a in out.values())
        for key in ("semseg", "human_parts"):  # nearest: no new ids, no blends
            assert out[key].dtype == np.int64 and set(np.unique(out[key])) <= set(np.unique(sample[key]))
        assert set(np.unique(out["sal"])) <= {0.0, 1.0} and set(np.unique(out["edge"])) <= {0.0, 1.0}
        # nearest source pixel (floor(dst * src / dst_size), cv2 INTER_NEAREST) and depth / s
        r, c = size[0] - 1, size[1] // 2
        src = (int(r * 40 / size[0]), int(c * 60 / size[1]))
        assert out["semseg"][r, c] == sample["semseg"][src]
        assert out["depth"][r, c] == pytest.approx(sample["depth"][src] / scale, rel=1e-6)
        assert np.array_equal(out["normals"][r, c], sample["normals"][src])  # nearest keeps unit normals unit
        # bilinear image, half-pixel centres: channel 1 (the column index) maps back to (c + 0.5) * 60 / W - 0.5
        expected_col = np.clip((c + 0.5) * 60 / size[1] - 0.5, 0, 59)
        assert out["image"][r, c, 1] == pytest.approx(expected_col, abs=1e-3)


def test_crop_redraws_while_one_class_dominates():
    """RandomCrop(cat_max_ratio=0.75): the first of 11 draws whose semseg passes, else the 11th untested."""
    size = (10, 10)

    def draws(seed, n):
        rng = np.random.default_rng(seed)
        return [(int(rng.integers(0, 31)), int(rng.integers(0, 51))) for _ in range(n)]

    def location(out):  # image channels 0 / 1 hold the source row / column
        return int(out["image"][0, 0, 0]), int(out["image"][0, 0, 1])

    single = {**_sample(), "semseg": np.full((40, 60), 4, np.int64)}  # no crop can pass: the 11th draw is kept
    for seed in range(3):
        out = dense.random_crop(single, size, np.random.default_rng(seed))
        assert location(out) == draws(seed, 11)[-1] and out["semseg"].shape == size
    sample = _sample()
    for seed in range(20):
        out = dense.random_crop(sample, size, np.random.default_rng(seed))
        candidates = draws(seed, 11)
        passing = [loc for loc in candidates[:10] if dense._class_ratio_ok(
            sample["semseg"][loc[0]:loc[0] + 10, loc[1]:loc[1] + 10], 0.75)]
        assert location(out) == (passing[0] if passing else candidates[-1])
        for key, array in out.items():  # every map cut at the same place
            assert np.array_equal(array, sample[key][location(out)[0]:location(out)[0] + 10,
                                                     location(out)[1]:location(out)[1] + 10]), key
    # the ratio rule itself: two classes at 74 % / 26 % pass; 75 % or a single class does not
    assert dense._class_ratio_ok(np.array([1] * 74 + [2] * 26 + [255] * 50), 0.75)
    assert not dense._class_ratio_ok(np.array([1] * 75 + [2] * 25), 0.75)
    assert not dense._class_ratio_ok(np.array([1] * 10 + [255] * 90), 0.75)
    assert not dense._class_ratio_ok(np.full(100, 255), 0.75)  # all ignored (padding): re-draw


def test_opencv_hsv_conversions_match_cv2():
    ref = np.load(os.path.join(FIXTURES, "taskdiffusion_cv2_hsv.npz"))  # cv2 4.7.0 outputs (the authors' pin)
    assert np.array_equal(dense.rgb_to_hsv_u8(ref["rgb"]), ref["rgb2hsv"])
    assert np.array_equal(dense.hsv_to_rgb_u8(ref["hsv"]), ref["hsv2rgb"])


def test_photometric_distortion_changes_the_image_only():
    sample = _sample(seed=1)
    sample["image"] = np.random.default_rng(1).uniform(0, 255, (40, 60, 3)).astype(np.float32)
    changed = 0
    for seed in range(8):
        out = dense.augment({k: v.copy() for k, v in sample.items()}, (24, 32), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # the same draws without the photometric step
        geometric = dense.random_flip(dense.random_crop(dense.random_scale(sample, rng), (24, 32), rng), rng)
        for key in sample:
            if key != "image":
                assert np.array_equal(out[key], geometric[key]), key
        assert np.all(out["image"] == np.floor(out["image"])) and out["image"].min() >= 0 and out["image"].max() <= 255
        changed += not np.array_equal(out["image"], np.floor(geometric["image"]))
    assert changed >= 6  # P(no step fires) = 1/16 per draw


def test_augmented_items_are_a_function_of_seed_step_and_index(nyud_root):
    data = NYUD(nyud_root, split="train", image_size=(8, 12), augment=True, seed=5)
    a, b, c = data[(1, 7)], data[(1, 7)], data[(1, 8)]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "semseg", "depth", "normals", "edge"))
    assert not all(torch.equal(a[k], c[k]) for k in ("image", "depth"))
    assert a["image"].shape == (3, 8, 12) and a["semseg"].shape == (8, 12)
    pads = [data[(0, step)] for step in range(30)]  # some scale below 8 / 10: the rest is padded and ignored
    padded = [x for x in pads if (x["semseg"] == 255).all(1).any()]
    assert padded
    for x in padded:
        row = (x["semseg"] == 255).all(1)
        assert torch.all(x["image"][:, row] == 0) and torch.all(x["depth"][row] == 0)
        assert torch.all(x["edge"][row] == 255) and torch.all(x["normals"][:, row] == 255)
    with pytest.raises(TypeError, match="StepKeyedSampler"):
        data[0]
    keys = list(StepKeyedSampler(iter([4, 2, 9, 1, 0, 3]), batch_size=2, start_step=10))
    assert keys == [(4, 10), (2, 10), (9, 11), (1, 11), (0, 12), (3, 12)]
