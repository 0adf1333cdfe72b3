"""Reloads release what they replace: 200 SIGHUPs while a client keeps
pulling (manifests by tag from the upstream every time, cold blobs fetched
across reloads, cached blobs), and afterwards the process's descriptors and
resident memory are back near what they were after warm-up. A retired
configuration generation is freed when its last request is done; its
upstream clients (and their keep-alive connections) when the last fetch
using them ends.
"""
import os
import signal
import threading

from fake_upstream import FakeUpstream, random_bytes, request, wait_until
from harness import Regfacade, log_tail, vm_rss_kib

REPO = "acme/app"
RELOADS = 200
COLD_BLOBS = 300
# Margins over the baseline measured after warm-up. Descriptors: the
# current generation's keep-alive connections and the spool of a fetch that
# is finishing (200 leaked generations hold about 90 more). Memory: allocator
# slack, measured at 200 to 400 KiB; 200 leaked generations hold about
# 1.6 MiB more. A sanitizer build keeps freed memory in quarantine: there,
# only descriptors are compared.
FD_MARGIN = 12
RSS_MARGIN_KIB = 1024

ALLOW = 'return { resolve = function(req) return { upstream = "fake" } end }\n'


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def sanitized(pid):
    with open(f"/proc/{pid}/maps") as f:
        return "libasan" in f.read()


def reloads_done(rf):
    return log_tail(rf.proc, 1 << 30).count("SIGHUP: reloaded")  # the whole log


def test_reloads_under_load_release_what_they_replace(procs, tmp_path):
    fake = FakeUpstream().start()
    try:
        img = fake.add_image(REPO, "v1", layer_sizes=[2000, 30000])
        cold = [fake.put_blob(REPO, random_bytes(20000, seed=i)) for i in range(COLD_BLOBS)]
        (tmp_path / "policy.lua").write_text(ALLOW)
        rf = Regfacade(procs, str(tmp_path), {
            "upstreams": {"fake": {"url": fake.url}},
            "policy": {"file": "policy.lua", "watch": False},
            # Every manifest by tag goes to the upstream: each generation's
            # clients open keep-alive connections.
            "cache": {"dir": str(tmp_path / "cache"), "tag_ttl_seconds": 0},
        }).start()
        pid = rf.proc.pid
        failures = []
        next_cold = [0]

        def pull_once():
            r = request(rf.host, "GET", f"/v2/{REPO}/manifests/v1", timeout=60)
            if r.status != 200 or r.body != img.manifest:
                failures.append(("manifest", r.status))
            if next_cold[0] < len(cold):
                d = cold[next_cold[0]]
                next_cold[0] += 1
                r = request(rf.host, "GET", f"/v2/{REPO}/blobs/{d}", timeout=60)
                if r.status != 200:
                    failures.append(("cold blob", r.status))
            b = img.layers[1]
            r = request(rf.host, "GET", f"/v2/{REPO}/blobs/{b.digest}", timeout=60)
            if r.status != 200 or r.body != b.data:
                failures.append(("blob", r.status))

        # Warm-up: caches, Lua states, allocator arenas and one reload.
        for _ in range(10):
            pull_once()
        rf.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: reloads_done(rf) == 1, timeout=30)
        for _ in range(10):
            pull_once()
        assert not failures, failures
        base_fds, base_rss = fd_count(pid), vm_rss_kib(pid)

        stop = threading.Event()

        def load():
            for _ in range(5000):  # bounded; stopped after the reloads
                if stop.is_set():
                    return
                pull_once()

        t = threading.Thread(target=load)
        t.start()
        try:
            for i in range(RELOADS):
                rf.proc.send_signal(signal.SIGHUP)
                assert wait_until(lambda: reloads_done(rf) == i + 2, timeout=30), f"reload {i + 1} not done"
        finally:
            stop.set()
            t.join(timeout=300)
        assert not failures, failures[:10]
        assert next_cold[0] > 10, "too few cold blobs were fetched during the reloads"
        assert "reload rejected" not in log_tail(rf.proc, 1 << 30)

        # Fetches and requests of retired generations end; then everything
        # they held is released.
        last = {}

        rss_margin = float("inf") if sanitized(pid) else RSS_MARGIN_KIB

        def back():
            last["fds"], last["rss"] = fd_count(pid), vm_rss_kib(pid)
            return last["fds"] <= base_fds + FD_MARGIN and last["rss"] <= base_rss + rss_margin

        ok = wait_until(back, timeout=60, interval=0.5)
        print(f"baseline {base_fds} fds, {base_rss} KiB; after {RELOADS} reloads {last['fds']} fds, {last['rss']} KiB")
        assert ok, (
            f"after {RELOADS} reloads: {last['fds']} descriptors (baseline {base_fds}, margin {FD_MARGIN}), "
            f"VmRSS {last['rss']} KiB (baseline {base_rss} KiB, margin {rss_margin} KiB)")
        # Still serving, on the last generation.
        pull_once()
        assert not failures, failures
    finally:
        fake.stop()
