"""pgvault.planner: restore plans from hand-built catalogs (tables) and random ones (hypothesis)."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgvault.catalog import ArchivedWal
from pgvault.errors import PgvaultError
from pgvault.planner import (
    DEFAULT_THROUGHPUT,
    BackupPoint,
    CatalogSnapshot,
    PlanError,
    describe_plan,
    format_plan,
    plan_restore,
)
from pgvault.targets import Target, parse_target
from pgvault.wal import HistoryEntry, parse_lsn, parse_wal_file_name, segment_name
from tests.asserts import raises_exactly

UTC = timezone.utc
MIB = 1024 * 1024
SEG = 16 * MIB
T0 = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)



def at(text):
    """'04:03:30' → that time on 2026-11-27 UTC."""
    h, m, s = text.split(":")
    return T0.replace(hour=int(h), minute=int(m), second=0) + timedelta(seconds=float(s))


def ms(moment):
    return round(moment.timestamp() * 1000)


def seg(tli, segno, completed, *, kind="segment", size=SEG):
    name = segment_name(tli, segno) + (".partial" if kind == "partial" else "")
    return ArchivedWal(
        name=name, sha256=f"{tli:032x}{segno:032x}", completed_ms=ms(completed), size=size,
        file=parse_wal_file_name(name),
    )


def segs(tli, segnos, *, offset=timedelta(0)):
    """Segments of one timeline; segment s completes at 04:00 + s minutes (+ offset)."""
    return tuple(seg(tli, s, T0 + timedelta(minutes=s) + offset) for s in segnos)


def backup(label, tli, start, stop, stop_time, *, size=1024 * MIB, chain=()):
    stop_time = at(stop_time)
    return BackupPoint(
        label=label, timeline=tli, start_lsn=parse_lsn(start), stop_lsn=parse_lsn(stop),
        start_time=stop_time - timedelta(seconds=20), stop_time=stop_time, bytes_stored=size, chain=chain,
    )


def names(plan):
    return [w.name for w in plan.wal]


def seg_names(tli, first, last):
    return [segment_name(tli, s) for s in range(first, last + 1)]


def plan(snapshot, to, **kwargs):
    return plan_restore(snapshot, parse_target(to), **kwargs)


def test_plan_error_has_its_exit_code():
    assert PlanError.exit_code == 71
    assert issubclass(PlanError, PgvaultError)


# ------------------------------------------------------------ one timeline
# Segments 1..9 on timeline 1, segment s completed at 04:0s:00.
# F1: segments 1-2, consistent at 0/2000100, 04:01:50.  F2: segment 5, consistent at 0/5800000, 04:04:40.

F1 = backup("20261127T040130F", 1, "0/1000028", "0/2000100", "04:01:50", size=1000 * MIB)
F2 = backup("20261127T040420F", 1, "0/5000028", "0/5800000", "04:04:40", size=2000 * MIB)
ONE = CatalogSnapshot(backups=(F1, F2), wal=segs(1, range(1, 10)))
ONE_WINDOW = "the restorable window is 2026-11-27T04:01:50+00:00 .. 2026-11-27T04:09:00+00:00"
ONE_WINDOW_LSN = "the restorable window is 0/2000100 .. 0/A000000"


@pytest.mark.parametrize(
    "to, backup_label, first, last",
    [
        ("2026-11-27T04:01:50Z", F1.label, 1, 2),  # exactly the earliest point
        ("2026-11-27T04:03:00Z", F1.label, 1, 3),  # segment 3 completed at the target: it holds every commit ≤ T
        ("2026-11-27T04:03:00.001Z", F1.label, 1, 4),
        ("2026-11-27T05:03:00+01:00", F1.label, 1, 3),  # offsets are normalised
        ("2026-11-27T04:04:39Z", F1.label, 1, 5),  # F2 is not consistent yet
        ("2026-11-27T04:04:40Z", F2.label, 5, 5),  # F2's consistency point itself
        ("2026-11-27T04:06:30Z", F2.label, 5, 7),
        ("2026-11-27T04:09:00Z", F2.label, 5, 9),  # exactly the latest point
        ("lsn:0/2000100", F1.label, 1, 2),
        ("lsn:0/3000000", F1.label, 1, 3),  # a segment start is in that segment
        ("lsn:0/57FFFFF", F1.label, 1, 5),
        ("lsn:0/5800000", F2.label, 5, 5),
        ("lsn:0/9FFFFFF", F2.label, 5, 9),
        ("latest", F2.label, 5, 9),
        ("immediate", F2.label, 5, 5),
        ("xid:1234", F2.label, 5, 9),
        ("name:nightly", F2.label, 5, 9),
    ],
)
def test_one_timeline(to, backup_label, first, last):
    p = plan(ONE, to)
    assert p.backup.label == backup_label
    assert p.timeline == 1
    assert names(p) == seg_names(1, first, last)
    assert p.wal_bytes == (last - first + 1) * SEG
    assert p.bytes_to_fetch == p.backup.bytes_stored + p.wal_bytes
    assert p.estimated_seconds == pytest.approx(p.bytes_to_fetch / DEFAULT_THROUGHPUT)


@pytest.mark.parametrize(
    "to, message",
    [
        ("2026-11-27T04:01:49Z",
         "cannot restore to 2026-11-27T04:01:49+00:00 on timeline 1: it is before the earliest restorable point "
         f"2026-11-27T04:01:50+00:00 (backup {F1.label}); {ONE_WINDOW}"),
        ("2026-11-27T03:15:00Z",
         "cannot restore to 2026-11-27T03:15:00+00:00 on timeline 1: it is before the earliest restorable point "
         f"2026-11-27T04:01:50+00:00 (backup {F1.label}); {ONE_WINDOW}"),
        ("2026-11-27T04:09:00.001Z",
         "cannot restore to 2026-11-27T04:09:00.001+00:00 on timeline 1: it is after the latest restorable point "
         "2026-11-27T04:09:00+00:00 (the end of the archived WAL, segment 000000010000000000000009); "
         f"{ONE_WINDOW}"),
        ("lsn:0/20000FF",
         "cannot restore to lsn:0/20000FF on timeline 1: it is before the earliest restorable point 0/2000100 "
         f"(backup {F1.label}); {ONE_WINDOW_LSN}"),
        ("lsn:0/A000000",
         "cannot restore to lsn:0/A000000 on timeline 1: it is after the latest restorable point 0/A000000 "
         f"(the end of the archived WAL, segment 000000010000000000000009); {ONE_WINDOW_LSN}"),
    ],
)
def test_one_timeline_refusals(to, message):
    with raises_exactly(PlanError, message) as info:
        plan(ONE, to)
    assert info.value.earliest.time == at("04:01:50")
    assert info.value.earliest.lsn == parse_lsn("0/2000100")
    assert info.value.earliest.backup == F1.label
    assert info.value.latest.time == at("04:09:00")
    assert info.value.latest.lsn == parse_lsn("0/A000000")
    assert info.value.latest.segment == "000000010000000000000009"


def test_window_of_a_plan():
    p = plan(ONE, "latest")
    assert p.window.timeline == 1
    assert p.window.describe() == ONE_WINDOW
    assert p.window.describe("lsn") == ONE_WINDOW_LSN


def test_forced_backup():
    p = plan(ONE, "latest", backup=F1.label)
    assert p.backup == F1
    assert names(p) == seg_names(1, 1, 9)
    p = plan(ONE, "immediate", backup=F1.label)
    assert names(p) == seg_names(1, 1, 2)
    p = plan(ONE, "2026-11-27T04:06:30Z", backup=F1.label)
    assert names(p) == seg_names(1, 1, 7)


def test_forced_backup_newer_than_the_target_is_refused():
    with raises_exactly(
        PlanError,
        f"cannot restore to 2026-11-27T04:03:00+00:00 on timeline 1 from backup {F2.label}: it became "
        f"consistent at 2026-11-27T04:04:40+00:00, after the target; {ONE_WINDOW}",
    ) as info:
        plan(ONE, "2026-11-27T04:03:00Z", backup=F2.label)
    assert info.value.hint == "choose an older backup, or leave out --backup"
    with raises_exactly(
        PlanError,
        f"cannot restore to lsn:0/5000000 on timeline 1 from backup {F2.label}: it became "
        f"consistent at 0/5800000, after the target; {ONE_WINDOW_LSN}",
    ):
        plan(ONE, "lsn:0/5000000", backup=F2.label)


def test_unknown_backup_is_refused():
    with raises_exactly(
        PlanError,
        f"cannot restore to latest: there is no backup 'nope'; the backups are {F1.label}, {F2.label}",
    ):
        plan(ONE, "latest", backup="nope")


def test_no_backups_at_all():
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1: no backup can be restored on timeline 1: the vault has no backups",
    ) as info:
        plan(CatalogSnapshot(wal=ONE.wal), "latest")
    assert info.value.earliest is None and info.value.latest is None


def test_empty_vault():
    with raises_exactly(
        PlanError,
        "cannot restore to immediate on timeline 1: no backup can be restored on timeline 1: the vault has no backups",
    ):
        plan(CatalogSnapshot(), "immediate")


def test_backup_whose_wal_is_missing_cannot_become_consistent():
    snapshot = CatalogSnapshot(backups=(F1,), wal=segs(1, [1, 3, 4]))
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1: no backup can be restored on timeline 1: "
        f"backup {F1.label} cannot become consistent: segment 000000010000000000000002 is missing",
    ):
        plan(snapshot, "latest")
    snapshot = CatalogSnapshot(backups=(F1,), wal=segs(1, [3, 4]))
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1: no backup can be restored on timeline 1: "
        f"backup {F1.label} cannot become consistent: segments 000000010000000000000001 .. "
        "000000010000000000000002 are missing",
    ):
        plan(snapshot, "latest")
    snapshot = CatalogSnapshot(backups=(F1,), wal=segs(1, [1]))
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1: no backup can be restored on timeline 1: "
        f"backup {F1.label} cannot become consistent: segment 000000010000000000000002 is not archived",
    ):
        plan(snapshot, "latest")


def test_plan_output():
    p = plan(ONE, "2026-11-27T04:06:30Z", throughput=100_000_000)
    data = describe_plan(p)
    assert json.loads(json.dumps(data)) == data
    assert data["target"] == {"kind": "time", "text": "2026-11-27T04:06:30+00:00", "time": "2026-11-27T04:06:30+00:00"}
    assert data["backup"]["label"] == F2.label
    assert data["backup"]["stop_lsn"] == "0/5800000"
    assert data["wal"]["segments"] == 3
    assert data["wal"]["first"] == "000000010000000000000005"
    assert data["wal"]["last"] == "000000010000000000000007"
    assert data["bytes_to_fetch"] == 2000 * MIB + 3 * SEG
    assert data["estimated_seconds"] == round((2000 * MIB + 3 * SEG) / 100_000_000, 3)
    assert data["recovery_settings"] == {
        "recovery_target_time": "'2026-11-27T04:06:30+00:00'",
        "recovery_target_inclusive": "'true'",
        "recovery_target_timeline": "'1'",
    }
    assert data["window"]["earliest"] == {"time": "2026-11-27T04:01:50+00:00", "lsn": "0/2000100", "backup": F1.label}
    assert data["window"]["latest"] == {
        "time": "2026-11-27T04:09:00+00:00", "lsn": "0/A000000", "segment": "000000010000000000000009",
    }
    assert format_plan(p) == "\n".join([
        "Restore to 2026-11-27T04:06:30+00:00 on timeline 1",
        f"  backup    {F2.label} (timeline 1, consistent at 0/5800000, 2026-11-27T04:04:40+00:00), 2.0 GiB",
        "  WAL       3 segments, 48.0 MiB",
        "            timeline 1: 000000010000000000000005 .. 000000010000000000000007",
        "  fetch     2.0 GiB, about 21 s at 100 MB/s",
        "  window    2026-11-27T04:01:50+00:00 .. 2026-11-27T04:09:00+00:00",
        "  settings  recovery_target_time = '2026-11-27T04:06:30+00:00'",
        "            recovery_target_inclusive = 'true'",
        "            recovery_target_timeline = '1'",
    ])


def test_notes():
    p = plan(ONE, "xid:1234")
    assert p.notes == (
        "xid/name targets cannot be located before replay: the plan includes all WAL to the end of the archived "
        "run on timeline 1 (000000010000000000000009); the restore verifies the transaction was reached",
        f"the transaction must come after backup {F2.label} became consistent (2026-11-27T04:04:40+00:00); "
        "if it is older, pass --backup with an older backup",
    )
    assert plan(ONE, "2026-11-27T04:06:30Z").notes == ()
    assert plan(ONE, "2026-11-27T04:08:30Z").notes == (
        "the target is in the last archived segment of this run (000000010000000000000009): recovery stops at "
        "the first commit after the target; if none is archived, recovery ends before the target and the "
        "restore reports it",
    )
    assert plan(ONE, "latest").notes == ()


def test_incremental_chain():
    inc = backup("20261127T040600I", 1, "0/7000028", "0/7000100", "04:06:50", size=10 * MIB,
                 chain=(F2.label, "20261127T040600I"))
    p = plan(CatalogSnapshot(backups=(F1, F2, inc), wal=ONE.wal), "latest")
    assert p.backup == inc
    assert names(p) == seg_names(1, 7, 9)
    assert p.notes == (f"incremental backup: restores the chain {F2.label} → 20261127T040600I",)
    assert f"  chain     {F2.label} → 20261127T040600I" in format_plan(p).splitlines()
    assert F1.chain == (F1.label,)


# ------------------------------------------------------------------- gaps
# As ONE, without segment 4: runs 1..3 and 5..9.

GAP = CatalogSnapshot(backups=(F1, F2), wal=tuple(w for w in ONE.wal if w.file.segno != 4))
GAP_WINDOWS = (
    "the restorable windows are 2026-11-27T04:01:50+00:00 .. 2026-11-27T04:03:00+00:00, "
    "2026-11-27T04:04:40+00:00 .. 2026-11-27T04:09:00+00:00"
)


@pytest.mark.parametrize(
    "to, backup_label, first, last",
    [
        ("2026-11-27T04:03:00Z", F1.label, 1, 3),
        ("2026-11-27T04:04:40Z", F2.label, 5, 5),
        ("lsn:0/3FFFFFF", F1.label, 1, 3),
        ("latest", F2.label, 5, 9),  # the gap is before the newest backup: latest is reachable
    ],
)
def test_gap_reachable(to, backup_label, first, last):
    p = plan(GAP, to)
    assert p.backup.label == backup_label
    assert names(p) == seg_names(1, first, last)


@pytest.mark.parametrize(
    "to, message",
    [
        ("2026-11-27T04:03:00.001Z",
         "cannot restore to 2026-11-27T04:03:00.001+00:00 on timeline 1: it falls in a gap between the restorable "
         f"points 2026-11-27T04:03:00+00:00 and 2026-11-27T04:04:40+00:00 (backup {F2.label}): segment "
         f"000000010000000000000004 is missing; {GAP_WINDOWS}"),
        ("lsn:0/4000000",
         "cannot restore to lsn:0/4000000 on timeline 1: it falls in a gap between the restorable points "
         f"0/4000000 and 0/5800000 (backup {F2.label}): segment 000000010000000000000004 is missing; "
         "the restorable windows are 0/2000100 .. 0/4000000, 0/5800000 .. 0/A000000"),
    ],
)
def test_gap_refusals(to, message):
    with raises_exactly(PlanError, message) as info:
        plan(GAP, to)
    assert info.value.earliest.backup == F1.label
    assert info.value.latest.segment == "000000010000000000000009"
    assert len(info.value.window.intervals) == 2


def test_forced_backup_cannot_cross_a_gap():
    with raises_exactly(
        PlanError,
        f"cannot restore to 2026-11-27T04:06:30+00:00 on timeline 1 from backup {F1.label}: its WAL ends at "
        "2026-11-27T04:03:00+00:00 (after it segment 000000010000000000000004 is missing); " + GAP_WINDOWS,
    ):
        plan(GAP, "2026-11-27T04:06:30Z", backup=F1.label)
    with raises_exactly(
        PlanError,
        f"cannot restore to latest on timeline 1 from backup {F1.label}: its WAL ends at "
        "2026-11-27T04:03:00+00:00 (after it segment 000000010000000000000004 is missing); " + GAP_WINDOWS,
    ):
        plan(GAP, "latest", backup=F1.label)


# As ONE, without segments 7 and 8: the newest backup's run ends at 6, segment 9 is beyond a gap.
LATE_GAP = CatalogSnapshot(backups=(F1, F2), wal=tuple(w for w in ONE.wal if w.file.segno not in (7, 8)))
LATE_WINDOW = "the restorable window is 2026-11-27T04:01:50+00:00 .. 2026-11-27T04:06:00+00:00"


def test_latest_across_a_gap_is_refused():
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1: the archived WAL cannot be replayed to its end: segments "
        "000000010000000000000007 .. 000000010000000000000008 are missing; the latest restorable point is "
        f"2026-11-27T04:06:00+00:00 (0/7000000); {LATE_WINDOW}",
    ) as info:
        plan(LATE_GAP, "latest")
    assert info.value.hint == "to restore up to the gap, pass --to 2026-11-27T04:06:00+00:00"
    assert names(plan(LATE_GAP, "2026-11-27T04:06:00+00:00")) == seg_names(1, 5, 6)


def test_time_after_a_gap_without_backup():
    with raises_exactly(
        PlanError,
        "cannot restore to 2026-11-27T04:08:00+00:00 on timeline 1: it is after the latest restorable point "
        "2026-11-27T04:06:00+00:00 (after it segments 000000010000000000000007 .. 000000010000000000000008 are "
        f"missing); {LATE_WINDOW}",
    ):
        plan(LATE_GAP, "2026-11-27T04:08:00Z")


def test_xid_with_wal_after_a_gap():
    p = plan(LATE_GAP, "xid:99")
    assert names(p) == seg_names(1, 5, 6)
    assert p.notes[-1] == (
        "WAL archived after the gap is not reachable: segments 000000010000000000000007 .. "
        "000000010000000000000008 are missing"
    )


def test_conflicting_copies_are_not_used():
    bad = seg(1, 4, T0 + timedelta(minutes=4))
    bad = ArchivedWal(bad.name, "f" * 64, bad.completed_ms, bad.size, bad.file)
    same = seg(1, 6, T0 + timedelta(minutes=6))
    snapshot = CatalogSnapshot(backups=(F1,), wal=ONE.wal + (bad, same))
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1 from backup 20261127T040130F: its WAL ends at "
        "2026-11-27T04:03:00+00:00 (after it segment 000000010000000000000004 is archived twice with different "
        "content); the restorable window is 2026-11-27T04:01:50+00:00 .. 2026-11-27T04:03:00+00:00",
    ):
        plan(snapshot, "latest", backup=F1.label)


# ------------------------------------------------------------- timelines
# Timeline 1: segments 1..5 (4 and 5 written by the old primary after the fork) and 4's .partial.
# Timeline 2 forked at 0/4800000: its own copy of segment 4 and segments 5..8, completed at 04:0s:30.
# P1 on tl 1 before the fork; P2 on tl 1 after the fork (ineligible for tl 2); P3 on tl 2.

FORK = "0/4800000"
P1 = backup("p1", 1, "0/1000028", "0/2000100", "04:01:50")
P2 = backup("p2", 1, "0/4900000", "0/4A00000", "04:03:50")
P3 = backup("p3", 2, "0/6000028", "0/6100000", "04:06:10")
TL2 = CatalogSnapshot(
    backups=(P1, P2, P3),
    wal=segs(1, range(1, 6)) + (seg(1, 4, at("04:04:20"), kind="partial"),)
    + segs(2, range(4, 9), offset=timedelta(seconds=30)),
    histories={2: (HistoryEntry(1, parse_lsn(FORK), "no recovery target specified"),)},
)
TL2_WINDOW = "the restorable window is 2026-11-27T04:01:50+00:00 .. 2026-11-27T04:08:30+00:00"


@pytest.mark.parametrize(
    "to, timeline, backup_label, wal",
    [
        # target on tl 2 before the fork: replayed from tl 1
        ("2026-11-27T04:02:30Z", "latest", "p1", seg_names(1, 1, 3)),
        ("2026-11-27T04:02:30Z", 2, "p1", seg_names(1, 1, 3)),
        ("2026-11-27T04:02:30Z", 1, "p1", seg_names(1, 1, 3)),
        # after the fork on tl 2: p2 is not on tl 2's history; the fork's segment is read from tl 2's copy
        ("2026-11-27T04:05:00Z", "latest", "p1", seg_names(1, 1, 3) + seg_names(2, 4, 5)),
        ("lsn:0/4800000", "latest", "p1", seg_names(1, 1, 3) + seg_names(2, 4, 4)),
        ("2026-11-27T04:07:00Z", "latest", "p3", seg_names(2, 6, 7)),
        ("latest", "latest", "p3", seg_names(2, 6, 8)),
        ("immediate", 2, "p3", seg_names(2, 6, 6)),
        # on tl 1 explicitly: the old primary's WAL after the fork, and p2
        ("2026-11-27T04:05:00Z", 1, "p2", seg_names(1, 4, 5)),
        ("latest", 1, "p2", seg_names(1, 4, 5)),
    ],
)
def test_timelines(to, timeline, backup_label, wal):
    p = plan(TL2, to, timeline=timeline)
    assert p.backup.label == backup_label
    assert names(p) == wal
    assert p.timeline == (2 if timeline == "latest" else timeline)
    assert p.history == (TL2.histories[2] if p.timeline == 2 else ())
    assert p.recovery_settings["recovery_target_timeline"] == f"'{p.timeline}'"


def test_timeline_switch_in_text_and_json():
    p = plan(TL2, "2026-11-27T04:05:00Z")
    assert (
        "            timeline 1: 000000010000000000000001 .. 000000010000000000000003, "
        "then timeline 2: 000000020000000000000004 .. 000000020000000000000005"
    ) in format_plan(p).splitlines()
    data = describe_plan(p)
    assert data["history"] == [{"parent_timeline": 1, "switch_lsn": "0/4800000"}]
    assert [f["timeline"] for f in data["wal"]["files"]] == [1, 1, 1, 2, 2]


def test_backup_after_the_fork_is_not_eligible_for_the_child():
    with raises_exactly(
        PlanError,
        "cannot restore to 2026-11-27T04:05:00+00:00 on timeline 2 from backup p2: the history of timeline 2 "
        f"leaves timeline 1 at 0/4800000, before backup p2 became consistent at 0/4A00000; {TL2_WINDOW}",
    ):
        plan(TL2, "2026-11-27T04:05:00Z", backup="p2")


def test_backup_on_a_child_timeline_is_not_eligible_for_the_parent():
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 1 from backup p3: backup p3 is on timeline 2, which is not in "
        "the history of timeline 1; the restorable window is 2026-11-27T04:01:50+00:00 .. 2026-11-27T04:05:00+00:00",
    ):
        plan(TL2, "latest", timeline=1, backup="p3")


def test_no_backup_on_the_timeline_history():
    snapshot = CatalogSnapshot(backups=(P2,), wal=TL2.wal, histories=TL2.histories)
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 2: no backup can be restored on timeline 2: no backup lies on "
        "the history of timeline 2 (the history of timeline 2 leaves timeline 1 at 0/4800000, before backup p2 "
        "became consistent at 0/4A00000)",
    ):
        plan(snapshot, "latest")


def test_a_consistency_point_at_the_switch_point_is_on_the_child():
    # WAL up to (not including) the switch point is all on timeline 1: PostgreSQL checks minRecoveryPoint - 1.
    at_fork = backup("at-fork", 1, "0/4000028", FORK, "04:04:10")
    snapshot = CatalogSnapshot(backups=(at_fork,), wal=TL2.wal, histories=TL2.histories)
    p = plan(snapshot, "immediate")
    assert p.timeline == 2
    assert names(p) == seg_names(2, 4, 4)


def test_nonexistent_timeline():
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 3: timeline 3 does not exist in the vault (no 00000003.history is "
        f"archived); the vault has timelines 1, 2; on timeline 2 {TL2_WINDOW}",
    ) as info:
        plan(TL2, "latest", timeline=3)
    assert info.value.earliest.backup == "p1"
    assert info.value.latest.segment == "000000020000000000000008"
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 2: timeline 2 does not exist in the vault (no 00000002.history is "
        f"archived); the vault has timeline 1; on timeline 1 {ONE_WINDOW}",
    ):
        plan(ONE, "latest", timeline=2)


def test_latest_timeline_without_its_history():
    snapshot = CatalogSnapshot(backups=TL2.backups, wal=TL2.wal + segs(3, [9]), histories=TL2.histories)
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 3: timeline 3 has archived WAL but no 00000003.history, so its "
        "history is unknown",
    ) as info:
        plan(snapshot, "latest")
    assert info.value.hint == "archive the history file from the server's pg_wal, or pass --timeline"
    assert plan(snapshot, "latest", timeline=2).backup.label == "p3"


def test_partial_end_of_the_target_timeline_is_noted():
    snapshot = CatalogSnapshot(backups=(P1,), wal=segs(1, range(1, 4)) + (seg(1, 4, at("04:04:20"), kind="partial"),))
    p = plan(snapshot, "latest")
    assert names(p) == seg_names(1, 1, 3)
    assert p.notes == ("000000010000000000000004.partial (the unfinished end of timeline 1) is not replayed",)


def test_backup_starting_before_its_timeline_began_is_refused():
    odd = backup("odd", 2, "0/4000028", "0/5000100", "04:05:10")  # tl 2 only begins at 0/4800000
    with raises_exactly(
        PlanError,
        "cannot restore to latest on timeline 2 from backup odd: backup odd starts at 0/4000028 on timeline 2, "
        f"before timeline 2 began at 0/4800000; {TL2_WINDOW}",
    ):
        plan(CatalogSnapshot(backups=TL2.backups + (odd,), wal=TL2.wal, histories=TL2.histories), "latest", backup="odd")


def test_time_plan_always_reaches_the_consistency_point():
    # Segment 2's file was completed late (04:03:10), after the backup became consistent in segment 3:
    # a target between them still needs segment 3.
    late = segs(1, [1]) + (seg(1, 2, at("04:03:10")),) + segs(1, [3, 4])
    b = backup("b", 1, "0/1000028", "0/3000100", "04:02:50")
    p = plan(CatalogSnapshot(backups=(b,), wal=late), "2026-11-27T04:02:55Z")
    assert names(p) == seg_names(1, 1, 3)


def test_three_timelines():
    # 1 → 2 at 0/4800000 → 3 at 0/6800000; timeline 2 also went on (abandoned) beyond 6.
    histories = {
        2: (HistoryEntry(1, parse_lsn(FORK)),),
        3: (HistoryEntry(1, parse_lsn(FORK)), HistoryEntry(2, parse_lsn("0/6800000"))),
    }
    wal = segs(1, range(1, 5)) + segs(2, range(4, 9)) + segs(3, range(6, 11))
    p2b = backup("p2b", 2, "0/7000000", "0/7100000", "04:07:10")  # on tl 2 after tl 3 left it
    snapshot = CatalogSnapshot(backups=(P1, P3, p2b), wal=wal, histories=histories)
    p = plan(snapshot, "latest")
    assert p.timeline == 3 and p.backup.label == "p3"
    assert names(p) == seg_names(3, 6, 10)
    p = plan(snapshot, "latest", timeline=2)
    assert p.backup.label == "p2b"
    p = plan(snapshot, "lsn:0/6000000")
    assert p.backup.label == "p1"
    assert names(p) == seg_names(1, 1, 3) + seg_names(2, 4, 5) + seg_names(3, 6, 6)


# ------------------------------------------------------------ properties

HOUR_MS = 3_600_000
BASE_MS = ms(T0)


def lsn_ms(lsn, seg_size):
    """Random catalogs: WAL position p was written at BASE + p * (1 minute / segment)."""
    return BASE_MS + lsn * 60_000 // seg_size


@st.composite
def catalogs(draw, late_ms=5_000):
    """Random catalogs on 1-3 timelines (1 → 2 → 3) with gaps, .partial files and 1-6 backups.

    A segment completes when its last byte is written plus up to ``late_ms``
    (the file's mtime may be later than the switch); above a minute, completion
    times are no longer monotone along the WAL.
    """
    seg_size = 1 * MIB
    n_timelines = draw(st.integers(1, 3))
    top = 24
    # Switch points strictly increasing; timeline k+1 forks from k.
    switches = sorted(draw(st.lists(st.integers(2 * seg_size, top * seg_size), min_size=n_timelines - 1,
                                    max_size=n_timelines - 1, unique=True)))
    histories = {}
    for k in range(2, n_timelines + 1):
        histories[k] = tuple(HistoryEntry(j, switches[j - 1]) for j in range(1, k))
    begins = [0] + switches  # begin LSN of timeline k is begins[k-1]
    wal = []
    lasts = {}
    for k in range(1, n_timelines + 1):
        first = begins[k - 1] // seg_size
        # Timelines may go on after a child forked (abandoned or split brain).
        last = lasts[k] = draw(st.integers(first, top + 4))
        holes = set()
        for _ in range(draw(st.integers(0, 2))):  # gaps of 1-3 segments
            hole = draw(st.integers(first, last))
            holes.update(range(hole, hole + draw(st.integers(1, 3))))
        for s in range(first, last + 1):
            if s in holes:
                continue
            name = segment_name(k, s, segment_size=seg_size)
            done = lsn_ms((s + 1) * seg_size, seg_size) + draw(st.integers(0, late_ms))
            wal.append(ArchivedWal(name, f"{k:032x}{s:032x}", done, seg_size,
                                   parse_wal_file_name(name, segment_size=seg_size)))
        if k < n_timelines and draw(st.booleans()):
            name = segment_name(k, switches[k - 1] // seg_size, segment_size=seg_size) + ".partial"
            wal.append(ArchivedWal(name, "e" * 64, 0, seg_size, parse_wal_file_name(name, segment_size=seg_size)))
    backups = []
    for i in range(draw(st.integers(1, 6))):
        k = draw(st.integers(1, n_timelines))
        start = draw(st.integers(begins[k - 1], (lasts[k] + 1) * seg_size))
        stop = start + draw(st.one_of(st.integers(1, seg_size), st.integers(1, 3 * seg_size)))
        later_switches = [x for x in switches if x > start]
        if later_switches and draw(st.booleans()):
            stop = draw(st.sampled_from(later_switches))  # consistent exactly at a switch point
        stop_time = datetime.fromtimestamp(lsn_ms(stop, seg_size) / 1000, tz=UTC)
        backups.append(BackupPoint(f"b{i}", k, start, stop, stop_time - timedelta(seconds=1), stop_time,
                                   draw(st.integers(0, 10**9))))
    return CatalogSnapshot(tuple(backups), tuple(wal), histories, seg_size)


@st.composite
def targets(draw, snapshot=None):
    """Random targets; with a snapshot, times and LSNs cluster around its backups' and segments' edges."""
    kind = draw(st.sampled_from(["time", "lsn", "time", "lsn", "latest", "immediate", "xid", "name"]))
    near_ms = [BASE_MS - 60_000, BASE_MS + 30 * 60_000]
    near_lsn = [0, 30 * MIB]
    if snapshot is not None:
        near_ms += [ms(b.stop_time) for b in snapshot.backups] + [w.completed_ms for w in snapshot.wal]
        near_lsn += [b.stop_lsn for b in snapshot.backups]
        near_lsn += [(w.file.segno + 1) * snapshot.segment_size for w in snapshot.wal if w.file.segno is not None]
    if kind == "time":
        moment = draw(st.one_of(
            st.integers(BASE_MS - 60_000, BASE_MS + 30 * 60_000),
            st.builds(lambda p, d: p + d, st.sampled_from(near_ms), st.sampled_from([-1, 0, 0, 1])),
        ))
        return Target("time", time=datetime.fromtimestamp(moment / 1000, tz=UTC))
    if kind == "lsn":
        return Target("lsn", lsn=draw(st.one_of(
            st.integers(0, 30 * MIB),
            st.builds(lambda p, d: max(0, p + d), st.sampled_from(near_lsn), st.sampled_from([-1, 0, 0, 1])),
        )))
    if kind == "xid":
        return Target("xid", xid=draw(st.integers(3, 10**6)))
    if kind == "name":
        return Target("name", name="rp")
    return Target(kind)


# An independent, deliberately simple model of what recovery onto a timeline can do.

def path_of(snapshot, tli):
    """[(timeline, begin_lsn, end_lsn)] oldest first, end exclusive (None: open)."""
    hist = snapshot.histories.get(tli, ())
    out, begin = [], 0
    for entry in hist:
        out.append((entry.parent_timeline, begin, entry.switch_lsn))
        begin = entry.switch_lsn
    out.append((tli, begin, None))
    return out


def file_timeline(snapshot, tli, segno):
    """The newest path timeline whose first segment is at or before segno."""
    for k, begin, _ in reversed(path_of(snapshot, tli)):
        if begin // snapshot.segment_size <= segno:
            return k
    raise AssertionError


def lsn_timeline(snapshot, tli, lsn):
    for k, begin, end in path_of(snapshot, tli):
        if begin <= lsn and (end is None or lsn < end):
            return k
    raise AssertionError


def have(snapshot):
    return {(w.timeline, w.file.segno): w for w in snapshot.wal if w.file.kind == "segment"}


def present(snapshot, tli, segno):
    return (file_timeline(snapshot, tli, segno), segno) in have(snapshot)


def reaches(snapshot, tli, b, target):
    """The last segment to replay if backup b reaches target on timeline tli, else None."""
    size = snapshot.segment_size
    if lsn_timeline(snapshot, tli, b.start_lsn) != b.timeline or lsn_timeline(snapshot, tli, b.stop_lsn - 1) != b.timeline:
        return None
    first, cons = b.start_lsn // size, (b.stop_lsn - 1) // size
    if not all(present(snapshot, tli, s) for s in range(first, cons + 1)):
        return None
    run_end = cons
    while present(snapshot, tli, run_end + 1):
        run_end += 1
    if target.kind == "time":
        t_ms = target.time.timestamp() * 1000
        if b.stop_time > target.time:
            return None
        files = have(snapshot)
        for s in range(cons, run_end + 1):
            if files[(file_timeline(snapshot, tli, s), s)].completed_ms >= t_ms:
                return s
        return None
    if target.kind == "lsn":
        end = max(cons, target.lsn // size)
        return end if b.stop_lsn <= target.lsn and end <= run_end else None
    if target.kind == "immediate":
        return cons
    if target.kind == "latest":
        on_path = [s for (k, s) in have(snapshot) if file_timeline(snapshot, tli, s) == k]
        return run_end if run_end == max(on_path) else None
    return run_end


def resolve(snapshot, timeline):
    if timeline == "latest":
        known = {w.timeline for w in snapshot.wal} | set(snapshot.histories) | {1}
        timeline = max(known)
    return timeline if timeline == 1 or timeline in snapshot.histories else None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot=catalogs(late_ms=90_000), timeline=st.sampled_from(["latest"] * 4 + [1, 2, 3, 4]), data=st.data())
def test_planner_matches_a_brute_force_model(snapshot, timeline, data):
    target = data.draw(targets(snapshot))
    force = data.draw(st.sampled_from([None] + [b.label for b in snapshot.backups]))
    tli = resolve(snapshot, timeline)
    if tli is None:
        with pytest.raises(PlanError):
            plan_restore(snapshot, target, timeline=timeline, backup=force)
        return
    reach = {b.label: reaches(snapshot, tli, b, target) for b in snapshot.backups}
    able = [b for b in snapshot.backups if reach[b.label] is not None]
    if force is not None:
        able = [b for b in able if b.label == force]
    if not able:
        # An unreachable target is always refused, naming the window.
        with pytest.raises(PlanError) as info:
            plan_restore(snapshot, target, timeline=timeline, backup=force)
        err = info.value
        assert (err.earliest is None) == (err.latest is None)
        if err.window is not None and err.window.intervals and "does not exist" not in err.message:
            assert err.window.describe("lsn" if target.kind == "lsn" else "time") in err.message
        return
    expected = max(able, key=lambda b: (b.stop_lsn, b.stop_time, b.label))
    p = plan_restore(snapshot, target, timeline=timeline, backup=force)
    # The chosen backup is the newest one that can reach the target.
    assert p.backup == expected
    assert p.timeline == tli
    # The WAL chain is continuous, read from the timelines the history dictates, and ends where it must.
    size = snapshot.segment_size
    segnos = [w.file.segno for w in p.wal]
    assert segnos == list(range(expected.start_lsn // size, reach[expected.label] + 1))
    for w in p.wal:
        assert w.file.kind == "segment"
        assert w.timeline == file_timeline(snapshot, tli, w.file.segno)
    assert p.wal_bytes == sum(w.size for w in p.wal)
    assert p.bytes_to_fetch == expected.bytes_stored + p.wal_bytes


@settings(max_examples=400, deadline=None)
@given(snapshot=catalogs(), data=st.data())
def test_window_and_refusals_agree(snapshot, data):
    """A positional target inside the window is planned; outside it, refused (completion times monotone)."""
    target = data.draw(targets(snapshot))
    if target.kind not in ("time", "lsn"):
        return
    try:
        p = plan_restore(snapshot, target)
    except PlanError as err:
        window = err.window
        planned = False
    else:
        window = p.window
        planned = True
    if window is None:
        return
    if target.kind == "time":
        inside = any(i.start.time <= target.time <= i.end.time for i in window.intervals)
    else:
        inside = any(i.start.lsn <= target.lsn < i.end.lsn for i in window.intervals)
    assert inside == planned
