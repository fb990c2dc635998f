"""Datasets: synthetic shapes (determinism, label geometry, learnability), image folders, pairs, latent shards."""
import colorsys
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from data.image_folder import ImageFolder, center_crop_arr, to_tensor
from data.latents import LatentDataset, LatentShardWriter, sample_latents
from data.paired import PairedImages, SyntheticPairs, voc_palette
from data.synthetic import FOCAL, NUM_SEG_CLASSES, SEMSEG_CLASSES, SyntheticShapes, pixel_grid, sample_scene


#################################################################################
#                                Synthetic shapes                               #
#################################################################################

def test_determinism_per_seed_and_index():
    a, b = SyntheticShapes(100, 32, seed=3, dense=True), SyntheticShapes(100, 32, seed=3, dense=True)
    for i in (0, 7, 99):
        x, y = a[i], b[i]
        for k in ("image", "semseg", "depth", "normals", "edge", "sal"):
            assert torch.equal(x[k], y[k]), k
        assert x["label"] == y["label"]
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticShapes(100, 32, seed=4, dense=True)[0]["image"])
    assert torch.equal(a[-1]["image"], a[99]["image"])
    with pytest.raises(IndexError):
        a[100]


def test_ranges_and_dtypes():
    image, label = SyntheticShapes(10, 24, num_classes=3)[5]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and isinstance(label, int) and 0 <= label < 3
    item = SyntheticShapes(10, 32, dense=True)[2]
    assert item["semseg"].shape == (32, 32) and item["semseg"].dtype == torch.int64
    assert 0 <= item["semseg"].min() and item["semseg"].max() < NUM_SEG_CLASSES == len(SEMSEG_CLASSES) == 5
    for k, shape in (("depth", (32, 32)), ("normals", (3, 32, 32)), ("edge", (32, 32)), ("sal", (32, 32))):
        assert item[k].shape == shape and item[k].dtype == torch.float32, k
    assert set(item["edge"].unique().tolist()) <= {0.0, 1.0} and set(item["sal"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(num_classes=99)


def test_random_hues_keep_the_scene_and_free_the_colour_from_the_class():
    """class_hues=False (the judge's training set) draws the same scenes; only the shapes' hues leave their bands."""
    hues = {True: [[] for _ in range(4)], False: [[] for _ in range(4)]}
    for i in range(300):
        coloured, free = (sample_scene(np.random.default_rng([5, i]), 4, class_hues) for class_hues in (True, False))
        assert coloured.label == free.label and np.array_equal(coloured.background_rgb, free.background_rgb)
        for a, b in zip(coloured.shapes, free.shapes, strict=True):
            assert (a.kind, a.size, a.angle, a.depth) == (b.kind, b.size, b.angle, b.depth)
            assert np.array_equal(a.centre, b.centre)
        for class_hues, scene in ((True, coloured), (False, free)):
            hues[class_hues][scene.label].append(colorsys.rgb_to_hsv(*scene.shapes[-1].rgb)[0])
    # the labelled shape's hue: within its class band (+-0.2 / 4 of the circle, wrapped) vs spread over the circle
    for c in range(4):
        banded = [min(abs(h - c / 4), 1 - abs(h - c / 4)) for h in hues[True][c]]
        spread = np.histogram(hues[False][c], bins=4, range=(0, 1))[0]
        assert max(banded) <= 0.05 + 1e-9 and spread.min() > 0.1 * len(hues[False][c])
    a, b = SyntheticShapes(4, 32, seed=5, dense=True), SyntheticShapes(4, 32, seed=5, dense=True, class_hues=False)
    assert torch.equal(a[1]["semseg"], b[1]["semseg"]) and not torch.equal(a[1]["image"], b[1]["image"])


def neighbour_differs(labels):
    """Pixels with a 4-neighbour of a different label (both sides of every change)."""
    out = np.zeros(labels.shape, bool)
    h, v = labels[:, 1:] != labels[:, :-1], labels[1:] != labels[:-1]
    out[:, 1:] |= h
    out[:, :-1] |= h
    out[1:] |= v
    out[:-1] |= v
    return out


def test_dense_labels_are_consistent():
    ds = SyntheticShapes(40, 32, seed=1, dense=True)
    for i in range(len(ds)):
        r = ds.render(i)
        semseg, instance, depth, normals, edge = r["semseg"], r["instance"], r["depth"], r["normals"], r["edge"]
        assert np.array_equal(r["sal"], (semseg > 0).astype(np.float32))
        assert np.array_equal(edge.astype(bool), neighbour_differs(instance))  # edges = instance changes ...
        assert edge[neighbour_differs(semseg)].all()  # ... which include every semseg change
        assert np.allclose(np.linalg.norm(normals, axis=0), 1, atol=1e-5)
        assert (normals[2] < 0).all()  # every surface faces the camera
        assert (depth > 0).all()
        fg, bg = semseg > 0, semseg == 0
        assert depth[fg].max() < depth[bg].min()  # shapes float in front of the far background plane
        assert 5.0 < depth[bg].min() and depth[bg].max() < 9.0
        # The largest instance is the labelled shape (it is the biggest and drawn in front).
        ids, counts = np.unique(instance[fg], return_counts=True)
        assert semseg[instance == ids[counts.argmax()]][0] == r["label"] + 1


def test_background_is_a_plane_matching_its_normals():
    """Back-project background pixels P = Z (x/f, y/f, 1): n . P must be the same constant everywhere."""
    ds = SyntheticShapes(10, 32, seed=2, dense=True)
    x, y = pixel_grid(32)
    for i in range(5):
        r = ds.render(i)
        bg = r["semseg"] == 0
        points = r["depth"] * np.stack([x / FOCAL, y / FOCAL, np.ones_like(x)])
        n = r["normals"][:, bg]
        assert np.allclose(n, n[:, :1], atol=1e-6)  # a single normal
        d = (n * points[:, bg]).sum(0)
        assert d.std() < 1e-4 * abs(d.mean())
        assert abs(n[2, 0]) < 1 - 1e-4  # tilted, i.e. the depth is sloped


def test_sphere_centre_is_nearer_than_its_rim():
    ds = SyntheticShapes(60, 64, seed=0, dense=True)
    spheres = 0
    for i in range(len(ds)):
        r = ds.render(i)
        if r["label"] != 0:  # class 0 = circle, rendered as a sphere
            continue
        disc = r["instance"] == r["instance"].max()  # the labelled shape is drawn last
        rows, cols = np.nonzero(disc)
        cy, cx = int(round(rows.mean())), int(round(cols.mean()))
        rim = disc & neighbour_differs(disc)
        depth, nz = r["depth"], r["normals"][2]
        assert depth[cy, cx] < depth[rim].min()
        assert nz[cy, cx] < -0.95 and np.abs(nz[rim]).mean() < 0.6  # facing the camera at the centre only
        # Weak perspective: a disc of radius r (half-widths) whose centre plane is at depth Zc is a ball of radius
        # R = r Zc / f, and a pixel at distance d from the disc centre sees the surface at Zc - sqrt(R^2 - (d Zc/f)^2).
        x, y = pixel_grid(64)
        radius = np.sqrt(disc.sum() / np.pi) * 2 / 64
        dist = np.hypot(x - x[disc].mean(), y - y[disc].mean())
        z_centre = depth[disc].min()
        zc = z_centre / (1 - radius / FOCAL)
        ball = radius * zc / FOCAL
        inner = disc & (dist < 0.8 * radius)
        predicted = zc - np.sqrt(ball ** 2 - (dist[inner] * zc / FOCAL) ** 2)
        assert np.abs(predicted - depth[inner]).max() < 0.05 * ball
        spheres += 1
    assert spheres >= 5


def test_class_balance_and_nearest_mean_learnability():
    ds = SyntheticShapes(400, 32, seed=5)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([im for im, _ in items]).flatten(1)
    labels = torch.tensor([lab for _, lab in items])
    counts = torch.bincount(labels, minlength=4)
    assert ((60 <= counts) & (counts <= 140)).all(), counts  # expected 100 each, sd ~8.7
    # Nearest class mean on raw pixels, fit on 200 items, scored on 200 others: chance is 25 %.
    means = torch.stack([images[:200][labels[:200] == c].mean(0) for c in range(4)])
    accuracy = (torch.cdist(images[200:], means).argmin(1) == labels[200:]).float().mean()
    assert accuracy > 0.6


def test_synthetic_pairs_colour_the_semseg():
    pairs, shapes = SyntheticPairs(8, 32, seed=0), SyntheticShapes(8, 32, seed=0, dense=True)
    source, target = pairs[3]
    item = shapes[3]
    assert torch.equal(target, item["image"])
    palette = torch.from_numpy(voc_palette(5)).float() / 127.5 - 1
    assert torch.equal(source, palette[item["semseg"]].permute(2, 0, 1))
    assert voc_palette(5).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]  # VOC


#################################################################################
#                              Image folders and pairs                          #
#################################################################################

def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3))


