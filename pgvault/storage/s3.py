"""A vault in an S3 bucket (AWS, MinIO, or any S3-compatible service).

Write-once without a lock: every write is conditional (``If-None-Match: *``),
on the single PutObject or on CompleteMultipartUpload, so S3 itself refuses to
replace an existing object. Nothing partial is ever visible: a multipart upload
shows no object until it is completed, and any failure aborts it.

Memory stays bounded: the source is read one part at a time into one buffer,
which is sent from the calling thread before the next part is read.

This module is the only one that imports boto3; ``open_storage`` imports it
lazily so the local-vault fast path never pays for boto3.
"""

from __future__ import annotations

import hashlib
import io
from typing import BinaryIO, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from pgvault.errors import ConfigError, ObjectExistsError, ObjectNotFoundError, StorageError, VaultUnreachableError
from pgvault.storage.base import COPY_BLOCK, ObjectInfo, validate_key, validate_prefix

MiB = 1 << 20
#: Default part size; objects up to this size go up in a single PutObject.
PART_SIZE = 8 * MiB
#: S3 refuses smaller parts (except the last) when completing an upload.
MIN_PART_SIZE = 5 * MiB
SSE_MODES = ("AES256", "aws:kms")

_EXISTS_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
_CREDENTIALS_HINT = (
    "check [vault] access_key_id/secret_access_key, or the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment, "
    "and that the key may get, put, list and delete objects in the bucket"
)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class _SourceError(Exception):
    """Reading the caller's source failed; kept apart so it is not taken for an S3 error."""


