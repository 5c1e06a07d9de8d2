"""Fixtures for imaged: real docker-registry instances filled once per session, and Imaged factories."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from services.imaged.service import Imaged
from shared.config import Config
from tests.support import images
from tests.support.hostile_registry import HostileRegistry
from tests.support.registry import Registry, launch_registry


class Catalog:
    """The images pushed to the session's registry, by name."""

    def __init__(self, reg: Registry) -> None:
        self.busybox = images.push_busybox_image(reg, "test/busybox", "latest")
        self.busybox_alias = images.push_busybox_image(reg, "test/busybox", "alias")
        self.busybox_other_repo = images.push_busybox_image(reg, "other/busybox", "v1")
        self.short = images.push_busybox_image(reg, "busybox", "latest")
        self.docker_busybox = images.push_busybox_image(reg, "test/docker-busybox", "latest", kind="docker")
        self.multi = images.push_multi_layer_image(reg, "test/multilayer", "latest", kind="docker")
        self.whiteout = images.push_whiteout_image(reg, "test/whiteout", "latest")
        self.user = images.push_user_image(reg, "test/user", "latest")
        self.index = images.push_multiplatform_image(reg, "test/multiarch", "latest", kind="oci")
        self.manifest_list = images.push_multiplatform_image(reg, "test/multiarch-docker", "latest", kind="docker")
        self.zstd = images.push_zstd_image(reg, "test/zstd", "latest")
        self.uncompressed = images.push_busybox_image(reg, "test/plain", "latest", compression="none",
                                                      labels={"compression": "none"})


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = launch_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def catalog(registry: Registry) -> Catalog:
    return Catalog(registry)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, registry: Registry, catalog: Catalog) -> Iterator[Registry]:
    """htpasswd basic auth, serving the same storage as `registry`."""
    reg = launch_registry(tmp_path_factory.mktemp("basic-registry"), auth="basic", storage_dir=registry.storage_dir)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, registry: Registry, catalog: Catalog) -> Iterator[Registry]:
    """Bearer tokens from a test token server, serving the same storage as `registry`."""
    reg = launch_registry(tmp_path_factory.mktemp("token-registry"), auth="token", storage_dir=registry.storage_dir)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    reg = HostileRegistry()
    try:
        yield reg
    finally:
        reg.stop()


def imaged_config(root: Path, insecure: list[str], **image_options: object) -> Config:
    config = Config()
    config.crio.root = str(root / "root")
    config.crio.runroot = str(root / "run")
    config.crio.image.registries_conf = str(root / "registries.conf")
    config.crio.image.insecure_registries = list(insecure)
    for key, value in image_options.items():
        setattr(config.crio.image, key, value)
    return config


MakeImaged = Callable[..., Awaitable[Imaged]]


@pytest.fixture
async def make_imaged(tmp_path: Path) -> AsyncIterator[MakeImaged]:
    """Build and start an Imaged on tmp_path; every instance is stopped at the end."""
    started: list[Imaged] = []

    async def make(*insecure: str, config: Config | None = None, **image_options: object) -> Imaged:
        cfg = config or imaged_config(tmp_path, list(insecure), **image_options)
        service = Imaged(cfg)
        await service.start()
        started.append(service)
        return service

    try:
        yield make
    finally:
        for service in started:
            await service.stop()


def stored_blobs(service: Imaged) -> set[str]:
    return {f"sha256:{p.name}" for p in service.store.blob_dir.iterdir()}


def temp_files(service: Imaged) -> list[Path]:
    return list(service.store.tmp_dir.iterdir())
