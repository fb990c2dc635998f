"""common/checkpoint_io: foreign classes load as inert stand-ins, pickled calls never run, bad files fail in one line."""
import argparse
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from common.checkpoint_io import CheckpointError, Skipped, plain_data, read_checkpoint, strip_prefix

# A package that exists only while the checkpoint is written (as omegaconf exists only in the authors' venv).
FOREIGN = textwrap.dedent("""
    import os
    class Node:
        def __init__(self, value):
            self._val = value
    class Config:
        def __init__(self, content):
            self._content = {k: Node(v) for k, v in content.items()}
            self._parent = None
    class Table(dict):
        pass
    class RunsCode:
        def __init__(self, path):
            self.path = path
        def __reduce__(self):
            return (os.mkdir, (self.path,))
""")


def _save_in_subprocess(tmp_path, body, legacy=False):
    """Write a checkpoint from a fresh interpreter that can import the foreign package; this one cannot."""
    pkg = tmp_path / "foreignpkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(FOREIGN)
    path = tmp_path / ("legacy.pt" if legacy else "ckpt.pt")
    script = textwrap.dedent(f"""
        import argparse, numpy as np, torch, foreignpkg
        obj = {body}
        torch.save(obj, {str(path)!r}, _use_new_zipfile_serialization={not legacy})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert "foreignpkg" not in sys.modules
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_foreign_classes_become_stand_ins_and_data_survives(tmp_path, legacy):
    path = _save_in_subprocess(tmp_path, """{
        "ema": {"w": torch.arange(6.0).view(2, 3)}, "args": argparse.Namespace(lr=1e-4, size=(2, 3)),
        "warm": np.array([0.5, 2.0]), "step": np.int64(7),
        "config": foreignpkg.Config({"sharing_ratio": 0.8, "init_method": "DTR"}),
        "table": foreignpkg.Table(a=1)}""", legacy)
    obj, skipped = read_checkpoint(str(path))
    assert torch.equal(obj["ema"]["w"], torch.arange(6.0).view(2, 3))
    assert obj["args"] == argparse.Namespace(lr=1e-4, size=(2, 3))
    np.testing.assert_array_equal(obj["warm"], [0.5, 2.0])
    assert obj["step"] == 7
    assert isinstance(obj["config"], Skipped) and isinstance(obj["table"], Skipped)
    assert {"foreignpkg.Config", "foreignpkg.Node", "foreignpkg.Table"} <= set(skipped)
    assert plain_data(obj["config"]) == {"sharing_ratio": 0.8, "init_method": "DTR"}
    assert obj["table"].items == {"a": 1}


def test_pickled_calls_never_run(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    path = _save_in_subprocess(tmp_path, f"{{'model': {{}}, 'payload': foreignpkg.RunsCode({str(marker)!r})}}")
    obj, skipped = read_checkpoint(str(path))
    assert not marker.exists()
    assert "posix.mkdir" in skipped or "nt.mkdir" in skipped
    assert isinstance(obj["payload"], Skipped)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut short, as an interrupted download leaves it
        torch.save({"w": torch.randn(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(str(tmp_path / "nope.pt"))


def test_strip_prefix_only_touches_prefixed_keys():
    assert strip_prefix({"module.a": 1, "b": 2, "xmodule.c": 3}, "module.") == {"a": 1, "b": 2, "xmodule.c": 3}
