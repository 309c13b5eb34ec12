# Decode of this tree against another commit's, each in its own process on one device machine (the other
# commit's kernels built from its own sources): benchmarks/decode_ab/{head,before}.yaml.
#   here:       git archive <rev> | tar -x -C wheels/before    (wheels/ is git-ignored; carry it with the wheels)
#   on device:  BEFORE=wheels/before [STEP_TIMEOUT=s] bash benchmarks/decode_ab.sh   (results: $OUT/head, $OUT/before)
REAL=$OUT; OUT=/tmp; source benchmarks/device_setup.sh; OUT=$REAL
BEFORE=${BEFORE:-wheels/before}
timeout ${STEP_TIMEOUT:-600} python3 -m fiddler_jax.cli bench-jobs benchmarks/decode_ab/head.yaml --out $OUT/head > $OUT/head.log 2>&1
echo "head rc=$?"; grep -E "^\[|decode_tokens_per_s" $OUT/head.log
( cd "$BEFORE" && export PYTHONPATH=/tmp/site:$PWD FIDDLER_GIT_SHA=${BEFORE_SHA:-$(basename "$BEFORE")} && \
  python3 fiddler_jax/kernels/_build.py > $OUT/before_build.log 2>&1 && \
  timeout ${STEP_TIMEOUT:-600} python3 -m fiddler_jax.cli bench-jobs "$OLDPWD/benchmarks/decode_ab/before.yaml" --out $OUT/before > $OUT/before.log 2>&1
  echo "before rc=$?" )
grep -E "^\[|decode_tokens_per_s" $OUT/before.log
