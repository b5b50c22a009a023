#!/usr/bin/env bash
# Exports the backbone of a training run in every format (or the ones given).
#
#   export/export_backbone.sh MODEL_DIR [EXPORT_ROOT] [FORMAT ...]
#
# Writes EXPORT_ROOT/<format> (default EXPORT_ROOT: MODEL_DIR/export), replacing earlier
# exports (each one atomically). Stops at the first error (exit status 2 on bad input).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 MODEL_DIR [EXPORT_ROOT] [FORMAT ...]" >&2
  exit 2
fi
model_dir="$1"
export_root="${2:-${model_dir}/export}"
shift $(( $# >= 2 ? 2 : 1 ))
formats=("$@")
if [[ ${#formats[@]} -eq 0 ]]; then
  formats=(saved_model hub keras detectron2 torchvision)
fi

for format in "${formats[@]}"; do
  python -m tfmochi.export --model_dir="${model_dir}" --format="${format}" \
    --export_dir="${export_root}/${format}" --overwrite
done
