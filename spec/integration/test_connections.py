"""Connections cannot be exhausted cheaply (docs/security.md, "Connections"):

- with the default limits, 1500 idle connections from 127.0.0.1 do not keep
  a normal client out: the listener waits with poll(), not select(), so a
  socket numbered 1024 or more is served, every connection holds one
  descriptor (the header watchdog keeps no duplicate), max_connections
  connections are really held, and at the limit the longest-idle connection
  is closed to make room (a normal client and skopeo pull meanwhile);
- /readyz says "saturated" when max_connections connections are all busy
  with requests (idle ones do not count: they make room), and recovers;
- a request body trickled byte by byte is cut by the header deadline;
- the open-files limit is raised at start, and one too low for
  max_connections is said at start;
- the same protection guards every listener: 1.5 times its connection
  limit of idle connections keep no normal client out of blobserve
  (limits.max_connections), the admin API or the metrics listener (64 each).
"""
import os
import resource
import socket
import time
import threading

from clients import skopeo_copy
from fake_upstream import request, wait_until
from harness import REGFACADE, Regfacade, free_port, log_tail, wait_http
from test_specs import TOKEN, specs_config

REPO = "conn/app"
FLOOD = 1500
RECLAIMED = "to make room for new ones (limits.max_connections {} nearly reached)"


def raise_nofile(want):
    """The test process needs a descriptor per socket it opens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def socket_fds(pid):
    """(descriptors that are sockets, distinct sockets) of process pid: a
    socket held under two descriptors counts once in the second."""
    fds, sockets = 0, set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            fds += 1
            sockets.add(target)
    return fds, len(sockets)


def open_idle(n, port):
    """n sockets connecting to port that never send a byte."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def request_again_after_reset(host, method, path, timeout, tries=5):
    """One request, on a new connection; a reset connection is tried again
    (as clients do). At a tiny limits.max_connections (4 in one test), the
    connection this client closed a moment ago may still be counted by the
    listener, which then turns the next one away: with real limits (1024,
    32 kept in reserve) that does not happen."""
    for i in range(tries):
        try:
            return request(host, method, path, timeout=timeout)
        except ConnectionResetError:
            if i == tries - 1:
                raise
            time.sleep(0.5)


def pull(rf, img, timeout=60, resets=1):
    """/v2/, the manifest and every blob, each on a new connection (resets:
    how many tries a reset connection gets; see request_again_after_reset)."""
    r = request_again_after_reset(rf.host, "GET", "/v2/", timeout, resets)
    assert r.status == 200, r
    r = request_again_after_reset(rf.host, "GET", f"/v2/{REPO}/manifests/v1", timeout, resets)
    assert r.status == 200 and r.body == img.manifest, r
    for b in [img.config] + img.layers:
        r = request_again_after_reset(rf.host, "GET", f"/v2/{REPO}/blobs/{b.digest}", timeout, resets)
        assert r.status == 200 and r.body == b.data, r


def test_idle_flood_past_1024_descriptors_leaves_room_for_clients(fake_upstream, fake_facade, tmp_path):
    assert raise_nofile(FLOOD + 500) >= FLOOD + 200, "the test process cannot open enough sockets"
    img = fake_upstream.add_image(REPO, "v1", layer_sizes=[2000, 30000])
    rf = fake_facade()  # the default limits: max_connections 1024, header_timeout_seconds 30
    pull(rf, img)
    pid = rf.proc.pid
    base_fds, base_sockets = socket_fds(pid)
    socks = open_idle(FLOOD, rf.port)
    try:
        # The server takes max_connections of them (select() stopped at
        # descriptor 1024: about 500 connections with two descriptors each).
        held = {"n": 0}

        def taken():
            held["n"] = max(held["n"], socket_fds(pid)[1] - base_sockets)
            return held["n"] >= 1000

        assert wait_until(taken, timeout=60, interval=0.2), \
            f"the server holds only {held['n']} of {FLOOD} idle connections (limits.max_connections is 1024)"
        fds, sockets = socket_fds(pid)
        # One descriptor per connection: no duplicate for the watchdog.
        assert fds - base_fds <= (sockets - base_sockets) + 8, \
            f"{fds - base_fds} socket descriptors for {sockets - base_sockets} sockets"
        # Connections idle for a second are closed to make room (those of
        # the last second are not: a client may be between connect() and
        # its request)...
        assert wait_until(lambda: RECLAIMED.format(1024) in log_tail(rf.proc, 1 << 30), timeout=60), \
            "no idle connection was closed to make room"
        # ...so normal clients from the same address are served, on new
        # connections, while the flood holds the rest: urllib, and skopeo
        # copying the whole image.
        pull(rf, img)
        out = tmp_path / "copied"
        skopeo_copy(f"docker://{rf.host}/{REPO}:v1", f"oci:{out}:v1", timeout=300)
        assert (out / "blobs" / "sha256" / img.layers[1].digest.split(":")[1]).read_bytes() == img.layers[1].data
        assert rf.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: socket_fds(pid)[0] <= base_fds + 8, timeout=60, interval=0.2), \
        f"{socket_fds(pid)[0]} socket descriptors once the flood left, {base_fds} before"
    pull(rf, img)


