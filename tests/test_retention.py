"""Retention as a pure function: (catalog, policy, now) → ExpiryPlan, with tables and an oracle (the planner)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from pgvault.backup.layout import format_label
from pgvault.catalog import format_wal_key, parse_wal_key
from pgvault.planner import BackupPoint, CatalogSnapshot, plan_restore
from pgvault.retention import (
    BackupInfo,
    RetentionCatalog,
    RetentionPolicy,
    describe_plan,
    parse_window,
    plan_expiry,
    policy_from_settings,
)
from pgvault.targets import Target
from pgvault.wal import DEFAULT_SEGMENT_SIZE as SEG
from pgvault.wal import history_file_name, segment_name, segno_start_lsn

DAY0 = datetime(2026, 11, 1, tzinfo=UTC)
SHA = "ab" * 32


def at(day: float, hour: float = 0) -> datetime:
    """Day 1 is 2026-11-01."""
    return DAY0 + timedelta(days=day - 1, hours=hour)


def wal_file(name: str, *, completed: datetime | None = None, sha: str = SHA):
    ms = int(((completed or DAY0) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000)
    entry = parse_wal_key(format_wal_key(name, sha256=sha, completed_ms=ms, size=SEG if "." not in name else 100))
    assert entry is not None
    return entry


def segment_time(segno: int) -> datetime:
    """Segment 10·d completes on day d at 03:00; ten segments a day."""
    return at(segno / 10, 3)


def segments(first: int, last: int, timeline: int = 1):
    return [wal_file(segment_name(timeline, s), completed=segment_time(s)) for s in range(first, last + 1)]


def day_backups(spec: str, *, skip: tuple[int, ...] = ()) -> list[BackupInfo]:
    """One backup a day from day 1: "F" a full, "I" an incremental on the day before's; starting at segment 10·day
    at 02:00, consistent at 02:30 in the next segment. Days in ``skip`` are left out (a broken chain)."""
    out, previous = [], None
    for day, kind in enumerate(spec, start=1):
        label = format_label(at(day, 2), "full" if kind == "F" else "incr")
        b = BackupInfo(label=label, parent=previous if kind == "I" else None, timeline=1,
                       start_lsn=segno_start_lsn(10 * day) + 0x28, stop_time=at(day, 2.5))
        previous = label
        if day not in skip:
            out.append(b)
    return out


def catalog(spec: str, *, skip=(), dumps=(), wal=None) -> RetentionCatalog:
    return RetentionCatalog(backups=tuple(day_backups(spec, skip=skip)), dumps=tuple(dumps),
                            wal=tuple(segments(10, 10 * len(spec) + 5) if wal is None else wal))


def day_of(label: str) -> int:
    return int(label[6:8])


def days(decisions) -> list[int]:
    return [day_of(d.label) for d in decisions]


NOW = at(7, 12)  # day 7, noon: after the seventh backup


# ------------------------------------------------------------------ windows and policies


@pytest.mark.parametrize("text,seconds", [("14d", 14 * 86400), ("36h", 36 * 3600), ("2w", 14 * 86400),
                                          ("90m", 5400), ("45s", 45), ("1d", 86400)])
def test_parse_window(text, seconds):
    assert parse_window(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["14", "0d", "d", "14 d", "1.5d", "-1d", "14D", "14days", "", None, 14, "99999999d"])
def test_parse_window_refuses(text):
    with pytest.raises(ValueError, match=r"is not a positive duration: a number and a unit s, m, h, d or w"):
        parse_window(text)


@pytest.mark.parametrize("kwargs,message", [
    ({"full": 0}, "[retention] full must be an integer of at least 1, got 0"),
    ({"dumps": -1}, "[retention] dumps must be an integer of at least 1, got -1"),
    ({"full": True}, "[retention] full must be an integer of at least 1, got True"),
])
def test_policy_refuses_nonsense(kwargs, message):
    with pytest.raises(ValueError) as info:
        RetentionPolicy(**kwargs)
    assert str(info.value) == message


def test_policy_from_settings_and_config(tmp_path):
    from pgvault.config import load_settings
    from pgvault.errors import ConfigError

    path = tmp_path / "p.toml"
    path.write_text('[retention]\nfull = 2\nwindow = "14d"\n')
    policy = policy_from_settings(load_settings(str(path), environ={}).retention)
    assert policy == RetentionPolicy(full=2, window="14d", dumps=None)
    assert policy.describe() == 'full = 2, window = "14d"'
    assert policy_from_settings(load_settings(None, environ={}).retention).empty
    for text, message in [
        ("full = 0", "[retention] full = 0: expected an integer from 1 to 10000 (full backups to keep)"),
        ('window = "14"', ("[retention] window = '14': expected a duration: a number and a unit s, m, h, d or w, "
                          'e.g. "14d"')),
        ('dumps = "3"', "[retention] dumps = '3': expected an integer"),
        ("keep = 3", "unknown key 'keep' in [retention]; known keys: full, window, dumps"),
    ]:
        path.write_text(f"[retention]\n{text}\n")
        with pytest.raises(ConfigError) as info:
            load_settings(str(path), environ={})
        assert str(info.value) == f"{path}: {message}"


# ------------------------------------------------------------------ the table


@pytest.mark.parametrize("spec,policy,now,kept,expired,wal_from", [
    # full = N: the N newest full backups with their incrementals
    ("FIIFIFI", RetentionPolicy(full=1), NOW, [6, 7], [5, 4, 3, 2, 1], 60),
    ("FIIFIFI", RetentionPolicy(full=2), NOW, [4, 5, 6, 7], [3, 2, 1], 40),
    ("FIIFIFI", RetentionPolicy(full=3), NOW, [1, 2, 3, 4, 5, 6, 7], [], 10),
    ("FIIFIFI", RetentionPolicy(full=9), NOW, [1, 2, 3, 4, 5, 6, 7], [], 10),
    # window: everything inside, and the newest backup consistent at or before its start (with its chain)
    ("FIIFIFI", RetentionPolicy(window="3d"), NOW, [4, 5, 6, 7], [3, 2, 1], 40),  # start day 4 noon: anchor F4
    ("FIIFIFI", RetentionPolicy(window="60h"), NOW, [4, 5, 6, 7], [3, 2, 1], 40),  # day 5 00:00: anchor still F4
    ("FIIFIFI", RetentionPolicy(window="4d"), NOW, [1, 2, 3, 4, 5, 6, 7], [], 10),  # anchor I3: its chain from F1
    ("FIIFIFI", RetentionPolicy(window="1h"), NOW, [6, 7], [5, 4, 3, 2, 1], 60),  # nothing inside: anchor I7
    ("FIIFIFI", RetentionPolicy(window="1h"), at(7, 2.5), [6, 7], [5, 4, 3, 2, 1], 60),  # start at 01:30: anchor F6
    ("FIIFIFI", RetentionPolicy(window="1h"), at(7, 3.5), [6, 7], [5, 4, 3, 2, 1], 60),  # exactly at I7's stop
    ("FFFFFFF", RetentionPolicy(window="2d"), NOW, [5, 6, 7], [4, 3, 2, 1], 50),
    ("FIIIIII", RetentionPolicy(window="1d"), NOW, [1, 2, 3, 4, 5, 6, 7], [], 10),  # one long chain: all needed
    ("FFFFFFF", RetentionPolicy(window="30d"), NOW, [1, 2, 3, 4, 5, 6, 7], [], 10),  # nothing before the window
    # both: a backup is kept when either rule keeps it
    ("FIIFIFI", RetentionPolicy(full=1, window="3d"), NOW, [4, 5, 6, 7], [3, 2, 1], 40),
    ("FFFFFFF", RetentionPolicy(full=4, window="1d"), NOW, [4, 5, 6, 7], [3, 2, 1], 40),
    # no backup rule: every backup and all WAL stay, whatever else is set
    ("FIIFIFI", RetentionPolicy(dumps=1), NOW, [1, 2, 3, 4, 5, 6, 7], [], None),
    ("FIIFIFI", RetentionPolicy(), NOW, [1, 2, 3, 4, 5, 6, 7], [], None),
])
def test_which_backups_and_wal_go(spec, policy, now, kept, expired, wal_from):
    cat = catalog(spec)
    plan = plan_expiry(cat, policy, now)
    assert days(plan.keep_backups) == kept
    assert days(plan.expire_backups) == expired  # newest first: an incremental before what it is built on
    gone = [w.file.segno for w in plan.expire_wal]
    if wal_from is None:
        assert gone == [] and plan.wal_keep_from is None
    else:
        assert gone == list(range(10, wal_from))  # oldest first
        assert plan.wal_keep_from == segment_name(1, wal_from)


def test_the_reasons_say_which_rule_decided():
    plan = plan_expiry(catalog("FIIFIFI"), RetentionPolicy(full=1, window="3d"), NOW)
    f1, i2, f4, i5 = (format_label(at(d, 2), k) for d, k in ((1, "full"), (2, "incr"), (4, "full"), (5, "incr")))
    reasons = {d.label: d.reasons for d in (*plan.keep_backups, *plan.expire_backups)}
    assert reasons[f4] == (
        ('window = "3d": the newest backup consistent before the window start 2026-11-04T12:00:00+00:00: '
        "restores to the start of the window begin here"),
        f"backup {i5} is built on it",
    )
    assert reasons[i5] == (('window = "3d": consistent at 2026-11-05T02:30:00+00:00, inside the window '
                           "(since 2026-11-04T12:00:00+00:00)"),)
    assert reasons[i2] == (
        f"full = 1: built on full backup {f1}, which is not one of the 1 newest",
        ('window = "3d": consistent at 2026-11-02T02:30:00+00:00, before the window start '
        f"2026-11-04T12:00:00+00:00, and the newer backup {f4} covers the window start"),
    )
    assert plan.wal_reason == (f"older than 000000010000000000000028, the segment where the oldest kept backup {f4} "
                               "starts: no kept backup and no point of the window needs them")
    assert describe_plan(plan)["wal"] == {"expire": 30, "bytes": 30 * SEG, "first": segment_name(1, 10), "last": segment_name(1, 39),
                                          "keep_from": segment_name(1, 40), "reason": plan.wal_reason}


def test_no_policy_removes_nothing_and_says_so():
    plan = plan_expiry(catalog("FIIFIFI", dumps=["20261101T030000ZD"]), RetentionPolicy(), NOW)
    assert plan.removes_nothing
    assert plan.notes == (("no [retention] policy is configured: nothing is removed "
                          "(set [retention] full, window or dumps)"),)
    assert {d.reasons for d in plan.keep_backups} == {("no backup retention is configured ([retention] full, window)",)}
    assert plan.wal_reason == "no backup retention is configured: all WAL is kept"
    assert [d.reasons for d in plan.keep_dumps] == [("no dump retention is configured ([retention] dumps)",)]


def test_a_broken_chain_goes_and_the_newest_backup_always_stays():
    # day 2's incremental is gone: days 3 and 4 (built on it) cannot be restored
    plan = plan_expiry(catalog("FIIIF", skip=(2,)), RetentionPolicy(full=5), at(5, 12))
    assert days(plan.keep_backups) == [1, 5]
    assert days(plan.expire_backups) == [4, 3]
    i2 = format_label(at(2, 2), "incr")
    assert plan.expire_backups[1].reasons == (
        f"its incremental chain is broken (backup {i2} is missing): it cannot be restored",)
    # a window that ended before every backup still keeps the newest (the anchor)
    plan = plan_expiry(catalog("FFF"), RetentionPolicy(window="1s"), at(30))
    assert days(plan.keep_backups) == [3] and days(plan.expire_backups) == [2, 1]


def test_wal_history_files_are_never_removed_and_partial_and_backup_files_below_the_cut_are():
    wal = [
        *segments(10, 45),
        wal_file(history_file_name(2)),
        wal_file(history_file_name(3)),
        wal_file(segment_name(1, 12) + ".partial"),
        wal_file(segment_name(1, 10) + ".00000028.backup"),
        wal_file(segment_name(1, 40) + ".00000028.backup"),  # the kept backup's own: stays
        wal_file(segment_name(2, 13)),  # another timeline below the cut: goes
        wal_file(segment_name(2, 41)),
        wal_file(segment_name(1, 20), sha="cd" * 32),  # a second copy (divergence): goes with the first
    ]
    plan = plan_expiry(catalog("FIIF", wal=wal), RetentionPolicy(full=1), at(4, 12))
    gone = [w.name for w in plan.expire_wal]
    assert "00000002.history" not in gone and "00000003.history" not in gone
    assert segment_name(1, 12) + ".partial" in gone and segment_name(1, 10) + ".00000028.backup" in gone
    assert segment_name(2, 13) in gone and segment_name(2, 41) not in gone
    assert segment_name(1, 40) + ".00000028.backup" not in gone
    assert gone.count(segment_name(1, 20)) == 2
    assert sorted(w.file.segno for w in plan.expire_wal) == [w.file.segno for w in plan.expire_wal]
    assert {w.file.segno for w in plan.expire_wal} == set(range(10, 40))


def test_nothing_kept_means_no_wal_removed():
    plan = plan_expiry(RetentionCatalog(wal=tuple(segments(1, 5))), RetentionPolicy(full=1), NOW)
    assert plan.removes_nothing and plan.wal_reason == "no backup is kept: all WAL is kept"
    assert plan.notes == ("the vault has no restorable backup: no WAL is removed",)


@pytest.mark.parametrize("n,kept,expired", [(1, ["D4"], ["D3", "D2", "D1"]), (3, ["D2", "D3", "D4"], ["D1"]),
                                            (4, ["D1", "D2", "D3", "D4"], []), (10, ["D1", "D2", "D3", "D4"], [])])
def test_dumps_keep_the_n_newest(n, kept, expired):
    labels = {f"D{d}": at(d, 1).strftime("%Y%m%dT%H%M%SZD") for d in range(1, 5)}
    names = {v: k for k, v in labels.items()}
    plan = plan_expiry(catalog("F", dumps=labels.values()), RetentionPolicy(dumps=n), NOW)
    assert [names[d.label] for d in plan.keep_dumps] == kept
    assert [names[d.label] for d in plan.expire_dumps] == expired
    assert {d.reasons for d in plan.expire_dumps} <= {(f"dumps = {n}: older than the {n} newest dumps",)}
    assert plan.expire_backups == () and plan.expire_wal == ()  # dumps alone never touch backups or WAL


def test_now_must_be_aware():
    with pytest.raises(ValueError, match="timezone-aware"):
        plan_expiry(catalog("F"), RetentionPolicy(full=1), datetime(2026, 11, 7))


# ------------------------------------------------------------------ the oracle: the restore planner


def _snapshot(backups: list[BackupInfo], wal) -> CatalogSnapshot:
    by_label = {b.label: b for b in backups}
    points = []
    for b in backups:
        chain, current = [], b.label
        while current is not None and current in by_label:
            chain.append(current)
            current = by_label[current].parent
        if current is not None:
            continue  # broken: the catalog leaves it out
        points.append(BackupPoint(label=b.label, timeline=1, start_lsn=b.start_lsn,
                                  stop_lsn=b.start_lsn + SEG + 0x100, start_time=b.stop_time - timedelta(minutes=30),
                                  stop_time=b.stop_time, bytes_stored=1, chain=tuple(reversed(chain))))
    return CatalogSnapshot(backups=tuple(points), wal=tuple(wal))


def _reachable(snapshot: CatalogSnapshot, target: Target) -> bool:
    from pgvault.errors import PlanError

    try:
        plan_restore(snapshot, target, timeline=1)
    except PlanError:
        return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_whatever_the_policy_keeps_restorable_stays_restorable(seed):
    """Random vaults and policies: the plan keeps chains whole, cuts WAL only below every kept backup, and every
    point of the window the planner could reach before, it reaches after (the planner is the oracle)."""
    rnd = random.Random(seed)
    spec = "F" + "".join(rnd.choice("FII") for _ in range(rnd.randint(2, 11)))
    skip = (rnd.randint(2, len(spec)),) if rnd.random() < 0.2 else ()
    cat = catalog(spec, skip=skip)
    policy = RetentionPolicy(full=rnd.choice([None, 1, 2, 3]), window=rnd.choice([None, "1h", "30h", "3d", "6d"]))
    now = at(len(spec), rnd.uniform(3, 30))
    plan = plan_expiry(cat, policy, now)

    labels = {b.label for b in cat.backups}
    kept = {d.label for d in plan.keep_backups}
    gone = {d.label for d in plan.expire_backups}
    assert kept | gone == labels and not kept & gone
    parents = {b.label: b.parent for b in cat.backups}
    for label in kept:  # closed under "built on"
        assert parents[label] is None or parents[label] in kept
    if not policy.governs_backups:
        assert not gone and not plan.expire_wal
        return
    starts = [b.start_lsn // SEG for b in cat.backups if b.label in kept]
    assert {w.file.segno for w in plan.expire_wal} == set(range(10, min(starts)))

    before = _snapshot(list(cat.backups), cat.wal)
    after = _snapshot([b for b in cat.backups if b.label in kept], [w for w in cat.wal if w not in plan.expire_wal])
    newest = max(before.backups, key=lambda b: b.stop_time)
    assert newest.label in kept
    if policy.full is not None:
        fulls = sorted(b.label for b in before.backups if len(b.chain) == 1)
        assert set(fulls[-policy.full:]) <= kept
    if plan.window_start is not None:
        end = segment_time(10 * len(spec) + 5)
        moment = plan.window_start
        while moment <= end:
            target = Target(kind="time", time=moment)
            if _reachable(before, target):
                assert _reachable(after, target), f"{moment} is no longer restorable"
            moment += timedelta(hours=3)
