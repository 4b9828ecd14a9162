"""Storage backends, chosen by the vault URL's scheme.

``open_storage`` returns a backend rooted at one cluster's part of the vault
(``<vault>/<cluster>/``), so the rest of pgvault addresses objects with keys
relative to its own cluster. The S3 backend is imported only when used: boto3
costs ~150 ms to import, and the archive_command fast path must not pay it.
"""

from __future__ import annotations

from pgvault.errors import ConfigError
from pgvault.storage.base import ObjectInfo, Storage, validate_key

__all__ = ["ObjectInfo", "Storage", "open_storage", "validate_key", "SCHEMES"]

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
    """The backend for ``url`` (``file:///path`` or ``s3://bucket/prefix``), rooted at ``cluster``."""
    validate_key(cluster)
    scheme, netloc, path = _split_url(url)
    if scheme == "file":
        if netloc not in ("", "localhost"):
            raise ConfigError(f"vault url {url!r} names a host; a local vault is file:///absolute/path")
        if not path.startswith("/"):
            raise ConfigError(f"vault url {url!r} must hold an absolute path, e.g. file:///var/lib/pgvault/vault")
        from pgvault.storage.local import LocalStorage

        return LocalStorage(f"{path.rstrip('/')}/{cluster}", create=create)
    if scheme == "s3":
        if not netloc:
            raise ConfigError(f"vault url {url!r} names no bucket; expected s3://bucket/optional/prefix")
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
    raise ConfigError(
        f"vault url {url!r} has unknown scheme {scheme!r}; expected one of: "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )


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
