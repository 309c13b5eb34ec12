"""The training corpus: Python source files under one folder (by default this interpreter's standard library),
split into train and held-out sets *by file*, deterministically.

A file goes to the held-out set iff the first 8 hex digits of sha256(its path relative to the root) taken as an
integer, modulo 10 000, is below ``heldout_fraction * 10 000``: the split depends only on the relative path, so
the same file lands on the same side on every machine and run, and adding files never moves old ones.
Third-party packages (``site-packages``/``dist-packages``) are never included; ``include_tests=False`` also
skips test suites (any path component ``test``, ``tests`` or ``idle_test``).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fiddler_jax.errors import InvalidInputError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stdlib_dir() -> str:
    """The running interpreter's standard-library source folder."""
    return sysconfig.get_paths()["stdlib"]


@dataclass(frozen=True)
class Corpus:
    """Relative paths (sorted) of the train and held-out files under ``root``."""

    root: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def read(self, rel: str) -> str:
        return read_source(os.path.join(self.root, rel))


def is_heldout(rel: str, heldout_fraction: float) -> bool:
    h = int(hashlib.sha256(rel.replace(os.sep, "/").encode()).hexdigest()[:8], 16)
    return h % 10_000 < round(heldout_fraction * 10_000)


def read_source(path: str) -> str:
    """File text as UTF-8 (undecodable bytes replaced), with Windows line ends normalised."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def find_corpus(root: str | os.PathLike | None = None, *, heldout_fraction: float = 0.03,
                include_tests: bool = True, suffix: str = ".py") -> Corpus:
    """List the ``*.py`` files under ``root`` (default: the stdlib) and split them; errors if there are none."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root))) if root else stdlib_dir()
    if not os.path.isdir(root):
        raise InvalidInputError(f"corpus folder {root!r} does not exist; pass corpus.dir=<folder of {suffix} "
                                "files> (or leave it null for the Python standard library)")
    if not 0 < heldout_fraction < 1:
        raise InvalidInputError(f"corpus.heldout_fraction must be in (0, 1), got {heldout_fraction}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS
                             and (include_tests or d not in TEST_DIRS))
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(suffix) and os.path.isfile(path) and os.path.getsize(path) > 0:
                files.append(os.path.join(*parts, name) if parts else name)
    files.sort()
    if not files:
        raise InvalidInputError(f"corpus folder {root!r} holds no non-empty {suffix} files; point corpus.dir at "
                                "a folder with source files")
    heldout = tuple(f for f in files if is_heldout(f, heldout_fraction))
    train = tuple(f for f in files if not is_heldout(f, heldout_fraction))
    if not train or not heldout:
        side = "training" if not train else "held-out"
        raise InvalidInputError(f"corpus folder {root!r} has {len(files)} file(s), too few to split: the {side} "
                                f"set is empty (heldout_fraction={heldout_fraction}); add more files")
    return Corpus(root, train, heldout)


def fingerprint(corpus: Corpus) -> str:
    """sha256 over (relative path, content) of every file, train then held-out: identifies the exact corpus."""
    h = hashlib.sha256()
    for rel in corpus.train + ("--heldout--",) + corpus.heldout:
        h.update(rel.encode() + b"\0")
        if rel != "--heldout--":
            h.update(Path(corpus.root, rel).read_bytes())
    return h.hexdigest()
