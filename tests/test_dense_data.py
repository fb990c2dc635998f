"""PASCAL-Context / NYUD-v2 readers on tiny fake trees in the ATRC release layout."""
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from data.dense import NORMALS_VALID_CONTEXT_CLASSES, NYUD, PascalContext


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
    assert item["image"].min() >= -1 and item["image"].max() <= 1
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
    assert torch.all(item["image"][:, pad] == -1) and torch.all(item["normals"][:, pad] == 0)
    semseg = item["semseg"][inside]
    assert semseg[0, 0] == 255 and torch.all(semseg[1:, : W // 2] == 0) and torch.all(semseg[:, W // 2:] == 15)


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
    normals = item["normals"]  # 2 x / 255 - 1 on valid Context classes, zero elsewhere
    expected = torch.tensor([-1.0, 1.0, 2 * 51 / 255 - 1])
    assert torch.allclose(normals[:, 5, 2], expected) and torch.all(normals[:, :, W // 2:] == 0)
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
        _write_png(str(root / "images" / f"{image_id}.png"), rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
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
    assert item["image"].shape == (3, 10, 14) and item["image"].min() >= -1 and item["image"].max() <= 1
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
