"""Layers that try to write outside their directory fail cleanly and leave nothing behind."""

import os
from pathlib import Path

import pytest

from shared.errors import InvalidArgument
from tests.storaged import support as T

OUT = "@OUT@"  # replaced by the absolute path of a directory outside the store


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.lstat().st_mode, p.lstat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() and not p.is_symlink() else None,
                                       sorted(os.listxattr(p, follow_symlinks=False)))
            for p in [path, *path.rglob("*")]}


HOSTILE = {
    "absolute name": ([T.file(f"{OUT}/pwned", b"x")], "absolute path"),
    "dot-dot": ([T.file("../../../../../pwned", b"x")], "'..'"),
    "dot-dot in the middle": ([T.directory("a"), T.file("a/../../pwned", b"x")], "'..'"),
    "file through a symlink": (
        [T.symlink("evil", OUT), T.file("evil/pwned", b"x")], "symbolic link"),
    "file through a relative symlink": (
        [T.symlink("evil", "../../../../../../../../../../.."), T.file("evil/tmp/pwned", b"x")],
        "symbolic link"),
    "directory through a symlink": (
        [T.symlink("evil", OUT), T.directory("evil/sub")], "symbolic link"),
    "symlinked parent deeper down": (
        [T.directory("d"), T.symlink("d/link", OUT), T.file("d/link/pwned", b"x")], "symbolic link"),
    "chain of symlinks": (
        [T.symlink("a", "b"), T.symlink("b", OUT), T.file("a/pwned", b"x")], "symbolic link"),
    "hard link to an absolute path": ([T.hardlink("h", f"{OUT}/victim")], "absolute path"),
    "hard link with dot-dot": ([T.hardlink("h", "../../../../../../victim")], "'..'"),
    "hard link through a symlink": (
        [T.symlink("evil", OUT), T.hardlink("h", "evil/victim")], "symbolic link"),
    "hard link placed through a symlink": (
        [T.file("f", b"f"), T.symlink("evil", OUT), T.hardlink("evil/h", "f")], "symbolic link"),
    "hard link to a missing file": ([T.hardlink("h", "missing")], "does not exist"),
    "whiteout through a symlink": (
        [T.symlink("evil", OUT), T.file("evil/.wh.victim")], "symbolic link"),
    "opaque marker through a symlink": (
        [T.symlink("evil", OUT), T.file("evil/.wh..wh..opq")], "symbolic link"),
    "whiteout of dot-dot": ([T.file(".wh...")], "whiteout"),
    "whiteout of dot": ([T.directory("d"), T.file("d/.wh..")], "whiteout"),
    "parent is a file": ([T.file("f", b"f"), T.file("f/child", b"x")], "not a directory"),
    "character device": ([T.chardev("dev/mem", 1, 1)], "device nodes"),
    "block device": ([(lambda i: (setattr(i[0], "type", b"4") or i))(T.chardev("dev/sda", 8, 0))],
                     "device nodes"),
    "root as a symlink": ([T.symlink("./", OUT)], "layer root"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_layer_fails_cleanly(storaged, blob_dir, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    before = _tree(outside)

    entries, message = HOSTILE[case]
    fixed = []
    for info, data in entries:
        info.name = info.name.replace(OUT, str(outside))
        info.linkname = info.linkname.replace(OUT, str(outside))
        fixed.append((info, data))
    # Valid content first: what was already extracted must go too.
    good = [T.directory("bin"), T.file("bin/busybox", b"\x7fELF" * 1000, mode=0o755)]
    blob = T.write_blob(blob_dir, good + fixed)

    with pytest.raises(InvalidArgument, match=message) as info:
        await storaged.unpack(layers=[blob.spec()])

    hostile_entry = fixed[-1][0].name
    assert f"layer entry {hostile_entry!r}" in str(info.value) or "layer root" in str(info.value)
    assert _tree(outside) == before
    assert not (tmp_path / "pwned").exists() and not Path("/pwned").exists()
    root = Path(storaged._root)
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "layers") == []
    assert os.listdir(root / "l") == []
    assert await storaged.list_layers() == []


async def test_oversized_metadata_header_is_refused(storaged, blob_dir):
    info, data = T.file("f", b"x")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    blob = T.write_blob(blob_dir, [(info, data)])
    with pytest.raises(InvalidArgument, match="metadata header"):
        await storaged.unpack(layers=[blob.spec()])
    assert os.listdir(Path(storaged._root) / "tmp") == []
