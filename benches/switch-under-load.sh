#!/usr/bin/env bash
# Throughput and tail latency of cutover under load, with and without
# blue<->green switches every 250 ms. Loopback (127.0.0.1) only.
#
#   bash benches/switch-under-load.sh              # plain run, then switching run
#   ACK=1 bash benches/switch-under-load.sh        # ... then benches/switch_ack.py on the same proxy
#   ACK=only bash benches/switch-under-load.sh     # only benches/switch_ack.py
#
# Setup: the release binary; an nginx origin (python3 if nginx is missing)
# answering "blue\n" on one port and "green\n" on another; one cutover site
# `bench` with targets blue and green (one endpoint each, TCP health check);
# the state file in a temp dir under /tmp (on the real disk, so every switch
# pays its fsyncs).
# Load: wrk -t1 -c64 -d10s --latency, twice: once plain, once while a
# background loop switches blue<->green through the admin API every 250 ms
# (POST /v1/sites/bench/switch {"to":...,"force":true}; by default from
# `switch_ack.py --loop` on one kept-alive admin connection, LOOP=curl for a
# curl process and a new connection per switch; the 250 ms sleep comes after
# each answer).
# Prints req/s, p50, p99, max, errors (wrk's socket errors and non-2xx/3xx),
# the requests the proxy served per target, the switches done, and
# p99(switching)/p99(plain).
#
# Environment: PORT (proxy; origin blue = PORT+1, green = PORT+2, admin =
# PORT+3; default 18800), DURATION (10s), CONNS (64), INTERVAL (0.25),
# REPS (pairs of plain + switching runs, 1), CONTROL=1 (add a third run per
# pair whose loop GETs /v1/sites/bench instead of switching: what the loop's
# processes cost by themselves), LOOP (python or curl), N (switches for switch_ack.py,
# 200), VERBOSE=1 (print wrk's full output too), BIN (the cutover binary,
# target/release/cutover; another build for an A/B).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-18800}
BLUE_PORT=$((PORT + 1))
GREEN_PORT=$((PORT + 2))
ADMIN_PORT=$((PORT + 3))
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
INTERVAL=${INTERVAL:-0.25}
ACK=${ACK:-0}
LOOP=${LOOP:-python}
REPS=${REPS:-1}
ADMIN=http://127.0.0.1:$ADMIN_PORT

for p in "$PORT" "$BLUE_PORT" "$GREEN_PORT" "$ADMIN_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port 127.0.0.1:$p is in use; set PORT to another base" >&2
    exit 1
  fi
done
command -v curl >/dev/null || { echo "needs curl" >&2; exit 1; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
if [ "$ACK" != only ]; then
  command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
fi

cargo build --release --quiet

tmp=$(mktemp -d /tmp/cutover-switch.XXXXXX)
pids=()
cleanup() {
  touch "$tmp/stop" 2>/dev/null || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- origin: blue on BLUE_PORT, green on GREEN_PORT ------------------------
if command -v nginx >/dev/null; then
  origin="nginx $(nginx -v 2>&1 | sed 's|.*/||'), 1 worker"
  mkdir -p "$tmp/nginx"
  chmod 755 "$tmp"
  chmod 1777 "$tmp/nginx" # workers may drop to nobody
  cat >"$tmp/origin.conf" <<EOF
worker_processes 1;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx; proxy_temp_path $tmp/nginx; fastcgi_temp_path $tmp/nginx;
  uwsgi_temp_path $tmp/nginx; scgi_temp_path $tmp/nginx;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server { listen 127.0.0.1:$BLUE_PORT; location / { default_type text/plain; return 200 "blue\n"; } }
  server { listen 127.0.0.1:$GREEN_PORT; location / { default_type text/plain; return 200 "green\n"; } }
}
EOF
  nginx -c "$tmp/origin.conf" -g 'daemon off;' 2>"$tmp/origin.log" &
  pids+=($!)
else
  origin="python3 http.server (HTTP/1.1, threads)"
  cat >"$tmp/origin.py" <<'EOF'
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def serve(port, body):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()

threading.Thread(target=serve, args=(int(sys.argv[1]), b"blue\n"), daemon=True).start()
serve(int(sys.argv[2]), b"green\n")
EOF
  python3 "$tmp/origin.py" "$BLUE_PORT" "$GREEN_PORT" 2>"$tmp/origin.log" &
  pids+=($!)
fi

# --- cutover ----------------------------------------------------------------
# No health path: each endpoint gets a TCP-connect check.
cat >"$tmp/cutover.yaml" <<YAML
listen: { http: 127.0.0.1:$PORT }
admin: { listen: 127.0.0.1:$ADMIN_PORT }
state: { path: $tmp/state.json }
sites:
  - name: bench
    hosts: ["*"]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:$BLUE_PORT], version: v1 }
      green: { endpoints: [127.0.0.1:$GREEN_PORT], version: v2 }
    health: { interval: 1s, healthy_threshold: 1 }
