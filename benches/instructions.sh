#!/usr/bin/env bash
# instructions.sh - user-space instructions per proxied request, counted by
# valgrind's callgrind: repeatable to a fraction of a percent on a noisy shared
# machine, where req/s moves by 10-20 % from run to run. It answers "did this
# change make the hot path cheaper?", not "how fast is it?" (the kernel's share,
# about 60 % of cutover's CPU on loopback, is not counted).
#
# Starts an nginx origin on 127.0.0.1:18181 (`return 200 "ok\n"`, like
# peers.sh), cutover under callgrind on 127.0.0.1:18190 in front of it, warms
# up, zeroes the counters, sends WRK_ARGS of small GETs with wrk, dumps, and
# prints instructions per request (total and the top functions).
#
#   bash benches/instructions.sh                 # target/release/cutover
#   BIN=/tmp/old/cutover bash benches/instructions.sh   # another build, for A/B
#   WRK_ARGS="-t1 -c8 -d5s" TOP=40 bash benches/instructions.sh
#   OUT=/tmp/cg.out bash benches/instructions.sh   # keep the dump for callgrind_annotate
#   CLOSE=1 bash benches/instructions.sh            # a new connection per request (peers.sh's (c))
#   PROXY=nginx bash benches/instructions.sh       # nginx as the proxy, counted the same way
#
# Needs valgrind, nginx, wrk, curl (installed with apt-get when missing, as root).
set -euo pipefail

BIN=${BIN:-target/release/cutover}
WRK_ARGS=${WRK_ARGS:-"-t1 -c8 -d5s"}
TOP=${TOP:-25}
HDR=(); [[ ${CLOSE:-0} == 1 ]] && HDR=(-H "Connection: close")
[[ -x $BIN ]] || { echo "instructions.sh: $BIN not found (cargo build --release)" >&2; exit 1; }
missing=()
for pair in valgrind:valgrind nginx:nginx wrk:wrk curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

T=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $T/nginx.pid ]] && kill "$(cat "$T/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$T"
}
trap cleanup EXIT

cat >"$T/origin.conf" <<EOF
worker_processes 1;
daemon on;
pid $T/nginx.pid;
error_log $T/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $T; proxy_temp_path $T; fastcgi_temp_path $T; uwsgi_temp_path $T; scgi_temp_path $T;
  keepalive_timeout 300s; keepalive_requests 100000000;
  server {
    listen 127.0.0.1:18181;
    location / { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF
nginx -c "$T/origin.conf"

# The same cutover configuration peers.sh runs, pointed at this origin.
sed -e 's/{listen}/127.0.0.1:18190/' -e 's/{origin}/127.0.0.1:18181/' -e "s#{tmp}#$T#" \
  "$(dirname "$0")/peers-cutover.yaml.tmpl" >"$T/cutover.yaml"
# PROXY=nginx: nginx as the proxy instead (one worker in the foreground, set up as peers.sh sets it up).
mkdir -p "$T/proxy"
cat >"$T/proxy.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $T/proxy/nginx.pid;
error_log $T/proxy/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $T/proxy; proxy_temp_path $T/proxy; fastcgi_temp_path $T/proxy; uwsgi_temp_path $T/proxy; scgi_temp_path $T/proxy;
  keepalive_timeout 300s; keepalive_requests 100000000;
  upstream origin { server 127.0.0.1:18181; keepalive 1024; keepalive_requests 100000000; keepalive_timeout 300s; }
  server {
    listen 127.0.0.1:18190;
    location / {
      proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
EOF
if [[ ${PROXY:-cutover} == nginx ]]; then
  valgrind --tool=callgrind --callgrind-out-file="$T/cg.out" nginx -c "$T/proxy.conf" >"$T/proxy.log" 2>&1 &
else
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$T/cg.out" "$BIN" serve --config "$T/cutover.yaml" \
    >"$T/cutover.log" 2>&1 &
fi
pids+=($!)
for _ in $(seq 150); do curl -s -o /dev/null http://127.0.0.1:18190/ && break; sleep 0.2; done
# shellcheck disable=SC2086
wrk $WRK_ARGS "${HDR[@]}" http://127.0.0.1:18190/ >/dev/null
callgrind_control -z "${pids[0]}" >/dev/null
# shellcheck disable=SC2086
requests=$(wrk $WRK_ARGS "${HDR[@]}" http://127.0.0.1:18190/ | awk '/requests in/ { print $1 }')
callgrind_control -d "${pids[0]}" >/dev/null
sleep 1
dump=$(ls "$T"/cg.out.* | head -1)
total=$(awk '/^summary:/ { print $2 }' "$dump")
[[ -n ${OUT:-} ]] && cp "$dump" "$OUT"
echo "requests: $requests"
echo "instructions per request: $((total / requests))"
echo
echo "top functions (self, instructions per request):"
callgrind_annotate --threshold=100 --auto=no "$dump" 2>/dev/null \
  | awk -v n="$requests" -v t="$total" '/^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
      c = $1; gsub(",", "", c); c += 0; if (c > t * 0.9) next   # the thread entry points, not self cost
      line = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line); sub(/ \[[^]]*\]$/, "", line)
      printf "%8d  %s\n", c / n, line }' \
  | sed 's|/root/.cargo/registry/src/[^/]*/||; s|/rustc/[0-9a-f]*/library/||' | sort -rn | head -n "$TOP"
