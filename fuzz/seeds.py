#!/usr/bin/env python3
"""Writes the hand-made seed inputs fuzz/corpus/<target>/seed-* (real
manifests, configs, indexes, challenges, headers, Docker configs). Run from
anywhere: python3 fuzz/seeds.py. `make fuzz-merge` keeps these files; what
libFuzzer finds is added next to them under hash names."""
import base64
import hashlib
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def w(t, name, data):
    d = os.path.join(ROOT, t)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def h(s):
    return hashlib.sha256(s.encode()).hexdigest()


def main():
    for i, s in enumerate([
            "library/ubuntu", "regfacade-test/oci", "a", "a/b/c", "foo__bar", "foo-----bar",
            "foo.bar_baz", "Uppercase/Name", "foo//bar", "foo/../bar", "v1", "latest",
            "1.2.3-rc.4_build", "_x", "-bad", "sha256:" + h("x"),
            "sha512:" + hashlib.sha512(b"x").hexdigest(), "sha256:ABC",
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
            "https://index.docker.io/v1/", "HTTP://Registry-1.Docker.IO:443/path", "ghcr.io",
            "127.0.0.1:5000", base64.b64encode(b"user:pass").decode(), "dXNlcjpwYXNz", "YQ",
            "YWI=", "====", "a" * 300]):
        w("fuzz_ref", f"seed-{i:02d}", s)

    for i, s in enumerate(["bytes=0-99", "bytes=100-", "bytes=-500", "bytes=0-0,5-9", "items=0-1",
                           "bytes = 1 - 2 ", "bytes=18446744073709551615-",
                           "bytes=18446744073709551616-", "bytes=5-1", "bytes=-0", "BYTES=0-1",
                           "bytes=", ""]):
        w("fuzz_range", f"seed-{i:02d}", s)

    for i, s in enumerate([
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/ubuntu:pull"',
            'Basic realm="Registry Realm"',
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"',
            'Bearer realm="https://auth.example/token",error="insufficient_scope",'
            'scope="repository:a:pull,push"',
            'Bearer realm="a\\"b", service=x',
            'Bearer realm=unquoted,service="s"',
            'Negotiate abc==, Bearer realm="x"',
            'Bearer',
            'bearer REALM="x"',
            'Bearer realm="' + "r" * 2000 + '"']):
        w("fuzz_www_authenticate", f"seed-{i:02d}", s)

    auth = base64.b64encode(b"alice:s3cret").decode()
    cfgs = [("docker.io", {"auths": {"https://index.docker.io/v1/": {"auth": auth}}}),
            ("ghcr.io", {"auths": {"ghcr.io": {"username": "bob", "password": "pw"}}}),
            ("127.0.0.1:5000", {"auths": {"http://127.0.0.1:5000": {"auth": auth}}}),
            ("quay.io", {"auths": {"quay.io": {"identitytoken": "tok"}}}),
            ("docker.io", {"auths": {"docker.io": {"auth": "!!notbase64"}}}),
            ("docker.io", {"auths": {"docker.io": {"auth": base64.b64encode(b"nocolon").decode()}}}),
            ("registry-1.docker.io", {"credsStore": "desktop", "auths": {}}),
            ("x", {"auths": []}),
            ("gcr.io", {"credHelpers": {"gcr.io": "gcloud", "x.io": ""}, "credsStore": "ecr-login"}),
            ("x.io", {"credHelpers": {"https://x.io/": ""}, "credsStore": "../evil"})]
    for i, (host, c) in enumerate(cfgs):
        w("fuzz_docker_config", f"seed-{i:02d}", host.encode() + b"\0" + json.dumps(c).encode())

    oci_config = {
        "created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["sh"], "Labels": {}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + h("l1"), "sha256:" + h("l2")]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ADD rootfs", "comment": "x"},
                    {"created": "2024-01-01T00:00:00Z", "created_by": "ENV PATH", "empty_layer": True},
                    {"created": "2024-01-01T00:00:00Z", "created_by": "COPY file"}]}
    cfg_bytes = json.dumps(oci_config, separators=(",", ":"))
    oci_manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + h(cfg_bytes), "size": len(cfg_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + h("b1"), "size": 12345678901},
                   {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + h("b2"), "size": 0,
                    "annotations": {"org.opencontainers.image.title": "x"}}],
        "annotations": {"org.opencontainers.image.created": "2024"}}
    docker_manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(cfg_bytes), "digest": "sha256:" + h(cfg_bytes)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2811,
                    "digest": "sha256:" + h("b1")},
                   {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "size": 99, "digest": "sha256:" + h("b2"),
                    "urls": ["https://example.com/layer"]}]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + h("m1"),
         "size": 500, "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + h("m2"),
         "size": 500, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}]}
    docs = [json.dumps(oci_manifest, indent=3), cfg_bytes, json.dumps(docker_manifest),
            json.dumps(index), '{"name":"a","tags":["v1","v2"]}',
            '[1, -0, 0.5e-10, 1E+400, 12345678901234567890123]', '"\\u00e9\\ud83d\\ude00\\n\\u0000"',
            '{"a":1,"a":2}', '[[[[[[[[[[]]]]]]]]]]', '{"":{}}', 'null', ' true ',
            '{"errors":[{"code":"DENIED","message":"no","detail":null}]}', '{"k\\u0000ey":"v"}']
    for i, d in enumerate(docs):
        w("fuzz_json", f"seed-{i:02d}", d)

    for i, s in enumerate([
            "Basic " + base64.b64encode(b"alice:s3cret").decode(),
            "basic " + base64.b64encode(b"u:").decode(), "Basic " + base64.b64encode(b":p").decode(),
            "Basic " + base64.b64encode(b"nocolon").decode(),
            "Basic " + base64.b64encode(b"a\nb:c").decode(),
            "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "BEARER abc==", "Bearer a b",
            "Digest username=x", "Basic", "  Bearer   tok  ", ""]):
        w("fuzz_client_auth", f"seed-{i:02d}", s)

    stacks = [bytes([0, 1, 2]), bytes([1, 0]), bytes([0]), bytes([1, 2, 3]), bytes([0, 0x41, 0x82, 0xc3]),
              bytes([4]), b""]
    for i, st in enumerate(stacks):
        w("fuzz_image", f"seed-oci-{i:02d}",
          json.dumps(oci_manifest).encode() + b"\0" + cfg_bytes.encode() + b"\0" + st)
        w("fuzz_image", f"seed-docker-{i:02d}",
          json.dumps(docker_manifest).encode() + b"\0" + cfg_bytes.encode() + b"\0" + st)
    w("fuzz_image", "seed-index", json.dumps(index).encode() + b"\0" + cfg_bytes.encode() + b"\0\0")
    bad_cfg = dict(oci_config)
    bad_cfg["rootfs"] = {"type": "layers", "diff_ids": []}
    w("fuzz_image", "seed-mismatch",
      json.dumps(oci_manifest).encode() + b"\0" + json.dumps(bad_cfg).encode() + b"\0\1")


if __name__ == "__main__":
    main()
