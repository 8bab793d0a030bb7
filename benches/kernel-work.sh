#!/usr/bin/env bash
# kernel-work.sh - what the kernel does per request for nginx and cutover as
# proxies in front of the same nginx origin (wrk -t1 -c64 keep-alive): TCP
# segments per request (nstat, machine-wide, so run it on a quiet machine) and
# the proxy's context switches per request, voluntary (its workers blocked in
# epoll_wait) and involuntary (preempted), from /proc/PID/task/*/status.
#
#   bash benches/kernel-work.sh                       # target/release/cutover
#   BIN=/tmp/old/cutover ROUNDS=3 bash benches/kernel-work.sh
#
# Same ports and configurations as ab-vs-nginx.sh (it sources its set-up).
set -uo pipefail
BIN=${BIN:-target/release/cutover}
for c in nstat wrk nginx curl; do command -v "$c" >/dev/null || { echo "kernel-work.sh: needs $c" >&2; exit 1; }; done
[[ -x $BIN ]] || { echo "kernel-work.sh: $BIN not found (cargo build --release)" >&2; exit 1; }
# The origin, the proxy configurations and cleanup, without the measuring loop.
eval "$(sed -n '/^T=\$(mktemp -d)/,/^nginx -c "\$T\/origin.conf"/p' "$(dirname "$0")/ab-vs-nginx.sh" |
  sed "s#\"\$(dirname \"\$0\")/#\"$(dirname "$0")/#")"

switches() { # voluntary and involuntary context switches summed over the PIDs' threads
  cat "${@/#//proc/}"/task/*/status 2>/dev/null |
    awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v + 0, n + 0}'
}
measure() { # name url pids...
  local name=$1 url=$2 v0 n0 v1 n1 out r; shift 2
  wrk -t1 -c64 -d1s "$url" >/dev/null 2>&1
  read -r v0 n0 < <(switches "$@"); nstat -n
  out=$(wrk -t1 -c64 -d4s "$url" 2>&1)
  read -r v1 n1 < <(switches "$@")
  r=$(echo "$out" | awk '/requests in/ {print $1}')
  nstat | awk -v n="$name" -v r="$r" -v v=$((v1 - v0)) -v i=$((n1 - n0)) '
    $1 == "TcpOutSegs" {s = $2} $1 == "IpExtOutOctets" {o = $2}
    END {printf "%-8s %8d req  segments %.2f/req  bytes %.0f/req  switches voluntary %.3f involuntary %.3f per req\n",
         n, r, s / r, o / r, v / r, i / r}'
}
for _ in $(seq "${ROUNDS:-2}"); do
  nginx -c "$T/proxy.conf" & sleep 0.3
  measure nginx http://127.0.0.1:18182/ $(pgrep -P "$(cat "$T/px/nginx.pid")")
  kill "$(cat "$T/px/nginx.pid")"; sleep 0.3
  rm -f "$T/cutover-state.json"
  RUST_LOG=warn "$BIN" serve --config "$T/cutover.yaml" >/dev/null 2>&1 & pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18190/ && break; sleep 0.1; done
  measure cutover http://127.0.0.1:18190/ "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null; pid=
done
