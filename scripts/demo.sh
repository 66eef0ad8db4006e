#!/usr/bin/env bash
# make demo: start the trunk daemon on the bundled SmolLM2 on a private unix socket, wait until it
# answers (at most 180 s), run one split generation through it, then (at a terminal) open the chat
# app on it; stop the daemon when the chat quits. Without a terminal (CI, `make demo </dev/null`)
# the printed reply is the whole demo and the script exits 0.
# DEMO_MODEL=path/to/model serves another model (the tests use a tiny one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MODEL=${DEMO_MODEL:-smollm2}
TMP=$(mktemp -d)
SOCK="unix:$TMP/trunk.sock"
LOG="$TMP/trunkd.log"

"$VENV/bin/splitlm-trunkd" --model "$MODEL" --listen "$SOCK" >"$LOG" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

echo "starting splitlm-trunkd on $SOCK (log: $LOG) ..."
deadline=$((SECONDS + 180))
until "$VENV/bin/splitlm" info --trunk "$SOCK" >/dev/null 2>&1; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "splitlm-trunkd exited before answering; its log:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "splitlm-trunkd did not answer within 180 s; its log:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done

"$VENV/bin/splitlm" info --trunk "$SOCK"
echo
echo '$ splitlm generate --max-new-tokens 48 "Why is the sky blue?"'
"$VENV/bin/splitlm" generate --trunk "$SOCK" --max-new-tokens 48 "Why is the sky blue?"

# at a terminal, the chat app opens on the same daemon (ctrl+q quits, and the daemon stops);
# without one (CI, a pipe) the headless reply above is the whole demo
if [ -t 0 ] && [ -t 1 ]; then
  echo
  echo '$ splitlm chat   (ctrl+q quits)'
  "$VENV/bin/splitlm" chat --trunk "$SOCK"
else
  echo
  echo "(no terminal here: the chat app opens when make demo runs at one)"
fi
