#!/usr/bin/env bash
# Memory (RSS) of cutover with N idle kept-alive client connections, and
# whether live traffic stays error-free meanwhile. Loopback only.
#   bash benches/idle-rss.sh            # N=10000
#   N=2000 bash benches/idle-rss.sh
#   BIN=/path/to/cutover bash benches/idle-rss.sh   # another build (A/B)
#   PAUSE=3 bash benches/idle-rss.sh     # wait 3 s after each 500 connections, so earlier
#                                        # ones are parked while later ones arrive (steady state)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10000}
PAUSE=${PAUSE:-0}
ulimit -n "$(ulimit -Hn)"  # the proxy and the client each need N + a few descriptors
BIN=${BIN:-}
if [ -z "$BIN" ]; then cargo build --release --quiet; BIN=target/release/cutover; fi
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

# Origin: a tiny keep-alive HTTP/1.1 server.
python3 benches/idle_clients.py origin 18701 &
pids+=($!)
cat > "$tmp/cutover.yaml" <<YAML
listen: { http: 127.0.0.1:18700 }
admin: { listen: 127.0.0.1:18702 }
state: { path: state.json }
limits: { header_read_timeout: 3600s, idle_timeout: 3600s, max_connections: $((N + 100)) }
sites:
  - name: bench
    hosts: ["*"]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:18701] }
YAML
RUST_LOG=warn "$BIN" serve --config "$tmp/cutover.yaml" &
pids+=($!)
sleep 1
python3 benches/idle_clients.py clients 18700 "${pids[1]}" "$N" "$PAUSE"