def test_center_crop_keeps_the_middle_of_non_square_images():
    # 60x20 with a green middle third: halved once by BOX (short side 20 >= 2 * 10) to 30x10, then the middle
    # 10 columns are cropped, i.e. exactly the green third.
    wide = np.concatenate([solid(20, 20, (255, 0, 0)), solid(20, 20, (0, 255, 0)), solid(20, 20, (255, 0, 0))], 1)
    out = center_crop_arr(Image.fromarray(wide), 10)
    assert out.shape == (10, 10, 3) and (out == [0, 255, 0]).all()
    tall = center_crop_arr(Image.fromarray(np.zeros((97, 41, 3), np.uint8)), 16)
    assert tall.shape == (16, 16, 3)
    t = to_tensor(np.array([[[0, 255, 51]]], np.uint8))
    assert t.shape == (3, 1, 1) and t.flatten().tolist() == pytest.approx([-1, 1, -0.6])


def test_image_folder_classes_and_corrupt_files(tmp_path):
    root = tmp_path / "imgs"
    save(str(root / "cat" / "a.png"), solid(20, 30, (255, 0, 0)))
    save(str(root / "cat" / "deep" / "b.png"), solid(12, 12, (0, 255, 0)))
    save(str(root / "dog" / "c.png"), solid(40, 10, (0, 0, 255)))
    (root / "dog" / "bad.png").write_bytes(b"not an image at all")
    save(str(root / "dog" / "truncated.png"), np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    data = (root / "dog" / "truncated.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "dog" / "notes.txt").write_text("ignored")
    save(str(root / ".hidden" / "x.png"), solid(8, 8, (0, 0, 0)))
    ds = ImageFolder(str(root), 8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    with pytest.warns(UserWarning) as record:
        items = [ds[i] for i in range(len(ds))]
    messages = " ".join(str(w.message) for w in record)
    assert "bad.png" in messages and "truncated.png" in messages
    assert all(im.shape == (3, 8, 8) and -1 <= im.min() and im.max() <= 1 for im, _ in items)
    # Order: cat/a, cat/deep/b, dog/bad, dog/c, dog/truncated; a bad file gives the next readable item (wrapping).
    assert [lab for _, lab in items] == [0, 0, 1, 1, 0]
    assert torch.allclose(items[0][0], torch.tensor([1.0, -1, -1]).view(3, 1, 1).expand(3, 8, 8))
    assert torch.equal(items[2][0], items[3][0]) and torch.equal(items[4][0], items[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each bad file is reported once only
        ds[2], ds[4]


def test_image_folder_errors_and_flat_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory '.*nope' does not exist; pass --data synthetic"):
        ImageFolder(str(tmp_path / "nope"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(str(tmp_path / "empty"), 8)
    save(str(tmp_path / "flat" / "1.png"), solid(8, 8, (1, 2, 3)))
    save(str(tmp_path / "flat" / "2.jpg"), solid(8, 8, (1, 2, 3)))
    flat = ImageFolder(str(tmp_path / "flat"), 8)
    assert len(flat) == 2 and flat.num_classes == 1 and flat[1][1] == 0


def test_paired_side_by_side(tmp_path):
    a, b = (200, 10, 10), (10, 10, 200)
    save(str(tmp_path / "pairs" / "train" / "0.png"), np.concatenate([solid(16, 16, a), solid(16, 16, b)], 1))
    colour = lambda rgb: torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 8, 8) / 127.5 - 1
    src, tgt = PairedImages(str(tmp_path / "pairs"), 8)[0]
    assert torch.allclose(src, colour(a), atol=1e-5) and torch.allclose(tgt, colour(b), atol=1e-5)
    src, tgt = PairedImages(str(tmp_path / "pairs"), 8, direction="BtoA")[0]
    assert torch.allclose(src, colour(b), atol=1e-5) and torch.allclose(tgt, colour(a), atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        PairedImages(str(tmp_path / "pairs"), 8, layout="stacked")
    with pytest.raises(FileNotFoundError, match="does not exist; pass --data synthetic"):
        PairedImages(str(tmp_path / "missing"), 8)
    with pytest.raises(FileNotFoundError, match="no A/ and B/"):
        PairedImages(str(tmp_path / "pairs"), 8, layout="two-folders")


def test_paired_two_folders(tmp_path):
    save(str(tmp_path / "A" / "x.png"), solid(16, 24, (255, 0, 0)))
    save(str(tmp_path / "B" / "x.png"), solid(32, 48, (0, 255, 0)))  # other size: resized to A's
    save(str(tmp_path / "A" / "lonely.png"), solid(16, 24, (0, 0, 0)))
    with pytest.warns(UserWarning, match="no partner"):
        ds = PairedImages(str(tmp_path), 8, layout="two-folders")
    assert len(ds) == 1
    src, tgt = ds[0]
    assert src.shape == tgt.shape == (3, 8, 8)
    assert torch.allclose(src[0], torch.ones(8, 8)) and torch.allclose(tgt[1], torch.ones(8, 8))


#################################################################################
#                                  Latent shards                                #
#################################################################################

def random_latents(n, seed):
    g = np.random.default_rng(seed)
    arr = lambda: g.standard_normal((n, 4, 2, 2)).astype(np.float16)
    return arr(), np.abs(arr()), arr(), np.abs(arr()), g.integers(0, 10, n)


def test_latent_shards_round_trip(tmp_path):
    root = str(tmp_path / "lat")
    batches = [random_latents(4, 0), random_latents(7, 1)]
    with LatentShardWriter(root, (4, 2, 2), shard_size=5) as writer:
        writer.add(*[torch.from_numpy(np.asarray(x)) for x in batches[0]])
        m, s, mf, sf, lab = random_latents(1, 2)
        writer.add(m[0], s[0], mf[0], sf[0], int(lab[0]))  # one item, no batch dimension
        writer.add(*batches[1])
    batches.insert(1, (m, s, mf, sf, lab))
    expect = [np.concatenate(parts) for parts in zip(*batches)]
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["num_samples"] == 12 and manifest["latent_shape"] == [4, 2, 2]
    assert manifest["shards"] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert manifest["scale_factor"] == 0.18215 and manifest["flip"] is True and manifest["stores"] == "mean_std"
    ds = LatentDataset(root)
    assert len(ds) == 12
    for i in range(12):
        item = ds[i]
        for k, arr in zip(("mean", "std", "mean_flip", "std_flip"), expect):
            assert item[k].dtype == torch.float16 and np.array_equal(item[k].numpy(), arr[i]), (i, k)
        assert item["label"] == expect[4][i]
    assert ds.mapped  # uncompressed shards are memory-mapped, not loaded
    assert set(LatentDataset(root, sample_posterior=False, flip=False)[0]) == {"mean", "label"}


def test_latent_compressed_shard_fallback_and_errors(tmp_path):
    root = tmp_path / "lat"
    with pytest.raises(FileNotFoundError, match="extract_latents.py"):
        LatentDataset(str(root))
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json.*extract_latents.py"):
        LatentDataset(str(root))
    m, s, mf, sf, lab = random_latents(3, 0)
    np.savez_compressed(root / "shard_00000.npz", mean=m, std=s, mean_flip=mf, std_flip=sf, label=lab)
    (root / "manifest.json").write_text(json.dumps({"num_samples": 3, "latent_shape": [4, 2, 2],
                                                    "scale_factor": 0.5, "shards": ["shard_00000.npz"],
                                                    "flip": True, "stores": "mean_std"}))
    assert zipfile.ZipFile(root / "shard_00000.npz").infolist()[0].compress_type == zipfile.ZIP_DEFLATED
    ds = LatentDataset(str(root))
    assert len(ds) == 3 and ds.scale_factor == 0.5 and not ds.mapped
    assert np.array_equal(ds[2]["std_flip"].numpy(), sf[2]) and ds[1]["label"] == lab[1]
    # An extraction that dies mid-way leaves no manifest behind.
    with pytest.raises(RuntimeError):
        with LatentShardWriter(str(tmp_path / "broken"), (4, 2, 2), shard_size=2) as writer:
            writer.add(*random_latents(3, 1))
            raise RuntimeError("interrupted")
    assert not os.path.exists(tmp_path / "broken" / "manifest.json")


def test_sample_latents_posterior_statistics():
    n = 4000
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1).expand(n, 4, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 0.5, 2.0]).view(1, 4, 1, 1).expand(n, 4, 2, 2)
    batch = {"mean": mu.half(), "std": sigma.half(), "label": torch.arange(n)}
    z, labels = sample_latents(batch, torch.Generator().manual_seed(0), scale_factor=0.25)
    assert z.dtype == torch.float32 and torch.equal(labels, batch["label"])
    z = z / 0.25
    mean, std = z.mean(0), z.std(0)
    assert (mean - mu[0]).abs().max() < 4 * sigma[0].max() / n ** 0.5
    assert torch.allclose(std, sigma[0], rtol=0.05)
    z2, _ = sample_latents(batch, torch.Generator().manual_seed(0), scale_factor=0.25)
    assert torch.equal(z * 0.25, z2)  # reproducible from the generator alone
    no_std = sample_latents({"mean": mu.half(), "label": batch["label"]})[0]
    assert torch.equal(no_std, mu * 0.18215)


def test_sample_latents_flip_frequency():
    n = 4000
    batch = {"mean": torch.zeros(n, 4, 2, 2), "std": torch.full((n, 4, 2, 2), 1e-3),
             "mean_flip": torch.full((n, 4, 2, 2), 10.0), "std_flip": torch.full((n, 4, 2, 2), 2.0),
             "label": torch.zeros(n, dtype=torch.long)}
    z = sample_latents(batch, torch.Generator().manual_seed(1), scale_factor=1.0)[0]
    flipped = z.mean((1, 2, 3)) > 5  # both branches are > 10 sd apart
    assert abs(flipped.float().mean() - 0.5) < 0.04  # sd 0.008
    assert z[~flipped].std() < 2e-3  # the unflipped items use the unflipped std ...
    assert z[flipped].std() == pytest.approx(2.0, rel=0.05)  # ... and the flipped items the flipped one


def test_latents_through_a_dataloader(tmp_path):
    root = str(tmp_path / "lat")
    with LatentShardWriter(root, (4, 2, 2), shard_size=4, scale_factor=0.5) as writer:
        writer.add(*random_latents(10, 3))
    ds = LatentDataset(root)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=10)))
    z, labels = sample_latents(batch, scale_factor=ds.scale_factor)
    assert z.shape == (10, 4, 2, 2) and labels.dtype == torch.int64
