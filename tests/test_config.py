"""Config loading: defaults, file, environment overrides, and errors that name file, key, value, expectation."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgvault.config import DEFAULT_VAULT_URL, describe_env_overrides, load_settings
from pgvault.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "pgvault.toml"
    path.write_text(text)
    return str(path)


def test_no_config_at_all_gives_working_defaults(tmp_path):
    s = load_settings(None, environ={}, default_path=str(tmp_path / "absent.toml"))
    assert s.source == "built-in defaults"
    assert s.vault.url == DEFAULT_VAULT_URL
    assert s.vault.cluster == "main"
    assert s.compression.algorithm == "zstd" and s.compression.level == 3
    assert s.encryption.key_file is None
    assert s.postgres.conninfo == ""  # libpq's environment decides


def test_file_values_are_read(tmp_path):
    path = write(tmp_path, """
[vault]
url = "s3://bucket/pfx"
endpoint_url = "http://127.0.0.1:9000"
cluster = "prod"
[postgres]
data_dir = "/srv/pg"
[compression]
algorithm = "none"
level = 5
[archive]
async = true
parallel = 3
""")
    s = load_settings(path, environ={})
    assert s.source == path
    assert (s.vault.url, s.vault.endpoint_url, s.vault.cluster) == ("s3://bucket/pfx", "http://127.0.0.1:9000", "prod")
    assert s.postgres.data_dir == "/srv/pg"
    assert (s.compression.algorithm, s.compression.level) == ("none", 5)
    assert s.archive.async_ is True and s.archive.parallel == 3


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, '[vault]\nurl = "file:///a"\n[archive]\nasync = false\n')
    s = load_settings(path, environ={
        "PGVAULT_VAULT_URL": "file:///b",
        "PGVAULT_POSTGRES_DATA_DIR": "/data",
        "PGVAULT_COMPRESSION_LEVEL": "7",
        "PGVAULT_ARCHIVE_ASYNC": "yes",
    })
    assert s.vault.url == "file:///b"
    assert s.postgres.data_dir == "/data"
    assert s.compression.level == 7
    assert s.archive.async_ is True


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, '[vault]\ncluster = "from-env"\n')
    assert load_settings(None, environ={"PGVAULT_CONFIG": path}).vault.cluster == "from-env"


def test_the_default_path_is_read_when_nothing_else_names_a_file(tmp_path):
    default = write(tmp_path, '[vault]\ncluster = "from-default"\n')
    assert load_settings(None, environ={}, default_path=default).source == default
    assert load_settings(None, environ={}, default_path=default).vault.cluster == "from-default"
    other = tmp_path / "other.toml"
    other.write_text('[vault]\ncluster = "named"\n')
    # --config and $PGVAULT_CONFIG come first; the default file is not even read then
    assert load_settings(str(other), environ={}, default_path=default).vault.cluster == "named"
    assert load_settings(None, environ={"PGVAULT_CONFIG": str(other)}, default_path=default).vault.cluster == "named"


def test_the_default_path_is_etc_pgvault():
    from pgvault.config import DEFAULT_CONFIG_PATH
    from pgvault.configpath import resolve_config_path

    assert DEFAULT_CONFIG_PATH == "/etc/pgvault/pgvault.toml"
    assert resolve_config_path(None, {}) == (DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH).exists() else None)


@pytest.mark.parametrize("url, problem", [
    ("ftp://x/y", "unknown scheme 'ftp'"),
    ("file://host/srv/vault", "a file:// URL must not name a host (this one names 'host')"),
    ("file:relative/vault", "the path of a file:// URL must be absolute"),
    ("s3:///prefix", "no bucket named"),
    ("/srv/vault", "not a URL"),
])
def test_a_bad_vault_url_names_the_file_or_variable_key_value_and_expectation(tmp_path, url, problem):
    expected = "expected a URL file:///absolute/path or s3://bucket/optional/prefix"
    path = write(tmp_path, f'[vault]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert str(err.value) == f"{path}: [vault] url = {url!r}: {problem}; {expected}"
    assert err.value.exit_code == 10
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={"PGVAULT_CONFIG": write(tmp_path, ""), "PGVAULT_VAULT_URL": url})
    assert str(err.value) == f"environment variable PGVAULT_VAULT_URL = {url!r}: {problem}; {expected}"


@pytest.mark.parametrize("cluster", ["my cluster", "a/b", ".hidden", "", "ü"])
def test_a_bad_cluster_name_is_a_config_error(tmp_path, cluster):
    expected = 'expected a name of letters, digits, "_", "-" and "." (not first), e.g. "main"'
    path = write(tmp_path, f'[vault]\ncluster = "{cluster}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert str(err.value) == f"{path}: [vault] cluster = {cluster!r}: {expected}"
    if cluster:  # an empty variable means "not set"
        with pytest.raises(ConfigError) as err:
            load_settings(None, environ={"PGVAULT_CONFIG": write(tmp_path, ""), "PGVAULT_VAULT_CLUSTER": cluster})
        assert str(err.value) == f"environment variable PGVAULT_VAULT_CLUSTER = {cluster!r}: {expected}"


def test_good_vault_urls_and_cluster_names_are_accepted(tmp_path):
    for url in ("file:///srv/vault", "file://localhost/srv/vault", "s3://bucket", "s3://bucket/a/b"):
        assert load_settings(None, environ={"PGVAULT_CONFIG": write(tmp_path, ""), "PGVAULT_VAULT_URL": url}).vault.url == url
    for cluster in ("main", "prod-eu_1", "v15.4"):
        path = write(tmp_path, f'[vault]\ncluster = "{cluster}"\n')
        assert load_settings(path, environ={}).vault.cluster == cluster


def test_wrong_type_names_file_key_value_and_expectation(tmp_path):
    path = write(tmp_path, '[compression]\nlevel = "high"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert str(err.value) == f"{path}: [compression] level = 'high': expected an integer"


def test_out_of_range_value(tmp_path):
    path = write(tmp_path, '[compression]\nalgorithm = "lz4"\n')
    with pytest.raises(ConfigError, match=r'\[compression\] algorithm = \'lz4\': expected "zstd" or "none"'):
        load_settings(path, environ={})


def test_bad_environment_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={"PGVAULT_CONFIG": write(tmp_path, ""), "PGVAULT_ARCHIVE_PARALLEL": "many"})
    assert str(err.value) == "environment variable PGVAULT_ARCHIVE_PARALLEL = 'many': expected an integer"


def test_unknown_key_and_section_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'ulr' in \[vault\]; known keys: url,"):
        load_settings(write(tmp_path, '[vault]\nulr = "x"\n'), environ={})
    with pytest.raises(ConfigError, match=r"unknown section \[valt\]"):
        load_settings(write(tmp_path, '[valt]\nurl = "x"\n'), environ={})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "nope.toml"), environ={})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(write(tmp_path, "[vault\nurl="), environ={})


def test_every_key_has_a_documented_environment_variable():
    names = {env for env, _key, _default in describe_env_overrides()}
    assert {"PGVAULT_VAULT_URL", "PGVAULT_POSTGRES_DATA_DIR", "PGVAULT_ENCRYPTION_KEY_FILE",
            "PGVAULT_COMPRESSION_ALGORITHM", "PGVAULT_ARCHIVE_ASYNC"} <= names
    with open(Path(__file__).parents[1] / "README.md") as f:
        readme = f.read()
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"README does not document {missing}"


# archive_command reads its config without tomllib; where the scanner is unsure it must say so.
from pgvault.configpath import scan_config  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ('[archive]\nasync = true\nspool_dir = "/s p"\n[vault]\ncluster = \'east\'  # c\n',
     {"archive": {"async": True, "spool_dir": "/s p"}, "vault": {"cluster": "east"}}),
    ("# only a comment\n\n[archive]\nparallel = 4\nasync = false\n",
     {"archive": {"parallel": 4, "async": False}}),
    ('[vault]\nurl = "s3://b/p" # trailing\n[empty]\n', {"vault": {"url": "s3://b/p"}, "empty": {}}),
])
def test_fast_path_scanner_reads_plain_lines(text, expected):
    import tomllib

    assert scan_config(text) == expected == tomllib.loads(text)


@pytest.mark.parametrize("text", [
    '[archive]\nspool_dir = "C:\\\\x"\n',      # an escape
    "[archive]\nspool_dir = '''x'''\n",        # a multi-line string
    "[archive]\nasync = [true]\n",             # an array
    "archive.async = true\n",                  # a dotted key
    "[[archive]]\nasync = true\n",             # an array of tables
    '[archive]\nspool_dir = "a" "b"\n',        # junk after the value
    "[archive]\nasync = yes\n",                # not TOML
    "[archive]\nparallel = 1\nparallel = 2\n",  # a repeated key (tomllib refuses it)
    "[archive]\n[archive]\n",                  # a repeated table
    "[archive]\nparallel = 007\n",             # a leading zero
    "[archive]\nparallel = --5\n",             # not a number
    "[archive]\nparallel = 1_000\n",           # underscores: TOML, but not plain
    "[archive.x]\nasync = true\n",             # a dotted table
    "[archivé]\nasync = true\n",               # not a bare key
])
def test_fast_path_scanner_gives_up_when_unsure(text):
    assert scan_config(text) is None


_LINE = st.sampled_from([
    "[vault]", "[archive]", "[ archive ]", "[a.b]", "[[x]]", "", "# c", "   ",
    "url = 'file:///v'", 'url = "s3://b/p" # c', 'url = "a\\tb"', "url = 'x'y", 'k = ""', "k = ''",
    "parallel = 4", "parallel = -0", "parallel = 04", "parallel = +4", "parallel = 4#c", "parallel = 1.5",
    "async = true", "async = false", "async = True", "async=", "= 1", "a b = 1", "k = [1]", "k = {a = 1}",
    "k = '''x'''", 'k = "x\x01"', "k = 'tab\there'", "k = 'quote\"in'", "k = 12345678901234567890",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE, max_size=8))
def test_scanner_agrees_with_tomllib_whenever_it_answers(lines):
    import tomllib

    text = "\n".join(lines) + "\n"
    scanned = scan_config(text)
    if scanned is None:
        return  # tomllib decides, and reports its own errors
    assert tomllib.loads(text) == scanned


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[vault]\nurl = '\xff'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), environ={})
    assert str(err.value) == f"config file {path} is not UTF-8 text (byte 15)"
