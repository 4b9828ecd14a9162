"""The pure and local parts of physical backups: no server, real files in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from pgvault.archive import CodecOptions
from pgvault.backup import layout
from pgvault.backup.blockmap import (
    Location,
    block_locations,
    changed_blocks,
    contiguous_length,
    group_sources,
    merge_join,
)
from pgvault.backup.blocks import Piece, PieceReader, block_hash, hash_blocks
from pgvault.backup.copy import Copier
from pgvault.backup.errors import BackupError, BackupInProgressError
from pgvault.backup.leftovers import find_leftovers, remove_leftovers
from pgvault.backup.lock import BackupLock, LockHolder, holder_is_dead, read_holder
from pgvault.backup.manifest import (
    BLOCK_HASH,
    BLOCK_HASH_SHA256,
    FileEntry,
    FilesWriter,
    Manifest,
    Source,
    SpooledFiles,
    Tablespace,
    check_coverage,
    check_path,
    iter_files,
    list_backups,
    path_key,
    read_manifest,
    write_manifest,
)
from pgvault.backup.directio import ALIGN, FileReader, FileWriter, aligned_buffer, is_aligned
from pgvault.backup.materialize import block_runs, materialize_backup
from pgvault.backup.scan import excluded_names, scan_data_dir
from pgvault.backup.session import parse_backup_label, parse_tablespace_map, wal_segments
from pgvault.config import load_settings
from pgvault.errors import ConfigError, CorruptObjectError, PgvaultError
from pgvault.progressbar import format_bytes, render
from pgvault.storage.local import LocalStorage
from pgvault.wal import parse_lsn

KIB = 1024


# --- layout -----------------------------------------------------------------


def test_labels_format_and_parse():
    when = datetime(2026, 11, 27, 20, 30, 0, 999, tzinfo=timezone.utc)
    assert layout.format_label(when, "full") == "20261127T203000ZF"
    assert layout.format_label(when, "incr") == "20261127T203000ZI"
    assert layout.parse_label("20261127T203000ZI") == (when.replace(microsecond=0), "incr")
    for bad in ("20261127T203000Z", "20261127T203000ZX", "20261327T203000ZF", "x20261127T203000ZF", "", None):
        assert layout.parse_label(bad) is None
    with pytest.raises(BackupError, match="invalid backup label 'nope': expected e.g. 20261127T203000ZF"):
        layout.check_label("nope")


def test_next_label_is_unique_and_later_than_every_existing_one():
    now = datetime(2026, 11, 27, 20, 30, 0, tzinfo=timezone.utc)
    assert layout.next_label(now, "full", []) == "20261127T203000ZF"
    assert layout.next_label(now, "incr", ["20261127T203000ZF"]) == "20261127T203001ZI"
    assert layout.next_label(now, "full", ["20261127T203005ZI", "junk"]) == "20261127T203006ZF"
    assert layout.next_label(now, "full", ["20261127T202959ZF"]) == "20261127T203000ZF"


@pytest.mark.parametrize("key, parsed", [
    ("backups/20261127T203000ZF/manifest.json", layout.BackupKey("20261127T203000ZF", "manifest")),
    ("backups/20261127T203000ZF/files.jsonl", layout.BackupKey("20261127T203000ZF", "files")),
    ("backups/20261127T203000ZI/data/000012", layout.BackupKey("20261127T203000ZI", "data", 12)),
    ("backups/20261127T203000ZI/data/1234567", layout.BackupKey("20261127T203000ZI", "data", 1234567)),
    ("backups/20261127T203000ZI/data/12", None),
    ("backups/notalabel/manifest.json", None),
    ("backups/20261127T203000ZF/other", None),
    ("wal/0000000100000000/x", None),
])
def test_parse_backup_key(key, parsed):
    assert layout.parse_backup_key(key) == parsed


def test_keys_round_trip():
    label = "20261127T203000ZF"
    assert layout.parse_backup_key(layout.data_key(label, 7)) == layout.BackupKey(label, "data", 7)
    assert layout.data_key(label, 7) == "backups/20261127T203000ZF/data/000007"
    assert layout.parse_backup_key(layout.manifest_key(label)).kind == "manifest"
    assert layout.parse_backup_key(layout.files_key(label)).kind == "files"


# --- exclusions and the scan --------------------------------------------------


@pytest.mark.parametrize("directory, names, excluded", [
    ("", ["postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "current_logfiles",
          "postgresql.conf", "PG_VERSION", "backup_manifest", "postgresql.auto.conf.tmp", "pgsql_tmp"],
     {"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "current_logfiles",
      "backup_manifest", "postgresql.auto.conf.tmp", "pgsql_tmp"}),
    ("pg_wal", ["000000010000000000000001", "archive_status", "000000010000000000000001.partial"],
     {"000000010000000000000001", "000000010000000000000001.partial"}),
    ("pg_wal/archive_status", ["000000010000000000000001.done"], {"000000010000000000000001.done"}),
    ("pg_replslot", ["slot1"], {"slot1"}),
    ("pg_stat_tmp", ["global.stat"], {"global.stat"}),
    ("pg_subtrans", ["0000"], {"0000"}),
    ("pg_notify", ["0000"], {"0000"}),
    ("pg_xact", ["0000"], set()),
    ("global", ["pg_control", "pg_internal.init", "pg_internal.init.123", "1262"],
     {"pg_internal.init", "pg_internal.init.123"}),
    ("base/5", ["1259", "1259_fsm", "t3_16384", "t3_16384_fsm", "t3_16384.1", "pgsql_tmp",
                "16390", "16390_init", "16390_fsm", "16390.1", "16391", "backup_label"],
     {"t3_16384", "t3_16384_fsm", "t3_16384.1", "pgsql_tmp", "16390", "16390_fsm", "16390.1"}),
    ("pg_tblspc/16400/PG_15_202209061/5", ["16401", "16401_init", "16402", "t4_1"], {"16401", "t4_1"}),
    ("base/pgsql_tmp", [], set()),
    ("log", ["postgresql.log"], set()),  # server logs in the data directory are kept, as pg_basebackup does
])
def test_excluded_names(directory, names, excluded):
    assert excluded_names(directory, names) == excluded


def make_data_dir(root, tablespace_dir=None):
    """A small fake data directory: enough structure for the scan's rules."""
    files = {
        "PG_VERSION": b"15\n",
        "postgresql.conf": b"# conf\n",
        "postmaster.pid": b"123\n",
        "backup_label": b"stale\n",
        "global/pg_control": os.urandom(8192),
        "global/1262": os.urandom(8192),
        "global/pg_internal.init": b"cache",
        "base/1/1259": os.urandom(3 * 8192),
        "base/1/1259_fsm": os.urandom(24576),
        "base/1/t3_999": b"temp",
        "base/10/2600": b"",
        "base/1-x/note": b"odd directory name",
        "pg_wal/000000010000000000000001": b"wal",
        "pg_wal/archive_status/000000010000000000000001.done": b"",
        "pg_replslot/s/state": b"slot",
        "pg_xact/0000": os.urandom(8192),
    }
    for path, data in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "pg_tblspc"))
    os.makedirs(os.path.join(root, "pg_stat_tmp"))
    if tablespace_dir:
        for sub, data in (("PG_15_202209061/1/16500", os.urandom(300 * KIB)), ("PG_14_201909212/1/1", b"old")):
            full = os.path.join(tablespace_dir, sub)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
        os.symlink(tablespace_dir, os.path.join(root, "pg_tblspc", "16400"))
    return files


