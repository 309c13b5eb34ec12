# Here (not on the device): the py3.12 wheels device_setup.sh installs there, into the git-ignored wheels/
# (carry it: `carry ["wheels"]`), and wheels/sha, the commit the device's results record.
#   bash benchmarks/device_wheels.sh
set -e
mkdir -p wheels
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any --no-deps cffi pycparser hydra-core==1.3.2 omegaconf==2.3.0 -d wheels
pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w wheels  # no wheel on the index: built here
git rev-parse --short HEAD > wheels/sha
ls wheels
