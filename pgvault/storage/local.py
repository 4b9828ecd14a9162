"""A vault in a local (or network-mounted) directory: the zero-setup default.

Durability: each object is written to a hidden temporary file in its final
directory, fsync'd, then hard-linked to its name (which fails if the name
exists, so nothing is ever overwritten) and the directory is fsync'd. A crash
at any point leaves either nothing or the complete object under the name;
leftover temporary files start with a dot and are never listed.
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import BinaryIO, Iterator

from pgvault.errors import ObjectExistsError, ObjectNotFoundError, StorageError, VaultUnreachableError
from pgvault.storage.base import COPY_BLOCK, ObjectInfo, validate_key, validate_prefix

TEMP_PREFIX = ".tmp."


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sha256(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(COPY_BLOCK):
            digest.update(block)
    return digest.digest()


class LocalStorage:
    """Objects as files under ``root``; keys are relative paths."""

    def __init__(self, root: str, *, create: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.description = f"file://{self.root}"
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise VaultUnreachableError(
                    f"cannot create vault directory {self.root}: {exc.strerror}",
                    hint="create it, or give the user running pgvault write access to its parent",
                ) from exc
        if not os.path.isdir(self.root):
            raise VaultUnreachableError(
                f"vault directory {self.root} does not exist",
                hint="create it, or correct [vault] url",
            )

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *validate_key(key).split("/"))

    def _makedirs(self, directory: str) -> None:
        """Create missing parents and fsync each new entry's parent, so the path survives a crash."""
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            _fsync_dir(os.path.dirname(d))

    def put(self, key: str, source: BinaryIO) -> ObjectInfo:
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}")
        size = 0
        try:
            self._makedirs(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                while block := source.read(COPY_BLOCK):
                    size += len(block)
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                # Hashed only on a conflict, which is rare: a normal put reads its bytes once.
                if _file_sha256(path) != _file_sha256(tmp):
                    raise ObjectExistsError(
                        f"object {key} already exists in {self.description} with different content; "
                        "objects are write-once and are never overwritten"
                    ) from None
            _fsync_dir(directory)
        except OSError as exc:
            raise self._os_error("write", key, exc) from exc
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # never created (e.g. a parent is a file); the original error matters
        return ObjectInfo(key=key, size=size)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key} not found in {self.description}") from None
        except OSError as exc:
            raise self._os_error("read", key, exc) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._os_error("stat", key, exc) from exc
        return ObjectInfo(key=key, size=st.st_size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Start the walk at the deepest directory the prefix names in full.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *base.split("/")) if base else self.root
        yield from (info for info in self._walk(start, base) if info.key.startswith(prefix))

    def _walk(self, directory: str, key_prefix: str) -> Iterator[ObjectInfo]:
        try:
            # Sort a directory as "name/" so the walk yields keys in plain string
            # order, as S3 does: "a-c" < "a/b" because '-' < '/'.
            entries = sorted(
                os.scandir(directory), key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
            )
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._os_error("list", key_prefix or "/", exc) from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue  # temporary files and anything that is not an object
            key = f"{key_prefix}/{entry.name}" if key_prefix else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, key)
            elif entry.is_file(follow_symlinks=False):
                yield ObjectInfo(key=key, size=entry.stat(follow_symlinks=False).st_size)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
            _fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._os_error("delete", key, exc) from exc

    def _os_error(self, action: str, key: str, exc: OSError) -> StorageError:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return VaultUnreachableError(
                f"cannot {action} {key} in {self.description}: {exc.strerror}",
                hint="the user running pgvault (for archive_command: postgres) needs write access to the vault directory",
            )
        if exc.errno == errno.ENOSPC:
            return StorageError(f"cannot {action} {key} in {self.description}: no space left on device")
        return StorageError(f"cannot {action} {key} in {self.description}: {exc.strerror or exc}")
