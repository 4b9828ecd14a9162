"""`pgvault check` without a server: the archive_command reading, the encryption item, and
items that cannot be checked still listed (as failed)."""

from __future__ import annotations

import os

import pytest

from pgvault import checks, keys
from pgvault.checks import ITEMS, WalPushCommand, archive_command_check, parse_wal_push_command, run_checks
from pgvault.config import load_settings
from pgvault.errors import ConfigError
from pgvault.pg import ServerFacts
from pgvault.storage.local import LocalStorage
from pgvault.vault import init_vault

NO_POSTGRES = "host=127.0.0.1 port=9 connect_timeout=2"  # nothing listens on port 9: refused at once


@pytest.mark.parametrize("command, config", [
    ("pgvault wal-push %p", None),
    ('"/opt/my venv/bin/pgvault" --config "/etc/pg vault/p.toml" wal-push "%p"', "/etc/pg vault/p.toml"),
    ("/usr/bin/pgvault --config=/etc/p.toml --debug wal-push %p", "/etc/p.toml"),
    ("PGVAULT_CONFIG=/etc/p.toml exec pgvault wal-push %p", "/etc/p.toml"),
    ("pgvault wal-push %p 2>>/var/log/pgvault.log", None),
    ("pgvault wal-push %p # archived by pgvault", None),
])
def test_archive_commands_that_run_wal_push(command, config):
    assert parse_wal_push_command(command) == WalPushCommand(config=config)


@pytest.mark.parametrize("command", [
    "true # pgvault wal-push %p",  # a comment: the server runs `true`
    "echo pgvault wal-push %p",
    "pgvault wal-push %p || true",  # the exit status is no longer pgvault's
    "pgvault wal-push %p; true",
    "test -f /x && pgvault wal-push %p",
    "pgvault wal-push %p | cat",
    "(pgvault wal-push %p)",
    "pgvault wal-push %p &",
    "pgvault wal-push %f",
    "pgvault wal-push %p extra",
    "pgvault wal-fetch %f %p",
    "pgvault --unknown wal-push %p",
    'pgvault wal-push "%p',  # unbalanced quote: /bin/sh fails
    "/bin/false",
    "",
])
def test_archive_commands_that_do_not(command):
    assert parse_wal_push_command(command) is None


def test_a_comment_is_not_an_archive_command():
    item = archive_command_check("true # pgvault wal-push %p", config_source="built-in defaults",
                                 data_directory="/pg", default_config="/nonexistent")
    assert not item.ok
    assert item.detail == "archive_command = 'true # pgvault wal-push %p' does not run pgvault wal-push %p"
    assert item.hint == "set archive_command = 'pgvault wal-push %p' and reload PostgreSQL"


def test_the_hint_for_a_relative_config_names_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    item = archive_command_check("/bin/true", config_source="a1.toml", data_directory="/pg",
                                 default_config="/nonexistent")
    assert item.hint == f"set archive_command = 'pgvault --config {tmp_path}/a1.toml wal-push %p' and reload PostgreSQL"
    spaced = tmp_path / "with space"
    spaced.mkdir()
    monkeypatch.chdir(spaced)
    item = archive_command_check("/bin/true", config_source="a1.toml", data_directory="/pg",
                                 default_config="/nonexistent")
    assert item.hint == (f"set archive_command = 'pgvault --config \"{spaced}/a1.toml\" wal-push %p' "
                         "and reload PostgreSQL")


@pytest.mark.parametrize("command, source, ok", [
    ("pgvault --config /etc/a.toml wal-push %p", "/etc/a.toml", True),
    ("pgvault --config /etc/b.toml wal-push %p", "/etc/a.toml", False),  # another vault, maybe
    ("pgvault --config conf/a.toml wal-push %p", "/pg/conf/a.toml", True),  # relative to the data directory
    ("pgvault wal-push %p", "/etc/a.toml", False),  # wal-push would not read /etc/a.toml
    ("pgvault wal-push %p", "built-in defaults", True),
    ("pgvault --config /etc/a.toml wal-push %p", "built-in defaults", False),
])
def test_archive_command_must_read_the_config_this_check_read(command, source, ok):
    item = archive_command_check(command, config_source=source, data_directory="/pg", default_config="/nonexistent")
    assert item.ok is ok, item


def test_without_config_wal_push_reads_the_default_file(tmp_path):
    default = tmp_path / "pgvault.toml"
    default.write_text("")
    item = archive_command_check("pgvault wal-push %p", config_source=str(default), data_directory="/pg",
                                 default_config=str(default))
    assert item.ok, item


