#!/usr/bin/env bash
# Installs what emotiond needs on Debian 12 / Ubuntu 22.04+: system packages, a Rust toolchain when none is
# present, and the ONNX Runtime shared library (from the official `onnxruntime` wheel on PyPI) at
# /usr/local/lib/emotiond/libonnxruntime.so. Idempotent: a second run changes nothing.
# Run as root or with sudo. Set ORT_VERSION to use another ONNX Runtime release (>= 1.31: the API the binary uses).
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.31.1}"
ORT_DIR=/usr/local/lib/emotiond
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  build-essential pkg-config clang libclang-dev
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-libav gstreamer1.0-tools
  libgstrtspserver-1.0-dev
  libopencv-dev opencv-data
  mosquitto mosquitto-clients
  python3 python3-pip python3-venv ca-certificates curl
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> Installing system packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "==> System packages present."
fi
# The packaged mosquitto service would hold port 1883, which the embedded broker of the demo uses.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  echo "==> Note: the system mosquitto service is running on port 1883; the demo's embedded broker needs that port."
  echo "    Stop it (systemctl stop mosquitto) or run the demo with EMOTIOND__MQTT__BROKER=mqtt://127.0.0.1:1883."
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "==> Installing the Rust toolchain (rustup, stable)."
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
fi

if [ -f "$ORT_DIR/libonnxruntime.so" ] && [ "$(cat "$ORT_DIR/VERSION" 2>/dev/null)" = "$ORT_VERSION" ]; then
  echo "==> ONNX Runtime $ORT_VERSION present in $ORT_DIR."
else
  echo "==> Installing ONNX Runtime $ORT_VERSION into $ORT_DIR (from the onnxruntime wheel on PyPI)."
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "onnxruntime==$ORT_VERSION"
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/onnxruntime-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if "/capi/libonnxruntime.so" in n or n.endswith("ThirdPartyNotices.txt") or n.endswith("LICENSE")]
    for n in names:
        z.extract(n, sys.argv[1] + "/x")
PY
  $SUDO mkdir -p "$ORT_DIR"
  lib="$(find "$tmp"/x/onnxruntime/capi -name 'libonnxruntime.so.*' | sort | head -n1)"
  $SUDO install -m 0644 "$lib" "$ORT_DIR/$(basename "$lib")"
  $SUDO ln -sf "$(basename "$lib")" "$ORT_DIR/libonnxruntime.so"
  for f in "$tmp"/x/onnxruntime/LICENSE "$tmp"/x/onnxruntime-*.dist-info/LICENSE* "$tmp"/x/onnxruntime/ThirdPartyNotices.txt; do
    [ -f "$f" ] && $SUDO install -m 0644 "$f" "$ORT_DIR/" || true
  done
  echo "$ORT_VERSION" | $SUDO tee "$ORT_DIR/VERSION" >/dev/null
fi
echo "==> Dependencies ready."
