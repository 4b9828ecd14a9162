"""Leftovers of interrupted backups: objects under backups/<label>/ with no manifest.

A backup killed midway (SIGKILL, vault lost) leaves data objects and maybe its
files.jsonl, never a manifest, so no listing shows it. Only the holder of the
backup lock may delete leftovers: with the lock held no other backup runs,
so every manifest-less label is garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgvault.backup import layout
from pgvault.storage import Storage


@dataclass(frozen=True)
class Leftover:
    label: str
    keys: tuple[str, ...]
    bytes: int


def find_leftovers(storage: Storage) -> list[Leftover]:
    """Labels with objects but no manifest, oldest first (what ``remove_leftovers`` would delete)."""
    keys: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    committed: set[str] = set()
    for info in storage.list(layout.BACKUPS_PREFIX):
        parsed = layout.parse_backup_key(info.key)
        if parsed is None:
            continue
        if parsed.kind == "manifest":
            committed.add(parsed.label)
        keys.setdefault(parsed.label, []).append(info.key)
        sizes[parsed.label] = sizes.get(parsed.label, 0) + info.size
    return [Leftover(label, tuple(keys[label]), sizes[label]) for label in sorted(keys) if label not in committed]


def remove_leftovers(storage: Storage, leftovers: list[Leftover]) -> list[str]:
    """Delete them (call only while holding the backup lock); one notice per label removed."""
    notices = []
    for leftover in leftovers:
        for key in leftover.keys:
            storage.delete(key)
        notices.append(f"removed the leftovers of the interrupted backup {leftover.label} "
                       f"({len(leftover.keys)} objects, {leftover.bytes} bytes)")
    return notices
