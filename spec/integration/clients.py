"""Real registry clients for the integration tests: skopeo, containerd + ctr,
and podman, each isolated in temp folders (no host config, no host auth).

containerd and podman run as root with their roots, state and sockets in a
temp folder; the containerd daemon is started through a ProcessGroup so it is
stopped by PID. podman runs one command at a time (no daemon), but its
container processes (conmon) are cleaned by `Podman.cleanup()`.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import images
from harness import Regfacade, log_tail

SKOPEO = "skopeo"
CTR = "ctr"
CONTAINERD = "containerd"
PODMAN = "podman"


class CmdError(RuntimeError):
    def __init__(self, argv, result):
        self.argv = argv
        self.result = result
        out = result.stdout if isinstance(result.stdout, str) else (result.stdout or b"").decode(
            errors="replace")
        err = result.stderr if isinstance(result.stderr, str) else (result.stderr or b"").decode(
            errors="replace")
        self.stdout = out
        self.stderr = err
        super().__init__(f"{' '.join(argv)} exited {result.returncode}\n"
                         f"stdout: {out[-4000:]}\nstderr: {err[-4000:]}")


def _run(argv, check=True, timeout=300, env=None):
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and r.returncode != 0:
        raise CmdError(argv, r)
    return r


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

def _creds_args(prefix, creds):
    if creds:
        return [f"--{prefix}creds", creds]
    return [f"--{prefix}no-creds"]


def skopeo_copy(src, dst, src_creds=None, all_images=False, extra=(), check=True, timeout=600):
    """skopeo copy SRC DST (docker:// sources without TLS verification and,
    unless src_creds is given, without any credentials)."""
    argv = [SKOPEO, "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
            "--dest-tls-verify=false"]
    if src.startswith("docker://"):
        argv += _creds_args("src-", src_creds)
    if all_images:
        argv.append("--all")
    argv += list(extra) + [src, dst]
    return _run(argv, check=check, timeout=timeout)


def skopeo_inspect(ref, raw=False, creds=None, check=True, timeout=120):
    """skopeo inspect [--raw] docker://REF; returns the parsed JSON (raw=False)
    or the manifest bytes (raw=True)."""
    argv = [SKOPEO, "inspect", "--tls-verify=false"] + _creds_args("", creds)
    if raw:
        argv.append("--raw")
    argv.append(ref if "://" in ref else f"docker://{ref}")
    r = subprocess.run(argv, capture_output=True, timeout=timeout)
    if check and r.returncode != 0:
        raise CmdError(argv, r)
    if r.returncode != 0:
        return r
    return r.stdout if raw else json.loads(r.stdout)


# --------------------------------------------------------------------------
# containerd + ctr
# --------------------------------------------------------------------------

class Containerd:
    """A containerd daemon with root, state, socket and config in workdir."""

    def __init__(self, group, workdir, name="containerd"):
        self.group = group
        self.workdir = workdir
        self.name = name
        os.makedirs(workdir, exist_ok=True)
        self.root = os.path.join(workdir, "root")
        self.state = os.path.join(workdir, "state")
        self.socket = os.path.join(workdir, "c.sock")
        if len(self.socket) > 100:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket}")
        self.config_path = os.path.join(workdir, "config.toml")
        with open(self.config_path, "w") as f:
            f.write(f'''version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{os.path.join(workdir, "opt")}"
''')
        self.proc = None
        self._ns_counter = 0

    def start(self, timeout=30):
        self.proc = self.group.start(self.name, [CONTAINERD, "--config", self.config_path])
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}:\n"
                                   f"{log_tail(self.proc)}")
            if os.path.exists(self.socket):
                r = subprocess.run([CTR, "-a", self.socket, "version"], capture_output=True,
                                   text=True, timeout=10)
                if r.returncode == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not come up:\n{log_tail(self.proc)}")

    def stop(self):
        if self.proc is not None:
            self.group.stop(self.proc, timeout=20)
            self.proc = None
        self._stop_shims()

    def _stop_shims(self):
        """containerd-shim processes outlive the daemon by design; stop the
        ones this daemon started (their command line names our socket)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and self.socket.encode() in argv:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log(self):
        return log_tail(self.proc, 20000) if self.proc else ""

    def new_namespace(self, prefix="t"):
        """A fresh containerd namespace: nothing cached from earlier pulls."""
        self._ns_counter += 1
        return f"{prefix}{os.getpid()}-{self._ns_counter}-{int(time.time() * 1000) % 100000}"

    def ctr(self, *args, namespace="default", check=True, timeout=300):
        return _run([CTR, "-a", self.socket, "-n", namespace] + list(args), check=check,
                    timeout=timeout)

    def pull(self, ref, namespace="default", plain_http=True, hosts_dir=None, platform=None,
             check=True, timeout=300):
        """ctr images pull (fetch + unpack into the default snapshotter)."""
        args = ["images", "pull"]
        if plain_http:
            args.append("--plain-http")
        if hosts_dir:
            args += ["--hosts-dir", hosts_dir]
        if platform:
            args += ["--platform", platform]
        args.append(ref)
        return self.ctr(*args, namespace=namespace, check=check, timeout=timeout)

    def run(self, ref, container_id, *cmd, namespace="default", check=True, timeout=120):
        """ctr run --rm IMAGE ID CMD...; returns the CompletedProcess."""
        return self.ctr("run", "--rm", ref, container_id, *cmd, namespace=namespace, check=check,
                        timeout=timeout)

    def remove_namespace(self, namespace):
        """Best effort: remove the images and the namespace (frees content)."""
        r = self.ctr("images", "ls", "-q", namespace=namespace, check=False)
        refs = [x for x in r.stdout.split() if x]
        if refs:
            self.ctr("images", "rm", "--sync", *refs, namespace=namespace, check=False)
        self.ctr("namespaces", "rm", namespace, check=False)


