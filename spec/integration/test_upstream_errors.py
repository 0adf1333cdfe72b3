"""What a client is told when the upstream fails or refuses (CONTRACT.md,
README "upstream_client"):

- A name that stops resolving and resolves again: while it does not, the
  client gets 502 UNKNOWN naming "could not resolve host NAME", after the
  documented retries; once it resolves again, pulls work again without a
  reload. regfacade runs in a private mount namespace whose /etc/hosts is a
  file the test rewrites, so nothing outside the test sees the name.
"""
import json
import os
import shutil
import socket
import time

import pytest

import clients
from clients import diag
from harness import Regfacade

HOSTNAME = "upstream.regfacade.test"  # .test is reserved: no DNS answers it


# ---------------------------------------------------------------------------
# a host name the test switches on and off


def _hosts_from_files_first():
    """True when /etc/nsswitch.conf asks the hosts file before anything else."""
    try:
        with open("/etc/nsswitch.conf") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.strip() == "hosts":
                    return rest.split()[:1] == ["files"]
    except OSError:
        pass
    return False


class PrivateHosts:
    """An /etc/hosts for one process tree: `wrap` runs a command in its own
    mount namespace with this file bound over /etc/hosts. set(up) rewrites
    the file in place (the bind mount holds its inode)."""

    def __init__(self, path):
        self.path = path
        self.set(False)

    def set(self, up):
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        if up:
            lines.append(f"127.0.0.1 {HOSTNAME}")
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def wrap(self):
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', self.path]


@pytest.fixture
def private_hosts(tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs root with unshare and mount (a private mount namespace for /etc/hosts)")
    if not _hosts_from_files_first():
        pytest.skip("/etc/nsswitch.conf does not ask the hosts file first")
    try:
        socket.getaddrinfo(HOSTNAME, 80)
        pytest.skip(f"{HOSTNAME} resolves outside the test: it cannot be switched off")
    except socket.gaierror:
        pass
    return PrivateHosts(str(tmp_path / "hosts"))


def _manifest(rf, info):
    return clients.http_request(f"{rf.url}/v2/{info['repo']}/manifests/{info['tag']}",
                                headers={"Accept": clients.MANIFEST_ACCEPT})


def _message(resp):
    try:
        return " ".join(e.get("message", "") for e in resp.json().get("errors", []))
    except (ValueError, AttributeError):
        return ""


def _pull(rf, info, tmp_path, out):
    d = str(tmp_path / out)
    r = clients.skopeo_copy(f"docker://{rf.host}/{info['repo']}:{info['tag']}", f"oci:{d}:{info['tag']}",
                            extra=["--preserve-digests"], check=False)
    assert r.returncode == 0, f"pull {info['repo']}:{info['tag']} failed: {r.stderr}\n{diag(rf)}"
    clients.check_copied_layout(d, info["tag"], info, preserved=True)


def test_dns_failure_names_the_host_and_does_not_poison_the_upstream(procs, tmp_path, private_hosts,
                                                                     plain_registry):
    reg = plain_registry.clone(procs, str(tmp_path / "reg"), name="registry-dns")
    retries = 2
    cfg = clients.facade_config(str(tmp_path / "cache"),
                                {"dns": {"url": f"http://{HOSTNAME}:{reg.port}"}},
                                tag_ttl_seconds=0,  # every tag resolution asks the upstream
                                upstream_client={"retries": retries})
    cfg["cache"]["stale_max_seconds"] = 0  # no stale answer stands in for the failure
    rf = Regfacade(procs, str(tmp_path), cfg, wrap=private_hosts.wrap)

    # Up: the name resolves (inside regfacade's namespace only), a pull works.
    private_hosts.set(True)
    rf.start()
    first, second = plain_registry.images["oci"], plain_registry.images["schema2"]
    _pull(rf, first, tmp_path, "up")

    # Down: the name is gone. The registry stops too, so no kept-alive
    # connection hides the failure; until libcurl's DNS cache forgets the
    # address (60 s), connecting is refused. Then the failure is the name.
    private_hosts.set(False)
    reg.stop()
    deadline = time.time() + 240
    while True:
        r = _manifest(rf, first)
        msg = _message(r)
        refused = "connect" in msg.lower() and "resolve" not in msg.lower()
        if r.status != 200 and not refused:
            break
        assert time.time() < deadline, f"no failure other than a refused connection: {r!r}\n{diag(rf)}"
        time.sleep(1)
    want = f"could not resolve host {HOSTNAME}"
    for _ in range(2):  # the failing request, and the next one: the same clear answer
        assert r.status in (502, 503), f"{r!r}\n{diag(rf)}"
        assert r.error_codes()[:1] == ["UNKNOWN"], r
        assert want in msg, f"the client is not told the host does not resolve: {r!r}\n{diag(rf)}"
        assert "libcurl" not in msg, r
        r = _manifest(rf, first)
        msg = _message(r)
    r = clients.http_request(f"{rf.url}/v2/{second['repo']}/tags/list")
    assert r.status == 502 and want in _message(r), f"{r!r}\n{diag(rf)}"

    # Retried as upstream_client.retries says, and logged with the real cause.
    log = [json.loads(line) for line in open(rf.proc.log_path) if line.startswith("{")]
    retried = [e for e in log if "retrying" in e.get("msg", "") and want in e.get("msg", "")]
    assert len(retried) >= retries, f"expected {retries} retries naming the host:\n{diag(rf)}"

    # Up again: the name resolves and the registry answers; no SIGHUP.
    private_hosts.set(True)
    reg.start()
    r = _manifest(rf, first)
    assert r.status == 200, f"the upstream stays broken after DNS works again: {r!r}\n{diag(rf)}"
    _pull(rf, second, tmp_path, "up-again")  # cold blobs: the fetch path too
    r = clients.http_request(f"{rf.url}/v2/{second['repo']}/tags/list")
    assert r.status == 200 and second["tag"] in r.json()["tags"], r
