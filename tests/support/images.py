"""Test images built in Python from /bin/busybox (busybox-static) and pushed over the registry API.

    img = push_busybox_image(registry, "test/busybox", "latest")
    img.manifest_digest, img.config_digest, img.ref   # "127.0.0.1:5000/test/busybox:latest"

Layers are tar archives made with `tarfile` (see `build_tar` and the entry
helpers, also for hostile layers), compressed with gzip, zstd or not at all;
manifests are OCI or Docker schema 2; indexes are OCI indexes or Docker
manifest lists. Everything is deterministic, so an image built twice has
the same digests.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable

import httpx

BUSYBOX = "/bin/busybox"
MTIME = 1_700_000_000

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_MEDIA_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}

APPLETS = ["sh", "ash", "ls", "cat", "echo", "sleep", "id", "env", "true", "false", "wc", "test", "mkdir",
           "rm", "ps", "hostname", "whoami", "touch", "stat", "head", "tail", "grep", "printf", "kill",
           "top", "date", "ln", "cp", "mv", "chmod", "readlink", "pwd", "uname", "nc", "wget", "ip", "ping",
           "mount", "df", "du", "find", "sed", "awk", "seq", "yes", "dd", "tee", "sync", "nslookup", "vi",
           "xargs", "sort", "uniq", "tr", "cut", "md5sum", "sha256sum", "base64", "ifconfig", "netstat",
           "basename", "dirname", "expr", "usleep", "timeout", "watch", "less", "more", "tar", "gzip", "ls"]


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# -- tar entries ------------------------------------------------------------------


def _info(path: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = MTIME
    ti.uname = ti.gname = ""
    return ti


def file_entry(path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    ti = _info(path, tarfile.REGTYPE, mode, uid, gid)
    ti.size = len(data)
    return ti, data


def dir_entry(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> tuple[tarfile.TarInfo, None]:
    return _info(path, tarfile.DIRTYPE, mode, uid, gid), None


def symlink_entry(path: str, target: str) -> tuple[tarfile.TarInfo, None]:
    ti = _info(path, tarfile.SYMTYPE, 0o777)
    ti.linkname = target
    return ti, None


def hardlink_entry(path: str, target: str) -> tuple[tarfile.TarInfo, None]:
    ti = _info(path, tarfile.LNKTYPE, 0o644)
    ti.linkname = target
    return ti, None


def device_entry(path: str, kind: str = "char", major: int = 1, minor: int = 3) -> tuple[tarfile.TarInfo, None]:
    ti = _info(path, tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE, 0o666)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def whiteout_entry(path: str) -> tuple[tarfile.TarInfo, bytes]:
    """An OCI whiteout deleting `path` of a lower layer."""
    head, _, name = path.rpartition("/")
    return file_entry(f"{head}/.wh.{name}" if head else f".wh.{name}", b"", 0o600)


def opaque_entry(directory: str) -> tuple[tarfile.TarInfo, bytes]:
    """An OCI opaque-directory marker: `directory` hides everything lower layers put in it."""
    return file_entry(f"{directory.rstrip('/')}/.wh..wh..opq", b"", 0o600)


def build_tar(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]], *, pax: bool = True) -> bytes:
    """An uncompressed tar of the entries, in order, exactly as given (no sanitising)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, compression: str, level: int = 6) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=level, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


@dataclass
class Layer:
    tar: bytes  # uncompressed
    compression: str = "gzip"
    _blob: bytes | None = field(default=None, repr=False)

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            self._blob = compress(self.tar, self.compression)
        return self._blob

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    def media_type(self, kind: str) -> str:
        return LAYER_MEDIA_TYPES[(kind, self.compression)]


@functools.lru_cache(maxsize=1)
def _busybox_bytes() -> bytes:
    with open(BUSYBOX, "rb") as f:
        return f.read()


PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnobody:x:65534:\n"


