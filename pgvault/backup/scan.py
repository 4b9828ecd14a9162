"""Walk a data directory as pg_basebackup would send it: what to back up, in path order.

Excluded, as pg_basebackup excludes them (src/backend/backup/basebackup.c):
the contents of pg_wal (its archive_status directory is kept, empty) and of
pg_stat_tmp, pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots and
pg_subtrans (the directories themselves are kept); postmaster.pid/.opts,
backup_label, tablespace_map and backup_manifest left on disk,
postgresql.auto.conf.tmp, current_logfiles(.tmp), pg_internal.init*
(relation cache, rebuilt at start), pgsql_tmp* files and directories,
temporary relations (t<N>_<relfilenode>) and every fork but the init fork of
unlogged relations. Tablespaces (pg_tblspc/<oid> symlinks) are recorded as
links and their current version directory is walked through the link.

Entries come sorted by ``manifest.path_key``: a directory, then its entries by name.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

EXCLUDED_DIR_CONTENTS = frozenset({
    "pg_wal", "pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_subtrans",
})
EXCLUDED_FILES = frozenset({
    "postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "backup_manifest",
    "postgresql.auto.conf.tmp", "current_logfiles", "current_logfiles.tmp",
})
EXCLUDED_PREFIXES = ("pg_internal.init", "pgsql_tmp")

_RELATION = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
_TEMP_RELATION = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
_DATABASE_DIR = re.compile(r"^(?:base/\d+|pg_tblspc/\d+/PG_[^/]+/\d+)$")
_TABLESPACE_LINK = re.compile(r"^pg_tblspc/\d+$")


@dataclass(frozen=True)
class ScanEntry:
    path: str  # relative to the data directory
    type: str  # "file" | "dir" | "link"
    mode: int = 0
    size: int = 0
    mtime: float = 0.0
    target: str | None = None


def is_database_dir(path: str) -> bool:
    return bool(_DATABASE_DIR.match(path))


def excluded_names(directory: str, names: list[str]) -> set[str]:
    """Which of ``names`` (the entries of ``directory``, relative to the data dir) are not backed up."""
    if directory == "pg_wal":
        return {n for n in names if n != "archive_status"}
    if directory in EXCLUDED_DIR_CONTENTS or directory == "pg_wal/archive_status":
        return set(names)
    out = set()
    for name in names:
        if name in EXCLUDED_FILES and directory == "":
            out.add(name)
        elif name.startswith(EXCLUDED_PREFIXES):
            out.add(name)
    if is_database_dir(directory):
        unlogged = {m[1] for n in names if (m := _RELATION.match(n)) and m[2] == "init"}
        for name in names:
            if _TEMP_RELATION.match(name):
                out.add(name)
            elif (m := _RELATION.match(name)) and m[1] in unlogged and m[2] != "init":
                out.add(name)
    return out


def scan_data_dir(data_dir: str, *, pg_major_version: int) -> Iterator[ScanEntry]:
    """Every entry to back up, in path order. Entries that vanish while we walk are skipped."""
    yield from _walk(data_dir, "", pg_major_version)


def _walk(data_dir: str, directory: str, major: int) -> Iterator[ScanEntry]:
    try:
        with os.scandir(os.path.join(data_dir, directory) if directory else data_dir) as it:
            entries = {e.name: e for e in it}
    except FileNotFoundError:
        return  # dropped while we walk (a database, a tablespace): WAL replay removes it too
    skip = excluded_names(directory, list(entries))
    version_prefix = f"PG_{major}_"
    for name in sorted(entries):
        if name in skip:
            continue
        path = f"{directory}/{name}" if directory else name
        try:
            st = entries[name].stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if _TABLESPACE_LINK.match(path) and stat.S_ISLNK(st.st_mode):
            yield ScanEntry(path, "link", target=os.readlink(os.path.join(data_dir, path)))
            for child in _walk(data_dir, path, major):
                # only this server's version directory, as pg_basebackup does
                if child.path.split("/")[2].startswith(version_prefix):
                    yield child
        elif stat.S_ISLNK(st.st_mode):
            if path == "pg_wal":  # pg_wal on another disk: its contents are not backed up anyway
                yield ScanEntry(path, "dir", mode=stat.S_IMODE(os.stat(os.path.join(data_dir, path)).st_mode))
                yield from _walk(data_dir, path, major)
            else:
                yield ScanEntry(path, "link", target=os.readlink(os.path.join(data_dir, path)))
        elif stat.S_ISDIR(st.st_mode):
            yield ScanEntry(path, "dir", mode=stat.S_IMODE(st.st_mode))
            yield from _walk(data_dir, path, major)
        elif stat.S_ISREG(st.st_mode):
            yield ScanEntry(path, "file", mode=stat.S_IMODE(st.st_mode), size=st.st_size,
                            mtime=st.st_mtime_ns / 1e9)
        # sockets, fifos, devices: nothing PostgreSQL keeps in a data directory
