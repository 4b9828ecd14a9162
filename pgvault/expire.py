"""`pgvault expire`: carry out the retention plan on a vault, in an order a crash cannot hurt.

Under the backup lock (no backup or dump runs meanwhile, and none starts):

1. read the catalog and plan (:func:`pgvault.retention.plan_expiry`);
2. refuse if a kept incremental reads an object of a backup the plan removes
   (it never should: the plan keeps every chain whole — this is the proof);
3. remove each expired backup, newest first: its manifest (the commit
   record) first, so it is no longer listed and nothing plans from it, then
   files.jsonl and its data objects. Interrupted after the manifest, what is
   left is a leftover, collected by the next expire or backup;
4. the same for dumps: the record first, then the dump files;
5. the leftovers of interrupted backups and dumps found at the start;
6. WAL last, oldest first: what remains is always one unbroken stretch, and
   an interruption before this step only leaves WAL that is no longer needed.

``dry_run`` does all the reading and no writing (not even the lock); it then
leaves alone the objects of a backup or dump that holds the lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgvault import dump as dumps_mod
from pgvault.backup import layout
from pgvault.backup.leftovers import find_leftovers
from pgvault.backup.lock import BackupLock, read_holder
from pgvault.backup.manifest import iter_files, list_backups
from pgvault.catalog import list_archived_wal
from pgvault.errors import ExpireError
from pgvault.progressbar import format_bytes
from pgvault.retention import (
    BackupInfo,
    Decision,
    ExpiryPlan,
    RetentionCatalog,
    RetentionPolicy,
    describe_plan,
    plan_expiry,
)
from pgvault.storage import Storage
from pgvault.vault import VaultRecord

WAL_NOTIFY_EVERY = 1000


@dataclass(frozen=True)
class Removal:
    """One backup, dump or leftover and its objects (in the order they are deleted)."""

    label: str
    kind: str  # "full", "incr", "dump", "backup leftovers", "dump leftovers"
    reasons: tuple[str, ...]
    keys: tuple[str, ...]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "reasons": list(self.reasons),
                "objects": len(self.keys), "bytes": self.bytes}


@dataclass(frozen=True)
class ExpireResult:
    plan: ExpiryPlan
    dry_run: bool
    backups: tuple[Removal, ...]
    dumps: tuple[Removal, ...]
    leftovers: tuple[Removal, ...]
    wal_files: int
    wal_bytes: int
    notices: tuple[str, ...]
    seconds: float

    @property
    def removed_anything(self) -> bool:
        return bool(self.backups or self.dumps or self.leftovers or self.wal_files)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in (*self.backups, *self.dumps, *self.leftovers)) + self.wal_bytes

    def to_dict(self) -> dict[str, Any]:
        plan = describe_plan(self.plan)
        return {
            "dry_run": self.dry_run,
            "policy": plan["policy"],
            "now": plan["now"],
            "window_start": plan["window_start"],
            "backups": {"expire": [r.to_dict() for r in self.backups], "keep": plan["backups"]["keep"]},
            "dumps": {"expire": [r.to_dict() for r in self.dumps], "keep": plan["dumps"]["keep"]},
            "leftovers": [r.to_dict() for r in self.leftovers],
            "wal": plan["wal"],
            "bytes": self.bytes,
            "notes": plan["notes"],
            "notices": list(self.notices),
            "seconds": round(self.seconds, 3),
        }


def load_retention_catalog(storage: Storage, *, record: VaultRecord, keyring) -> RetentionCatalog:
    """The vault as retention sees it: every committed backup (an unreadable manifest is an error), dumps, WAL."""
    manifests = list_backups(storage, keyring, require_encryption=record.encryption_key_id is not None)
    return RetentionCatalog(
        backups=tuple(BackupInfo(label=m.label, parent=m.parent, timeline=m.timeline, start_lsn=m.start_lsn,
                                 stop_time=m.stop_time) for m in manifests),
        dumps=tuple(dumps_mod.committed_labels(storage)),
        wal=tuple(list_archived_wal(storage, segment_size=record.wal_segment_size)),
        segment_size=record.wal_segment_size,
    )


def lock_label(now: datetime) -> str:
    """What the backup lock says this job is (a backup or dump waiting on it names it)."""
    return "expire-" + now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_expire(
    storage: Storage,
    *,
    record: VaultRecord,
    keyring,
    policy: RetentionPolicy,
    lock_dir: str,
    now: datetime | None = None,
    dry_run: bool = False,
    notify: Callable[[str], None] | None = None,
) -> ExpireResult:
    """Plan expiry at ``now`` (default: the current time) and carry it out, unless ``dry_run``.

    Raises BackupInProgressError when a backup or dump holds the lock, and
    ExpireError when the plan would remove an object a kept backup reads.
    """
    started = time.monotonic()
    now = now or datetime.now(UTC)
    notices: list[str] = []

    def tell(message: str) -> None:  # progress: the result lists the removals anyway
        if notify is not None:
            notify(message)

    def say(message: str) -> None:  # a notice: kept in the result too
        notices.append(message)
        tell(message)

    lock = None if dry_run else BackupLock(storage, label=lock_label(now), lock_dir=lock_dir)
    if lock is not None:
        for notice in lock.acquire():
            say(notice)
    try:
        catalog = load_retention_catalog(storage, record=record, keyring=keyring)
        plan = plan_expiry(catalog, policy, now)
        busy = None
        if dry_run:
            holder = read_holder(storage)
            busy = holder.label if holder is not None else None
            if busy is not None:
                say(f"{holder.describe()} holds the lock: its objects are not leftovers")
        leftovers = _leftovers(storage, busy=busy)
        _check_kept_chains(storage, plan, record=record, keyring=keyring)
        backups = tuple(_backup_removal(storage, d) for d in plan.expire_backups)
        dumps = tuple(_dump_removal(storage, d) for d in plan.expire_dumps)
        if not dry_run:
            for removal in (*backups, *dumps, *leftovers):
                for key in removal.keys:
                    storage.delete(key)
                what = "backup" if removal.kind in ("full", "incr") else removal.kind
                tell(f"removed {what} {removal.label}: {_objects(len(removal.keys))}, {format_bytes(removal.bytes)}")
            for number, wal in enumerate(plan.expire_wal, start=1):
                storage.delete(wal.key)
                if number % WAL_NOTIFY_EVERY == 0:
                    tell(f"removed {number} of {len(plan.expire_wal)} WAL files")
            if plan.expire_wal:
                tell(f"removed {len(plan.expire_wal)} WAL files ({plan.expire_wal[0].name} .. "
                     f"{plan.expire_wal[-1].name}), {format_bytes(plan.expire_wal_bytes)}")
    finally:
        if lock is not None:
            lock.release()
    return ExpireResult(plan=plan, dry_run=dry_run, backups=backups, dumps=dumps, leftovers=leftovers,
                        wal_files=len(plan.expire_wal), wal_bytes=plan.expire_wal_bytes, notices=tuple(notices),
                        seconds=time.monotonic() - started)


def _sizes(storage: Storage, prefix: str) -> dict[str, int]:
    return {info.key: info.size for info in storage.list(prefix)}


def _ordered(infos: dict[str, int], first: list[str]) -> tuple[str, ...]:
    """The keys with the commit record(s) in ``first`` at the front, the rest after in key order."""
    head = [k for k in first if k in infos]
    return tuple(head + sorted(k for k in infos if k not in head))


def _backup_removal(storage: Storage, decision: Decision) -> Removal:
    label = decision.label
    sizes = {k: s for k, s in _sizes(storage, layout.backup_prefix(label)).items()
             if layout.parse_backup_key(k) is not None}
    keys = _ordered(sizes, [layout.manifest_key(label), layout.files_key(label)])
    return Removal(label, decision.kind, decision.reasons, keys, sum(sizes.values()))


def _dump_removal(storage: Storage, decision: Decision) -> Removal:
    label = decision.label
    sizes = {k: s for k, s in _sizes(storage, f"{dumps_mod.DUMPS_PREFIX}{label}/").items()
             if dumps_mod.parse_dump_key(k) is not None}
    keys = _ordered(sizes, [dumps_mod.format_record_key(label)])
    return Removal(label, "dump", decision.reasons, keys, sum(sizes.values()))


def _leftovers(storage: Storage, *, busy: str | None) -> tuple[Removal, ...]:
    """The objects of interrupted backups and dumps (no manifest / no record), except the lock holder's."""
    out = [Removal(left.label, "backup leftovers", ("an interrupted backup: it has no manifest",),
                   left.keys, left.bytes)
           for left in find_leftovers(storage) if left.label != busy]
    for label, keys in dumps_mod.find_leftovers(storage).items():
        if label == busy:
            continue
        sizes = _sizes(storage, f"{dumps_mod.DUMPS_PREFIX}{label}/")
        out.append(Removal(label, "dump leftovers", ("an interrupted dump: it has no record",), tuple(keys),
                           sum(sizes.get(k, 0) for k in keys)))
    return tuple(out)


