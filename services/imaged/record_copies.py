"""A JSON copy of each ready image's record beside the database: what a damaged database is made again from.

    <imaged state>/records/<image id hex>.json

The database is the truth while it is healthy; a copy follows each change to
its ready image, the last write winning. A copy that could not be written is
written again at the next start, when the copies are compared with the
database; a copy found unreadable then is moved to quarantine/. Blocks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared import quarantine


class RecordCopies:
    def __init__(self, directory: Path, state_dir: Path) -> None:
        self.directory = directory
        self.state_dir = state_dir

    def _path(self, image_id: str) -> Path:
        return self.directory / f"{image_id.removeprefix('sha256:')}.json"

    def write(self, image_id: str, copy: dict[str, Any]) -> None:
        """Replace the copy in one rename; a crash leaves the old one or the new one."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        path = self._path(image_id)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(copy, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, image_id: str) -> None:
        try:
            os.unlink(self._path(image_id))
        except FileNotFoundError:
            pass

    def set_aside(self, image_id: str, error: str) -> None:
        quarantine.set_aside(self.state_dir, [self._path(image_id)], kind="image_record", name=image_id, error=error)

    def read_all(self) -> list[tuple[str, dict[str, Any]]]:
        """(image id, copy) for every readable copy; the others go to quarantine."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # a write a crash interrupted
                continue
            image_id = f"sha256:{path.stem}"
            try:
                copy = json.loads(path.read_bytes())
                if not isinstance(copy, dict) or copy.get("id") != image_id or not isinstance(copy.get("pulled_ns"), int):
                    raise ValueError("not the record of the image its name says")
            except (OSError, ValueError) as e:
                self.set_aside(image_id, str(e))
                continue
            out.append((image_id, copy))
        return out
