#!/usr/bin/env bash
# make demo: start the trunk daemon on the bundled SmolLM2 on a private unix socket, wait until it
# answers, run one split generation through it, stop the daemon.
set -euo pipefail
VENV=${VENV:-.venv}
tmp=$(mktemp -d)
sock="unix:$tmp/trunk.sock"
"$VENV/bin/splitlm-trunkd" --model smollm2 --listen "$sock" >"$tmp/trunkd.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
echo "starting splitlm-trunkd (log: $tmp/trunkd.log) ..."
for _ in $(seq 1 360); do
  "$VENV/bin/splitlm" info --trunk "$sock" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "the daemon exited:"; tail -n 20 "$tmp/trunkd.log"; exit 1; }
  sleep 0.5
done
"$VENV/bin/splitlm" info --trunk "$sock"
echo
echo '$ splitlm generate "Why is the sky blue?"'
"$VENV/bin/splitlm" generate --trunk "$sock" --max-new-tokens 64 "Why is the sky blue?"
