"""`pgvault check`: a checklist of what must hold for pgvault to protect this cluster.

Each check is a small function returning a CheckItem; one failing check never
stops the others. An item that depends on something that failed (the config,
the vault, PostgreSQL) is still listed, as failed with "could not be checked":
a checklist that shrinks when things break would look better than it is.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shlex
import socket
from dataclasses import dataclass
from typing import Callable, NamedTuple

from pgvault.config import Settings
from pgvault.configpath import DEFAULT_CONFIG_PATH
from pgvault.errors import PgvaultError

CONFIG = "config valid"
VAULT = "vault reachable and writable"
POSTGRES = "PostgreSQL reachable"
INITIALIZED = "vault initialized for this cluster"
ENCRYPTION = "encryption key"
WAL_LEVEL = "wal_level"
ARCHIVE_MODE = "archive_mode"
ARCHIVE_COMMAND = "archive_command"
ARCHIVING = "WAL archiving"
#: Every item, in the order printed.
ITEMS = (CONFIG, VAULT, POSTGRES, INITIALIZED, ENCRYPTION, WAL_LEVEL, ARCHIVE_MODE, ARCHIVE_COMMAND, ARCHIVING)
SERVER_ITEMS = (WAL_LEVEL, ARCHIVE_MODE, ARCHIVE_COMMAND, ARCHIVING)


@dataclass(frozen=True)
class CheckItem:
    name: str
    ok: bool
    detail: str
    hint: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "hint": self.hint}


def not_checked(name: str, reason: str) -> CheckItem:
    """A failed item whose check could not run, because ``reason``."""
    return CheckItem(name, False, "not checked", f"could not be checked: {reason}")


def _item(name: str, fn: Callable[[], str]) -> CheckItem:
    try:
        return CheckItem(name, True, fn())
    except PgvaultError as exc:
        return CheckItem(name, False, exc.message, exc.hint)


def config_failed(exc: PgvaultError) -> list[CheckItem]:
    """The checklist when the settings cannot even be loaded."""
    return [CheckItem(CONFIG, False, exc.message, exc.hint)] + [
        not_checked(name, "the config is invalid (see above)") for name in ITEMS[1:]
    ]


def run_checks(settings: Settings) -> list[CheckItem]:
    from pgvault import context, pg
    from pgvault.vault import require_vault_record

    items = [CheckItem(CONFIG, True, f"from {settings.source}")]
    state: dict = {}

    def vault_writable() -> str:
        storage = context.storage_for(settings)
        probe = f"probes/check-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        payload = secrets.token_bytes(64)
        storage.put(probe, io.BytesIO(payload))
        try:
            with storage.open(probe) as f:
                if f.read() != payload:
                    raise PgvaultError(f"{storage.description}: a probe object read back different bytes")
        finally:
            storage.delete(probe)
        state["storage"] = storage  # only now: what depends on the vault is not checked on a broken one
        return f"{storage.description} (wrote, read back and deleted a probe object)"

    items.append(_item(VAULT, vault_writable))

    def postgres_reachable() -> str:
        with pg.connect(settings.postgres.conninfo) as conn:
            facts = pg.server_facts(conn)
            state["archiver"] = pg.archiver_status(conn)
        state["facts"] = facts
        role = "standby" if facts.in_recovery else "primary"
        return f"PostgreSQL {facts.version_num // 10000}.{facts.version_num % 10000} ({role}), data directory {facts.data_directory}"

    items.append(_item(POSTGRES, postgres_reachable))
    facts = state.get("facts")

    if "storage" in state:
        def vault_initialized() -> str:
            record = require_vault_record(state["storage"], system_identifier=facts.system_identifier if facts else None)
            state["record"] = record
            return f"cluster {record.cluster!r}, system identifier {record.system_identifier}"

        items.append(_item(INITIALIZED, vault_initialized))
        if "record" in state:
            items.append(_item(ENCRYPTION, lambda: encryption_state(settings, state["storage"], state["record"])))
        else:
            items.append(not_checked(ENCRYPTION, "the vault has no usable record for this cluster (see above)"))
    else:
        items += [not_checked(name, "the vault is not reachable (see above)") for name in (INITIALIZED, ENCRYPTION)]

    if facts is not None:
        items.extend(server_setting_checks(facts, config_source=settings.source))
        items.append(archiving_progress(state["archiver"], segment_size=facts.wal_segment_size))
    else:
        items += [not_checked(name, "PostgreSQL is not reachable (see above)") for name in SERVER_ITEMS]
    return items


def encryption_state(settings: Settings, storage, record) -> str:
    """What the encryption item says when the config agrees with the vault record (else it raises)."""
    from pgvault import context

    keyring = context.vault_keyring(settings, storage, record)
    if keyring is None:
        return "off: the vault is not encrypted and [encryption] key_file is not set"
    return (f"key file {settings.encryption.key_file} unlocks vault key {record.encryption_key_id} "
            f"({len(keyring)} vault key(s))")


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
            ARCHIVING, False,
            f"failing since {status.last_failed_time:%Y-%m-%d %H:%M:%S%z} on {status.last_failed_wal} "
            f"({status.failed_count} failures, {waiting}); last archived {status.last_archived_wal or '-'}",
            "read the PostgreSQL log for pgvault wal-push errors; PostgreSQL keeps the WAL until it succeeds",
        )
    last = f"last archived {status.last_archived_wal} at {status.last_archived_time:%Y-%m-%d %H:%M:%S%z}" \
        if status.last_archived_wal else "nothing archived yet (SELECT pg_switch_wal() to test)"
    return CheckItem(ARCHIVING, True, f"{last}; {waiting}")


class WalPushCommand(NamedTuple):
    """An archive_command that runs `pgvault wal-push %p`, and the config file it names."""

    config: str | None  # from --config, or a PGVAULT_CONFIG=… prefix; None: pgvault's default


_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_REDIRECTIONS = {">", ">>", "<", ">&", "<&", "&>", "&>>", ">|"}
_SHELL_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def parse_wal_push_command(command: str) -> WalPushCommand | None:
    """The config of an archive_command that is one shell command running `pgvault … wal-push %p`; else None.

    PostgreSQL runs archive_command with /bin/sh and trusts its exit status, so
    the command is read as the shell reads it: a comment (`true # pgvault
    wal-push %p`), a list or a pipe (`pgvault wal-push %p || true`) hide or
    replace pgvault's exit status and are not accepted. Allowed around the
    command: VAR=value prefixes, `exec`, and redirections of its output.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: the shell would fail too
        return None
    args: list[str] = []
    config: str | None = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in _REDIRECTIONS:
            if args and args[-1].isdigit():
                args.pop()  # the descriptor of `2>`
            i += 2
            continue
        if set(word) <= set("();<>|&"):
            return None  # a list, a pipe, a sub-shell: pgvault's exit status is not the command's
        if not args and _ASSIGNMENT.match(word):
            name, _, value = word.partition("=")
            config = value if name == "PGVAULT_CONFIG" else config
        elif not args and word == "exec":
            pass
        else:
            args.append(word)
        i += 1
    if not args or os.path.basename(args[0]) != "pgvault":
        return None
    rest = args[1:]
    while rest and rest[0].startswith("--"):
        if rest[0] == "--config" and len(rest) > 1:
            config, rest = rest[1], rest[2:]
        elif rest[0].startswith("--config="):
            config, rest = rest[0].split("=", 1)[1], rest[1:]
        elif rest[0] == "--debug":
            rest = rest[1:]
        else:
            return None
    if rest != ["wal-push", "%p"]:
        return None
    return WalPushCommand(config=config)


