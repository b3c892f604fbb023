"""The artifact store: where the service's ML artifacts (feature chunks, kNN graphs, posterior versions) live.

`BALPM_ARTIFACT_URL` picks the backend (`open_artifact_store`):

* empty: no artifact store; the data dir itself is the system of record (the single-node default);
* ``file:///absolute/path``: `FileArtifactStore`, a local (or mounted) folder;
* ``s3://bucket/prefix``: `S3ArtifactStore` (AWS S3 or any S3-compatible server), behind a bounded
  local read cache (`CachedArtifactStore`).

Design rules, which every caller relies on:

* **Keys are immutable.** A key is named after a version or a content digest
  (``pools/<id>/posterior/v0007.safetensors``, ``pools/<id>/features/<sha256>.npy``), so an object is
  written once and never changed in place; a new state gets a new key. This is what makes the cache
  trivially correct: a cached object can never go stale, so there is no invalidation.
* **Publish after durable.** `ArtifactStore.put` returns only once the object is durable (files:
  written to a temp file, fsynced, renamed, folder fsynced; S3: one ``PutObject``, atomic by S3
  semantics), and readers see either nothing or the whole object. Callers put the objects first and
  only then publish their keys in a database row (in the same transaction as the state that refers to
  them), so a committed row never names a missing or partial object. A crash in between leaves at
  worst an unreferenced object, which garbage collection (`ArtifactStore.delete_prefix`) removes.
* **The cache holds only immutable objects** and is only a cache: the inner store stays the system of
  record (`list` and `exists` of a missing object go to it; `put` and deletes write through).

Keys are relative, ``/``-separated strings: no empty segment, no ``.`` / ``..`` segment, no leading
``/``, and each segment only ``[A-Za-z0-9._+=-]`` (`validate_key`), so a key is a safe file path and a
plain S3 key on every backend. A *prefix* (`ArtifactStore.list`, `ArtifactStore.delete_prefix`) is a
key or ``""``; it covers the key itself and everything below it (``a/b`` covers ``a/b`` and ``a/b/c``,
never ``a/bc``), like a folder.

Every store is thread-safe (it is used from worker threads). boto3 is imported only when an
`S3ArtifactStore` is created, so importing this module does not need it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "ArtifactStoreError",
    "ArtifactStoreUnavailable",
    "CachedArtifactStore",
    "FileArtifactStore",
    "S3ArtifactStore",
    "open_artifact_store",
    "validate_key",
    "validate_prefix",
]

_T = TypeVar("_T")

_SEGMENT = re.compile(r"[A-Za-z0-9._+=-]+")
MAX_SEGMENT_CHARS = 255  # a file name on every common file system
MAX_KEY_CHARS = 768  # leaves room under S3's 1,024-byte key limit for the store's own prefix
CHECK_PREFIX = "_balpm_check"
_TMP_MARK = "~tmp-"  # in temp file names; "~" is never in a key, so a temp file is never listed as one
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_FORMS = "file:///absolute/path or s3://bucket/prefix"


class ArtifactStoreError(Exception):
    """An artifact store operation failed; the message is one line naming the store's URL and the cause."""


class ArtifactStoreUnavailable(ArtifactStoreError):
    """The store could not be reached (connection refused, timeout, a 5xx after retries): worth retrying later."""


