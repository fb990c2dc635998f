"""Run infrastructure: resumable data order, EMA, atomic checkpoints, results folder and metrics."""
import argparse
import csv
import itertools
import os

import pytest
import torch

from common.train_utils import (ResumableSampler, TrainingRun, add_run_args, fill_defaults, latest_checkpoint,
                                make_ema, random_hflip, save_atomic, save_image_grid, update_ema)


def test_resumed_sampler_replays_the_same_stream():
    full = list(itertools.islice(iter(ResumableSampler(50, 4, seed=3)), 4 * 30))  # crosses several epochs
    for b in [0, 5, 12, 13]:
        resumed = list(itertools.islice(iter(ResumableSampler(50, 4, seed=3, start_batch=b)), 4 * (30 - b)))
        assert resumed == full[4 * b:]


def test_sampler_ranks_partition_each_global_batch():
    ranks = [list(itertools.islice(iter(ResumableSampler(40, 5, rank=r, world_size=2)), 20)) for r in range(2)]
    for b in range(4):
        both = ranks[0][5 * b:5 * b + 5] + ranks[1][5 * b:5 * b + 5]
        assert len(set(both)) == 10  # disjoint shares of one global batch
    with pytest.raises(ValueError, match="global-batch-size"):
        ResumableSampler(5, 4, world_size=2)


def test_ema_update_is_lerp():
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model)
    assert all(not p.requires_grad for p in ema.parameters())
    before = ema.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, decay=0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * model.weight)


def test_random_hflip_flips_about_half():
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(2000, 1, 1, 1)
    y = random_hflip(x)
    flipped = (y[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.45 < flipped < 0.55 and ((y[:, 0, 0, 0] == 0) | (y[:, 0, 0, 0] == 3)).all()


def test_save_atomic_leaves_no_temp_and_latest_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for s in [100, 2000, 300]:
        save_atomic({"step": s}, str(ck / f"{s:07d}.pt"))
    (ck / "junk.pt.tmp123").write_text("partial")
    assert os.path.basename(latest_checkpoint(str(tmp_path))) == "0002000.pt"
    assert sorted(os.listdir(ck)) == ["0000100.pt", "0000300.pt", "0002000.pt", "junk.pt.tmp123"]


def _args(tmp_path, **kw):
    p = add_run_args(argparse.ArgumentParser())
    args = p.parse_args([f"--results-dir={tmp_path}"] + [f"--{k}={v}" for k, v in kw.items()])
    return fill_defaults(args, dict(steps=10, global_batch_size=4, lr=1e-3, ema_decay=0.9, num_workers=0,
                                    log_every=1, ckpt_every=5, sample_every=5))


def test_training_run_folder_metrics_and_resume(tmp_path):
    run = TrainingRun(_args(tmp_path), "demo")
    assert os.path.basename(run.dir) == "000-demo"
    run.log_metrics(1, loss=0.5)
    run.log_metrics(2, loss=0.25)
    rows = list(csv.DictReader(open(os.path.join(run.dir, "metrics.csv"))))
    assert [float(r["loss"]) for r in rows] == [0.5, 0.25] and "steps_per_sec" in rows[0]
    assert "step 0000002" in open(os.path.join(run.dir, "log.txt")).read()
    run.save(7, model={"w": torch.ones(1)})
    with pytest.raises(SystemExit) as e:
        run.log_metrics(8, loss=float("nan"))
    assert e.value.code == 3 and "non-finite loss" in open(os.path.join(run.dir, "log.txt")).read()
    with pytest.raises(SystemExit):  # NaN weights are never checkpointed: 7 stays the latest checkpoint
        run.save(9, model={"w": torch.tensor([1.0, float("inf")])})
    assert latest_checkpoint(run.dir).endswith("0000007.pt")

    again = TrainingRun(_args(tmp_path, resume="auto"), "demo")
    assert again.dir == run.dir and again.load()["step"] == 7
    fresh = TrainingRun(_args(tmp_path, resume="auto"), "other")  # nothing to resume: a new folder
    assert os.path.basename(fresh.dir) == "001-other" and fresh.load() is None


def test_bad_resume_path_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        TrainingRun(_args(tmp_path, resume=str(tmp_path / "nope.pt")), "demo")
    assert "does not exist" in capsys.readouterr().err


def test_image_grid_layout(tmp_path):
    from PIL import Image
    imgs = torch.zeros(5, 3, 4, 6)
    imgs[2] = 1.0
    save_image_grid(imgs, str(tmp_path / "g.png"), nrow=3)
    g = Image.open(tmp_path / "g.png")
    assert g.size == (3 * 8 + 2, 2 * 6 + 2)
    px = g.load()
    assert px[2 + 2 * 8, 2] == (255, 255, 255) and px[2, 2] == (128, 128, 128)


def test_per_rank_batch_and_indivisible_global_batch(tmp_path, capsys):
    assert TrainingRun(_args(tmp_path), "demo", rank=0, world_size=2).batch_size == 2  # global batch 4
    with pytest.raises(SystemExit):
        TrainingRun(_args(tmp_path), "demo", rank=0, world_size=3)
    assert "--global-batch-size 4 is not divisible by the 3 processes" in capsys.readouterr().err
