#!/usr/bin/env python3
"""Opens N kept-alive client connections to a proxy on 127.0.0.1, makes one
request on each, keeps them idle, and meanwhile checks that live traffic on
other connections stays error-free. Prints the proxy's RSS before and after.

usage: idle_clients.py PROXY_PORT PROXY_PID N
"""
import asyncio
import sys


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"


async def one_request(reader, writer):
    writer.write(REQUEST)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def idle_client(port, opened, hold):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status = await one_request(reader, writer)
    opened.append(status)
    await hold.wait()
    # Still open? One more request on the same connection proves it.
    status = await one_request(reader, writer)
    writer.close()
    return status


async def live_traffic(port, requests, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(requests):
        try:
            if await one_request(reader, writer) != 200:
                errors.append("status")
        except Exception as e:  # noqa: BLE001 - any failure counts
            errors.append(repr(e))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def main():
    port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    before = rss_kib(pid)
    opened, hold = [], asyncio.Event()
    clients = []
    for i in range(n):
        clients.append(asyncio.create_task(idle_client(port, opened, hold)))
        if i % 500 == 499:
            await asyncio.sleep(0.05)
    while len(opened) < n:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    during = rss_kib(pid)
    errors = []
    await asyncio.gather(*(live_traffic(port, 500, errors) for _ in range(8)))
    hold.set()
    statuses = await asyncio.gather(*clients, return_exceptions=True)
    reused_ok = sum(1 for s in statuses if s == 200)
    print(f"idle connections: {n}, all answered 200 on open: {all(s == 200 for s in opened)}")
    print(f"proxy RSS before: {before} KiB, with {n} idle: {during} KiB")
    print(f"per idle connection: {(during - before) / n:.1f} KiB")
    print(f"live traffic meanwhile: 4000 requests on 8 connections, errors: {len(errors)} {errors[:3]}")
    print(f"idle connections still usable afterwards: {reused_ok}/{n}")


asyncio.run(main())
