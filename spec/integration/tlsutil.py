"""TLS helpers for the integration tests: a throwaway CA and a server
certificate for 127.0.0.1 made with the openssl command, a regfacade
serving HTTPS, and one HTTPS request with the test CA.

    pki = make_pki(str(tmp_path / "pki"))        # pki.ca, pki.cert, pki.key, ...
    rf = start_tls_facade(procs, tmp_path, pki, {"up": {"url": ...}})
    r = https_request(rf.url + "/v2/", pki.ca)
"""
import http.client
import os
import ssl
import subprocess
import time
import urllib.parse

from harness import REGFACADE, Regfacade, log_tail
from clients import facade_config


class PKI:
    def __init__(self, d):
        self.dir = d
        self.ca = os.path.join(d, "ca.crt")
        self.ca_key = os.path.join(d, "ca.key")
        self.cert = os.path.join(d, "server.crt")
        self.key = os.path.join(d, "server.key")
        self.enc_key = os.path.join(d, "server-enc.key")  # the same key, PKCS#8 encrypted
        self.key_password = "tls-key-passphrase-7"
        self.key_password_file = os.path.join(d, "key.pass")
        self.other_key = os.path.join(d, "other.key")     # a key that matches nothing


def _openssl(*args, cwd=None):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def make_pki(d, cn="127.0.0.1"):
    """A CA and a server certificate (SAN IP:127.0.0.1, DNS:localhost) signed
    by it; EC P-256 keys; valid for two days."""
    os.makedirs(d, exist_ok=True)
    p = PKI(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", p.ca_key, "-out", p.ca, "-days", "2",
             "-subj", "/CN=regfacade test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = os.path.join(d, "server.csr")
    _openssl("req", *ec, "-keyout", p.key, "-out", csr, "-subj", f"/CN={cn}")
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "basicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", p.ca, "-CAkey", p.ca_key, "-CAcreateserial",
             "-out", p.cert, "-days", "2", "-extfile", ext)
    with open(p.key_password_file, "w") as f:
        f.write(p.key_password + "\n")
    _openssl("pkcs8", "-topk8", "-in", p.key, "-out", p.enc_key, "-v2", "aes-256-cbc",
             "-passout", f"pass:{p.key_password}")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", p.other_key)
    for k in (p.key, p.enc_key, p.other_key, p.ca_key, p.key_password_file):
        os.chmod(k, 0o600)
    return p


def client_context(ca, max_version=None):
    ctx = ssl.create_default_context(cafile=ca)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def https_request(url, ca, method="GET", headers=None, timeout=30, max_version=None):
    """One HTTPS request verified against ca; returns (status, headers, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout,
                                       context=client_context(ca, max_version))
    try:
        path = u.path + (("?" + u.query) if u.query else "")
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


class TLSRegfacade(Regfacade):
    """A regfacade whose config has a "tls" section; url is https://."""

    def __init__(self, group, workdir, config, ca, name="regfacade"):
        super().__init__(group, workdir, config, name=name)
        self.ca = ca

    @property
    def url(self):
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout=20):
        self.proc = self.group.start(self.name, [REGFACADE, "serve", "--config", self.config_path])
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"regfacade exited {self.proc.returncode}:\n{log_tail(self.proc)}")
            try:
                st, _, _ = https_request(self.url + "/v2/", self.ca, timeout=2)
                if st == 200:
                    return self
                last = st
            except (OSError, ssl.SSLError) as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"regfacade (TLS) did not start ({last}):\n{log_tail(self.proc)}")


def tls_section(pki, **extra):
    t = {"cert_file": pki.cert, "key_file": pki.key}
    t.update(extra)
    return t


def start_tls_facade(procs, tmp_path, pki, upstreams, default_upstream=None, name="regfacade",
                     tls=None, **extra):
    cache = str(tmp_path / f"{name}-cache")
    cfg = facade_config(cache, upstreams, default_upstream, tls=tls or tls_section(pki), **extra)
    rf = TLSRegfacade(procs, str(tmp_path), cfg, pki.ca, name=name)
    rf.cache_dir = cache
    return rf.start()


def check_config(path):
    """`regfacade check --config path` -> CompletedProcess (text)."""
    return subprocess.run([REGFACADE, "check", "--config", path], capture_output=True, text=True,
                          timeout=30)
