"""Object storage behind one small interface: S3 (boto3) or a local directory.

Keys are plain relative paths such as
``projects/3/jobs/12/items/40/attempt-1/mask-0.png``. Each attempt at an item
writes under keys of its own (worker/results.py), so a retried write
replaces only what the same attempt wrote.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlencode, urlparse

from segq.served_objects import UNKNOWN_TYPE, content_disposition

#: Where the API serves local-disk objects; the signature covers key and expiry.
LOCAL_OBJECTS_ROUTE = "/objects/"


#: The most keys S3's DeleteObjects takes in one request.
S3_DELETE_BATCH = 1000


class StorageError(RuntimeError):
    """Storage did not answer or refused; the operation may succeed later."""


class StorageUnreachable(StorageError):
    """Storage itself is down, not the one operation: the connection was
    refused or timed out, the server answered 5xx, the disk failed. Work
    that needs storage waits for it to answer (worker/dependency_breaker.py)
    rather than count this against an item."""


#: OS errors that say a local disk (or the network filesystem behind it)
#: is down or full, not that one path is wrong.
UNREACHABLE_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOTCONN,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENODEV,
        errno.ENXIO,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
    }
)


def _disk_error(message: str, exc: OSError) -> StorageError:
    kind = StorageUnreachable if exc.errno in UNREACHABLE_ERRNOS else StorageError
    return kind(f"{message}: {exc}")


def _s3_error(message: str, exc: Exception) -> StorageError:
    """The StorageError for a botocore error: StorageUnreachable when it says
    the server is down (no connection, a timeout, a 5xx answer)."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    down = isinstance(exc, BotoConnectionError | HTTPClientError) or (
        isinstance(exc, ClientError)
        and int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    )
    kind = StorageUnreachable if down else StorageError
    return kind(f"{message}: {exc}")


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    #: When the object was last written, in epoch seconds.
    modified_time: float


class ObjectStorage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write the object; ``content_type`` is the type segq checked it to
        be, served with it whatever link reads it (segq/served_objects.py)."""
        ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove every object of ``keys``; missing ones are not an error.
        S3 takes up to 1000 keys per request, so deleting a job's or a
        retention batch's objects costs requests per thousand, not per key."""
        ...

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """The objects whose keys start with ``prefix``, in no set order."""
        ...

    def presigned_get_url(self, key: str, expires_in: int) -> str:
        """A URL that reads the object until ``expires_in`` seconds from now. It
        may be relative to the API's root (local storage); join it with the
        request's root URL before handing it out."""
        ...

    def check(self) -> None:
        """Raise StorageError unless storage answers (readiness probe)."""
        ...


def open_storage(
    storage_url: str, *, s3_endpoint_url: str | None, secret_key: str
) -> ObjectStorage:
    """``s3://bucket/prefix`` or ``file:///absolute/path``."""
    parsed = urlparse(storage_url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {storage_url!r} names no bucket")
        return S3Storage(parsed.netloc, parsed.path.strip("/"), endpoint_url=s3_endpoint_url)
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.path)), secret_key=secret_key)
    raise ValueError(f"storage URL {storage_url!r} must start with s3:// or file://")


def _write_whole(path: Path, data: bytes) -> None:
    """Write then rename: a reader never sees half a file."""
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=".put-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(staged, path)


def _checked_key(key: str) -> str:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}")
    return key


