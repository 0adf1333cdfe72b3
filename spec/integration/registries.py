"""Real upstream registries for the integration tests: Debian's
`docker-registry` (CNCF distribution 2.8) in plain, htpasswd and Bearer-token
modes, plus the small token server the token mode needs.

Every registry runs on a free 127.0.0.1 port with its storage in a temp
folder, started through a ProcessGroup (so it is stopped by PID); the token
server is a thread in the test process, shut down by its owner.
"""
import base64
import datetime
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.parse
import uuid

from harness import free_port, wait_http, log_tail

REGISTRY_BIN = "/usr/bin/docker-registry"


class Registry:
    """One docker-registry process. `mode` is "plain", "htpasswd" or "token"."""

    def __init__(self, group, workdir, name="registry", mode="plain", username=None,
                 password=None, token_server=None, tls=None):
        self.tls = tls  # (certificate_file, key_file) to serve https
        self.group = group
        self.workdir = workdir
        self.name = name
        self.mode = mode
        self.username = username
        self.password = password
        self.token_server = token_server
        self.port = free_port()
        self.proc = None
        os.makedirs(workdir, exist_ok=True)
        self.storage = os.path.join(workdir, "storage")
        os.makedirs(self.storage, exist_ok=True)
        self.config_path = os.path.join(workdir, "config.yml")
        self._write_config()

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def creds(self):
        """`user:password` for skopeo --dest-creds/--src-creds, or None."""
        if self.username is None:
            return None
        return f"{self.username}:{self.password}"

    def _write_config(self):
        # JSON is valid YAML; distribution's loader takes it.
        cfg = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": self.storage},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": self.host, "secret": "regfacade-test-secret"},
        }
        if self.tls:
            cfg["http"]["tls"] = {"certificate": self.tls[0], "key": self.tls[1]}
        if self.mode == "htpasswd":
            htpasswd_path = os.path.join(self.workdir, "htpasswd")
            subprocess.run(["htpasswd", "-Bbc", htpasswd_path, self.username, self.password],
                           check=True, capture_output=True)
            cfg["auth"] = {"htpasswd": {"realm": "regfacade-test", "path": htpasswd_path}}
        elif self.mode == "token":
            ts = self.token_server
            cfg["auth"] = {"token": {
                "realm": ts.realm,
                "service": ts.service,
                "issuer": ts.issuer,
                "rootcertbundle": ts.cert_path,
            }}
        elif self.mode != "plain":
            raise ValueError(f"unknown registry mode {self.mode!r}")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=2)

    def start(self, timeout=20):
        self.proc = self.group.start(self.name, [REGISTRY_BIN, "serve", self.config_path])
        try:
            wait_http(self.url + "/v2/", timeout=timeout, ok=(200, 401), insecure=bool(self.tls))
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not start:\n{log_tail(self.proc)}")
        return self

    def stop(self):
        if self.proc is not None:
            self.group.stop(self.proc)
            self.proc = None

    def log(self):
        return log_tail(self.proc, 20000) if self.proc else ""

    def clone(self, group, workdir, name=None, token_server=None):
        """Another registry process, same mode and credentials, serving this
        one's storage (read-only use) on its own port: an upstream a test
        may stop without disturbing the session's registry. token_server:
        what the clone's token auth names instead (realm, service, issuer,
        cert_path), e.g. the same server under another host name."""
        other = Registry.__new__(Registry)
        other.group = group
        other.workdir = workdir
        other.name = name or f"{self.name}-clone"
        other.mode = self.mode
        other.username = self.username
        other.password = self.password
        other.token_server = token_server or self.token_server
        other.tls = getattr(self, "tls", None)
        other.port = free_port()
        other.proc = None
        os.makedirs(workdir, exist_ok=True)
        other.storage = self.storage
        other.config_path = os.path.join(workdir, "config.yml")
        other._write_config()
        return other.start()


def start_registry(group, workdir, **kw):
    return Registry(group, workdir, **kw).start()


# --------------------------------------------------------------------------
# Bearer token server (distribution's "token" auth)
# --------------------------------------------------------------------------

