#!/usr/bin/env python3
"""Switch acknowledgement latency of a running cutover, fsync included.

Times N alternating switches (POST /v1/sites/SITE/switch {"to": ..., "force": true})
over one kept-alive HTTP/1.1 connection to the admin API, from sending the
request to reading the whole answer. cutover answers a switch only after the
new state is saved: temporary file, fsync, rename, fsync of the directory.

For reference it also times, on the same connection, N reads of the site
(GET /v1/sites/SITE: the admin API without a save), and, when --state is
given, N bare saves done by this script in the state file's directory
(write + fsync + rename + directory fsync: the disk's floor).

Usually started by `ACK=1 bash benches/switch-under-load.sh` (or ACK=only),
which sets up origins and a cutover with its state file under /tmp. Alone:

    python3 benches/switch_ack.py --admin 127.0.0.1:18803 --site bench \
        [--n 200] [--state /tmp/.../state.json] [--token-file FILE]

With --loop switch|control it is instead the background loop of
switch-under-load.sh (see --help).

Standard library only. Loopback only.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import time


def pct(sorted_ms, p):
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_ms) - 1, int(-(-p * len(sorted_ms) // 100)) - 1))
    return sorted_ms[k]


def summary(label, samples_ms):
    s = sorted(samples_ms)
    return (
        f"| {label} | {len(s)} | {statistics.median(s):.2f} | {pct(s, 90):.2f} | "
        f"{pct(s, 99):.2f} | {s[0]:.2f} | {s[-1]:.2f} |"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--admin", required=True, help="host:port of the admin API (127.0.0.1 only)")
    ap.add_argument("--site", default="bench")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--state", help="the state file, for the bare-save reference")
    ap.add_argument("--token-file")
    ap.add_argument("--loop", choices=["switch", "control"],
                    help="instead of timing: switch blue<->green (or only GET the site, 'control') "
                         "every --interval seconds until --stop-file exists, appending each status to --codes")
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--stop-file")
    ap.add_argument("--codes")
    args = ap.parse_args()
    host, _, port = args.admin.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        sys.exit("--admin must be on 127.0.0.1")

    headers = {"content-type": "application/json"}
    if args.token_file:
        with open(args.token_file) as f:
            headers["authorization"] = "Bearer " + f.read().strip()
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)

    def call(method, path, body=None):
        t0 = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        dt = (time.perf_counter() - t0) * 1000.0
        if resp.status != 200:
            sys.exit(f"{method} {path} -> {resp.status}: {data[:300]!r}")
        return dt, data

    site_path = f"/v1/sites/{args.site}"
    if args.loop:
        run_loop(args, conn, headers, site_path)
        return
    _, data = call("GET", site_path)
    site = json.loads(data)
    targets = sorted(site["targets"])
    if len(targets) < 2:
        sys.exit(f"site {args.site} needs two targets, has {targets}")
    live = site["live"]
    other = next(t for t in targets if t != live)

    # Warm-up: the connection, and one switch each way.
    for to in (other, live):
        call("POST", site_path + "/switch", json.dumps({"to": to, "force": True}))

    reads = [call("GET", site_path)[0] for _ in range(args.n)]

    switches = []
    to = other
    for _ in range(args.n):
        dt, data = call("POST", site_path + "/switch", json.dumps({"to": to, "force": True}))
        if json.loads(data)["live"] != to:
            sys.exit(f"switch to {to} answered live={json.loads(data)['live']}")
        switches.append(dt)
        to = live if to == other else other
    _, data = call("GET", site_path)
    final = json.loads(data)["live"]
    expected = other if args.n % 2 == 1 else live
    if final != expected:
        sys.exit(f"after {args.n} switches live is {final}, expected {expected}")
    conn.close()

    saves = []
    if args.state:
        d = os.path.dirname(os.path.abspath(args.state))
        with open(args.state, "rb") as f:
            body = f.read()
        tmp, dst = os.path.join(d, "ack-floor.tmp"), os.path.join(d, "ack-floor.json")
        for _ in range(args.n):
            t0 = time.perf_counter()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, dst)
            dfd = os.open(d, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
            saves.append((time.perf_counter() - t0) * 1000.0)
        os.remove(dst)

    print(f"switch acknowledgement, {args.n} alternating switches {other}<->{live}, "
          f"one kept-alive connection to {args.admin}, state file {args.state or '(not given)'}")
    print()
    print("| what | n | median ms | p90 ms | p99 ms | min ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    print(summary("POST switch (acknowledged after fsync)", switches))
    print(summary("GET site (admin API, no save)", reads))
    if saves:
        print(summary(f"bare save by this script ({len(body)} B, 2 fsyncs)", saves))


def run_loop(args, conn, headers, site_path):
    """The switch loop of switch-under-load.sh: one kept-alive admin connection,
    so the loop costs the machine little besides the switches themselves."""
    to = "green"
    with open(args.codes, "a") as codes:
        while not os.path.exists(args.stop_file):
            try:
                if args.loop == "switch":
                    conn.request("POST", site_path + "/switch",
                                 body=json.dumps({"to": to, "force": True}), headers=headers)
                else:
                    conn.request("GET", site_path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                codes.write(f"{resp.status}\n")
            except (OSError, http.client.HTTPException) as e:
                codes.write(f"error {e!r}\n")
                conn.close()
            codes.flush()
            to = "blue" if to == "green" else "green"
            time.sleep(args.interval)


if __name__ == "__main__":
    main()