class ArtifactNotFound(ArtifactStoreError, KeyError):
    """No object under that key (also a `KeyError`, so ``except KeyError`` works)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def validate_key(key: str) -> str:
    """Check that `key` is a valid artifact key (see the module doc) and return it.

    Args:
        key: The key, e.g. ``pools/p1/posterior/v0003.safetensors``.

    Returns:
        The key, unchanged.

    Raises:
        ValueError: The key is empty, too long, has an empty, ``.`` or ``..`` segment, a leading
            ``/`` or a character outside ``[A-Za-z0-9._+=-]`` in a segment.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"artifact key longer than {MAX_KEY_CHARS} characters: {key[:60]!r}...")
    if key.startswith("/"):
        raise ValueError(f"artifact key must be relative (no leading '/'): {key!r}")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"artifact key has an empty segment: {key!r}")
        if segment in (".", ".."):
            raise ValueError(f"artifact key has a {segment!r} segment: {key!r}")
        if len(segment) > MAX_SEGMENT_CHARS:
            raise ValueError(f"artifact key segment longer than {MAX_SEGMENT_CHARS} characters: {key!r}")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(f"artifact key segment {segment!r} has characters outside [A-Za-z0-9._+=-]: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Normalise a prefix: ``""`` (everything) or a valid key; one trailing ``/`` is dropped.

    Args:
        prefix: ``""``, a key, or a key followed by ``/``.

    Returns:
        The prefix without its trailing ``/``.

    Raises:
        ValueError: It is neither empty nor a valid key.
    """
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix)


def _under(key: str, prefix: str) -> bool:
    """Whether `prefix` (normalised) covers `key`: the key itself or anything below it."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


@runtime_checkable
class ArtifactStore(Protocol):
    """An object store of immutable artifacts by key (see the module doc for the rules).

    Attributes:
        url: The store's URL as configured (never with credentials), e.g. ``s3://bucket/prefix``.
    """

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`; durable when it returns, atomic for readers.

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The write failed (`ArtifactStoreUnavailable`: unreachable).
        """
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`.

        Raises:
            ValueError: Invalid key.
            ArtifactNotFound: No such object.
            ArtifactStoreError: The read failed (`ArtifactStoreUnavailable`: unreachable).
        """
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`.

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The store could not be asked.
        """
        ...

    def delete(self, key: str) -> None:
        """Delete the object under `key` if there is one (idempotent).

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The delete failed.
        """
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object the prefix covers (the key itself and everything below it).

        Returns:
            How many objects were deleted.

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: A delete failed (some objects may be gone already).
        """
        ...

    def list(self, prefix: str) -> list[str]:
        """The keys the prefix covers, sorted (``""``: all keys).

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: The listing failed.
        """
        ...

    def check(self) -> None:
        """Verify the store is reachable and writable: put, get and delete a probe object.

        The probe is ``_balpm_check/<uuid>``.

        Raises:
            ArtifactStoreError: One line naming the URL and the cause (`ArtifactStoreUnavailable`
                when the store cannot be reached).
        """
        ...


def _run_check(store: ArtifactStore) -> None:
    """`ArtifactStore.check` for any store: put, get, compare and delete a probe object."""
    key = f"{CHECK_PREFIX}/{uuid.uuid4().hex}"
    probe = f"balpm artifact store check {key}\n".encode()
    store.put(key, probe)
    try:
        if store.get(key) != probe:
            raise ArtifactStoreError(f"{store.url}: the probe object {key} read back different bytes")
    finally:
        store.delete(key)


# ---- files ------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path, root: Path, *, durable: bool) -> None:
    """Create `folder` and its missing parents below `root`, fsyncing each new entry's parent when `durable`."""
    missing: list[Path] = []
    p = folder
    while p != root and not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        if durable:
            _fsync_dir(d.parent)


def _write_atomic(path: Path, data: bytes, root: Path, *, durable: bool) -> None:
    """Write `data` to `path` via a temp file in the same folder, then rename it into place.

    `durable`: fsync the file before the rename and the folder after it. A folder that a
    concurrent delete removes between creating it and writing the temp file is created again.
    """
    for attempt in range(3):
        _make_dirs(path.parent, root, durable=durable)
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            if attempt == 2:
                raise
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if durable:
            _fsync_dir(path.parent)
        return


def _prune_empty_dirs(folder: Path, root: Path) -> None:
    """Remove `folder` and its parents below `root` while they are empty (best effort)."""
    p = folder
    while p != root and root in p.parents:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


def _walk_files(start: Path) -> Iterator[Path]:
    """Every regular file at or below `start` (nothing if it does not exist)."""
    if start.is_file():
        yield start
        return
    if not start.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(start):
        for name in filenames:
            yield Path(dirpath) / name


class FileArtifactStore:
    """Artifacts as files below a local (or mounted) folder, for ``file:///absolute/path`` URLs.

    The folder must exist (it is typically a mounted volume: a missing mount is an error, not
    something to paper over by writing into the container's own disk). Key segments are path
    segments; temp files carry ``~`` in their names, which no key has, and are never listed.

    A key and a "folder" of keys cannot share a name here (``a/b`` and ``a/b/c``); S3 allows it.
    Keys are immutable by design, so this never comes up in practice.

    Args:
        root: Absolute path of the folder.
        url: The URL as configured (default: `root` as a ``file://`` URI).
    """

    def __init__(self, root: Path, *, url: str | None = None) -> None:
        root = Path(root)
        if not root.is_absolute():
            raise ValueError(f"FileArtifactStore root must be an absolute path, got {str(root)!r}")
        self.root = root
        self.url = url or root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _fail(self, action: str, key: str, e: OSError) -> ArtifactStoreError:
        if not self.root.is_dir():
            return ArtifactStoreError(f"{self.url}: folder {self.root} does not exist (or is not a folder)")
        return ArtifactStoreError(f"{self.url}: cannot {action} {key!r}: {_one_line(e)}")

    def put(self, key: str, data: bytes) -> None:
        """Write the object durably and atomically (temp file, fsync, rename, fsync of the folder).

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The folder is missing or the write failed.
        """
        path = self._path(key)
        if not self.root.is_dir():
            raise ArtifactStoreError(f"{self.url}: folder {self.root} does not exist (or is not a folder)")
        try:
            _write_atomic(path, bytes(data), self.root, durable=True)
        except OSError as e:
            raise self._fail("write", key, e) from e

    def get(self, key: str) -> bytes:
        """Read the object.

        Raises:
            ValueError: Invalid key.
            ArtifactNotFound: No such object.
            ArtifactStoreError: The read failed.
        """
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            if not self.root.is_dir():
                raise self._fail("read", key, e) from e
            raise ArtifactNotFound(f"{self.url}: no artifact {key!r}") from None
        except OSError as e:
            raise self._fail("read", key, e) from e

    def exists(self, key: str) -> bool:
        """Whether the object's file exists.

        Raises:
            ValueError: Invalid key.
        """
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Delete the object's file if there is one, and any folders left empty.

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The delete failed.
        """
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        except OSError as e:
            raise self._fail("delete", key, e) from e
        _prune_empty_dirs(path.parent, self.root)

    def _start(self, prefix: str) -> Path:
        prefix = validate_prefix(prefix)
        return self.root.joinpath(*prefix.split("/")) if prefix else self.root

    def _keys(self, start: Path) -> Iterator[tuple[str, Path]]:
        for path in _walk_files(start):
            key = path.relative_to(self.root).as_posix()
            if _is_key(key):
                yield key, path

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object the prefix covers (and temp files left there by a crash); empty folders go too.

        Returns:
            How many objects were deleted.

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: A delete failed.
        """
        start = self._start(prefix)
        count = 0
        folders: set[Path] = set()
        try:
            for path in list(_walk_files(start)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                folders.add(path.parent)
                if _is_key(path.relative_to(self.root).as_posix()):
                    count += 1
        except OSError as e:
            raise self._fail("delete below", prefix, e) from e
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            _prune_empty_dirs(folder, self.root)
        if start != self.root and start.is_dir():
            _prune_empty_dirs(start, self.root)
        return count

    def list(self, prefix: str) -> list[str]:
        """The keys the prefix covers, sorted.

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: The folder cannot be read.
        """
        start = self._start(prefix)
        if not self.root.is_dir():
            raise ArtifactStoreError(f"{self.url}: folder {self.root} does not exist (or is not a folder)")
        try:
            return sorted(key for key, _ in self._keys(start))
        except OSError as e:
            raise self._fail("list", prefix, e) from e

    def check(self) -> None:
        """Put, read back and delete a probe object.

        Raises:
            ArtifactStoreError: The folder is missing, not writable, or reads back wrong bytes.
        """
        try:
            _run_check(self)
        except ArtifactStoreError:
            raise
        except OSError as e:
            raise ArtifactStoreError(f"{self.url}: {_one_line(e)}") from e

    def __repr__(self) -> str:
        return f"FileArtifactStore({self.url!r})"


# ---- S3 ---------------------------------------------------------------------------------------------


class S3ArtifactStore:
    """Artifacts as objects in an S3 bucket (AWS or S3-compatible), for ``s3://bucket/prefix`` URLs.

    Endpoint, region and credentials come from the usual environment, read by boto3 itself when the
    store is created: ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``
    (or a profile, an instance role, ...). A custom endpoint is addressed path-style
    (``http://host:9000/bucket/key``), which MinIO and the like expect.

    One boto3 client per store, made from its own session (boto3 clients are thread-safe; the
    default session is not shared). Timeouts are bounded and retries use botocore's standard mode.

    Errors: a missing object is `ArtifactNotFound`; connection failures, timeouts and 5xx / SlowDown
    answers (after the retries) are `ArtifactStoreUnavailable`; any other S3 error is
    `ArtifactStoreError` with the S3 error code in its message.

    Args:
        bucket: Bucket name.
        prefix: Key prefix inside the bucket ("" for none); a valid key, without a trailing ``/``.
        client: A boto3 S3 client to use instead of creating one (tests, custom sessions).
        connect_timeout_s: Seconds to wait for a TCP connection.
        read_timeout_s: Seconds to wait for data on an open connection.
        max_attempts: Attempts per call, the first included (botocore standard retry mode).
    """

    delete_batch = 1000  # keys per DeleteObjects call (S3's maximum)
    list_page_size = 1000  # keys per ListObjectsV2 page (S3's maximum)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if not _BUCKET.fullmatch(bucket or ""):
            raise ValueError(f"not a valid S3 bucket name: {bucket!r}")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"mode": "standard", "max_attempts": max_attempts},
            )
            # botocore >= 1.31 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself; its own session, so
            # the environment is read now and no state is shared with other boto3 users in the process.
            client = boto3.session.Session().client("s3", config=config)
        self._client = client
        self.endpoint_url: str = str(getattr(getattr(client, "meta", None), "endpoint_url", "") or "")

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list_prefix(self, prefix: str) -> str:
        """The S3 ListObjectsV2 prefix for a normalised artifact prefix (a superset; filter with `_under`).

        The store's own prefix always ends in ``/`` here, so ``s3://b/p`` never lists ``p2/...``.
        """
        return (f"{self.prefix}/" if self.prefix else "") + prefix

    def _call(self, what: str, fn: Callable[[], _T], *, key: str | None = None) -> _T:
        """Run one S3 call (and any body read inside `fn`), mapping botocore's errors to ours."""
        from botocore import exceptions as bex

        try:
            return fn()
        except bex.ClientError as e:
            error = e.response.get("Error", {}) or {}
            code = str(error.get("Code", "") or "")
            status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
            message = _one_line(error.get("Message", "") or e)
            if key is not None and (code in ("NoSuchKey", "404", "NotFound") or (status == 404 and not code)):
                raise ArtifactNotFound(f"{self.url}: no artifact {key!r}") from None
            if code == "NoSuchBucket":
                raise ArtifactStoreError(f"{self.url}: bucket {self.bucket!r} does not exist") from e
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                raise ArtifactStoreError(f"{self.url}: access denied ({code}) on {what}: {message}") from e
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
                raise ArtifactStoreUnavailable(
                    f"{self.url}: {what} failed with {code or status} after retries: {message}"
                ) from e
            raise ArtifactStoreError(f"{self.url}: {what} failed ({code or status}): {message}") from e
        except (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError) as e:
            raise ArtifactStoreUnavailable(
                f"{self.url}: cannot reach endpoint {self.endpoint_url or '(default)'}: {_one_line(e)}"
            ) from e
        except bex.NoCredentialsError as e:
            raise ArtifactStoreError(f"{self.url}: no AWS credentials found ({_one_line(e)})") from e
        except bex.BotoCoreError as e:
            raise ArtifactStoreError(f"{self.url}: {what} failed: {_one_line(e)}") from e

    def put(self, key: str, data: bytes) -> None:
        """One ``PutObject`` (atomic: readers see nothing or the whole object).

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The write failed (`ArtifactStoreUnavailable`: unreachable).
        """
        obj = self._object_key(key)
        body = bytes(data)
        self._call("PutObject", lambda: self._client.put_object(Bucket=self.bucket, Key=obj, Body=body))

    def get(self, key: str) -> bytes:
        """One ``GetObject``, body read in full (botocore checks its length).

        Raises:
            ValueError: Invalid key.
            ArtifactNotFound: No such object.
            ArtifactStoreError: The read failed (`ArtifactStoreUnavailable`: unreachable).
        """
        obj = self._object_key(key)

        def fetch() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=obj)
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())

        return self._call("GetObject", fetch, key=key)

    def exists(self, key: str) -> bool:
        """One ``HeadObject`` (a missing bucket also reads as False; `check` catches that).

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The store could not be asked.
        """
        obj = self._object_key(key)
        try:
            self._call("HeadObject", lambda: self._client.head_object(Bucket=self.bucket, Key=obj), key=key)
        except ArtifactNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """One ``DeleteObject`` (S3 answers success for a missing key too).

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The delete failed.
        """
        obj = self._object_key(key)
        self._call("DeleteObject", lambda: self._client.delete_object(Bucket=self.bucket, Key=obj))

    def _object_keys(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(artifact key, S3 key) of every object the normalised prefix covers, in S3's (sorted) order."""
        s3_prefix = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "MaxKeys": self.list_page_size, "Prefix": s3_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            call = functools.partial(self._client.list_objects_v2, **kwargs)
            page: dict[str, Any] = self._call("ListObjectsV2", call)
            for item in page.get("Contents", []) or []:
                s3_key = str(item["Key"])
                key = s3_key[strip:]
                if _under(key, prefix):
                    yield key, s3_key
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def list(self, prefix: str) -> list[str]:
        """The valid keys the prefix covers, sorted (``ListObjectsV2``, all pages).

        Objects under the store's prefix whose names are not valid keys (e.g. ``folder/`` markers made
        by other tools) are not listed, though `delete_prefix` deletes them.

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: The listing failed.
        """
        prefix = validate_prefix(prefix)
        return sorted(key for key, _ in self._object_keys(prefix) if _is_key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object the prefix covers: ``ListObjectsV2`` pages, ``DeleteObjects`` in batches of 1,000.

        Returns:
            How many objects were deleted.

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: A listing or a delete failed (earlier batches stay deleted).
        """
        prefix = validate_prefix(prefix)
        count = 0
        batch: list[str] = []

        def flush() -> None:
            nonlocal count
            objects = [{"Key": k} for k in batch]
            response = self._call(
                "DeleteObjects",
                lambda: self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}),
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise ArtifactStoreError(
                    f"{self.url}: DeleteObjects failed for {len(errors)} of {len(batch)} keys, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {_one_line(first.get('Message', ''))}"
                )
            count += len(batch)
            batch.clear()

        # Collect first, then delete: deleting while paginating is allowed by S3, but a listing of a
        # stable snapshot keeps continuation tokens simple to reason about.
        for _key, s3_key in list(self._object_keys(prefix)):
            batch.append(s3_key)
            if len(batch) >= self.delete_batch:
                flush()
        if batch:
            flush()
        return count

    def check(self) -> None:
        """Put, read back and delete a probe object under ``_balpm_check/``.

        Raises:
            ArtifactStoreError: e.g. ``s3://bucket/prefix: bucket 'bucket' does not exist``, access
                denied, or `ArtifactStoreUnavailable` (``cannot reach endpoint ...``).
        """
        _run_check(self)

    def __repr__(self) -> str:
        return f"S3ArtifactStore({self.url!r}, endpoint={self.endpoint_url!r})"


# ---- the read cache ---------------------------------------------------------------------------------


class CachedArtifactStore:
    """A bounded local read cache (least recently used out) in front of any `ArtifactStore`.

    Objects are immutable (see the module doc), so a cached file is never stale. `get` serves a
    cached file (and marks it used: its mtime is set, so the LRU order survives a restart), else
    fetches from the inner store, writes the file atomically into the cache and evicts the least
    recently used files until the cache holds at most `max_bytes`. An object larger than
    `max_bytes` is served but not cached. `put` writes through to the inner store (durable first),
    then into the cache; deletes go to both. Cache write failures (a full disk) are logged, never
    raised: the inner store is the system of record.

    Files live in ``cache_dir/objects/<key>``; ``cache_dir/source`` records the inner store's URL,
    and a cache made for another URL is emptied at start (only ``objects/`` is ever deleted from,
    so a mistaken `cache_dir` cannot lose anything else). Sizes are tracked in memory, rebuilt
    from the folder at start; a lock guards the bookkeeping, downloads and file writes run outside it.

    Args:
        inner: The store being cached.
        cache_dir: Folder of the cache (created).
        max_bytes: Bound of the cached files' total size (0: cache nothing).
    """

    def __init__(self, inner: ArtifactStore, cache_dir: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0, got {max_bytes}")
        self.inner = inner
        self.url = inner.url
        self.cache_dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self._objects = self.cache_dir / "objects"
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> size, least recently used first
        self._total = 0
        self._open()

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _open(self) -> None:
        self._objects.mkdir(parents=True, exist_ok=True)
        source = self.cache_dir / "source"
        try:
            recorded = source.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            recorded = None
        if recorded is not None and recorded != self.url:
            log.warning("artifact cache %s was made for %s, not %s: emptying it", self.cache_dir, recorded, self.url)
            self._wipe()
        if recorded != self.url:
            _write_atomic(source, (self.url + "\n").encode(), self.cache_dir, durable=False)
        found: list[tuple[float, str, int]] = []
        for path in list(_walk_files(self._objects)):
            key = path.relative_to(self._objects).as_posix()
            if _TMP_MARK in path.name:  # a write cut short by a crash
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if not _is_key(key):
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append((st.st_mtime, key, st.st_size))
        for _mtime, key, size in sorted(found):
            self._sizes[key] = size
            self._total += size
        with self._lock:
            self._evict_locked()

    def _wipe(self) -> None:
        for path in list(_walk_files(self._objects)):
            with contextlib.suppress(OSError):
                path.unlink()
        for dirpath, _dirs, _files in sorted(os.walk(self._objects), key=lambda t: len(t[0]), reverse=True):
            if Path(dirpath) != self._objects:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def _path(self, key: str) -> Path:
        return self._objects.joinpath(*key.split("/"))

    def _evict_locked(self) -> None:
        while self._total > self.max_bytes and self._sizes:
            key, size = self._sizes.popitem(last=False)
            self._total -= size
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                try:
                    path.unlink()
                except OSError as e:
                    log.warning("artifact cache: cannot evict %s (%s)", path, e)
            _prune_empty_dirs(path.parent, self._objects)

    def _forget_locked(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._total -= size
        path = self._path(key)
        with contextlib.suppress(OSError):
            path.unlink()
        _prune_empty_dirs(path.parent, self._objects)

    def _store(self, key: str, data: bytes) -> None:
        """Put `data` into the cache (best effort), then evict down to the bound."""
        if len(data) > self.max_bytes:
            return
        try:
            _write_atomic(self._path(key), data, self._objects, durable=False)
        except OSError as e:
            log.warning("artifact cache: cannot cache %s (%s); it is fetched again next time", key, e)
            return
        with self._lock:
            old = self._sizes.pop(key, None)
            if old is not None:
                self._total -= old
            self._sizes[key] = len(data)
            self._total += len(data)
            self._evict_locked()

    @property
    def cached_bytes(self) -> int:
        """Total size of the cached files."""
        with self._lock:
            return self._total

    def cached_keys(self) -> list[str]:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._sizes)

    # -- the store -----------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The cached file if present (marked used), else the inner store's object (then cached).

        Raises:
            ValueError: Invalid key.
            ArtifactNotFound: No such object in the inner store.
            ArtifactStoreError: The inner store failed.
        """
        validate_key(key)
        path = self._path(key)
        with self._lock:
            hit = key in self._sizes
            if hit:
                self._sizes.move_to_end(key)
                with contextlib.suppress(OSError):
                    os.utime(path)
        if hit:
            try:
                return path.read_bytes()
            except OSError:  # evicted meanwhile, or removed from outside: fetch it again
                with self._lock:
                    if key in self._sizes and not path.exists():
                        self._forget_locked(key)
        data = self.inner.get(key)
        self._store(key, data)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Write through: the inner store first (durable), then the cache.

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The inner store failed (then nothing is cached).
        """
        validate_key(key)
        data = bytes(data)
        self.inner.put(key, data)
        self._store(key, data)

    def exists(self, key: str) -> bool:
        """True if cached (objects are immutable), else asks the inner store.

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The inner store failed.
        """
        validate_key(key)
        with self._lock:
            if key in self._sizes:
                return True
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        """Delete from the inner store, then from the cache.

        Raises:
            ValueError: Invalid key.
            ArtifactStoreError: The inner store failed.
        """
        validate_key(key)
        self.inner.delete(key)
        with self._lock:
            self._forget_locked(key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete from the inner store, then the cached files the prefix covers.

        Returns:
            How many objects the inner store deleted.

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: The inner store failed (the cache is cleared below the prefix anyway).
        """
        prefix = validate_prefix(prefix)
        try:
            return self.inner.delete_prefix(prefix)
        finally:
            with self._lock:
                for key in [k for k in self._sizes if _under(k, prefix)]:
                    self._forget_locked(key)

    def list(self, prefix: str) -> list[str]:
        """The inner store's keys (the cache is not authoritative).

        Raises:
            ValueError: Invalid prefix.
            ArtifactStoreError: The inner store failed.
        """
        return self.inner.list(prefix)

    def check(self) -> None:
        """Check the inner store, then that the cache folder is writable.

        Raises:
            ArtifactStoreError: The inner store failed its check, or the cache folder is not writable.
        """
        self.inner.check()
        probe = self.cache_dir / f"check{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            message = f"{self.url}: cache folder {self.cache_dir} is not writable: {_one_line(e)}"
            raise ArtifactStoreError(message) from e

    def __repr__(self) -> str:
        return f"CachedArtifactStore({self.inner!r}, cache_dir={str(self.cache_dir)!r}, max_bytes={self.max_bytes})"


# ---- opening by URL ---------------------------------------------------------------------------------


def _shown(url: str) -> str:
    """The URL for an error message, with any ``user:password@`` left out."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return parts._replace(netloc="<credentials>@" + parts.netloc.rsplit("@", 1)[1]).geturl()
    return url


def open_artifact_store(url: str | None, *, cache_dir: Path, cache_max_bytes: int) -> ArtifactStore | None:
    """Open the artifact store a `BALPM_ARTIFACT_URL` names.

    Args:
        url: None or "" (no artifact store: the data dir is the system of record),
            ``file:///absolute/path`` or ``s3://bucket[/prefix]``.
        cache_dir: Folder of the local read cache (s3:// only; a file:// store is local already).
        cache_max_bytes: Bound of that cache.

    Returns:
        The store, or None for no URL. Nothing is contacted: call `ArtifactStore.check` for that.

    Raises:
        ValueError: Not one of the URL forms above (the message says which forms are accepted).
    """
    if url is None or not url.strip():
        return None
    url = url.strip()
    bad = f"BALPM_ARTIFACT_URL must be {_URL_FORMS}, got {_shown(url)!r}"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"{bad} ({e})") from None
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise ValueError(f"{bad}: no query or fragment allowed")
    if scheme == "file":
        if not url[len("file:") :].startswith("///") or parts.netloc:
            raise ValueError(f"{bad}: a file URL needs an absolute path after 'file://' (three slashes in all)")
        path = Path(unquote(parts.path))
        if not path.is_absolute() or any(seg in (".", "..") for seg in path.parts):
            raise ValueError(f"{bad}: the path must be absolute and normalised")
        return FileArtifactStore(path, url=url)
    if scheme == "s3":
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(f"{bad}: credentials and ports do not belong in the URL (use the AWS_* environment)")
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{bad}: {bucket!r} is not a valid S3 bucket name")
        prefix = parts.path[1:] if parts.path.startswith("/") else parts.path
        try:
            validate_prefix(prefix)
        except ValueError as e:
            raise ValueError(f"{bad}: bad prefix: {e}") from None
        inner = S3ArtifactStore(bucket, prefix)
        return CachedArtifactStore(inner, cache_dir, cache_max_bytes)
    raise ValueError(bad)
