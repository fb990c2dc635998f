"""Run infrastructure: resumable data order, EMA, atomic checkpoints, results folder and metrics."""
import argparse
import csv
import errno
import itertools
import os

import pytest
import torch

from common.training_run import (InputError, ResumableSampler, TrainingRun, add_run_args, fill_defaults,
                                 latest_checkpoint, make_ema, one_line_errors, random_hflip, save_atomic,
                                 save_image_grid, update_ema)


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


def test_a_write_that_dies_midway_keeps_the_old_file_and_removes_its_temp(tmp_path, monkeypatch):
    """What plain torch.save(obj, path) gets wrong: a crash (here a full disk) midway destroys the old file."""
    path = tmp_path / "0000010.pt"
    save_atomic({"w": torch.ones(3)}, str(path))

    def dies_midway(obj, f, *a, **k):
        open(f, "wb").write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed (No space left on device)")
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError) as e:
        save_atomic({"w": torch.zeros(3)}, str(path))
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["0000010.pt"]  # no temp file left to fill the disk
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(3))


def test_full_disk_is_one_line_through_the_script_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))

    @one_line_errors
    def main():
        save_atomic({"w": 1}, str(tmp_path / "x.pt"))
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no space left" in err and len(err.splitlines()) == 1


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
    run.save(7, model={"w": torch.ones(1)}, ema={}, opt={})
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


def test_run_numbers_are_never_reused_after_a_folder_is_deleted(tmp_path):
    (tmp_path / "000-a").mkdir()
    (tmp_path / "002-b").mkdir()  # 001 was deleted
    run = TrainingRun(_args(tmp_path), "c")
    assert os.path.basename(run.dir) == "003-c"
    assert os.path.basename(TrainingRun(_args(tmp_path), "c").dir) == "004-c"


def test_resume_replays_cleanly_stale_temps_duplicate_rows_and_first_rate(tmp_path, monkeypatch):
    run = TrainingRun(_args(tmp_path), "demo")
    for step in range(1, 7):
        run.log_metrics(step, loss=1.0 / step)
    run.save(4, model={"w": torch.ones(1)}, ema={}, opt={})  # the run died after step 6, checkpointed at 4
    (tmp_path / "000-demo" / "checkpoints" / "0000006.pt.tmp4242").write_bytes(b"half")
    clock = iter([100.0, 100.0, 100.0, 104.0])
    monkeypatch.setattr("common.training_run.time.time", lambda: next(clock, 104.0))
    again = TrainingRun(_args(tmp_path, resume="auto"), "demo")
    assert not (tmp_path / "000-demo" / "checkpoints" / "0000006.pt.tmp4242").exists()
    assert "removed 0000006.pt.tmp4242" in open(os.path.join(again.dir, "log.txt")).read()
    again.resumed_at(again.load()["step"])
    rows = list(csv.DictReader(open(os.path.join(again.dir, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # 5 and 6 are replayed, not duplicated
    again.log_metrics(6, loss=0.2)
    last = list(csv.DictReader(open(os.path.join(again.dir, "metrics.csv"))))[-1]
    assert float(last["steps_per_sec"]) == pytest.approx(2 / 4)  # steps 5-6 in 4 s, counted from the resume step


def test_resume_of_a_file_that_is_not_our_checkpoint_is_one_line(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"ema": {"w": torch.ones(1)}}, path)
    with pytest.raises(SystemExit) as e:
        TrainingRun(_args(tmp_path, resume=str(path)), "demo").load()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a training checkpoint of ours" in err


@pytest.mark.parametrize("flag, value", [("steps", "-5"), ("steps", "0"), ("ckpt-every", "0"),
                                         ("global-batch-size", "0"), ("lr", "-1"), ("ema-decay", "2"),
                                         ("num-workers", "-1"), ("log-every", "x")])
def test_non_positive_counts_are_argparse_errors(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        _args(tmp_path, **{flag: value})
    assert e.value.code == 2 and f"--{flag}" in capsys.readouterr().err


def test_small_data_set_is_an_input_error():
    with pytest.raises(InputError, match="fewer than one global batch"):
        ResumableSampler(24, 256)