def write_hosts_dir(workdir, upstream_host, mirror_url, server=None):
    """A containerd hosts dir: for references on upstream_host (e.g.
    "127.0.0.1:5001" or "docker.io"), pull and resolve through mirror_url
    (e.g. "http://127.0.0.1:5000"). server is the fallback (default: a dead
    port, so a pull cannot quietly bypass the mirror). containerd adds
    `?ns=upstream_host` to the mirror's requests."""
    hosts_dir = os.path.join(workdir, "hosts.d")
    d = os.path.join(hosts_dir, upstream_host)
    os.makedirs(d, exist_ok=True)
    server = server or "http://127.0.0.1:9"
    with open(os.path.join(d, "hosts.toml"), "w") as f:
        f.write(f'''server = "{server}"

[host."{mirror_url}"]
  capabilities = ["pull", "resolve"]
''')
    return hosts_dir


# --------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------

class Podman:
    """podman (as root) with storage, config, registries and auth all in
    workdir. `insecure` lists host:port entries to reach over plain HTTP."""

    def __init__(self, workdir, insecure=()):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.root = os.path.join(workdir, "root")
        # podman refuses a runroot longer than 50 characters: keep it short.
        self.runroot = tempfile.mkdtemp(prefix="rf-pm-")
        self.tmpdir = os.path.join(workdir, "tmp")
        for d in (self.root, self.runroot, self.tmpdir):
            os.makedirs(d, exist_ok=True)
        self.storage_conf = os.path.join(workdir, "storage.conf")
        self.containers_conf = os.path.join(workdir, "containers.conf")
        self.registries_conf = os.path.join(workdir, "registries.conf")
        self.auth_file = os.path.join(workdir, "auth.json")
        with open(self.storage_conf, "w") as f:
            f.write(f'''[storage]
driver = "vfs"
runroot = "{self.runroot}"
graphroot = "{self.root}"
''')
        with open(self.containers_conf, "w") as f:
            f.write(f'''[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{os.path.join(workdir, "events.log")}"
tmp_dir = "{self.tmpdir}"
volume_path = "{os.path.join(self.root, "volumes")}"
static_dir = "{os.path.join(self.root, "libpod")}"
''')
        with open(self.auth_file, "w") as f:
            f.write("{}")
        self.insecure = []
        self.set_insecure(insecure)

    def set_insecure(self, hosts):
        self.insecure = list(hosts)
        with open(self.registries_conf, "w") as f:
            f.write('unqualified-search-registries = []\n')
            for h in self.insecure:
                f.write(f'\n[[registry]]\nlocation = "{h}"\ninsecure = true\n')

    @property
    def env(self):
        return {
            "CONTAINERS_STORAGE_CONF": self.storage_conf,
            "CONTAINERS_CONF": self.containers_conf,
            "CONTAINERS_REGISTRIES_CONF": self.registries_conf,
            "REGISTRY_AUTH_FILE": self.auth_file,
            "TMPDIR": self.tmpdir,
        }

    def podman(self, *args, check=True, timeout=300):
        argv = [PODMAN, "--root", self.root, "--runroot", self.runroot, "--tmpdir", self.tmpdir,
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                "--events-backend", "file"] + list(args)
        return _run(argv, check=check, timeout=timeout, env=self.env)

    def pull(self, ref, check=True, timeout=300):
        return self.podman("pull", "--tls-verify=false", ref, check=check, timeout=timeout)

    def run(self, ref, *cmd, check=True, timeout=120):
        return self.podman("run", "--rm", "--network", "none", "--pull", "never", ref, *cmd,
                           check=check, timeout=timeout)

    def rmi_all(self):
        self.podman("rmi", "--all", "--force", check=False)

    def cleanup(self):
        """Stop and remove anything left (containers, then images)."""
        self.podman("rm", "--all", "--force", "--time", "0", check=False)
        self.rmi_all()
        # vfs layers are plain folders; leave them to the temp dir's removal.
        _umount_under(self.runroot)
        shutil.rmtree(self.runroot, ignore_errors=True)


