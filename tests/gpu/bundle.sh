#!/usr/bin/env bash
# Download, on a CPU machine with pip, the wheels the GPU machine's image lacks (it has no package
# registry), for its Python 3.12 on manylinux x86-64, and print the one command to run there.
#
#   bash tests/gpu/bundle.sh [DIR]      # DIR defaults to .whl/ in the repo root, which .gitignore ignores
#
# DIR's old *.whl are removed first: two versions of one package would stop the install there.
# BUNDLE_PYTHON=3.11 fetches the same pins for another Python (the CPU test's stand-in environment).
# Transformer Engine and vLLM are not bundled (their wheels are far over the 64 MiB the device is
# sent); the checks run without them and say so.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$(realpath -m "${1:-$REPO/.whl}")
PY=${BUNDLE_PYTHON:-3.12}
LIMIT=$((64 * 1024 * 1024)) # the device tool's limit on the working tree plus carried paths

# What setup.py needs that tests/gpu/image-packages.txt lacks (tests/test_gpu_bundle.py keeps this complete).
WHEELS=(
    megatron-core==0.16.1 # the engine (setup.py: >=0.16,<0.20); the version the CPU suite runs
    torchao==0.18.0       # int8 quantization in post_training_gpu.py; its kernels are built for torch >= 2.11
    datasets==5.2.0       # setup.py (HF dataset directories as training data)
    dill==0.4.1           # datasets' requirements the image lacks
    multiprocess==0.70.19
)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# Only binary wheels for the target interpreter and platform; --no-deps: the image has the rest.
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
    --python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${WHEELS[@]}"

bundle=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
# What the device is sent besides the bundle: tracked and untracked-not-ignored files.
repo=$(git -C "$REPO" ls-files -z --cached --others --exclude-standard | (cd "$REPO" && du -cb --files0-from=-) |
    tail -1 | cut -f1)
ls -l "$DIR"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $NF}'
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
echo "bundle $(mib "$bundle") + repo $(mib "$repo") = $(mib $((bundle + repo))) (limit 64 MiB)"
if ((bundle + repo > LIMIT)); then
    echo "error: over the 64 MiB the device machine is sent" >&2
    exit 1
fi

rel=$(realpath -m --relative-to="$REPO" "$DIR")
if [[ $rel == ..* ]]; then
    echo "note: $DIR is outside the repo and will not travel: copy it into an ignored folder of the repo" >&2
fi
cat <<EOF

On the GPU machine (device run, carry ["$rel"]), in the repo root:

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $rel/*.whl && PYTHONPATH=/tmp/site bash tests/gpu/run_all.sh --out \$OUT
EOF