def busybox_entries(*, passwd: bytes = PASSWD, group: bytes = GROUP) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """A minimal root filesystem: busybox, its common applets, /etc/passwd and friends."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [
        dir_entry("bin"), dir_entry("etc"), dir_entry("root", 0o700), dir_entry("tmp", 0o1777),
        dir_entry("var"), dir_entry("proc", 0o555), dir_entry("sys", 0o555), dir_entry("dev"),
        dir_entry("usr"), dir_entry("usr/bin"),
        file_entry("bin/busybox", _busybox_bytes(), 0o755),
    ]
    entries += [hardlink_entry(f"bin/{a}", "bin/busybox") for a in sorted(set(APPLETS))]
    entries += [symlink_entry("usr/bin/env", "/bin/env"),
                file_entry("etc/passwd", passwd), file_entry("etc/group", group),
                file_entry("etc/hostname", b"busybox\n")]
    return entries


@functools.lru_cache(maxsize=4)
def busybox_layer_tar() -> bytes:
    return build_tar(busybox_entries())


def busybox_layer(compression: str = "gzip") -> Layer:
    return Layer(busybox_layer_tar(), compression)


# -- images -------------------------------------------------------------------------


@dataclass
class Image:
    layers: list[Layer]
    kind: str = "oci"  # "oci" or "docker"
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""
    user: str = ""
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    entrypoint: list[str] | None = None
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/sh"])
    working_dir: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""

    def config_bytes(self) -> bytes:
        cfg: dict[str, Any] = {"Env": self.env}
        if self.user:
            cfg["User"] = self.user
        if self.entrypoint is not None:
            cfg["Entrypoint"] = self.entrypoint
        if self.cmd is not None:
            cfg["Cmd"] = self.cmd
        if self.working_dir:
            cfg["WorkingDir"] = self.working_dir
        if self.exposed_ports:
            cfg["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.labels:
            cfg["Labels"] = self.labels
        if self.stop_signal:
            cfg["StopSignal"] = self.stop_signal
        doc: dict[str, Any] = {
            "created": "2023-11-14T22:13:20Z", "architecture": self.architecture, "os": self.os, "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in self.layers]},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "crio-py tests"} for _ in self.layers],
        }
        if self.variant:
            doc["variant"] = self.variant
        return json.dumps(doc, sort_keys=True).encode()

    def manifest_bytes(self) -> bytes:
        config = self.config_bytes()
        mt = OCI_MANIFEST if self.kind == "oci" else DOCKER_MANIFEST
        doc = {
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": OCI_CONFIG if self.kind == "oci" else DOCKER_CONFIG,
                       "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": l.media_type(self.kind), "digest": l.digest, "size": len(l.blob)}
                       for l in self.layers],
        }
        return json.dumps(doc, indent=2).encode()

    @property
    def media_type(self) -> str:
        return OCI_MANIFEST if self.kind == "oci" else DOCKER_MANIFEST

    @property
    def config_digest(self) -> str:
        return sha256(self.config_bytes())


@dataclass
class Pushed:
    registry_host: str
    repo: str
    tag: str | None
    manifest_digest: str  # what the tag points at (an index for multi-platform images)
    config_digest: str  # the image id of the default platform's image
    layer_digests: list[str]
    diff_ids: list[str]
    size: int  # config + compressed layers
    images: dict[str, "Pushed"] = field(default_factory=dict)  # per platform, for indexes

    @property
    def name(self) -> str:
        return f"{self.registry_host}/{self.repo}"

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.digest_ref

    @property
    def digest_ref(self) -> str:
        return f"{self.name}@{self.manifest_digest}"

    @property
    def image_id(self) -> str:
        return self.config_digest


def _client(registry: Any) -> httpx.Client:
    verify = registry.verify() if hasattr(registry, "verify") else True
    return httpx.Client(base_url=registry.url, auth=registry.push_auth(), timeout=60.0, verify=verify)


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    """Monolithic upload (POST then PUT with the digest); skipped when the blob exists."""
    digest = sha256(data)
    if client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
        return digest
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    r.raise_for_status()
    location = r.headers["location"]
    sep = "&" if "?" in location else "?"
    r = client.put(f"{location}{sep}digest={digest}", content=data,
                   headers={"Content-Type": "application/octet-stream"})
    if r.status_code != 201:
        raise RuntimeError(f"blob upload of {digest} to {repo} failed: {r.status_code} {r.text[:300]}")
    return digest


def push_manifest(client: httpx.Client, repo: str, reference: str, body: bytes, media_type: str) -> str:
    r = client.put(f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type})
    if r.status_code != 201:
        raise RuntimeError(f"manifest push to {repo}:{reference} failed: {r.status_code} {r.text[:300]}")
    return sha256(body)


def push_image(registry: Any, repo: str, tag: str | None, image: Image) -> Pushed:
    """Push the blobs and the manifest of `image`; `tag=None` pushes by digest only."""
    with _client(registry) as client:
        for layer in image.layers:
            push_blob(client, repo, layer.blob)
        config = image.config_bytes()
        push_blob(client, repo, config)
        body = image.manifest_bytes()
        digest = push_manifest(client, repo, tag or sha256(body), body, image.media_type)
    return Pushed(registry.host, repo, tag, digest, sha256(config), [l.digest for l in image.layers],
                  [l.diff_id for l in image.layers], len(config) + sum(len(l.blob) for l in image.layers))


def push_index(registry: Any, repo: str, tag: str | None, images: list[Image], *, kind: str = "oci",
               default: tuple[str, str] = ("amd64", "")) -> Pushed:
    """A multi-platform image: each image pushed by digest, then an index under `tag`."""
    pushed = {}
    descriptors = []
    for img in images:
        p = push_image(registry, repo, None, img)
        plat = {"os": img.os, "architecture": img.architecture}
        if img.variant:
            plat["variant"] = img.variant
        body = img.manifest_bytes()
        descriptors.append({"mediaType": img.media_type, "digest": p.manifest_digest, "size": len(body),
                            "platform": plat})
        pushed["/".join(x for x in (img.os, img.architecture, img.variant) if x)] = p
    mt = OCI_INDEX if kind == "oci" else DOCKER_LIST
    body = json.dumps({"schemaVersion": 2, "mediaType": mt, "manifests": descriptors}, indent=2).encode()
    with _client(registry) as client:
        digest = push_manifest(client, repo, tag or sha256(body), body, mt)
    want = "/".join(x for x in ("linux", *default) if x)
    main = pushed.get(want) or next(iter(pushed.values()))
    return Pushed(registry.host, repo, tag, digest, main.config_digest, main.layer_digests, main.diff_ids,
                  main.size, pushed)


# -- the standard test images ---------------------------------------------------------


def push_busybox_image(registry: Any, repo: str = "test/busybox", tag: str | None = "latest", *,
                       kind: str = "oci", compression: str = "gzip", **config: Any) -> Pushed:
    """A single-layer busybox image; `config` sets Image fields (user, cmd, labels...)."""
    return push_image(registry, repo, tag, Image([busybox_layer(compression)], kind=kind, **config))


def multi_layer_image(kind: str = "docker") -> Image:
    """busybox, then /etc/motd and an app directory, then a data file: three layers."""
    layers = [
        busybox_layer(),
        Layer(build_tar([dir_entry("app"), file_entry("etc/motd", b"hello from layer 2\n"),
                         file_entry("app/run.sh", b"#!/bin/sh\necho running\n", 0o755)])),
        Layer(build_tar([dir_entry("data"), file_entry("data/values.txt", b"1\n2\n3\n")])),
    ]
    return Image(layers, kind=kind, working_dir="/app", labels={"layers": "3"},
                 entrypoint=["/bin/sh", "-c"], cmd=["echo hi"], exposed_ports=["8080/tcp"], stop_signal="SIGINT")


def push_multi_layer_image(registry: Any, repo: str = "test/multilayer", tag: str | None = "latest",
                           kind: str = "docker") -> Pushed:
    return push_image(registry, repo, tag, multi_layer_image(kind))


def whiteout_image() -> Image:
    """The upper layer deletes /data/gone, replaces /data/kept, and makes /opq opaque (only /opq/new stays)."""
    lower = Layer(build_tar([
        dir_entry("data"), file_entry("data/gone", b"deleted by the upper layer\n"),
        file_entry("data/kept", b"old content\n"),
        dir_entry("opq"), file_entry("opq/old1", b"hidden\n"), file_entry("opq/old2", b"hidden\n"),
        dir_entry("opq/olddir"), file_entry("opq/olddir/f", b"hidden\n"),
    ]))
    upper = Layer(build_tar([
        dir_entry("data"), whiteout_entry("data/gone"), file_entry("data/kept", b"new content\n"),
        dir_entry("opq"), opaque_entry("opq"), file_entry("opq/new", b"visible\n"),
    ]))
    return Image([busybox_layer(), lower, upper], labels={"kind": "whiteout"})


def push_whiteout_image(registry: Any, repo: str = "test/whiteout", tag: str | None = "latest") -> Pushed:
    return push_image(registry, repo, tag, whiteout_image())


def push_user_image(registry: Any, repo: str = "test/user", tag: str | None = "latest",
                    user: str = "app", extra_groups: dict[str, int] | None = None) -> Pushed:
    """busybox with user `app` (uid 1000, gid 1000) in /etc/passwd, and config User=app.

    `extra_groups` (name: gid) are groups of /etc/group that list `app` as a member.
    """
    passwd = PASSWD + b"app:x:1000:1000:app:/home/app:/bin/sh\n"
    group = GROUP + b"app:x:1000:\n" + b"".join(
        f"{name}:x:{gid}:app\n".encode() for name, gid in (extra_groups or {}).items())
    layers = [Layer(build_tar(busybox_entries(passwd=passwd, group=group))),
              Layer(build_tar([dir_entry("home"), dir_entry("home/app", 0o750, 1000, 1000),
                               file_entry("home/app/.profile", b"export HOME=/home/app\n", 0o644, 1000, 1000)]))]
    return push_image(registry, repo, tag, Image(layers, user=user))


def platform_layer(platform: str) -> Layer:
    return Layer(build_tar([dir_entry("etc"), file_entry("etc/platform", platform.encode() + b"\n")]))


def push_multiplatform_image(registry: Any, repo: str = "test/multiarch", tag: str | None = "latest", *,
                             kind: str = "oci") -> Pushed:
    """An index for linux/amd64, linux/arm64/v8 and linux/arm/v7; each has /etc/platform naming it."""
    images = []
    for arch, variant in (("arm64", "v8"), ("amd64", ""), ("arm", "v7")):
        name = "/".join(x for x in ("linux", arch, variant) if x)
        images.append(Image([busybox_layer(), platform_layer(name)], kind=kind, architecture=arch,
                            variant=variant, labels={"platform": name}))
    return push_index(registry, repo, tag, images, kind=kind)


def push_zstd_image(registry: Any, repo: str = "test/zstd", tag: str | None = "latest") -> Pushed:
    """busybox (gzip) and a zstd-compressed layer on top."""
    top = Layer(build_tar([dir_entry("z"), file_entry("z/zstd.txt", b"compressed with zstd\n" * 100)]), "zstd")
    return push_image(registry, repo, tag, Image([busybox_layer(), top], labels={"kind": "zstd"}))


def big_image(total_mb: int = 100, layers: int = 5, seed: int = 0) -> Image:
    """busybox plus `layers` layers of incompressible data, `total_mb` MiB in all."""
    per = total_mb * 1024 * 1024 // layers
    out = [busybox_layer()]
    for i in range(layers):
        data = hashlib.shake_256(f"criopy-bench-{seed}-{i}".encode()).digest(per) if per <= 64 << 20 else os.urandom(per)
        layer = Layer(build_tar([dir_entry("blob"), file_entry(f"blob/part{i}", data)]))
        layer._blob = compress(layer.tar, "gzip", level=1)
        out.append(layer)
    return Image(out, labels={"kind": "big"})


def push_big_image(registry: Any, repo: str = "test/big", tag: str | None = "latest", *, total_mb: int = 100,
                   layers: int = 5, seed: int = 0) -> Pushed:
    return push_image(registry, repo, tag, big_image(total_mb, layers, seed))