def readyz(rf):
    return request(rf.metrics_host, "GET", "/readyz", timeout=30)


def test_readyz_saturated_only_when_every_connection_is_busy(fake_upstream, fake_facade):
    img = fake_upstream.add_image(REPO, "v1", layer_sizes=[2000])
    tags = [f"busy{i}" for i in range(4)]
    for t in tags:
        fake_upstream.tag(REPO, t, img.digest)
    port = free_port()
    # A header deadline far away: what makes room below is the idle
    # connections being closed at the limit, not their deadline.
    rf = fake_facade(config={"limits": {"max_connections": 4, "header_timeout_seconds": 600},
                             "metrics": {"listen": f"127.0.0.1:{port}"}}, tag_ttl=0)
    rf.metrics_host = f"127.0.0.1:{port}"
    assert readyz(rf).status == 200

    # Idle connections, more than the limit: they make room, /readyz stays 200.
    idle = open_idle(10, rf.port)
    try:
        assert wait_until(lambda: RECLAIMED.format(4) in log_tail(rf.proc, 1 << 30), timeout=60), \
            "no idle connection was closed to make room"
        pull(rf, img, resets=5)
        r = readyz(rf)
        assert r.status == 200, r
    finally:
        for s in idle:
            s.close()

    # Four requests held by a hanging upstream, started one after the
    # other (each is busy before the next connects): every connection is busy.
    paths = [f"/v2/{REPO}/manifests/{t}" for t in tags]
    fake_upstream.misbehave(paths, "hang", seconds=120)
    answers = []

    def slow_pull(path):
        answers.append(request(rf.host, "GET", path, timeout=180).status)

    threads = []
    try:
        for path in paths:
            threads.append(threading.Thread(target=slow_pull, args=(path,)))
            threads[-1].start()
            assert wait_until(lambda: fake_upstream.count(path=path) >= 1, timeout=60), f"{path} never reached upstream"
        last = {}

        def saturated():
            last["r"] = readyz(rf)
            return last["r"].status == 503 and b"saturated" in last["r"].body

        assert wait_until(saturated, timeout=60, interval=0.2), f"/readyz never said saturated: {last.get('r')}"
        assert b"limits.max_connections 4" in last["r"].body, last["r"]
        # Liveness is not readiness.
        assert request(rf.metrics_host, "GET", "/healthz").status == 200
    finally:
        fake_upstream.release()
        for t in threads:
            t.join(timeout=180)
    assert answers == [200] * 4, answers
    assert wait_until(lambda: readyz(rf).status == 200, timeout=60, interval=0.2), readyz(rf)
    fake_upstream.behave()
    pull(rf, img, resets=5)


def test_trickled_request_body_is_cut_like_trickled_headers(fake_facade):
    # Complete headers announcing a body, then one body byte at a time: the
    # body is part of the request the header deadline bounds (libmicrohttpd's
    # own idle timeout, client_timeout_seconds, is reset by every byte).
    rf = fake_facade(config={"limits": {"header_timeout_seconds": 2, "client_timeout_seconds": 300}})
    s = socket.create_connection(("127.0.0.1", rf.port), timeout=10)
    cut = False
    try:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        s.settimeout(0.3)
        for _ in range(200):  # at most about 60 s
            try:
                s.sendall(b"a")
                if s.recv(4096) == b"":
                    cut = True
                    break
            except socket.timeout:
                continue
            except OSError:
                cut = True
                break
    finally:
        s.close()
    assert cut, "a client trickling its request body was never cut"
    assert wait_until(lambda: "within 2 s (limits.header_timeout_seconds)" in log_tail(rf.proc, 1 << 30),
                      timeout=30)
    r = request(rf.host, "GET", "/v2/")
    assert r.status == 200, r


def start_with_nofile(procs, tmp_path, fake_upstream, name, nofile):
    """A regfacade started under prlimit --nofile=SOFT:HARD; its log once serving."""
    rf = Regfacade(procs, str(tmp_path), {"upstreams": {"fake": {"url": fake_upstream.url}},
                                          "cache": {"dir": str(tmp_path / f"cache-{name}")}}, name=name)
    rf.proc = procs.start(rf.name, ["prlimit", f"--nofile={nofile}", "--", REGFACADE, "serve",
                                    "--config", rf.config_path])
    wait_http(rf.url + "/v2/", timeout=20)
    return rf, log_tail(rf.proc, 1 << 30)


