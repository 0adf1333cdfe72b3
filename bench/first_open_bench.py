#!/usr/bin/env python3
"""The cost of verifying a cached blob on its first open after a start.

A blob of N MiB is fetched once (cached), the server restarts, and the blob
is read twice: the first GET hashes the file before its first byte
(docs/security.md, "Integrity of cached bytes"), the second goes out by
sendfile at once. Prints both times to first byte and to the last byte.

    REGFACADE_BIN=build/regfacade python3 bench/first_open_bench.py [MiB]
"""
import http.client
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "spec", "integration"))

from fake_upstream import FakeUpstream  # noqa: E402
from harness import ProcessGroup, Regfacade  # noqa: E402


def timed_get(rf, path, want):
    host, port = rf.host.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        t = time.monotonic()
        conn.request("GET", path)
        r = conn.getresponse()
        first, n = None, 0
        while True:
            b = r.read(1 << 20)
            if first is None:
                first = time.monotonic() - t
            if not b:
                break
            n += len(b)
        if r.status != 200 or n != want:
            raise SystemExit(f"GET {path}: status {r.status}, {n} of {want} bytes")
        return first, time.monotonic() - t
    finally:
        conn.close()


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    with tempfile.TemporaryDirectory(prefix="rf-first-open-") as work:
        fake = FakeUpstream().start()
        group = ProcessGroup(work)
        try:
            data = os.urandom(mib << 20)
            path = f"/v2/bench/big/blobs/{fake.put_blob('bench/big', data)}"
            rf = Regfacade(group, work, {"cache": {"dir": os.path.join(work, "cache"), "scrub_bytes_per_second": 0},
                                         "upstreams": {"fake": {"url": fake.url}}}).start()
            timed_get(rf, path, len(data))  # cold: fetched, verified, cached
            rf.stop()
            rf.start()
            a = timed_get(rf, path, len(data))
            b = timed_get(rf, path, len(data))
            print(f"{mib} MiB cached blob after a restart: first GET (hashed on open) first byte {a[0] * 1000:.0f} ms, "
                  f"last byte {a[1] * 1000:.0f} ms; next GET first byte {b[0] * 1000:.0f} ms, "
                  f"last byte {b[1] * 1000:.0f} ms")
        finally:
            group.stop_all()
            fake.stop()


if __name__ == "__main__":
    main()
