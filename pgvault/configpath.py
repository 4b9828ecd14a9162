"""Where the config file is, the environment variable of each key, and a scanner for plain TOML.

Kept apart from `config` (its settings records and checks) so the archive_command
fast path can find its three settings with the standard library's os alone.
"""

from __future__ import annotations

import os
TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the archive fast path ~2 ms

if TYPE_CHECKING:
    from typing import Mapping

DEFAULT_CONFIG_PATH = "/etc/pgvault/pgvault.toml"
DEFAULT_SPOOL_DIR = "/var/lib/pgvault/spool"


def env_var_name(section: str, key: str) -> str:
    return f"PGVAULT_{section.upper()}_{key.upper()}"


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str], *,
                        default_path: str = DEFAULT_CONFIG_PATH) -> str | None:
    if cli_path:
        return cli_path
    if environ.get("PGVAULT_CONFIG"):
        return environ["PGVAULT_CONFIG"]
    if os.path.exists(default_path):
        return default_path
    return None


def _bare(name: str) -> bool:
    """A TOML bare key made of the characters pgvault's keys use."""
    return name.isascii() and name.replace("_", "").isalnum()


def _decimal(word: str) -> bool:
    """A TOML integer in plain decimal: no sign but '-', no leading zero, no underscores."""
    digits = word[1:] if word.startswith("-") else word
    return digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0")


def scan_config(text: str) -> dict[str, object] | None:
    """What tomllib.loads(text) returns, for a plain file of `[section]` and `key = value` lines; None when unsure.

    importing tomllib costs archive_command ~4-10 ms per WAL segment, and
    pgvault's own config files are plain. Anything this does not read exactly
    as TOML would (escapes, arrays, inline tables, dotted keys or sections,
    multi-line strings, floats, repeated keys) makes it give up, and tomllib
    parses the file instead (and reports its errors).
    """
    document: dict[str, object] = {}
    values: dict[str, object] = document  # the table the next key goes into
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if line.startswith("[[") or not line.endswith("]"):
                return None
            section = line[1:-1].strip()
            if not _bare(section) or section in document:
                return None
            values = document[section] = {}
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _bare(key) or key in values:
            return None
        if value[:1] in ("'", '"'):
            quote = value[0]
            close = value.find(quote, 1)
            rest = value[close + 1:].strip() if close > 0 else "x"
            if close < 0 or value.startswith(quote * 3) or (quote == '"' and "\\" in value[:close]) \
                    or (rest and not rest.startswith("#")) or any(c < " " and c != "\t" for c in value[:close]):
                return None
            values[key] = value[1:close]
        else:
            word = value.split("#", 1)[0].strip()
            if word in ("true", "false"):
                values[key] = word == "true"
            elif _decimal(word):
                values[key] = int(word)
            else:
                return None
    return document
