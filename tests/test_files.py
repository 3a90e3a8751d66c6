"""Atomic writes (medvlm/files.py): a reader or a crash sees the old version whole or the new one whole."""

import stat

import pytest

from medvlm.files import atomic_path, write_bytes, write_text


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ledger" / "privacy-ledger.json"
    write_text(path, "old", durable=True)
    write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text(path, "whole")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "global"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "a.safetensors").write_text("1")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "b.safetensors").write_text("2")
    assert [p.name for p in folder.iterdir()] == ["b.safetensors"]
    with pytest.raises(OSError), atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "c.safetensors").write_text("3")
        raise OSError("disk full")
    assert [p.name for p in folder.iterdir()] == ["b.safetensors"] and len(list(tmp_path.iterdir())) == 1


def test_a_private_key_is_created_readable_by_its_owner_only(tmp_path):
    path = write_bytes(tmp_path / "server.key", b"secret", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"secret"
