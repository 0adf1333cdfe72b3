"""The OCI pull API of regfacade, per spec/integration/CONTRACT.md, against a
programmable fake upstream (fake_upstream.py). Each test starts its own
fake and its own regfacade (fixtures fake_upstream and fake_facade)."""
import json
import os
import time

import pytest

from fake_upstream import (
    ALL_MANIFEST_TYPES, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
    MT_SCHEMA1, MT_SCHEMA1_PLAIN, FakeUpstream, assert_oci_error, cache_files, cache_path,
    random_bytes, request, sha256_digest, verify_cache, wait_until,
)

ACCEPT_ALL = ", ".join(ALL_MANIFEST_TYPES)


def get(rf, path, headers=None, method="GET"):
    return request(rf.host, method, path, headers)


def seed_all_kinds(fake, repo="acme/app"):
    """One manifest of each media type, tagged by kind; returns {kind: (tag, digest, bytes, mt)}."""
    oci = fake.add_image(repo, "oci", layer_sizes=[300, 700])
    arm = fake.add_image(repo, "oci-arm", platform=("linux", "arm64", "v8"))
    idx = fake.add_index(repo, "index", [oci, arm])
    dck = fake.add_image(repo, "docker", layer_sizes=[400], docker=True)
    dls = fake.add_index(repo, "list", [dck], docker=True)
    return {
        MT_OCI_MANIFEST: ("oci", oci.digest, oci.manifest),
        MT_OCI_INDEX: ("index", idx.digest, idx.manifest),
        MT_DOCKER_MANIFEST: ("docker", dck.digest, dck.manifest),
        MT_DOCKER_LIST: ("list", dls.digest, dls.manifest),
    }


def assert_manifest_response(r, digest, body, mt, head=False):
    assert r.status == 200, r
    assert r.header("Content-Type") == mt, r
    assert r.header("Content-Length") == str(len(body)), r
    assert r.header("Docker-Content-Digest") == digest, r
    assert r.header("ETag") == f'"{digest}"', r
    if head:
        assert r.body == b"", r
    else:
        assert r.body == body, r
        assert sha256_digest(r.body) == r.header("Docker-Content-Digest"), r
        assert json.loads(r.body)["mediaType"] == r.header("Content-Type"), r


# ------------------------------------------------------------------ ping


def test_ping(fake_upstream, fake_facade):
    rf = fake_facade()
    for method in ("GET", "HEAD"):
        r = get(rf, "/v2/", method=method)
        assert r.status == 200, r
        assert r.header("Docker-Distribution-API-Version") == "registry/2.0", r
        if method == "GET":
            assert json.loads(r.body) == {}, r
            assert r.header("Content-Type", "").split(";")[0] == "application/json", r


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_ping_other_methods_are_405(fake_upstream, fake_facade, method):
    rf = fake_facade()
    r = request(rf.host, method, "/v2/", body=b"{}")
    assert_oci_error(r, 405, "UNSUPPORTED")


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize("mt", ALL_MANIFEST_TYPES)
def test_manifest_by_tag_and_digest_get_head_agree(fake_upstream, fake_facade, mt):
    kinds = seed_all_kinds(fake_upstream)
    tag, digest, body = kinds[mt]
    rf = fake_facade()
    for ref in (tag, digest):
        path = f"/v2/acme/app/manifests/{ref}"
        g = get(rf, path, {"Accept": ACCEPT_ALL})
        assert_manifest_response(g, digest, body, mt)
        h = get(rf, path, {"Accept": ACCEPT_ALL}, method="HEAD")
        assert_manifest_response(h, digest, body, mt, head=True)
        for k in ("Content-Type", "Content-Length", "Docker-Content-Digest", "ETag"):
            assert g.header(k) == h.header(k), (k, g, h)