class S3Storage:
    """Objects under ``prefix/`` in ``bucket``; keys are relative to the prefix."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        sse: str | None = None,
        part_size: int = PART_SIZE,
        max_attempts: int = 3,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
    ) -> None:
        if sse and sse not in SSE_MODES:
            raise ConfigError(f"[vault] sse {sse!r} is not supported; expected one of: {', '.join(SSE_MODES)}")
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"S3 part size {part_size} is below the S3 minimum of {MIN_PART_SIZE} bytes")
        if bool(access_key_id) != bool(secret_access_key):
            raise ConfigError("[vault] access_key_id and secret_access_key must be set together")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size = part_size
        self._sse = {"ServerSideEncryption": sse} if sse else {}
        config = Config(
            signature_version="s3v4",
            # "standard" retries 5xx, throttling and connection errors with jittered
            # backoff; few attempts and a short connect timeout keep an unreachable
            # endpoint from stalling archive_command, whose caller retries anyway.
            # (botocore's "max_attempts" counts retries only; ours counts every attempt.)
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # MinIO and other self-hosted endpoints rarely have wildcard DNS for buckets.
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        credentials = (
            {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key} if access_key_id else {}
        )
        # A session of our own: boto3's default session is not safe to share between threads.
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config, **credentials
        )
        self.endpoint = self._client.meta.endpoint_url

    # -- keys -----------------------------------------------------------------

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- protocol -------------------------------------------------------------

    def put(self, key: str, source: BinaryIO) -> ObjectInfo:
        full = self._full(key)
        digest = hashlib.sha256()
        size = 0

        def read(n: int, head: bytes = b"") -> bytearray:
            """``head`` then source bytes, ``n`` in all (fewer only at end of stream).

            Filled in place: one buffer per part, no joins; botocore sends a bytearray
            without copying it. Hashed and counted block by block as read.
            """
            nonlocal size
            buf = bytearray(n)
            with memoryview(buf) as view:
                view[: len(head)] = head
                got = len(head)
                while got < n:
                    try:
                        block = source.read(min(COPY_BLOCK, n - got))
                    except OSError as exc:
                        raise _SourceError(exc) from exc
                    if not block:
                        break
                    view[got : got + len(block)] = block
                    digest.update(block)
                    size += len(block)
                    got += len(block)
            del buf[got:]
            return buf

        try:
            if not self._upload(full, read) and self._sha256(full, key) != digest.digest():
                raise ObjectExistsError(
                    f"object {key} already exists in {self.description} with different content; "
                    "objects are write-once and are never overwritten"
                )
        except ObjectNotFoundError:
            # 409 ConditionalRequestConflict: another write of this key has not completed yet.
            raise StorageError(
                f"cannot write {key} in {self.description}: another write of it is in progress",
                hint="retry; if it recurs, two writers are pushing the same object",
            ) from None
        except _SourceError as exc:
            cause = exc.__cause__
            raise StorageError(
                f"cannot write {key} in {self.description}: reading the source failed: {cause}"
            ) from cause
        except (BotoCoreError, ClientError) as exc:
            raise self._error("write", key, exc) from exc
        return ObjectInfo(key=key, size=size)

    def _upload(self, full: str, read) -> bool:
        """Upload what ``read`` yields unless the key exists; False if it already did."""
        data = read(self.part_size)
        head = read(1) if len(data) == self.part_size else b""  # read ahead one byte: one part or more?
        if not head:
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*", **self._sse)
            except ClientError as exc:
                if _code(exc) in _EXISTS_CODES:
                    return False
                raise
            return True
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full, **self._sse)["UploadId"]
        try:
            parts = []
            while data:
                number = len(parts) + 1
                response = self._client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
                data = None  # drop this part before reading the next: one part in memory
                data, head = read(self.part_size, head), b""  # the read-ahead byte starts part 2
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                if _code(exc) in _EXISTS_CODES:
                    self._abort(full, upload_id)
                    return False
                raise
        except BaseException:
            # Parts of an unfinished upload are invisible but billed: never leave them.
            self._abort(full, upload_id)
            raise
        return True

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (BotoCoreError, ClientError):
            pass  # best effort; the original error matters more, and bucket lifecycle rules can clean up

    def _sha256(self, full: str, key: str) -> bytes:
        """The sha256 of the stored object, streamed."""
        digest = hashlib.sha256()
        with self._open(full, key) as f:
            while block := f.read(COPY_BLOCK):
                digest.update(block)
        return digest.digest()

    def open(self, key: str) -> BinaryIO:
        return self._open(self._full(key), key)

    def _open(self, full: str, key: str) -> BinaryIO:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise ObjectNotFoundError(f"object {key} not found in {self.description}") from None
            raise self._error("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("read", key, exc) from exc
        return io.BufferedReader(_Body(body, self, key), buffer_size=COPY_BLOCK)

    def stat(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _status(exc) != 404:
                raise self._error("stat", key, exc) from exc
            # HEAD responses have no body, so a missing bucket is also a bare 404.
            # Tell them apart: a missing bucket must never look like a missing object
            # (restore_command would take it for "no more WAL" and end recovery early).
            self._check_bucket("stat", key)
            return None
        except BotoCoreError as exc:
            raise self._error("stat", key, exc) from exc
        return ObjectInfo(key=key, size=int(head["ContentLength"]))

    def _check_bucket(self, action: str, key: str) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) == 404:
                raise self._no_bucket() from None
            raise self._error(action, key, exc) from exc
        except BotoCoreError as exc:
            raise self._error(action, key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            # S3 lists keys in UTF-8 byte order, which for our ASCII keys is sorted order.
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][len(base):]
                    # Skip what pgvault never writes: dot names (reserved for temporary
                    # objects) and "directory" placeholders some tools create.
                    if any(not part or part.startswith(".") for part in key.split("/")):
                        continue
                    yield ObjectInfo(key=key, size=int(item["Size"]))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", prefix or "/", exc) from exc

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", key, exc) from exc

    # -- errors ---------------------------------------------------------------

    def _no_bucket(self) -> VaultUnreachableError:
        return VaultUnreachableError(
            f"bucket {self.bucket} does not exist at {self.endpoint}",
            hint="create it (see minio-compose.yml) or correct [vault] url",
        )

    def _error(self, action: str, key: str, exc: Exception) -> StorageError:
        """One line naming what failed, where, and what to do; never a credential."""
        where = f"{key} in {self.description}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return VaultUnreachableError(
                f"cannot {action} {where}: no S3 credentials configured",
                hint="set [vault] access_key_id/secret_access_key, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            # Connection refused or timed out, or dropped mid-response, after the retries.
            return VaultUnreachableError(
                f"cannot {action} {where}: S3 endpoint {self.endpoint} is unreachable ({type(exc).__name__})",
                hint="check that the S3 service is running and [vault] endpoint_url is right",
            )
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in _CREDENTIAL_CODES or status == 403:
                return VaultUnreachableError(
                    f"cannot {action} {where}: S3 endpoint {self.endpoint} refused the credentials ({code or status})",
                    hint=_CREDENTIALS_HINT,
                )
            if code in _BUSY_CODES or status >= 500:
                return VaultUnreachableError(
                    f"cannot {action} {where}: S3 endpoint {self.endpoint} failed ({code or status}) after retries",
                    hint="the service is overloaded or failing; try again later",
                )
            # Only the code: S3 error messages can echo request details we do not want in logs.
            return StorageError(f"cannot {action} {where}: S3 error {code or status}")
        return StorageError(f"cannot {action} {where}: {type(exc).__name__}")


class _Body(io.RawIOBase):
    """A GetObject body whose transport errors become StorageError, like every other failure."""

    def __init__(self, body, storage: S3Storage, key: str) -> None:
        self._body = body
        self._storage = storage
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._body.read(len(buffer))
        except (BotoCoreError, OSError) as exc:
            # Includes IncompleteReadError: a body shorter than its Content-Length.
            raise self._storage._error("read", self._key, exc) from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