def _check_kept_chains(storage: Storage, plan: ExpiryPlan, *, record: VaultRecord, keyring) -> None:
    """Refuse a plan that would remove an object some kept incremental backup reads."""
    if not plan.expire_backups:
        return
    from pgvault.backup.manifest import read_manifest

    doomed = {d.label for d in plan.expire_backups}
    require = record.encryption_key_id is not None
    for kept in plan.keep_backups:
        if kept.kind != "incr":
            continue  # a full backup reads only its own objects
        manifest = read_manifest(storage, kept.label, keyring, require_encryption=require)
        for entry in iter_files(storage, manifest, keyring, require_encryption=require):
            for source in entry.sources:
                owner = layout.parse_backup_key(source.object)
                if owner is not None and owner.label in doomed:
                    raise ExpireError(
                        f"refusing to expire: backup {kept.label} is kept, but its file {entry.path} reads "
                        f"{source.object} of backup {owner.label}, which the plan removes; nothing was removed",
                        hint="this is a bug in pgvault's retention plan; report it with `pgvault list --json`")


# ------------------------------------------------------------------ output


def _objects(n: int) -> str:
    return f"{n} object{'s' if n != 1 else ''}"


def format_expire(result: ExpireResult) -> str:
    """What went (or would go) and why, and what stays, for people."""
    plan = result.plan
    verb = "would remove" if result.dry_run else "removed"
    lines = [f"retention: {plan.policy.describe()}"
             + (f" (window start {describe_plan(plan)['window_start']})" if plan.window_start else "")]
    lines.extend(f"note: {n}" for n in plan.notes)
    # What happened besides the removals listed below (a stale lock removed, a running backup left alone).
    lines.extend(f"note: {n}" for n in result.notices)
    for r in result.backups:
        lines.append(f"{verb} backup {r.label} ({r.kind}): {_objects(len(r.keys))}, {format_bytes(r.bytes)}")
        lines.extend(f"    because {why}" for why in r.reasons)
    for r in result.dumps:
        lines.append(f"{verb} dump {r.label}: {_objects(len(r.keys))}, {format_bytes(r.bytes)}")
        lines.extend(f"    because {why}" for why in r.reasons)
    for r in result.leftovers:
        lines.append(f"{verb} {r.kind} {r.label}: {_objects(len(r.keys))}, {format_bytes(r.bytes)} "
                     f"({r.reasons[0]})")
    if plan.expire_wal:
        wal = plan.expire_wal
        lines.append(f"{verb} {len(wal)} WAL files {wal[0].name} .. {wal[-1].name}, {format_bytes(plan.expire_wal_bytes)}")
        lines.append(f"    because they are {plan.wal_reason}")
    else:
        lines.append(f"WAL: nothing to remove ({plan.wal_reason})" if plan.wal_keep_from is None
                     else f"WAL: nothing to remove (WAL from {plan.wal_keep_from} on is kept)")
    for d in plan.keep_backups:
        lines.append(f"keep backup {d.label} ({d.kind}): {'; '.join(d.reasons)}")
    for d in plan.keep_dumps:
        lines.append(f"keep dump {d.label}: {'; '.join(d.reasons)}")
    if not result.removed_anything:
        lines.append("nothing to remove")
    else:
        lines.append(f"{'would free' if result.dry_run else 'freed'} {format_bytes(result.bytes)} "
                     f"in {result.seconds:.1f} s")
    return "\n".join(lines)
