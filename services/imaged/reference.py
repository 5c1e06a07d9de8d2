"""Image references: parsing, validation and short-name normalisation.

Follows the grammar of the distribution `reference` package: an optional
registry domain (it has a dot, a colon or is `localhost`), a path of
lower-case components, an optional tag and an optional digest. Short names
become docker.io names the way the kubelet and CRI-O expect:
`busybox` -> `docker.io/library/busybox:latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?$|^\[[0-9a-fA-F:.]+\](?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_ID_RE = re.compile(r"^(?:sha256:)?([a-f0-9]{64})$")
MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    """A fully qualified reference: registry domain, repository, tag and/or digest."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`domain/path`, the repository's full name."""
        return f"{self.domain}/{self.path}"

    @property
    def tagged(self) -> str | None:
        return f"{self.name}:{self.tag}" if self.tag else None

    @property
    def digested(self) -> str | None:
        return f"{self.name}@{self.digest}" if self.digest else None

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.domain, self.path, self.tag, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def image_id_of(text: str) -> str | None:
    """`sha256:<hex>` when `text` is a full image id (with or without its prefix)."""
    m = _ID_RE.match(text)
    return f"sha256:{m.group(1)}" if m else None


def _split_domain(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return None, name


def parse(text: str, *, default_domain: str | None = DOCKER_HUB) -> Reference | tuple[None, str, str | None, str | None]:
    """Parse `text`; short names are qualified with `default_domain`.

    With `default_domain=None` a short name comes back as the tuple
    `(None, path, tag, digest)` so the caller can try its search registries.
    """
    if not isinstance(text, str) or not text:
        raise InvalidArgument("image reference is empty")
    if len(text) > 1024 or any(c.isspace() for c in text):
        raise InvalidArgument(f"invalid image reference {text[:100]!r}")
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    rest, at, digest = text.partition("@")
    if at:
        if not _DIGEST_RE.match(digest):
            raise InvalidArgument(f"invalid image reference {text!r}: unsupported or malformed digest {digest!r}")
    else:
        digest = None
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid image reference {text!r}: invalid tag {tag!r}")
    domain, path = _split_domain(rest)
    if domain is not None and not _DOMAIN_RE.match(domain):
        raise InvalidArgument(f"invalid image reference {text!r}: invalid registry {domain!r}")
    if not _PATH_RE.match(path):
        raise InvalidArgument(f"invalid image reference {text!r}: repository name must be lowercase "
                              "alphanumeric components separated by '/'")
    if domain is None and default_domain is None:
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return (None, path, tag, digest)
    if domain is None:
        domain = default_domain
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidArgument(f"invalid image reference {text[:100]!r}: name longer than {MAX_NAME_LENGTH}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def qualify(domain: str, path: str, tag: str | None, digest: str | None) -> Reference:
    """A short name qualified with one search registry."""
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return Reference(domain, path, tag, digest)


def candidates(text: str, search_registries: list[str]) -> list[Reference]:
    """The references `text` may mean, in the order to try them.

    A qualified name means itself. A short name means, in order, itself
    under each unqualified-search registry, or docker.io when there are none.
    """
    parsed = parse(text, default_domain=None)
    if isinstance(parsed, Reference):
        return [parsed]
    _, path, tag, digest = parsed
    registries = search_registries or [DOCKER_HUB]
    return [qualify(r, path, tag, digest) for r in registries]