def _umount_under(root):
    """Unmount (lazily) whatever is still mounted below root."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
    except OSError:
        return
    for m in sorted((m for m in mounts if m.startswith(root.rstrip("/") + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


# --------------------------------------------------------------------------
# plain HTTP against regfacade, and regfacade configs for real upstreams
# --------------------------------------------------------------------------

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def error_codes(self):
        try:
            return [e.get("code") for e in self.json().get("errors", [])]
        except (ValueError, AttributeError):
            return []

    def __repr__(self):
        return (f"<{self.status} {dict(self.headers)} "
                f"{self.body[:600].decode('utf-8', 'replace')!r}>")


def http_request(url, method="GET", headers=None, timeout=60):
    """One request, no redirects followed, no exception on HTTP errors."""
    import http.client
    import urllib.parse
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + (("?" + u.query) if u.query else "")
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return Response(r.status, r.headers, body)
    finally:
        conn.close()


def facade_config(cache_dir, upstreams, default_upstream=None, tag_ttl_seconds=3600, **extra):
    """A regfacade config (CONTRACT.md) for the default mirror policy.
    upstreams: {name: {"url": ..., ...}}."""
    cfg = {
        "cache": {"dir": cache_dir, "tag_ttl_seconds": tag_ttl_seconds},
        "upstreams": upstreams,
    }
    if default_upstream:
        cfg["default_upstream"] = default_upstream
    cfg.update(extra)
    return cfg


def cache_blob_path(cache_dir, digest):
    """<cache.dir>/blobs/sha256/<2 hex>/<64 hex> (CONTRACT.md)."""
    algo, hexd = digest.split(":", 1)
    return os.path.join(cache_dir, "blobs", algo, hexd[:2], hexd)


# --------------------------------------------------------------------------
# regfacade helpers shared by the client and upstream-auth tests
# --------------------------------------------------------------------------

def start_facade(procs, tmp_path, upstreams, default_upstream=None, name="regfacade", env=None, **extra):
    cache = str(tmp_path / f"{name}-cache")
    cfg = facade_config(cache, upstreams, default_upstream, **extra)
    rf = Regfacade(procs, str(tmp_path), cfg, name=name, env=env)
    rf.cache_dir = cache
    return rf.start()


def diag(rf, *peers):
    out = [f"--- {rf.name} log ---\n{rf.log()[-6000:]}"]
    for p in peers:
        if p is not None and getattr(p, "proc", None) is not None:
            out.append(f"--- {p.name} log ---\n{p.log()[-3000:]}")
    return "\n".join(out)


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def expected_cached(info):
    """Digest -> size of everything a full pull of info puts in the cache:
    blobs (configs, layers) and manifests (index and children)."""
    want = dict(info["blobs"])
    want[info["manifest_digest"]] = info["manifest_size"]
    for child in info.get("children", {}).values():
        want[child["manifest_digest"]] = child["manifest_size"]
    return want


def assert_cached(rf, info):
    missing = []
    for digest, size in expected_cached(info).items():
        p = cache_blob_path(rf.cache_dir, digest)
        if not os.path.isfile(p):
            missing.append(f"{digest} (no {p})")
        elif os.path.getsize(p) != size:
            missing.append(f"{digest} ({p} has {os.path.getsize(p)} bytes, want {size})")
        else:
            with open(p, "rb") as f:
                h = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if "sha256:" + h.hexdigest() != digest:
                missing.append(f"{digest} ({p} holds other bytes)")
    assert not missing, "not in the cache as CONTRACT.md says:\n" + "\n".join(missing)


def oci_layout_tag(layout_dir, tag):
    lay = images.Layout(layout_dir)
    return lay, lay.descriptor(tag)


def check_copied_layout(layout_dir, tag, info, preserved):
    """The oci: copy holds the image: same manifest and config digests when
    preserved (OCI sources), and always the same layer digests."""
    lay, desc = oci_layout_tag(layout_dir, tag)
    if preserved:
        assert desc["digest"] == info["manifest_digest"], (desc, info["manifest_digest"])
    m = json.loads(lay.read_blob(desc["digest"]))
    if "manifests" in m:
        got = {d["platform"]["architecture"]: d["digest"] for d in m["manifests"]}
        want = {a: c["manifest_digest"] for a, c in info["children"].items()}
        assert got == want
        for arch, child in info["children"].items():
            cm = json.loads(lay.read_blob(got[arch]))
            assert cm["config"]["digest"] == child["config_digest"]
            assert [l["digest"] for l in cm["layers"]] == [l["digest"] for l in child["layers"]]
    else:
        if preserved:  # a schema2 -> OCI conversion re-serializes the config
            assert m["config"]["digest"] == info["config_digest"]
        assert [l["digest"] for l in m["layers"]] == [l["digest"] for l in info["layers"]]


# --------------------------------------------------------------------------
# Docker Engine (Debian's docker.io): dockerd with its own roots and socket
# --------------------------------------------------------------------------

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's client (another `docker` may come first on PATH)


class Dockerd:
    """A dockerd with data root, exec root, socket and daemon.json in
    workdir: no iptables, no bridge (containers run with --network none),
    vfs storage. It starts its own containerd under exec_root; both are in
    the ProcessGroup's process group and stop with it."""

    def __init__(self, group, workdir, insecure=(), mirrors=(), name="dockerd"):
        self.group = group
        self.workdir = workdir
        self.name = name
        os.makedirs(workdir, exist_ok=True)
        self.socket = os.path.join(workdir, "d.sock")
        if len(self.socket) > 100:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket}")
        self.config_path = os.path.join(workdir, "daemon.json")
        with open(self.config_path, "w") as f:
            json.dump({"iptables": False, "ip6tables": False, "ip-forward": False, "ip-masq": False,
                       "bridge": "none", "storage-driver": "vfs",
                       "insecure-registries": list(insecure), "registry-mirrors": list(mirrors),
                       "max-concurrent-downloads": 3}, f)
        self.proc = None

    def start(self, timeout=60):
        argv = [DOCKERD, "--config-file", self.config_path,
                "--data-root", os.path.join(self.workdir, "data"),
                "--exec-root", os.path.join(self.workdir, "exec"),
                "--pidfile", os.path.join(self.workdir, "dockerd.pid"),
                "-H", f"unix://{self.socket}"]
        self.proc = self.group.start(self.name, argv)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{log_tail(self.proc)}")
            if os.path.exists(self.socket):
                r = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", "version"],
                                   capture_output=True, text=True, timeout=10)
                if r.returncode == 0:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not come up:\n{log_tail(self.proc)}")

    def stop(self):
        if self.proc is not None:
            self.group.stop(self.proc, timeout=30)
            self.proc = None
        _umount_under(os.path.join(self.workdir, "data"))
        _umount_under(os.path.join(self.workdir, "exec"))

    def log(self):
        return log_tail(self.proc, 20000) if self.proc else ""

    def docker(self, *args, check=True, timeout=300):
        # DOCKER_CONFIG: no host credentials or settings reach the test.
        env = {"DOCKER_CONFIG": os.path.join(self.workdir, "client")}
        os.makedirs(env["DOCKER_CONFIG"], exist_ok=True)
        return _run([DOCKER, "-H", f"unix://{self.socket}"] + list(args), check=check, timeout=timeout,
                    env=env)

    def pull(self, ref, check=True, timeout=300):
        return self.docker("pull", ref, check=check, timeout=timeout)

    def run(self, ref, *cmd, check=True, timeout=120):
        return self.docker("run", "--rm", "--network", "none", ref, *cmd, check=check, timeout=timeout)

    def remove_images(self):
        r = self.docker("images", "-q", "--no-trunc", check=False)
        ids = sorted(set(r.stdout.split()))
        if ids:
            self.docker("rmi", "-f", *ids, check=False)
