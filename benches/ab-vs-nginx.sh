#!/usr/bin/env bash
# ab-vs-nginx.sh - alternating A/B rounds of cutover builds and nginx as a proxy,
# each in front of the same nginx origin on 127.0.0.1, with the proxy's user and
# system CPU per request (from /proc/PID/stat). On a noisy shared machine,
# rounds that alternate in one session compare builds better than two separate
# peers.sh runs do.
#
#   bash benches/ab-vs-nginx.sh                          # target/release/cutover vs nginx
#   ROUNDS=5 bash benches/ab-vs-nginx.sh /tmp/old/cutover target/release/cutover
#   CLOSE=1 bash benches/ab-vs-nginx.sh                  # a new connection per request
#   ARGS="-t1 -c1 -d4s" bash benches/ab-vs-nginx.sh      # one connection (latency)
#   BIG=1 bash benches/ab-vs-nginx.sh                    # 1 MiB bodies over 16 connections (peers.sh's (d))
#
# nginx runs 2 workers with upstream keep-alive, configured as in peers.sh, and
# like every process here in the script's session: a daemon's own session would
# be its own scheduling autogroup (kernel.sched_autogroup_enabled), a CPU share
# apart from wrk's and cutover's.
# Ports: origin 18181, nginx 18182, cutover 18190 (admin 18991).
# Needs nginx, wrk, curl (installed with apt-get when missing, as root).
set -uo pipefail

if [[ ${BIG:-0} == 1 ]]; then
  ARGS=${ARGS:-"-t1 -c16 -d5s"} URL_PATH=/1m WARM_CONNS=16
else
  ARGS=${ARGS:-"-t1 -c64 -d5s"} URL_PATH=/ WARM_CONNS=64
fi
HDR=(); [[ ${CLOSE:-0} == 1 ]] && HDR=(-H "Connection: close")
BINS=("${@:-target/release/cutover}")
missing=()
for c in nginx wrk curl; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
if ((${#missing[@]})); then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; fi
for b in "${BINS[@]}"; do [[ -x $b ]] || { echo "ab-vs-nginx.sh: $b not found (cargo build --release)" >&2; exit 1; }; done

T=$(mktemp -d)
pid=
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null
  for f in "$T/nginx.pid" "$T/px/nginx.pid"; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null; done
  sleep 0.3; rm -rf "$T"
}
trap cleanup EXIT
mkdir -p "$T/px" "$T/www"
head -c 1048576 /dev/zero | tr '\0' 'x' >"$T/www/1m"
cat >"$T/origin.conf" <<EOF
worker_processes 1; daemon off; pid $T/nginx.pid; error_log $T/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $T; proxy_temp_path $T; fastcgi_temp_path $T; uwsgi_temp_path $T; scgi_temp_path $T;
  keepalive_timeout 300s; keepalive_requests 100000000; sendfile on; tcp_nopush on; tcp_nodelay on;
  server { listen 127.0.0.1:18181; root $T/www;
    location = /1m { default_type application/octet-stream; }
    location / { default_type text/plain; return 200 "ok\n"; } } }
EOF
cat >"$T/proxy.conf" <<EOF
worker_processes 2; daemon off; pid $T/px/nginx.pid; error_log $T/px/error.log warn;
events { worker_connections 16384; }
http { access_log off; client_body_temp_path $T/px; proxy_temp_path $T/px; fastcgi_temp_path $T/px; uwsgi_temp_path $T/px; scgi_temp_path $T/px;
  keepalive_timeout 300s; keepalive_requests 100000000;
  upstream origin { server 127.0.0.1:18181; keepalive 1024; keepalive_requests 100000000; keepalive_timeout 300s; }
  server { listen 127.0.0.1:18182 backlog=4096;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto \$scheme; proxy_max_temp_file_size 0; } } }
EOF
# The same cutover configuration peers.sh runs, pointed at this origin.
sed -e 's/{listen}/127.0.0.1:18190/' -e 's/{origin}/127.0.0.1:18181/' -e "s#{tmp}#$T#" \
  "$(dirname "$0")/peers-cutover.yaml.tmpl" >"$T/cutover.yaml"
nginx -c "$T/origin.conf" & sleep 0.3

# user and system clock ticks summed over PIDs
ticks() { local u=0 s=0 a b; for p in "$@"; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }

# name url pids...: one warm-up second, then one measured run
measure() {
  local name=$1 url=$2 u0 s0 u1 s1 out; shift 2
  wrk -t1 -c"$WARM_CONNS" -d1s "${HDR[@]}" "$url" >/dev/null 2>&1
  read -r u0 s0 < <(ticks "$@")
  out=$(wrk $ARGS "${HDR[@]}" --latency "$url" 2>&1)
  read -r u1 s1 < <(ticks "$@")
  echo "$out" | awk -v n="$name" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" '
    /requests in/ {r = $1} /Requests\/sec/ {rps = $2} $1 == "50%" {p50 = $2} $1 == "99%" {p99 = $2}
    /Socket errors|Non-2xx/ {err = err " " $0}
    END {printf "%-28s req/s %8.0f  user %5.2f µs/req  sys %5.2f µs/req  req/CPU-s %7.0f  p50 %s  p99 %s%s\n",
         n, rps, u * 1e6 / hz / r, s * 1e6 / hz / r, r * hz / (u + s), p50, p99, err}'
}

echo "wrk $ARGS ${HDR[*]}; ${ROUNDS:-3} rounds"
for r in $(seq "${ROUNDS:-3}"); do
  nginx -c "$T/proxy.conf" & sleep 0.3
  measure "round $r nginx" "http://127.0.0.1:18182$URL_PATH" $(pgrep -P "$(cat "$T/px/nginx.pid")")
  kill "$(cat "$T/px/nginx.pid")"; sleep 0.3
  for b in "${BINS[@]}"; do
    rm -f "$T/cutover-state.json"
    RUST_LOG=warn "$b" serve --config "$T/cutover.yaml" >/dev/null 2>&1 & pid=$!
    for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18190/ && break; sleep 0.1; done
    measure "round $r $b" "http://127.0.0.1:18190$URL_PATH" "$pid"
    kill "$pid"; wait "$pid" 2>/dev/null; pid=
  done
done
