"""Configuration: one TOML file plus ``PGVAULT_<SECTION>_<KEY>`` overrides → frozen Settings.

Where the file comes from, first match wins: ``--config FILE``, ``$PGVAULT_CONFIG``,
``/etc/pgvault/pgvault.toml`` (if it exists), else built-in defaults only. Every
key has a default, so pgvault runs with no configuration at all. Errors name the
file, the key, what was given and what was expected.

This is the only module that reads the environment for settings; everything
below the CLI receives explicit values.

The settings records are NamedTuples, not dataclasses: archive_command loads
this module once per WAL segment, and importing dataclasses (inspect, ast, dis…)
and building its classes cost more than a third of a sync push's Python start-up.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from pgvault import configpath
from pgvault.configpath import env_var_name
from pgvault.errors import ConfigError

DEFAULT_CONFIG_PATH = configpath.DEFAULT_CONFIG_PATH
DEFAULT_VAULT_URL = "file:///var/lib/pgvault/vault"
DEFAULT_SPOOL_DIR = configpath.DEFAULT_SPOOL_DIR


class VaultSettings(NamedTuple):
    url: str = DEFAULT_VAULT_URL
    endpoint_url: str | None = None
    region: str | None = None
    cluster: str = "main"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    sse: str | None = None

    def __repr__(self) -> str:  # never print the secret
        shown = self._replace(secret_access_key="********" if self.secret_access_key else None)
        return "VaultSettings(" + ", ".join(f"{k}={v!r}" for k, v in zip(self._fields, shown)) + ")"


class PostgresSettings(NamedTuple):
    data_dir: str | None = None
    conninfo: str = ""
    bin_dir: str | None = None


class EncryptionSettings(NamedTuple):
    key_file: str | None = None


class CompressionSettings(NamedTuple):
    algorithm: str = "zstd"
    level: int = 3
    threads: int = 2


class ArchiveSettings(NamedTuple):
    async_: bool = False
    spool_dir: str = DEFAULT_SPOOL_DIR
    # Two pushes per CPU, at most 4: part of each push is waiting for its fsync, which a second
    # one fills (scripts/bench_archive.py, 41 .ready segments on 2 CPUs: 41 segments/s with 4,
    # 36-39 with 2).
    parallel: int = min(2 * (os.cpu_count() or 1), 4)
    prefetch: int = 8
    # zstd level for WAL: on WAL, level 1 is about twice as fast as 3 and compresses as well
    # (measured by scripts/bench_archive.py), and archive_command runs once per segment.
    compression_level: int = 1


class BackupSettings(NamedTuple):
    parallel: int = 2
    from_: str = "any"  # "from" is a Python keyword; the TOML key is "from"
    block_size_kib: int = 256
    wal_timeout: int = 120


class ScheduleSettings(NamedTuple):
    """`pgvault daemon`'s cron strings (unset: that job does not run) and how missed runs are handled."""

    full: str | None = None
    incremental: str | None = None
    dump: str | None = None
    verify: str | None = None
    expire: str | None = None
    drill: str | None = None
    timezone: str = "UTC"
    catch_up: str = "1h"  # a run missed while the daemon was down runs at start-up if this recent
    jitter: str = "0s"  # each run starts up to this long after its time


class MetricsSettings(NamedTuple):
    listen: str = "127.0.0.1:9187"  # host:port of the daemon's /metrics; empty: no metrics server


class RetentionSettings(NamedTuple):
    """`pgvault expire`: unset keys keep everything they govern (no [retention] at all removes nothing)."""

    full: int | None = None  # keep the N newest full backups, with their incrementals
    window: str | None = None  # keep every point of this recent past restorable, e.g. "14d"
    dumps: int | None = None  # keep the N newest logical dumps


class Settings(NamedTuple):
    source: str  # the file the settings came from, or "built-in defaults"
    vault: VaultSettings = VaultSettings()
    postgres: PostgresSettings = PostgresSettings()
    encryption: EncryptionSettings = EncryptionSettings()
    compression: CompressionSettings = CompressionSettings()
    archive: ArchiveSettings = ArchiveSettings()
    backup: BackupSettings = BackupSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    metrics: MetricsSettings = MetricsSettings()
    retention: RetentionSettings = RetentionSettings()


