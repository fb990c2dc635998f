"""The layer rule, kept true: common/ imports nothing of ours above it, data/ only common/, eval/ common/ and data/
(eval reads data sets; data never scores), the paper scripts anything. eval/bench.py measures the scripts, so it may
import them. Every import statement counts, including those inside functions."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("mt_diffusion", "ant_clustering", "dtr", "task_diffusion")
ALLOWED = {"common": {"common"}, "data": {"common", "data"}, "eval": {"common", "data", "eval"}}
EXCEPTIONS = {"eval/bench.py": set(SCRIPTS)}


def imported_packages(path):
    """Top-level names of our packages and scripts that a module imports (absolute imports only)."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (set(ALLOWED) | set(SCRIPTS))


def layered_modules():
    for package in ALLOWED:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                yield f"{package}/{name}"


@pytest.mark.parametrize("module", list(layered_modules()))
def test_no_upward_import(module):
    package = module.split("/")[0]
    allowed = ALLOWED[package] | EXCEPTIONS.get(module, set())
    upward = imported_packages(os.path.join(ROOT, module)) - allowed
    assert not upward, f"{module} imports {sorted(upward)} from above its layer ({package}/ may use {sorted(allowed)})"


def test_the_walk_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from eval.fid import frechet_distance\n    import dtr\n")
    assert imported_packages(probe) == {"eval", "dtr"}