def test_manifest_head_before_get_cold(fake_upstream, fake_facade):
    """A HEAD on a never-seen tag is the first request; GET after it agrees."""
    img = fake_upstream.add_image("acme/cold", "v1")
    rf = fake_facade()
    h = get(rf, "/v2/acme/cold/manifests/v1", method="HEAD")
    assert_manifest_response(h, img.digest, img.manifest, MT_OCI_MANIFEST, head=True)
    h2 = get(rf, f"/v2/acme/cold/manifests/{img.digest}", method="HEAD")
    assert_manifest_response(h2, img.digest, img.manifest, MT_OCI_MANIFEST, head=True)
    g = get(rf, "/v2/acme/cold/manifests/v1")
    assert_manifest_response(g, img.digest, img.manifest, MT_OCI_MANIFEST)


@pytest.mark.parametrize("mt", ALL_MANIFEST_TYPES)
def test_accept_negotiation(fake_upstream, fake_facade, mt):
    kinds = seed_all_kinds(fake_upstream)
    tag, digest, body = kinds[mt]
    rf = fake_facade()
    path = f"/v2/acme/app/manifests/{tag}"
    # exactly the type
    assert_manifest_response(get(rf, path, {"Accept": mt}), digest, body, mt)
    # the type among others, as one comma list and as repeated headers
    others = [t for t in ALL_MANIFEST_TYPES if t != mt]
    assert_manifest_response(get(rf, path, {"Accept": ", ".join(others + [mt])}), digest, body, mt)
    # */* and no Accept accept everything
    assert_manifest_response(get(rf, path, {"Accept": "*/*"}), digest, body, mt)
    assert_manifest_response(get(rf, path, {"Accept": f"{others[0]}, */*"}), digest, body, mt)
    assert_manifest_response(get(rf, path), digest, body, mt)
    # an Accept that leaves the type out: by tag 404 MANIFEST_UNKNOWN naming
    # the type; by digest the bytes the digest pins, whatever the Accept header
    p = f"/v2/acme/app/manifests/{tag}"
    r = get(rf, p, {"Accept": ", ".join(others)})
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN")
    assert mt in r.body.decode(), f"the error should name {mt}: {r}"
    h = get(rf, p, {"Accept": ", ".join(others)}, method="HEAD")
    assert h.status == 404, h
    p = f"/v2/acme/app/manifests/{digest}"
    assert_manifest_response(get(rf, p, {"Accept": ", ".join(others)}), digest, body, mt)
    h = get(rf, p, {"Accept": ", ".join(others)}, method="HEAD")
    assert h.status == 200 and h.headers["docker-content-digest"] == digest, h
    # and a later acceptable request is still fine
    assert_manifest_response(get(rf, path, {"Accept": mt}), digest, body, mt)


@pytest.mark.parametrize("mt", ALL_MANIFEST_TYPES)
def test_accept_as_repeated_headers(fake_upstream, fake_facade, mt):
    """Docker's client sends one Accept line per type; repeated field lines
    are one comma-separated list (RFC 9110 5.3)."""
    kinds = seed_all_kinds(fake_upstream)
    tag, digest, body = kinds[mt]
    rf = fake_facade()
    others = [t for t in ALL_MANIFEST_TYPES if t != mt]
    for order in (others + [mt], [mt] + others):
        r = get(rf, f"/v2/acme/app/manifests/{tag}", [("Accept", t) for t in order])
        assert_manifest_response(r, digest, body, mt)
    r = get(rf, f"/v2/acme/app/manifests/{tag}", [("Accept", t) for t in others])
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("accept", [MT_SCHEMA1, MT_SCHEMA1_PLAIN, f"{MT_SCHEMA1}, {MT_SCHEMA1_PLAIN}"])
def test_client_accepting_only_schema1_is_415(fake_upstream, fake_facade, accept):
    """By tag; a digest pins the bytes, served whatever the Accept header."""
    img = fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade()
    r = get(rf, "/v2/acme/app/manifests/v1", {"Accept": accept})
    assert_oci_error(r, 415, "UNSUPPORTED")
    r = get(rf, f"/v2/acme/app/manifests/{img.digest}", {"Accept": accept})
    assert r.status == 200 and r.headers["docker-content-digest"] == img.digest, r


