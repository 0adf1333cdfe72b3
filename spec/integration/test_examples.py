"""The deployment examples are what regfacade and the runtimes accept:

- every regfacade config under docker/ and examples/deploy/ (and the one
  embedded in the Kubernetes DaemonSet's ConfigMap) passes `regfacade check`
  (TLS file paths are pointed at a generated test certificate first);
- containerd's hosts.toml and CRI-O/podman's registries.conf parse as TOML
  with the keys the runtimes read (both are also used for real, templated,
  by test_tls.py); Docker's daemon.json has registry-mirrors URLs;
- the systemd unit passes `systemd-analyze verify` and is hardened;
- the DaemonSet and compose files parse, run regfacade unprivileged, and
  name configs and ports that agree;
- docker/Dockerfile is multi-stage on bookworm-slim, ends as a non-root user
  with a HEALTHCHECK, and its runtime stage installs the package of every
  shared library build/regfacade links (no Docker engine here: nothing is
  built).
"""
import json
import os
import re
import shutil
import subprocess
import time
import tomllib

import pytest
import yaml

from harness import REGFACADE, ROOT
from tlsutil import make_pki

DEPLOY = os.path.join(ROOT, "examples", "deploy")
DOCKER = os.path.join(ROOT, "docker")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def check_config_dict(cfg, workdir, pki, name="config.json"):
    """Write cfg (TLS files pointed at the test PKI) and run regfacade check."""
    cfg = json.loads(json.dumps(cfg))
    if "tls" in cfg:
        assert set(cfg["tls"]) <= {"cert_file", "key_file", "key_password_file", "min_version"}
        cfg["tls"]["cert_file"] = pki.cert
        cfg["tls"]["key_file"] = pki.key
    os.makedirs(workdir, exist_ok=True)
    p = os.path.join(workdir, name)
    with open(p, "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([REGFACADE, "check", "--config", p], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{name}: {r.stderr}"
    return cfg


EXAMPLE_CONFIGS = ["docker/regfacade.json", "docker/compose-regfacade.json",
                   "examples/deploy/regfacade-node.json"]


@pytest.mark.parametrize("rel", EXAMPLE_CONFIGS)
def test_example_config_passes_check(rel, tmp_path, pki):
    with open(os.path.join(ROOT, rel)) as f:
        cfg = json.load(f)
    check_config_dict(cfg, str(tmp_path), pki, name=os.path.basename(rel))


def test_containerd_hosts_toml():
    with open(os.path.join(DEPLOY, "containerd", "hosts.toml"), "rb") as f:
        doc = tomllib.load(f)
    assert doc["server"].startswith("https://")
    hosts = doc["host"]
    assert len(hosts) == 1
    (url, h), = hosts.items()
    assert url.startswith("https://127.0.0.1:")
    assert h["capabilities"] == ["pull", "resolve"]
    assert os.path.isabs(h["ca"])


def test_registries_conf():
    with open(os.path.join(DEPLOY, "containers", "registries.conf"), "rb") as f:
        doc = tomllib.load(f)
    regs = doc["registry"]
    assert len(regs) == 1
    r = regs[0]
    assert r["prefix"] == "docker.io" and r["location"] == "registry-1.docker.io"
    assert [m["location"] for m in r["mirror"]] == ["127.0.0.1:5000"]
    assert "insecure" not in r["mirror"][0]  # TLS, verified


def test_docker_daemon_json():
    with open(os.path.join(DEPLOY, "docker", "daemon.json")) as f:
        doc = json.load(f)
    assert set(doc) == {"registry-mirrors"}
    for m in doc["registry-mirrors"]:
        assert re.fullmatch(r"https?://[0-9a-z.-]+(:\d+)?", m), m


KUBE = os.path.join(DEPLOY, "kubernetes")
KUSTOMIZATIONS = ["base", "overlays/hostnetwork"]


def _kustomize(rel):
    """The manifests `kubectl apply -k` would send, rendered offline by
    kubectl's own kustomize."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl (Debian's kubernetes-client) is a test package")
    r = subprocess.run([kubectl, "kustomize", os.path.join(KUBE, rel)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize {rel}: {r.stderr}"
    return r.stdout


def _load_daemonset(rel=None):
    if rel is None:
        with open(os.path.join(KUBE, "base", "daemonset.yaml")) as f:
            text = f.read()
    else:
        text = _kustomize(rel)
    docs = [d for d in yaml.safe_load_all(text) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "DaemonSet"}
    return kinds["ConfigMap"], kinds["DaemonSet"]


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_daemonset_config_and_security(rel, tmp_path, pki):
    cm, ds = _load_daemonset(rel)
    cfg = json.loads(cm["data"]["config.json"])
    check_config_dict(cfg, str(tmp_path), pki)
    spec = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"regfacade", "reloader"}
    c = containers["regfacade"]
    port = next(p for p in c["ports"] if p["name"] == "registry")
    assert port["hostPort"] == port["containerPort"] == int(cfg["listen"].rsplit(":", 1)[1])
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[cfg["cache"]["dir"]]["name"] == "cache"
    assert os.path.dirname(cfg["tls"]["cert_file"]) in mounts
    # The config is a mounted folder: a subPath mount never sees a changed
    # ConfigMap, so a reload could not pick it up.
    assert not [m for ctr in spec["containers"] + spec["initContainers"] for m in ctr.get("volumeMounts", [])
                if "subPath" in m]
    assert os.path.dirname(c["args"][-1]) in mounts and mounts[os.path.dirname(c["args"][-1])]["name"] == "config"
    # The reloader watches the same file and can signal regfacade.
    rl = containers["reloader"]
    assert spec["shareProcessNamespace"] is True
    assert {e["name"]: e["value"] for e in rl["env"]}["CONFIG"] == c["args"][-1]
    assert rl["securityContext"]["runAsUser"] == sc["runAsUser"]
    # Metrics: their own listener, on the port the scrape annotation names.
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert cfg["metrics"]["listen"].rsplit(":", 1)[1] == ann["prometheus.io/port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    if spec.get("hostNetwork"):
        # on the host's network: loopback only, probes aimed at it
        assert cfg["listen"].startswith("127.0.0.1:") and cfg["metrics"]["listen"].startswith("127.0.0.1:")
        assert c["readinessProbe"]["httpGet"]["host"] == "127.0.0.1"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == ("HTTPS" if "tls" in cfg else "HTTP")
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    # The init container hands the cache to the same uid the server runs as.
    init = spec["initContainers"][0]
    assert f"{sc['runAsUser']}:{sc['runAsGroup']}" in " ".join(init["command"])


def test_daemonset_reloader_sends_sighup_when_the_config_changes(tmp_path):
    """The reloader sidecar's own script, run for real beside a real
    regfacade in a private PID namespace (as the pod's shared one): a
    changed config file makes regfacade reload it, an unchanged one does not."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed to give the reloader its own PID namespace")
    _, ds = _load_daemonset()
    spec = ds["spec"]["template"]["spec"]
    rl = next(c for c in spec["containers"] if c["name"] == "reloader")
    script = rl["command"][2].replace("sleep 10", "sleep 0.2")
    cfg_path = tmp_path / "config.json"
    cache = tmp_path / "cache"
    from harness import free_port
    port = free_port()
    base = {"listen": f"127.0.0.1:{port}", "cache": {"dir": str(cache)},
            "upstreams": {"up": {"url": "http://127.0.0.1:9"}}}
    cfg_path.write_text(json.dumps(base))
    log = tmp_path / "pod.log"
    # regfacade and the reloader in one new PID namespace: the reloader can
    # only see (and signal) this regfacade. Both die with the namespace.
    pod = (f'"{REGFACADE}" serve --config "{cfg_path}" & '
           f'CONFIG="{cfg_path}" sh -c \'{script}\' & wait')
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", pod],
                         stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from harness import wait_http
        wait_http(f"http://127.0.0.1:{port}/v2/", timeout=20)
        time.sleep(1)  # several reloader rounds over an unchanged file
        assert "SIGHUP" not in log.read_text()
        changed = dict(base, upstreams={"up": {"url": "http://127.0.0.1:9"}, "two": {"url": "http://127.0.0.1:10"}},
                       default_upstream="up")
        cfg_path.write_text(json.dumps(changed))
        deadline = time.time() + 20
        while time.time() < deadline and "reloaded" not in log.read_text():
            time.sleep(0.1)
        text = log.read_text()
        assert "config changed: SIGHUP to" in text and "SIGHUP: reloaded" in text, text[-3000:]
    finally:
        os.killpg(p.pid, 9)
        p.wait(timeout=10)


def test_compose_sidecar(tmp_path, pki):
    with open(os.path.join(DOCKER, "compose.yaml")) as f:
        doc = yaml.safe_load(f)
    svc = doc["services"]
    assert {"registry", "regfacade"} <= set(svc)
    rf = svc["regfacade"]
    assert rf["build"]["dockerfile"] == "docker/Dockerfile"
    assert os.path.isfile(os.path.normpath(os.path.join(DOCKER, rf["build"]["context"], "docker/Dockerfile")))
    src, dst = next((v.split(":")[0], v.split(":")[1]) for v in rf["volumes"] if v.endswith(":ro"))
    assert dst == rf["command"][-1]
    with open(os.path.join(DOCKER, src)) as f:
        cfg = json.load(f)
    check_config_dict(cfg, str(tmp_path), pki)
    ups = {u["url"] for u in cfg["upstreams"].values()}
    assert "http://registry:5000" in ups  # the sidecar's registry, by service name
    assert rf["read_only"] is True and rf["cap_drop"] == ["ALL"]


def _dockerfile_stages():
    with open(os.path.join(DOCKER, "Dockerfile")) as f:
        text = f.read()
    # Join continuation lines, drop comments.
    text = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    stages, cur = [], None
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            cur = {"from": words[1], "lines": []}
            stages.append(cur)
        cur["lines"].append(line)
    return stages


def test_dockerfile_shape():
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    assert all(s["from"] == "debian:bookworm-slim" for s in stages)
    final = stages[-1]["lines"]
    users = [l.split()[1] for l in final if l.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(l.startswith("HEALTHCHECK ") and "/healthz" in l for l in final)
    assert any(l.startswith("COPY --from=") and "regfacade" in l for l in final)
    assert any("make" in l for l in stages[0]["lines"] if l.startswith("RUN "))


# Packages every debian:bookworm-slim image has (the essential set and what
# it pulls in); anything else the binary links must be installed by name.
SLIM_BASE = {"libc6", "libgcc-s1", "libcrypt1", "zlib1g"}


def _installed_packages(lines):
    pkgs = set()
    for l in lines:
        m = re.search(r"apt-get install ([^&|;]*)", l)
        if m:
            pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


@pytest.mark.skipif(not os.path.exists(REGFACADE), reason="build/regfacade not built")
def test_dockerfile_runtime_packages_cover_the_binary():
    runtime = _installed_packages(_dockerfile_stages()[-1]["lines"])
    needed = subprocess.run(["readelf", "-d", REGFACADE], capture_output=True, text=True,
                            check=True).stdout
    libs = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", needed)
    # `make test SANITIZE=1` links the sanitizer runtimes, which no image ships.
    libs = [lib for lib in libs if not re.match(r"lib(a|ub|l|t)san\.so", lib)]
    ldd = subprocess.run(["ldd", REGFACADE], capture_output=True, text=True, check=True).stdout
    paths = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    missing = []
    for lib in libs:
        path = paths.get(lib)
        assert path, f"ldd does not resolve {lib}"
        real = os.path.realpath(path)
        owner = None
        for candidate in (path, real, real.replace("/usr/lib/", "/lib/"), path.replace("/lib/", "/usr/lib/")):
            r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if r.returncode == 0:
                owner = r.stdout.split(":")[0].strip()
                break
        assert owner, f"no Debian package owns {path}"
        if owner not in runtime and owner not in SLIM_BASE:
            missing.append(f"{lib} ({owner})")
    assert not missing, f"docker/Dockerfile's runtime stage does not install: {missing}"


SYSTEMD = os.path.join(DEPLOY, "systemd")


def _unit_for_here(tmp_path):
    """The example unit with the installed binary's path pointed at this
    build (systemd-analyze checks that every command is executable)."""
    with open(os.path.join(SYSTEMD, "regfacade.service")) as f:
        text = f.read()
    assert "/usr/local/bin/regfacade serve --config /etc/regfacade/config.json" in text
    p = tmp_path / "regfacade.service"
    p.write_text(text.replace("/usr/local/bin/regfacade", REGFACADE))
    return text, str(p)


def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze (Debian's systemd package) is a test package")
    text, unit = _unit_for_here(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=60)
    # verify exits 0 on settings it ignores, but prints them: nothing may be printed.
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["DynamicUser"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["CacheDirectory"] == "regfacade" and settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout[-4000:]


def test_systemd_config_passes_check_and_uses_the_cache_directory(tmp_path, pki):
    with open(os.path.join(SYSTEMD, "regfacade.json")) as f:
        cfg = json.load(f)
    assert cfg["cache"]["dir"] == "/var/cache/regfacade"  # the unit's CacheDirectory
    assert "user" not in cfg  # the unit starts it unprivileged already
    cfg["cache"]["dir"] = str(tmp_path / "cache")
    check_config_dict(cfg, str(tmp_path), pki)


# ---- policies to copy: each with its spec beside it and a config that runs it ----

EXAMPLES = os.path.join(ROOT, "examples")
POLICY_CONFIGS = sorted(
    [os.path.relpath(os.path.join(EXAMPLES, "recipes", f), ROOT)
     for f in os.listdir(os.path.join(EXAMPLES, "recipes")) if f.endswith(".json")]
    + ["examples/mirror.json", "examples/auth/config.json", "examples/policy-repo/config.json"])


@pytest.mark.parametrize("rel", POLICY_CONFIGS)
def test_policy_example_config_passes_check(rel):
    """The config beside each example policy is one `regfacade check`
    accepts as it is (its policy compiled, its options read, its files
    found), and names the policy beside it."""
    path = os.path.join(ROOT, rel)
    r = subprocess.run([REGFACADE, "check", "--config", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and ": ok" in r.stdout, f"{rel}: {r.stdout}{r.stderr}"
    with open(path) as f:
        policy = json.load(f)["policy"]["file"]
    assert os.path.isfile(os.path.join(os.path.dirname(path), policy)), rel


def test_every_recipe_has_its_spec_and_config_beside_it():
    recipes = [f[:-4] for f in os.listdir(os.path.join(EXAMPLES, "recipes")) if f.endswith(".lua")
               and not f.endswith("_spec.lua")]
    assert len(recipes) >= 5, recipes
    for name in recipes:
        for suffix in ("_spec.lua", ".json"):
            assert os.path.isfile(os.path.join(EXAMPLES, "recipes", name + suffix)), name + suffix
    for spec in ("mirror_spec.lua", "auth/policy_spec.lua", "policy-repo/spec/policy_spec.lua"):
        assert os.path.isfile(os.path.join(EXAMPLES, spec)), spec
    # make test-lua finds them: .busted's ROOT takes examples/
    with open(os.path.join(ROOT, ".busted")) as f:
        assert '"examples"' in f.read()


def test_readme_and_policy_docs_name_the_same_spec_to_copy():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "docs", "policy.md")) as f:
        docs = f.read()
    named = re.search(r"spec to copy[^`]*`([^`]+_spec\.lua)`", readme, re.S)
    assert named, "README.md names no spec to copy"
    spec = named.group(1)
    assert os.path.isfile(os.path.join(ROOT, spec)), spec
    assert re.search(r"spec to copy[^`]*`" + re.escape(spec) + "`", docs, re.S), f"docs/policy.md does not name {spec}"
