"""One JSON and one table from a decode_ab.sh run: for every job folder (a ``result.json``) of each side, the
decode tokens/s, the in-run two-lane limit, the trace's busy seconds per lane and its planned steps by the experts
they copied; for a traced job with streamed steps, per streamed call (medians over the decode, ms) the hand-off
(its inputs on the host -> the CPU lane's run starts), the run, the GPU's resident mix beside it and the stream's
wait for the CPU output.

    python benchmarks/decode_ab_summary.py <results dir holding head/ and before/> --json PATH
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def streamed_calls(trace_path: str) -> dict:
    """Medians (ms) of the streamed calls' spans in a saved Perfetto trace: events named ``L<n> <lane>``, grouped
    by step (``args.step``)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps: dict[int, dict] = {}
    for e in events:
        lane = e["name"].split(" ", 1)[1]
        steps.setdefault(e["args"]["step"], {})[lane] = (e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3)
    timed = [s for s in steps.values() if "gpu" in s and "cpu" in s]
    if not timed:
        return {}

    def med(values):
        return round(statistics.median(values), 4) if values else None

    return {"streamed_calls": len(timed),
            "handoff_ms": med([s["cpu"][0] - s["gpu"][0] for s in timed]),
            "cpu_run_ms": med([s["cpu"][1] - s["cpu"][0] for s in timed]),
            "gpu_mix_ms": med([s["gpu"][1] - s["gpu"][0] for s in timed]),
            "cpu_wait_ms": med([s["cpu_wait"][1] - s["cpu_wait"][0] for s in timed if "cpu_wait" in s]),
            "attention_ms": med([s["attention"][1] - s["attention"][0] for s in timed if "attention" in s])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = []
    for path in sorted(glob.glob(os.path.join(args.results, "*", "*", "result.json"))):
        side, job = path.split(os.sep)[-3:-1]
        with open(path) as f:
            r = json.load(f)
        summary = r.get("engine", {}).get("trace_summary") or {}
        row = {"side": side, "job": job, "git_sha": r.get("git_sha"),
               "decode_tok_s": r["metrics"]["decode_tokens_per_s"]["median"],
               "two_lane_limit_tok_s": (r.get("limits") or {}).get("two_lane_decode_tokens_per_s"),
               "busy_s": summary.get("busy_s"), "wall_s": summary.get("wall_s"),
               "steps_by_copies": summary.get("steps_by_copies")}
        trace = os.path.join(os.path.dirname(path), "trace.json")
        if os.path.isfile(trace):
            row.update(streamed_calls(trace))
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: no <side>/<job>/result.json under {args.results}: neither side of decode_ab.sh "
                         f"finished a job (see head.log and before.log)")
    with open(args.json, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    print(f"{'side':<9}{'job':<48}{'tok/s':>8}{'limit':>8}  streamed-call medians (ms)")
    for row in rows:
        limit = row["two_lane_limit_tok_s"]
        calls = {k: row[k] for k in ("handoff_ms", "cpu_run_ms", "gpu_mix_ms", "cpu_wait_ms") if k in row}
        if row["steps_by_copies"]:
            calls["planned steps by copies"] = row["steps_by_copies"]
        print(f"{row['side']:<9}{row['job'][:47]:<48}{row['decode_tok_s']:>8.2f}"
              f"{limit if limit is None else round(limit, 2)!s:>8}  {calls or ''}")


if __name__ == "__main__":
    main()
