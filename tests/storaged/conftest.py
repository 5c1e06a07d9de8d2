from pathlib import Path

import pytest

from services.storaged.service import Storaged
from shared.config import Config
from tests.storaged.support import unmount_everything_under


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = Config()
    config.crio.root = str(tmp_path / "root")
    config.crio.runroot = str(tmp_path / "run")
    return config


@pytest.fixture
def blob_dir(config: Config) -> Path:
    return config.state_dir("imaged") / "blobs" / "sha256"


@pytest.fixture
async def storaged(config: Config, tmp_path: Path):
    service = Storaged(config)
    try:
        await service.start()
        yield service
        await service.stop()
    finally:
        unmount_everything_under(tmp_path)
