"""``fiddler-jax ceilings``: the bandwidths that bound offloaded MoE inference on this machine, measured side by
side in one run, and the speed limits they imply for Mixtral-8x7B (bf16) at each GPU budget.

Measured (median of ``--reps``):
  * host read: the faster of two readers of one ``--host-gib`` array: the CPU kernel's thread pool (8
    sequential streams per thread, as the kernel reads weight rows; the kernel reached 0.96 of it at n=1 on the
    H100 machine) and every core summing its slice with numpy (STREAM-like, which the kernel pool beats by
    20-50% on the H100 machine). Both are recorded: the rate the CPU lane can read weights at;
  * pinned H2D: a jitted copy of a ``--h2d-gib`` pinned-host array into device memory, the PCIe lane's path;
  * both lanes at once: the host read while eager copies of the pinned array run back to back;
  * GPU HBM read: a jitted sum over a ``--hbm-gib`` device array.
Limits, per budget (placement as the engine places it for a decode of 128 + 128 tokens; routing uniform, which
is what random weights give without router bias — runs record their measured routing too):
  * offloaded experts per decode token: Σ over layers of top_k × (offloaded experts of the layer) / E;
  * two-lane decode limit: (host read + pinned H2D bandwidth) / (offloaded expert bytes per token) — the CPU lane
    and the PCIe lane both reading offloaded weights all the time, every other cost free, each at its rate
    alone (the issue's definition);
  * two lanes together: the same with the rates measured while both run (``lanes_together``): the DMA and the
    kernel read the same DRAM, so this is the limit a machine whose lanes share memory bandwidth can reach;
  * PCIe prefill limit: (all offloaded expert bytes) / pinned H2D bandwidth — a long prompt touches every expert
    and the fastest way to run them all is to copy each once;
  * HBM roofline (all resident): HBM read bandwidth / (bytes a decode token reads: top-k experts per layer,
    attention, router and LM head weights).
Prints a line on stderr as each measurement starts and ends, the table last; ``--out`` writes JSON (bandwidths,
limits, provenance).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

from fiddler_jax.memory_kinds import DEVICE, PINNED_HOST
from fiddler_jax.timing import median_of

GIB = 1 << 30


def host_read_bandwidths(buffers: list[np.ndarray], reps: int = 5) -> dict[str, float]:
    """Bytes/s of two readers over the same C-contiguous ``buffers``: ``kernel``, the CPU kernel's thread pool
    (``kernels.read_bandwidth``: 8 sequential streams per thread, as the kernel reads weight rows), and
    ``numpy``, one thread per CPU of this process each summing its slice of every buffer (numpy releases the
    GIL). ``host_read`` is the faster: the best rate anything here reads host memory at."""
    from fiddler_jax import kernels

    threads = len(os.sched_getaffinity(0))
    words = [b.reshape(-1).view(np.uint8)[: b.nbytes // 8 * 8].view(np.uint64) for b in buffers]
    slices = [part for w in words for part in np.array_split(w, threads)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        def read():
            list(pool.map(np.sum, slices))

        numpy_rate = sum(w.nbytes for w in words) / median_of(read, reps)
    kernel_rate = kernels.read_bandwidth(buffers, reps)
    return {"host_read": max(kernel_rate, numpy_rate), "host_read_kernel": kernel_rate,
            "host_read_numpy": numpy_rate}


def lanes_together(buffers: list[np.ndarray], copy_one: Callable[[], int], reps: int = 5) -> dict[str, float]:
    """Both lanes at once, as a decode step that prefetches runs them: a thread makes PCIe copies back to back
    (``copy_one`` copies and waits, returning the bytes moved) while the kernel pool reads ``buffers``
    (``kernels.read_bandwidth``, ``reps`` passes). The host's DRAM feeds both, so each runs slower than alone
    (on the H100 machine the kernel lost 18% beside copies). Bytes/s:
      * ``host_read_with_h2d``: the kernel pool's read rate while the copies ran;
      * ``pinned_h2d_with_read``: the copies' rate over the copies that ended while the reads ran (from the
        first one's end to the last one's, so partial copies at the edges do not count); the median copy rate
        of the window when fewer than two copies ended in it.
    Their sum, over offloaded bytes per token, is the decode limit of two lanes that share memory bandwidth.
    Compare ``host_read_with_h2d`` with the kernel pool's rate alone (``host_read_kernel``), not with the faster
    of the two readers. An error in a copy is raised here."""
    from fiddler_jax import kernels

    stop, ends, failed = threading.Event(), [], []  # ends: (perf_counter at the copy's end, bytes, seconds)

    def copier():
        try:
            while not stop.is_set():
                t = time.perf_counter()
                n = copy_one()
                ends.append((time.perf_counter(), n, time.perf_counter() - t))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            failed.append(exc)

    thread = threading.Thread(target=copier, name="ceilings-pcie", daemon=True)
    thread.start()
    try:
        deadline = time.perf_counter() + 60.0
        while not ends and thread.is_alive() and time.perf_counter() < deadline:  # the first copy has landed
            time.sleep(0.001)
        t0 = time.perf_counter()
        read = kernels.read_bandwidth(buffers, reps)
        t1 = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]
    inside = [e for e in ends if t0 < e[0] <= t1]
    if len(inside) >= 2:
        copy_rate = sum(n for _, n, _ in inside[1:]) / (inside[-1][0] - inside[0][0])
    else:
        copy_rate = statistics.median(n / s for _, n, s in (inside or ends[-1:]))
    return {"host_read_with_h2d": read, "pinned_h2d_with_read": copy_rate}


def pinned_h2d_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes/s of a jitted copy from a pinned-host array into device memory of the first device."""
    import jax

    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind=PINNED_HOST)
    device = jax.sharding.SingleDeviceSharding(dev, memory_kind=DEVICE)
    src = jax.device_put(np.ones(nbytes // 2, np.uint16), pinned)
    copy = jax.jit(lambda a: a, out_shardings=device)

    def run():
        copy(src).block_until_ready()

    seconds = median_of(run, reps)
    return src.nbytes / seconds


def pinned_copier(nbytes: int) -> Callable[[], int]:
    """A callable that copies one ``nbytes`` pinned-host array into device memory (eager ``device_put``, as the
    PCIe lane copies), waits for it, and returns the bytes moved."""
    import jax

    dev = jax.devices()[0]
    src = jax.device_put(np.ones(nbytes // 2, np.uint16),
                         jax.sharding.SingleDeviceSharding(dev, memory_kind=PINNED_HOST))
    target = jax.sharding.SingleDeviceSharding(dev, memory_kind=DEVICE)

    def copy_one() -> int:
        jax.device_put(src, target).block_until_ready()
        return src.nbytes

    return copy_one


def hbm_read_bandwidth(nbytes: int, reps: int = 10) -> float:
    """Bytes/s of a jitted reduction over a device array (read-bound)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))

    def run():
        total(x).block_until_ready()

    seconds = median_of(run, reps)
    return x.nbytes / seconds


PROBE_READ_BYTES = 8 * 352_321_536  # eight of Mixtral-8x7B's experts: 2.8 GB, far beyond any last-level cache
PROBE_COPY_BYTES = 3 * 352_321_536  # three of them: 1.06 GB


def engine_lane_bandwidths(engine, read_bytes: int = PROBE_READ_BYTES, copy_bytes: int = PROBE_COPY_BYTES,
                           reps: int = 5) -> dict:
    """The two lanes' ceilings measured on a built engine's own offloaded experts, in the caller's process (the
    host's memory bandwidth moves between machine leases, so a limit is only comparable with a run measured
    beside it). Bytes/s:
      * ``host_read``: :func:`host_read_bandwidths` over as many offloaded experts as hold ``read_bytes`` (at
        least 8; spread over the layers), the weights the CPU lane reads, where it reads them;
      * ``pinned_h2d``: eager copies of the first of them that hold ``copy_bytes`` (at least 3) into GPU memory,
        one expert at a time, as the PCIe lane makes them;
      * ``host_read_with_h2d`` and ``pinned_h2d_with_read``: both at once (:func:`lanes_together`).
    The probe is sized in bytes, not experts: eight of Qwen3-30B-A3B's 9.4 MB experts read in about half a
    millisecond, where the pool's wake-up and each copy's dispatch, not memory, would set the rate; at that
    geometry it reads about 300 experts and copies about 112.
    Without staging slots (nothing reserved on the GPU for a copy) only the host read is measured. Empty when the
    engine offloads nothing."""
    import jax

    from fiddler_jax.runtime.host_experts import WEIGHTS

    held = np.argwhere(engine.host.held)
    if not len(held):
        return {}
    expert = engine.host.expert_nbytes
    experts, copies = max(8, -(-read_bytes // expert)), max(3, -(-copy_bytes // expert))
    picked = held[np.linspace(0, len(held) - 1, min(experts, len(held))).round().astype(int)]
    views = [view for l, e in picked for view in engine.host.buffers(int(l), int(e))]
    host = host_read_bandwidths(views, reps)
    if engine.staging_slots < 1:
        return {**host, "experts_read": len(picked)}
    moved = [engine.host.arrays(int(l), int(e)) for l, e in picked[:copies]]
    device = next(iter(jax.tree.leaves(moved[0])[0].devices()))
    target = jax.sharding.SingleDeviceSharding(device, memory_kind=DEVICE)

    def copy_one(pinned) -> int:
        jax.block_until_ready({w: jax.device_put(pinned[w], target) for w in WEIGHTS})
        return sum(a.nbytes for a in jax.tree.leaves(pinned))

    def copy_all():
        for pinned in moved:
            copy_one(pinned)

    seconds = median_of(copy_all, reps)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(moved))
    turns = itertools.cycle(moved)
    together = lanes_together(views, lambda: copy_one(next(turns)), reps)
    return {**host, "pinned_h2d": nbytes / seconds, **together, "experts_read": len(picked),
            "experts_copied": len(moved)}


def decode_limits(bandwidth: dict, per_token: float, expert: int) -> dict:
    """Decode tokens/s that bandwidths (bytes/s) allow when a token needs ``per_token`` offloaded experts of
    ``expert`` bytes: both lanes at their rates alone (needs ``pinned_h2d``), the CPU lane alone, and both lanes
    at the rates measured together (needs :func:`lanes_together`'s keys). None where a rate was not measured
    or nothing is offloaded."""
    def rate(bytes_per_s: float) -> float | None:
        return bytes_per_s / (per_token * expert) if per_token and bytes_per_s else None

    host, h2d = bandwidth.get("host_read", 0.0), bandwidth.get("pinned_h2d")
    together = bandwidth.get("host_read_with_h2d", 0.0) + bandwidth.get("pinned_h2d_with_read", 0.0)
    return {"two_lane_decode_tokens_per_s": None if h2d is None else rate(host + h2d),
            "cpu_lane_only_decode_tokens_per_s": rate(host),
            "two_lanes_together_decode_tokens_per_s": rate(together)}


def limits(cfg, budget: str, bandwidth: dict, *, max_context: int = 256, staging_slots: int = 2) -> dict:
    """The limits of the module docstring for one GPU budget (bf16 weights)."""
    from fiddler_jax.runtime.placement import expert_bytes, non_expert_bytes, place

    plan = place(cfg, budget, itemsize=2, max_context=max_context, staging_slots=staging_slots)
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    offloaded = (~plan.resident).sum(axis=1)
    per_token = float((k * offloaded / E).sum())
    expert = expert_bytes(cfg, 2)
    embed_table = cfg.vocab_size * cfg.hidden_size * 2
    token_bytes = non_expert_bytes(cfg, 2) - embed_table + cfg.num_hidden_layers * k * expert  # one embed row
    h2d, hbm = bandwidth["pinned_h2d"], bandwidth["hbm_read"]
    return {
        "budget": budget, "resident_experts": plan.resident_count,
        "offloaded_experts": int(offloaded.sum()), "offloaded_bytes": int(offloaded.sum()) * expert,
        "offloaded_experts_per_token": per_token, **decode_limits(bandwidth, per_token, expert),
        "pcie_prefill_limit_s": int(offloaded.sum()) * expert / h2d,
        "hbm_roofline_tokens_per_s": hbm / token_bytes,
    }


def table(result: dict) -> str:
    bw = result["bandwidth_GBps"]
    lines = [f"ceilings on {result['hardware'].get('cpu')} + {result['hardware'].get('gpu')}",
             f"  host read {bw['host_read']:.1f} GB/s (kernel pool {bw.get('host_read_kernel', float('nan')):.1f}, "
             f"numpy with {result['threads']} threads {bw.get('host_read_numpy', float('nan')):.1f}), pinned H2D "
             f"{bw['pinned_h2d']:.1f} GB/s, GPU HBM read {bw['hbm_read']:.1f} GB/s", "",
             f"{'budget':>8s}{'resident':>10s}{'offl./tok':>11s}{'2-lane tok/s':>14s}{'together tok/s':>16s}"
             f"{'CPU-only tok/s':>16s}{'PCIe prefill s':>16s}{'HBM roofline':>14s}"]
    for lim in result["limits"]:
        two, cpu = lim["two_lane_decode_tokens_per_s"], lim["cpu_lane_only_decode_tokens_per_s"]
        both = lim.get("two_lanes_together_decode_tokens_per_s")
        lines.append(f"{lim['budget']:>8s}{lim['resident_experts']:>10d}{lim['offloaded_experts_per_token']:>11.2f}"
                     f"{two or float('inf'):>14.2f}{both or float('inf'):>16.2f}{cpu or float('inf'):>16.2f}"
                     f"{lim['pcie_prefill_limit_s']:>16.2f}{lim['hbm_roofline_tokens_per_s']:>14.1f}")
    return "\n".join(lines)


def progress(line: str) -> None:
    """A progress line on stderr (each measurement takes seconds to a minute; the table comes on stdout)."""
    import sys

    print(f"ceilings {line}", file=sys.stderr, flush=True)


def run(budgets: list[str], host_gib: float, h2d_gib: float, hbm_gib: float, reps: int) -> dict:
    from fiddler_jax.experiments.model_group import random_model_config
    from fiddler_jax.provenance import provenance

    threads = len(os.sched_getaffinity(0))
    bandwidth: dict[str, float] = {}

    def step(n: int, what: str, measure: Callable[[], dict], shown: str) -> None:
        progress(f"[{n}/4] {what} ...")
        tic = time.perf_counter()
        bandwidth.update(measure())
        progress(f"[{n}/4] {shown.format(**{k: v / 1e9 for k, v in bandwidth.items()})} "
                 f"({time.perf_counter() - tic:.1f} s)")

    host_buffer: list[np.ndarray] = []

    def host_read() -> dict:
        host_buffer.append(np.ones(int(host_gib * GIB), np.uint8))
        return host_read_bandwidths(host_buffer, reps)

    step(1, f"host read of a {host_gib:g} GiB array: kernel pool and numpy ({threads} threads), {reps} reps",
         host_read, "host read {host_read:.1f} GB/s (kernel pool {host_read_kernel:.1f}, numpy {host_read_numpy:.1f})")
    step(2, f"pinned H2D copy of {h2d_gib:g} GiB, {reps} reps",
         lambda: {"pinned_h2d": pinned_h2d_bandwidth(int(h2d_gib * GIB), reps)}, "pinned H2D {pinned_h2d:.1f} GB/s")
    step(3, f"GPU HBM read of {hbm_gib:g} GiB, {2 * reps} reps",
         lambda: {"hbm_read": hbm_read_bandwidth(int(hbm_gib * GIB), 2 * reps)}, "GPU HBM read {hbm_read:.1f} GB/s")
    step(4, f"both lanes at once: host read while {h2d_gib:g} GiB copies run, {reps} reps",
         lambda: lanes_together(host_buffer, pinned_copier(int(h2d_gib * GIB)), reps),
         "both lanes at once: host read {host_read_with_h2d:.1f} GB/s + pinned H2D {pinned_h2d_with_read:.1f} GB/s")
    cfg = random_model_config()
    return {"bandwidth_GBps": {k: v / 1e9 for k, v in bandwidth.items()}, "threads": threads,
            "sizes_GiB": {"host": host_gib, "h2d": h2d_gib, "hbm": hbm_gib}, "model": "mixtral_8x7b (bf16)",
            "limits": [limits(cfg, b, bandwidth) for b in budgets], **provenance()}


def main(argv=None) -> None:
    from fiddler_jax.experiments.common import clear_errors

    ap = argparse.ArgumentParser(prog="fiddler-jax ceilings", description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="24GiB,48GiB,79GiB", help="comma-separated GPU budgets")
    ap.add_argument("--host-gib", type=float, default=8.0, help="host array read (GiB)")
    ap.add_argument("--h2d-gib", type=float, default=2.0, help="pinned array copied to the GPU (GiB)")
    ap.add_argument("--hbm-gib", type=float, default=8.0, help="device array read (GiB)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)

    @clear_errors
    def go():
        result = run([b.strip() for b in args.budgets.split(",") if b.strip()], args.host_gib, args.h2d_gib,
                     args.hbm_gib, args.reps)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        print(table(result))

    go()


if __name__ == "__main__":
    main()
