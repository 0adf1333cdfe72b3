"""TLS serving (docs/security.md, "tls" config section): regfacade serves
HTTPS from PEM files named in the config; containerd pulls through it with a
hosts.toml carrying the CA (the example in examples/deploy/containerd/,
templated), podman pulls with --cert-dir (directly, and through the
registries.conf example in examples/deploy/containers/); bad TLS configs are
refused by `regfacade check` with a message naming the key, never the
secret."""
import json
import os
import shutil
import socket
import ssl
import subprocess

import pytest

import clients
import images
from clients import diag
from harness import ROOT, free_port
from tlsutil import (check_config, https_request, make_pki, start_tls_facade, tls_section)

EXAMPLES = os.path.join(ROOT, "examples", "deploy")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def test_tls_serves_and_refuses_plain_http(procs, tmp_path, pki, fake_upstream):
    img = fake_upstream.add_image("acme/tls", "v1", layer_sizes=[3000])
    rf = start_tls_facade(procs, tmp_path, pki, {"fake": {"url": fake_upstream.url}})
    st, h, body = https_request(f"{rf.url}/v2/", pki.ca)
    assert st == 200 and h["Docker-Distribution-API-Version"] == "registry/2.0"
    st, h, body = https_request(f"{rf.url}/v2/acme/tls/manifests/v1", pki.ca,
                                headers={"Accept": clients.MANIFEST_ACCEPT})
    assert st == 200 and body == img.manifest, diag(rf)
    st, h, body = https_request(f"{rf.url}/v2/acme/tls/blobs/{img.layers[0].digest}", pki.ca,
                                headers={"Range": "bytes=10-19"})
    assert st == 206 and body == img.layers[0].data[10:20]

    # Plain HTTP on the TLS port gets no HTTP answer; the server goes on.
    with socket.create_connection(("127.0.0.1", rf.port), timeout=10) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = s.recv(4096)
        except OSError:
            got = b""
    assert not got.startswith(b"HTTP/1.1 200"), got
    # A client that does not trust the CA is refused by its own verification.
    with pytest.raises(ssl.SSLError):
        ctx = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", rf.port), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                pass
    st, _, _ = https_request(f"{rf.url}/v2/", pki.ca)
    assert st == 200


def test_tls_encrypted_key_and_min_version(procs, tmp_path, pki, fake_upstream):
    rf = start_tls_facade(procs, tmp_path, pki, {"fake": {"url": fake_upstream.url}},
                          tls=tls_section(pki, key_file=pki.enc_key,
                                          key_password_file=pki.key_password_file,
                                          min_version="1.3"))
    st, _, _ = https_request(f"{rf.url}/v2/", pki.ca)
    assert st == 200
    with pytest.raises(ssl.SSLError):
        https_request(f"{rf.url}/v2/", pki.ca, max_version=ssl.TLSVersion.TLSv1_2)
    st, _, _ = https_request(f"{rf.url}/v2/", pki.ca)
    assert st == 200
    assert pki.key_password not in rf.log()


def _write_config(tmp_path, tls, name="cfg.json"):
    cfg = {"cache": {"dir": str(tmp_path / "cache")},
           "upstreams": {"up": {"url": "http://127.0.0.1:9"}}, "tls": tls}
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return str(p)