YAML
BIN=${BIN:-target/release/cutover}
"$BIN" check --config "$tmp/cutover.yaml" >/dev/null
RUST_LOG=warn "$BIN" serve --config "$tmp/cutover.yaml" 2>"$tmp/cutover.log" &
cutover_pid=$!
pids+=("$cutover_pid")

site_healthy() { # both targets' endpoints healthy?
  curl -sf "$ADMIN/v1/sites/bench" | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = all(e.get("healthy") is True for t in ("blue", "green") for e in s["targets"][t]["endpoints"])
sys.exit(0 if ok else 1)' 2>/dev/null
}
for _ in $(seq 100); do
  site_healthy && break
  sleep 0.1
done
site_healthy || { echo "cutover did not come up healthy; log:" >&2; cat "$tmp/cutover.log" >&2; exit 1; }

switch_to() { # prints the admin API's status code
  curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -d "{\"to\":\"$1\",\"force\":true}" "$ADMIN/v1/sites/bench/switch"
}
# Sanity: a switch changes what the proxy serves.
[ "$(switch_to green)" = 200 ] && [ "$(curl -s "http://127.0.0.1:$PORT/")" = green ] &&
  [ "$(switch_to blue)" = 200 ] && [ "$(curl -s "http://127.0.0.1:$PORT/")" = blue ] ||
  { echo "switch sanity check failed" >&2; exit 1; }

echo "# switch-under-load: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}' || true)"
if [[ $BIN == target/release/cutover ]]; then
  echo "cutover $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates Cargo.toml 2>/dev/null || echo ' + uncommitted changes'); origin: $origin"
else
  echo "cutover $BIN; origin: $origin"
fi
echo "state file: $tmp/state.json ($(df -T "$tmp" | awk 'NR==2{print $2}'))"
echo

if [ "$ACK" != only ]; then
  # cutover_requests_total summed as "blue_2xx green_2xx everything_else".
  requests_by_target() {
    curl -s "$ADMIN/metrics" | awk '/^cutover_requests_total\{/ {
      if ($0 ~ /code="2xx"/ && $0 ~ /target="blue"/) b += $NF
      else if ($0 ~ /code="2xx"/ && $0 ~ /target="green"/) g += $NF
      else o += $NF } END { printf "%d %d %d\n", b, g, o }'
  }
  # wrk output -> "rps p50_ms p99_ms max_ms socket_errors non2xx"
  parse_wrk() {
    python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    n, u = float(m.group(1)), m.group(2)
    return n * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[u]
pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", text, re.M))
mx = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", text, re.M).group(1)
rps = re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)
se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
sock = sum(int(x) for x in se.groups()) if se else 0
n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(f"{float(rps):.0f} {ms(pct['50']):.2f} {ms(pct['99']):.2f} {ms(mx):.1f} {sock} {int(n2.group(1)) if n2 else 0}")
EOF
  }
  # One wrk run named $1; $2 = no (plain), switch (the switch loop) or control
  # (the same loop doing GET /v1/sites/bench: the loop's cost without switches).
  # Prints its table row.
  run_one() {
    local name=$1 loop=$2 b0 g0 o0 b1 g1 o1 rps p50 p99 max sock n2 switcher switches=-
    read -r b0 g0 o0 <<<"$(requests_by_target)"
    if [ "$loop" != no ]; then
      : >"$tmp/switch-codes"
      rm -f "$tmp/stop"
      if [ "$LOOP" = curl ]; then
        (
          to=green
          while [ ! -e "$tmp/stop" ]; do
            if [ "$loop" = switch ]; then
              switch_to "$to" >>"$tmp/switch-codes" || true
            else
              curl -s -o /dev/null -w '%{http_code}' "$ADMIN/v1/sites/bench" >>"$tmp/switch-codes" || true
            fi
            echo >>"$tmp/switch-codes"
            if [ "$to" = green ]; then to=blue; else to=green; fi
            sleep "$INTERVAL"
          done
        ) &
      else
        python3 benches/switch_ack.py --admin "127.0.0.1:$ADMIN_PORT" --site bench --loop "$loop" \
          --interval "$INTERVAL" --stop-file "$tmp/stop" --codes "$tmp/switch-codes" &
      fi
      switcher=$!
      pids+=("$switcher")
    fi
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$PORT/" >"$tmp/wrk-$name.txt"
    if [ "$loop" != no ]; then
      touch "$tmp/stop"
      wait "$switcher" || true
      switches="$(grep -c '^200$' "$tmp/switch-codes" || true)/$(grep -c . "$tmp/switch-codes" || true)"
      [ "$loop" = control ] && switches="($switches GETs)"
      [ "$(switch_to blue)" = 200 ] || true # the next run starts on blue
    fi
    read -r b1 g1 o1 <<<"$(requests_by_target)"
    read -r rps p50 p99 max sock n2 <<<"$(parse_wrk "$tmp/wrk-$name.txt")"
    echo "$p99 $rps" >"$tmp/result-$name"
    echo "| $name | $rps | $p50 | $p99 | $max | $sock | $n2 | $((b1 - b0)) / $((g1 - g0)) / $((o1 - o0)) | $switches |"
  }

  # Warm-up: fills the proxy's upstream pools for both targets.
  wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PORT/" >/dev/null
  switch_to green >/dev/null
  wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PORT/" >/dev/null
  switch_to blue >/dev/null

  echo "wrk -t1 -c$CONNS -d$DURATION --latency; $REPS pair(s) of runs, plain then switching. In a switching"
  echo "run a loop switches blue<->green (force) through the admin API, sleeping ${INTERVAL}s after each answer."
  echo "'served b/g/other' = requests the proxy counted during the run: blue 2xx / green 2xx / any other code."
  echo
  echo "| run | req/s | p50 ms | p99 ms | max ms | socket errors | non-2xx/3xx | served b/g/other | switches ok/sent |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for rep in $(seq "$REPS"); do
    run_one "plain-$rep" no
    run_one "switching-$rep" switch
    if [ -n "${CONTROL:-}" ]; then run_one "control-$rep" control; fi
  done
  echo
  for rep in $(seq "$REPS"); do
    read -r pp pr <"$tmp/result-plain-$rep"
    read -r sp sr <"$tmp/result-switching-$rep"
    python3 -c 'import sys; r, pp, sp, pr, sr = sys.argv[1], *map(float, sys.argv[2:])
