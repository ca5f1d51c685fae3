#!/usr/bin/env bash
# Download, here, the wheels bench/gpu_smoke.sh installs on the lent GPU machine, which cannot
# reach PyPI. That machine's python3 is CPython 3.12 (x86-64) with torch, torchvision, numpy,
# pytest, PyYAML, fsspec, pyarrow, safetensors, tqdm and packaging already installed
# (/work/.library/device/KINDS.md); the pipeline's storage and stages also import pydantic and
# zarr, which it lacks. These are them and their needs, pinned to the versions of this
# project's .venv, as CPython 3.12 manylinux wheels.
#
#   bench/gpu_wheelhouse.sh            # into .whl/ (and adds /.whl/ to .git/info/exclude)
#   bench/gpu_wheelhouse.sh /tmp/whl   # anywhere else
#
# Then carry it: device run with carry [".whl"] (about 10 MiB; the limit is 64 MiB a call).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    zarr==3.1.6
    numcodecs==0.16.6
    donfig==0.8.1.post1
    google-crc32c==1.9.0
)
mkdir -p "$DEST"
if [ "$DEST" = .whl ] && ! git check-ignore -q .whl/x 2>/dev/null; then
    mkdir -p .git/info
    echo /.whl/ >>.git/info/exclude
    echo "added /.whl/ to .git/info/exclude"
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$DEST" "$w"
done
ls -l "$DEST"
du -sh "$DEST"
