"""Latent pipeline without diffusers: data/extract_latents.py -> data/latents.py -> dtr.py --latent -> VAE decode.

Random-weight VAEs in the diffusers file format stand in for sd-vae-ft-ema; small widths keep the CPU cost low
(from_pretrained_file reads the architecture off the weights, so dtr.py / the extractor load them unchanged).
"""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.safetensors_io import save_safetensors
from common.vae import AutoencoderKL
from data.extract_latents import main as extract_main
from data.extract_latents import shard_bounds, shards_of_rank
from data.labelled_images import create_dataset, prepare_batch
from data.latents import LatentDataset
from data.synthetic import SyntheticShapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_vae(path, block_out_channels, seed=0):
    """A random AutoencoderKL saved like diffusers' diffusion_pytorch_model.safetensors; returns the model."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=block_out_channels, layers_per_block=1).eval()
    save_safetensors(vae.state_dict(), str(path))
    return vae


@pytest.fixture
def small_vae(tmp_path):
    """Two levels (downsampling 2): 16 px images -> 4 x 8 x 8 latents."""
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir()
    return write_random_vae(path, (32, 32)), str(path)


def extract(out, vae_path, *extra):
    extract_main(["--data", "synthetic", "--num-samples", "10", "--image-size", "16", "--out", str(out),
                  "--vae", vae_path, "--shard-size", "4", "--batch-size", "3", *extra])


#################################################################################
#                                 Sharding                                      #
#################################################################################

@pytest.mark.parametrize("num_items,shard_size,world_size", [(10, 4, 1), (10, 4, 2), (10, 4, 3), (7, 7, 4),
                                                             (1000, 64, 8)])
def test_ranks_get_disjoint_shards_covering_every_item_once(num_items, shard_size, world_size):
    bounds = shard_bounds(num_items, shard_size)
    assert all(0 < end - start <= shard_size for start, end in bounds)
    items = [i for rank in range(world_size) for s in shards_of_rank(len(bounds), rank, world_size)
             for i in range(*bounds[s])]
    assert sorted(items) == list(range(num_items))  # every item exactly once
    per_rank = [len(shards_of_rank(len(bounds), r, world_size)) for r in range(world_size)]
    assert max(per_rank) - min(per_rank) <= 1


#################################################################################
#                          What an extraction stores                            #
#################################################################################

def test_extraction_stores_posteriors_of_image_and_flip(tmp_path, small_vae):
    vae, vae_path = small_vae
    out = tmp_path / "lat"
    extract(out, vae_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 10 and manifest["shard_sizes"] == [4, 4, 2]
    assert manifest["shards"] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["scale_factor"] == 0.18215 and manifest["flip"]
    assert manifest["num_classes"] == 4 and manifest["class_names"] == ["circle", "square", "triangle", "cross"]
    assert manifest["image_size"] == 16 and manifest["source"] == "synthetic"

    data = SyntheticShapes(10, 16)
    x = torch.stack([data[i][0] for i in range(10)])
    with torch.no_grad():
        mean, std = vae.encode(x)
        mean_flip, std_flip = vae.encode(x.flip(-1))
    assert (mean_flip - mean.flip(-1)).abs().max() > 1e-2  # the flip must be encoded, not the latent flipped
    ds = LatentDataset(str(out))
    assert len(ds) == 10 and ds.num_classes == 4
    for i in range(10):
        item = ds[i]
        assert item["label"] == data[i][1]
        for key, expected in [("mean", mean), ("std", std), ("mean_flip", mean_flip), ("std_flip", std_flip)]:
            assert item[key].dtype == torch.float16
            torch.testing.assert_close(item[key].float(), expected[i], rtol=2e-3, atol=2e-3)  # float16 storage

    # The reader dtr.py and ant_clustering.py share: (dataset, channels, size, classes) and scaled latents.
    dataset, channels, size, num_classes = create_dataset(str(out), 256, latent=True)
    assert (channels, size, num_classes) == (4, 8, 4)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(10)])
    z, y = prepare_batch(batch, torch.device("cpu"), latent=True, flip=False)
    assert z.shape == (10, 4, 8, 8) and torch.equal(y, torch.tensor([data[i][1] for i in range(10)]))
    noise = z / 0.18215 - mean  # unflipped posterior sample: (z / s - mean) / std ~ N(0, 1)
    assert 0.8 < (noise / std).std() < 1.2


def test_extraction_of_an_image_folder_uses_class_folders(tmp_path, small_vae):
    _, vae_path = small_vae
    rng = np.random.default_rng(0)
    for label, name in enumerate(["n001", "n002"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j in range(2 + label):  # sizes differ: the ADM center crop brings them to 16 x 16
            arr = rng.integers(0, 256, (20 + 7 * j, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / name / f"{j}.png")
    extract_main(["--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "lat"), "--vae", vae_path,
                  "--image-size", "16", "--shard-size", "2"])
    ds = LatentDataset(str(tmp_path / "lat"))
    assert ds.manifest["class_names"] == ["n001", "n002"] and ds.num_classes == 2
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 0, 1, 1, 1]


#################################################################################
#                                 Resuming                                      #
#################################################################################

def test_rerun_skips_finished_shards_and_gives_the_same_result(tmp_path, small_vae):
    _, vae_path = small_vae
    out = tmp_path / "lat"
    extract(out, vae_path)
    shards = sorted(out.glob("shard_*.npz"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    manifest = (out / "manifest.json").read_text()

    # An interrupted run: shard 1 never written, no manifest, a stale temporary file left behind.
    (out / "shard_00001.npz").unlink()
    (out / "manifest.json").unlink()
    (out / "shard_00002.npz.tmp999").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="manifest"):
        LatentDataset(str(out))
    extract(out, vae_path, "--batch-size", "5")  # another batch size: shards are the unit, results identical
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("shard_*.npz"))}
    assert set(after) == set(before) and not list(out.glob("*.tmp*"))
    for name in ("shard_00000.npz", "shard_00002.npz"):
        assert after[name][0] == before[name][0]  # not rewritten
    with np.load(out / "shard_00001.npz") as rewritten, np.load(io.BytesIO(before["shard_00001.npz"][1])) as original:
        for key in ("mean", "std", "mean_flip", "std_flip", "label"):
            assert np.array_equal(rewritten[key], original[key]), key
    assert (out / "manifest.json").read_text() == manifest


#################################################################################
#                                  Errors                                       #
#################################################################################

def run_extract_expecting_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        extract_main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def test_one_line_errors(tmp_path, small_vae, capsys):
    _, vae_path = small_vae
    err = run_extract_expecting_error(capsys, ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                                               "--vae", vae_path])
    assert "does not exist" in err and "missing" in err
    err = run_extract_expecting_error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "o"),
                                               "--vae", str(tmp_path / "nope.safetensors")])
    assert "no VAE weights" in err and "--vae" in err
    err = run_extract_expecting_error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "o"), "--vae", vae_path,
                                               "--image-size", "15"])
    assert "divisible" in err
    extract(tmp_path / "lat", vae_path)
    capsys.readouterr()  # drop the progress bar of the good run
    err = run_extract_expecting_error(capsys, ["--data", "synthetic", "--num-samples", "10", "--image-size", "32",
                                               "--out", str(tmp_path / "lat"), "--vae", vae_path, "--shard-size", "4"])
    assert "other settings" in err and "image_size 16 there, 32 now" in err
    with pytest.raises(SystemExit):
        create_dataset(str(tmp_path / "no-latents"), 256, latent=True)
    assert "extract_latents.py" in capsys.readouterr().err


#################################################################################
#                     End to end: extract -> train -> sample                    #
#################################################################################

@pytest.mark.slow
def test_extract_train_sample_decode_end_to_end(tmp_path, run_script):
    """64 px synthetic set -> 2-process extraction (8x8x4 latents) -> DiT-S/2 --latent -> --sample-only with --vae."""
    vae_path = tmp_path / "diffusion_pytorch_model.safetensors"
    vae = write_random_vae(vae_path, (32, 32, 32, 32))  # 4 levels: downsampling 8, as the SD VAE
    (tmp_path / "config.json").write_text('{"scaling_factor": 0.13025}')  # an SDXL-style config beside it
    latents = tmp_path / "latents"
    run_script(["data/extract_latents.py", "--data", "synthetic", "--num-samples", "24", "--image-size", "64",
                "--out", latents, "--vae", vae_path, "--shard-size", "5", "--batch-size", "5"], nproc=2)
    ds = LatentDataset(str(latents))
    assert len(ds) == 24 and ds.latent_shape == (4, 8, 8) and len(ds.shards) == 5
    assert ds.scale_factor == 0.13025  # read from the VAE's config.json into the manifest

    results = tmp_path / "results"
    run_script(["dtr.py", "--model", "DiT-S/2", "--latent", "--data", latents, "--vae", vae_path, "--steps", "2",
                "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1", "--ckpt-every", "2",
                "--sample-every", "2", "--num-sampling-steps", "2", "--results-dir", results])
    (run_dir,) = results.iterdir()
    ckpt = run_dir / "checkpoints" / "0000002.pt"
    assert ckpt.is_file() and (run_dir / "samples" / "0000002.png").is_file()
    assert Image.open(run_dir / "samples" / "0000002.png").size[0] > 4 * 64  # a grid of decoded 64 px images

    run_script(["dtr.py", "--sample-only", "--ckpt", ckpt, "--vae", vae_path, "--num-samples", "6",
                "--sample-batch-size", "6", "--num-sampling-steps", "2"])
    (sample_dir,) = run_dir.glob("samples-0000002-*")
    with np.load(sample_dir / "samples.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (6, 64, 64, 3)
    assert images.std() > 0  # decoded pixels, not a constant
    assert (sample_dir / "samples.png").is_file()
    # the checkpoint trained at the manifest's scale, and sampling decodes at it: redo the draws by hand
    import dtr
    from common.adm_npz import to_uint8
    from common.named_models import create_model
    from common.sampling import sample_images
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["args"]["vae_scale"] == 0.13025
    model = dtr.add_task_routing(create_model("DiT-S/2", 8, 4, 4), "dtr")
    model.load_state_dict(state["ema"])
    vae.scaling_factor = 0.13025
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6,), generator=gen)
    by_hand = to_uint8(sample_images(model.eval(), labels, (4, 8, 8), num_steps=2, cfg_scale=1.5,
                                     noise_schedule="cosine", vae=vae, generator=gen)).numpy()
    # equal up to float summation order (the run used one thread per process): a rare pixel may round the other way
    diff = np.abs(images.astype(int) - by_hand.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_training_batches_use_the_latent_scale_of_the_run(tmp_path, small_vae):
    """The manifest's (or --vae-scale's) factor multiplies the stored posterior draws (was always 0.18215)."""
    import argparse
    from data.labelled_images import training_batch
    from common.training_run import infinite_loader
    _, vae_path = small_vae
    extract(tmp_path / "lat", vae_path)
    ds = LatentDataset(str(tmp_path / "lat"))
    batches = []
    for scale in (0.5, 0.13025):
        args = argparse.Namespace(seed=0, latent=True, vae_scale=scale, unconditional=False)
        x, _ = training_batch(infinite_loader(ds, 4, 0, 1, 0, 0), torch.nn.Identity(), args, 0, 0, "cpu")
        batches.append(x / scale)
    torch.testing.assert_close(batches[0], batches[1])
    assert batches[0].abs().max() > 0