def test_server_setting_checks_judge_the_servers_own_settings():
    facts = ServerFacts(system_identifier=1, version_num=150000, data_directory="/pg", wal_level="minimal",
                        archive_mode="off", archive_command="true # pgvault wal-push %p", in_recovery=False,
                        timeline=1, wal_segment_size=16 << 20)
    items = checks.server_setting_checks(facts, config_source="built-in defaults", default_config="/nonexistent")
    assert [(i.name, i.ok) for i in items] == [("wal_level", False), ("archive_mode", False), ("archive_command", False)]


def settings_for(tmp_path, *, url: str | None = None, key_file: str | None = None):
    text = f'[vault]\nurl = "{url or f"file://{tmp_path}/vault"}"\n[postgres]\nconninfo = "{NO_POSTGRES}"\n'
    if key_file:
        text += f'[encryption]\nkey_file = "{key_file}"\n'
    path = tmp_path / "pgvault.toml"
    path.write_text(text)
    return load_settings(str(path), environ={})


def by_name(items):
    assert [i.name for i in items] == list(ITEMS)  # every item, always, in order
    return {i.name: i for i in items}


def test_items_that_depend_on_an_unreachable_vault_or_server_are_listed_as_failed(tmp_path):
    items = by_name(run_checks(settings_for(tmp_path, url="file:///dev/null/vault")))
    assert items["config valid"].ok
    assert not items["vault reachable and writable"].ok and not items["PostgreSQL reachable"].ok
    for name in ("vault initialized for this cluster", "encryption key"):
        assert (items[name].ok, items[name].detail) == (False, "not checked")
        assert items[name].hint == "could not be checked: the vault is not reachable (see above)"
    for name in ("wal_level", "archive_mode", "archive_command", "WAL archiving"):
        assert (items[name].ok, items[name].detail) == (False, "not checked")
        assert items[name].hint == "could not be checked: PostgreSQL is not reachable (see above)"


def test_an_invalid_config_lists_every_item_as_failed():
    items = by_name(checks.config_failed(ConfigError("c.toml: [vault] url = 'ftp://x': unknown scheme 'ftp'")))
    assert not items["config valid"].ok and items["config valid"].detail.startswith("c.toml: [vault] url")
    assert all(not i.ok and i.hint == "could not be checked: the config is invalid (see above)"
               for name, i in items.items() if name != "config valid")


def make_vault(tmp_path, *, encrypted: bool) -> str | None:
    storage = LocalStorage(str(tmp_path / "vault" / "main"))
    key_id = key_file = None
    if encrypted:
        master = keys.generate_master_key_file(str(tmp_path / "master.key"))
        key_id, key_file = keys.create_vault_key(storage, master).key_id, master.path
    init_vault(storage, cluster="main", system_identifier=42, pg_major_version=15, wal_segment_size=16 << 20,
               encryption_key_id=key_id)
    return key_file


@pytest.mark.parametrize("encrypted", [True, False])
def test_the_encryption_item_passes_when_config_and_record_agree(tmp_path, encrypted):
    key_file = make_vault(tmp_path, encrypted=encrypted)
    item = by_name(run_checks(settings_for(tmp_path, key_file=key_file)))["encryption key"]
    assert item.ok, item
    if encrypted:
        assert item.detail.startswith(f"key file {key_file} unlocks vault key ")
    else:
        assert item.detail == "off: the vault is not encrypted and [encryption] key_file is not set"


def test_the_encryption_item_fails_on_an_encrypted_vault_without_a_key(tmp_path):
    make_vault(tmp_path, encrypted=True)
    item = by_name(run_checks(settings_for(tmp_path)))["encryption key"]
    assert not item.ok
    assert item.detail.endswith("but no encryption key is configured ([encryption] key_file is not set)")


def test_the_encryption_item_fails_on_an_unencrypted_vault_with_a_key(tmp_path):
    make_vault(tmp_path, encrypted=False)
    key_file = keys.generate_master_key_file(str(tmp_path / "master.key")).path
    item = by_name(run_checks(settings_for(tmp_path, key_file=key_file)))["encryption key"]
    assert not item.ok
    assert item.detail.endswith(f"but [encryption] key_file is set ({key_file})")
    assert not os.path.exists(tmp_path / "vault" / "main" / "keys")  # checking wrote no key
