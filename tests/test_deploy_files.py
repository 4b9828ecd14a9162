"""The example config in deploy/ loads, documents every key, and matches the defaults."""

import tomllib
from pathlib import Path

from pgvault.config import describe_env_overrides, load_settings

ROOT = Path(__file__).parents[1]


def test_example_config_loads_and_names_every_key():
    path = ROOT / "deploy" / "pgvault.toml"
    settings = load_settings(str(path), environ={})
    assert settings.vault.url == "file:///var/lib/pgvault/vault"
    text = path.read_text()
    for _env, dotted, _default in describe_env_overrides():
        section, key = dotted.split(".")
        assert f"[{section}]" in text, f"deploy/pgvault.toml lacks [{section}]"
        assert f"{key} = " in text or f"# {key} = " in text, f"deploy/pgvault.toml lacks {dotted}"
    tomllib.loads(text)


def test_postgresql_snippet_uses_pgvault_for_both_commands():
    text = (ROOT / "deploy" / "postgresql.conf.snippet").read_text()
    assert "archive_command = 'pgvault --config /etc/pgvault/pgvault.toml wal-push %p'" in text
    assert "restore_command = 'pgvault --config /etc/pgvault/pgvault.toml wal-fetch %f %p'" in text
