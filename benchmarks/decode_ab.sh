# Decode of this tree against another commit's, each in its own process on one device machine (the other
# commit's kernels built from its own sources): benchmarks/decode_ab/{head,before}.yaml.
#   here:       mkdir -p wheels/before && git archive <rev> | tar -x -C wheels/before
#               (wheels/ is git-ignored and holds the py3.12 wheels device_setup.sh installs; carry it)
#   on device:  FIDDLER_GIT_SHA=<this tree's sha> BEFORE=wheels/before [BEFORE_SHA=<rev>] [STEP_TIMEOUT=s] \
#                 bash benchmarks/decode_ab.sh
# Each side's bench-jobs results go to /tmp/decode_ab/{head,before} on the device; $OUT gets the two logs and
# the two report.md tables, the latency models the two sides calibrated (latency/), the traced job's trace (gzip)
# and decode_ab.json (benchmarks/decode_ab_summary.py: every job's tokens/s, limit and streamed-call medians),
# whose table is printed last.
REAL=$OUT; OUT=/tmp; source benchmarks/device_setup.sh; OUT=$REAL
BEFORE=${BEFORE:-wheels/before}
STEP_TIMEOUT=${STEP_TIMEOUT:-270}  # each side (HEAD_TIMEOUT / BEFORE_TIMEOUT apart); the call stays under 600 s
RESULTS=/tmp/decode_ab
rm -rf "$RESULTS"
timeout "${HEAD_TIMEOUT:-$STEP_TIMEOUT}" python3 -m fiddler_jax.cli bench-jobs benchmarks/decode_ab/head.yaml \
  --out "$RESULTS/head" > "$OUT/head.log" 2>&1
echo "head rc=$?"
( cd "$BEFORE" || exit 1
  export PYTHONPATH=/tmp/site:$PWD FIDDLER_GIT_SHA=${BEFORE_SHA:-$(basename "$BEFORE")}
  if ! python3 fiddler_jax/kernels/_build.py > "$OUT/before_build.log" 2>&1; then
    echo "before: its kernel build failed (before_build.log)"; exit 1
  fi
  timeout "${BEFORE_TIMEOUT:-$STEP_TIMEOUT}" python3 -m fiddler_jax.cli bench-jobs \
    "$OLDPWD/benchmarks/decode_ab/before.yaml" --out "$RESULTS/before" > "$OUT/before.log" 2>&1
  echo "before rc=$?" )
for side in head before; do
  [ -f "$RESULTS/$side/report.md" ] && cp "$RESULTS/$side/report.md" "$OUT/${side}_report.md"
done
mkdir -p "$OUT/latency" && cp ~/.cache/fiddler-jax/latency/*.json "$OUT/latency/" 2>/dev/null  # both sides' models
for trace in "$RESULTS"/head/*/trace.json; do [ -f "$trace" ] && gzip -c "$trace" > "$OUT/head_trace.json.gz"; done
python3 benchmarks/decode_ab_summary.py "$RESULTS" --json "$OUT/decode_ab.json"
true