def test_scan_order_exclusions_and_tablespaces(tmp_path):
    data = tmp_path / "data"
    make_data_dir(str(data), tablespace_dir=str(tmp_path / "ts"))
    entries = list(scan_data_dir(str(data), pg_major_version=15))
    paths = [e.path for e in entries]
    assert paths == sorted(paths, key=path_key)
    assert paths == [
        "PG_VERSION", "base", "base/1", "base/1/1259", "base/1/1259_fsm", "base/1-x", "base/1-x/note",
        "base/10", "base/10/2600", "global", "global/1262", "global/pg_control",
        "pg_replslot", "pg_stat_tmp", "pg_tblspc", "pg_tblspc/16400", "pg_tblspc/16400/PG_15_202209061",
        "pg_tblspc/16400/PG_15_202209061/1", "pg_tblspc/16400/PG_15_202209061/1/16500",
        "pg_wal", "pg_wal/archive_status", "pg_xact", "pg_xact/0000", "postgresql.conf",
    ]
    by_path = {e.path: e for e in entries}
    assert by_path["pg_tblspc/16400"].type == "link"
    assert by_path["pg_tblspc/16400"].target == str(tmp_path / "ts")
    assert by_path["base/1/1259"].size == 3 * 8192 and by_path["base/1"].type == "dir"


# --- block bookkeeping ----------------------------------------------------------


def test_group_sources_merges_blocks_back_to_back_in_one_object():
    bs = 100
    locs = {
        0: Location("o1", "s1", 0), 1: Location("o1", "s1", 100), 2: Location("o2", "s2", 500),
        3: Location("o1", "s1", 200), 5: Location("o2", "s2", 600), 4: Location("o1", "s1", 900),
    }
    assert group_sources(locs, bs) == (
        Source("o1", "s1", 0, (0, 1, 3)),
        Source("o2", "s2", 500, (2, 5)),
        Source("o1", "s1", 900, (4,)),
    )
    entry = FileEntry("f", "file", mode=0o600, size=550, blocks=("0" * 32,) * 6, sources=group_sources(locs, bs))
    assert block_locations(entry, bs) == locs
    assert group_sources({}, bs) == ()


@pytest.mark.parametrize("current, parent, changed", [
    (["a", "b", "c"], ["a", "b", "c"], []),
    (["a", "x", "c"], ["a", "b", "c"], [1]),
    (["a", "b", "c", "d"], ["a", "b"], [2, 3]),
    (["a"], ["a", "b", "c"], []),  # shrunk: nothing to store, the file is shorter
    ([], [], []),
])
def test_changed_blocks(current, parent, changed):
    assert changed_blocks(current, parent) == changed


@pytest.mark.parametrize("lengths, result", [
    ([100, 100, 40], (240, 3)),
    ([100, 100], (200, 2)),
    ([100, 40, 100], (140, 2)),  # shrank, then grew again while read: keep the consistent start
    ([100, None, 100], (100, 1)),
    ([100, 0], (100, 1)),
    ([], (0, 0)),
])
def test_contiguous_length(lengths, result):
    assert contiguous_length(lengths, 100) == result


def test_merge_join_pairs_same_paths_skips_deleted_and_marks_new():
    class E:
        def __init__(self, path):
            self.path = path

    current = [E(p) for p in ["a", "a/b", "a/c", "a-b", "z"]]
    parent = [FileEntry(p, "dir", mode=0o700) for p in ["a", "a/a-deleted", "a/c", "a/d-deleted", "a-b", "b-deleted"]]
    pairs = [(c.path, p.path if p else None) for c, p in merge_join(current, parent)]
    assert pairs == [("a", "a"), ("a/b", None), ("a/c", "a/c"), ("a-b", "a-b"), ("z", None)]


# --- records --------------------------------------------------------------------


def test_file_entries_round_trip_and_are_validated():
    entry = FileEntry("base/5/1259", "file", mode=0o600, size=300, mtime=1764275400.123456,
                      blocks=("a" * 32, "b" * 32), sources=(Source("backups/x/data/000001", "c" * 64, 4096, (0, 1)),))
    line = entry.to_line()
    assert json.loads(line)["sources"][0]["offset"] == 4096
    assert FileEntry.from_line(line, where="t") == entry
    for e in (FileEntry("base", "dir", mode=0o700), FileEntry("pg_tblspc/1", "link", target="/x y")):
        assert FileEntry.from_line(e.to_line(), where="t") == e
    with pytest.raises(BackupError, match="invalid path '../etc/passwd'"):
        FileEntry.from_line(FileEntry("../etc/passwd", "dir", mode=0o700).to_line(), where="t")
    for bad in ("/abs", "a//b", "a/./b", ""):
        with pytest.raises(BackupError):
            check_path(bad)
    with pytest.raises(BackupError, match="t: not a valid files.jsonl entry"):
        FileEntry.from_line('{"path": "a", "type": "file"}', where="t")


def test_coverage_check():
    ok = FileEntry("f", "file", mode=0o600, size=250, blocks=("a" * 32,) * 3,
                   sources=(Source("o", "s", 0, (0, 2)), Source("p", "s", 0, (1,))))
    check_coverage(ok, 100, where="t")
    for sources, blocks in (
        ((Source("o", "s", 0, (0, 2)),), 3),  # block 1 missing
        ((Source("o", "s", 0, (0, 1, 2)), Source("p", "s", 0, (1,))), 3),  # block 1 twice
        ((Source("o", "s", 0, (0, 1, 2)),), 2),  # wrong number of hashes
        ((Source("o", "s", 0, (2, 1, 0)),), 3),  # not ascending
    ):
        with pytest.raises(BackupError):
            check_coverage(FileEntry("f", "file", mode=0o600, size=250, blocks=("a" * 32,) * blocks,
                                     sources=sources), 100, where="t")


def sample_manifest(label="20261127T203000ZF", **changes) -> Manifest:
    fields = dict(
        format_version=1, label=label, type="full", requested_type="full", parent=None,
        system_identifier=7712957296978327350, pg_major_version=15, wal_segment_size=16 << 20, timeline=1,
        start_lsn=parse_lsn("0/2000028"), stop_lsn=parse_lsn("0/2000138"),
        start_wal="000000010000000000000002", stop_wal="000000010000000000000002",
        start_time=datetime(2026, 11, 27, 20, 30, tzinfo=timezone.utc),
        stop_time=datetime(2026, 11, 27, 20, 31, tzinfo=timezone.utc), backup_from="primary",
        backup_label="START WAL LOCATION: 0/2000028\n", tablespace_map=None,
        tablespaces=(Tablespace(16400, "/srv/ts"),), block_size=256 * KIB, files_object=layout.files_key(label),
        files_sha256="0" * 64, file_count=0, bytes_read=0, bytes_stored=0, duration_seconds=1.5,
        pgvault_version="0.1.0",
    )
    fields.update(changes)
    return Manifest(**fields)


def test_manifest_round_trip_and_errors():
    m = sample_manifest()
    data = json.loads(m.to_json())
    assert data["system_identifier"] == "7712957296978327350"
    assert data["start_lsn"] == "0/2000028" and data["stop_time"] == "2026-11-27T20:31:00+00:00"
    assert Manifest.from_json(m.to_json(), where="t") == m
    with pytest.raises(BackupError, match="t has format version 9; this pgvault reads up to 1"):
        Manifest.from_json(json.dumps(data | {"format_version": 9}).encode(), where="t")
    with pytest.raises(BackupError, match="t is not a valid backup manifest"):
        Manifest.from_json(json.dumps(data | {"backup_from": "elsewhere"}).encode(), where="t")


