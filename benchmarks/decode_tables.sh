# On the device, from the repo root (carry wheels/, made by benchmarks/device_wheels.sh): bench-jobs tables one
# after another, each under its own time limit, so a call cut short still brings back the tables it finished.
#   bash benchmarks/decode_tables.sh <table.yaml>:<seconds> [<table.yaml>:<seconds> ...]
# e.g. bash benchmarks/decode_tables.sh benchmarks/decode_tables/qwen3_12l_6g.yaml:200 \
#        benchmarks/decode_tables/qwen3_16g.yaml:330
# A table is a file (benchmarks/decode_tables/*.yaml) or a package preset's name (fiddler_jax/conf/table/).
# $OUT/<table>/ gets its log, report.md, every job's result.json and trace (gzip), and summary.json
# (decode_ab_summary.py: tokens/s, in-run limit, planned steps by copies, streamed-call medians), whose table is
# printed; $OUT/latency/ the latency models calibrated on the way, whose copy and sync constants are printed.
REAL=$OUT; export FIDDLER_GIT_SHA=${FIDDLER_GIT_SHA:-$(cat wheels/sha 2>/dev/null)}
OUT=/tmp; source benchmarks/device_setup.sh; OUT=$REAL
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
RESULTS=/tmp/decode_tables
rm -rf "$RESULTS"
for spec in "$@"; do
  table=${spec%:*}; seconds=${spec##*:}; name=$(basename "$table" .yaml)
  jobs_dir="$RESULTS/$name/$name"  # decode_ab_summary.py reads <results>/<side>/<job>/result.json
  timeout "$seconds" python3 -m fiddler_jax.cli bench-jobs "$table" --out "$jobs_dir" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
  mkdir -p "$OUT/$name"
  [ -f "$jobs_dir/report.md" ] && cp "$jobs_dir/report.md" "$OUT/$name/"
  for result in "$jobs_dir"/*/result.json; do
    [ -f "$result" ] || continue
    job=$(basename "$(dirname "$result")"); mkdir -p "$OUT/$name/$job"; cp "$result" "$OUT/$name/$job/"
    [ -f "$jobs_dir/$job/trace.json" ] && gzip -c "$jobs_dir/$job/trace.json" > "$OUT/$name/$job/trace.json.gz"
  done
  python3 benchmarks/decode_ab_summary.py "$RESULTS/$name" --json "$OUT/$name/summary.json"
done
mkdir -p "$OUT/latency" && cp ~/.cache/fiddler-jax/latency/*.json "$OUT/latency/" 2>/dev/null
python3 - "$OUT/latency" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    with open(path) as f:
        model = json.load(f)
    print(os.path.basename(path), {k: model.get(k) for k in ("transfer_s", "transfer_busy_s", "sync_s")})
PY
true
