"""Three replicas sharing one Redis behave as one registry (docs/cluster.md).

Real parts only, all on loopback: redis-server (its own port and folder, no
persistence), docker-registry as the upstream, three regfacade replicas
with separate cache folders, and haproxy in front of them (round robin, HTTP
mode), so consecutive requests land on different replicas. Proved here:

- skopeo and ctr pull by tag through the front, and every replica served
  some of those requests;
- a tag resolution is shared: after replica A resolved a tag, replica B
  answers the same digest though the upstream moved the tag, until the
  shared record ends (its TTL, here cut short in Redis); then every replica
  answers the new digest;
- a generated (layer-injected) image's digest obtained from replica A is
  pulled by digest from replica C, which never generated it: the same
  bytes, also after the base's tag moved upstream;
- an image spec PUT on replica A's admin API is served by replica B at
  once, its update and its deletion too;
- links are shared: a blob a replica holds for one repository is served
  under another a peer linked without asking the upstream, and under one
  nobody linked only once the upstream confirmed it;
- `tags refresh` on one replica forgets the shared resolution;
- Redis refusing writes (out of memory): requests go on, one log line, the
  breaker stays closed; Redis frozen (SIGSTOP): requests go on, the breaker
  opens, and closes after SIGCONT;
- Redis stopped mid-run: pulls go on without errors, each replica's metric
  and /readyz detail say degraded (still ready), one log line each; admin
  writes are refused (503); Redis started again: every replica rejoins
  (metric back to 1, one log line), and the shared state is used again;
- `check` refuses a bad section; a reload cannot change it.
"""
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

import clients
import images
import registries
from fake_upstream import request
from harness import REGFACADE, ProcessGroup, Regfacade, free_port, wait_http

REDIS = shutil.which("redis-server")
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
TOKEN = "cluster-admin-token-0123456789abcdef"
ACCEPT = {"Accept": ", ".join([images.OCI_MANIFEST, images.OCI_INDEX, images.DOCKER_MANIFEST,
                               images.DOCKER_LIST])}
POLICY = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "workspace", "policy_specs.lua")

pytestmark = pytest.mark.skipif(not REDIS or not os.path.exists(HAPROXY),
                                reason="redis-server and haproxy are needed (make test installs them)")


