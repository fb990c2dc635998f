"""The demos' comparison (eval/demo_comparison.py): the bare command turns it on, explicit flags do not; compare.csv
holds one row per variant whose scores are the judge's on the saved samples of that variant; the labelled grid."""
import csv
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ant_clustering as ant
import dtr
from eval import demo_comparison as dc
from eval import shape_classifier as sc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "4", "--image-size", "16", "--global-batch-size", "8", "--lr", "1e-2", "--log-every", "2",
        "--num-sampling-steps", "2", "--compare-samples", "16"]


def _cheap_judge(results_dir, num_classes=4, size=16):
    """Plant a small trained judge in the cache, so that the comparison reads it instead of training its own."""
    judge = sc.train_classifier(num_classes, size, num_images=400, epochs=2)
    os.makedirs(results_dir, exist_ok=True)
    torch.save(judge.state_dict(), sc.judge_cache_path(results_dir, num_classes, size))
    return judge


@pytest.mark.parametrize("script", [dtr, ant])
def test_bare_command_compares_and_explicit_flags_do_not(script, monkeypatch):
    monkeypatch.setattr("sys.argv", [f"{script.__name__}.py"])
    assert script.parse_args().compare  # `python dtr.py`: argv from sys.argv
    assert script.parse_args([]).compare
    assert not script.parse_args(["--steps", "10"]).compare
    assert not script.parse_args(["--no-compare"]).compare
    assert script.parse_args(["--seeds", "0", "1"]).compare and script.parse_args(["--compare", "--steps", "5"]).compare


def test_main_dispatches_the_bare_command_to_the_comparison(monkeypatch):
    called = []
    monkeypatch.setattr(dtr, "run_comparison", lambda train, args, variants, *a, **k: called.append(variants))
    monkeypatch.setattr(dtr, "train", lambda args: called.append(("train", args.routing)))
    dtr.main([])
    dtr.main(["--routing", "none", "--steps", "2"])
    assert called == [[("DTR", {"routing": "dtr"}), ("vanilla", {"routing": "none"})], ("train", "none")]


