"""Read what the vault holds into the planner's CatalogSnapshot (the planner itself does no I/O).

Backups come from their manifests only (a backup without one does not exist);
an incremental backup whose chain is broken (a parent gone) is left out, with
a note, because it cannot be restored. WAL comes from one listing of the WAL
index, and every archived timeline history file is read and parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgvault import codec
from pgvault.backup.manifest import Manifest, list_backups
from pgvault.catalog import list_archived_wal
from pgvault.planner import BackupPoint, CatalogSnapshot
from pgvault.storage import Storage
from pgvault.vault import VaultRecord
from pgvault.wal import parse_history


@dataclass(frozen=True)
class LoadedCatalog:
    snapshot: CatalogSnapshot
    manifests: dict[str, Manifest]
    notes: tuple[str, ...]


def backup_chain(label: str, manifests: dict[str, Manifest]) -> list[str] | None:
    """Labels from the full backup to ``label``, or None if a parent is missing."""
    chain = []
    current: str | None = label
    while current is not None:
        manifest = manifests.get(current)
        if manifest is None or current in chain:
            return None
        chain.append(current)
        current = manifest.parent
    return list(reversed(chain))


def load_catalog(storage: Storage, *, record: VaultRecord, keyring) -> LoadedCatalog:
    require_encryption = record.encryption_key_id is not None
    manifests = {m.label: m for m in list_backups(storage, keyring, require_encryption=require_encryption)}
    notes = []
    points = []
    for label, m in sorted(manifests.items()):
        chain = backup_chain(label, manifests)
        if chain is None:
            notes.append(f"backup {label} is left out: a backup of its incremental chain is missing")
            continue
        points.append(BackupPoint(
            label=label, timeline=m.timeline, start_lsn=m.start_lsn, stop_lsn=m.stop_lsn,
            start_time=m.start_time, stop_time=m.stop_time,
            bytes_stored=sum(manifests[c].bytes_stored for c in chain), chain=tuple(chain),
        ))
    wal = list_archived_wal(storage, segment_size=record.wal_segment_size)
    histories = {}
    for entry in wal:
        if entry.file.kind == "history":
            with storage.open(entry.key) as f:
                text = codec.decode_bytes(f.read(), name=entry.key, keyring=keyring,
                                          expected_sha256=entry.sha256, require_encryption=require_encryption)
            histories[entry.timeline] = tuple(parse_history(text.decode(), source=entry.name))
    snapshot = CatalogSnapshot(backups=tuple(points), wal=tuple(wal), histories=histories,
                               segment_size=record.wal_segment_size)
    return LoadedCatalog(snapshot=snapshot, manifests=manifests, notes=tuple(notes))