def test_tls_config_errors(tmp_path, pki):
    with open(pki.key) as f:
        key_text = f.read()
    body = key_text.strip().splitlines()[1]  # a line of the secret key
    cases = [
        ({"cert_file": pki.cert}, "tls: cert_file and key_file are both required"),
        ({"cert_file": pki.cert, "key_file": pki.key, "ciphers": "x"}, 'tls.ciphers: unknown key (allowed: cert_file, key_file, key_password_file, min_version)'),
        ({"cert_file": str(tmp_path / "nope.crt"), "key_file": pki.key}, "tls.cert_file: cannot read"),
        ({"cert_file": pki.key, "key_file": pki.key}, "tls.cert_file:"),
        ({"cert_file": pki.cert, "key_file": pki.other_key}, "does not belong to the certificate"),
        ({"cert_file": pki.cert, "key_file": pki.enc_key}, "is encrypted; set tls.key_password_file"),
        ({"cert_file": pki.cert, "key_file": pki.cert}, "tls.key_file:"),
        ({"cert_file": pki.cert, "key_file": pki.key, "min_version": "1.0"}, "tls.min_version"),
        ({"cert_file": "", "key_file": pki.key}, "tls.cert_file: must be a non-empty string"),
    ]
    for tls, want in cases:
        r = check_config(_write_config(tmp_path, tls))
        assert r.returncode != 0, (tls, r.stdout)
        assert want in r.stderr, (tls, r.stderr)
        assert body not in r.stderr and body not in r.stdout
    # Relative paths resolve against the config file's folder.
    d = tmp_path / "rel"
    d.mkdir()
    shutil.copy(pki.cert, d / "server.crt")
    shutil.copy(pki.key, d / "server.key")
    os.chmod(d / "server.key", 0o600)
    r = check_config(_write_config(d, {"cert_file": "server.crt", "key_file": "server.key"}))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# real clients over TLS, using the deployment examples
# ---------------------------------------------------------------------------

def templated_hosts_toml(pki, upstream_server, facade_host):
    """examples/deploy/containerd/hosts.toml with the test's addresses: the
    fallback server is a dead port (a pull can only succeed through
    regfacade), the mirror is the facade, the CA is the test CA."""
    with open(os.path.join(EXAMPLES, "containerd", "hosts.toml")) as f:
        text = f.read()
    for old in ('server = "https://registry-1.docker.io"', "https://127.0.0.1:5000",
                "/etc/regfacade/tls/ca.crt"):
        assert old in text, f"examples/deploy/containerd/hosts.toml no longer has {old!r}"
    return (text.replace('server = "https://registry-1.docker.io"', f'server = "{upstream_server}"')
                .replace("https://127.0.0.1:5000", f"https://{facade_host}")
                .replace("/etc/regfacade/tls/ca.crt", pki.ca))


def templated_registries_conf(upstream_host, dead_host, facade_host):
    """examples/deploy/containers/registries.conf for the test: the prefix is
    the upstream registry, its location a dead port, the mirror the facade."""
    with open(os.path.join(EXAMPLES, "containers", "registries.conf")) as f:
        text = f.read()
    for old in ('prefix = "docker.io"', 'location = "registry-1.docker.io"',
                'location = "127.0.0.1:5000"'):
        assert old in text, f"examples/deploy/containers/registries.conf no longer has {old!r}"
    return (text.replace('prefix = "docker.io"', f'prefix = "{upstream_host}"')
                .replace('location = "registry-1.docker.io"', f'location = "{dead_host}"')
                .replace('location = "127.0.0.1:5000"', f'location = "{facade_host}"'))


def test_containerd_pulls_over_tls_with_hosts_toml(procs, tmp_path, pki, plain_registry, containerd):
    info = plain_registry.images["oci"]
    rf = start_tls_facade(procs, tmp_path, pki, {"up": {"url": plain_registry.url}})
    hosts_dir = tmp_path / "certs.d"
    d = hosts_dir / plain_registry.host
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(
        templated_hosts_toml(pki, f"http://127.0.0.1:{free_port()}", rf.host))
    ref = f"{plain_registry.host}/{info['repo']}:{info['tag']}"
    ns = containerd.new_namespace()
    try:
        r = containerd.pull(ref, namespace=ns, plain_http=False, hosts_dir=str(hosts_dir),
                            check=False)
        assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr}\n{diag(rf)}"
        r = containerd.run(ref, f"rf-tls-{ns}", "cat", images.TEST_FILE, namespace=ns, check=False)
        assert r.returncode == 0, f"ctr run failed: {r.stderr}"
        assert r.stdout == images.TEST_FILE_CONTENT
        for layer in info["layers"]:
            assert os.path.isfile(clients.cache_blob_path(rf.cache_dir, layer["digest"])), diag(rf)
    finally:
        containerd.remove_namespace(ns)


