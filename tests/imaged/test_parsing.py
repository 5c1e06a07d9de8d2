"""References, registries.conf, credentials and challenges: the pure parsing parts."""

from __future__ import annotations

import base64
import json

import pytest

from services.imaged import auth, manifest, reference, registries_conf
from shared.errors import FailedPrecondition, InvalidArgument


@pytest.mark.parametrize("text,expected", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("kubernetes/pause", "docker.io/kubernetes/pause:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
    ("localhost/app", "localhost/app:latest"),
    ("127.0.0.1:5000/a/b/c:v1", "127.0.0.1:5000/a/b/c:v1"),
    ("quay.io/x/y@sha256:" + "a" * 64, "quay.io/x/y@sha256:" + "a" * 64),
    ("quay.io/x/y:t@sha256:" + "a" * 64, "quay.io/x/y:t@sha256:" + "a" * 64),
    ("docker://busybox", "docker.io/library/busybox:latest"),
])
def test_reference_normalisation(text, expected):
    assert str(reference.parse(text)) == expected


@pytest.mark.parametrize("text", ["", "Busybox/UPPER", "a b", "x/y:bad tag", "x@sha256:short", "x@md5:" + "a" * 32,
                                  "x/../y", "-x", "x:" + "t" * 200])
def test_invalid_references(text):
    with pytest.raises(InvalidArgument):
        reference.parse(text)


def test_candidates_for_short_and_qualified_names():
    assert [str(r) for r in reference.candidates("busybox", ["r1.example:5000", "docker.io"])] == [
        "r1.example:5000/busybox:latest", "docker.io/library/busybox:latest"]
    assert [str(r) for r in reference.candidates("busybox", [])] == ["docker.io/library/busybox:latest"]
    assert [str(r) for r in reference.candidates("quay.io/a/b", ["x.io"])] == ["quay.io/a/b:latest"]


REGISTRIES_CONF = """
unqualified-search-registries = ["registry.fedoraproject.org", "docker.io"]

[[registry]]
prefix = "example.com/foo"
location = "internal.example.com/bar"
insecure = true

[[registry.mirror]]
location = "mirror-1.example.com"

[[registry.mirror]]
location = "mirror-2.example.com/m"
insecure = true
pull-from-mirror = "digest-only"

[[registry]]
location = "blocked.example.com"
blocked = true

[[registry]]
prefix = "*.wild.example"
insecure = true
"""


def test_registries_conf_v2():
    conf = registries_conf.parse(REGISTRIES_CONF, insecure_registries=["plain.example:5000"])
    assert conf.unqualified_search_registries == ["registry.fedoraproject.org", "docker.io"]
    entry, eps = conf.endpoints(reference.parse("example.com/foo/app:1"))
    assert entry is not None and not entry.blocked
    assert [(e.host, e.path, e.insecure, e.mirror) for e in eps] == [
        ("mirror-1.example.com", "app", False, True),
        ("internal.example.com", "bar/app", True, False),
    ]
    assert eps[1].base_url == "http://internal.example.com"
    _, eps = conf.endpoints(reference.parse("example.com/foo/app@sha256:" + "b" * 64))
    assert [e.host for e in eps] == ["mirror-1.example.com", "mirror-2.example.com", "internal.example.com"]
    assert eps[1].path == "m/app"
    # "example.com/foobar" is not under the prefix "example.com/foo".
    entry, eps = conf.endpoints(reference.parse("example.com/foobar/app"))
    assert entry is None and eps[0].host == "example.com" and eps[0].base_url == "https://example.com"
    entry, _ = conf.endpoints(reference.parse("blocked.example.com/x"))
    assert entry is not None and entry.blocked
    entry, eps = conf.endpoints(reference.parse("a.wild.example/x"))
    assert entry is not None and eps[0].insecure and eps[0].host == "a.wild.example"
    _, eps = conf.endpoints(reference.parse("plain.example:5000/x"))
    assert eps[0].insecure
    _, eps = conf.endpoints(reference.parse("busybox"))
    assert eps[0].base_url == "https://registry-1.docker.io" and eps[0].path == "library/busybox"


@pytest.mark.parametrize("text", ["[registries.search]\nregistries = []", "unqualified-search-registries = 1",
                                  "[[registry]]\ninsecure = true", "not toml ==="])
def test_registries_conf_errors(text):
    with pytest.raises(InvalidArgument):
        registries_conf.parse(text)


def test_registries_conf_file_reloads_on_change(tmp_path):
    path = tmp_path / "registries.conf"
    f = registries_conf.RegistriesConfFile(str(path), [])
    assert f.get().unqualified_search_registries == []
    path.write_text('unqualified-search-registries = ["a.example"]\n')
    assert f.get().unqualified_search_registries == ["a.example"]
    path.write_text('unqualified-search-registries = ["b.example", "c.example"]\n')
    assert f.get().unqualified_search_registries == ["b.example", "c.example"]