def test_open_files_limit_raised_and_checked_at_start(procs, tmp_path, fake_upstream):
    # Soft limit below the hard one: raised to it, and said so.
    rf, log = start_with_nofile(procs, tmp_path, fake_upstream, "raised", "512:8192")
    assert "open-files limit raised from 512 to the hard limit 8192" in log, log
    assert "is below" not in log, log
    with open(f"/proc/{rf.proc.pid}/limits") as f:
        assert any(l.startswith("Max open files") and l.split()[3] == "8192" for l in f), "soft limit not raised"

    # A hard limit too low for the default max_connections (1024): said at
    # start, and the server still serves.
    rf, log = start_with_nofile(procs, tmp_path, fake_upstream, "low", "300:300")
    assert "the open-files limit 300 is below the" in log and "limits.max_connections 1024" in log, log
    assert request(rf.host, "GET", "/v2/").status == 200


def flood_leaves_room(rf, port, limit, listener, limit_name, idle_timeout, serve):
    """About 1.5 x limit idle connections to port; once the listener holds
    what it takes of them, serve(timeout) (real requests on new connections)
    must be answered, and the listener says it made room. Every socket
    closed. idle_timeout: the listener's own (libmicrohttpd's) idle timeout,
    which ends such a flood by itself: the waits below stay well within it,
    else the requests would prove nothing (a listener without the guard
    serves them once the flood timed out)."""
    n = limit * 3 // 2 + 4
    assert raise_nofile(n + 500) >= n + 200, "the test process cannot open enough sockets"
    pid = rf.proc.pid
    base = socket_fds(pid)[1]
    reserve = max(limit // 32, 1)
    socks = open_idle(n, port)
    try:
        held = {"n": 0}

        def taken():
            held["n"] = max(held["n"], socket_fds(pid)[1] - base)
            return held["n"] >= limit - reserve - 1

        assert wait_until(taken, timeout=60, interval=0.2), \
            f"{listener} holds only {held['n']} of {n} idle connections (its limit is {limit})"
        # Connections idle for a second are closed to make room (the flood
        # came faster: the listener filled up meanwhile)...
        said = f"{listener}: closed "
        made_room = wait_until(lambda: any(said in l and RECLAIMED.replace("limits.max_connections", limit_name)
                                           .format(limit) in l for l in log_tail(rf.proc, 1 << 30).splitlines()),
                               timeout=min(60, idle_timeout // 2))
        # ...so normal clients are served, on new connections, while the
        # flood holds the rest.
        serve(min(30, idle_timeout // 3))
        assert made_room, f"{listener}: no idle connection was closed to make room"
        assert rf.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: socket_fds(pid)[1] <= base + 8, timeout=60, interval=0.2), \
        f"{socket_fds(pid)[1]} sockets once the flood left, {base} before"
    serve(30)


def test_blobserve_idle_flood_leaves_room_for_clients(fake_upstream, fake_facade):
    fake_upstream.add_image(REPO, "v1", layer_sizes=[2000])
    port = free_port()
    # The default limits: max_connections 1024, for blobserve as for the registry.
    rf = fake_facade(config={"blobserve": {"listen": f"127.0.0.1:{port}", "repositories": [REPO]}})
    host = f"127.0.0.1:{port}"
    wait_http(f"http://{host}/readyz", timeout=30)

    def serve(timeout):
        r = request(host, "GET", "/readyz", timeout=timeout)
        assert r.status == 200 and r.body.startswith(b"ready"), r
        r = request(host, "GET", "/_stats", timeout=timeout)
        assert r.status == 200 and b"requests" in r.body, r
        # A file of a repository blobserve does not serve: a real answer, not a wait.
        r = request(host, "GET", "/other/app:v1/etc/hostname", timeout=timeout)
        assert r.status == 403 and b"not served here" in r.body, r
        # The registry next to it is served too.
        r = request(rf.host, "GET", "/v2/", timeout=timeout)
        assert r.status == 200, r

    # limits.client_timeout_seconds (300) is blobserve's idle timeout.
    flood_leaves_room(rf, port, 1024, "blobserve", "limits.max_connections", 300, serve)


def test_admin_idle_flood_leaves_room_for_clients(fake_facade, tmp_path):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    port = int(rf.config["admin"]["listen"].rsplit(":", 1)[1])

    def serve(timeout):
        host = rf.config["admin"]["listen"]
        r = request(host, "GET", "/specs", {"Authorization": f"Bearer {TOKEN}"}, timeout=timeout)
        assert r.status == 200 and r.json() == {"ids": []}, r
        r = request(host, "GET", "/specs", {"Authorization": f"Bearer {TOKEN}x"}, timeout=timeout)
        assert r.status == 401, r

    flood_leaves_room(rf, port, 64, "admin", "the admin listener's fixed limit", 30, serve)


def test_metrics_idle_flood_leaves_room_for_clients(fake_facade):
    port = free_port()
    rf = fake_facade(config={"metrics": {"listen": f"127.0.0.1:{port}"}})
    host = f"127.0.0.1:{port}"

    def serve(timeout):
        r = request(host, "GET", "/metrics", timeout=timeout)
        assert r.status == 200 and b"regfacade_" in r.body, r
        r = request(host, "GET", "/readyz", timeout=timeout)
        assert r.status == 200, r

    flood_leaves_room(rf, port, 64, "metrics", "the metrics listener's fixed limit", 30, serve)
