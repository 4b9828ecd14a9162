"""Reseed's pure parts, without servers: fork points, pg_controldata and pg_waldump parsing, orphan keys and
records, the standby block, the health verdict."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from pgvault.archive import CodecOptions
from pgvault.divergence import (
    fork_point,
    parse_controldata,
    summarize_waldump,
    tail_stretches,
    timeline_path,
)
from pgvault.errors import (
    EXIT_CODES,
    OrphanError,
    ReseedError,
    StreamingTimeoutError,
    WalFormatError,
)
from pgvault.orphans import (
    KeptSegment,
    OrphanRecord,
    SegmentSource,
    fetch_orphan,
    find_same_tail,
    format_orphan_id,
    format_segment_key,
    list_orphans,
    parse_orphan_id,
    parse_segment_key,
    store_orphan,
)
from pgvault.reseed import (
    PrimaryInfo,
    StreamingState,
    standby_settings,
    unhealthy_because,
)
from pgvault.restore import ConfSetting
from pgvault.storage.local import LocalStorage
from pgvault.wal import HistoryEntry, parse_lsn
from tests.asserts import raises_exactly

H = HistoryEntry


def test_reseed_errors_have_their_own_exit_codes():
    assert (ReseedError.exit_code, OrphanError.exit_code, StreamingTimeoutError.exit_code) == (100, 101, 102)
    assert all(EXIT_CODES[c] == c.exit_code for c in (ReseedError, OrphanError, StreamingTimeoutError))
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


def test_timeline_path_lists_each_timeline_and_the_wal_it_holds():
    assert timeline_path(1, ()) == [(1, 0, None)]
    assert timeline_path(3, (H(1, 0x500), H(2, 0x900))) == [(1, 0, 0x500), (2, 0x500, 0x900), (3, 0x900, None)]


@pytest.mark.parametrize("node, primary, expected", [
    # the old primary on timeline 1, the new one promoted at 0/5000A0 onto 2: they part there
    ((1, ()), (2, (H(1, 0x50000A0),)), 0x50000A0),
    # a standby of the new primary, on its timeline: never parts
    ((2, (H(1, 0x50000A0),)), (2, (H(1, 0x50000A0),)), None),
    # same timeline: never parts (the node may only be behind)
    ((1, ()), (1, ()), None),
    # the node is on 2 and the primary moved on to 3 from 2: they part where 3 starts
    ((2, (H(1, 0x500),)), (3, (H(1, 0x500), H(2, 0x900))), 0x900),
    # the node promoted itself onto 3 from 1 at 0x700; the primary is on 2 from 1 at 0x500: they part at 0x500
    ((3, (H(1, 0x700),)), (2, (H(1, 0x500),)), 0x500),
    # siblings from the same switch point: they part there
    ((3, (H(1, 0x500),)), (2, (H(1, 0x500),)), 0x500),
    # the node is behind, on an ancestor of the primary's timeline two switches back
    ((1, ()), (3, (H(1, 0x500), H(2, 0x900))), 0x500),
])
def test_fork_point_is_the_first_lsn_the_two_histories_read_from_different_timelines(node, primary, expected):
    assert fork_point(node[0], node[1], primary[0], primary[1]) == expected


def test_tail_stretches_follow_the_nodes_own_timelines_from_the_fork():
    assert tail_stretches(1, (), 0x500) == [(1, 0x500, None)]
    # the node went 1 → 3 at 0x700 by itself; the fork is at 0x500 on 1
    assert tail_stretches(3, (H(1, 0x700),), 0x500) == [(1, 0x500, 0x700), (3, 0x700, None)]
    assert tail_stretches(3, (H(1, 0x400), H(2, 0x700)), 0x500) == [(2, 0x500, 0x700), (3, 0x700, None)]


CONTROLDATA = """pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7712991313563652823
Database cluster state:               in production
pg_control last modified:             Fri Nov 27 23:05:32 2026
Latest checkpoint location:           0/1500718
Latest checkpoint's REDO location:    0/15006E0
Latest checkpoint's REDO WAL file:    000000010000000000000001
Latest checkpoint's TimeLineID:       1
Latest checkpoint's PrevTimeLineID:   1
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
"""


def test_controldata_is_parsed_and_a_missing_line_is_named():
    c = parse_controldata(CONTROLDATA)
    assert (c.system_identifier, c.state, c.checkpoint_lsn, c.redo_lsn, c.timeline) == (
        7712991313563652823, "in production", 0x1500718, 0x15006E0, 1)
    assert (c.min_recovery_lsn, c.min_recovery_timeline) == (0, 0)
    with raises_exactly(WalFormatError, "pg_controldata -D x: no \"Latest checkpoint's TimeLineID\" line in its output"):
        parse_controldata(CONTROLDATA.replace("Latest checkpoint's TimeLineID", "Something"),
                          source="pg_controldata -D x")


WALDUMP = """\
rmgr: Heap        len (rec/tot):     59/    59, tx:        724, lsn: 0/015165D0, prev 0/01516588, desc: INSERT+INIT off 1
rmgr: Transaction len (rec/tot):     34/    34, tx:        724, lsn: 0/01516610, prev 0/015165D0, desc: COMMIT 2026-11-27 23:05:36.647351 UTC
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/01516638, prev 0/01516610, desc: RUNNING_XACTS nextXid 725
rmgr: Heap        len (rec/tot):     59/    59, tx:        725, lsn: 0/01516670, prev 0/01516638, desc: INSERT off 2
rmgr: Transaction len (rec/tot):     34/    34, tx:        725, lsn: 0/015166B0, prev 0/01516670, desc: ABORT 2026-11-27 23:05:37.000001 UTC
rmgr: Transaction len (rec/tot):    405/   405, tx:        726, lsn: 0/015166D8, prev 0/015166B0, desc: COMMIT 2026-11-27 23:05:38 UTC; inval msgs: catcache 80
rmgr: Transaction len (rec/tot):     66/    66, tx:        727, lsn: 0/01516870, prev 0/015166D8, desc: COMMIT_PREPARED 9: 2026-11-27 23:05:39.5 UTC
"""
WALDUMP_END = "pg_waldump: error: error in WAL record at 0/1516870: invalid record length at 0/15168B8: wanted 24, got 0\n"


def test_waldump_output_gives_records_commits_their_times_and_the_end():
    s = summarize_waldump(WALDUMP.splitlines(keepends=True), stderr=WALDUMP_END)
    assert (s.records, s.commits, s.aborts) == (7, 3, 1)
    assert (s.first_lsn, s.last_lsn, s.end_lsn) == (0x15165D0, 0x1516870, 0x15168B8)
    assert s.first_commit_time == datetime(2026, 11, 27, 23, 5, 36, 647351, tzinfo=UTC)
    assert s.last_commit_time == datetime(2026, 11, 27, 23, 5, 39, 500000, tzinfo=UTC)
    assert s.commit_xids == (724, 726, 727)
    empty = summarize_waldump([], stderr="pg_waldump: error: could not find a valid record after 0/1700000\n")
    assert (empty.records, empty.commits, empty.end_lsn) == (0, 0, None)


def test_two_stretches_merge_in_order():
    lines = WALDUMP.splitlines()
    a = summarize_waldump(lines[:2])
    b = summarize_waldump(lines[2:], stderr=WALDUMP_END)
    m = a.merge(b)
    whole = summarize_waldump(lines, stderr=WALDUMP_END)
    assert m == whole


def test_orphan_ids_and_keys_round_trip_and_refuse_what_is_not_theirs():
    moment = datetime(2026, 11, 27, 23, 15, 2, tzinfo=UTC)
    oid = format_orphan_id(moment, 1)
    assert oid == "20261127T231502Z-tl1" and parse_orphan_id(oid) == (moment, 1)
    assert parse_orphan_id("20261127T231502Z-tl0") is None and parse_orphan_id("x-tl1") is None
    sha = "a" * 64
    key = format_segment_key(oid, "000000010000000000000005", sha256=sha, size=16777216)
    assert key == f"orphans/{oid}/wal/000000010000000000000005.{sha}.16777216"
    assert parse_segment_key(key) == (oid, "000000010000000000000005", sha, 16777216)
    for bad in (f"orphans/{oid}/000000010000000000000005.{sha}.1", f"wal/{oid}/wal/000000010000000000000005.{sha}.1",
                f"orphans/{oid}/wal/00000001000000000000005.{sha}.1", f"orphans/nope/wal/000000010000000000000005.{sha}.1"):
        assert parse_segment_key(bad) is None
    with pytest.raises(ValueError):
        format_segment_key(oid, "000000010000000000000005.partial", sha256=sha, size=1)


def _record(oid: str) -> OrphanRecord:
    return OrphanRecord(id=oid, captured_at="2026-11-27T23:15:02+00:00", host="h", data_dir="/d",
                        system_identifier="7712991313563652823", node_timeline=1, fork_timeline=1,
                        primary_timeline=2, fork_lsn="0/50000A0", end_lsn="0/5001000", last_record_lsn="0/5000F00",
                        records=10, commits=3, aborts=0, first_commit_time="2026-11-27T23:10:00+00:00",
                        last_commit_time="2026-11-27T23:10:01+00:00", segments=())


def test_an_orphan_is_stored_write_once_listed_once_committed_and_fetched_verified(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    seg = tmp_path / "000000010000000000000005"
    seg.write_bytes(os.urandom(4096))
    options = CodecOptions(level=1, threads=0)
    oid = "20261127T231502Z-tl1"
    record = store_orphan(storage, _record(oid), [SegmentSource(seg.name, str(seg), "pg_wal")], options=options)
    assert [s.name for s in record.segments] == [seg.name] and record.segments[0].size == 4096
    # a second store of the same tail lands on the same keys (write-once, same content)
    store_orphan(storage, _record(oid), [SegmentSource(seg.name, str(seg), "pg_wal")], options=options)
    listed = list_orphans(storage, keyring=None)
    assert listed == [record]
    same = find_same_tail(listed, system_identifier=7712991313563652823, fork_timeline=1,
                          fork_lsn=parse_lsn("0/50000A0"), segments={seg.name: record.segments[0].sha256})
    assert same == record
    assert find_same_tail(listed, system_identifier=7712991313563652823, fork_timeline=1,
                          fork_lsn=parse_lsn("0/50000A0"), segments={seg.name: "b" * 64}) is None
    out = tmp_path / "out"
    out.mkdir()
    assert fetch_orphan(storage, oid, str(out), keyring=None) == [str(out / seg.name)]
    assert (out / seg.name).read_bytes() == seg.read_bytes()
    assert fetch_orphan(storage, oid, str(out), keyring=None) == [str(out / seg.name)]  # identical: fine
    (out / seg.name).write_bytes(b"other")
    with pytest.raises(Exception, match="exists with other content; not overwritten"):
        fetch_orphan(storage, oid, str(out), keyring=None)
    # segments without a record are not an orphan (yet): a reseed that died before committing it
    from pgvault.orphans import store_segment

    store_segment(storage, "20261128T000000Z-tl1", SegmentSource(seg.name, str(seg), "pg_wal"), options=options)
    assert [o.id for o in list_orphans(storage, keyring=None)] == [oid]


def test_an_orphan_record_survives_json_and_a_damaged_one_is_refused():
    record = _record("20261127T231502Z-tl1")
    record = OrphanRecord(**{**record.__dict__, "segments": (KeptSegment("n", "s", 1, "k", "vault"),)})
    assert OrphanRecord.from_json(record.to_json(), where="x") == record
    from pgvault.errors import CorruptObjectError

    with pytest.raises(CorruptObjectError, match="orphan record x is unreadable"):
        OrphanRecord.from_json(b'{"format": 99}', where="x")


def test_the_standby_block_follows_the_primary_and_resets_recovery_targets():
    conf = {"recovery_target_time": ConfSetting("2026-11-27 03:00:00+00", "/d/postgresql.conf", 7),
            "hot_standby": ConfSetting("off", "/d/postgresql.conf", 9)}
    settings, notes = standby_settings(restore_command="/v/pgvault wal-fetch %f %p",
                                       primary_conninfo="host=10.0.0.2 user=rep", slot="node_a", port=5433, conf=conf)
    assert settings == {
        "restore_command": "'/v/pgvault wal-fetch %f %p'",
        "primary_conninfo": "'host=10.0.0.2 user=rep'",
        "recovery_target_timeline": "'latest'",
        "primary_slot_name": "'node_a'",
        "recovery_target_time": "''",
        "hot_standby": "'on'",
        "port": "5433",
    }
    assert notes == ["recovery_target_time = '2026-11-27 03:00:00+00' (/d/postgresql.conf line 7) is reset to ''",
                     ("hot_standby = off (/d/postgresql.conf line 9) is set to on: reseed checks the standby over "
                     "a connection")]


PRIMARY = PrimaryInfo("host=127.0.0.1 port=5432", 77, 2, 0x9000000, (H(1, 0x5000000),))


def _state(**kw) -> StreamingState:
    base = {"in_recovery": True, "status": "streaming", "sender_host": "127.0.0.1", "sender_port": 5432,
                "received_timeline": 2, "slot_name": None, "system_identifier": 77, "replay_lsn": 0x9000000 - 100,
                "primary_lsn": 0x9000000, "primary_timeline": 2}
    return StreamingState(**{**base, **kw})


@pytest.mark.parametrize("change, why", [
    ({}, None),
    ({"sender_host": "localhost"}, None),  # the same address by another name
    ({"system_identifier": 78}, "it is the cluster 78, the primary is 77"),
    ({"in_recovery": False}, "it is not in recovery (a primary)"),
    ({"status": None}, "its WAL receiver is not running"),
    ({"status": "waiting"}, "its WAL receiver is waiting"),
    ({"received_timeline": 1}, "it streams timeline 1, the primary is on 2"),
    ({"sender_port": 5433}, "it streams from port 5433, not 5432"),
    ({"sender_host": "10.9.9.9"}, "it streams from 10.9.9.9, not 127.0.0.1"),
    ({"replay_lsn": 0x9000000 - 2000}, "its replay lag is 2000 bytes (limit 1000)"),
])
def test_a_standby_is_healthy_only_when_it_streams_from_that_primary_close_behind(change, why):
    assert unhealthy_because(_state(**change), primary=PRIMARY, primary_conninfo="host=127.0.0.1 port=5432",
                             max_lag_bytes=1000) == why


def test_the_readme_documents_reseeds_exit_codes_and_its_section_follows_point_in_time_restore():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for cls in (ReseedError, OrphanError, StreamingTimeoutError):
        assert f"| {cls.exit_code} | {cls.__name__} |" in readme
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    assert headings[headings.index("## Point-in-time restore") + 1] == "## Reseed a lost node"


def test_in_an_encrypted_vault_an_orphan_is_encrypted_and_needs_the_key(tmp_path):
    from pgvault import keys
    from pgvault.errors import EncryptionKeyError

    storage = LocalStorage(str(tmp_path / "vault"))
    master = keys.generate_master_key_file(str(tmp_path / "master.key"))
    keys.create_vault_key(storage, master)
    keyring = keys.load_keyring(storage, master)
    seg = tmp_path / "000000010000000000000005"
    plain = b"COMMIT in the diverged tail " * 200
    seg.write_bytes(plain)
    oid = "20261127T231502Z-tl1"
    record = store_orphan(storage, _record(oid), [SegmentSource(seg.name, str(seg), "pg_wal")],
                          options=CodecOptions(level=1, threads=0, key=keyring.current))
    stored = (tmp_path / "vault" / record.segments[0].key).read_bytes()
    assert b"COMMIT in the diverged tail" not in stored
    assert list_orphans(storage, keyring=keyring, require_encryption=True) == [record]
    out = tmp_path / "out"
    out.mkdir()
    fetch_orphan(storage, oid, str(out), keyring=keyring, require_encryption=True)
    assert (out / seg.name).read_bytes() == plain
    with pytest.raises(EncryptionKeyError):
        list_orphans(storage, keyring=None, require_encryption=True)