print(f"pair {r}: p99(switching)/p99(plain) = {sp / pp:.2f}; req/s(switching)/req/s(plain) = {sr / pr:.2f}")' \
      "$rep" "$pp" "$sp" "$pr" "$sr"
    if [ -n "${CONTROL:-}" ]; then
      read -r cp cr <"$tmp/result-control-$rep"
      python3 -c 'import sys; r, pp, cp, pr, cr = sys.argv[1], *map(float, sys.argv[2:])
print(f"        p99(control)/p99(plain) = {cp / pp:.2f}; req/s(control)/req/s(plain) = {cr / pr:.2f}")' \
        "$rep" "$pp" "$cp" "$pr" "$cr"
    fi
  done
  if [ -n "${VERBOSE:-}" ]; then
    for f in "$tmp"/wrk-*.txt; do echo "--- $(basename "$f") ---"; cat "$f"; done
  fi
fi

if [ "$ACK" != 0 ]; then
  echo
  python3 benches/switch_ack.py --admin "127.0.0.1:$ADMIN_PORT" --site bench --n "${N:-200}" --state "$tmp/state.json"
fi

if ! kill -0 "$cutover_pid" 2>/dev/null; then
  echo "cutover exited during the run; log:" >&2
  cat "$tmp/cutover.log" >&2
  exit 1
fi