def test_compare_csv_rows_are_the_judge_of_each_variants_saved_samples(tmp_path):
    judge = _cheap_judge(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm of a 16-sample covariance in 64-d is singular
        out = dtr.main(["--compare", "--results-dir", str(tmp_path), *TINY])
    rows = list(csv.DictReader(open(os.path.join(out, "compare.csv"))))
    assert list(rows[0]) == ["model", "routing", "steps", "accuracy", "fd_synthetic", "seed", "train_seconds"]
    assert [(r["model"], r["routing"], r["steps"], r["seed"]) for r in rows] == [("DTR", "dtr", "4", "0"),
                                                                                   ("vanilla", "none", "4", "0")]
    scores = []
    for row in rows:
        saved = np.load(os.path.join(out, f"samples-{row['model']}-seed0.npz"))
        images, labels = saved["arr_0"], saved["arr_1"]
        assert images.shape == (16, 16, 16, 3) and images.dtype == np.uint8 and list(labels) == [0, 1, 2, 3] * 4
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = sc.judge_samples(judge, x, torch.from_numpy(labels))
        assert float(row["accuracy"]) == pytest.approx(expected["accuracy"], abs=1e-9)
        assert float(row["fd_synthetic"]) == pytest.approx(expected["fd_synthetic"], rel=1e-6)
        scores.append(float(row["fd_synthetic"]))
    assert scores[0] != pytest.approx(scores[1], rel=1e-6)  # the two variants' samples differ: rows can't swap unseen
    grid = Image.open(os.path.join(out, "compare.png"))
    # 4 class rows of 64-px tiles below the title line; two blocks of 4 samples each (16 samples / 4 classes)
    assert grid.size == (80 + 2 * (4 * 66 + 12), 24 + 4 * 66)
    for name in ("000-dtr-DiT-Ti-4-dtr-beta0.8-alpha4-none-cosine", "001-dtr-DiT-Ti-4-vanilla-none-cosine"):
        assert os.path.exists(os.path.join(out, name, "checkpoints", "0000004.pt"))


def test_ant_compare_writes_method_and_vanilla_rows(tmp_path):
    _cheap_judge(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ant.main(["--results-dir", str(tmp_path), "--clustering", "timestep", "--k", "2", "--seeds", "3",
                        *TINY])
    rows = list(csv.DictReader(open(os.path.join(out, "compare.csv"))))
    assert [(r["model"], r["mtl"], r["seed"]) for r in rows] == [("ANT-UW", "uw", "3"), ("vanilla", "none", "3")]
    assert os.path.exists(os.path.join(out, "compare.png"))


def test_table_over_seeds_reports_mean_and_sd():
    rows = [dict(model=m, routing=r, steps=5, seed=s, accuracy=a, fd_synthetic=f, train_seconds=1.0)
            for m, r, s, a, f in [("DTR", "dtr", 0, 0.9, 2.0), ("vanilla", "none", 0, 0.8, 3.0),
                                  ("DTR", "dtr", 1, 0.7, 4.0), ("vanilla", "none", 1, 0.6, 5.0)]]
    table = dc.comparison_table(rows, "routing").splitlines()
    assert table[-2] == "| DTR | mean +- sd | | 2 seeds | 0.800 +- 0.141 | 3.00 +- 1.41 | |"
    assert table[-1] == "| vanilla | mean +- sd | | 2 seeds | 0.700 +- 0.141 | 4.00 +- 1.41 | |"
    assert len(dc.comparison_table(rows[:2], "routing").splitlines()) == 4  # one seed: no summary lines


@pytest.mark.parametrize("flags, message", [(["--resume", "auto"], "drop --resume"),
                                            (["--num-classes", "1"], "class-conditional")])
def test_flags_the_comparison_cannot_honour_are_one_line_errors(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit):
        dtr.main(["--compare", "--results-dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        dtr.parse_args(["--compare", "--routing", "none"])
    assert e.value.code == 2


def test_runs_trained_in_parallel_processes_give_the_sequential_comparison(tmp_path, monkeypatch):
    """--compare-workers 2 (the default on 2 cores) trains DTR and vanilla at once in spawned processes: the same
    folders in the same order and the same scores as one after the other (at the same torch thread count)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tables, judge = [], _cheap_judge(tmp_path / "1")
    for workers in ("1", "2"):
        root = tmp_path / workers
        os.makedirs(root, exist_ok=True)
        torch.save(judge.state_dict(), sc.judge_cache_path(root, 4, 16))  # one judge for both
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = dtr.main(["--compare", "--results-dir", str(root), "--compare-workers", workers, *TINY])
        rows = [{k: v for k, v in r.items() if k != "train_seconds"}
                for r in csv.DictReader(open(os.path.join(out, "compare.csv")))]
        tables.append((rows, sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))))
    assert tables[0] == tables[1]
    assert tables[1][1] == ["000-dtr-DiT-Ti-4-dtr-beta0.8-alpha4-none-cosine", "001-dtr-DiT-Ti-4-vanilla-none-cosine"]
    assert os.path.exists(os.path.join(out, "DTR-seed0.out")) and os.path.exists(os.path.join(out, "vanilla-seed0.out"))


def test_a_worker_process_error_is_one_line(tmp_path, capsys):
    _cheap_judge(tmp_path)
    with pytest.raises(SystemExit) as e:
        dtr.main(["--compare", "--results-dir", str(tmp_path), "--compare-workers", "2", *TINY,
                  "--global-batch-size", "20000"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1
    assert "--global-batch-size" in errors[0], errors


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_stops_the_comparison_with_every_run_checkpointed(tmp_path, workers):
    """SIGTERM to `python dtr.py --compare`: the training runs checkpoint and stop (in parallel: passed on to each
    process), and the comparison ends with one line instead of judging unfinished runs."""
    _cheap_judge(tmp_path)
    argv = ["--compare", "--results-dir", str(tmp_path), "--compare-workers", workers, *TINY, "--steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dtr.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "000-dtr-compare-DiT-Ti-4"
    expected = int(workers)  # runs under way when the signal comes
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*/metrics.csv"))) < expected:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "stopped by a signal" in errors[0]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == expected and not (out / "compare.csv").exists()
    for run in runs:  # each stopped run wrote its checkpoint at the step it had reached
        (ckpt,) = (run / "checkpoints").glob("*.pt")
        assert 2 <= int(ckpt.stem) < 100000