def test_upstream_schema1_is_415_and_not_cached(fake_upstream, fake_facade):
    body = fake_upstream.schema1_body("acme/old", "v1")
    d = fake_upstream.put_manifest("acme/old", body, MT_SCHEMA1, tags=["v1"])
    rf = fake_facade()
    for accept in (None, "*/*", ACCEPT_ALL + ", " + MT_SCHEMA1):
        r = get(rf, "/v2/acme/old/manifests/v1", {"Accept": accept} if accept else None)
        assert_oci_error(r, 415, "UNSUPPORTED")
    r = get(rf, f"/v2/acme/old/manifests/{d}")
    assert_oci_error(r, 415, "UNSUPPORTED")
    assert not os.path.exists(cache_path(rf.cache_dir, d))


def test_missing_manifest_and_blob_are_404(fake_upstream, fake_facade):
    fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade()
    missing = "sha256:" + "0" * 64
    assert_oci_error(get(rf, "/v2/acme/app/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(get(rf, f"/v2/acme/app/manifests/{missing}"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(get(rf, "/v2/acme/nothere/manifests/v1"), 404, ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"))
    assert_oci_error(get(rf, f"/v2/acme/app/blobs/{missing}"), 404, "BLOB_UNKNOWN")
    assert get(rf, "/v2/acme/app/manifests/nope", method="HEAD").status == 404
    assert get(rf, f"/v2/acme/app/blobs/{missing}", method="HEAD").status == 404
    assert cache_files(rf.cache_dir) == {}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST", "PATCH"])
def test_write_methods_are_405(fake_upstream, fake_facade, method):
    img = fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade()
    layer = img.layers[0].digest
    for path in ("/v2/acme/app/manifests/v1", f"/v2/acme/app/manifests/{img.digest}",
                 f"/v2/acme/app/blobs/{layer}"):
        r = request(rf.host, method, path, {"Content-Type": MT_OCI_MANIFEST}, body=img.manifest)
        assert_oci_error(r, 405, "UNSUPPORTED")
    # the push entry points are not there either
    for path in ("/v2/acme/app/blobs/uploads/", f"/v2/acme/app/blobs/uploads/?digest={layer}"):
        r = request(rf.host, method, path, body=b"x")
        assert_oci_error(r, (404, 405), "UNSUPPORTED")
    writes = [k for k in fake_upstream.counts() if k[0] not in ("GET", "HEAD")]
    assert writes == [], f"writes reached the upstream: {writes}"
    assert cache_files(rf.cache_dir) == {}


# ------------------------------------------------------------------ blobs

SIZE = 3000


def blob_headers_ok(r, digest, size, head=False):
    assert r.status == 200, r
    assert r.header("Content-Length") == str(size), r
    assert r.header("Docker-Content-Digest") == digest, r
    assert r.header("Accept-Ranges") == "bytes", r
    assert r.header("Content-Type") == "application/octet-stream", r
    if not head:
        assert len(r.body) == size, r
        assert sha256_digest(r.body) == digest, r


def test_blob_get_head_cold_and_cached(fake_upstream, fake_facade):
    data = random_bytes(SIZE, "blob")
    d = fake_upstream.put_blob("acme/app", data)
    d2 = fake_upstream.put_blob("acme/app", random_bytes(SIZE, "blob2"))
    rf = fake_facade()
    blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{d}", method="HEAD"), d, SIZE, head=True)  # cold HEAD
    blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{d}"), d, SIZE)
    blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{d}", method="HEAD"), d, SIZE, head=True)
    blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{d}"), d, SIZE)
    blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{d2}"), d2, SIZE)  # cold GET first
    blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{d2}", method="HEAD"), d2, SIZE, head=True)
    assert wait_until(lambda: os.path.exists(cache_path(rf.cache_dir, d2)))
    assert verify_cache(rf.cache_dir) >= 2