def _shell_quoted(path: str) -> str:
    # double quotes: the hint is shown inside postgresql.conf's single-quoted string
    return path if _SHELL_WORD.match(path) else '"' + re.sub(r'(["\\$`])', r"\\\1", path) + '"'


def server_setting_checks(facts, *, config_source: str, default_config: str = DEFAULT_CONFIG_PATH) -> list[CheckItem]:
    """wal_level, archive_mode and archive_command, judged from the server's own settings.

    ``config_source`` is the file this check read its settings from (or "built-in
    defaults"): archive_command must make wal-push read the same one.
    """
    items = []
    ok = facts.wal_level in ("replica", "logical")
    items.append(CheckItem(
        WAL_LEVEL, ok, f"wal_level = {facts.wal_level}",
        None if ok else "set wal_level = replica in postgresql.conf and restart PostgreSQL",
    ))
    ok = facts.archive_mode in ("on", "always")
    items.append(CheckItem(
        ARCHIVE_MODE, ok, f"archive_mode = {facts.archive_mode}",
        None if ok else "set archive_mode = on (always on a standby that should archive) and restart PostgreSQL",
    ))
    items.append(archive_command_check(facts.archive_command, config_source=config_source,
                                       data_directory=facts.data_directory, default_config=default_config))
    return items


def archive_command_check(cmd: str, *, config_source: str, data_directory: str,
                          default_config: str = DEFAULT_CONFIG_PATH) -> CheckItem:
    from_file = config_source != "built-in defaults"
    config = os.path.abspath(config_source) if from_file else None
    wanted = f"pgvault --config {_shell_quoted(config)} wal-push %p" if config else "pgvault wal-push %p"
    parsed = parse_wal_push_command(cmd)
    if parsed is None:
        return CheckItem(
            ARCHIVE_COMMAND, False, f"archive_command = {cmd!r} does not run pgvault wal-push %p",
            f"set archive_command = '{wanted}' and reload PostgreSQL",
        )
    # The file wal-push will read: a relative path is relative to the server's data directory (its cwd).
    if parsed.config is not None:
        used = os.path.normpath(os.path.join(data_directory, parsed.config))
    else:
        used = default_config if os.path.exists(default_config) else None
    if used != config:
        got = f"the config file {used}" if used else "pgvault's built-in defaults"
        this = f"the config file {config}" if config else "built-in defaults"
        return CheckItem(
            ARCHIVE_COMMAND, False, f"archive_command = {cmd!r} makes wal-push read {got}, not {this} as this check did",
            f"set archive_command = '{wanted}' so the server archives into the vault this check looked at",
        )
    return CheckItem(ARCHIVE_COMMAND, True, f"archive_command = {cmd!r}")
