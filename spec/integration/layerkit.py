"""Helpers for the layer-injection tests (test_layers.py, test_layers_bad.py).

- LAYER_POLICY: one test policy, driven by config "policy.options":
  a request for  v/<variant>:<ref>  is answered from options.variants[variant]:
      { "repository": base repo, "upstream": (default "up"), "reference": (default: the request's),
        "layers": [...] (the resolve answer's stack, as JSON),
        "platforms": [...], "path_prepend": "/ide/bin:", "env_modifiers": true,
        "answer": "string" | "number" (resolve returns that instead of a table),
        "rewrite_error": "..." (the rewrite hook raises it) }
  Any other repository is mirrored from upstream "up" as it is.
- layer files: deterministic .tar / .tar.gz files of {path: bytes}.
- the IDE image of examples/workspace/build.sh, pushed as OCI and schema2.
- start_layers_facade(): a regfacade with that policy.
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile

import clients
import images
from harness import ROOT, Regfacade

LAYER_POLICY = r'''
local image = require "regfacade.image"
local regfacade = require "regfacade"

local function variant(req)
    local name = req.repository:match("^v/(.+)$")
    if not name then
        return nil, nil
    end
    return ((regfacade.config.options or {}).variants or {})[name], name
end

return {
    resolve = function(req)
        local v, name = variant(req)
        if not name then
            return { upstream = "up", repository = req.repository, reference = req.reference }
        end
        if not v then
            return nil, { status = 404, code = "NAME_UNKNOWN", message = "no variant " .. name }
        end
        if v.answer == "string" then
            return "a string, not a table"
        elseif v.answer == "number" then
            return 42
        end
        -- v.reference (a fixed tag) applies to digest requests too: the
        -- server serves a requested digest as it is, whatever the answer says.
        return { upstream = v.upstream or "up", repository = v.repository, reference = v.reference or req.reference,
                 layers = v.layers, platforms = v.platforms }
    end,
    rewrite = function(img, req)
        local v = variant(req)
        if not v then
            return
        end
        if v.rewrite_error then
            error(v.rewrite_error, 0)
        end
        if v.path_prepend then
            image.env_prepend(img.config, "PATH", v.path_prepend)
        end
        if v.env_modifiers then
            for _, layer in ipairs(img.layers) do
                if layer.source == "image" and layer.config then
                    image.apply_env_modifiers(img.config, layer.config)
                    break
                end
            end
        end
    end,
}
'''

OCI_MANIFEST = images.OCI_MANIFEST
OCI_INDEX = images.OCI_INDEX
DOCKER_MANIFEST = images.DOCKER_MANIFEST
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(files):
    """A deterministic tar of {path: bytes} (paths relative, parents added)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    ti.mtime = 0
                    tf.addfile(ti)
            data = files[name]
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            ti.mode = 0o755 if "/bin/" in name else 0o644
            ti.uname = ti.gname = "root"
            tf.addfile(ti, io.BytesIO(data))
    return raw.getvalue()


def write_layer(path, files, compress=True):
    """Write a .tar (compress=False) or .tar.gz of files; returns
    {path, digest, diff_id, size, media_type}."""
    tar = tar_bytes(files)
    data = gzip.compress(tar, compresslevel=6, mtime=0) if compress else tar
    with open(path, "wb") as f:
        f.write(data)
    return {"path": path, "digest": sha256(data), "diff_id": sha256(tar), "size": len(data),
            "media_type": OCI_LAYER_GZIP if compress else OCI_LAYER_TAR}


class LayerFiles:
    """The file layers the tests add (built once per module)."""

    TOOLS_TEXT = b"hello from the tools file layer\n"
    OVERRIDE_TEXT = b"overridden by an added layer\n"
    ARM_TEXT = b"only on arm64\n"
    EXTRA_TEXT = b"an extra layer\n"
    MULTI_TEXT = b"from a gzip of two members\n"

    def __init__(self, d):
        os.makedirs(d, exist_ok=True)
        self.dir = d
        # .tar.gz: /opt/tools/hello.txt
        self.tools = write_layer(os.path.join(d, "tools.tar.gz"), {"opt/tools/hello.txt": self.TOOLS_TEXT})
        # plain .tar: replaces the base image's test file
        self.override = write_layer(os.path.join(d, "override.tar"),
                                    {images.TEST_FILE.lstrip("/"): self.OVERRIDE_TEXT}, compress=False)
        self.arm = write_layer(os.path.join(d, "arm.tar.gz"), {"etc/arm-only.txt": self.ARM_TEXT})
        self.extra = write_layer(os.path.join(d, "extra.tar.gz"), {"opt/extra.txt": self.EXTRA_TEXT})
        # a .tar.gz of two gzip members (as `cat a.gz b.gz`, pigz -i, ... make):
        # the tar is split across them; gunzip and containerd read both.
        tar = tar_bytes({"opt/multi/a.txt": self.MULTI_TEXT, "opt/multi/b.bin": os.urandom(200000)})
        half = len(tar) // 2
        data = gzip.compress(tar[:half], mtime=0) + gzip.compress(tar[half:], mtime=0)
        path = os.path.join(d, "multi-member.tar.gz")
        with open(path, "wb") as f:
            f.write(data)
        self.multi = {"path": path, "digest": sha256(data), "diff_id": sha256(tar), "size": len(data),
                      "media_type": OCI_LAYER_GZIP}