def test_credentials_from_cri_auth_config():
    b64 = base64.b64encode(b"u:p:with:colons").decode()
    assert auth.from_cri({"auth": b64}) == auth.Credentials("u", "p:with:colons")
    assert auth.from_cri({"username": "a", "password": "b"}) == auth.Credentials("a", "b")
    assert auth.from_cri({"identity_token": "r"}).identity_token == "r"
    assert auth.from_cri({"registry_token": "t"}).registry_token == "t"
    assert auth.from_cri({}) is None and auth.from_cri(None) is None
    assert auth.from_cri({"server_address": "x"}) is None
    with pytest.raises(InvalidArgument):
        auth.from_cri({"auth": base64.b64encode(b"nocolon").decode()})
    assert "p" not in repr(auth.Credentials("u", "secretpassword")).replace("username", "")


def test_credentials_from_auth_file(tmp_path):
    path = tmp_path / "auth.json"
    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": enc("hub:pw")},
        "quay.io": {"auth": enc("quay:pw")},
        "quay.io/team": {"auth": enc("team:pw")},
        "id.example": {"identitytoken": "refresh"},
    }}))
    p = str(path)
    assert auth.from_auth_file(p, "docker.io", "library/busybox") == auth.Credentials("hub", "pw")
    assert auth.from_auth_file(p, "quay.io", "team/app") == auth.Credentials("team", "pw")
    assert auth.from_auth_file(p, "quay.io", "other/app") == auth.Credentials("quay", "pw")
    assert auth.from_auth_file(p, "id.example", "x").identity_token == "refresh"
    assert auth.from_auth_file(p, "nothing.example", "x") is None
    assert auth.from_auth_file(str(tmp_path / "missing.json"), "quay.io", "x") is None
    assert auth.from_auth_file("", "quay.io", "x") is None


def test_challenges_and_token_cache(monkeypatch):
    chs = auth.parse_challenges(['Bearer realm="https://auth.example/token",service="reg",'
                                 'scope="repository:a/b:pull"', 'Basic realm="x"'])
    assert [c.scheme for c in chs] == ["bearer", "basic"]
    assert chs[0].params == {"realm": "https://auth.example/token", "service": "reg",
                             "scope": "repository:a/b:pull"}
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    cache = auth.TokenCache()
    key = ("realm", "svc", "repository:a:pull", "")
    cache.put(key, "tok", 60)
    assert cache.get(key) == "tok"
    now[0] += 50
    assert cache.get(key) == "tok"
    now[0] += 6  # within the slack before expiry: refreshed
    assert cache.get(key) is None
    cache.put(key, "tok2", None)  # no expires_in: 60 s
    now[0] += 54
    assert cache.get(key) == "tok2"


def test_platform_selection_prefers_exact_variant():
    def desc(arch, variant=""):
        plat = {"os": "linux", "architecture": arch}
        if variant:
            plat["variant"] = variant
        return manifest.Descriptor(manifest.OCI_MANIFEST, "sha256:" + f"{arch}{variant}".encode().hex().ljust(64, "0"),
                                   1, plat)
    index = manifest.ManifestIndex(manifest.OCI_INDEX, [desc("arm", "v6"), desc("arm", "v7"), desc("amd64"),
                                                        desc("arm64")])
    assert manifest.select_platform(index, manifest.Platform("linux", "arm", "v7"), "x").platform["variant"] == "v7"
    assert manifest.select_platform(index, manifest.Platform("linux", "arm64", "v8"), "x").platform["architecture"] == "arm64"
    assert manifest.select_platform(index, manifest.Platform("linux", "amd64"), "x").platform["architecture"] == "amd64"
    with pytest.raises(FailedPrecondition):
        manifest.select_platform(index, manifest.Platform("linux", "arm", "v5"), "x")
    assert manifest.parse_platform("linux/arm64/v8") == manifest.Platform("linux", "arm64", "v8")
    with pytest.raises(InvalidArgument):
        manifest.parse_platform("linux")


def test_manifest_parsing_rejects_bad_shapes():
    good_layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "a" * 64, "size": 1}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "b" * 64, "size": 2}
    doc = {"schemaVersion": 2, "mediaType": manifest.OCI_MANIFEST, "config": config, "layers": [good_layer]}
    parsed = manifest.parse(json.dumps(doc).encode(), "", "x")
    assert isinstance(parsed, manifest.ImageManifest) and parsed.layers[0].size == 1
    for bad in ({**doc, "layers": [{**good_layer, "digest": "sha256:xyz"}]},
                {**doc, "layers": [{**good_layer, "size": -1}]},
                {**doc, "config": None},
                {**doc, "schemaVersion": 3}):
        with pytest.raises(InvalidArgument):
            manifest.parse(json.dumps(bad).encode(), "", "x")
    with pytest.raises(FailedPrecondition):
        manifest.parse(json.dumps({**doc, "layers": [{**good_layer, "mediaType": "application/x-evil"}]}).encode(), "", "x")
    with pytest.raises(FailedPrecondition):
        manifest.parse(json.dumps({"schemaVersion": 1, "name": "x"}).encode(), "", "x")
    with pytest.raises(InvalidArgument):
        manifest.parse(b"[1,2]", "", "x")
