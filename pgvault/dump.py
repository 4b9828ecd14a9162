"""Logical dumps: ``pg_dump -Fc`` of each database and ``pg_dumpall --globals-only``,
streamed through the object format straight into the vault, and restored with
``pg_restore`` (databases) or ``psql`` (globals).

Layout (every key has a format/parse pair below)::

    dumps/<label>/globals.sql            pg_dumpall --globals-only: roles, tablespaces
    dumps/<label>/<slug>-<hash>.dump     pg_dump -Fc of one database
    dumps/<label>/dump.json              the record, written last: the commit marker

``label`` is the dump's start time in UTC, ``20261127T203000ZD``. A database
name may hold any character, so its key part is a slug of it (characters
outside ``[A-Za-z0-9_-]`` become ``_``, at most 40) and the first 12 hex digits
of the SHA-256 of its UTF-8 bytes; the real name is kept in the record.

A dump exists only once its record is written. ``list_dumps`` reads records
only; the objects of a dump that was interrupted (no record) are never listed,
and the next ``take_dump`` removes them first; `pgvault dump` holds the vault's
backup lock around it, so a dump running elsewhere never loses its objects.

pg_dump's output is piped into ``codec.encode`` and on into ``Storage.put``:
no temporary file, memory bounded whatever the database size. Its exit status
and stderr are checked after the stream ends; a failed pg_dump leaves nothing
behind (the objects of this dump are deleted).

Restoring with ``jobs == 1`` streams the decoded archive into pg_restore's
stdin. ``pg_restore --jobs`` needs a seekable file, so with ``jobs > 1`` the
archive is first decoded (and verified) into a temporary file in ``temp_dir``,
which needs room for the whole uncompressed dump.

Passwords: a password in the conninfo is handed to the tools as ``PGPASSWORD``
in their environment, never on their command line, and never printed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, BinaryIO, Iterable

from pgvault import codec, pg
from pgvault.archive import CodecOptions
from pgvault.errors import DumpError, ObjectNotFoundError, PostgresError
from pgvault.storage import Storage
from pgvault.vault import VaultRecord, check_same_cluster

FORMAT_VERSION = 1
DUMPS_PREFIX = "dumps/"
RECORD_NAME = "dump.json"
GLOBALS_NAME = "globals.sql"
DATABASE_SUFFIX = ".dump"
SLUG_LENGTH = 40
NAME_HASH_LENGTH = 12

_LABEL = re.compile(r"^[0-9]{8}T[0-9]{6}ZD$")
_LABEL_FORMAT = "%Y%m%dT%H%M%SZD"
_DATABASE_PART = re.compile(r"^(?P<slug>[A-Za-z0-9_-]{1,%d})-(?P<hash>[0-9a-f]{%d})\.dump$"
                            % (SLUG_LENGTH, NAME_HASH_LENGTH))
_TOOL_VERSION = re.compile(r"\(PostgreSQL\)\s+(?P<major>[0-9]+)(?:\.(?P<minor>[0-9]+))?")

BLOCK_SIZE = 1 << 20
#: How much of a tool's stderr goes into an error message.
STDERR_TAIL = 8192
MESSAGE_DETAIL = 600


# --- keys -------------------------------------------------------------------

def format_dump_label(started: datetime) -> str:
    """The label of a dump started at ``started``: ``20261127T203000ZD`` (UTC)."""
    if started.tzinfo is None:
        raise ValueError("a dump label needs an aware datetime")
    return started.astimezone(timezone.utc).strftime(_LABEL_FORMAT)


def parse_dump_label(label: str) -> datetime | None:
    """The start time a label names, or None if it is not a dump label."""
    if not isinstance(label, str) or not _LABEL.match(label):
        return None
    try:
        return datetime.strptime(label, _LABEL_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _require_label(label: str) -> str:
    if parse_dump_label(label) is None:
        raise ValueError(f"not a dump label: {label!r}")
    return label


def database_name_hash(dbname: str) -> str:
    return hashlib.sha256(dbname.encode("utf-8", "surrogatepass")).hexdigest()[:NAME_HASH_LENGTH]


def database_key_part(dbname: str) -> str:
    """``<slug>-<hash>.dump``: a valid key part for any database name."""
    if not dbname:
        raise ValueError("a database name cannot be empty")
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", dbname)[:SLUG_LENGTH]
    return f"{slug}-{database_name_hash(dbname)}{DATABASE_SUFFIX}"


def format_record_key(label: str) -> str:
    return f"{DUMPS_PREFIX}{_require_label(label)}/{RECORD_NAME}"


def format_globals_key(label: str) -> str:
    return f"{DUMPS_PREFIX}{_require_label(label)}/{GLOBALS_NAME}"


def format_database_key(label: str, dbname: str) -> str:
    return f"{DUMPS_PREFIX}{_require_label(label)}/{database_key_part(dbname)}"


@dataclass(frozen=True)
class DumpKey:
    """What a key under ``dumps/`` says: its dump's label and what it holds."""

    label: str
    kind: str  # "record", "globals" or "database"
    name_hash: str | None = None  # for a database: the hash of its name

    def matches(self, dbname: str) -> bool:
        return self.kind == "database" and self.name_hash == database_name_hash(dbname)


