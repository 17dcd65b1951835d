#!/usr/bin/env bash
# Idle `coevo broker` RSS: start it, wait 3 s, sum VmRSS of the broker and its front processes.
# Usage: broker_rss.sh BIN FRONTS
set -euo pipefail
BIN=$1; FRONTS=$2
d=$(mktemp -d)
"$(dirname "$BIN")/coevo" fleet password coordinator --credentials "$d/credentials.toml" >/dev/null 2>&1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listen = "127.0.0.1:%s"\ncredentials = "%s/credentials.toml"\nfront_processes = %s\n' "$port" "$d" "$FRONTS" > "$d/broker.toml"
"$BIN" broker --config "$d/broker.toml" >"$d/log" 2>&1 &
pid=$!
sleep 3
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
main=$(rss $pid)
kids=0; n=0
for c in $(pgrep -P $pid || true); do kids=$((kids + $(rss $c))); n=$((n+1)); done
echo "$(basename "$BIN") front_processes=$FRONTS: broker ${main} kB; $n front processes ${kids} kB total"
kill $pid; wait $pid 2>/dev/null || true
