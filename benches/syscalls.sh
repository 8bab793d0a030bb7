#!/usr/bin/env bash
# syscalls.sh - which system calls nginx and cutover make per proxied request,
# each in front of the same nginx origin (wrk -t1 -c64 keep-alive; BIG=1: 1 MiB
# bodies over 16 connections, like peers.sh's (d)). Counted with perf's
# syscall tracepoints on the proxy's processes and threads only.
#
#   bash benches/syscalls.sh                        # target/release/cutover
#   BIN=/tmp/old/cutover BIG=1 bash benches/syscalls.sh
#   CONNS=1 bash benches/syscalls.sh                # one connection, like peers.sh's (lat)
#
# Needs perf (Debian's linux-perf) with access to tracepoints (root), wrk,
# nginx and curl. Same ports and configurations as ab-vs-nginx.sh (it sources
# its set-up).
set -uo pipefail
BIN=${BIN:-target/release/cutover}
for c in perf wrk nginx curl; do command -v "$c" >/dev/null || { echo "syscalls.sh: needs $c" >&2; exit 1; }; done
[[ -x $BIN ]] || { echo "syscalls.sh: $BIN not found (cargo build --release)" >&2; exit 1; }
if [[ ${BIG:-0} == 1 ]]; then CONNS=${CONNS:-16} URL_PATH=/1m; else CONNS=${CONNS:-64} URL_PATH=/; fi
# The origin, the proxy configurations and cleanup, without the measuring loop.
eval "$(sed -n '/^T=\$(mktemp -d)/,/^nginx -c "\$T\/origin.conf"/p' "$(dirname "$0")/ab-vs-nginx.sh" |
  sed "s#\"\$(dirname \"\$0\")/#\"$(dirname "$0")/#")"

CALLS="read recvfrom readv write sendto writev sendmsg splice epoll_wait epoll_pwait epoll_ctl accept4 close
  setsockopt futex"
EVENTS=$(for c in $CALLS; do printf 'syscalls:sys_enter_%s,' "$c"; done)
measure() { # name url pids...
  local name=$1 url=$2 out r; shift 2
  wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null 2>&1
  perf stat -x, -e "${EVENTS%,}" -p "$(echo "$@" | tr ' ' ,)" -o "$T/$name.perf" -- sleep 4 &
  local stat=$!
  out=$(wrk -t1 -c"$CONNS" -d4s "$url" 2>&1)
  wait "$stat"
  r=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$name: $r requests; system calls per request:"
  awk -F, -v r="$r" '$1 + 0 > 0 {sub("syscalls:sys_enter_", "", $3); printf "  %-12s %8.3f\n", $3, $1 / r}' "$T/$name.perf"
}
nginx -c "$T/proxy.conf" & sleep 0.3
measure nginx "http://127.0.0.1:18182$URL_PATH" $(pgrep -P "$(cat "$T/px/nginx.pid")")
kill "$(cat "$T/px/nginx.pid")"; sleep 0.3
rm -f "$T/cutover-state.json"
RUST_LOG=warn "$BIN" serve --config "$T/cutover.yaml" >/dev/null 2>&1 & pid=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18190/ && break; sleep 0.1; done
measure cutover "http://127.0.0.1:18190$URL_PATH" "$pid"
kill "$pid"; wait "$pid" 2>/dev/null; pid=
