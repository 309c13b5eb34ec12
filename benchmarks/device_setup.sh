# On the device machine, from the repo root: `source benchmarks/device_setup.sh`. Installs the carried wheels
# (cffi, hydra-core, omegaconf, antlr4; `wheels/*.whl`) into /tmp/site, builds the CPU kernel in place
# (fiddler_jax/kernels/_build.py; log in $OUT/build.log), puts /tmp/site and the tree on PYTHONPATH, and defines
# `fj` (= fiddler-jax) and RANDOM_MIXTRAL (the overrides of a bench run on Mixtral-8x7B's geometry with random
# weights and this machine's calibrated latency model). Set FIDDLER_GIT_SHA first so results record the commit.
set -e
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FIDDLER_GIT_SHA=${FIDDLER_GIT_SHA:-unknown}
python3 fiddler_jax/kernels/_build.py > "${OUT:-/tmp}/build.log" 2>&1
fj() { python3 -m fiddler_jax.cli "$@"; }
RANDOM_MIXTRAL="model=mixtral_8x7b_random latency=auto hydra.job.chdir=false"
set +e
