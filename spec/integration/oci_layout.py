"""A small OCI image layout writer for tests and benchmarks that need
images with hand-made layers (hostile tar entries, whiteouts, zstd): write
layers from entry lists, a manifest and config (diff_ids right), an index,
tags; then push() copies a tag into a registry with skopeo.

Used by test_blobserve.py and bench/blobserve_bench.py.
"""
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    None: "application/vnd.oci.image.layer.v1.tar",
}


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rbytes(n, seed):
    """n deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


# Tar entries: a file, a folder, a symlink, a hard link.
def F(name, data):
    return {"name": name, "type": tarfile.REGTYPE, "data": data}


def D(name):
    return {"name": name, "type": tarfile.DIRTYPE}


def L(name, target):
    return {"name": name, "type": tarfile.SYMTYPE, "target": target}


def H(name, target):
    return {"name": name, "type": tarfile.LNKTYPE, "target": target}


def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e["name"])
            ti.type = e["type"]
            ti.mtime = 1700000000
            ti.mode = 0o755 if e["type"] == tarfile.DIRTYPE else 0o644
            if e["type"] in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = e["target"]
            if e["type"] == tarfile.CHRTYPE:
                ti.devmajor, ti.devminor = 1, 3
            data = e.get("data")
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(raw, how):
    if how == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=raw, capture_output=True, check=True).stdout
    return raw


class Layout:
    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.refs = []

    def blob(self, data):
        d = sha256(data)
        with open(os.path.join(self.path, "blobs", "sha256", d[7:]), "wb") as f:
            f.write(data)
        return {"digest": d, "size": len(data)}

    def manifest(self, layers, arch="amd64"):
        """layers: [(entries, compression)] or [(entries, compression, mangle)],
        bottom first; entries is a list of F/D/L/H entries, or the bytes of a
        ready-made tar; mangle, when given, edits the compressed blob. Returns
        (descriptor, [layer digests])."""
        descs, diff_ids = [], []
        for entries, how, *mangle in layers:
            raw = entries if isinstance(entries, bytes) else tar_bytes(entries)
            diff_ids.append(sha256(raw))
            blob = compress(raw, how)
            if mangle:  # a function of the compressed bytes (a hostile blob: cut, corrupt)
                blob = mangle[0](blob)
            d = self.blob(blob)
            d["mediaType"] = LAYER_TYPES[how]
            descs.append(d)
        cfg = {"architecture": arch, "os": "linux", "config": {},
               "rootfs": {"type": "layers", "diff_ids": diff_ids},
               "history": [{"created_by": "oci_layout.py"} for _ in layers]}
        c = self.blob(json.dumps(cfg, separators=(",", ":")).encode())
        c["mediaType"] = OCI_CONFIG
        m = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": c,
             "layers": [{"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"]}
                        for d in descs]}
        md = self.blob(json.dumps(m, separators=(",", ":")).encode())
        md["mediaType"] = OCI_MANIFEST
        return md, [d["digest"] for d in descs]

    def index(self, entries):
        idx = {"schemaVersion": 2, "mediaType": OCI_INDEX,
               "manifests": [dict(desc, platform={"os": "linux", "architecture": arch})
                             for desc, arch in entries]}
        d = self.blob(json.dumps(idx, separators=(",", ":")).encode())
        d["mediaType"] = OCI_INDEX
        return d

    def tag(self, name, desc):
        self.refs.append(dict(desc, annotations={"org.opencontainers.image.ref.name": name}))
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.refs}, f)


def push(layout, tag, host, repo, extra=()):
    """skopeo copy oci:LAYOUT:TAG to docker://HOST/REPO (REPO includes :TAG)."""
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *extra,
                    f"oci:{layout.path}:{tag}", f"docker://{host}/{repo}"],
                   check=True, capture_output=True, timeout=300)


