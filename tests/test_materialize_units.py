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


# --- _sync: one syncfs for the data directory's filesystem, fsync file by file elsewhere -----------

def _synced_paths(monkeypatch, *, syncfs_works: bool) -> tuple[list[str], list[int]]:
    from pgvault.backup import directio, materialize

    fsynced: list[str] = []
    syncfs_calls: list[int] = []

    def fake_syncfs(fd: int) -> bool:
        syncfs_calls.append(fd)
        return syncfs_works

    monkeypatch.setattr(directio, "syncfs", fake_syncfs)
    monkeypatch.setattr(materialize, "_fsync", lambda path: fsynced.append(path))
    return fsynced, syncfs_calls


def _restored_tree(tmp_path, elsewhere: str):
    dest = tmp_path / "data"
    (dest / "base" / "1").mkdir(parents=True)
    (dest / "pg_tblspc").mkdir()
    os.symlink(elsewhere, dest / "pg_tblspc" / "16400")
    os.makedirs(os.path.join(elsewhere, "PG_15_x", "5"))
    files = [("base/1/100", 10, 0o600, []), ("server.key", 4, 0o400, []),
             ("pg_tblspc/16400/PG_15_x/5/200", 10, 0o600, [])]
    for path, size, _mode, _src in files:
        with open(dest / path, "wb") as f:
            f.write(b"x" * size)
    return dest, _index(files)


def test_sync_uses_one_syncfs_and_fsyncs_only_a_tablespace_on_another_filesystem(tmp_path, monkeypatch):
    from pgvault.backup.materialize import _sync

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary directory")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        location = os.path.join(shm, "ts")
        dest, index = _restored_tree(tmp_path, location)
        fsynced, syncfs_calls = _synced_paths(monkeypatch, syncfs_works=True)
        _sync(str(dest), index, {16400: location})
        assert len(syncfs_calls) == 1
        tablespace = str(dest / "pg_tblspc" / "16400")
        assert str(dest / "pg_tblspc/16400/PG_15_x/5/200") in fsynced
        assert str(dest / "base/1/100") not in fsynced  # covered by the syncfs
        assert {tablespace, tablespace + "/PG_15_x", tablespace + "/PG_15_x/5"} <= set(fsynced)
        assert shm in fsynced  # the new location's own entry
        assert stat.S_IMODE((dest / "server.key").stat().st_mode) == 0o400  # its mode applied before the sync


def test_sync_without_syncfs_fsyncs_every_file_and_directory(tmp_path, monkeypatch):
    from pgvault.backup.materialize import _sync

    location = str(tmp_path / "ts")
    dest, index = _restored_tree(tmp_path, location)
    fsynced, syncfs_calls = _synced_paths(monkeypatch, syncfs_works=False)
    _sync(str(dest), index, {16400: location})
    assert len(syncfs_calls) == 1
    for path in ("base/1/100", "server.key", "pg_tblspc/16400/PG_15_x/5/200"):
        assert str(dest / path) in fsynced
    for directory in ("", "base", "base/1", "pg_tblspc/16400/PG_15_x/5"):
        assert str(dest / directory).rstrip("/") in fsynced
    assert str(tmp_path) in fsynced  # the data directory's own entry


def test_syncfs_really_syncs_an_open_directory(tmp_path):
    from pgvault.backup import directio

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert directio.syncfs(fd) is True  # Linux has had syncfs since 2.6.39
        with pytest.raises(OSError):
            directio.syncfs(-1)  # EBADF is an error, not "unsupported"
    finally:
        os.close(fd)
