"""Where the config file is, and the environment variable of each key.

Kept apart from `config` (which builds dataclasses) so the archive_command fast
path can find its three settings with nothing heavier than tomllib.
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
