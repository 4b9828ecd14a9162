"""`pgvault verify`: read the chosen backups back from the vault and check every object and the WAL chain.

For each backup: its manifest and files.jsonl are read and checked (every
file's blocks covered exactly once by its sources, which lie in the backup's
own chain); then every object the backup reads — its own and, for an
incremental, its chain's — is streamed in full through the object format:
authenticated decryption, decompression, its length and its plaintext
SHA-256 against the value files.jsonl records (and long enough for the
blocks files.jsonl places in it). An object several backups share is read
once. Dumps are checked the same way against their records.

WAL: from the segment where each backup starts to the last segment archived
on its timeline's path (the newest timeline whose history contains the
backup), every segment must be archived, once; a missing one is a gap, named.
The WAL chain is checked from the listing; ``read_wal`` reads each of its
segments too.

Nothing stops at the first problem: the report names every bad object.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pgvault import codec
from pgvault import dump as dumps_mod
from pgvault.backup import layout
from pgvault.backup.errors import BackupNotFoundError
from pgvault.backup.manifest import (
    Manifest,
    SpooledFiles,
    block_count,
    check_coverage,
    committed_labels,
    read_manifest,
)
from pgvault.catalog import ArchivedWal, list_archived_wal
from pgvault.errors import ObjectNotFoundError, PgvaultError
from pgvault.storage import Storage
from pgvault.vault import VaultRecord
from pgvault.wal import (
    HistoryEntry,
    lsn_to_prev_segno,
    lsn_to_segno,
    parse_history,
    segment_name,
    timeline_of_segment,
)

READ_CHUNK = 1 << 20


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Problem:
    """One thing wrong: what it concerns (``backup LABEL``, ``dump LABEL``), the object (if one) and what."""

    subject: str
    object: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "object": self.object, "message": self.message}


@dataclass(frozen=True)
class WalChain:
    """The archived WAL a backup's restores replay: ``first`` (its start segment) .. ``last`` on ``timeline``'s path."""

    timeline: int
    first: str
    consistent: str  # the segment holding the backup's consistency point
    last: str  # the last segment archived on the path (``consistent`` if none is archived after it)
    segments: int  # archived, from first to last
    gaps: tuple[tuple[str, str], ...]  # inclusive ranges of missing segments
    conflicts: tuple[str, ...]  # segments archived twice with different content
    files: tuple[ArchivedWal, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline, "first": self.first, "consistent": self.consistent, "last": self.last,
                "segments": self.segments, "gaps": [{"from": a, "to": b} for a, b in self.gaps],
                "conflicts": list(self.conflicts)}


@dataclass(frozen=True)
class ItemReport:
    """One backup or dump: the objects read for it and its problems."""

    label: str
    kind: str  # "full", "incr" or "dump"
    objects: int
    bytes: int  # stored bytes of its objects
    problems: tuple[Problem, ...]
    wal: WalChain | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "ok": self.ok, "objects": self.objects, "bytes": self.bytes,
                "problems": [p.to_dict() for p in self.problems],
                "wal": self.wal.to_dict() if self.wal is not None else None}


@dataclass(frozen=True)
class VerifyReport:
    items: tuple[ItemReport, ...]
    problems: tuple[Problem, ...]  # every problem, also those of no single item (a history file)
    objects_read: int
    bytes_read: int  # stored bytes streamed from the vault
    wal_read: int  # WAL files read (``read_wal``)
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "items": [i.to_dict() for i in self.items],
                "problems": [p.to_dict() for p in self.problems], "objects_read": self.objects_read,
                "bytes_read": self.bytes_read, "wal_read": self.wal_read, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class VerifyProgress:
    bytes_done: int
    bytes_total: int
    objects_done: int
    objects_total: int


# ------------------------------------------------------------------ the WAL chain (pure)


def path_timeline(timeline: int, stop_lsn: int, histories: Mapping[int, Sequence[HistoryEntry]]) -> int:
    """The newest timeline whose history holds a backup of ``timeline`` consistent at ``stop_lsn``.

    Recovery onto it passes through the backup (PostgreSQL's own test: the
    byte before the consistency point lies on the backup's timeline).
    """
    best = timeline
    for tli, history in histories.items():
        if tli <= best:
            continue
        path = [e.parent_timeline for e in history]
        if timeline not in path:
            continue
        left_at = next(e.switch_lsn for e in history if e.parent_timeline == timeline)
        if stop_lsn - 1 < left_at:
            best = tli
    return best


def wal_chain(wal: Iterable[ArchivedWal], *, timeline: int, start_lsn: int, stop_lsn: int,
              histories: Mapping[int, Sequence[HistoryEntry]], segment_size: int) -> WalChain:
    """The archived WAL from a backup's start to the end of its timeline's path, with its gaps; pure."""
    target = path_timeline(timeline, stop_lsn, histories)
    history = tuple(histories.get(target, ())) if target > 1 else ()
    copies: dict[tuple[int, int], dict[str, ArchivedWal]] = {}
    for entry in wal:
        if entry.file.kind == "segment" and entry.file.segno is not None:
            copies.setdefault((entry.timeline, entry.file.segno), {})[entry.sha256] = entry

    def owner(segno: int) -> int:
        return timeline_of_segment(segno, target, history, segment_size=segment_size)

    def name(segno: int) -> str:
        return segment_name(owner(segno), segno, segment_size=segment_size)

    first = lsn_to_segno(start_lsn, segment_size=segment_size)
    consistent = lsn_to_prev_segno(stop_lsn, segment_size=segment_size)
    on_path = sorted(s for (tli, s) in copies if s >= first and owner(s) == tli)
    last = max([consistent, *on_path[-1:]])
    gaps: list[tuple[str, str]] = []
    conflicts: list[str] = []
    files: list[ArchivedWal] = []
    missing_from: int | None = None
    for segno in range(first, last + 1):
        found = copies.get((owner(segno), segno))
        if found is None:
            missing_from = segno if missing_from is None else missing_from
            continue
        if missing_from is not None:
            gaps.append((name(missing_from), name(segno - 1)))
            missing_from = None
        if len(found) > 1:
            conflicts.append(name(segno))
        files.extend(found.values())
    if missing_from is not None:
        gaps.append((name(missing_from), name(last)))
    return WalChain(timeline=target, first=name(first), consistent=name(consistent), last=name(last),
                    segments=len({(w.timeline, w.file.segno) for w in files}), gaps=tuple(gaps),
                    conflicts=tuple(conflicts), files=tuple(files))


# ------------------------------------------------------------------ reading


class _Counted:
    """A source stream that reports how many bytes were read from it."""

    def __init__(self, raw, on_read: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._on_read(len(data))
        return data


@dataclass
class _Wanted:
    """An object to read: its expected plaintext checksum, the plaintext length files.jsonl needs, who reads it."""

    sha256: str
    needed: int = 0
    readers: list[str] = field(default_factory=list)


class _Verifier:
    def __init__(self, storage: Storage, *, record: VaultRecord, keyring, parallel: int, tmp_dir: str,
                 progress: Callable[[VerifyProgress], None] | None) -> None:
        self.storage = storage
        self.tmp_dir = tmp_dir
        self.record = record
        self.keyring = keyring
        self.require = record.encryption_key_id is not None
        self.parallel = max(1, parallel)
        self.progress = progress
        self.problems: dict[str, list[Problem]] = {}  # subject -> problems
        self.wanted: dict[str, _Wanted] = {}
        self.item_objects: dict[str, set[str]] = {}

    def problem(self, subject: str, message: str, obj: str | None = None) -> None:
        self.problems.setdefault(subject, []).append(Problem(subject, obj, message))

    def want(self, subject: str, key: str, sha256: str, *, needed: int = 0) -> None:
        self.item_objects.setdefault(subject, set()).add(key)
        wanted = self.wanted.get(key)
        if wanted is None:
            wanted = self.wanted[key] = _Wanted(sha256)
        elif wanted.sha256 != sha256:
            self.problem(subject, f"object {key} is recorded with checksum {sha256}, but elsewhere with "
                                  f"{wanted.sha256}", key)
            return
        wanted.needed = max(wanted.needed, needed)
        if subject not in wanted.readers:
            wanted.readers.append(subject)

    # -- backups

    def backup(self, label: str, manifests: dict[str, Manifest | None]) -> None:
        subject = f"backup {label}"
        manifest = manifests[label]
        if manifest is None:
            return  # its problem is recorded already
        chain = [label]
        current = manifest.parent
        while current is not None:
            parent = manifests.get(current)
            if current not in manifests or current in chain:
                self.problem(subject, f"its incremental chain is broken: backup {current} is missing, so it "
                                      "cannot be restored")
                break
            chain.append(current)
            if parent is None:
                self.problem(subject, f"backup {current} of its incremental chain cannot be read")
                break
            current = parent.parent
        self.item_objects.setdefault(subject, set())
        try:
            # Verified whole before any line is believed: a damaged list is one problem, not one per line.
            spooled = SpooledFiles(self.storage, manifest, keyring=self.keyring, require_encryption=self.require,
                                   tmp_dir=self.tmp_dir)
        except PgvaultError as exc:
            self.problem(subject, f"files.jsonl cannot be read: {exc.message}", manifest.files_object)
            return
        try:
            for entry in spooled:
                if entry.type != "file":
                    continue
                try:
                    check_coverage(entry, manifest.block_size, where=f"{manifest.files_object}")
                except PgvaultError as exc:
                    self.problem(subject, exc.message, manifest.files_object)
                    continue
                bs = manifest.block_size
                for source in entry.sources:
                    owner = layout.parse_backup_key(source.object)
                    if owner is None or owner.kind != "data" or owner.label not in chain:
                        self.problem(subject, f"{entry.path} reads {source.object}, which is not a data object of "
                                              f"its chain ({' → '.join(reversed(chain))})", manifest.files_object)
                        continue
                    length = sum(min(bs, entry.size - b * bs) for b in source.blocks
                                 if b < block_count(entry.size, bs))
                    self.want(subject, source.object, source.sha256, needed=source.offset + length)
        except PgvaultError as exc:
            self.problem(subject, f"files.jsonl is not valid: {exc.message}", manifest.files_object)
        finally:
            spooled.close()

    # -- dumps

    def dump(self, label: str) -> None:
        subject = f"dump {label}"
        self.item_objects.setdefault(subject, set())
        try:
            rec = dumps_mod.read_dump_record(self.storage, label, keyring=self.keyring,
                                             require_encryption=self.require)
        except PgvaultError as exc:
            self.problem(subject, f"its record cannot be read: {exc.message}", dumps_mod.format_record_key(label))
            return
        self.want(subject, rec.globals.key, rec.globals.sha256, needed=rec.globals.size)
        for db in rec.databases:
            self.want(subject, db.key, db.sha256, needed=db.size)

    # -- objects

    def read_all(self, sizes: Mapping[str, int]) -> tuple[int, int]:
        keys = sorted(self.wanted)
        total = sum(sizes.get(k, 0) for k in keys)
        done = {"bytes": 0, "objects": 0}
        import threading

        lock = threading.Lock()

        def report() -> None:
            if self.progress is not None:
                self.progress(VerifyProgress(done["bytes"], total, done["objects"], len(keys)))

        def counted(n: int) -> None:
            with lock:
                done["bytes"] += n
            report()

        def read_one(key: str) -> None:
            wanted = self.wanted[key]
            try:
                with self.storage.open(key) as raw, codec.decode(
                        _Counted(raw, counted), name=key, keyring=self.keyring, expected_sha256=wanted.sha256,
                        require_encryption=self.require) as decoder:
                    while decoder.read(READ_CHUNK):
                        pass
                    size = decoder.plaintext_size
                if size is not None and size < wanted.needed:
                    raise _Short(f"object {key} holds {size} bytes, but its records place data up to byte "
                                 f"{wanted.needed}")
            except ObjectNotFoundError:
                self._object_problem(key, f"object {key} is missing from the vault")
            except _Short as exc:
                self._object_problem(key, str(exc))
            except PgvaultError as exc:
                self._object_problem(key, exc.message)
            finally:
                with lock:
                    done["objects"] += 1
                report()

        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pgvault-verify") as pool:
            for _ in pool.map(read_one, keys):
                pass
        return len(keys), done["bytes"]

    def _object_problem(self, key: str, message: str) -> None:
        for subject in self.wanted[key].readers:
            self.problem(subject, message, key)


class _Short(Exception):
    pass


def _histories(storage: Storage, wal: Sequence[ArchivedWal], *, keyring, require: bool,
               problem: Callable[[str, str, str], None]) -> dict[int, tuple[HistoryEntry, ...]]:
    histories = {}
    for entry in wal:
        if entry.file.kind != "history":
            continue
        try:
            with storage.open(entry.key) as f:
                text = codec.decode_bytes(f.read(), name=entry.key, keyring=keyring, expected_sha256=entry.sha256,
                                          require_encryption=require)
            histories[entry.timeline] = tuple(parse_history(text.decode(), source=entry.name))
        except (PgvaultError, UnicodeDecodeError) as exc:
            problem("WAL", f"history file {entry.name} cannot be read: {exc}", entry.key)
    return histories


def verify_backups(
    storage: Storage,
    *,
    record: VaultRecord,
    keyring,
    labels: Sequence[str] | None = None,
    parallel: int = 2,
    read_wal: bool = False,
    progress: Callable[[VerifyProgress], None] | None = None,
    tmp_dir: str | None = None,
) -> VerifyReport:
    """Verify the backups and dumps named by ``labels`` (default: all of them); see the module docstring.

    ``tmp_dir`` (default: the system's) holds each files.jsonl while it is checked.

    Raises BackupNotFoundError for a label the vault has no committed backup or
    dump of; every other problem is in the report.
    """
    started = time.monotonic()
    v = _Verifier(storage, record=record, keyring=keyring, parallel=parallel, progress=progress,
                  tmp_dir=tmp_dir or tempfile.gettempdir())
    backup_labels = committed_labels(storage)
    dump_labels = dumps_mod.committed_labels(storage)
    if labels is None:
        chosen_backups, chosen_dumps = list(backup_labels), list(dump_labels)
    else:
        unknown = [lbl for lbl in labels if lbl not in backup_labels and lbl not in dump_labels]
        if unknown:
            have = ", ".join(backup_labels + dump_labels) or "none"
            raise BackupNotFoundError(f"there is no backup or dump {unknown[0]} in {storage.description}; "
                                      f"the vault has: {have}", hint="`pgvault list` shows the backups and dumps")
        chosen_backups = [lbl for lbl in backup_labels if lbl in labels]
        chosen_dumps = [lbl for lbl in dump_labels if lbl in labels]

    manifests: dict[str, Manifest | None] = {}
    for label in backup_labels:
        try:
            manifests[label] = read_manifest(storage, label, keyring, require_encryption=v.require)
        except PgvaultError as exc:
            manifests[label] = None
            if label in chosen_backups:
                v.problem(f"backup {label}", f"its manifest cannot be read: {exc.message}", layout.manifest_key(label))
    for label in chosen_backups:
        v.backup(label, manifests)
    for label in chosen_dumps:
        v.dump(label)

    wal = list_archived_wal(storage, segment_size=record.wal_segment_size)
    histories = _histories(storage, wal, keyring=keyring, require=v.require, problem=v.problem)
    chains: dict[str, WalChain] = {}
    for label in chosen_backups:
        m = manifests[label]
        if m is None:
            continue
        subject = f"backup {label}"
        if m.timeline > 1 and m.timeline not in histories:
            v.problem(subject, f"timeline {m.timeline} has no readable history file in the vault")
        try:
            chain = wal_chain(wal, timeline=m.timeline, start_lsn=m.start_lsn, stop_lsn=m.stop_lsn,
                              histories=histories, segment_size=record.wal_segment_size)
        except PgvaultError as exc:
            v.problem(subject, f"its WAL chain cannot be followed: {exc.message}")
            continue
        chains[label] = chain
        for a, b in chain.gaps:
            what = f"segment {a} is missing" if a == b else f"segments {a} .. {b} are missing"
            v.problem(subject, f"gap in its WAL on timeline {chain.timeline}: {what}", a)
        for name in chain.conflicts:
            v.problem(subject, f"WAL segment {name} is archived twice with different content", name)
        if read_wal:
            for w in chain.files:
                v.want(f"WAL of backup {label}", w.key, w.sha256)

    sizes = {}
    for prefix in (layout.BACKUPS_PREFIX, dumps_mod.DUMPS_PREFIX):
        sizes.update({info.key: info.size for info in storage.list(prefix)})
    if read_wal:
        sizes.update({w.key: w.size for w in wal})  # plaintext size: close enough for a progress bar
    objects_read, bytes_read = v.read_all(sizes)

    items = []
    for label in chosen_backups:
        subject = f"backup {label}"
        m = manifests[label]
        problems = v.problems.get(subject, []) + v.problems.get(f"WAL of {subject}", [])
        keys = v.item_objects.get(subject, set())
        extra = [layout.manifest_key(label)] + ([m.files_object] if m is not None else [])
        items.append(ItemReport(label=label, kind=m.type if m is not None else "?", objects=len(keys) + len(extra),
                                bytes=sum(sizes.get(k, 0) for k in (*keys, *extra)), problems=tuple(problems),
                                wal=chains.get(label)))
    for label in chosen_dumps:
        subject = f"dump {label}"
        keys = v.item_objects.get(subject, set()) | {dumps_mod.format_record_key(label)}
        items.append(ItemReport(label=label, kind="dump", objects=len(keys),
                                bytes=sum(sizes.get(k, 0) for k in keys), problems=tuple(v.problems.get(subject, []))))
    every = tuple(p for problems in v.problems.values() for p in problems)
    wal_read = sum(1 for k in v.wanted if k.startswith("wal/"))
    return VerifyReport(items=tuple(items), problems=every, objects_read=objects_read - wal_read,
                        bytes_read=bytes_read, wal_read=wal_read, seconds=time.monotonic() - started)


# ------------------------------------------------------------------ output


def format_report(report: VerifyReport) -> str:
    from pgvault.progressbar import format_bytes

    lines = []
    for item in report.items:
        mark = "✓" if item.ok else "✗"
        what = "dump" if item.kind == "dump" else f"backup ({item.kind})"
        line = f"{mark} {what} {item.label}: {item.objects} objects, {format_bytes(item.bytes)}"
        if item.wal is not None:
            w = item.wal
            line += (f"; WAL on timeline {w.timeline}: {w.first} .. {w.last}, {w.segments} segments"
                     + (f", {len(w.gaps)} gap{'s' if len(w.gaps) != 1 else ''}" if w.gaps else ""))
        lines.append(line)
        lines.extend(f"    {p.message}" for p in item.problems)
    subjects = {f"backup {i.label}" for i in report.items} | {f"dump {i.label}" for i in report.items}
    subjects |= {f"WAL of backup {i.label}" for i in report.items}
    for p in report.problems:
        if p.subject not in subjects:
            lines.append(f"✗ {p}")
    if not report.items:
        lines.append("nothing to verify: the vault has no backups or dumps")
    wal = f" and {report.wal_read} WAL files" if report.wal_read else ""
    summary = (f"read {report.objects_read} objects{wal}, {format_bytes(report.bytes_read)}, "
               f"in {report.seconds:.1f} s: ")
    summary += "no problems" if report.ok else f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}"
    lines.append(summary)
    return "\n".join(lines)