def test_containerd_refuses_facade_without_the_ca(procs, tmp_path, pki, plain_registry, containerd):
    info = plain_registry.images["oci"]
    rf = start_tls_facade(procs, tmp_path, pki, {"up": {"url": plain_registry.url}})
    hosts_dir = tmp_path / "certs.d"
    d = hosts_dir / plain_registry.host
    d.mkdir(parents=True)
    text = templated_hosts_toml(pki, f"http://127.0.0.1:{free_port()}", rf.host)
    (d / "hosts.toml").write_text("\n".join(l for l in text.splitlines() if "ca =" not in l) + "\n")
    ref = f"{plain_registry.host}/{info['repo']}:{info['tag']}"
    ns = containerd.new_namespace()
    try:
        r = containerd.pull(ref, namespace=ns, plain_http=False, hosts_dir=str(hosts_dir),
                            check=False, timeout=120)
        assert r.returncode != 0, "containerd pulled through an untrusted certificate"
    finally:
        containerd.remove_namespace(ns)


@pytest.fixture
def podman_tls(tmp_path, pki):
    pm = clients.Podman(str(tmp_path / "podman"))
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(pki.ca, cert_dir / "ca.crt")
    pm.cert_dir = str(cert_dir)
    try:
        yield pm
    finally:
        pm.cleanup()


def test_podman_pulls_over_tls_with_cert_dir(procs, tmp_path, pki, plain_registry, podman_tls):
    info = plain_registry.images["schema2"]
    rf = start_tls_facade(procs, tmp_path, pki, {"up": {"url": plain_registry.url}})
    pm = podman_tls
    ref = f"{rf.host}/{info['repo']}:{info['tag']}"
    r = pm.podman("pull", "--cert-dir", pm.cert_dir, ref, check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    digest = pm.podman("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()
    assert digest == info["manifest_digest"]
    r = pm.run(ref, "cat", images.TEST_FILE, check=False)
    assert r.returncode == 0 and r.stdout == images.TEST_FILE_CONTENT, r.stderr
    # Without the CA (and with verification on) the pull fails.
    pm.rmi_all()
    r = pm.podman("pull", ref, check=False, timeout=120)
    assert r.returncode != 0
    assert "certificate" in r.stderr.lower() or "x509" in r.stderr.lower(), r.stderr


def test_podman_pulls_through_registries_conf_mirror(procs, tmp_path, pki, plain_registry, podman_tls):
    info = plain_registry.images["oci"]
    rf = start_tls_facade(procs, tmp_path, pki, {"up": {"url": plain_registry.url}})
    pm = podman_tls
    with open(pm.registries_conf, "w") as f:
        f.write(templated_registries_conf(plain_registry.host, f"127.0.0.1:{free_port()}", rf.host))
    ref = f"{plain_registry.host}/{info['repo']}:{info['tag']}"
    r = pm.podman("pull", "--cert-dir", pm.cert_dir, ref, check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    digest = pm.podman("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()
    assert digest == info["manifest_digest"]
    for layer in info["layers"]:
        assert os.path.isfile(clients.cache_blob_path(rf.cache_dir, layer["digest"])), diag(rf)


def test_skopeo_inspect_over_tls(procs, tmp_path, pki, plain_registry):
    info = plain_registry.images["oci"]
    rf = start_tls_facade(procs, tmp_path, pki, {"up": {"url": plain_registry.url}})
    cert_dir = tmp_path / "skopeo-certs"
    cert_dir.mkdir()
    shutil.copy(pki.ca, cert_dir / "ca.crt")
    r = subprocess.run(["skopeo", "inspect", "--raw", "--no-creds", "--cert-dir", str(cert_dir),
                        f"docker://{rf.host}/{info['repo']}:{info['tag']}"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace") + diag(rf)
    assert clients.sha256_digest(r.stdout) == info["manifest_digest"]
