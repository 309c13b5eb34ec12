# Source on the device machine (from the repo root): installs the carried wheels (cffi, hydra-core, omegaconf,
# antlr4) into /tmp/site, builds the CPU kernel, sets PYTHONPATH, and defines `fj` (= fiddler-jax).
set -e
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FIDDLER_GIT_SHA=${FIDDLER_GIT_SHA:-unknown}
python3 fiddler_jax/kernels/_build.py > "${OUT:-/tmp}/build.log" 2>&1
fj() { python3 -m fiddler_jax.cli "$@"; }
RANDOM_MIXTRAL="model=mixtral_8x7b_random latency=auto hydra.job.chdir=false"
set +e
