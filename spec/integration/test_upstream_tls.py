"""An upstream served over TLS: regfacade verifies it against the system
CAs by default (a self-signed certificate is refused with a clear error),
against a configured ca_file, or not at all with tls_verify false."""
import os
import subprocess

import clients
import images
from fake_upstream import request
from harness import Regfacade
from registries import Registry


def make_ca_and_cert(d):
    """A CA and a certificate for 127.0.0.1 signed by it (openssl)."""
    def run(*argv):
        subprocess.run(argv, check=True, capture_output=True, cwd=d)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=regfacade-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "srv.key",
        "-out", "srv.csr")
    run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "srv.crt")
    return os.path.join(d, "ca.crt"), os.path.join(d, "srv.crt"), os.path.join(d, "srv.key")


def test_tls_upstream_with_ca_file_and_without(procs, tmp_path, built_images):
    ca, crt, key = make_ca_and_cert(str(tmp_path))
    reg = Registry(procs, str(tmp_path / "reg"), tls=(crt, key)).start()
    info = images.push_image(built_images, "oci", reg.host)
    repo, tag = info["repo"], info["tag"]

    # With the CA: pulls work, digests as upstream.
    rf = Regfacade(procs, str(tmp_path / "a"), {
        "upstreams": {"tls": {"url": reg.url, "ca_file": ca}},
        "cache": {"dir": str(tmp_path / "a" / "cache")},
    }, name="rf-ca")
    rf.start()
    out = str(tmp_path / "out")
    clients.skopeo_copy(f"docker://{rf.host}/{repo}:{tag}", f"oci:{out}:{tag}")
    r = request(rf.host, "HEAD", f"/v2/{repo}/manifests/{tag}",
                headers={"Accept": info["media_type"]})
    assert r.status == 200
    assert r.headers.get("Docker-Content-Digest") == info["manifest_digest"]

    # Without it: the self-signed chain is refused, clearly, and nothing is cached.
    rf2 = Regfacade(procs, str(tmp_path / "b"), {
        "upstreams": {"tls": {"url": reg.url}},
        "cache": {"dir": str(tmp_path / "b" / "cache")},
    }, name="rf-noca")
    rf2.start()
    r = request(rf2.host, "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": info["media_type"]})
    assert r.status == 502, r.body
    assert b"certificate" in r.body.lower() or b"tls" in r.body.lower() or b"ssl" in r.body.lower(), r.body
    assert not os.listdir(str(tmp_path / "b" / "cache" / "blobs" / "sha256"))

    # tls_verify false: accepted (for tests only).
    rf3 = Regfacade(procs, str(tmp_path / "c"), {
        "upstreams": {"tls": {"url": reg.url, "tls_verify": False}},
        "cache": {"dir": str(tmp_path / "c" / "cache")},
    }, name="rf-noverify")
    rf3.start()
    r = request(rf3.host, "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": info["media_type"]})
    assert r.status == 200
