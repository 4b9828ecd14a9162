"""Storage backends, chosen by the vault URL's scheme.

``open_storage`` returns a backend rooted at one cluster's part of the vault
(``<vault>/<cluster>/``), so the rest of pgvault addresses objects with keys
relative to its own cluster. The S3 backend is imported only when used: boto3
costs ~150 ms to import, and the archive_command fast path must not pay it.
"""

from __future__ import annotations

from pgvault.errors import ConfigError
from pgvault.storage.base import ObjectInfo, Storage, is_valid_key_part, validate_key

__all__ = ["ObjectInfo", "Storage", "open_storage", "validate_key", "is_valid_key_part", "vault_url_problem", "SCHEMES"]

SCHEMES = ("file", "s3")


def open_storage(
    url: str,
    *,
    cluster: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    sse: str | None = None,
    create: bool = True,
) -> Storage:
    """The backend for ``url`` (``file:///path`` or ``s3://bucket/prefix``), rooted at ``cluster``.

    Settings are checked when the config is loaded (with the file or variable
    named); these checks repeat them for callers that pass values of their own.
    """
    validate_key(cluster)
    problem = vault_url_problem(url)
    if problem:
        raise ConfigError(f"vault url {url!r}: {problem}; expected {VAULT_URL_FORMS}")
    scheme, netloc, path = _split_url(url)
    if scheme == "file":
        from pgvault.storage.local import LocalStorage

        return LocalStorage(f"{path.rstrip('/')}/{cluster}", create=create)
    from pgvault.storage.s3 import S3Storage

    prefix = "/".join(p for p in (path.strip("/"), cluster) if p)
    return S3Storage(
        bucket=netloc,
        prefix=prefix,
        endpoint_url=endpoint_url,
        region=region,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        sse=sse,
    )


#: What a vault URL may look like, for messages.
VAULT_URL_FORMS = "file:///absolute/path or s3://bucket/optional/prefix"


def vault_url_problem(url: str) -> str | None:
    """What is wrong with a vault URL, or None if it names a vault ``open_storage`` can open."""
    try:
        scheme, netloc, path = _split_url(url)
    except ValueError as exc:  # urlsplit refuses e.g. an unbalanced '[' in the host
        return f"not a URL ({exc})"
    if scheme == "file":
        if netloc not in ("", "localhost"):
            return f"a file:// URL must not name a host (this one names {netloc!r})"
        if not path.startswith("/"):
            return "the path of a file:// URL must be absolute"
        return None
    if scheme == "s3":
        return None if netloc else "no bucket named"
    if not scheme:
        return "not a URL"
    return f"unknown scheme {scheme!r}"


def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme, host, path) of a vault URL, as urllib.parse.urlsplit gives them.

    A plain ``file://`` URL is split by hand: archive_command opens the vault once
    per WAL segment, and importing urllib.parse (with ipaddress) costs it ~1.5 ms.
    """
    if url.startswith("file://") and "?" not in url and "#" not in url:
        netloc, slash, path = url[len("file://"):].partition("/")
        return "file", netloc, slash + path
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme, parts.netloc, parts.path
