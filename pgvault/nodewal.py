"""A node's own WAL beyond the fork point: found in its pg_wal (or the copies it archived), read, kept.

The node's timeline path comes from its pg_control (``pg_controldata``) and the
history files in its pg_wal; :func:`pgvault.divergence.fork_point` tells where it
parts from the primary's. The segments from there on are gathered into a work
directory (links to pg_wal, or verified copies of what the node had archived),
read with ``pg_waldump`` — PostgreSQL's own reader, which checks every record's
CRC and page address, so recycled segments past the end never count — and the
ones holding the tail are stored under ``orphans/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pgvault import pg
from pgvault.archive import file_sha256, write_verified
from pgvault.catalog import ArchivedWal
from pgvault.divergence import (
    ControlData,
    TailSummary,
    fork_point,
    parse_controldata,
    summarize_waldump,
    tail_stretches,
)
from pgvault.errors import OrphanError, PgvaultError, ReseedError
from pgvault.orphans import (
    OrphanRecord,
    SegmentSource,
    find_same_tail,
    format_orphan_id,
    list_orphans,
    now_utc,
    store_orphan,
)
from pgvault.standby import PrimaryInfo
from pgvault.storage import Storage
from pgvault.vault import VaultRecord
from pgvault.wal import (
    HistoryEntry,
    format_lsn,
    history_file_name,
    lsn_to_segno,
    parse_history,
    parse_wal_file_name,
    segment_name,
)

# --- the node --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeState:
    control: ControlData
    timeline: int  # the newest timeline the node knows (pg_control, its history files)
    history: tuple[HistoryEntry, ...]


def pg_tool(name: str, *, bin_dir: str | None, major: int) -> str:
    path = pg.find_program(name, bin_dir=bin_dir, major=major)
    if path is not None:
        return path
    raise ReseedError(f"no {name} of PostgreSQL {major} found",
                      hint=f"install PostgreSQL {major}, or set [postgres] bin_dir to its bin directory")


def _c_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


def read_control(data_dir: str, *, controldata: str) -> ControlData:
    done = subprocess.run([controldata, "-D", data_dir], check=False, capture_output=True, text=True, timeout=60, env=_c_env())
    if done.returncode != 0:
        raise ReseedError(f"pg_controldata cannot read {data_dir}: {done.stderr.strip()}")
    return parse_controldata(done.stdout, source=f"pg_controldata -D {data_dir}")


def inspect_node(data_dir: str, control: ControlData, *,
                 vault_histories: dict[int, tuple[HistoryEntry, ...]]) -> NodeState:
    """The node's timeline path: its newest timeline (pg_control or a history file in pg_wal) and that one's history."""
    wal_dir = os.path.join(data_dir, "pg_wal")
    local = {}
    for name in os.listdir(wal_dir) if os.path.isdir(wal_dir) else ():
        if name.endswith(".history") and len(name) == 16:
            try:
                local[int(name[:8], 16)] = os.path.join(wal_dir, name)
            except ValueError:
                continue
    timeline = max([control.timeline, control.min_recovery_timeline, *local])
    if timeline == 1:
        return NodeState(control, 1, ())
    if timeline in local:
        with open(local[timeline]) as f:
            history = tuple(parse_history(f.read(), source=local[timeline]))
    elif timeline in vault_histories:
        history = tuple(vault_histories[timeline])
    else:
        raise OrphanError(f"{data_dir} is on timeline {timeline}, but neither its pg_wal nor the vault holds "
                          f"{history_file_name(timeline)}: where it forked cannot be told",
                          hint="put the history file back in pg_wal (or archive it) and run reseed again")
    return NodeState(control, timeline, history)


# --- the diverged tail ---------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    node_timeline: int
    fork_lsn: int | None  # None: the node never parted from the primary's timeline path
    fork_timeline: int | None  # the node's timeline at the fork point
    summary: TailSummary | None
    segments: tuple[SegmentSource, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def diverged(self) -> bool:
        return self.summary is not None and self.summary.records > 0


def _segments_available(wal_dir: str, archived_wal: Sequence[ArchivedWal], *, timeline: int, first: int,
                        segment_size: int) -> tuple[dict[int, str], dict[int, ArchivedWal]]:
    """Segments of ``timeline`` from ``first`` on: in pg_wal (segno → path) and archived (segno → ArchivedWal)."""
    local = {}
    for name in os.listdir(wal_dir) if os.path.isdir(wal_dir) else ():
        if len(name) != 24:
            continue
        try:
            wal = parse_wal_file_name(name, segment_size=segment_size)
        except PgvaultError:
            continue
        if wal.kind == "segment" and wal.timeline == timeline and wal.segno >= first:
            local[wal.segno] = os.path.join(wal_dir, name)
    archived = {}
    for entry in archived_wal:
        if entry.file.kind == "segment" and entry.timeline == timeline and entry.file.segno >= first:
            archived.setdefault(entry.file.segno, entry)
    return local, archived


def _waldump(waldump: str, directory: str, *, timeline: int, start: int, end: int | None) -> TailSummary:
    cmd = [waldump, "-p", directory, "-t", str(timeline), "-s", format_lsn(start)]
    if end is not None:
        cmd += ["-e", format_lsn(end)]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_c_env())
        assert proc.stdout is not None
        summary = summarize_waldump(proc.stdout, stderr="")
        proc.wait()
        err.seek(0)
        stderr = err.read()
    tail = summarize_waldump([], stderr=stderr)
    summary = replace(summary, end_lsn=tail.end_lsn)
    if summary.records == 0 and "could not find a valid record" not in stderr and stderr.strip():
        # nothing read, and not because there is nothing: a file is missing or unreadable
        raise OrphanError(f"pg_waldump could not read the node's WAL from {format_lsn(start)} on timeline "
                          f"{timeline}: {stderr.strip().splitlines()[-1]}")
    return summary


def find_tail(data_dir: str, node: NodeState, *, primary: PrimaryInfo, waldump: str, workdir: str,
              storage: Storage, archived_wal: Sequence[ArchivedWal], record: VaultRecord, keyring) -> Divergence:
    """Where the node parted from the primary, and the WAL it holds beyond (files gathered into ``workdir``).

    ``archived_wal`` is the vault's WAL index (the loaded catalog's): the copies the node had archived.
    """
    fork = fork_point(node.timeline, node.history, primary.timeline, primary.history)
    same_timeline = fork is None and node.timeline == primary.timeline
    if same_timeline:
        # Never expected (a promotion always starts a timeline), but checked all the same: a node on the
        # primary's own timeline with WAL past the primary's flush position wrote what the primary never had.
        # Only its pg_wal counts here: the vault's copies of this timeline are the primary's.
        fork = primary.lsn
    if fork is None:
        return Divergence(node.timeline, None, None, None)
    size = record.wal_segment_size
    wal_dir = os.path.join(data_dir, "pg_wal")
    summary = TailSummary()
    sources: list[SegmentSource] = []
    missing: list[str] = []
    stretches = tail_stretches(node.timeline, node.history, fork)
    fork_timeline = stretches[0][0]
    for tli, start, end in stretches:
        first = lsn_to_segno(start, segment_size=size)
        # same timeline: the vault's copies of it are the primary's, not the node's
        local, archived = _segments_available(wal_dir, () if same_timeline else archived_wal, timeline=tli,
                                              first=first, segment_size=size)
        last_known = max([*local, *archived], default=first - 1)
        if end is not None:
            last_known = min(last_known, lsn_to_segno(max(end - 1, start), segment_size=size))
        if first not in local and first not in archived:
            if tli == fork_timeline and node.control.timeline == tli and node.control.checkpoint_lsn >= start:
                raise OrphanError(f"the node's checkpoint ({format_lsn(node.control.checkpoint_lsn)}) is past the fork "
                                  f"point {format_lsn(fork)}, but {segment_name(tli, first, segment_size=size)} is "
                                  f"neither in its pg_wal nor in the vault: its diverged WAL cannot be read")
            break  # the node holds nothing of this stretch: it never wrote past the fork here
        staged = {}
        for segno in range(first, last_known + 1):
            name = segment_name(tli, segno, segment_size=size)
            path = os.path.join(workdir, name)
            if segno in local:
                os.symlink(local[segno], path)
                staged[segno] = SegmentSource(name, local[segno], "pg_wal")
            elif segno in archived:
                write_verified(storage, archived[segno], path, keyring=keyring,
                               require_encryption=record.encryption_key_id is not None)
                staged[segno] = SegmentSource(name, path, "vault")
            else:
                missing.append(name)
                break  # pg_waldump stops at a gap; what lies beyond it is kept below all the same
        part = _waldump(waldump, workdir, timeline=tli, start=start, end=end)
        if part.records == 0:
            break
        summary = summary.merge(part)
        stop = part.end_lsn if part.end_lsn is not None else part.last_lsn
        last_needed = lsn_to_segno(stop, segment_size=size) if stop is not None else first
        # keep the segments holding the tail; files beyond its end are recycled ones PostgreSQL had not reused yet
        sources += [s for segno, s in sorted(staged.items()) if segno <= last_needed]
        if missing:
            sources += [SegmentSource(segment_name(tli, segno, segment_size=size), local[segno], "pg_wal")
                        for segno in sorted(local) if segno > last_needed]
    if not summary.records:
        if same_timeline:  # as expected: nothing past the primary's position, and no fork to speak of
            return Divergence(node.timeline, None, None, None)
        return Divergence(node.timeline, fork, fork_timeline, summary)
    return Divergence(node.timeline, fork, fork_timeline, summary, tuple(sources), tuple(missing))


def keep_tail(divergence: Divergence, *, data_dir: str, node: NodeState, primary: PrimaryInfo, storage: Storage,
              options, keyring, require_encryption: bool,
              notify: Callable[[str], None]) -> tuple[OrphanRecord, bool]:
    """Store the tail under orphans/ (or find it already there); (record, newly stored)."""
    assert divergence.diverged and divergence.summary is not None and divergence.fork_lsn is not None
    contents = {s.name: file_sha256(s.path)[0] for s in divergence.segments}
    existing = find_same_tail(list_orphans(storage, keyring=keyring, require_encryption=require_encryption),
                              system_identifier=node.control.system_identifier,
                              fork_timeline=divergence.fork_timeline or 0, fork_lsn=divergence.fork_lsn,
                              segments=contents)
    if existing is not None:
        return existing, False
    s = divergence.summary
    captured = now_utc()
    record = OrphanRecord(
        id=format_orphan_id(captured, divergence.fork_timeline or 0), captured_at=captured.isoformat(),
        host=socket.gethostname(), data_dir=data_dir, system_identifier=str(node.control.system_identifier),
        node_timeline=node.timeline, fork_timeline=divergence.fork_timeline or 0,
        primary_timeline=primary.timeline, fork_lsn=format_lsn(divergence.fork_lsn),
        end_lsn=format_lsn(s.end_lsn) if s.end_lsn is not None else None,
        last_record_lsn=format_lsn(s.last_lsn) if s.last_lsn is not None else None,
        records=s.records, commits=s.commits, aborts=s.aborts,
        first_commit_time=s.first_commit_time.isoformat() if s.first_commit_time else None,
        last_commit_time=s.last_commit_time.isoformat() if s.last_commit_time else None,
        segments=(), missing=divergence.missing,
        notes=(("pg_waldump stopped at a missing segment: the commits are counted up to it",)
               if divergence.missing else ()),
    )
    try:
        return store_orphan(storage, record, list(divergence.segments), options=options, notify=notify), True
    except PgvaultError as exc:
        raise OrphanError(f"the node's diverged WAL could not be kept in the vault, so nothing was changed: "
                          f"{exc.message}", hint=exc.hint) from None
