"""`pgvault check`: a checklist of what must hold for pgvault to protect this cluster.

Each check is a small function returning a CheckItem; one failing check never
stops the others (except that a broken config leaves nothing to check with).
"""

from __future__ import annotations

import io
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Callable

from pgvault.config import Settings
from pgvault.errors import PgvaultError


@dataclass(frozen=True)
class CheckItem:
    name: str
    ok: bool
    detail: str
    hint: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "hint": self.hint}


def _item(name: str, fn: Callable[[], str]) -> CheckItem:
    try:
        return CheckItem(name, True, fn())
    except PgvaultError as exc:
        return CheckItem(name, False, exc.message, exc.hint)


def run_checks(settings: Settings) -> list[CheckItem]:
    from pgvault import context, pg
    from pgvault.vault import require_vault_record

    items = [CheckItem("config valid", True, f"from {settings.source}")]
    state: dict = {}

    def vault_writable() -> str:
        storage = context.storage_for(settings)
        state["storage"] = storage
        probe = f"probes/check-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        payload = secrets.token_bytes(64)
        storage.put(probe, io.BytesIO(payload))
        try:
            with storage.open(probe) as f:
                if f.read() != payload:
                    raise PgvaultError(f"{storage.description}: a probe object read back different bytes")
        finally:
            storage.delete(probe)
        return f"{storage.description} (wrote, read back and deleted a probe object)"

    items.append(_item("vault reachable and writable", vault_writable))

    def postgres_reachable() -> str:
        with pg.connect(settings.postgres.conninfo) as conn:
            facts = pg.server_facts(conn)
            state["archiver"] = pg.archiver_status(conn)
        state["facts"] = facts
        role = "standby" if facts.in_recovery else "primary"
        return f"PostgreSQL {facts.version_num // 10000}.{facts.version_num % 10000} ({role}), data directory {facts.data_directory}"

    items.append(_item("PostgreSQL reachable", postgres_reachable))

    if "storage" in state:
        def vault_initialized() -> str:
            facts = state.get("facts")
            record = require_vault_record(state["storage"], system_identifier=facts.system_identifier if facts else None)
            return f"cluster {record.cluster!r}, system identifier {record.system_identifier}"

        items.append(_item("vault initialized for this cluster", vault_initialized))

        if settings.encryption.key_file:
            def key_usable() -> str:
                keyring = context.keyring_for(settings, state["storage"])
                return f"key file {settings.encryption.key_file} unlocks {len(keyring)} vault key(s)"

            items.append(_item("encryption key", key_usable))

    facts = state.get("facts")
    if facts is not None:
        items.extend(server_setting_checks(facts, config_source=settings.source))
        items.append(archiving_progress(state["archiver"], segment_size=facts.wal_segment_size))
    return items


def archiving_progress(status, *, segment_size: int) -> CheckItem:
    """How far behind archiving is, from pg_stat_archiver and the segment being written."""
    from pgvault.wal import parse_segment_name

    def segno(name):
        try:
            return parse_segment_name(name[:24], segment_size=segment_size)[1]
        except Exception:
            return None

    behind = None
    if status.current_wal and status.last_archived_wal and segno(status.last_archived_wal) is not None:
        behind = max(0, segno(status.current_wal) - segno(status.last_archived_wal) - 1)
    waiting = f"{behind} completed segment(s) waiting" if behind is not None else "no segment archived yet"
    if status.failing:
        return CheckItem(
            "WAL archiving", False,
            f"failing since {status.last_failed_time:%Y-%m-%d %H:%M:%S%z} on {status.last_failed_wal} "
            f"({status.failed_count} failures, {waiting}); last archived {status.last_archived_wal or '-'}",
            "read the PostgreSQL log for pgvault wal-push errors; PostgreSQL keeps the WAL until it succeeds",
        )
    last = f"last archived {status.last_archived_wal} at {status.last_archived_time:%Y-%m-%d %H:%M:%S%z}" \
        if status.last_archived_wal else "nothing archived yet (SELECT pg_switch_wal() to test)"
    return CheckItem("WAL archiving", True, f"{last}; {waiting}")


def server_setting_checks(facts, *, config_source: str) -> list[CheckItem]:
    """wal_level, archive_mode and archive_command, judged from the server's own settings."""
    items = []
    ok = facts.wal_level in ("replica", "logical")
    items.append(CheckItem(
        "wal_level", ok, f"wal_level = {facts.wal_level}",
        None if ok else "set wal_level = replica in postgresql.conf and restart PostgreSQL",
    ))
    ok = facts.archive_mode in ("on", "always")
    items.append(CheckItem(
        "archive_mode", ok, f"archive_mode = {facts.archive_mode}",
        None if ok else "set archive_mode = on (always on a standby that should archive) and restart PostgreSQL",
    ))
    cmd = facts.archive_command
    wanted = f"pgvault --config {config_source} wal-push %p" if config_source.startswith("/") else "pgvault wal-push %p"
    if "pgvault" not in cmd or "wal-push" not in cmd or "%p" not in cmd:
        items.append(CheckItem(
            "archive_command", False, f"archive_command = {cmd!r}",
            f"set archive_command = '{wanted}' and reload PostgreSQL",
        ))
    elif config_source.startswith("/") and config_source not in cmd:
        items.append(CheckItem(
            "archive_command", False, f"archive_command = {cmd!r} does not use the config file {config_source}",
            f"set archive_command = '{wanted}' so the server archives into the vault this check looked at",
        ))
    else:
        items.append(CheckItem("archive_command", True, f"archive_command = {cmd!r}"))
    return items
