"""S3 failures become one-line VaultUnreachableErrors that name the place and never the secret.

An unreachable vault must never look like a missing object: restore_command
would take that for "no more WAL" and end recovery early.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from pgvault.errors import StorageError, VaultUnreachableError
from pgvault.storage.s3 import S3Storage
from tests.fixtures.s3server import free_port
from tests.fixtures.tcpproxy import TcpProxy

SECRET = "pgvault-test-SECRET-never-print"

#: Every operation of the protocol, as a call on a storage.
OPERATIONS = {
    "put": lambda s: s.put("wal/000000010000000000000001", io.BytesIO(b"segment")),
    "open": lambda s: s.open("wal/000000010000000000000001").read(),
    "stat": lambda s: s.stat("wal/000000010000000000000001"),
    "list": lambda s: list(s.list("wal/")),
    "delete": lambda s: s.delete("wal/000000010000000000000001"),
}


def assert_no_secret(err: StorageError, secret: str) -> None:
    assert secret not in str(err)
    assert secret not in (err.hint or "")
    assert "\n" not in err.message


def raised_by(operation: str, storage: S3Storage) -> StorageError:
    with pytest.raises(StorageError) as caught:
        OPERATIONS[operation](storage)
    return caught.value


@pytest.mark.parametrize("operation", OPERATIONS)
def test_unreachable_endpoint_fails_fast_and_names_it(operation):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    storage = S3Storage(
        bucket="vault", endpoint_url=endpoint, access_key_id="pgvault-test-key", secret_access_key=SECRET
    )
    started = time.monotonic()
    err = raised_by(operation, storage)
    assert time.monotonic() - started < 15
    assert type(err) is VaultUnreachableError
    verb = {"put": "write", "open": "read"}.get(operation, operation)
    assert err.message.startswith(f"cannot {verb} wal/")
    assert f"S3 endpoint {endpoint} is unreachable (EndpointConnectionError)" in err.message
    assert "endpoint_url" in err.hint
    assert_no_secret(err, SECRET)


def test_no_credentials(monkeypatch, tmp_path):
    # Empty boto3's default credential chain: no environment, no files, no instance metadata.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = S3Storage(bucket="vault", endpoint_url=f"http://127.0.0.1:{free_port()}")
    err = raised_by("stat", storage)
    assert type(err) is VaultUnreachableError
    assert err.message == "cannot stat wal/000000010000000000000001 in s3://vault: no S3 credentials configured"
    assert "access_key_id" in err.hint and "AWS_ACCESS_KEY_ID" in err.hint


class _FakeS3(BaseHTTPRequestHandler):
    """Answers every request with one S3 error (``status``, ``code``), and counts the requests."""

    status, code, requests = 503, "SlowDown", 0

    def _answer(self, with_body: bool) -> None:
        type(self).requests += 1
        body = f"<Error><Code>{self.code}</Code><Message>fake</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self):
        self._answer(with_body=True)

    def do_HEAD(self):  # HEAD errors carry no body: the client sees only the status
        self._answer(with_body=False)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_s3():
    """Start a fake S3 answering with (status, code); yields a function returning (storage on it, handler)."""
    servers = []

    def start(status: int, code: str) -> tuple[S3Storage, type[_FakeS3]]:
        handler = type("Handler", (_FakeS3,), {"status": status, "code": code, "requests": 0})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        storage = S3Storage(
            bucket="vault",
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
            access_key_id="pgvault-test-key",
            secret_access_key=SECRET,
            max_attempts=2,
        )
        return storage, handler

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_throttling_is_retried_then_reported(fake_s3):
    storage, handler = fake_s3(503, "SlowDown")
    err = raised_by("list", storage)
    assert handler.requests == 2  # max_attempts counts every attempt, the first included
    assert type(err) is VaultUnreachableError
    assert err.message == (
        f"cannot list wal/ in s3://vault: S3 endpoint {storage.endpoint} failed (SlowDown) after retries"
    )
    assert_no_secret(err, SECRET)


@pytest.mark.parametrize(
    "operation, code, shown",
    [
        ("list", "InvalidAccessKeyId", "InvalidAccessKeyId"),
        ("open", "SignatureDoesNotMatch", "SignatureDoesNotMatch"),
        ("open", "AccessDenied", "AccessDenied"),
        ("stat", "AccessDenied", "403"),  # HEAD: no body, so only the status is known
    ],
)
def test_refused_credentials_are_reported_without_retry(fake_s3, operation, code, shown):
    # moto accepts any credentials, so this mapping is checked against a fake endpoint;
    # test_bad_credentials_are_reported_without_the_secret checks it against a real one.
    storage, handler = fake_s3(403, code)
    err = raised_by(operation, storage)
    assert handler.requests == 1
    assert type(err) is VaultUnreachableError
    assert f"S3 endpoint {storage.endpoint} refused the credentials ({shown})" in err.message
    assert err.hint == (
        "check [vault] access_key_id/secret_access_key, or the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment, "
        "and that the key may get, put, list and delete objects in the bucket"
    )
    assert_no_secret(err, SECRET)


@pytest.mark.integration
@pytest.mark.parametrize("operation", OPERATIONS)
def test_missing_bucket_is_named(s3_endpoint, operation):
    bucket = f"pgvault-missing-{uuid.uuid4().hex[:16]}"
    storage = S3Storage(
        bucket=bucket,
        prefix="vault",
        endpoint_url=s3_endpoint.url,
        region=s3_endpoint.region,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
    )
    err = raised_by(operation, storage)
    assert type(err) is VaultUnreachableError
    assert err.message == f"bucket {bucket} does not exist at {s3_endpoint.url}"
    assert err.hint == "create it (see minio-compose.yml) or correct [vault] url"
    assert_no_secret(err, s3_endpoint.secret_key)


@pytest.mark.integration
@pytest.mark.parametrize("operation", OPERATIONS)
def test_bad_credentials_are_reported_without_the_secret(s3_bucket_checking_credentials, operation):
    endpoint, bucket = s3_bucket_checking_credentials
    storage = S3Storage(
        bucket=bucket,
        endpoint_url=endpoint.url,
        region=endpoint.region,
        access_key_id=endpoint.access_key,
        secret_access_key=SECRET,  # wrong: the signature will not match (moto: no key is known at all)
    )
    err = raised_by(operation, storage)
    assert type(err) is VaultUnreachableError
    assert f"S3 endpoint {endpoint.url} refused the credentials" in err.message
    assert "access_key_id/secret_access_key" in err.hint
    assert_no_secret(err, SECRET)
    assert_no_secret(err, endpoint.secret_key)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_dropped_connections_are_retried_then_reported(operation):
    proxy = TcpProxy("127.0.0.1", 9)
    proxy.cut()  # every connection is dropped
    try:
        storage = S3Storage(bucket="vault", endpoint_url=proxy.url, access_key_id="pgvault-test-key",
                            secret_access_key=SECRET, max_attempts=3)
        err = raised_by(operation, storage)
    finally:
        proxy.close()
    assert proxy.connections == 3  # every attempt, on a new connection
    assert type(err) is VaultUnreachableError
    assert f"S3 endpoint {proxy.url} is unreachable (ConnectionClosedError)" in err.message
    assert err.hint == "check that the S3 service is running and [vault] endpoint_url is right"
    assert_no_secret(err, SECRET)


@pytest.mark.integration
def test_dropped_connections_are_retried_until_the_endpoint_answers(s3_bucket):
    endpoint, bucket = s3_bucket
    target = urlsplit(endpoint.url)
    if target.scheme != "http":
        pytest.skip("the proxy forwards plain HTTP only")
    proxy = TcpProxy(target.hostname, target.port, drop_first=2)
    try:
        storage = S3Storage(bucket=bucket, endpoint_url=proxy.url, region=endpoint.region,
                            access_key_id=endpoint.access_key, secret_access_key=endpoint.secret_key, max_attempts=3)
        storage.put("wal/000000010000000000000001", io.BytesIO(b"segment"))  # two drops, then through
        assert proxy.connections == 3
        with storage.open("wal/000000010000000000000001") as f:
            assert f.read() == b"segment"
    finally:
        proxy.close()