class S3Storage:
    """Any S3-compatible server. One boto3 client per process: clients are
    thread-safe and hold the connection pool, so making one per call would
    throw the pool away."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                # Path-style addressing: S3-compatible servers (MinIO, moto) rarely
                # have per-bucket DNS names.
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def _key(self, key: str) -> str:
        return self.prefix + _checked_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # Pre-signed URLs answer with what the object was stored with.
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                ContentDisposition=content_disposition(content_type),
            )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(f"could not write {key}", exc) from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body: bytes = response["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from exc
            raise _s3_error(f"could not read {key}", exc) from exc
        except BotoCoreError as exc:
            raise _s3_error(f"could not read {key}", exc) from exc
        return body

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(f"could not delete {key}", exc) from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = keys[start : start + S3_DELETE_BATCH]
            try:
                answer = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
                )
            except (BotoCoreError, ClientError) as exc:
                raise _s3_error(f"could not delete {len(batch)} objects", exc) from exc
            # A batch answers 200 even when some keys failed; they are listed.
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} objects, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        try:
            for page in pages:
                for entry in page.get("Contents", ()):
                    yield StoredObject(
                        key=entry["Key"][len(self.prefix) :],
                        modified_time=entry["LastModified"].timestamp(),
                    )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(f"could not list {prefix}", exc) from exc

    def presigned_get_url(self, key: str, expires_in: int) -> str:
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_in,
        )
        return url

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(f"bucket {self.bucket} does not answer", exc) from exc


class LocalStorage:
    """Objects as files under one directory, for the embedded default.

    URLs point at the API's ``/objects/`` route and carry an expiry and an
    HMAC-SHA256 signature over key and expiry, like S3's pre-signed URLs.
    An object's type is kept beside it, in a hidden sidecar file
    (``.<name>.type``), as S3 keeps it in the object's metadata.
    """

    def __init__(self, root: Path, *, secret_key: str) -> None:
        self.root = root
        self._secret = secret_key.encode()

    def _path(self, key: str) -> Path:
        return self.root / _checked_key(key)

    @staticmethod
    def _type_path(path: Path) -> Path:
        # Hidden, as staged writes are: listing skips it.
        return path.with_name(f".{path.name}.type")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The type first: an object is never readable without its type.
            _write_whole(self._type_path(path), content_type.encode("ascii"))
            _write_whole(path, data)
        except OSError as exc:
            raise _disk_error(f"could not write {key}", exc) from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _disk_error(f"could not read {key}", exc) from exc

    def content_type(self, key: str) -> str:
        """The type ``key`` was stored as; UNKNOWN_TYPE for an object written
        before types were kept."""
        try:
            return self._type_path(self._path(key)).read_text("ascii").strip() or UNKNOWN_TYPE
        except FileNotFoundError:
            return UNKNOWN_TYPE
        except (OSError, UnicodeError) as exc:
            raise StorageError(f"could not read the type of {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._type_path(path).unlink(missing_ok=True)
        except OSError as exc:
            raise _disk_error(f"could not delete {key}", exc) from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.delete(key)

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        # Keys are paths: walk the deepest directory the prefix names whole
        # (all of it when the prefix ends in "/": a job's folder, not its siblings').
        if prefix.endswith("/") and prefix.strip("/"):
            directory = self.root / _checked_key(prefix.rstrip("/"))
        elif "/" in prefix:
            directory = self.root / PurePosixPath(prefix).parent
        else:
            directory = self.root
        try:
            for path in directory.rglob("*"):
                key = path.relative_to(self.root).as_posix()
                # Staged writes (".put-*") are not objects yet.
                if key.startswith(prefix) and path.is_file() and not path.name.startswith("."):
                    yield StoredObject(key=key, modified_time=path.stat().st_mtime)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _disk_error(f"could not list {prefix}", exc) from exc

    def presigned_get_url(self, key: str, expires_in: int) -> str:
        expires = int(time.time()) + expires_in
        query = urlencode({"expires": expires, "signature": self._signature(key, expires)})
        return f"{LOCAL_OBJECTS_ROUTE}{quote(_checked_key(key))}?{query}"

    def verify_signature(self, key: str, expires: int, signature: str) -> bool:
        """True while the URL has not expired and its signature is ours."""
        if expires < time.time():
            return False
        # As bytes: compare_digest refuses str with non-ASCII characters.
        return hmac.compare_digest(
            self._signature(key, expires).encode(), signature.encode("utf-8", "replace")
        )

    def _signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".ready"
            probe.write_bytes(b"")
        except OSError as exc:
            raise _disk_error(f"{self.root} is not writable", exc) from exc