_SECTIONS: dict[str, type] = {
    "vault": VaultSettings,
    "postgres": PostgresSettings,
    "encryption": EncryptionSettings,
    "compression": CompressionSettings,
    "archive": ArchiveSettings,
    "backup": BackupSettings,
    "schedule": ScheduleSettings,
    "metrics": MetricsSettings,
    "retention": RetentionSettings,
}

# Constraints beyond the type: key -> (check, what is expected). A check returns
# True or False, or a string saying what is wrong (put before what is expected).
_CHOICES: dict[tuple[str, str], tuple[Any, str]] = {
    ("compression", "algorithm"): (lambda v: v in ("zstd", "none"), '"zstd" or "none"'),
    ("compression", "level"): (lambda v: 1 <= v <= 19, "an integer from 1 to 19"),
    ("compression", "threads"): (lambda v: 0 <= v <= 64, "an integer from 0 to 64"),
    ("vault", "url"): (lambda v: _storage().vault_url_problem(v) or True,
                       "a URL file:///absolute/path or s3://bucket/optional/prefix"),
    ("vault", "cluster"): (lambda v: _storage().is_valid_key_part(v),
                           'a name of letters, digits, "_", "-" and "." (not first), e.g. "main"'),
    ("vault", "sse"): (lambda v: v in ("AES256", "aws:kms"), '"AES256" or "aws:kms"'),
    ("archive", "parallel"): (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
    ("archive", "prefetch"): (lambda v: 0 <= v <= 256, "an integer from 0 to 256"),
    ("archive", "compression_level"): (lambda v: 1 <= v <= 19, "an integer from 1 to 19"),
    ("backup", "parallel"): (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
    ("backup", "from"): (lambda v: v in ("primary", "standby", "any"), '"primary", "standby" or "any"'),
    # a power of two from 8 KiB (one PostgreSQL page) to 64 MiB (one data object)
    ("backup", "block_size_kib"): (lambda v: 8 <= v <= 65536 and v & (v - 1) == 0,
                                   "a power of two from 8 to 65536"),
    ("backup", "wal_timeout"): (lambda v: 1 <= v <= 86400, "an integer from 1 to 86400 (seconds)"),
    **{("schedule", job): (lambda v: _schedule().is_valid_cron(v),
                           ('a cron expression: 5 fields (minute hour day month weekday, e.g. "0 2 * * *"), '
                            'or 6 with seconds last (e.g. "* * * * * */30")'))
       for job in ("full", "incremental", "dump", "verify", "expire", "drill")},
    ("schedule", "timezone"): (lambda v: _schedule().is_valid_timezone(v), 'an IANA time zone such as "UTC" or "Europe/Berlin"'),
    ("schedule", "catch_up"): (lambda v: _is_duration(v), 'a duration such as "0", "90s", "30m", "1h" or "1d"'),
    ("schedule", "jitter"): (lambda v: _is_duration(v), 'a duration such as "0", "90s", "30m", "1h" or "1d"'),
    ("metrics", "listen"): (lambda v: v == "" or _is_listen_address(v), 'HOST:PORT (e.g. "127.0.0.1:9187"), or "" for none'),
    ("retention", "full"): (lambda v: 1 <= v <= 10000, "an integer from 1 to 10000 (full backups to keep)"),
    ("retention", "window"): (lambda v: _is_window(v), 'a duration: a number and a unit s, m, h, d or w, e.g. "14d"'),
    ("retention", "dumps"): (lambda v: 1 <= v <= 10000, "an integer from 1 to 10000 (dumps to keep)"),
}


def _storage():
    # What a vault URL and a cluster name may be is the storage layer's to say. Imported
    # when checked: wal-push imports the storage package anyway, `pgvault config` need not.
    import pgvault.storage

    return pgvault.storage


def _schedule():
    # imported only when [schedule] is set: croniter is not needed otherwise
    from pgvault import schedule

    return schedule


def _is_duration(value: str) -> bool:
    try:
        _schedule().parse_duration(value)
    except ValueError:
        return False
    return True


def _is_window(value: str) -> bool:
    from pgvault.retention import parse_window  # standard library only at import

    try:
        parse_window(value)
    except ValueError:
        return False
    return True


def _is_listen_address(value: str) -> bool:
    _host, sep, port = value.rpartition(":")
    return bool(sep) and port.isdigit() and 1 <= int(port) <= 65535


def _toml_name(attr: str) -> str:
    return attr.rstrip("_")  # "async" is a Python keyword, stored as async_


class _Field(NamedTuple):
    name: str  # the attribute (async_), not the TOML key (async)
    type: str  # the annotation as written, e.g. "int | None"
    default: Any


def _fields(section_cls: Any) -> dict[str, _Field]:
    """TOML key -> field of a settings section."""
    return {_toml_name(name): _Field(name, section_cls.__annotations__[name], section_cls._field_defaults[name])
            for name in section_cls._fields}


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """{"source": …, section: {TOML key: value}} for `pgvault config` (secrets included: hide them there)."""
    data: dict[str, Any] = {"source": settings.source}
    for section in _SECTIONS:
        values = getattr(settings, section)
        data[section] = {_toml_name(name): value for name, value in zip(values._fields, values)}
    return data


def _expected(type_str: str) -> str:
    if "bool" in type_str:
        return "true or false"
    if "int" in type_str:
        return "an integer"
    return "a string"


def _coerce(value: Any, type_str: str, *, from_env: bool) -> Any:
    """Convert ``value`` to the field type; raise ValueError if it is not one."""
    if "bool" in type_str:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError
    if "int" in type_str:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError
    if isinstance(value, str):
        return value
    raise ValueError


def _parse_toml(text: str) -> dict[str, Any]:
    """tomllib's result; plain files (all of pgvault's) are read without importing it (archive_command pays per call)."""
    document = configpath.scan_config(text)
    if document is None:
        import tomllib

        document = tomllib.loads(text)
    return document


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", hint="give an existing file with --config or $PGVAULT_CONFIG") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user", hint="the postgres user must be able to read it for archive_command") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    try:
        return _parse_toml(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


#: Sections only the daemon and its jobs read, whose checks need heavy imports (croniter,
#: zoneinfo, dataclasses): ~25 ms that archive_command would pay once per segment.
DAEMON_SECTIONS = ("schedule", "retention")


def load_settings(cli_path: str | None = None, environ: Mapping[str, str] | None = None, *,
                  default_path: str | None = None, check_daemon_sections: bool = True) -> Settings:
    """Read the config file (if any) and environment overrides into Settings.

    ``default_path`` (default: /etc/pgvault/pgvault.toml) is the file read, if it
    exists, when neither ``cli_path`` nor $PGVAULT_CONFIG names one; a parameter
    so that tests need not write to /etc. ``check_daemon_sections=False`` (the WAL
    commands) checks the keys of DAEMON_SECTIONS for their type only, not their
    syntax: those commands never read them, and a typo in a cron schedule must not
    stop archiving (`pgvault check` and the daemon still report it).
    """
    environ = os.environ if environ is None else environ
    default_path = DEFAULT_CONFIG_PATH if default_path is None else default_path
    path = configpath.resolve_config_path(cli_path, environ, default_path=default_path)
    raw = _read_file(path) if path else {}
    source = path or "built-in defaults"

    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]; known sections: "
            + ", ".join(f"[{s}]" for s in _SECTIONS)
        )
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section} must be a table ([{section}]), got {table!r}")
        fields = _fields(cls)
        for key in table:
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in [{section}]; known keys: " + ", ".join(fields)
                )
        values: dict[str, Any] = {}
        for key, fld in fields.items():
            where, value, from_env = None, None, False
            env_name = env_var_name(section, key)
            if environ.get(env_name, "") != "":
                where, value, from_env = f"environment variable {env_name}", environ[env_name], True
            elif key in table:
                where, value = f"{source}: [{section}] {key}", table[key]
            else:
                continue
            type_str = str(fld.type)
            try:
                value = _coerce(value, type_str, from_env=from_env)
            except ValueError:
                raise ConfigError(f"{where} = {value!r}: expected {_expected(type_str)}") from None
            check = _CHOICES.get((section, key))
            if section in DAEMON_SECTIONS and not check_daemon_sections:
                check = None
            verdict = check[0](value) if check else True
            if isinstance(verdict, str) or not verdict:
                problem = f"{verdict}; " if isinstance(verdict, str) else ""
                raise ConfigError(f"{where} = {value!r}: {problem}expected {check[1]}")
            values[fld.name] = value
        sections[section] = cls(**values)
    return Settings(source=source, **sections)


def describe_env_overrides() -> list[tuple[str, str, Any]]:
    """(environment variable, section.key, default) for every key — used by docs and `pgvault config`."""
    rows = []
    for section, cls in _SECTIONS.items():
        for key, fld in _fields(cls).items():
            rows.append((env_var_name(section, key), f"{section}.{key}", fld.default))
    return rows