class WorkspaceBuild:
    """examples/workspace/build.sh output (supervisor layer, app and ide
    images), with app and ide pushed into a registry."""

    def __init__(self, out, host):
        self.out = out
        script = os.path.join(ROOT, "examples", "workspace", "build.sh")
        r = subprocess.run([script, out, "push", host], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"build.sh failed:\n{r.stdout}\n{r.stderr}")
        self.supervisor = os.path.join(out, "layers", "supervisor.tar.gz")
        self.layout = os.path.join(out, "images")
        self.host = host
        # The IDE image also as Docker schema2 (for the format tests).
        clients.skopeo_copy(f"oci:{self.layout}:ide", f"docker://{host}/acme/ide-s2:1.2",
                            extra=["--format", "v2s2"])
        self.ide = images.describe(host, "acme/ide", "1.2")
        self.ide_s2 = images.describe(host, "acme/ide-s2", "1.2")
        self.app = images.describe(host, "acme/app", "1.0")


def build_odd_image(layout_dir, host, repo="rf-layers/odd", tag="v1"):
    """An OCI image whose manifest and config carry fields regfacade does
    not know (nested, empty arrays, null, a uint64 beyond 2^63), pushed to
    host. Returns (manifest_bytes, config_bytes)."""
    lay = images.Layout(layout_dir)
    os.makedirs(os.path.join(layout_dir, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout_dir, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    lay.write_index({"schemaVersion": 2, "manifests": []})
    tar = tar_bytes({"odd.txt": b"odd\n"})
    gz = gzip.compress(tar, mtime=0)
    ldig, lsize = lay.write_blob(gz)
    # Written by hand so the byte order and number forms are exactly these.
    config = (b'{"x-first":{"z":1,"a":[],"n":null},"created":"2024-01-01T00:00:00Z",'
              b'"architecture":"amd64","os":"linux",'
              b'"config":{"Env":["PATH=/bin"],"x-inner":[],"Labels":{}},'
              b'"rootfs":{"type":"layers","diff_ids":["' + sha256(tar).encode() + b'"]},'
              b'"history":[{"created":"2024-01-01T00:00:00Z","created_by":"ADD odd.txt"},'
              b'{"created":"2024-01-01T00:00:00Z","created_by":"ENV X=1","empty_layer":true}],'
              b'"x-big":18446744073709551615,"x-neg":-9223372036854775808,"x-float":1.5e300,'
              b'"x-last":{"deep":{"deeper":[1,2,{"k":"v"}]}}}')
    cdig, csize = lay.write_blob(config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": csize},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": ldig, "size": lsize,
                    "annotations": {"x-layer-note": "kept"}}],
        "annotations": {"org.example.kept": "yes"},
    }, separators=(",", ":")).encode()
    mdig, msize = lay.write_blob(manifest)
    lay.set_tag(tag, {"mediaType": OCI_MANIFEST, "digest": mdig, "size": msize})
    images.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                f"oci:{layout_dir}:{tag}", f"docker://{host}/{repo}:{tag}"], timeout=120)
    return manifest, config


def write_policy(workdir):
    p = os.path.join(workdir, "layers-policy.lua")
    with open(p, "w") as f:
        f.write(LAYER_POLICY)
    return p


def start_layers_facade(procs, workdir, upstream_url, variants, name="regfacade", cache_dir=None,
                        layers=None, upstreams=None, start=True, tag_ttl=3600):
    """A regfacade in workdir with LAYER_POLICY and these variants; upstream
    "up" is upstream_url. .cache_dir is set."""
    os.makedirs(workdir, exist_ok=True)
    cache_dir = cache_dir or os.path.join(workdir, f"{name}-cache")
    ups = {"up": {"url": upstream_url}}
    ups.update(upstreams or {})
    cfg = {
        "cache": {"dir": cache_dir, "tag_ttl_seconds": tag_ttl},
        "policy": {"file": write_policy(workdir), "options": {"variants": variants}},
        "upstreams": ups,
        "default_upstream": "up",
    }
    if layers:
        cfg["layers"] = layers
    rf = Regfacade(procs, workdir, cfg, name=name)
    rf.cache_dir = cache_dir
    return rf.start() if start else rf


def get_manifest(rf, repo, ref, method="GET", accept=clients.MANIFEST_ACCEPT):
    return clients.http_request(f"{rf.url}/v2/{repo}/manifests/{ref}", method=method,
                                headers={"Accept": accept} if accept else {})


def get_blob(rf, repo, digest, method="GET"):
    return clients.http_request(f"{rf.url}/v2/{repo}/blobs/{digest}", method=method)


def manifest_ok(rf, repo, ref="v1"):
    """GET the manifest (200 asserted); returns (bytes, parsed, digest)."""
    r = get_manifest(rf, repo, ref)
    assert r.status == 200, f"{repo}:{ref}: {r!r}\n{clients.diag(rf)}"
    assert r.headers["Docker-Content-Digest"] == sha256(r.body)
    return r.body, json.loads(r.body), r.headers["Docker-Content-Digest"]


def config_of(rf, repo, manifest):
    r = get_blob(rf, repo, manifest["config"]["digest"])
    assert r.status == 200, f"config blob: {r!r}\n{clients.diag(rf)}"
    assert sha256(r.body) == manifest["config"]["digest"]
    return r.body, json.loads(r.body)


def generated_entries(cache_dir):
    d = os.path.join(cache_dir, "generated")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def cache_blobs(cache_dir):
    out = set()
    root = os.path.join(cache_dir, "blobs", "sha256")
    for d, _, files in os.walk(root):
        out.update("sha256:" + f for f in files)
    return out


def tmp_files(cache_dir):
    d = os.path.join(cache_dir, "tmp")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def env_of(config):
    return dict(e.split("=", 1) for e in config["config"]["Env"])