# (Range header, expected status, (first, last) or None, acceptable error codes)
RANGE_CASES = [
    ("bytes=500-1499", 206, (500, 1499), None),
    ("bytes=500-", 206, (500, SIZE - 1), None),
    ("bytes=-500", 206, (SIZE - 500, SIZE - 1), None),
    ("bytes=2000-5000", 206, (2000, SIZE - 1), None),       # clipped
    ("bytes=0-0", 206, (0, 0), None),
    ("bytes=2999-2999", 206, (SIZE - 1, SIZE - 1), None),
    ("bytes=-5000", 206, (0, SIZE - 1), None),              # suffix longer than the blob
    ("bytes=5000-10000", 416, None, ("SIZE_INVALID",)),     # start beyond size
    (f"bytes={SIZE}-", 416, None, ("SIZE_INVALID",)),
    ("bytes=500-0", 416, None, ("SIZE_INVALID", "UNSUPPORTED")),
    ("bytes=0-1,5-6", 416, None, ("UNSUPPORTED",)),         # several ranges
    ("bytes=abc", 416, None, ("UNSUPPORTED",)),             # garbage
]


@pytest.mark.parametrize("state", ["cold", "cached"])
@pytest.mark.parametrize("rng,status,span,codes", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_blob_range(fake_upstream, fake_facade, state, rng, status, span, codes):
    data = random_bytes(SIZE, f"range {rng} {state}")
    d = fake_upstream.put_blob("acme/app", data)
    rf = fake_facade()
    path = f"/v2/acme/app/blobs/{d}"
    if state == "cached":
        blob_headers_ok(get(rf, path), d, SIZE)
        assert wait_until(lambda: os.path.exists(cache_path(rf.cache_dir, d)))
    r = get(rf, path, {"Range": rng})
    if status == 206:
        a, b = span
        assert r.status == 206, r
        assert r.header("Content-Range") == f"bytes {a}-{b}/{SIZE}", r
        assert r.header("Content-Length") == str(b - a + 1), r
        assert r.body == data[a:b + 1], r
        if r.header("Docker-Content-Digest") is not None:
            assert r.header("Docker-Content-Digest") == d, r
    else:
        got = assert_oci_error(r, 416, codes)
        if got[0] == "SIZE_INVALID":
            assert r.header("Content-Range") == f"bytes */{SIZE}", r
    # the whole blob is still right afterwards, and whatever got cached is right
    blob_headers_ok(get(rf, path), d, SIZE)
    verify_cache(rf.cache_dir)


def test_range_on_head(fake_upstream, fake_facade):
    data = random_bytes(SIZE, "head-range")
    d = fake_upstream.put_blob("acme/app", data)
    rf = fake_facade()
    r = get(rf, f"/v2/acme/app/blobs/{d}", {"Range": "bytes=500-1499"}, method="HEAD")
    assert r.status in (200, 206), r
    if r.status == 206:
        assert r.header("Content-Range") == f"bytes 500-1499/{SIZE}", r
    else:
        assert r.header("Content-Length") == str(SIZE), r


# ------------------------------------------------------------------ tags


def test_tags_list_pagination(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/many", "t00")
    tags = [f"t{i:02d}" for i in range(10)]
    fake_upstream.set_tags("acme/many", tags, img.digest)
    rf = fake_facade()

    r = get(rf, "/v2/acme/many/tags/list")
    assert r.status == 200, r
    assert r.header("Content-Type", "").split(";")[0] == "application/json", r
    assert r.json() == {"name": "acme/many", "tags": tags}, r

    r = get(rf, "/v2/acme/many/tags/list?n=3")
    assert r.status == 200, r
    assert r.json() == {"name": "acme/many", "tags": tags[:3]}, r
    link = r.header("Link")
    assert link and 'rel="next"' in link, r
    assert "/v2/acme/many/tags/list?" in link and "n=3" in link and "last=t02" in link, r
    assert str(fake_upstream.port) not in link, f"Link points at the upstream: {link}"

    r = get(rf, "/v2/acme/many/tags/list?n=3&last=t02")
    assert r.status == 200, r
    assert r.json() == {"name": "acme/many", "tags": tags[3:6]}, r
    # the last page has no Link; n=0 is an empty page
    r = get(rf, "/v2/acme/many/tags/list?n=3&last=t05")
    assert r.json()["tags"] == tags[6:9] and r.header("Link"), r
    r = get(rf, "/v2/acme/many/tags/list?n=3&last=t08")
    assert r.json()["tags"] == ["t09"] and r.header("Link") is None, r
    r = get(rf, "/v2/acme/many/tags/list?n=0")
    assert r.status == 200 and r.json() == {"name": "acme/many", "tags": []}, r
    # a last that is not a tag of the list starts after where it would sort
    r = get(rf, "/v2/acme/many/tags/list?last=t035")
    assert r.json()["tags"] == tags[4:], r

    r = get(rf, "/v2/acme/many/tags/list?last=t08")
    assert r.status == 200 and r.json()["tags"] == ["t09"], r
    assert r.header("Link") is None, r


def test_tags_list_follows_an_upstream_that_pages_by_itself(fake_upstream, fake_facade):
    """An upstream that answers in pages of 4 whatever it is asked (as
    Docker Hub and others do): regfacade follows its Link pages, merges
    them, and pages the whole list as the client asked, in lexical order."""
    img = fake_upstream.add_image("acme/paged", "a")
    tags = sorted([f"v{i}" for i in range(11)] + ["latest", "edge"])
    fake_upstream.set_tags("acme/paged", tags, img.digest)
    fake_upstream.tag_page_size = 4
    rf = fake_facade()
    fake_upstream.reset_counts()
    r = get(rf, "/v2/acme/paged/tags/list")
    assert r.status == 200 and r.json()["tags"] == tags, r
    assert fake_upstream.count("GET", "/v2/acme/paged/tags/list") == 4  # 13 tags in pages of 4
    got, url = [], "/v2/acme/paged/tags/list?n=5"
    while url:
        r = get(rf, url)
        assert r.status == 200, r
        got += r.json()["tags"]
        link = r.header("Link")
        url = link[1:link.index(">")] if link else None
        assert not url or url.startswith("/v2/acme/paged/tags/list?n=5&last="), link
    assert got == tags


def test_tags_list_name_is_the_requested_name(fake_upstream, fake_facade):
    img = fake_upstream.add_image("library/alpine", "3")
    fake_upstream.set_tags("library/alpine", ["3", "3.19", "edge"], img.digest)
    rf = fake_facade(upstream={"library_prefix": True})
    r = get(rf, "/v2/alpine/tags/list?n=2")
    assert r.status == 200, r
    assert r.json() == {"name": "alpine", "tags": ["3", "3.19"]}, r
    assert fake_upstream.count("GET", "/v2/library/alpine/tags/list") >= 1
    link = r.header("Link")
    assert link and "/v2/alpine/tags/list?" in link and "last=3.19" in link, r
    # through the upstream-name prefix, the name is what the client asked for
    r = get(rf, "/v2/fake/alpine/tags/list")
    assert r.status == 200, r
    assert r.json() == {"name": "fake/alpine", "tags": ["3", "3.19", "edge"]}, r


def test_tags_list_unknown_repo_is_404(fake_upstream, fake_facade):
    rf = fake_facade()
    r = get(rf, "/v2/acme/none/tags/list")
    assert_oci_error(r, 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN"))


# ------------------------------------------------------------------ mapping


@pytest.fixture
def two_upstreams(fake_upstream):
    """fake_upstream plus a second fake ("other"), each with a different acme/app:v1."""
    other = FakeUpstream().start()
    try:
        a = fake_upstream.add_image("acme/app", "v1", seed="from fake")
        b = other.add_image("acme/app", "v1", seed="from other")
        assert a.digest != b.digest
        yield fake_upstream, other, a, b
    finally:
        other.stop()


def test_tags_pages_with_ns_stay_on_that_upstream(two_upstreams, fake_facade):
    """The next page's Link keeps ?ns=: it pages the same upstream's list,
    not default_upstream's."""
    fake, other, a, b = two_upstreams
    other.set_tags("acme/app", ["o1", "o2", "o3", "o4", "o5"], b.digest)
    fake.set_tags("acme/app", ["f1", "f2", "f3"], a.digest)
    rf = fake_facade(upstreams={"other": {"url": other.url}})
    got, path = [], f"/v2/acme/app/tags/list?n=2&ns={other.host}"
    for _ in range(10):
        r = get(rf, path)
        assert r.status == 200, r
        got += r.json()["tags"]
        link = r.header("Link")
        if not link:
            break
        path = link[1:link.index(">")]
        assert f"ns={other.host}" in path, link
    assert got == ["o1", "o2", "o3", "o4", "o5"]


def test_ns_selects_upstream_and_is_echoed(two_upstreams, fake_facade):
    fake, other, a, b = two_upstreams
    rf = fake_facade(upstreams={"other": {"url": other.url}})
    r = get(rf, "/v2/acme/app/manifests/v1")  # default_upstream = fake
    assert_manifest_response(r, a.digest, a.manifest, MT_OCI_MANIFEST)

    r = get(rf, f"/v2/acme/app/manifests/v1?ns={other.host}")
    assert_manifest_response(r, b.digest, b.manifest, MT_OCI_MANIFEST)
    assert r.header("OCI-Namespace") == other.host, r
    r = get(rf, f"/v2/acme/app/manifests/v1?ns={other.host}", method="HEAD")
    assert r.status == 200 and r.header("OCI-Namespace") == other.host, r
    r = get(rf, f"/v2/acme/app/blobs/{b.layers[0].digest}?ns={other.host}")
    assert r.status == 200 and r.body == b.layers[0].data, r
    assert r.header("OCI-Namespace") == other.host, r
    r = get(rf, f"/v2/acme/app/tags/list?ns={other.host}")
    assert r.status == 200 and r.json()["tags"] == ["v1"], r

    r = get(rf, f"/v2/acme/app/manifests/v1?ns={fake.host}")
    assert_manifest_response(r, a.digest, a.manifest, MT_OCI_MANIFEST)
    assert r.header("OCI-Namespace") == fake.host, r

    fake.reset_counts()
    other.reset_counts()
    for path in ("/v2/acme/app/manifests/v1?ns=unknown.example.com",
                 f"/v2/acme/app/blobs/{a.layers[0].digest}?ns=127.0.0.1:1",
                 "/v2/acme/app/tags/list?ns=unknown.example.com"):
        assert_oci_error(get(rf, path), 404, "NAME_UNKNOWN")
    assert fake.count() == 0 and other.count() == 0


@pytest.mark.parametrize("form", ["/v2/other/acme/app", "/other/v2/acme/app"])
def test_upstream_name_prefix(two_upstreams, fake_facade, form):
    fake, other, a, b = two_upstreams
    rf = fake_facade(upstreams={"other": {"url": other.url}})
    r = get(rf, f"{form}/manifests/v1")
    assert_manifest_response(r, b.digest, b.manifest, MT_OCI_MANIFEST)
    assert other.count(path="/v2/acme/app/manifests/v1") + \
        other.count(path=f"/v2/acme/app/manifests/{b.digest}") >= 1, other.counts()
    r = get(rf, f"{form}/manifests/{b.digest}", method="HEAD")
    assert_manifest_response(r, b.digest, b.manifest, MT_OCI_MANIFEST, head=True)
    r = get(rf, f"{form}/blobs/{b.layers[0].digest}")
    blob_headers_ok(r, b.layers[0].digest, b.layers[0].size)
    assert r.body == b.layers[0].data
    # the default upstream still answers unprefixed names
    r = get(rf, "/v2/acme/app/manifests/v1")
    assert_manifest_response(r, a.digest, a.manifest, MT_OCI_MANIFEST)
    assert not any("/other/" in p for p in other.paths_seen() + fake.paths_seen())


def test_library_prefix_when_configured(fake_upstream, fake_facade):
    lib = fake_upstream.add_image("library/alpine", "3", seed="library")
    app = fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade(upstream={"library_prefix": True})
    r = get(rf, "/v2/alpine/manifests/3")
    assert_manifest_response(r, lib.digest, lib.manifest, MT_OCI_MANIFEST)
    r = get(rf, f"/v2/alpine/blobs/{lib.layers[0].digest}")
    assert r.status == 200 and r.body == lib.layers[0].data, r
    seen = fake_upstream.paths_seen()
    assert any(p.startswith("/v2/library/alpine/manifests/") for p in seen), seen
    assert f"/v2/library/alpine/blobs/{lib.layers[0].digest}" in seen, seen
    assert not any(p.startswith("/v2/alpine/") for p in seen), seen
    # two-component names are left alone
    r = get(rf, "/v2/acme/app/manifests/v1")
    assert_manifest_response(r, app.digest, app.manifest, MT_OCI_MANIFEST)
    assert not any(p.startswith("/v2/library/acme/") for p in fake_upstream.paths_seen())


def test_no_library_prefix_by_default(fake_upstream, fake_facade):
    plain = fake_upstream.add_image("alpine", "3", seed="plain")
    fake_upstream.add_image("library/alpine", "3", seed="library")
    rf = fake_facade()
    r = get(rf, "/v2/alpine/manifests/3")
    assert_manifest_response(r, plain.digest, plain.manifest, MT_OCI_MANIFEST)
    assert not any(p.startswith("/v2/library/") for p in fake_upstream.paths_seen())


# ------------------------------------------------------------------ unknown routes


@pytest.mark.parametrize("path", ["/v2/_catalog/more", "/foo", "/", "/v1/", "/v2/acme/app/nothing/here"])
def test_unknown_endpoints_are_404_oci_errors(fake_upstream, fake_facade, path):
    rf = fake_facade()
    r = get(rf, path)
    assert_oci_error(r, 404)
    assert fake_upstream.count() == 0


def test_catalog_is_the_cache_s_never_the_upstream_s(fake_upstream, fake_facade):
    """/v2/_catalog lists what the cache holds (test_cache_control.py): the
    upstream is not asked."""
    fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade()
    r = get(rf, "/v2/_catalog")
    assert r.status == 200 and r.json() == {"repositories": []}, r
    assert get(rf, "/v2/acme/app/manifests/v1", {"Accept": ACCEPT_ALL}).status == 200
    n = fake_upstream.count()
    r = get(rf, "/v2/_catalog")
    assert r.json() == {"repositories": ["acme/app"]}, r
    assert fake_upstream.count() == n


# ------------------------------------------------------------------ caching


def pull_all(rf, img, repo="acme/app", ref="v1"):
    r = get(rf, f"/v2/{repo}/manifests/{ref}", {"Accept": ACCEPT_ALL})
    assert_manifest_response(r, img.digest, img.manifest, img.media_type)
    for b in [img.config] + img.layers:
        r = get(rf, f"/v2/{repo}/blobs/{b.digest}")
        blob_headers_ok(r, b.digest, b.size)
    wanted = [img.digest, img.config.digest] + [l.digest for l in img.layers]
    assert wait_until(lambda: all(os.path.exists(cache_path(rf.cache_dir, d)) for d in wanted)), \
        f"not all of {wanted} cached: {sorted(cache_files(rf.cache_dir))}"


def test_cached_blobs_served_with_upstream_stopped(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[SIZE, 50000])
    rf = fake_facade()
    pull_all(rf, img)
    fake_upstream.stop()
    for b in [img.config] + img.layers:
        blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{b.digest}"), b.digest, b.size)
        blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{b.digest}", method="HEAD"), b.digest, b.size,
                        head=True)
    lay = img.layers[1]
    r = get(rf, f"/v2/acme/app/blobs/{lay.digest}", {"Range": "bytes=100-199"})
    assert r.status == 206 and r.body == lay.data[100:200], r
    r = get(rf, f"/v2/acme/app/manifests/{img.digest}")
    assert_manifest_response(r, img.digest, img.manifest, MT_OCI_MANIFEST)


def test_tag_within_ttl_served_with_upstream_stopped(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1")
    rf = fake_facade(tag_ttl=60)
    assert_manifest_response(get(rf, "/v2/acme/app/manifests/v1"), img.digest, img.manifest,
                             MT_OCI_MANIFEST)
    fake_upstream.stop()
    assert_manifest_response(get(rf, "/v2/acme/app/manifests/v1"), img.digest, img.manifest,
                             MT_OCI_MANIFEST)
    assert_manifest_response(get(rf, "/v2/acme/app/manifests/v1", method="HEAD"), img.digest,
                             img.manifest, MT_OCI_MANIFEST, head=True)


def test_tag_ttl_expiry_sees_the_new_digest(fake_upstream, fake_facade):
    old = fake_upstream.add_image("acme/app", "v1", seed="old")
    rf = fake_facade(tag_ttl=1)
    assert_manifest_response(get(rf, "/v2/acme/app/manifests/v1"), old.digest, old.manifest,
                             MT_OCI_MANIFEST)
    new = fake_upstream.add_image("acme/app", "v1", seed="new")
    time.sleep(1.6)
    assert_manifest_response(get(rf, "/v2/acme/app/manifests/v1"), new.digest, new.manifest,
                             MT_OCI_MANIFEST)
    # the old one is still there by digest
    assert_manifest_response(get(rf, f"/v2/acme/app/manifests/{old.digest}"), old.digest,
                             old.manifest, MT_OCI_MANIFEST)


def test_cache_files_are_named_by_their_digest(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[100, 20000, 300000])
    idx = fake_upstream.add_index("acme/app", "multi", [img])
    rf = fake_facade()
    pull_all(rf, img)
    r = get(rf, "/v2/acme/app/manifests/multi")
    assert r.status == 200 and r.body == idx.manifest, r
    assert wait_until(lambda: os.path.exists(cache_path(rf.cache_dir, idx.digest)))
    n = verify_cache(rf.cache_dir)
    assert n >= 6, sorted(cache_files(rf.cache_dir))
    for d, size in [(img.digest, img.size), (idx.digest, idx.size), (img.config.digest, img.config.size)] + \
            [(l.digest, l.size) for l in img.layers]:
        assert os.path.getsize(cache_path(rf.cache_dir, d)) == size, d


def test_restart_keeps_cache(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/app", "v1", layer_sizes=[5000, 70000])
    rf = fake_facade()
    pull_all(rf, img)
    before = cache_files(rf.cache_dir)
    rf.stop()
    fake_upstream.stop()
    rf.start()
    assert cache_files(rf.cache_dir) == before
    assert_manifest_response(get(rf, f"/v2/acme/app/manifests/{img.digest}"), img.digest,
                             img.manifest, MT_OCI_MANIFEST)
    for b in [img.config] + img.layers:
        blob_headers_ok(get(rf, f"/v2/acme/app/blobs/{b.digest}"), b.digest, b.size)
    lay = img.layers[1]
    r = get(rf, f"/v2/acme/app/blobs/{lay.digest}", {"Range": "bytes=-500"})
    assert r.status == 206 and r.body == lay.data[-500:], r
    verify_cache(rf.cache_dir)
