"""The manifest of one ``fiddler-jax bench-jobs`` run (``manifest.json`` in its ``--out`` folder): the jobs file,
the common overrides, start and finish times, the git SHA, and per job its folder, overrides, status (pending,
running, ok, failed) and error. ``bench-jobs`` writes it after every job; ``report`` reads only the results it
lists as ok and names the jobs that failed or are missing, so a result set never mixes runs."""
from __future__ import annotations

import datetime
import json
import os

from fiddler_jax.errors import InvalidInputError

MANIFEST = "manifest.json"
TOOL = "fiddler-jax bench-jobs"
STATUSES = ("pending", "running", "ok", "failed")


# --- the run's manifest --------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _plain_name(name, where: str) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or os.sep in name or "/" in name
            or (os.altsep and os.altsep in name)):
        raise InvalidInputError(f"{where} lists {name!r}, which is not a plain name inside the folder; this "
                                "manifest was not written by bench-jobs: remove the folder's contents yourself")
    return name


def load_manifest(folder: str) -> dict | None:
    """The bench-jobs manifest of ``folder`` (checked), or None when it has none."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not a readable bench-jobs manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL or not isinstance(manifest.get("jobs"), list):
        raise InvalidInputError(f"{path} is not a bench-jobs manifest (expected a JSON object with "
                                f"\"tool\": \"{TOOL}\" and a list \"jobs\")")

    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(o, str) for o in value)

    if not strings(manifest.get("common", [])):
        raise InvalidInputError(f"{path}: \"common\" must be a list of overrides")
    for job in manifest["jobs"]:
        if not isinstance(job, dict):
            raise InvalidInputError(f"{path}: every entry of \"jobs\" must be a JSON object, got {job!r}")
        _plain_name(job.get("folder"), path)
        if not strings(job.get("overrides", [])):
            raise InvalidInputError(f"{path}: job {job['folder']}'s \"overrides\" must be a list of overrides")
        if job.get("status") not in STATUSES:
            raise InvalidInputError(f"{path}: job {job['folder']} has status {job.get('status')!r}; expected "
                                    f"one of {', '.join(STATUSES)}")
    files = manifest.get("report_files", [])
    if not isinstance(files, list):
        raise InvalidInputError(f"{path}: \"report_files\" must be a list of file names")
    for name in files:
        _plain_name(name, path)
    return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    """Write the manifest atomically (a run stopped mid-write leaves the previous one)."""
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