def until(pred, timeout, what):
    """Poll pred (generous deadlines: the machine is busy); fail naming what."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    if not pred():
        raise AssertionError(f"not within {timeout}s: {what}")


class Redis:
    """redis-server on a free port, in its own folder, without persistence."""

    def __init__(self, group, workdir):
        self.group = group
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.proc = None

    def start(self):
        self.proc = self.group.start("redis", [REDIS, "--bind", "127.0.0.1", "--port", str(self.port),
                                               "--dir", self.dir, "--save", "", "--appendonly", "no",
                                               "--daemonize", "no"])
        until(lambda: self.cli("PING", check=False).strip() == "PONG", timeout=30,
                   what="redis-server answering PING")
        return self

    def stop(self):
        self.group.stop(self.proc)
        self.proc = None

    def cli(self, *args, check=True):
        r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port)] + list(args),
                           capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise AssertionError(f"redis-cli {args}: {r.stdout} {r.stderr}")
        return r.stdout


class Front:
    """haproxy: round robin over the replicas, HTTP mode."""

    def __init__(self, group, workdir, backends):
        self.port = free_port()
        self.cfg = os.path.join(workdir, "haproxy.cfg")
        servers = "\n".join(f"    server r{i} {b}" for i, b in enumerate(backends))
        with open(self.cfg, "w") as f:
            f.write(f"""global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend front
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance roundrobin
    option http-server-close
{servers}
""")
        self.proc = group.start("haproxy", [HAPROXY, "-db", "-f", self.cfg])
        wait_http(f"http://{self.host}/v2/", timeout=30)

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"


class Cluster:
    pass


@pytest.fixture(scope="module")
def cluster(built_images, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cluster"))
    group = ProcessGroup(d)
    try:
        c = Cluster()
        c.group = group
        c.reg = registries.start_registry(group, os.path.join(d, "upstream"), name="upstream")
        c.redis = Redis(group, d).start()
        token = os.path.join(d, "admin.token")
        with open(token, "w") as f:
            f.write(TOKEN + "\n")
        tools = os.path.join(d, "tools.tar.gz")
        import layerkit
        layerkit.write_layer(tools, {"opt/tools/hello.txt": b"hello from the cluster's tools layer\n"})
        c.replicas = []
        for i, name in enumerate("abc"):
            cfg = {
                "cache": {"dir": os.path.join(d, f"cache-{name}"), "tag_ttl_seconds": 3600},
                "upstreams": {"up": {"url": c.reg.url}},
                "policy": {"file": POLICY, "options": {"spec_provider": "ws"}},
                "specs": {"providers": {"ws": {"type": "pushed"}}},
                "admin": {"listen": f"127.0.0.1:{free_port()}", "token_file": token},
                "layers": {"tools": {"file": tools}},
                "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                "cluster": {"redis": f"127.0.0.1:{c.redis.port}", "timeout_ms": 500, "retry_ms": 200},
            }
            rf = Regfacade(group, os.path.join(d, f"replica-{name}"), cfg, name=f"replica-{name}")
            c.replicas.append(rf.start())
        until(lambda: all(up_metric(rf) == 1 for rf in c.replicas), timeout=30,
                   what="every replica connected to Redis")
        c.front = Front(group, d, [rf.host for rf in c.replicas])
        c.containerd = clients.Containerd(group, os.path.join(d, "containerd")).start()
        c.oci = images.push_image(built_images, "oci", c.reg.host, repo="cluster/app", tag="v1")
        yield c
    finally:
        group.stop_all()


def metrics_text(rf):
    with urllib.request.urlopen(f"http://{rf.config['metrics']['listen']}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(rf, name):
    for line in metrics_text(rf).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{rf.name}: no {name} in /metrics")


def up_metric(rf):
    try:
        return metric(rf, "regfacade_cluster_redis_up")
    except OSError:
        return None


def readyz(rf):
    r = request(rf.host, "GET", "/readyz")
    return r.status, json.loads(r.body)


def manifest_digest(host, repo, ref):
    r = request(host, "GET", f"/v2/{repo}/manifests/{ref}", ACCEPT)
    assert r.status == 200, r
    return r.header("Docker-Content-Digest"), r.body


def push_moved(built_images, host, repo, tag):
    """The same image again, as Docker schema2: the tag now names another digest."""
    clients.skopeo_copy(built_images.oci_ref("small"), f"docker://{host}/{repo}:{tag}",
                        extra=["--format", "v2s2"])
    return images.describe(host, repo, tag)


def admin(rf, method, path, body=None):
    h = {"Authorization": f"Bearer {TOKEN}"}
    if body is not None:
        body = json.dumps(body).encode()
    return request(rf.config["admin"]["listen"], method, path, h, body=body)


def served_paths(rf, needle):
    """Access-log lines of rf whose path holds needle."""
    n = 0
    with open(rf.proc.log_path, errors="replace") as f:
        for line in f:
            if needle in line and '"path"' in line:
                n += 1
    return n


def count_messages(rf, text):
    return sum(1 for m in rf.messages().splitlines() if text in m)


# ---------------------------------------------------------------------------

def test_pull_by_tag_through_the_round_robin_front(cluster, tmp_path):
    oci = cluster.oci
    before = [served_paths(rf, "/v2/cluster/app/") for rf in cluster.replicas]
    clients.skopeo_copy(f"docker://{cluster.front.host}/cluster/app:v1", f"oci:{tmp_path / 'out'}:v1")
    copied = images.Layout(str(tmp_path / "out"))
    assert copied.descriptor("v1")["digest"] == oci["manifest_digest"]
    ns = cluster.containerd.new_namespace("cluster")
    try:
        cluster.containerd.pull(f"{cluster.front.host}/cluster/app:v1", namespace=ns)
        out = cluster.containerd.ctr("images", "ls", "-q", namespace=ns).stdout
        assert f"{cluster.front.host}/cluster/app:v1" in out
    finally:
        cluster.containerd.remove_namespace(ns)
    after = [served_paths(rf, "/v2/cluster/app/") for rf in cluster.replicas]
    # Round robin: every replica served part of those pulls.
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_a_tag_means_the_same_on_every_replica_until_the_shared_record_ends(cluster, built_images):
    a, b, c = cluster.replicas
    first = images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/moving", tag="v1")
    d1, _ = manifest_digest(a.host, "cluster/moving", "v1")
    assert d1 == first["manifest_digest"]
    moved = push_moved(built_images, cluster.reg.host, "cluster/moving", "v1")
    assert moved["manifest_digest"] != d1
    # B and C never resolved the tag: the cluster's resolution is theirs.
    for rf in (b, c, a):
        assert manifest_digest(rf.host, "cluster/moving", "v1")[0] == d1, rf.name
    for _ in range(6):
        assert manifest_digest(cluster.front.host, "cluster/moving", "v1")[0] == d1
    keys = cluster.redis.cli("--scan", "--pattern", "regfacade:v1:tag:*cluster/moving*").split()
    assert keys == ["regfacade:v1:tag:up:cluster/moving:v1"], keys
    ttl = int(cluster.redis.cli("PTTL", keys[0]))
    assert 0 < ttl <= 3600 * 1000
    # The shared record ends (as its TTL would): the next replica to ask
    # resolves again, and every replica answers the new digest.
    cluster.redis.cli("PEXPIRE", keys[0], "1")
    until(lambda: cluster.redis.cli("EXISTS", keys[0]).strip() == "0", timeout=30, what="record expired")
    assert manifest_digest(c.host, "cluster/moving", "v1")[0] == moved["manifest_digest"]
    for rf in (a, b, c):
        assert manifest_digest(rf.host, "cluster/moving", "v1")[0] == moved["manifest_digest"], rf.name
    # The tag moves back; `tags refresh` on B forgets the shared resolution
    # (not only B's own): A, which resolved it, now asks the upstream too.
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/moving", tag="v1")
    assert manifest_digest(a.host, "cluster/moving", "v1")[0] == moved["manifest_digest"]
    r = admin(b, "POST", "/tags/refresh", {"ref": "cluster/moving:v1"})
    assert r.status == 200 and r.json()["forgotten"] is True, r
    assert cluster.redis.cli("EXISTS", keys[0]).strip() == "0"
    for rf in (a, b, c):
        assert manifest_digest(rf.host, "cluster/moving", "v1")[0] == d1, rf.name
    # `cache rm` on C takes the shared resolution with its own.
    r = admin(c, "POST", "/cache/rm", {"ref": "cluster/moving:v1"})
    assert r.status in (200, 409) and r.json()["tags"], r
    assert cluster.redis.cli("EXISTS", keys[0]).strip() == "0"


def test_an_admin_put_on_one_replica_is_served_by_another(cluster):
    a, b, c = cluster.replicas
    spec = {"base": "up/cluster/app:v1", "env": {"WORKSPACE": "one"}}
    r = admin(a, "PUT", "/specs/ws-shared", spec)
    assert r.status == 201, r
    # B never saw the PUT: it is served there at once.
    r = request(b.host, "GET", "/v2/remote/ws-shared/manifests/latest", ACCEPT)
    assert r.status == 200, r
    man = json.loads(r.body)
    cfg = json.loads(request(b.host, "GET", f"/v2/remote/ws-shared/blobs/{man['config']['digest']}").body)
    assert "WORKSPACE=one" in cfg["config"]["Env"]
    assert admin(c, "GET", "/specs/ws-shared").json()["env"] == {"WORKSPACE": "one"}
    # Replaced on C, served so by B; deleted on B, unknown on A.
    # (200: a replacement, though C never held it)
    assert admin(c, "PUT", "/specs/ws-shared", dict(spec, env={"WORKSPACE": "two"})).status == 200
    r = request(b.host, "GET", "/v2/remote/ws-shared/manifests/latest", ACCEPT)
    man = json.loads(r.body)
    cfg = json.loads(request(b.host, "GET", f"/v2/remote/ws-shared/blobs/{man['config']['digest']}").body)
    assert "WORKSPACE=two" in cfg["config"]["Env"]
    assert admin(b, "DELETE", "/specs/ws-shared").status == 204
    r = request(a.host, "GET", "/v2/remote/ws-shared/manifests/latest", ACCEPT)
    assert r.status == 404, r
    assert admin(a, "GET", "/specs/ws-shared").status == 404


def test_a_generated_digest_from_one_replica_is_served_by_another(cluster, built_images, tmp_path):
    a, b, c = cluster.replicas
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/gen", tag="v1")
    spec = {"base": "up/cluster/gen:v1", "layers": ["base", "tools"], "env": {"WORKSPACE": "gen"}}
    assert admin(a, "PUT", "/specs/ws-gen", spec).status == 201
    digest, body = manifest_digest(a.host, "remote/ws-gen", "latest")
    man = json.loads(body)
    assert len(man["layers"]) == len(cluster.oci["layers"]) + 1  # the tools layer added
    # The base's tag moves upstream and the shared resolution ends: C must
    # still make exactly the bytes A made, from the base A used.
    push_moved(built_images, cluster.reg.host, "cluster/gen", "v1")
    cluster.redis.cli("DEL", "regfacade:v1:tag:up:cluster/gen:v1")
    assert not os.path.exists(os.path.join(c.config["cache"]["dir"], "blobs", "sha256", digest[7:9], digest[7:]))
    got, body_c = manifest_digest(c.host, "remote/ws-gen", digest)
    assert got == digest and body_c == body
    for desc in [man["config"]] + man["layers"]:
        r = request(c.host, "GET", f"/v2/remote/ws-gen/blobs/{desc['digest']}")
        assert r.status == 200, (desc, r)
        assert r.header("Docker-Content-Digest") == desc["digest"]
    # A real client pulls it by digest from C.
    clients.skopeo_copy(f"docker://{c.host}/remote/ws-gen@{digest}", f"oci:{tmp_path / 'gen'}:x")
    assert images.Layout(str(tmp_path / "gen")).descriptor("x")["digest"] == digest
    assert count_messages(c, f"generated {digest} again") == 1


def upstream_requests(cluster, path):
    """Requests the upstream registry logged for path (its access log)."""
    with open(cluster.reg.proc.log_path, errors="replace") as f:
        return sum(1 for line in f if f" {path} HTTP/" in line)


def test_links_are_shared(cluster, built_images):
    """A replica that holds a blob's bytes for one repository serves it
    under another that a peer replica linked, without asking the upstream
    to confirm it (isolation's links are in Redis); a repository nobody
    linked is still confirmed with the upstream."""
    a, b, c = cluster.replicas
    l1 = images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/links-1", tag="v1")
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/links-2", tag="v1")
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/links-3", tag="v1")
    layer = l1["layers"][0]["digest"]
    for rf, repo in ((a, "cluster/links-2"), (b, "cluster/links-1")):
        r = request(rf.host, "GET", f"/v2/{repo}/blobs/{layer}")
        assert r.status == 200 and r.header("Docker-Content-Digest") == layer, (rf.name, r)
    path2, path3 = f"/v2/cluster/links-2/blobs/{layer}", f"/v2/cluster/links-3/blobs/{layer}"
    before2, before3 = upstream_requests(cluster, path2), upstream_requests(cluster, path3)
    assert before2 >= 1  # (the pushes' HEADs count too)
    # B holds the bytes (for links-1); links-2 was linked by A.
    r = request(b.host, "GET", path2)
    assert r.status == 200 and r.header("Docker-Content-Digest") == layer, r
    assert upstream_requests(cluster, path2) == before2
    # links-3: nobody linked it; B asks the upstream before serving.
    r = request(b.host, "GET", path3)
    assert r.status == 200, r
    assert upstream_requests(cluster, path3) > before3


def test_a_redis_that_refuses_writes_is_not_an_outage(cluster, built_images):
    """Out of memory (maxmemory reached, noeviction): writes answer an
    error. The request goes on alone, the breaker stays closed, one line."""
    a = cluster.replicas[0]
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/oom", tag="v1")
    failed = metric(a, 'regfacade_cluster_calls_total{result="failed"}')
    cluster.redis.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    cluster.redis.cli("CONFIG", "SET", "maxmemory", "1")
    try:
        for tag in ("v1", "v1"):
            assert manifest_digest(a.host, "cluster/oom", tag)[0]
        r = admin(a, "PUT", "/specs/ws-oom", {"base": "up/cluster/app:v1"})
        assert r.status == 503, r
    finally:
        cluster.redis.cli("CONFIG", "SET", "maxmemory", "0")
    assert metric(a, 'regfacade_cluster_calls_total{result="failed"}') > failed
    assert up_metric(a) == 1
    assert count_messages(a, "refused SET") == 1
    assert cluster.redis.cli("EXISTS", "regfacade:v1:tag:up:cluster/oom:v1").strip() == "0"


def test_a_frozen_redis_does_not_hold_requests(cluster, built_images):
    """SIGSTOP: connections stay open and nothing answers. Every call ends
    at cluster.timeout_ms, the breaker opens, pulls go on."""
    a, b, c = cluster.replicas
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/frozen", tag="v1")
    os.kill(cluster.redis.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(6):
            assert manifest_digest(cluster.front.host, "cluster/frozen", "v1")[0]
            assert manifest_digest(cluster.front.host, "cluster/app", "v1")[0] == cluster.oci["manifest_digest"]
        until(lambda: all(up_metric(rf) == 0 for rf in cluster.replicas), timeout=60,
              what="every replica degraded while Redis is frozen")
    finally:
        os.kill(cluster.redis.proc.pid, signal.SIGCONT)
    until(lambda: all(up_metric(rf) == 1 for rf in cluster.replicas), timeout=60,
          what="every replica rejoined after SIGCONT")


@pytest.mark.parametrize("section, why", [
    ({}, "cluster.redis: required"),
    ({"redis": "127.0.0.1"}, "must be HOST:PORT"),
    ({"redis": "127.0.0.1:6379", "timeout_ms": 0}, "cluster.timeout_ms: must be an integer from 1"),
    ({"redis": "127.0.0.1:6379", "namespace": "a:b"}, "cluster.namespace"),
    ({"redis": "127.0.0.1:6379", "sentinels": []}, "sentinels"),
])
def test_check_refuses_a_bad_cluster_section(tmp_path, section, why):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"listen": f"127.0.0.1:{free_port()}", "cache": {"dir": str(tmp_path / "cache")},
                               "upstreams": {"up": {"url": "http://127.0.0.1:9"}}, "cluster": section}))
    r = subprocess.run([REGFACADE, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert why in r.stderr and str(cfg) in r.stderr, r.stderr


def test_redis_down_degrades_and_comes_back(cluster, built_images, tmp_path):
    a, b, c = cluster.replicas
    DOWN, BACK = "serving alone from the cache and the upstreams until", "answers again (after"
    downs = [count_messages(rf, DOWN) for rf in cluster.replicas]
    backs = [count_messages(rf, BACK) for rf in cluster.replicas]
    cluster.redis.stop()
    until(lambda: all(up_metric(rf) == 0 for rf in cluster.replicas), timeout=60,
               what="every replica degraded")
    for rf in cluster.replicas:
        status, doc = readyz(rf)
        assert status == 200 and doc["status"] == "ready", (rf.name, doc)
        assert doc["detail"].startswith("degraded: Redis"), (rf.name, doc)
        assert metric(rf, "regfacade_cluster_redis_outages_total") >= 1
    # Pulls go on: cached, and new ones from the upstream.
    images.push_image(built_images, "oci", cluster.reg.host, repo="cluster/while-down", tag="v1")
    for i in range(6):
        assert manifest_digest(cluster.front.host, "cluster/app", "v1")[0] == cluster.oci["manifest_digest"]
        manifest_digest(cluster.front.host, "cluster/while-down", "v1")
    clients.skopeo_copy(f"docker://{cluster.front.host}/cluster/while-down:v1", f"oci:{tmp_path / 'down'}:v1")
    # An admin write cannot reach every replica: refused, nothing changed.
    r = admin(a, "PUT", "/specs/ws-down", {"base": "up/cluster/app:v1"})
    assert r.status == 503, r
    assert admin(a, "GET", "/specs/ws-down").status == 404
    r = admin(b, "POST", "/tags/refresh", {"ref": "cluster/app:v1"})
    assert r.status == 503 and json.loads(r.body)["errors"][0]["code"] == "UNAVAILABLE", r
    # One log line per outage, not one per request.
    for rf, n in zip(cluster.replicas, downs):
        assert count_messages(rf, DOWN) == n + 1, rf.name
    cluster.redis.start()
    until(lambda: all(up_metric(rf) == 1 for rf in cluster.replicas), timeout=60,
               what="every replica rejoined")
    for rf, n in zip(cluster.replicas, backs):
        status, doc = readyz(rf)
        assert status == 200 and "detail" not in doc, (rf.name, doc)
        assert count_messages(rf, BACK) == n + 1, rf.name
    # Shared again: a resolution made by A is B's.
    d, _ = manifest_digest(a.host, "cluster/while-down", "v1")
    assert cluster.redis.cli("EXISTS", "regfacade:v1:tag:up:cluster/while-down:v1").strip() == "1"
    push_moved(built_images, cluster.reg.host, "cluster/while-down", "v1")
    assert manifest_digest(b.host, "cluster/while-down", "v1")[0] == d


def test_a_reload_cannot_change_the_cluster_section(procs, tmp_path):
    """The section is read at start (its pool and keeper live as long as
    the process): a SIGHUP changing it is rejected naming it, and the
    replica keeps serving (degraded here: nothing listens on that port)."""
    dead = free_port()
    rf = Regfacade(procs, str(tmp_path), {"upstreams": {"up": {"url": "http://127.0.0.1:9"}},
                                          "cluster": {"redis": f"127.0.0.1:{dead}", "retry_ms": 100}},
                   name="lone").start()
    until(lambda: "unreachable" in rf.log(), timeout=30, what="the replica saying Redis is unreachable")
    cfg = json.loads(json.dumps(rf.config))
    cfg["cluster"]["redis"] = f"127.0.0.1:{free_port()}"
    with open(rf.config_path, "w") as f:
        json.dump(cfg, f)
    rf.proc.send_signal(signal.SIGHUP)
    until(lambda: "reload rejected" in rf.log(), timeout=30, what="the reload rejected")
    last = rf.log().split("reload rejected")[-1].splitlines()[0].replace('\\"', '"')
    assert '"cluster" cannot change on reload' in last, last
    status, doc = readyz(rf)
    assert status == 200 and doc["detail"].startswith(f"degraded: Redis 127.0.0.1:{dead} unreachable"), doc
