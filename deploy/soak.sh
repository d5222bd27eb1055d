#!/usr/bin/env bash
# Soak benchmark (not part of CI): runs the daemon on the looping sample video with the embedded broker for
# DURATION seconds (default 3600), samples its RSS and CPU time every INTERVAL seconds (default 60) into a CSV,
# and prints the RSS growth between the first and last sample.
#   deploy/soak.sh [binary] [duration_s] [interval_s]
set -euo pipefail
bin="${1:-target/release/emotiond}"
duration="${2:-3600}"
interval="${3:-60}"
out="${SOAK_CSV:-soak-$(date +%Y%m%d-%H%M%S).csv}"
port="${SOAK_PORT:-18833}"

log="${out%.csv}.log"
EMOTIOND__MQTT__EMBEDDED_PORT="$port" EMOTIOND__METRICS__LISTEN="127.0.0.1:0" "$bin" run 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
sleep 5
echo "elapsed_s,rss_kib,cpu_ticks,threads" > "$out"
start=$(date +%s)
while :; do
  now=$(date +%s); elapsed=$((now - start))
  kill -0 "$pid" 2>/dev/null || { echo "emotiond exited early; see $log" >&2; exit 1; }
  rss=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status)
  threads=$(awk '/^Threads:/ {print $2}' /proc/$pid/status)
  cpu=$(awk '{print $14 + $15}' /proc/$pid/stat)
  echo "$elapsed,$rss,$cpu,$threads" >> "$out"
  [ "$elapsed" -ge "$duration" ] && break
  sleep "$interval"
done
first=$(sed -n 2p "$out" | cut -d, -f2); last=$(tail -n1 "$out" | cut -d, -f2)
echo "RSS: first sample ${first} KiB, last ${last} KiB, growth $((last - first)) KiB over ${duration} s (samples in $out)"
