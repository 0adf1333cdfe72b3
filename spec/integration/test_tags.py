"""Tag listing that pages, against CNCF distribution 2.8 (Debian's
docker-registry), which ignores `n` and `last` and always answers the whole
list: through regfacade, `n` and `last` work as the OCI spec says (lexical
order, a Link rel="next" while more follow, pointing at regfacade), and a
client that follows the Links sees every tag once."""
import pytest

import clients
import images
from clients import diag, http_request

TAGS = ["1.0", "1.10", "1.2", "alpha", "beta", "latest", "v1", "z-last"]


@pytest.fixture(scope="module")
def tagged(plain_registry, built_images):
    repo = "rf-tags/app"
    for t in TAGS:
        images.push_image(built_images, "oci", plain_registry.host, repo=repo, tag=t)
    return plain_registry, repo


def get(rf, path):
    return http_request(f"{rf.url}{path}")


def test_distribution_ignores_n_and_last(tagged):
    reg, repo = tagged
    r = http_request(f"{reg.url}/v2/{repo}/tags/list?n=2")
    # The upstream's own answer: the whole list, no Link (why regfacade pages itself).
    assert r.status == 200 and len(r.json()["tags"]) == len(TAGS), r


def test_tags_page_through_regfacade(tagged, procs, tmp_path):
    reg, repo = tagged
    rf = clients.start_facade(procs, tmp_path, {"up": {"url": reg.url}})
    want = sorted(TAGS)
    r = get(rf, f"/v2/{repo}/tags/list")
    assert r.status == 200 and r.json() == {"name": repo, "tags": want}, f"{r!r}\n{diag(rf)}"
    assert r.headers.get("Link") is None

    r = get(rf, f"/v2/{repo}/tags/list?n=3")
    assert r.json()["tags"] == want[:3], r
    assert r.headers["Link"] == f'</v2/{repo}/tags/list?n=3&last={want[2]}>; rel="next"', r.headers
    r = get(rf, f"/v2/{repo}/tags/list?n=3&last={want[2]}")
    assert r.json()["tags"] == want[3:6], r
    r = get(rf, f"/v2/{repo}/tags/list?last=latest")
    assert r.json()["tags"] == [t for t in want if t > "latest"] and "Link" not in r.headers, r
    r = get(rf, f"/v2/{repo}/tags/list?n=0")
    assert r.status == 200 and r.json()["tags"] == [], r

    got, path = [], f"/v2/{repo}/tags/list?n=2"
    for _ in range(20):
        r = get(rf, path)
        assert r.status == 200, r
        got += r.json()["tags"]
        link = r.headers.get("Link")
        if not link:
            break
        path = link[1:link.index(">")]
    assert got == want


@pytest.mark.parametrize("query", ["n=-1", "n=abc", "n=", "last=bad%20tag"])
def test_bad_paging_parameters_are_400(tagged, procs, tmp_path, query):
    reg, repo = tagged
    rf = clients.start_facade(procs, tmp_path, {"up": {"url": reg.url}})
    r = get(rf, f"/v2/{repo}/tags/list?{query}")
    assert r.status == 400 and "UNSUPPORTED" in r.error_codes(), r
