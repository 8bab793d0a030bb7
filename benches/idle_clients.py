#!/usr/bin/env python3
"""Memory of a proxy holding N idle kept-alive client connections, and
whether live traffic on other connections stays error-free meanwhile.

Runs its own keep-alive origin (asyncio) on ORIGIN_PORT, opens N client
connections to the proxy on PROXY_PORT, makes one request on each, keeps them
idle, measures the proxy's RSS, sends live traffic, then reuses every idle
connection once more. Loopback only.

usage: idle_clients.py origin ORIGIN_PORT          (run the origin)
       idle_clients.py clients PROXY_PORT PROXY_PID N PAUSE   (PAUSE: seconds to wait after each 500)
"""
import asyncio
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


async def origin(port):
    async def serve(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(RESPONSE)
                await writer.drain()
        except Exception:  # noqa: BLE001 - a closed connection ends the loop
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def one_request(reader, writer):
    writer.write(REQUEST)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def open_idle(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer, await one_request(reader, writer)


async def live_traffic(port, requests, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(requests):
        try:
            if await one_request(reader, writer) != 200:
                errors.append("non-200")
        except Exception as e:  # noqa: BLE001 - any failure counts
            errors.append(repr(e))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def clients(port, pid, n, pause):
    before = rss_kib(pid)
    conns, failures = [], []
    for start in range(0, n, 500):
        batch = await asyncio.gather(*(open_idle(port) for _ in range(min(500, n - start))), return_exceptions=True)
        for r in batch:
            (failures if isinstance(r, BaseException) else conns).append(r)
        await asyncio.sleep(pause)
    await asyncio.sleep(2)
    during = rss_kib(pid)
    errors = []
    await asyncio.gather(*(live_traffic(port, 500, errors) for _ in range(8)))
    reused = await asyncio.gather(*(one_request(r, w) for r, w, _ in conns), return_exceptions=True)
    ok = sum(1 for s in reused if s == 200)
    print(f"idle connections opened: {len(conns)} of {n} (failures: {len(failures)} {failures[:2]})")
    print(f"proxy RSS before: {before} KiB, with {len(conns)} idle: {during} KiB")
    print(f"per idle connection: {(during - before) / max(1, len(conns)):.1f} KiB")
    print(f"live traffic meanwhile: 4000 requests on 8 connections, errors: {len(errors)} {errors[:3]}")
    print(f"idle connections still usable afterwards: {ok}/{len(conns)}")


if sys.argv[1] == "origin":
    asyncio.run(origin(int(sys.argv[2])))
else:
    asyncio.run(clients(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
