"""A test front for the OCI conformance suite's content-discovery workflow
against a read-only facade: reads (GET, HEAD) go to regfacade, writes
(POST, PUT, PATCH, DELETE) to the upstream registry behind it.

The upstream is CNCF distribution 2.8, which has no referrers API. For a
registry like that, OCI 1.1 makes the *client* that pushes a manifest with a
`subject` keep the referrers tag schema up to date: an image index tagged
`sha256-<hex of the subject>` listing a descriptor of every referrer. The
front does that for the suite's pushes, as oras, cosign and notation do, and
answers them with the `OCI-Subject` header the suite checks. regfacade then
has to answer /v2/<name>/referrers/<digest> from that tag: the fallback path
of a real registry, through the real binary.
"""
import hashlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _forward(host, port, method, path, headers, body):
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        c.close()


class ReferrersFront:
    def __init__(self, facade_url, upstream_url):
        self.facade = urlsplit(facade_url)
        self.upstream = urlsplit(upstream_url)
        self.lock = threading.Lock()  # one referrers index update at a time
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # --------------------------------------------------------------- referrers
    def _descriptor(self, media_type, body):
        m = json.loads(body)
        d = {"mediaType": m.get("mediaType", media_type), "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
             "size": len(body)}
        at = m.get("artifactType") or (m.get("config") or {}).get("mediaType")
        if at:
            d["artifactType"] = at
        if m.get("annotations"):
            d["annotations"] = m["annotations"]
        return m.get("subject"), d

    def _add_referrer(self, name, subject_digest, desc):
        tag = "sha256-" + subject_digest.split(":", 1)[1]
        up = (self.upstream.hostname, self.upstream.port)
        with self.lock:
            st, _, body = _forward(*up, "GET", f"/v2/{name}/manifests/{tag}", {"Accept": OCI_INDEX}, None)
            index = json.loads(body) if st == 200 else {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                         "manifests": []}
            index["manifests"] = [m for m in index["manifests"] if m["digest"] != desc["digest"]] + [desc]
            data = json.dumps(index).encode()
            st, _, body = _forward(*up, "PUT", f"/v2/{name}/manifests/{tag}",
                                   {"Content-Type": OCI_INDEX, "Content-Length": str(len(data))}, data)
            if st >= 300:
                raise RuntimeError(f"referrers tag {tag} of {name}: upstream answered {st}: {body[:300]!r}")

    # ---------------------------------------------------------------- handler
    def _handler(front):
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _proxy(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                write = self.command not in ("GET", "HEAD")
                target = front.upstream if write else front.facade
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                st, rh, rbody = _forward(target.hostname, target.port, self.command, self.path, headers, body)
                extra = {}
                parts = self.path.split("?")[0].split("/manifests/")
                if write and self.command == "PUT" and len(parts) == 2 and 200 <= st < 300 and body:
                    name = parts[0][len("/v2/"):]
                    ctype = self.headers.get("Content-Type", OCI_MANIFEST)
                    subject, desc = front._descriptor(ctype, body)
                    if subject and subject.get("digest"):
                        front._add_referrer(name, subject["digest"], desc)
                        extra["OCI-Subject"] = subject["digest"]
                self.send_response(st)
                for k, v in rh:
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                for k, v in extra.items():
                    self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in rh).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(rbody)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(rbody)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

        return H
