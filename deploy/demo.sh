#!/usr/bin/env bash
# Runs the daemon on its built-in defaults (bundled sample video looped like a camera, bundled models, embedded
# MQTT broker on 127.0.0.1:1883) and prints every message it publishes, using mosquitto_sub as a subscriber
# would. Ctrl-C stops both.
set -euo pipefail
# The daemon turns ONNX Runtime's usage telemetry off itself; this keeps tools run from here quiet too.
export ORT_DISABLE_TELEMETRY=1
bin="${1:-target/release/emotiond}"
port="${EMOTIOND__MQTT__EMBEDDED_PORT:-1883}"

"$bin" validate
"$bin" run &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT INT TERM
for _ in $(seq 50); do
  (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
  kill -0 $daemon 2>/dev/null || { echo "emotiond exited; see the error above." >&2; exit 1; }
  sleep 0.2
done
echo "==> Subscribed to emotiond/# on 127.0.0.1:$port (Ctrl-C to stop)."
mosquitto_sub -h 127.0.0.1 -p "$port" -t 'emotiond/#' -v