def _make_cert(workdir, cn="regfacade-test-token-issuer"):
    """A self-signed RSA certificate + key. distribution 2.8 verifies the
    token's x5c chain against `rootcertbundle`; a self-signed leaf that is
    itself in the bundle verifies."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path = os.path.join(workdir, "token-cert.pem")
    key_path = os.path.join(workdir, "token-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_path, key_path, key_pem, cert_der


def parse_scope(scope):
    """'repository:a/b:pull,push' -> ('repository', 'a/b', ['pull', 'push']).
    The name may hold a ':port' (registry:5000/x), so split type first and
    actions last."""
    typ, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    return typ, name, [a for a in actions.split(",") if a]


class TokenServer:
    """A distribution-compatible token endpoint (GET /token) on a free port.

    Checks HTTP Basic credentials (username/password given here); a request
    with valid credentials is granted every action it asks for on every
    `repository` scope; a request without credentials gets a token with no
    access (like Docker Hub's anonymous tokens); wrong credentials get 401.
    POST /token is the OAuth2 endpoint: `grant_type=refresh_token` with a
    refresh token of `refresh_tokens` ({token: user}) is granted like valid
    credentials; any other grant or token gets 400 invalid_grant. With
    `password_grants=False` credentials are refused on GET too (401): only
    refresh tokens work. Every request is recorded in `self.requests` (dicts
    with method, grant_type, client_id, user, scopes, service, status) so
    tests can count them.
    """

    def __init__(self, workdir, username, password, service="regfacade-test-registry",
                 issuer="regfacade-test-issuer", ttl=300, refresh_tokens=None, password_grants=True):
        os.makedirs(workdir, exist_ok=True)
        self.username = username
        self.password = password
        self.refresh_tokens = dict(refresh_tokens or {})
        self.password_grants = password_grants
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.port = free_port()
        self.cert_path, self.key_path, self._key_pem, cert_der = _make_cert(workdir)
        self._x5c = [base64.b64encode(cert_der).decode()]
        self.requests = []
        self._lock = threading.Lock()
        self._httpd = None
        self._thread = None

    @property
    def realm(self):
        return f"http://127.0.0.1:{self.port}/token"

    def reset(self):
        with self._lock:
            self.requests.clear()

    def token_requests(self, scope=None):
        """Recorded token requests, optionally only those asking for `scope`."""
        with self._lock:
            reqs = list(self.requests)
        if scope is None:
            return reqs
        return [r for r in reqs if scope in r["scopes"]]

    def issue(self, user, scopes):
        import jwt  # python3-jwt
        now = int(time.time())
        access = []
        if user is not None:
            for s in scopes:
                try:
                    typ, name, actions = parse_scope(s)
                except ValueError:
                    continue
                if typ == "repository":
                    access.append({"type": typ, "name": name, "actions": actions})
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key_pem, algorithm="RS256", headers={"x5c": self._x5c})

    def _check_basic(self, header):
        """None: no credentials; False: wrong ones; user name: right ones."""
        if not header:
            return None
        if not header.lower().startswith("basic "):
            return False
        try:
            raw = base64.b64decode(header[6:].strip()).decode()
        except Exception:  # noqa: BLE001
            return False
        user, _, pw = raw.partition(":")
        if user == self.username and pw == self.password:
            return user
        return False

    def start(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # keep pytest output clean
                pass

            def _send(self, status, body, extra=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query)
                if u.path != "/token":
                    self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                scopes = []
                for s in q.get("scope", []):
                    scopes.extend(x for x in s.split(" ") if x)
                user = server._check_basic(self.headers.get("Authorization"))
                rec = {"method": "GET", "grant_type": None, "client_id": None,
                       "user": user, "scopes": scopes, "service": q.get("service", [None])[0],
                       "account": q.get("account", [None])[0], "time": time.time()}
                if user is not None and not server.password_grants:
                    user = False
                if user is False:
                    rec["status"] = 401
                    with server._lock:
                        server.requests.append(rec)
                    self._send(401, {"errors": [{"code": "UNAUTHORIZED",
                                                 "message": "bad credentials"}]},
                               {"WWW-Authenticate": 'Basic realm="regfacade-test-token"'})
                    return
                tok = server.issue(user, scopes)
                rec["status"] = 200
                with server._lock:
                    server.requests.append(rec)
                self._send(200, {"token": tok, "access_token": tok, "expires_in": server.ttl,
                                 "issued_at": datetime.datetime.utcnow().strftime(
                                     "%Y-%m-%dT%H:%M:%SZ")})

            def do_POST(self):
                u = urllib.parse.urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(n).decode("utf-8", "replace"))
                if u.path != "/token":
                    self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                scopes = []
                for s in form.get("scope", []):
                    scopes.extend(x for x in s.split(" ") if x)
                grant = form.get("grant_type", [None])[0]
                user = None
                if grant == "refresh_token":
                    user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                rec = {"method": "POST", "grant_type": grant, "client_id": form.get("client_id", [None])[0],
                       "user": user, "scopes": scopes, "service": form.get("service", [None])[0],
                       "account": None, "time": time.time(),
                       "basic": self.headers.get("Authorization") is not None}
                if user is None:
                    rec["status"] = 400
                    with server._lock:
                        server.requests.append(rec)
                    self._send(400, {"error": "invalid_grant" if grant == "refresh_token"
                                     else "unsupported_grant_type"})
                    return
                tok = server.issue(user, scopes)
                rec["status"] = 200
                with server._lock:
                    server.requests.append(rec)
                self._send(200, {"access_token": tok, "expires_in": server.ttl, "scope": " ".join(scopes)})

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="token-server",
                                        daemon=True)
        self._thread.start()
        wait_http(self.realm, timeout=10, ok=(200,))
        self.reset()  # the readiness probe is not a client's request
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None
