"""FileCreator: a restore's files created ahead of the workers, in their order, each once, errors handed on."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from pgvault.backup.errors import BackupError
from pgvault.backup.materialize import OWNER_RW, FileCreator, _create_index


def _index(files: list[tuple[str, int, int, list[tuple[str, int]]]]):
    """files: (path, size, mode, [(object, offset), ...])."""
    index = sqlite3.connect(":memory:")
    _create_index(index)
    for path, size, mode, sources in files:
        file_id = index.execute("INSERT INTO files (path, size, mode) VALUES (?, ?, ?)", (path, size, mode)).lastrowid
        for obj, offset in sources:
            index.execute("INSERT INTO sources (object, sha256, offset, file_id, blocks, hashes) VALUES (?, '', ?, ?, "
                          "'[]', '[]')", (obj, offset, file_id))
    return index


FILES = [
    ("base/1/100", 3 << 20, 0o600, [("data/0001", 0), ("data/0002", 0)]),  # spans two objects
    ("base/1/101", 8192, 0o600, [("data/0002", 1 << 20)]),
    ("server.key", 100, 0o400, [("data/0001", 3 << 20)]),
    ("base/1/102", 0, 0o600, []),  # empty: no object holds it
]


def test_creates_every_file_once_presized_and_owner_writable(tmp_path):
    (tmp_path / "base" / "1").mkdir(parents=True)
    creator = FileCreator.start(str(tmp_path), _index(FILES))
    creator.wait_for("data/0001")
    assert (tmp_path / "base/1/100").stat().st_size == 3 << 20
    assert (tmp_path / "server.key").stat().st_size == 100
    creator.wait_for("data/0002")
    creator.finish()
    for path, size, mode, _sources in FILES:
        st = (tmp_path / path).stat()
        assert st.st_size == size
        # written first, so owner-writable whatever the backup's mode (_sync applies the mode at the end)
        assert stat.S_IMODE(st.st_mode) == mode | OWNER_RW
    assert sorted(os.listdir(tmp_path / "base/1")) == ["100", "101", "102"]


def test_orders_files_as_the_workers_take_objects(tmp_path):
    (tmp_path / "base" / "1").mkdir(parents=True)
    creator = FileCreator.start(str(tmp_path), _index(FILES))
    creator.finish()
    # objects in key order (as _fill submits them), files by offset within each; empty files last
    assert [(key, [f[0] for f in files]) for key, files in creator._by_object] == [
        ("data/0001", ["base/1/100", "server.key"]), ("data/0002", ["base/1/100", "base/1/101"])]
    assert [f[0] for f in creator._rest] == ["base/1/102"]


def test_an_existing_file_is_never_written_into_and_the_error_reaches_the_workers(tmp_path):
    (tmp_path / "base" / "1").mkdir(parents=True)
    (tmp_path / "base/1/101").write_bytes(b"someone else's")
    creator = FileCreator.start(str(tmp_path), _index(FILES))
    with pytest.raises(BackupError, match="data/0002"):
        creator.wait_for("data/0002")
    with pytest.raises(FileExistsError):
        creator.finish()
    assert (tmp_path / "base/1/101").read_bytes() == b"someone else's"
    assert (tmp_path / "base/1/100").exists()  # the first object's files came before the failure
    assert not (tmp_path / "base/1/102").exists()  # and it stopped at the failure


def test_stop_after_a_worker_failed_creates_nothing_more(tmp_path):
    (tmp_path / "base" / "1").mkdir(parents=True)
    many = [(f"base/1/{n}", 0, 0o600, [(f"data/{n:04d}", 0)]) for n in range(2000)]
    creator = FileCreator.start(str(tmp_path), _index(many))
    creator.stop()
    made = len(os.listdir(tmp_path / "base/1"))
    assert made < 2000
    assert len(os.listdir(tmp_path / "base/1")) == made  # the thread is done: nothing appears later
