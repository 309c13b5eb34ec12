"""Where a result came from: git commit (and whether the tree was dirty), package versions, CPU and GPU.
Every benchmark writes this beside its numbers."""
from __future__ import annotations

import os
import platform
import subprocess

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=_REPO).stdout.strip()
    except Exception:
        return ""


def git_sha() -> str:
    """HEAD of the source tree (``FIDDLER_GIT_SHA`` overrides: copies without .git, e.g. the device)."""
    return os.environ.get("FIDDLER_GIT_SHA") or _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD; None when unknown (no git)."""
    if os.environ.get("FIDDLER_GIT_SHA"):
        return os.environ.get("FIDDLER_GIT_DIRTY", "") == "1" or None
    if not _git("rev-parse", "HEAD"):
        return None
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def versions() -> dict:
    """Python and the packages the results depend on (those importable here)."""
    from importlib import metadata

    v = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "transformers", "torch", "accelerate", "hydra-core"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return v


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware() -> dict:
    """CPU model, the kernel's view of it (flags, cores, paths) and the JAX devices."""
    import jax

    from fiddler_jax.kernels import cpu_features

    features = cpu_features()
    device = jax.devices()[0]
    return {"cpu": cpu_model(), "cpu_flags": features.get("flags"), "physical_cores": features.get("physical_cores"),
            "kernel_paths": features.get("supported_paths"), "gpu": str(device.device_kind),
            "platform": device.platform, "device_count": jax.device_count()}


def provenance() -> dict:
    return {"git_sha": git_sha(), "git_dirty": git_dirty(), "versions": versions(), "hardware": hardware()}
