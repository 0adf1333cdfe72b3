"""What a client is told when the upstream fails or refuses (CONTRACT.md,
README "upstream_client"):

- A name that stops resolving and resolves again: while it does not, the
  client gets 502 UNKNOWN naming "could not resolve host NAME", after the
  documented retries; once it resolves again, pulls work again without a
  reload. regfacade runs in a private mount namespace whose /etc/hosts is a
  file the test rewrites, so nothing outside the test sees the name.
- One mapping of upstream answers for manifests, blobs (GET and HEAD, cold)
  and tag lists: refused credentials -> 403 DENIED, 429 -> 429
  TOOMANYREQUESTS with the upstream's Retry-After, 5xx retried; an upstream
  404 is the spec's 404 and is logged at info, never at error. blobserve
  answers the same statuses (text bodies) with the same Retry-After.
"""
import json
import os
import shutil
import socket
import time

import pytest

import types

import clients
from clients import diag
from conftest import HTPASSWD_USER, TOKEN_PASSWORD, TOKEN_USER
from fake_upstream import assert_oci_error, request
from harness import Regfacade, free_port, wait_http

HOSTNAME = "upstream.regfacade.test"  # .test is reserved: no DNS answers it
AUTH_HOSTNAME = "auth.regfacade.test"  # a token realm's host


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
    the file in place (the bind mount holds its inode); up maps both test
    names to 127.0.0.1."""

    def __init__(self, path):
        self.path = path
        self.set(False)

    def set(self, up):
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        if up:
            lines.append(f"127.0.0.1 {HOSTNAME} {AUTH_HOSTNAME}")
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
    for name in (HOSTNAME, AUTH_HOSTNAME):
        try:
            socket.getaddrinfo(name, 80)
            pytest.skip(f"{name} resolves outside the test: it cannot be switched off")
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


def test_token_realm_that_does_not_resolve_is_retried_and_named(procs, tmp_path, private_hosts,
                                                                token_registry, token_server):
    # The registry resolves (it is named by address); the token realm it
    # names does not, until the test maps it.
    realm = types.SimpleNamespace(realm=f"http://{AUTH_HOSTNAME}:{token_server.port}/token",
                                  service=token_server.service, issuer=token_server.issuer,
                                  cert_path=token_server.cert_path)
    reg = token_registry.clone(procs, str(tmp_path / "reg"), name="registry-realm", token_server=realm)
    pf = tmp_path / "password"
    pf.write_text(TOKEN_PASSWORD)
    os.chmod(pf, 0o600)
    retries = 2
    cfg = clients.facade_config(str(tmp_path / "cache"),
                                {"tok": {"url": reg.url, "username": TOKEN_USER, "password_file": str(pf)}},
                                upstream_client={"retries": retries})
    rf = Regfacade(procs, str(tmp_path), cfg, wrap=private_hosts.wrap)
    private_hosts.set(False)
    rf.start()
    info = token_registry.images["oci"]
    r = _manifest(rf, info)
    want = f"could not resolve host {AUTH_HOSTNAME}"
    assert r.status == 502 and r.error_codes()[:1] == ["UNKNOWN"], f"{r!r}\n{diag(rf)}"
    assert want in _message(r) and "token request" in _message(r), f"{r!r}\n{diag(rf)}"
    retried = [e for e in _log_entries(rf) if "retrying" in e.get("msg", "") and want in e.get("msg", "")]
    assert len(retried) == retries, f"a realm that does not resolve is a transient failure:\n{diag(rf)}"

    private_hosts.set(True)
    _pull(rf, info, tmp_path, "realm-up")


# ---------------------------------------------------------------------------
# one mapping of upstream answers


def _log_entries(rf):
    with open(rf.proc.log_path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


@pytest.mark.parametrize("password", ["wrong-password", None])
def test_refused_tag_list_is_403_denied_like_manifests(password, procs, tmp_path, htpasswd_registry):
    info = htpasswd_registry.images["oci"]
    up = {"url": htpasswd_registry.url}
    if password:
        pf = tmp_path / "password"
        pf.write_text(password)
        os.chmod(pf, 0o600)
        up.update(username=HTPASSWD_USER, password_file=str(pf))
    rf = clients.start_facade(procs, tmp_path, {"reg": up})
    for path in (f"/v2/{info['repo']}/tags/list", f"/v2/{info['repo']}/manifests/{info['tag']}"):
        r = request(rf.host, "GET", path)
        assert_oci_error(r, 403, "DENIED")
    r = request(rf.host, "HEAD", f"/v2/{info['repo']}/blobs/{info['layers'][0]['digest']}")
    assert r.status == 403, r


def test_tag_list_5xx_is_retried(fake_upstream, fake_facade):
    fake_upstream.set_tags("acme/app", ["v1", "v2"])
    path = "/v2/acme/app/tags/list"
    fake_upstream.misbehave(path, "status", status=503, times=2)
    rf = fake_facade()
    r = request(rf.host, "GET", path)
    assert r.status == 200 and r.json()["tags"] == ["v1", "v2"], f"{r!r}\n{rf.log()[-3000:]}"
    assert fake_upstream.count("GET", path) == 3


@pytest.mark.parametrize("what", ["manifest-get", "manifest-head", "blob-get", "blob-head", "tags"])
def test_upstream_429_is_429_with_its_retry_after(what, fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[3000])
    layer = img.layers[0].digest
    up_path, method, path = {
        "manifest-get": ("/v2/acme/app/manifests/v1", "GET", "/v2/acme/app/manifests/v1"),
        "manifest-head": ("/v2/acme/app/manifests/v1", "HEAD", "/v2/acme/app/manifests/v1"),
        "blob-get": (f"/v2/acme/app/blobs/{layer}", "GET", f"/v2/acme/app/blobs/{layer}"),
        "blob-head": (f"/v2/acme/app/blobs/{layer}", "HEAD", f"/v2/acme/app/blobs/{layer}"),
        "tags": ("/v2/acme/app/tags/list", "GET", "/v2/acme/app/tags/list"),
    }[what]
    # 120 s is past the retry budget: passed on at once, not waited out.
    fake_upstream.misbehave(up_path, "status", status=429, retry_after=120)
    rf = fake_facade(config={"upstream_client": {"retry_budget_seconds": 5}})
    r = request(rf.host, method, path)
    assert r.status == 429, f"{r!r}\n{rf.log()[-3000:]}"
    assert r.header("Retry-After") == "120", r
    if method == "GET":
        assert_oci_error(r, 429, "TOOMANYREQUESTS")


def test_upstream_404_is_an_answer_logged_at_info(fake_upstream, fake_facade):
    fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade()
    missing = "sha256:" + "0" * 64
    assert_oci_error(request(rf.host, "GET", f"/v2/acme/app/blobs/{missing}"), 404, "BLOB_UNKNOWN")
    assert request(rf.host, "HEAD", f"/v2/acme/app/blobs/{missing}").status == 404
    assert_oci_error(request(rf.host, "GET", "/v2/acme/app/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(request(rf.host, "GET", "/v2/acme/none/tags/list"), 404, "NAME_UNKNOWN")
    log = _log_entries(rf)
    about = [e for e in log if missing in e.get("msg", "") and e.get("msg") != "access"]
    assert about and all(e["level"] == "info" for e in about), about
    errors = [e for e in log if e.get("level") == "error"]
    assert not errors, errors


def _blobserve(fake_facade, **client):
    port = free_port()
    rf = fake_facade(config={"blobserve": {"listen": f"127.0.0.1:{port}", "repositories": ["acme/app"]},
                             "upstream_client": dict({"retry_budget_seconds": 5}, **client)})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=20, ok=(200,))
    return rf, port


@pytest.mark.parametrize("what", ["manifest", "layer"])
def test_blobserve_passes_429_on_with_its_retry_after(what, fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[3000])
    up_path = "/v2/acme/app/manifests/v1" if what == "manifest" else f"/v2/acme/app/blobs/{img.layers[0].digest}"
    fake_upstream.misbehave(up_path, "status", status=429, retry_after=120)
    rf, port = _blobserve(fake_facade)
    r = request(f"127.0.0.1:{port}", "GET", "/acme/app:v1/layer0/data.bin")
    assert r.status == 429, f"{r!r}\n{rf.log()[-3000:]}"
    assert r.header("Retry-After") == "120", r
    assert b"rate-limiting" in r.body, r
    # Once the upstream answers again, so does blobserve (nothing failed is kept).
    fake_upstream.behave()
    r = request(f"127.0.0.1:{port}", "GET", "/acme/app:v1/layer0/data.bin")
    assert r.status == 200 and len(r.body) == 3000, f"{r!r}\n{rf.log()[-3000:]}"


def test_blobserve_layer_5xx_is_retried_and_404_is_404(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[3000])
    fake_upstream.misbehave(f"/v2/acme/app/blobs/{img.layers[0].digest}", "status", status=503, times=1)
    gone = fake_upstream.add_image("acme/app", "gone", layer_sizes=[2000], seed="gone")
    fake_upstream.misbehave(f"/v2/acme/app/blobs/{gone.layers[0].digest}", "status", status=404)
    rf, port = _blobserve(fake_facade)
    r = request(f"127.0.0.1:{port}", "GET", "/acme/app:v1/layer0/data.bin")
    assert r.status == 200 and len(r.body) == 3000, f"{r!r}\n{rf.log()[-3000:]}"
    r = request(f"127.0.0.1:{port}", "GET", "/acme/app:gone/layer0/data.bin")
    assert r.status == 404 and b"is unknown to upstream" in r.body, f"{r!r}\n{rf.log()[-3000:]}"
    errors = [e for e in _log_entries(rf) if e.get("level") == "error"]
    assert not errors, errors
