"""A wheel built from this tree works outside it: the configs ship inside the package (``fiddler_jax/conf``), so
``fiddler-jax generate`` runs from an unrelated folder with a non-editable install.

The wheel is built from a copy of the tree (the C++ kernel compiles during the build, about 1-2 minutes), then
installed with ``--no-deps`` into a fresh virtual environment that takes its dependencies from the current one
through a ``.pth`` line (a path added that way does not run the current environment's ``.pth`` files, so its
editable install of fiddler_jax stays out: the test checks that ``fiddler_jax`` comes from the new environment)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the build does not need (and what a copy must not carry: build outputs of the editable install).
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".cache",
                              "fiddler-jax-outputs", ".pytest_cache", "outputs", "multirun", "docs", "notebooks", "benchmarks", "tests",
                              "wheels", ".whl", ".ipynb_checkpoints")


def run(args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)


@pytest.mark.slow
def test_wheel_installs_and_generates_outside_the_tree(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
             tmp_path / "wheels", src], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("fiddler_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fiddler_jax/conf/generate.yaml", "fiddler_jax/conf/bench.yaml"} <= names
    assert any(n.startswith("fiddler_jax/kernels/_fiddler_ffi") for n in names)  # the compiled kernel

    venv = tmp_path / "venv"
    r = run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    assert r.returncode == 0, r.stderr
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60)
    assert site.returncode == 0, site.stderr
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site.stdout.strip(), "current_env.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    r = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import fiddler_jax; print(fiddler_jax.__file__)"], cwd=elsewhere, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout
    r = run([venv / "bin" / "fiddler-jax", "generate", "max_new_tokens=4"], cwd=elsewhere, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("def fibonacci(n):") and "tokens/s" in r.stdout, r.stdout
    assert len(r.stdout.split("\n[")[0]) > len("def fibonacci(n):")  # the prompt and its continuation