# --- reading blocks -------------------------------------------------------------


def test_piece_reader_hashes_blocks_and_survives_short_and_vanished_files(tmp_path):
    bs = 64 * KIB
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(3 * bs + 10))
    b.write_bytes(os.urandom(bs // 2))  # shorter than planned: it shrank
    pieces = [Piece(str(a), [0, 2, 3]), Piece(str(tmp_path / "gone"), [0]), Piece(str(b), [0, 1, 2])]
    reader = PieceReader(pieces, bs)
    plain = reader.read()
    da, db = a.read_bytes(), b.read_bytes()
    assert plain == da[:bs] + da[2 * bs:] + db
    assert [p.offset for p in pieces] == [0, 2 * bs + 10, 2 * bs + 10]
    assert pieces[0].hashes == [block_hash(da[:bs]), block_hash(da[2 * bs:3 * bs]), block_hash(da[3 * bs:])]
    assert pieces[0].lengths == [bs, bs, 10]
    assert pieces[1].vanished and not pieces[1].hashes
    assert pieces[2].lengths == [bs // 2]
    result = hash_blocks(str(a), 1, 5, bs)
    assert result.lengths == [bs, bs, 10] and result.hashes == pieces[0].hashes[0:0] + [
        block_hash(da[bs:2 * bs]), block_hash(da[2 * bs:3 * bs]), block_hash(da[3 * bs:])]
    assert hash_blocks(str(tmp_path / "gone"), 0, 1, bs).vanished


# --- block hashes ---------------------------------------------------------------


def test_block_hash_is_xxh3_128_and_sha256_stays_readable():
    import hashlib as _hashlib

    import xxhash

    assert BLOCK_HASH == "xxh3-128" and sample_manifest().block_hash == BLOCK_HASH
    # Pinned vectors: a library that changed its output would make every incremental store everything
    # and every restore fail its block checks.
    assert block_hash(b"") == "99aa06d3014798d86001c324468d497f"
    data = bytes(range(256)) * 1024
    assert block_hash(data) == block_hash(memoryview(data)) == xxhash.xxh3_128_hexdigest(data)
    assert block_hash(data, BLOCK_HASH_SHA256) == _hashlib.sha256(data).hexdigest()[:32]
    with pytest.raises(ValueError, match="unknown block hash algorithm 'md5'"):
        block_hash(data, "md5")


@pytest.mark.parametrize("algorithm", ["xxh3-128", "sha256-128"])
def test_piece_reader_and_hash_blocks_agree_for_each_algorithm(tmp_path, algorithm):
    bs = 64 * KIB
    path = tmp_path / "f"
    path.write_bytes(os.urandom(2 * bs + 100))
    data = path.read_bytes()
    expected = [block_hash(data[:bs], algorithm), block_hash(data[bs:2 * bs], algorithm),
                block_hash(data[2 * bs:], algorithm)]
    piece = Piece(str(path), [0, 1, 2])
    reader = PieceReader([piece], bs, algorithm)
    while reader.read(7 * KIB + 3):  # odd reads: a block's hash is fed in several pieces
        pass
    assert piece.hashes == expected
    assert hash_blocks(str(path), 0, 4, bs, algorithm).hashes == expected


def test_every_changed_block_is_detected(tmp_path):
    """One bit changed anywhere (first byte, last byte, at random), or blocks moved: exactly those differ."""
    import random

    bs = 8 * KIB
    blocks = 64
    path = tmp_path / "rel"
    original = bytearray(os.urandom(bs * blocks))
    original[bs:2 * bs] = bytes(bs)  # an all-zero block, like a new page
    path.write_bytes(original)
    parent = hash_blocks(str(path), 0, blocks, bs).hashes
    rng = random.Random(1)
    changes = [(b, 0, 0x01) for b in range(blocks)] + [(b, bs - 1, 0x80) for b in range(blocks)]
    changes += [(rng.randrange(blocks), rng.randrange(bs), 1 << rng.randrange(8)) for _ in range(300)]
    for block, offset, bit in changes:
        changed = bytearray(original)
        changed[block * bs + offset] ^= bit
        path.write_bytes(changed)
        current = hash_blocks(str(path), 0, blocks, bs).hashes
        assert changed_blocks(current, parent) == [block], (block, offset, bit)
    # two blocks swapped, one block's halves swapped: position matters
    swapped = bytearray(original)
    swapped[2 * bs:3 * bs], swapped[3 * bs:4 * bs] = original[3 * bs:4 * bs], original[2 * bs:3 * bs]
    half = bs // 2
    swapped[5 * bs:6 * bs] = original[5 * bs + half:6 * bs] + original[5 * bs:5 * bs + half]
    path.write_bytes(swapped)
    assert changed_blocks(hash_blocks(str(path), 0, blocks, bs).hashes, parent) == [2, 3, 5]


def test_manifest_names_its_block_hash_and_refuses_an_unknown_one():
    m = sample_manifest()
    data = json.loads(m.to_json())
    assert data["block_hash"] == "xxh3-128"
    legacy = {k: v for k, v in data.items() if k != "block_hash"}  # written before the key existed
    assert Manifest.from_json(json.dumps(legacy).encode(), where="t").block_hash == BLOCK_HASH_SHA256
    assert Manifest.from_json(json.dumps(data | {"block_hash": "sha256-128"}).encode(), where="t") == \
        sample_manifest(block_hash="sha256-128")
    with pytest.raises(BackupError, match="^t has block hashes of algorithm 'blake3'; this pgvault knows "
                                          "xxh3-128, sha256-128$") as caught:
        Manifest.from_json(json.dumps(data | {"block_hash": "blake3"}).encode(), where="t")
    assert caught.value.hint == "upgrade pgvault"


# --- copy and materialize without a server ----------------------------------------


OPTIONS = CodecOptions(compression="zstd", level=3, threads=2, key=None)


def copy_dir(storage, data_dir, tmp_path, *, label, parent=None, block_size=64 * KIB, object_size=256 * KIB,
             parallel=2, tablespaces=()):
    """What take_backup does between pg_backup_start and pg_backup_stop, then a manifest by hand."""
    writer = FilesWriter(str(tmp_path / "spool"))
    parents = iter(SpooledFiles(storage, parent, keyring=None, require_encryption=False,
                                tmp_dir=str(tmp_path / "spool"))) if parent else iter(())
    copier = Copier(storage=storage, data_dir=data_dir, label=label, options=OPTIONS, writer=writer,
                    block_size=block_size, parallel=parallel, object_size=object_size,
                    trust_mtime_before=parent.start_time.timestamp() - 1 if parent else None)
    stats = copier.run(merge_join(scan_data_dir(data_dir, pg_major_version=15), parents))
    sha, _size, stored = writer.store(storage, layout.files_key(label), options=OPTIONS)
    writer.close()
    manifest = sample_manifest(label, type="incr" if parent else "full", parent=parent.label if parent else None,
                               block_size=block_size, files_sha256=sha, file_count=stats.files,
                               bytes_read=stats.bytes_read, bytes_stored=stats.bytes_stored + stored,
                               tablespaces=tablespaces, start_time=datetime.now(timezone.utc))
    write_manifest(storage, manifest, options=OPTIONS)
    return manifest, stats


def tree(root):
    """Every regular file under root (following the tablespace links) -> sha256."""
    out = {}
    for dirpath, _dirs, names in os.walk(root, followlinks=True):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def backed_up(root):
    skip = {"postmaster.pid", "backup_label", "global/pg_internal.init", "base/1/t3_999",
            "pg_wal/000000010000000000000001", "pg_wal/archive_status/000000010000000000000001.done",
            "pg_replslot/s/state", "pg_tblspc/16400/PG_14_201909212/1/1"}
    return {k: v for k, v in tree(root).items() if k not in skip}


def test_full_then_incremental_reassemble_every_file_byte_for_byte(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    data = str(tmp_path / "data")
    make_data_dir(data, tablespace_dir=str(tmp_path / "ts"))
    big = os.path.join(data, "base/1/16384")
    with open(big, "wb") as f:
        f.write(os.urandom(1000 * KIB))  # > object_size: split across objects
    old = os.stat(big).st_mtime - 10
    for path in (big, os.path.join(data, "base/1/1259")):
        os.utime(path, (old, old))  # unchanged files must look old enough to be trusted by mtime

    spaces = (Tablespace(16400, str(tmp_path / "ts")),)
    full, stats = copy_dir(storage, data, tmp_path, label="20261127T203000ZF", tablespaces=spaces)
    assert stats.files == 11 and stats.objects >= 4  # the big file split; small files bundled
    assert full.bytes_read == sum(os.path.getsize(os.path.join(data, p)) for p in backed_up(data))

    with open(big, "r+b") as f:  # change one block in the middle, and grow the file
        f.seek(300 * KIB)
        f.write(b"x" * 100)
        f.seek(0, 2)
        f.write(os.urandom(10 * KIB))
    os.remove(os.path.join(data, "base/1/1259_fsm"))  # deleted
    with open(os.path.join(data, "base/1/1260"), "wb") as f:  # new
        f.write(os.urandom(5000))
    expected = backed_up(data)

    incr, istats = copy_dir(storage, data, tmp_path, label="20261127T203001ZI", parent=full, tablespaces=spaces)
    assert istats.reused_files >= 1
    assert incr.bytes_stored < full.bytes_stored / 3
    entries = {e.path: e for e in iter_files(storage, incr, keyring=None)}
    assert "base/1/1259_fsm" not in entries and "base/1/1260" in entries
    sources = entries["base/1/16384"].sources
    assert {s.object.split("/")[1] for s in sources} == {full.label, incr.label}  # reuses the full's blocks

    dest = str(tmp_path / "restored")
    result = materialize_backup(storage, incr, dest, keyring=None, parallel=2, tmp_dir=str(tmp_path),
                                tablespace_map={16400: str(tmp_path / "ts2")})
    assert result.files == 11
    restored = tree(dest)
    assert {k: v for k, v in restored.items() if k not in ("backup_label", "tablespace_map")} == expected
    assert open(os.path.join(dest, "backup_label")).read() == incr.backup_label
    assert os.path.isdir(os.path.join(dest, "pg_wal", "archive_status"))
    assert os.listdir(os.path.join(dest, "pg_replslot")) == []
    assert os.stat(os.path.join(dest, "base/1/1260")).st_mode & 0o777 == os.stat(
        os.path.join(data, "base/1/1260")).st_mode & 0o777

    # and the full alone still restores the state it saw
    with pytest.raises(BackupError, match="is not empty; refusing to write into it"):
        materialize_backup(storage, full, dest, keyring=None)


def test_materialize_relocates_tablespaces_and_refuses_a_used_location(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    data = str(tmp_path / "data")
    make_data_dir(data, tablespace_dir=str(tmp_path / "ts"))
    manifest, _ = copy_dir(storage, data, tmp_path, label="20261127T203000ZF")
    manifest = sample_manifest(manifest.label, **{k: getattr(manifest, k) for k in (
        "block_size", "files_sha256", "file_count", "bytes_read", "bytes_stored")},
        tablespaces=(Tablespace(16400, str(tmp_path / "ts")),), tablespace_map=f"16400 {tmp_path / 'ts'}\n")
    with pytest.raises(BackupError, match="tablespace 16400 location .* is not empty"):
        materialize_backup(storage, manifest, str(tmp_path / "r1"), keyring=None)
    moved = tmp_path / "moved ts"
    materialize_backup(storage, manifest, str(tmp_path / "r2"), keyring=None, tablespace_map={16400: str(moved)})
    assert os.readlink(tmp_path / "r2" / "pg_tblspc" / "16400") == str(moved)
    with open(moved / "PG_15_202209061/1/16500", "rb") as f, open(tmp_path / "ts/PG_15_202209061/1/16500", "rb") as g:
        assert f.read() == g.read()
    assert (tmp_path / "r2" / "tablespace_map").read_text() == f"16400 {moved}\n"
    with pytest.raises(BackupError, match=r"names tablespace\(s\) \[1\] that backup"):
        materialize_backup(storage, manifest, str(tmp_path / "r3"), keyring=None, tablespace_map={1: "/x"})


def test_materialize_detects_a_damaged_block_record(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    data = str(tmp_path / "data")
    make_data_dir(data)
    manifest, _ = copy_dir(storage, data, tmp_path, label="20261127T203000ZF")
    lines = [FileEntry.from_line(line, where="t") for line in b"".join(
        iter_files_raw(storage, manifest)).splitlines()]
    forged = []
    for e in lines:
        if e.path == "base/1/1259":
            e = FileEntry(e.path, e.type, mode=e.mode, size=e.size, mtime=e.mtime,
                          blocks=("f" * 32,) + e.blocks[1:], sources=e.sources)
        forged.append(e)
    writer = FilesWriter(str(tmp_path / "spool2"))
    for e in forged:
        writer.write(e)
    label = "20261127T203001ZF"
    sha, _size, _stored = writer.store(storage, layout.files_key(label), options=OPTIONS)
    bad = sample_manifest(label, block_size=manifest.block_size, files_sha256=sha, tablespaces=())
    with pytest.raises(CorruptObjectError, match="block 0 of base/1/1259 does not match its hash in the manifest"):
        materialize_backup(storage, bad, str(tmp_path / "r"), keyring=None)


def iter_files_raw(storage, manifest):
    from pgvault import codec

    with storage.open(manifest.files_object) as f:
        yield codec.decode_bytes(f.read(), name=manifest.files_object, keyring=None)


def test_materialize_never_writes_through_a_link_that_is_not_a_tablespace(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    writer = FilesWriter(str(tmp_path / "spool"))
    writer.write(FileEntry("evil", "link", target=str(tmp_path / "outside")))
    writer.write(FileEntry("evil/x", "dir", mode=0o700))
    label = "20261127T203000ZF"
    sha, _size, _stored = writer.store(storage, layout.files_key(label), options=OPTIONS)
    manifest = sample_manifest(label, files_sha256=sha, tablespaces=())
    os.makedirs(tmp_path / "outside")
    with pytest.raises(BackupError, match="evil/x lies under the link evil; refusing to write through it"):
        materialize_backup(storage, manifest, str(tmp_path / "r"), keyring=None)
    assert os.listdir(tmp_path / "outside") == []


# --- restore's writing path: runs of blocks, direct writes, decoding into a buffer --------


@pytest.mark.parametrize("blocks, size, wanted, limit, expected", [
    # a whole 10-block file (last block short), runs of at most 4 blocks
    (list(range(10)), 9 * 8 + 3, None, 32, [(0, 4, 0, 32, True), (4, 4, 32, 32, True), (8, 2, 64, 11, True)]),
    # an incremental's blocks: runs break where the file's blocks do not follow
    ([0, 1, 5, 6, 7, 9], 80, None, 1000, [(0, 2, 0, 16, True), (2, 3, 40, 24, True), (5, 1, 72, 8, True)]),
    # delta: wantedness splits runs
    ([0, 1, 2, 3], 32, {1, 2}, 1000, [(0, 1, 0, 8, False), (1, 2, 8, 16, True), (3, 1, 24, 8, False)]),
    # a limit smaller than a block still yields one block per run
    ([3, 4], 40, None, 4, [(0, 1, 24, 8, True), (1, 1, 32, 8, True)]),
    ([], 0, None, 32, []),
])
def test_block_runs_are_consecutive_in_object_and_file(blocks, size, wanted, limit, expected):
    runs = block_runs(blocks, size, 8, wanted, limit)
    assert [(r.first, r.count, r.offset, r.length, r.wanted) for r in runs] == expected
    assert sum(r.count for r in runs) == len(blocks)


def test_file_writer_puts_aligned_and_unaligned_writes_in_place(tmp_path):
    path = tmp_path / "f"
    size = 3 * ALIGN + 100
    path.write_bytes(b"")
    os.truncate(path, size)
    expected = bytearray(size)
    buf = aligned_buffer(2 * ALIGN)
    buf[:] = os.urandom(2 * ALIGN)
    assert is_aligned(buf, ALIGN) and not is_aligned(buf[:100], 0) and not is_aligned(buf, 1)
    assert not is_aligned(memoryview(bytes(ALIGN)), 0)  # read-only memory is never written directly
    tail = memoryview(os.urandom(100 + ALIGN))[:ALIGN + 100]
    with FileWriter(str(path)) as out:
        out.write_at(buf, ALIGN)  # direct where the file system allows it
        out.write_at(tail, 2 * ALIGN)  # the short last piece: through the page cache
        out.write_at(buf[:ALIGN], 0)
    expected[ALIGN:3 * ALIGN] = buf
    expected[2 * ALIGN:] = tail
    expected[:ALIGN] = buf[:ALIGN]
    assert path.read_bytes() == bytes(expected)
    os.symlink(path, tmp_path / "link")
    with pytest.raises(OSError):
        FileWriter(str(tmp_path / "link"))  # never through a link
    with pytest.raises(FileNotFoundError):
        FileWriter(str(tmp_path / "absent"))  # never creates


@pytest.mark.parametrize("cached", [True, False])
def test_file_reader_reads_exact_bytes_from_the_page_cache_or_the_disk(tmp_path, cached):
    path = tmp_path / "f"
    data = os.urandom(5 * ALIGN + 123)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if not cached:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the disk, directly
        reader = FileReader(fd, len(data))
        buf = aligned_buffer(4 * ALIGN)
        assert reader.read_at(buf, 0) == 4 * ALIGN and bytes(buf) == data[:4 * ALIGN]
        assert reader.read_at(buf, 4 * ALIGN) == ALIGN + 123 and bytes(buf[:ALIGN + 123]) == data[4 * ALIGN:]
        assert reader.read_at(buf[:ALIGN], 2 * ALIGN + 5) == ALIGN  # unaligned: the ordinary way
        assert bytes(buf[:ALIGN]) == data[2 * ALIGN + 5:3 * ALIGN + 5]
        assert reader.read_at(buf, len(data)) == 0
        reader.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_read_into_fills_the_buffer_and_checks_the_whole_object(compression):
    from pgvault import codec

    data = os.urandom(3 << 20) + bytes(5 << 20) + b"tail"
    blob, sha = codec.encode_bytes(data, name="obj", compression=compression)
    reader = codec.decode(io.BytesIO(blob), name="obj", keyring=None, expected_sha256=sha)
    buf, out = bytearray(1 << 20), bytearray()
    while n := reader.read_into(buf):
        assert n == len(buf) or len(out) + n == len(data)  # full buffers until the end
        out += buf[:n]
    assert out == data and reader.plaintext_sha256 == sha and reader.read_into(buf) == 0

    damaged = bytearray(blob)
    damaged[-10] ^= 1  # in the trailer's checksum: only the end can tell
    reader = codec.decode(io.BytesIO(bytes(damaged)), name="obj", keyring=None)
    with pytest.raises(CorruptObjectError, match="^object obj is corrupt: checksum mismatch: content has sha256 "):
        while reader.read_into(buf):
            pass
    with pytest.raises(CorruptObjectError):  # sticky: never a clean end after an error
        reader.read_into(buf)
    reader = codec.decode(io.BytesIO(blob), name="obj", keyring=None, expected_sha256="0" * 64)
    with pytest.raises(CorruptObjectError, match="the record expects 0000"):
        while reader.read_into(buf):
            pass


def test_discard_decodes_without_hashing_and_then_refuses_to_call_the_end_verified():
    from pgvault import codec

    data = os.urandom(1 << 20) + bytes(3 << 20)
    blob, sha = codec.encode_bytes(data, name="obj")
    reader = codec.decode(io.BytesIO(blob), name="obj", keyring=None, expected_sha256=sha)
    assert reader.discard(1000) == 1000
    buf = bytearray(100)
    assert reader.read_into(buf) == 100 and bytes(buf) == data[1000:1100]
    assert reader.discard(10 << 20) == len(data) - 1100  # up to the end, no further
    with pytest.raises(ValueError, match="^object obj: bytes were discarded unhashed, so its checksum cannot be "):
        reader.read_into(buf)


def test_materialize_writes_block_sizes_that_direct_io_cannot_take(tmp_path):
    """A backup whose block size is no multiple of 4 KiB: every write goes the ordinary way, bytes exact."""
    storage = LocalStorage(str(tmp_path / "vault"))
    data = str(tmp_path / "data")
    make_data_dir(data)
    with open(os.path.join(data, "base/1/16384"), "wb") as f:
        f.write(os.urandom(300 * KIB + 77))
    manifest, _ = copy_dir(storage, data, tmp_path, label="20261127T203000ZF", block_size=9 * KIB,
                           object_size=100 * KIB)
    dest = str(tmp_path / "restored")
    materialize_backup(storage, manifest, dest, keyring=None, parallel=2, tmp_dir=str(tmp_path))
    restored = tree(dest)
    assert {k: v for k, v in restored.items() if k != "backup_label"} == backed_up(data)


def test_list_backups_reads_manifests_only_and_leftovers_are_the_rest(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    done = sample_manifest("20261127T203000ZF")
    write_manifest(storage, done, options=OPTIONS)
    storage.put(layout.data_key(done.label, 0), io.BytesIO(b"x"))
    storage.put(layout.data_key("20261127T203005ZI", 0), io.BytesIO(b"abc"))
    storage.put(layout.files_key("20261127T203005ZI"), io.BytesIO(b"de"))
    assert [m.label for m in list_backups(storage, keyring=None)] == [done.label]
    assert read_manifest(storage, done.label, keyring=None) == done
    (left,) = find_leftovers(storage)
    assert (left.label, left.bytes, len(left.keys)) == ("20261127T203005ZI", 5, 2)
    assert remove_leftovers(storage, [left]) == [
        "removed the leftovers of the interrupted backup 20261127T203005ZI (2 objects, 5 bytes)"]
    assert find_leftovers(storage) == []
    assert storage.stat(layout.data_key(done.label, 0)) is not None


# --- the lock ---------------------------------------------------------------------


def test_one_lock_at_a_time_and_stale_locks_are_reclaimed(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    first = BackupLock(storage, label="20261127T203000ZF", lock_dir=str(tmp_path / "locks"))
    assert first.acquire() == []
    second = BackupLock(storage, label="20261127T203001ZF", lock_dir=str(tmp_path / "locks"))
    with pytest.raises(BackupInProgressError, match=r"another backup or dump of this cluster is running on this host .*"
                       r"backup 20261127T203000ZF \(pid \d+ on "):
        second.acquire()
    first.release()
    assert read_holder(storage) is None

    # a lock left by a process that died (SIGKILL) on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    BackupLock(storage, label="20261127T203002ZF", lock_dir=str(tmp_path / "other"))  # not acquired
    stale = BackupLock(storage, label="20261127T203002ZF", lock_dir=str(tmp_path / "elsewhere"))
    stale.holder = LockHolder(label="20261127T203002ZF", host=socket.gethostname(), pid=dead.pid,
                              started_at="then")
    stale.acquire()
    stale._unflock()  # as if killed: the vault lock stays, the flock goes with the process
    third = BackupLock(storage, label="20261127T203003ZF", lock_dir=str(tmp_path / "locks"))
    assert third.acquire() == [(f"removed the stale lock of backup 20261127T203002ZF (pid {dead.pid} on "
                                f"{socket.gethostname()}, started then): that process no longer runs")]
    third.release()

    # a lock held from another host is never taken over
    remote = BackupLock(storage, label="20261127T203004ZF", lock_dir=str(tmp_path / "remote"))
    remote.holder = LockHolder(label="20261127T203004ZF", host="db2.example", pid=1, started_at="then")
    remote.acquire()
    remote._unflock()
    with pytest.raises(BackupInProgressError, match="backup 20261127T203004ZF \\(pid 1 on db2.example"):
        BackupLock(storage, label="20261127T203005ZF", lock_dir=str(tmp_path / "locks")).acquire()


def test_holder_is_dead_only_when_provable():
    me = LockHolder(label="l", host="h", pid=os.getpid(), started_at="t")
    assert not holder_is_dead(me, host="h")
    assert not holder_is_dead(LockHolder("l", "other", 999999999, "t"), host="h")
    assert holder_is_dead(LockHolder("l", "h", 2 ** 22 + 12345, "t"), host="h")
    assert holder_is_dead(LockHolder("l", "h", os.getpid(), "t", pid_start="1"), host="h")  # pid reused


# --- small pure helpers -------------------------------------------------------------


def test_backup_label_and_tablespace_map_parsing():
    text = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n"
            "BACKUP METHOD: streamed\nBACKUP FROM: standby\nSTART TIME: 2026-11-27 20:30:00 UTC\n"
            "LABEL: 20261127T203000ZF\nSTART TIMELINE: 3\n")
    fields = parse_backup_label(text)
    assert fields["START TIMELINE"] == "3" and fields["BACKUP FROM"] == "standby"
    assert parse_tablespace_map("16400 /srv/my ts\n16401 /x\n") == [(16400, "/srv/my ts"), (16401, "/x")]
    assert parse_tablespace_map(None) == []


@pytest.mark.parametrize("start, stop, names", [
    ("0/2000028", "0/2000138", ["000000010000000000000002"]),
    ("0/2000028", "0/3000000", ["000000010000000000000002"]),  # stop at a segment start: the previous one
    ("0/2FFFFF0", "0/4000010", ["000000010000000000000002", "000000010000000000000003",
                                "000000010000000000000004"]),
])
def test_wal_segments_from_start_to_stop(start, stop, names):
    assert wal_segments(timeline=1, start_lsn=parse_lsn(start), stop_lsn=parse_lsn(stop),
                        segment_size=16 << 20) == names


def test_progress_line():
    line = render(bytes_done=512 << 20, bytes_total=1 << 30, files_done=10, files_total=20, elapsed=2.0)
    assert line.startswith(" 50% [############------------] 512.0 MiB/1.0 GiB  10/20 files  256.0 MiB/s  ETA 0:02")
    assert format_bytes(10) == "10 B"


def test_backup_settings(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[backup]\nparallel = 3\nfrom = "standby"\nblock_size_kib = 128\nwal_timeout = 30\n')
    b = load_settings(str(path), environ={}).backup
    assert (b.parallel, b.from_, b.block_size_kib, b.wal_timeout) == (3, "standby", 128, 30)
    assert load_settings(str(path), environ={"PGVAULT_BACKUP_FROM": "primary"}).backup.from_ == "primary"
    path.write_text('[backup]\nfrom = "master"\n')
    with pytest.raises(ConfigError, match=r'\[backup\] from = .master.: expected "primary", "standby" or "any"'):
        load_settings(str(path), environ={})
    path.write_text('[backup]\nblock_size_kib = 100\n')
    with pytest.raises(ConfigError, match="expected a power of two from 8 to 65536"):
        load_settings(str(path), environ={})


def test_backup_errors_have_their_own_exit_codes():
    from pgvault.backup.errors import BackupError, BackupInProgressError, BackupNotFoundError, WalArchiveTimeoutError
    from pgvault.errors import EXIT_CODES

    ours = {BackupError: 80, BackupInProgressError: 81, WalArchiveTimeoutError: 82, BackupNotFoundError: 83}
    assert {cls: cls.exit_code for cls in ours} == ours
    assert not set(ours.values()) & {code for cls, code in EXIT_CODES.items() if cls not in ours}


@pytest.mark.parametrize("label, described", [
    ("20261127T203002ZF", "backup 20261127T203002ZF (pid 7 on db1, started then)"),
    ("20261127T203002ZI", "backup 20261127T203002ZI (pid 7 on db1, started then)"),
    ("20261127T203002ZD", "dump 20261127T203002ZD (pid 7 on db1, started then)"),
    ("expire-20261127T203002Z", "expire (pid 7 on db1, started then)"),
])
def test_a_lock_holder_says_which_job_holds_the_lock(label, described):
    assert LockHolder(label=label, host="db1", pid=7, started_at="then").describe() == described


# --- reading ends before storing does ---------------------------------------------


def test_hash_blocks_keeps_the_bytes_of_the_blocks_unlike_the_parents_while_the_budget_lasts(tmp_path):
    bs = 64 * KIB
    path = tmp_path / "f"
    path.write_bytes(os.urandom(4 * bs + 100))
    data = path.read_bytes()
    blocks = [data[i:i + bs] for i in range(0, len(data), bs)]
    parent = [block_hash(blocks[0]), "0" * 32, block_hash(blocks[2]), "1" * 32]  # blocks 1, 3 changed; 4 is new

    granted = []

    def keep(n):
        granted.append(n)
        return True

    result = hash_blocks(str(path), 0, 6, bs, parent=parent, keep=keep)
    assert result.kept == {1: blocks[1], 3: blocks[3], 4: blocks[4]} and not result.missed
    assert granted == [bs, bs, 100]
    assert result.hashes == [block_hash(b) for b in blocks]  # hashed as ever
    assert hash_blocks(str(path), 0, 6, bs, parent=parent).kept == {}  # nothing kept unless asked

    budget = [bs]  # room for one block: the next one is missed, and no later one is kept

    def keep_within(n):
        if n > budget[0]:
            return False
        budget[0] -= n
        return True

    result = hash_blocks(str(path), 0, 6, bs, parent=parent, keep=keep_within)
    assert result.kept == {1: blocks[1]} and result.missed


def test_piece_reader_serves_held_bytes_as_it_reads_the_file(tmp_path):
    bs = 64 * KIB
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * bs + 10))
    from pgvault.backup.blocks import read_blocks

    on_disk = Piece(str(path), [0, 2, 3])
    held = Piece(str(path), [0, 2, 3], data=read_blocks(str(path), [0, 2, 3], bs))
    from_file = PieceReader([on_disk], bs).read()
    path.write_bytes(b"")  # held bytes do not read the file again
    reader = PieceReader([held], bs)
    plain = b""
    while chunk := reader.read(7 * KIB + 3):
        plain += chunk
    assert plain == from_file
    assert (held.hashes, held.lengths, held.offset) == (on_disk.hashes, on_disk.lengths, on_disk.offset)
    assert held.lengths == [bs, bs, 10]

    short = Piece(str(path), [0, 1, 2], data=[b"a" * bs, b"b" * 5])  # the file ended after 1 block and 5 bytes
    assert PieceReader([short], bs).read() == b"a" * bs + b"b" * 5 and short.lengths == [bs, 5]
    assert read_blocks(str(tmp_path / "gone"), [0], bs) is None


def _changed_data_dir(tmp_path, storage):
    """A data directory, its full backup, and then a big file with some blocks changed (and a new file)."""
    data = str(tmp_path / "data")
    make_data_dir(data)
    big = os.path.join(data, "base/1/16384")
    with open(big, "wb") as f:
        f.write(os.urandom(40 * 64 * KIB))
    old = os.stat(big).st_mtime - 10
    os.utime(big, (old, old))
    full, _ = copy_dir(storage, data, tmp_path, label="20261127T203000ZF", object_size=4 << 20)
    with open(big, "r+b") as f:
        for block in (1, 7, 8, 9, 30, 31, 32, 33):
            f.seek(block * 64 * KIB + 5)
            f.write(os.urandom(100))
    with open(os.path.join(data, "base/1/1260"), "wb") as f:  # new: stored whole, read from its file
        f.write(os.urandom(5000))
    return data, big, full


@pytest.mark.parametrize("keep_bytes", [None, 1])
def test_an_incremental_has_read_every_file_when_read_all_returns(tmp_path, monkeypatch, keep_bytes):
    """What is stored is what was read before the backup stopped: changed blocks kept from the comparison
    pass, or (past KEEP_BYTES) read again from their file, but before read_all returns in either case."""
    import time

    from pgvault.backup import copy as copy_module

    if keep_bytes is not None:
        monkeypatch.setattr(copy_module, "KEEP_BYTES", keep_bytes)
    storage = LocalStorage(str(tmp_path / "vault"))
    data, big, full = _changed_data_dir(tmp_path, storage)
    expected = backed_up(data)
    put = storage.put

    def slow_put(key, source):  # objects still being stored when read_all returns, unless it waited for them
        time.sleep(0.1)
        return put(key, source)

    monkeypatch.setattr(storage, "put", slow_put)

    label = "20261127T203001ZI"
    writer = FilesWriter(str(tmp_path / "spool"))
    parents = iter(SpooledFiles(storage, full, keyring=None, require_encryption=False, tmp_dir=str(tmp_path / "spool")))
    # One worker: the object of kept blocks is stored after the one read from files, once read_all may return.
    copier = Copier(storage=storage, data_dir=data, label=label, options=OPTIONS, writer=writer, block_size=64 * KIB,
                    parallel=1, object_size=4 << 20, trust_mtime_before=full.start_time.timestamp() - 1)
    copier.read_all(merge_join(scan_data_dir(data, pg_major_version=15), parents))
    # Written after the backup stopped: WAL replay's business, not the backup's (big: in a changed block).
    for path, offset in ((big, 7 * 64 * KIB), (os.path.join(data, "base/1/1260"), 0),
                         (os.path.join(data, "global/pg_control"), 0)):
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\0" * 300)
    stats = copier.finish()
    sha, _size, stored = writer.store(storage, layout.files_key(label), options=OPTIONS)
    writer.close()
    incr = sample_manifest(label, type="incr", parent=full.label, block_size=64 * KIB, files_sha256=sha,
                           file_count=stats.files, bytes_read=stats.bytes_read,
                           bytes_stored=stats.bytes_stored + stored, tablespaces=())
    write_manifest(storage, incr, options=OPTIONS)

    dest = str(tmp_path / "restored")
    materialize_backup(storage, incr, dest, keyring=None, parallel=2, tmp_dir=str(tmp_path))
    restored = {k: v for k, v in tree(dest).items() if k not in ("backup_label", "tablespace_map")}
    assert restored == expected
    assert stats.bytes_stored < full.bytes_stored / 4  # only the changed blocks


def test_kept_blocks_are_stored_after_every_read_is_queued(tmp_path, monkeypatch):
    """Storing kept blocks reads no file; queued before the reads still to come, it would delay the end of
    reading (and so pg_backup_stop). One worker: the order of its tasks is the order they were queued."""
    from pgvault.backup import copy as copy_module

    monkeypatch.setattr(copy_module, "MIN_BURST_OBJECT", 128 * KIB)  # the kept blocks would go at once
    storage = LocalStorage(str(tmp_path / "vault"))
    data, big, full = _changed_data_dir(tmp_path, storage)
    with open(os.path.join(data, "global/1262"), "r+b") as f:  # after base/1/16384 in path order: hashed later
        f.write(os.urandom(100))
    events = []
    hash_blocks_ = copy_module.hash_blocks

    def hashing(path, *args, **kw):
        events.append(("hash", os.path.relpath(path, data)))
        return hash_blocks_(path, *args, **kw)

    put = storage.put

    def putting(key, source):
        events.append(("put", key))
        return put(key, source)

    monkeypatch.setattr(copy_module, "hash_blocks", hashing)
    monkeypatch.setattr(storage, "put", putting)
    # object_size 256 KiB: the big file is hashed in several tasks, so the scan waits for them before going on.
    incr, _stats = copy_dir(storage, data, tmp_path, label="20261127T203001ZI", parent=full, parallel=1)
    entry = {e.path: e for e in iter_files(storage, incr, keyring=None)}["base/1/16384"]
    kept = {s.object for s in entry.sources if s.object.startswith(f"backups/{incr.label}/")}
    assert kept
    last_read = max(i for i, e in enumerate(events) if e[0] == "hash")
    assert events.index(("hash", "global/1262")) > events.index(("hash", "base/1/16384"))
    assert all(i > last_read for i, e in enumerate(events) if e[0] == "put" and e[1] in kept), events


def test_a_changed_file_is_stored_in_one_object_per_worker(tmp_path, monkeypatch):
    from pgvault.backup import copy as copy_module

    monkeypatch.setattr(copy_module, "MIN_BURST_OBJECT", 128 * KIB)
    storage = LocalStorage(str(tmp_path / "vault"))
    data, _big, full = _changed_data_dir(tmp_path, storage)
    incr, _stats = copy_dir(storage, data, tmp_path, label="20261127T203001ZI", parent=full, object_size=4 << 20)
    entry = {e.path: e for e in iter_files(storage, incr, keyring=None)}["base/1/16384"]
    ours = [s for s in entry.sources if s.object.startswith(f"backups/{incr.label}/")]
    # 8 changed blocks of 64 KiB, 2 workers: 2 objects of 4 blocks, not one object for all 8
    assert sorted(len(s.blocks) for s in ours) == [4, 4] and len({s.object for s in ours}) == 2


def test_objects_are_stored_while_the_wal_is_awaited_and_a_failure_of_either_ends_both():
    import threading
    import time as _time

    from pgvault.backup.errors import WalArchiveTimeoutError
    from pgvault.backup.physical import _while_finishing

    polled, finished = threading.Event(), threading.Event()

    def finish():
        polled.wait(10)  # still storing when the wait polls
        finished.set()
        return "copied"

    def wait(check):  # the WAL arrives while the objects are stored
        check()
        polled.set()

    assert _while_finishing(finish, wait, abort=lambda: None) == "copied"
    assert finished.is_set()  # and the result came once both were done

    def broken_finish():
        raise BackupError("the vault is full")

    def patient_wait(check):
        deadline = _time.monotonic() + 10
        while _time.monotonic() < deadline:
            check()
            _time.sleep(0.01)

    started = _time.monotonic()
    with pytest.raises(BackupError, match="the vault is full"):
        _while_finishing(broken_finish, patient_wait, abort=lambda: None)
    assert _time.monotonic() - started < 5  # the wait ended at the next poll, not at its timeout

    stopping, aborted = threading.Event(), []

    def slow_finish():
        stopping.wait(10)
        return "copied"

    def failing_wait(check):
        raise WalArchiveTimeoutError("WAL segment 000000010000000000000002 ... did not reach the vault")

    def abort():
        aborted.append(True)
        stopping.set()

    with pytest.raises(WalArchiveTimeoutError):
        _while_finishing(slow_finish, failing_wait, abort=abort)
    assert aborted and stopping.is_set()  # stopped, and over before the error went on


def test_the_parents_file_list_is_fetched_ahead_and_closed_if_never_taken(tmp_path):
    from pgvault.backup.physical import _ParentFiles

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    storage = LocalStorage(str(tmp_path / "vault"))
    _data, _big, full = _changed_data_dir(tmp_path, storage)
    spool = str(tmp_path / "spool-parent")
    expected = [e.path for e in iter_files(storage, full, None)]
    before = open_fds()

    spooled, entries = _ParentFiles(storage, full, keyring=None, require_encryption=False, tmp_dir=spool).take()
    assert [e.path for e in entries] == expected  # the parent's list, in path order
    spooled.close()
    assert open_fds() == before

    _ParentFiles(storage, full, keyring=None, require_encryption=False, tmp_dir=spool).close()  # never taken
    assert open_fds() == before  # its temporary file is closed all the same

    assert _ParentFiles(storage, None, keyring=None, require_encryption=False, tmp_dir=spool).take()[0] is None

    storage.delete(full.files_object)  # a fetch that fails: its error comes with take, close stays quiet
    failing = _ParentFiles(storage, full, keyring=None, require_encryption=False, tmp_dir=spool)
    with pytest.raises(PgvaultError, match="files.jsonl"):
        failing.take()
    _ParentFiles(storage, full, keyring=None, require_encryption=False, tmp_dir=spool).close()
    assert open_fds() == before


def test_the_copy_is_prepared_while_the_backup_starts_and_closed_if_it_does_not():
    import threading

    from pgvault.backup.physical import _ReadAhead, _while_starting

    started, prepared = threading.Event(), threading.Event()

    class Prepared:
        closed = False

        def close(self):
            self.closed = True

    def start():
        assert prepared.wait(10)  # prepared while the server checkpoints, not after
        started.set()
        return (42, "now")

    def prepare():
        prepared.set()
        return Prepared()

    (lsn, when), copy = _while_starting(start, prepare)
    assert (lsn, when) == (42, "now") and isinstance(copy, Prepared) and not copy.closed

    made = []

    def prepare_and_remember():
        made.append(Prepared())
        return made[-1]

    def refused():
        raise BackupError("PostgreSQL refused the backup: permission denied for function pg_backup_start")

    with pytest.raises(BackupError, match="permission denied"):
        _while_starting(refused, prepare_and_remember)
    assert made and made[0].closed  # nothing left open behind the error

    entries = iter([FileEntry(f"base/1/{n}", "file", size=0) for n in range(5)])
    ahead = _ReadAhead(entries)
    assert next(entries, None) is None  # all five read at once
    assert [e.path for e in ahead] == [f"base/1/{n}" for n in range(5)]


@pytest.mark.parametrize(("last", "failing", "expected"), [
    ("000000010000000000000009", False, True),  # the segment before the backup's last one
    ("00000001000000000000000A", False, True),  # a later one
    ("000000010000000000000009.00000028.backup", False, True),  # a .backup file after it
    ("000000010000000000000008", False, False),  # behind
    ("000000010000000000000009", True, False),  # failing since
    ("00000002000000000000000A", False, False),  # another timeline
    ("00000002.history", False, False),
    ("000000010000000000000009.partial", False, False),
    (None, False, False),  # nothing archived yet
])
def test_the_archiver_has_reached_the_segment_before_the_last_only_if_it_says_so(last, failing, expected):
    from pgvault.backup.session import archiver_has_reached
    from pgvault.pg import ArchiverStatus
    from pgvault.wal import parse_wal_file_name

    then, later = datetime(2026, 11, 28, 1, tzinfo=timezone.utc), datetime(2026, 11, 28, 2, tzinfo=timezone.utc)
    status = ArchiverStatus(archived_count=5, last_archived_wal=last, last_archived_time=then if last else None,
                            failed_count=1 if failing else 0, last_failed_wal="x" if failing else None,
                            last_failed_time=later if failing else None, current_wal=None)
    wanted = parse_wal_file_name("00000001000000000000000A")
    assert archiver_has_reached(status, wanted, segment_size=16 << 20) is expected


def test_the_wal_wait_looks_again_at_once_after_the_backup_pushed_the_segment_itself(tmp_path, monkeypatch):
    from pgvault.backup import session
    from pgvault.catalog import format_wal_key

    storage = LocalStorage(str(tmp_path / "vault"))
    first, last = "000000010000000000000009", "00000001000000000000000A"

    def archive(name: str) -> None:
        storage.put(format_wal_key(name, sha256="0" * 64, completed_ms=1, size=16 << 20), io.BytesIO(b"wal"))

    archive(first)
    sleeps: list[float] = []
    monkeypatch.setattr(session.time, "sleep", sleeps.append)  # a pause would loop here: nothing else archives
    waited: list[str] = []

    def pushed_itself(name: str) -> bool:
        waited.append(name)
        archive(name)
        return True

    session.wait_for_wal(storage, [first, last], segment_size=16 << 20, timeout=5, on_wait=pushed_itself)
    assert waited == [last] and sleeps == []

    # Nothing pushed: the wait pauses between looks as before, and ends when the segment arrives.
    later = "00000001000000000000000B"
    calls: list[str] = []

    def archiver_pushes_on_the_second_look(name: str) -> bool:
        calls.append(name)
        if len(calls) == 2:
            archive(name)
        return False

    session.wait_for_wal(storage, [later], segment_size=16 << 20, timeout=5, on_wait=archiver_pushes_on_the_second_look)
    assert calls == [later, later] and sleeps == [0.01, 0.01]


@pytest.mark.parametrize(("argv", "expected"), [
    (["backup"], True),
    (["--config", "/etc/x.toml", "backup", "--type", "incr", "--json"], True),
    (["--config=/etc/x.toml", "--debug", "backup"], True),
    (["backup", "--help"], False),
    (["--config", "backup", "list"], False),  # "backup" is the config file's name here
    (["list"], False),
    (["restore-dump", "backup"], False),
    ([], False),
])
def test_the_console_script_recognises_a_backup_command(argv, expected):
    from pgvault.entry import _is_backup_command

    assert _is_backup_command(argv) is expected
