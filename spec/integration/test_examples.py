"""The deployment examples are what regfacade and the runtimes accept:

- every regfacade config under docker/ and examples/deploy/ (and the one
  embedded in the Kubernetes DaemonSet's ConfigMap) passes `regfacade check`
  (TLS file paths are pointed at a generated test certificate first);
- containerd's hosts.toml and CRI-O/podman's registries.conf parse as TOML
  with the keys the runtimes read (both are also used for real, templated,
  by test_tls.py); Docker's daemon.json has registry-mirrors URLs;
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


def _load_daemonset():
    with open(os.path.join(DEPLOY, "kubernetes", "daemonset.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "DaemonSet"}
    return kinds["ConfigMap"], kinds["DaemonSet"]


def test_daemonset_config_and_security(tmp_path, pki):
    cm, ds = _load_daemonset()
    cfg = json.loads(cm["data"]["config.json"])
    check_config_dict(cfg, str(tmp_path), pki)
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    port = next(p for p in c["ports"] if p["name"] == "registry")
    assert port["hostPort"] == port["containerPort"] == int(cfg["listen"].rsplit(":", 1)[1])
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[cfg["cache"]["dir"]]["name"] == "cache"
    assert os.path.dirname(cfg["tls"]["cert_file"]) in mounts
    assert c["args"][-1] in mounts  # the config file
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == ("HTTPS" if "tls" in cfg else "HTTP")
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    # The init container hands the cache to the same uid the server runs as.
    init = spec["initContainers"][0]
    assert f"{sc['runAsUser']}:{sc['runAsGroup']}" in " ".join(init["command"])


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
