#!/usr/bin/env bash
# Short end-to-end run of the GPU recipe (profiles/gpu.yaml) on the embedded sample, then the figures:
# training images/s, FPS at 512² batch 1 fp32/fp16 (default model, DAS-Net, SegFormer-B0), val mIoU, and the
# seconds `aerialseg adapt --method all` takes on the teacher (AdaBN + TENT + self-training on one scene).
#
#   bench/gpu_check.sh [--tiny] [--oem DIR] [--keep DIR]
#
#   --tiny      CPU, CI size (64 px patches, one scene, one epoch each; under a minute on 2 cores);
#               also AERIALSEG_GPU_CHECK_TINY=1
#   --oem DIR   pretrain the teacher on this OpenEarthMap copy first (also AERIALSEG_OEM_ROOT)
#   --keep DIR  run in DIR and keep it (default: a temp dir, removed at the end)
# On one GPU the default run takes <= 8 min. Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINY="${AERIALSEG_GPU_CHECK_TINY:-0}"
OEM="${AERIALSEG_OEM_ROOT:-}"
KEEP=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) TINY=1; shift ;;
    --oem) OEM="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: $1: unknown option — fix: use --tiny, --oem DIR or --keep DIR" >&2; exit 2 ;;
  esac
done
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
else PY="python3"; fi
export PYTHONPATH="$REPO/pipeline${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "$KEEP" ]]; then WORK="$KEEP"; mkdir -p "$WORK"
else WORK="$(mktemp -d "${TMPDIR:-/tmp}/aerialseg-gpu-check.XXXXXX")"; trap 'rm -rf "$WORK"' EXIT; fi
if [[ -n "$OEM" ]]; then OEM="$(cd "$OEM" && pwd)"; fi

mkdir -p "$WORK/data/sample"
cp -r "$REPO/data/sample/labels" "$REPO/data/sample/scenes" "$WORK/data/sample/"
TINY_FLAG=()
if [[ "$TINY" == "1" ]]; then
  TINY_FLAG=(--tiny)
  mkdir -p "$WORK/data/sample/labels-tiny"
  cp "$REPO/data/sample/labels/dubai_tile2.json" "$WORK/data/sample/labels-tiny/"
fi
OEM_FLAG=()
if [[ -n "$OEM" ]]; then OEM_FLAG=(--oem "$OEM"); fi

start=$(date +%s)
"$PY" "$REPO/bench/gpu_check.py" params --out "$WORK/params.yaml" "${TINY_FLAG[@]}" "${OEM_FLAG[@]}"
cd "$WORK"
stage() { echo "+ aerialseg $*"; "$PY" -m aerialseg.cli "$@"; }
stage label-to-mask
stage tiles
stage split
stage augment
stage pretrain
stage train
stage distil
if [[ "$TINY" == "1" ]]; then TARGET=data/sample/scenes/dubai_tile2.tif; else TARGET=data/sample/scenes/dubai_tile6.tif; fi
stage adapt "$TARGET" --model models/default --out models/adapted --method all
"$PY" "$REPO/bench/gpu_check.py" speed "${TINY_FLAG[@]}" --json "$WORK/speed.json"
"$PY" "$REPO/bench/gpu_check.py" summary "$WORK"
echo "gpu_check: done in $(( $(date +%s) - start )) s (work dir $WORK)"
