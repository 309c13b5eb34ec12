"""Sizing a sweep's cluster jobs (``conf/hydra/launcher/slurm.yaml``): the host memory one bench job needs.

A job pins every offloaded expert in host memory once (the CPU lane reads them in place, the PCIe lane copies from
them), and holds the Python process, the non-expert weights on their way to the GPU and the kernel's buffers
besides. ``host_memory_gb`` places the job's model at its GPU budget the way the engine will (pure Python, no
JAX: :func:`fiddler_jax.runtime.placement.place` with the reserves of one sequence), takes the offloaded experts'
bytes, and adds ``MARGIN`` of them plus ``BASE_GB``. Where the budget is not known before the job runs
(``hardware=auto``: the GPU decides) nothing is assumed resident, the upper bound. A model whose size cannot be
read here (a checkpoint folder that exists only on the cluster) gets ``FALLBACK_GB``: set
``hydra.launcher.mem_gb`` for it. A ``bench-table`` job needs what the largest of its jobs needs.
"""
from __future__ import annotations

import math

from fiddler_jax.models.quantization import DEFAULT_INT4_GROUP

MARGIN = 0.25  # of the pinned experts' bytes: the pool's rounding, staging copies, allocator slack
BASE_GB = 16  # the process, the non-expert weights on the host while loading, the kernel's buffers
FALLBACK_GB = 64
GIB = 1 << 30


def pinned_expert_bytes(model_cfg, gpu_budget, dtype: str, precision: str = "bf16",
                        group: int = DEFAULT_INT4_GROUP) -> int:
    """Bytes of the experts a job at ``gpu_budget`` (None: unknown) keeps in host memory, at their stored size for
    ``precision`` (quantised experts are pinned quantised, and more of them are resident)."""
    import numpy as np

    from fiddler_jax.runtime.placement import expert_bytes, place

    itemsize = np.dtype("float32" if dtype == "float32" else "uint16").itemsize
    total = len(model_cfg.moe_layers) * model_cfg.num_experts
    if gpu_budget is None:
        return total * expert_bytes(model_cfg, itemsize, precision, group)
    placed = place(model_cfg, gpu_budget, itemsize=itemsize, max_context=min(4096, model_cfg.max_position_embeddings),
                   expert_precision=precision, int4_group=group)
    return placed.offloaded_count * placed.memory.expert


def host_memory_gb(_root_) -> int:
    """Host GB for one bench job of the config ``_root_`` (module docstring), or for a ``bench-table`` job (the
    most any of the table's jobs needs: they run one after another in one process, each engine released before
    the next is built); an OmegaConf resolver."""
    from fiddler_jax.errors import FiddlerError
    from fiddler_jax.experiments.model_group import model_config

    if _root_.get("table") is not None:
        return table_host_memory_gb(_root_.table)
    try:
        model = _root_.model
        cfg = model_config(model)
        pinned = pinned_expert_bytes(cfg, _root_.hardware.gpu_budget, model.dtype,
                                     model.get("expert_precision", "bf16"), model.get("int4_group", DEFAULT_INT4_GROUP))
    except (FiddlerError, OSError, AttributeError, KeyError):  # no model here (another app), or not readable here
        return FALLBACK_GB
    return BASE_GB + math.ceil(pinned * (1 + MARGIN) / GIB)


def table_host_memory_gb(table) -> int:
    """Host GB for a table preset (``common:`` and ``jobs:`` override lists): each job composed as ``bench`` would
    compose it (:func:`fiddler_jax.experiments.bench_config.compose`), the largest :func:`host_memory_gb`;
    ``FALLBACK_GB`` for a table that does not compose here."""
    from omegaconf import OmegaConf

    from fiddler_jax.experiments.bench_config import compose, parse_jobs

    spec = OmegaConf.to_container(table, resolve=True) if OmegaConf.is_config(table) else table
    try:
        common, jobs = parse_jobs(spec, "table")
        configs = [compose(common + job) for job in jobs]
    except Exception:  # noqa: BLE001  (a malformed table or a composition error: the job itself reports it)
        return FALLBACK_GB
    return max(host_memory_gb(cfg) for cfg in configs)