def parse_dump_key(key: str) -> DumpKey | None:
    """The DumpKey a key describes, or None if it is not one of a dump's keys."""
    parts = key.split("/")
    if len(parts) != 3 or f"{parts[0]}/" != DUMPS_PREFIX or parse_dump_label(parts[1]) is None:
        return None
    label, name = parts[1], parts[2]
    if name == RECORD_NAME:
        return DumpKey(label, "record")
    if name == GLOBALS_NAME:
        return DumpKey(label, "globals")
    m = _DATABASE_PART.match(name)
    if m:
        return DumpKey(label, "database", m["hash"])
    return None


# --- the record -------------------------------------------------------------

@dataclass(frozen=True)
class DumpedObject:
    """One object of a dump: where it is and what its plaintext is."""

    key: str
    sha256: str
    size: int  # plaintext bytes (what pg_dump wrote)
    stored_size: int  # bytes in the vault (compressed, encrypted)


@dataclass(frozen=True)
class DumpedDatabase:
    """One database of a dump, with what restoring it under another name needs."""

    name: str
    key: str
    sha256: str
    size: int
    stored_size: int
    seconds: float
    owner: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str | None  # "c" (libc), "i" (icu); None before PostgreSQL 15
    icu_locale: str | None


@dataclass(frozen=True)
class DumpRecord:
    """``dumps/<label>/dump.json``: everything a restore needs; written last."""

    format_version: int
    label: str
    cluster: str
    system_identifier: int
    pg_version: str  # the server's server_version, e.g. "15.8 (Debian 15.8-1)"
    pg_version_num: int  # e.g. 150008
    pg_dump_version: str
    started_at: str
    stopped_at: str
    duration_seconds: float
    host: str
    globals: DumpedObject
    databases: tuple[DumpedDatabase, ...]

    @property
    def pg_major_version(self) -> int:
        return self.pg_version_num // 10000

    @property
    def size(self) -> int:
        return self.globals.size + sum(d.size for d in self.databases)

    @property
    def stored_size(self) -> int:
        return self.globals.stored_size + sum(d.stored_size for d in self.databases)

    def database(self, name: str) -> DumpedDatabase | None:
        for db in self.databases:
            if db.name == name:
                return db
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["system_identifier"] = str(self.system_identifier)  # does not fit a JSON double
        data["databases"] = [asdict(d) for d in self.databases]
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, *, where: str) -> "DumpRecord":
        try:
            data = json.loads(blob)
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise DumpError(
                    f"{where} has format version {version}; this pgvault understands up to {FORMAT_VERSION}",
                    hint="upgrade pgvault",
                )
            record = cls(
                format_version=version,
                label=str(data["label"]),
                cluster=str(data["cluster"]),
                system_identifier=int(data["system_identifier"]),
                pg_version=str(data["pg_version"]),
                pg_version_num=int(data["pg_version_num"]),
                pg_dump_version=str(data["pg_dump_version"]),
                started_at=str(data["started_at"]),
                stopped_at=str(data["stopped_at"]),
                duration_seconds=float(data["duration_seconds"]),
                host=str(data.get("host", "")),
                globals=DumpedObject(**data["globals"]),
                databases=tuple(DumpedDatabase(**d) for d in data["databases"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DumpError(f"{where} is not a pgvault dump record ({exc.__class__.__name__}: {exc})") from None
        # The keys are derived from label and names: a record that disagrees was tampered with or misplaced.
        expected = [format_globals_key(record.label)] + [format_database_key(record.label, d.name)
                                                          for d in record.databases]
        if [record.globals.key] + [d.key for d in record.databases] != expected:
            raise DumpError(f"{where} names objects outside its own dump {record.label}")
        return record


# --- PostgreSQL's programs ----------------------------------------------------

@dataclass(frozen=True)
class PgTool:
    name: str
    path: str
    version: str  # e.g. "15.8"
    major: int


def find_pg_tool(name: str, *, bin_dir: str | None) -> str:
    """The path of PostgreSQL program ``name``: in ``bin_dir``, else ``pg_config --bindir``, else PATH."""
    found = pg.pg_program_candidates(name, bin_dir=bin_dir)
    if found:
        return found[0]
    if bin_dir:
        raise DumpError(f"{name} not found in [postgres] bin_dir {bin_dir}",
                        hint="set [postgres] bin_dir to the bin directory of the server's PostgreSQL version")
    raise DumpError(f"{name} not found (not in `pg_config --bindir`, not on PATH)",
                    hint="install PostgreSQL's client programs, or set [postgres] bin_dir to their directory")


def tool_version(path: str) -> tuple[str, int]:
    """(version, major) from ``<tool> --version``, e.g. ("15.8", 15)."""
    name = os.path.basename(path)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DumpError(f"cannot run {path} --version: {exc}") from None
    m = _TOOL_VERSION.search(out.stdout)
    if out.returncode != 0 or not m:
        raise DumpError(f"{path} --version did not say which PostgreSQL it belongs to: "
                        f"{_one_line(out.stdout + out.stderr) or f'exit status {out.returncode}'}",
                        hint=f"set [postgres] bin_dir to a directory holding PostgreSQL's own {name}")
    version = m["major"] + (f".{m['minor']}" if m["minor"] else "")
    return version, int(m["major"])


def pg_tool(name: str, *, bin_dir: str | None, server_major: int, action: str) -> PgTool:
    """Find ``name`` and refuse one of another major version than the server (``action``: "dump", …)."""
    path = find_pg_tool(name, bin_dir=bin_dir)
    version, major = tool_version(path)
    if major != server_major:
        raise DumpError(
            f"{name} {major} ({path}) cannot {action} a PostgreSQL {server_major} server",
            hint=f"set [postgres] bin_dir to PostgreSQL {server_major}'s bin directory "
            f"(on Debian: /usr/lib/postgresql/{server_major}/bin)",
        )
    return PgTool(name=name, path=path, version=version, major=major)


def tool_connection(conninfo: str, **params: str) -> tuple[str, dict[str, str]]:
    """(conninfo for a tool's --dbname, its environment): the password moves to PGPASSWORD."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        values = conninfo_to_dict(conninfo)
    except Exception as exc:
        raise PostgresError(f"invalid [postgres] conninfo: {exc}") from None
    password = values.pop("password", None)
    values.update(params)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **values), env


def _one_line(text: str, limit: int = MESSAGE_DETAIL) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else "…" + line[-limit:]


def _read_tail(f: BinaryIO) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - STDERR_TAIL))
    return f.read().decode("utf-8", "replace")


def _exit_description(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --- taking a dump ------------------------------------------------------------

@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    allow_connections: bool
    is_template: bool
    owner: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str | None
    icu_locale: str | None


def list_databases(conn: Any) -> list[DatabaseInfo]:
    """Every database of the server, with what recreating it needs (any version's catalog)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT d.datname, d.datallowconn, d.datistemplate, pg_get_userbyid(d.datdba),
                   pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,
                   to_jsonb(d) ->> 'datlocprovider',
                   coalesce(to_jsonb(d) ->> 'daticulocale', to_jsonb(d) ->> 'datlocale')
            FROM pg_database d ORDER BY d.datname
            """
        )
        return [DatabaseInfo(*row) for row in cur.fetchall()]


def select_databases(available: list[DatabaseInfo], wanted: Iterable[str] | None) -> list[DatabaseInfo]:
    """The databases to dump: those named (each must exist and accept connections), else every
    connectable database that is not a template."""
    by_name = {d.name: d for d in available}
    if not wanted:
        return [d for d in available if d.allow_connections and not d.is_template]
    chosen = []
    for name in dict.fromkeys(wanted):
        info = by_name.get(name)
        if info is None:
            names = ", ".join(repr(d.name) for d in available if d.allow_connections and not d.is_template)
            raise DumpError(f"database {name!r} does not exist on the server",
                            hint=f"its databases are: {names}")
        if not info.allow_connections:
            raise DumpError(f"database {name!r} does not allow connections (datallowconn is false); "
                            "pg_dump cannot dump it")
        chosen.append(info)
    return sorted(chosen, key=lambda d: d.name)


@dataclass(frozen=True)
class DumpResult:
    record: DumpRecord
    removed_leftovers: tuple[str, ...]  # labels of interrupted dumps removed before this one
    warnings: tuple[str, ...]  # what pg_dump / pg_dumpall said on stderr while succeeding


def take_dump(
    storage: Storage,
    *,
    vault_record: VaultRecord,
    options: CodecOptions,
    conninfo: str,
    bin_dir: str | None,
    databases: Iterable[str] | None = None,
) -> DumpResult:
    """Dump globals and each database into the vault; the record is written last."""
    with pg.connect(conninfo) as conn:
        facts = pg.server_facts(conn)
        check_same_cluster(vault_record, facts.system_identifier, storage=storage)
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version')")
            server_version = cur.fetchone()[0]
        chosen = select_databases(list_databases(conn), databases)
    major = facts.major_version
    pg_dump = pg_tool("pg_dump", bin_dir=bin_dir, server_major=major, action="dump")
    pg_dumpall = pg_tool("pg_dumpall", bin_dir=bin_dir, server_major=major, action="dump")

    removed = remove_leftovers(storage)
    started_wall = datetime.now(timezone.utc)
    started = time.monotonic()
    label = _free_label(storage, started_wall)
    written: list[str] = []
    warnings: list[str] = []
    try:
        globals_key = format_globals_key(label)
        written.append(globals_key)
        # pg_dumpall ignores the conninfo's dbname; -l names the database it connects to.
        dumpall_conn, env = tool_connection(conninfo)
        cmd = [pg_dumpall.path, "--globals-only", "--no-password", "--dbname", dumpall_conn]
        initial_db = _conninfo_dbname(conninfo)
        if initial_db:
            cmd += ["-l", initial_db]
        globals_obj, warning = _stream_into_vault(cmd, env=env, key=globals_key, storage=storage,
                                                  options=options, what="pg_dumpall --globals-only")
        warnings += warning
        dumped = []
        for db in chosen:
            key = format_database_key(label, db.name)
            written.append(key)
            db_conn, env = tool_connection(conninfo, dbname=db.name)
            cmd = [pg_dump.path, "--format=custom", "--no-password", "--dbname", db_conn]
            if options.compression != "none":
                cmd.append("--compress=0")  # zstd compresses better and faster than pg_dump's zlib
            db_started = time.monotonic()
            obj, warning = _stream_into_vault(cmd, env=env, key=key, storage=storage, options=options,
                                              what=f"pg_dump of database {db.name!r}")
            warnings += warning
            dumped.append(DumpedDatabase(
                name=db.name, key=key, sha256=obj.sha256, size=obj.size, stored_size=obj.stored_size,
                seconds=round(time.monotonic() - db_started, 3), owner=db.owner, encoding=db.encoding,
                collate=db.collate, ctype=db.ctype, locale_provider=db.locale_provider, icu_locale=db.icu_locale,
            ))
        record = DumpRecord(
            format_version=FORMAT_VERSION,
            label=label,
            cluster=vault_record.cluster,
            system_identifier=facts.system_identifier,
            pg_version=server_version,
            pg_version_num=facts.version_num,
            pg_dump_version=pg_dump.version,
            started_at=started_wall.isoformat(timespec="seconds"),
            stopped_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            duration_seconds=round(time.monotonic() - started, 3),
            host=socket.gethostname(),
            globals=globals_obj,
            databases=tuple(dumped),
        )
        write_dump_record(storage, record, options=options)
    except BaseException:
        # Nothing of a dump that did not complete stays behind (best effort: what a
        # crash leaves, the next dump removes).
        for key in written:
            try:
                storage.delete(key)
            except Exception:
                pass
        raise
    return DumpResult(record=record, removed_leftovers=removed, warnings=tuple(warnings))


def _conninfo_dbname(conninfo: str) -> str | None:
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(conninfo).get("dbname") or None
    except Exception:
        return None


def _free_label(storage: Storage, started: datetime) -> str:
    """The label for a dump started at ``started``; the next free second if a dump has it."""
    when = started.replace(microsecond=0)
    while True:
        label = format_dump_label(when)
        if next(iter(storage.list(f"{DUMPS_PREFIX}{label}/")), None) is None:
            return label
        when = datetime.fromtimestamp(when.timestamp() + 1, tz=timezone.utc)


def _stream_into_vault(cmd: list[str], *, env: dict[str, str], key: str, storage: Storage,
                       options: CodecOptions, what: str) -> tuple[DumpedObject, list[str]]:
    """Run ``cmd`` and store its stdout as object ``key``; its exit status is checked after the stream ends."""
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=env)
        except OSError as exc:
            raise DumpError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
        try:
            encoder = codec.encode(proc.stdout, name=key, compression=options.compression, level=options.level,
                                   threads=options.threads, key=options.key)
            info = storage.put(key, encoder)
        except BaseException:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
        code = proc.wait()
        stderr = _read_tail(errors)
    if code != 0:
        storage.delete(key)
        raise DumpError(
            f"{what} failed ({_exit_description(code)}): {_one_line(stderr) or 'no message'}",
            hint="the dump was not recorded and its objects were removed; fix the cause and run `pgvault dump` again",
        )
    obj = DumpedObject(key=key, sha256=encoder.plaintext_sha256, size=encoder.plaintext_size, stored_size=info.size)
    return obj, [f"{what}: {line}" for line in stderr.splitlines() if line.strip()]


def write_dump_record(storage: Storage, record: DumpRecord, *, options: CodecOptions) -> None:
    key = format_record_key(record.label)
    blob, _sha = codec.encode_bytes(record.to_json(), name=key, compression=options.compression,
                                    level=options.level, threads=0, key=options.key)
    storage.put(key, io.BytesIO(blob))


# --- listing ---------------------------------------------------------------------

def read_dump_record(storage: Storage, label: str, *, keyring, require_encryption: bool = False) -> DumpRecord:
    """The record of dump ``label``; ObjectNotFoundError if the vault has no such (committed) dump."""
    hint = "`pgvault dumps` lists the dumps in the vault"
    if parse_dump_label(label) is None:
        raise ObjectNotFoundError(f"{label!r} is not a dump label (they look like 20261127T203000ZD)", hint=hint)
    key = format_record_key(label)
    try:
        with storage.open(key) as f:
            blob = f.read()
    except ObjectNotFoundError:
        raise ObjectNotFoundError(f"dump {label} is not in the vault {storage.description}", hint=hint) from None
    plain = codec.decode_bytes(blob, name=key, keyring=keyring, require_encryption=require_encryption)
    record = DumpRecord.from_json(plain, where=f"{storage.description}/{key}")
    if record.label != label:
        raise DumpError(f"{storage.description}/{key} records dump {record.label}, not {label}")
    return record


def committed_labels(storage: Storage) -> list[str]:
    return sorted({k.label for info in storage.list(DUMPS_PREFIX)
                   if (k := parse_dump_key(info.key)) is not None and k.kind == "record"})


def list_dumps(storage: Storage, keyring, *, require_encryption: bool = False) -> list[DumpRecord]:
    """Every committed dump (one with a record), oldest first; leftovers of interrupted dumps are not listed."""
    return [read_dump_record(storage, label, keyring=keyring, require_encryption=require_encryption)
            for label in committed_labels(storage)]


def find_leftovers(storage: Storage) -> dict[str, list[str]]:
    """Objects of dumps that never got a record (interrupted), by label. Keys not of a dump are left alone."""
    objects: dict[str, list[str]] = {}
    committed: set[str] = set()
    for info in storage.list(DUMPS_PREFIX):
        k = parse_dump_key(info.key)
        if k is None:
            continue
        if k.kind == "record":
            committed.add(k.label)
        objects.setdefault(k.label, []).append(info.key)
    return {label: keys for label, keys in sorted(objects.items()) if label not in committed}


def remove_leftovers(storage: Storage) -> tuple[str, ...]:
    """Delete the objects of interrupted dumps; returns their labels."""
    leftovers = find_leftovers(storage)
    for keys in leftovers.values():
        for key in keys:
            storage.delete(key)
    return tuple(leftovers)


# --- restoring ----------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreResult:
    label: str
    database: str  # the name in the dump
    into: str  # the database restored into
    jobs: int
    size: int
    seconds: float


def _database_exists(conn: Any, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cur.fetchone() is not None


def _decode_to(storage: Storage, key: str, out: BinaryIO, *, sha256: str, keyring, require_encryption: bool) -> None:
    with storage.open(key) as src:
        with codec.decode(src, name=key, keyring=keyring, expected_sha256=sha256,
                          require_encryption=require_encryption) as decoder:
            while block := decoder.read(BLOCK_SIZE):
                out.write(block)


def restore_database(
    storage: Storage,
    dump: DumpRecord,
    database: str,
    *,
    into: str | None = None,
    jobs: int = 1,
    conninfo: str,
    bin_dir: str | None,
    keyring,
    require_encryption: bool = False,
    temp_dir: str | None = None,
) -> RestoreResult:
    """Create database ``into`` (default: its own name) and restore ``database`` of ``dump`` into it.

    Refuses a target that exists. With ``jobs == 1`` the archive streams into
    pg_restore; with more, it is first decoded into a temporary file in
    ``temp_dir`` (room for the whole dump needed). On failure the database this
    call created is dropped.
    """
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    entry = dump.database(database)
    if entry is None:
        raise DumpError(f"dump {dump.label} has no database {database!r}",
                        hint="it holds: " + ", ".join(repr(d.name) for d in dump.databases))
    target = into or database
    with pg.connect(conninfo) as conn:
        version_num = int(conn.info.server_version)
        if _database_exists(conn, target):
            raise DumpError(
                f"database {target!r} already exists on the server; restore-dump never overwrites a database",
                hint="drop it first, or restore under another name with --into NEWNAME",
            )
    server_major = version_num // 10000
    if dump.pg_major_version > server_major:
        raise DumpError(f"dump {dump.label} was taken from PostgreSQL {dump.pg_major_version}; "
                        f"it cannot be restored into PostgreSQL {server_major}",
                        hint=f"restore it into a server of PostgreSQL {dump.pg_major_version} or newer")
    pg_restore = pg_tool("pg_restore", bin_dir=bin_dir, server_major=server_major, action="restore into")

    started = time.monotonic()
    archive_path = None
    try:
        if jobs > 1:
            archive_path = _decode_to_temp_file(storage, entry, keyring=keyring, require_encryption=require_encryption,
                                                temp_dir=temp_dir, jobs=jobs)
        cmd = [pg_restore.path, "--exit-on-error", "--no-password"]
        if target == database:
            # pg_restore creates it from the archive: encoding, locale, owner, database-level
            # settings, grants and comment exactly as dumped.
            restore_conn, env = tool_connection(conninfo)
            cmd.append("--create")
        else:
            _create_database(conninfo, target, entry, server_major=server_major, label=dump.label)
            restore_conn, env = tool_connection(conninfo, dbname=target)
        cmd += ["--dbname", restore_conn]
        try:
            if archive_path is not None:
                _run_restore(cmd + [f"--jobs={jobs}", archive_path], env=env)
            else:
                _stream_restore(cmd, env=env, storage=storage, entry=entry, keyring=keyring,
                                require_encryption=require_encryption)
        except BaseException as exc:
            dropped = _drop_database(conninfo, target, server_major=server_major)
            if isinstance(exc, DumpError):
                raise DumpError(
                    f"restoring database {database!r} of dump {dump.label} into {target!r} failed: {exc.message}",
                    hint=(f"the partly restored database {target!r} was dropped; " if dropped is None else
                          f"the partly restored database {target!r} could not be dropped ({dropped}); ")
                    + "if a role is missing, restore the globals first: "
                    f"pgvault restore-dump {dump.label} --globals",
                ) from None
            raise
    finally:
        if archive_path is not None:
            try:
                os.unlink(archive_path)
            except OSError:
                pass
    return RestoreResult(label=dump.label, database=database, into=target, jobs=jobs, size=entry.size,
                         seconds=round(time.monotonic() - started, 3))


def _decode_to_temp_file(storage: Storage, entry: DumpedDatabase, *, keyring, require_encryption: bool,
                         temp_dir: str | None, jobs: int) -> str:
    """Decode (and verify) the archive into a temporary file: pg_restore --jobs needs to seek."""
    directory = temp_dir or tempfile.gettempdir()
    hint = "give --temp-dir on a filesystem with room for it, or restore with --jobs 1 (streams, no temporary file)"
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise DumpError(f"temporary directory {directory}: {exc.strerror or exc}", hint=hint) from None
    if free < entry.size:
        raise DumpError(f"--jobs {jobs} needs a temporary copy of the dump ({entry.size} bytes) in {directory}, "
                        f"which has only {free} bytes free", hint=hint)
    try:
        fd, path = tempfile.mkstemp(prefix=".pgvault-restore-", suffix=".dump", dir=directory)
    except OSError as exc:
        raise DumpError(f"cannot create a temporary file in {directory}: {exc.strerror or exc}", hint=hint) from None
    try:
        with os.fdopen(fd, "wb") as out:
            _decode_to(storage, entry.key, out, sha256=entry.sha256, keyring=keyring,
                       require_encryption=require_encryption)
    except OSError as exc:
        os.unlink(path)
        raise DumpError(f"cannot write the temporary copy {path}: {exc.strerror or exc}", hint=hint) from None
    except BaseException:
        os.unlink(path)
        raise
    return path


def _create_database(conninfo: str, name: str, entry: DumpedDatabase, *, server_major: int, label: str) -> None:
    """CREATE DATABASE ``name`` like the dumped one (template0, encoding, locale, owner)."""
    import psycopg
    from psycopg import sql

    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
        sql.Identifier(name), sql.Literal(entry.encoding), sql.Literal(entry.collate), sql.Literal(entry.ctype))]
    if server_major >= 15 and entry.locale_provider in ("c", "i"):
        if entry.locale_provider == "i":
            parts.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(entry.icu_locale or "")))
        else:
            parts.append(sql.SQL("LOCALE_PROVIDER libc"))
    parts.append(sql.SQL("OWNER {}").format(sql.Identifier(entry.owner)))
    with pg.connect(conninfo) as conn:
        try:
            conn.execute(sql.SQL(" ").join(parts))
        except psycopg.Error as exc:
            hint = (f"restore the globals first: pgvault restore-dump {label} --globals"
                    if "role" in str(exc) else None)
            raise DumpError(f"cannot create database {name!r}: {_one_line(str(exc))}", hint=hint) from None


def _drop_database(conninfo: str, name: str, *, server_major: int) -> str | None:
    """Drop ``name`` if it exists; None on success, else why not (best effort: a restore already failed)."""
    from psycopg import sql

    force = sql.SQL(" WITH (FORCE)") if server_major >= 13 else sql.SQL("")
    try:
        with pg.connect(conninfo) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)
    except Exception as exc:
        return _one_line(str(exc))
    return None


def _tool_failure(name: str, code: int, errors: BinaryIO) -> DumpError:
    return DumpError(f"{name} failed ({_exit_description(code)}): {_one_line(_read_tail(errors)) or 'no message'}")


def _run_restore(cmd: list[str], *, env: dict[str, str]) -> None:
    with tempfile.TemporaryFile() as errors:
        try:
            code = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                  env=env).returncode
        except OSError as exc:
            raise DumpError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
        if code != 0:
            raise _tool_failure("pg_restore", code, errors)


def _stream_restore(cmd: list[str], *, env: dict[str, str], storage: Storage, entry: DumpedDatabase,
                    keyring, require_encryption: bool) -> None:
    """Decode the archive into pg_restore's stdin; every byte is verified before pg_restore may succeed."""
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        except OSError as exc:
            raise DumpError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
        try:
            with storage.open(entry.key) as src:
                with codec.decode(src, name=entry.key, keyring=keyring, expected_sha256=entry.sha256,
                                  require_encryption=require_encryption) as decoder:
                    piping = True
                    while block := decoder.read(BLOCK_SIZE):
                        if piping:
                            try:
                                proc.stdin.write(block)
                            except BrokenPipeError:
                                piping = False  # pg_restore stopped reading; its exit status says why
                                # Read on anyway: the object is verified only at its end.
        except BaseException:
            # Kill before closing stdin: an EOF could let pg_restore finish with unverified data.
            _stop(proc)
            raise
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        code = proc.wait()
        if code != 0:
            raise _tool_failure("pg_restore", code, errors)


# --- globals --------------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalsResult:
    label: str
    errors: tuple[str, ...]  # psql's ERROR lines: statements that failed (e.g. a role that exists)
    seconds: float


def write_globals(storage: Storage, dump: DumpRecord, out: BinaryIO, *, keyring, require_encryption: bool = False,
                  temp_dir: str | None = None) -> int:
    """Write dump's pg_dumpall script to ``out``, only once it is verified; returns its size."""
    with tempfile.SpooledTemporaryFile(max_size=8 << 20, dir=temp_dir) as buf:
        _decode_to(storage, dump.globals.key, buf, sha256=dump.globals.sha256, keyring=keyring,
                   require_encryption=require_encryption)
        buf.seek(0)
        shutil.copyfileobj(buf, out, BLOCK_SIZE)
        return dump.globals.size


def restore_globals(
    storage: Storage,
    dump: DumpRecord,
    *,
    conninfo: str,
    bin_dir: str | None,
    keyring,
    require_encryption: bool = False,
    temp_dir: str | None = None,
) -> GlobalsResult:
    """Run dump's pg_dumpall --globals-only script with psql (verified first).

    Statements that fail (a role that exists already) do not stop the script,
    as with ``psql -f``; their ERROR lines are returned.
    """
    with pg.connect(conninfo):
        pass  # fail early and clearly when the server is unreachable
    psql = find_pg_tool("psql", bin_dir=bin_dir)
    started = time.monotonic()
    with tempfile.TemporaryFile(dir=temp_dir) as script, tempfile.TemporaryFile() as errors:
        _decode_to(storage, dump.globals.key, script, sha256=dump.globals.sha256, keyring=keyring,
                   require_encryption=require_encryption)
        script.seek(0)
        psql_conn, env = tool_connection(conninfo)
        cmd = [psql, "--no-psqlrc", "--quiet", "--no-password", "--set", "ON_ERROR_STOP=0",
               "--dbname", psql_conn]
        try:
            code = subprocess.run(cmd, stdin=script, stdout=subprocess.DEVNULL, stderr=errors, env=env).returncode
        except OSError as exc:
            raise DumpError(f"cannot run {psql}: {exc.strerror or exc}") from None
        if code != 0:
            raise DumpError(f"restoring the globals of dump {dump.label} failed: psql {_exit_description(code)}: "
                            f"{_one_line(_read_tail(errors)) or 'no message'}")
        errors.seek(0)
        lines = errors.read().decode("utf-8", "replace").splitlines()
    failed = tuple(line.strip() for line in lines if "ERROR:" in line)
    return GlobalsResult(label=dump.label, errors=failed, seconds=round(time.monotonic() - started, 3))

