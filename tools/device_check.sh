#!/usr/bin/env bash
# The CUDA checks the open issues ask for, in one go on the device machine (see tools/prepare_device.sh):
# engine train in both modes and auto on the GPU (#2, #17), the benchmark table on the GPU (#5), and torchrun with one
# process vs a plain run on the same GPU (#8). Everything goes to $OUT/log; JSON tables to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1 TRANSFER_STUDIO_CACHE=/tmp/ts-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
D=.carry/hymenoptera
nvidia-smi -L
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
DEV=${DEVICE:-cuda}; FT=${FT_EPOCHS:-3}   # DEVICE=cpu FT_EPOCHS=1 SKIP_BENCH=1: a quick rehearsal on the CPU
TIMEFORMAT='WALL %R s'
t() { echo "== $*"; time "$@"; }
t python3 -m engine train $D --device $DEV --out /tmp/r-fe
t python3 -m engine train $D --device $DEV --out /tmp/r-fe2            # embedding cache warm
# JPEGs decoded by PIL threads instead of nvjpeg (empty cache of its own): what GPU decoding gains
t env TRANSFER_STUDIO_GPU_DECODE=0 TRANSFER_STUDIO_CACHE=/tmp/ts-cache-pil python3 -m engine train $D --device $DEV --out /tmp/r-fe-pil
# the frozen network's earlier layers through the PyTorch forward on the device (issue 46): taps forced on
t python3 -m engine train $D --device $DEV --features depths --out /tmp/r-fe-depths
python3 -c "import json; d=json.load(open('/tmp/r-fe-depths/metrics.json'))['depths']; print('depths kept', d['kept'], d['why'])"
t python3 -m engine train $D --device $DEV --mode fine-tuning --epochs $FT --out /tmp/r-ft
t torchrun --standalone --nproc_per_node=1 -m engine train $D --device $DEV --mode fine-tuning --epochs $FT --out /tmp/r-ft-ddp1
# the automatic strategy (feature extraction, then fine-tuning from its head with the frozen stages run once)
t python3 -m engine train $D --device $DEV --mode auto --out /tmp/r-auto
python3 -c "import json; print(json.load(open('/tmp/r-auto/metrics.json'))['auto']['summary'])"
for r in /tmp/r-fe /tmp/r-fe2 /tmp/r-fe-pil /tmp/r-fe-depths /tmp/r-ft /tmp/r-ft-ddp1 /tmp/r-auto; do
  python3 -c "import json,sys; m=json.load(open(sys.argv[1]+'/metrics.json')); print(sys.argv[1], m['val_accuracy'], m['val_accuracy_ci95'], m['train_seconds'], 's', 'train', m.get('train_images_per_s'), 'img/s', 'embed', m.get('embed_seconds'), 's', m.get('embed_images_per_s'), 'img/s', m['device'])" $r
done
[ -n "${SKIP_BENCH:-}" ] || t python3 -m benchmarks tutorial $D --device $DEV --json "$OUT/bench.json"
