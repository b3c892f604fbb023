"""Artifact stores: file and S3 (a real `moto_server` on loopback), the LRU read cache, URL parsing.

The S3 tests talk to a `moto_server` process started once for the module (no gRPC server, so
these stay `unit`); the endpoint reaches boto3 only through ``AWS_ENDPOINT_URL_S3``, as in
production. Every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from balpm_server.storage.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreError,
    ArtifactStoreUnavailable,
    CachedArtifactStore,
    FileArtifactStore,
    S3ArtifactStore,
    open_artifact_store,
    validate_key,
)

BUCKET = "balpm-test"
STARTUP_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log_path: Path, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return
        except urllib.error.HTTPError:
            return  # it answers HTTP
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"moto_server did not answer {url} within {deadline_s:.0f} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `moto_server` on a free loopback port, the AWS_* environment pointing at it, and bucket BUCKET."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.skip(f"no moto_server next to {sys.executable} (pip install 'moto[server]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_http(endpoint + "/", proc, log_path, STARTUP_S)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
                mp.delenv(name, raising=False)
            nowhere = str(tmp_path_factory.mktemp("aws") / "none")
            mp.setenv("AWS_CONFIG_FILE", nowhere)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            import boto3

            boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _s3(prefix: str | None = None, **kwargs: Any) -> S3ArtifactStore:
    return S3ArtifactStore(BUCKET, prefix if prefix is not None else f"t/{uuid.uuid4().hex}", **kwargs)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """A fresh, empty store of each kind (S3: its own prefix in the shared bucket)."""
    if request.param == "file":
        root = tmp_path / "artifacts"
        root.mkdir()
        return FileArtifactStore(root)
    request.getfixturevalue("moto_endpoint")
    return _s3()


@pytest.fixture(scope="module")
def shared_s3(moto_endpoint: str) -> S3ArtifactStore:
    """One S3 store for tests that never write (client creation is the slow part)."""
    return _s3()


class Counting:
    """An `ArtifactStore` proxy that counts the calls to its inner store."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def put(self, key: str, data: bytes) -> None:
        self._count("put")
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self._count("get")
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        self._count("exists")
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self._count("delete")
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        self._count("delete_prefix")
        return self.inner.delete_prefix(prefix)

    def list(self, prefix: str) -> list[str]:
        self._count("list")
        return self.inner.list(prefix)

    def check(self) -> None:
        self._count("check")
        self.inner.check()


# ---- every store -----------------------------------------------------------------------------------


def test_put_get_roundtrip_small_and_5mb(store: ArtifactStore) -> None:
    big = os.urandom(5 * 1024 * 1024)
    store.put("pools/p1/features/chunk-0000.npy", b"small")
    store.put("pools/p1/posterior/v0001.safetensors", big)
    store.put("empty", b"")
    assert store.get("pools/p1/features/chunk-0000.npy") == b"small"
    assert store.get("pools/p1/posterior/v0001.safetensors") == big
    assert store.get("empty") == b""
    assert store.exists("empty") and not store.exists("pools/p1")
    store.put("pools/p1/features/chunk-0000.npy", b"again")  # an overwrite is atomic too (if unusual)
    assert store.get("pools/p1/features/chunk-0000.npy") == b"again"


def test_get_missing_raises_artifact_not_found(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound, match=r"nope/missing\.bin") as info:
        store.get("nope/missing.bin")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ArtifactStoreError)
    assert str(info.value).startswith(store.url)
    assert not store.exists("nope/missing.bin")
    store.delete("nope/missing.bin")  # idempotent


def test_list_and_delete_prefix_cover_folders_not_string_prefixes(store: ArtifactStore) -> None:
    keys = ["pool1/a", "pool1/sub/b", "pool10/c", "other/d", "top"]
    for k in keys:
        store.put(k, k.encode())
    assert store.list("") == sorted(keys)
    assert store.list("pool1") == ["pool1/a", "pool1/sub/b"]
    assert store.list("pool1/") == ["pool1/a", "pool1/sub/b"]
    assert store.list("pool10/c") == ["pool10/c"]  # a key covers itself
    assert store.list("missing") == []
    assert store.delete_prefix("pool1") == 2
    assert store.list("") == ["other/d", "pool10/c", "top"]
    assert store.delete_prefix("missing") == 0
    assert store.delete_prefix("top") == 1
    assert store.delete_prefix("") == 2
    assert store.list("") == []


@pytest.mark.parametrize(
    "key",
    ["", "/a", "a//b", "a/", "../a", "a/../b", "./a", "a/.", "a b", "a\\b", "é", "a/b?c", "a\x00b", "a~b",
     "x" * 256, "/".join(["abcdefgh"] * 100)],
)
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_invalid_keys_are_rejected(request: pytest.FixtureRequest, tmp_path: Path, kind: str, key: str) -> None:
    # Keys are checked before any I/O; one S3 store for all cases keeps this fast (a boto3 client costs ~0.3 s).
    store: ArtifactStore = FileArtifactStore(tmp_path) if kind == "file" else request.getfixturevalue("shared_s3")
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.exists(key)
    if key not in ("", "a/"):  # "" lists everything; one trailing "/" is allowed in a prefix
        with pytest.raises(ValueError):
            store.list(key)
        with pytest.raises(ValueError):
            store.delete_prefix(key)


def test_valid_keys_accepted() -> None:
    for key in ["a", "A.b_c-d+e=f/g", "_balpm_check/0123abcd", "...", "v/0007.safetensors"]:
        assert validate_key(key) == key


def test_check_passes_and_leaves_nothing(store: ArtifactStore) -> None:
    store.check()
    assert store.list("") == []


# ---- files -----------------------------------------------------------------------------------------


def test_file_store_leaves_no_temp_files_and_ignores_strays(tmp_path: Path) -> None:
    root = tmp_path / "art"
    root.mkdir()
    fs = FileArtifactStore(root)
    fs.put("a/b/c.bin", b"1")
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["c.bin"]
    (root / "a" / "b" / "d.bin~tmp-123").write_bytes(b"torn")  # a write cut short by a crash
    assert fs.list("") == ["a/b/c.bin"]
    assert fs.delete_prefix("a") == 1  # the stray temp file goes too, uncounted
    assert list(root.iterdir()) == []  # empty folders pruned, the root kept


def test_file_store_missing_root_fails_check_with_url(tmp_path: Path) -> None:
    fs = FileArtifactStore(tmp_path / "not-mounted")
    with pytest.raises(ArtifactStoreError, match=r"^file://.*not-mounted: folder .* does not exist"):
        fs.check()
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        fs.get("a")
    assert not (tmp_path / "not-mounted").exists()  # never created behind the operator's back


def test_file_store_needs_absolute_root() -> None:
    with pytest.raises(ValueError, match="absolute"):
        FileArtifactStore(Path("relative/dir"))


# ---- S3 --------------------------------------------------------------------------------------------


def test_s3_endpoint_comes_from_environment(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _s3().endpoint_url == moto_endpoint  # AWS_ENDPOINT_URL_S3, read by botocore itself
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # the all-services variable works too
    s = _s3()
    assert s.endpoint_url == moto_endpoint
    s.put("k", b"v")
    assert s.get("k") == b"v"


def test_s3_prefixes_do_not_leak_into_each_other(moto_endpoint: str) -> None:
    base = f"iso/{uuid.uuid4().hex}"
    a, ab = _s3(f"{base}/a"), _s3(f"{base}/ab")
    a.put("k1", b"a")
    ab.put("k2", b"ab")
    assert a.list("") == ["k1"] and ab.list("") == ["k2"]
    assert a.delete_prefix("") == 1
    assert ab.get("k2") == b"ab"
    assert a.url == f"s3://{BUCKET}/{base}/a"


def test_s3_pagination_and_delete_batches(moto_endpoint: str) -> None:
    s = _s3()
    s.list_page_size, s.delete_batch = 7, 5  # the 1,000 of S3, scaled down to keep the test fast
    calls: dict[str, int] = {"ListObjectsV2": 0, "DeleteObjects": 0}

    def count(model: Any, **_: Any) -> None:
        if model.name in calls:
            calls[model.name] += 1

    s._client.meta.events.register("before-call.s3", count)
    keys = [f"many/{i:03d}" for i in range(23)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s.put(k, k.encode()), keys))
    assert s.list("many") == keys
    assert calls["ListObjectsV2"] == 4  # ceil(23 / 7)
    assert s.delete_prefix("many") == 23
    assert calls["DeleteObjects"] == 5  # ceil(23 / 5)
    assert s.list("") == []


def test_s3_delete_prefix_over_1000_objects(moto_endpoint: str) -> None:
    """The real batch size: 1,050 objects are two DeleteObjects calls and two list pages."""
    s = _s3()
    keys = [f"k/{i:04d}" for i in range(1050)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s.put(k, b"x"), keys))
    assert s.list("") == keys
    assert s.delete_prefix("k") == 1050
    assert s.list("") == []


def test_s3_check_names_missing_bucket(moto_endpoint: str) -> None:
    s = S3ArtifactStore("no-such-bucket-balpm", "p")
    with pytest.raises(ArtifactStoreError) as info:
        s.check()
    assert not isinstance(info.value, ArtifactStoreUnavailable)
    assert str(info.value) == "s3://no-such-bucket-balpm/p: bucket 'no-such-bucket-balpm' does not exist"
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        s.get("k")  # not ArtifactNotFound: the bucket is missing, not the key
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        s.list("")


def test_s3_check_unreachable_endpoint_is_unavailable(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    s = _s3(connect_timeout_s=1.0, read_timeout_s=2.0, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(ArtifactStoreUnavailable) as info:
        s.check()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert message.startswith(f"{s.url}: cannot reach endpoint {closed}: ") and "\n" not in message
    with pytest.raises(ArtifactStoreUnavailable):
        s.get("k")


@pytest.mark.parametrize(
    ("code", "status", "kind", "text"),
    [
        ("AccessDenied", 403, ArtifactStoreError, "access denied (AccessDenied)"),
        ("SlowDown", 503, ArtifactStoreUnavailable, "SlowDown"),
        ("InternalError", 500, ArtifactStoreUnavailable, "InternalError"),
        ("InvalidObjectState", 403, ArtifactStoreError, "(InvalidObjectState)"),
    ],
)
def test_s3_error_mapping(code: str, status: int, kind: type[Exception], text: str) -> None:
    import boto3
    from botocore.stub import Stubber

    client = boto3.session.Session(
        aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    ).client("s3")
    s = S3ArtifactStore(BUCKET, "p", client=client)
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code=code, service_message="nope", http_status_code=status)
        with pytest.raises(kind) as info:
            s.get("k")
    assert type(info.value) is kind and text in str(info.value) and str(info.value).startswith("s3://balpm-test/p:")


# ---- the cache -------------------------------------------------------------------------------------


@pytest.fixture
def inner(tmp_path: Path) -> Counting:
    root = tmp_path / "inner"
    root.mkdir()
    return Counting(FileArtifactStore(root))


def test_cache_serves_second_get_without_inner(inner: Counting, tmp_path: Path) -> None:
    inner.inner.put("v/1", b"one")
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=1000)
    assert cache.get("v/1") == b"one"
    assert cache.get("v/1") == b"one"
    assert inner.calls == {"get": 1}
    assert cache.exists("v/1") and inner.calls == {"get": 1}
    with pytest.raises(ArtifactNotFound):
        cache.get("v/missing")
    assert cache.url == inner.url


def test_cache_put_writes_through(inner: Counting, tmp_path: Path) -> None:
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=1000)
    cache.put("v/2", b"two")
    assert inner.inner.get("v/2") == b"two"  # durable in the system of record
    assert cache.get("v/2") == b"two"
    assert inner.calls == {"put": 1}  # served from the cache
    assert cache.cached_keys() == ["v/2"]


def test_cache_evicts_least_recently_used(inner: Counting, tmp_path: Path) -> None:
    for k in "abc":
        inner.inner.put(k, k.encode() * 100)
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=250)
    cache.get("a")
    cache.get("b")
    cache.get("a")  # a is now the most recently used
    cache.get("c")  # 300 bytes > 250: b goes
    assert cache.cached_keys() == ["a", "c"]
    assert cache.cached_bytes == 200 <= cache.max_bytes
    assert not (tmp_path / "cache" / "objects" / "b").exists()
    assert inner.calls["get"] == 3
    cache.get("b")  # fetched again; a (least recent now) goes
    assert cache.cached_keys() == ["c", "b"] and inner.calls["get"] == 4
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file())
    assert on_disk == cache.cached_bytes == 200


def test_cache_does_not_cache_objects_over_the_bound(inner: Counting, tmp_path: Path) -> None:
    inner.inner.put("big", b"x" * 2000)
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=1000)
    assert cache.get("big") == b"x" * 2000
    assert cache.cached_keys() == [] and cache.cached_bytes == 0


def test_cache_rebuilds_from_folder_lru_by_mtime(inner: Counting, tmp_path: Path) -> None:
    for k in ("p/a", "p/b", "p/c"):
        inner.inner.put(k, b"x" * 100)
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=1000)
    for k in ("p/a", "p/b", "p/c"):
        cache.get(k)
    objects = tmp_path / "cache" / "objects"
    now = time.time()
    for age, k in ((30, "p/a"), (10, "p/b"), (20, "p/c")):  # LRU order: a, c, b
        os.utime(objects / k, (now - age, now - age))
    (objects / "p" / "d~tmp-deadbeef").write_bytes(b"torn")
    again = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=1000)
    assert again.cached_keys() == ["p/a", "p/c", "p/b"] and again.cached_bytes == 300
    assert not (objects / "p" / "d~tmp-deadbeef").exists()
    again.get("p/a")  # a hit refreshes the mtime
    smaller = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=150)  # shrunk bound: evicts at start
    assert smaller.cached_keys() == ["p/a"] and smaller.cached_bytes == 100
    assert inner.calls["get"] == 3


def test_cache_for_another_url_is_emptied(inner: Counting, tmp_path: Path) -> None:
    inner.inner.put("k", b"v")
    CachedArtifactStore(inner, tmp_path / "cache", max_bytes=100).get("k")
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = CachedArtifactStore(FileArtifactStore(other_root), tmp_path / "cache", max_bytes=100)
    assert other.cached_keys() == []
    with pytest.raises(ArtifactNotFound):
        other.get("k")


def test_cache_delete_prefix_deletes_from_both(inner: Counting, tmp_path: Path) -> None:
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=1000)
    for k in ("pool1/a", "pool1/b", "pool2/a"):
        cache.put(k, b"v")
    assert cache.delete_prefix("pool1") == 2
    assert cache.cached_keys() == ["pool2/a"] and inner.inner.list("") == ["pool2/a"]
    with pytest.raises(ArtifactNotFound):
        cache.get("pool1/a")
    cache.delete("pool2/a")
    assert cache.cached_keys() == [] and inner.inner.list("") == []
    assert not any((tmp_path / "cache" / "objects").iterdir())


def test_cache_is_thread_safe_under_eviction(inner: Counting, tmp_path: Path) -> None:
    keys = [f"k/{i:02d}" for i in range(20)]
    for k in keys:
        inner.inner.put(k, k.encode() * 10)  # 50 bytes each
    cache = CachedArtifactStore(inner, tmp_path / "cache", max_bytes=300)

    def read(i: int) -> bool:
        k = keys[(i * 7) % len(keys)]
        return cache.get(k) == k.encode() * 10

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, range(400)))
    assert cache.cached_bytes <= 300
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file())
    assert on_disk == cache.cached_bytes


def test_cache_over_s3(moto_endpoint: str, tmp_path: Path) -> None:
    store = open_artifact_store(f"s3://{BUCKET}/t/{uuid.uuid4().hex}", cache_dir=tmp_path / "c", cache_max_bytes=10**6)
    assert isinstance(store, CachedArtifactStore) and isinstance(store.inner, S3ArtifactStore)
    store.check()
    store.put("v/1", b"data")
    assert store.get("v/1") == b"data" and store.list("") == ["v/1"]
    assert store.delete_prefix("") == 1 and store.cached_keys() == []


# ---- URLs ------------------------------------------------------------------------------------------


def test_open_artifact_store_urls(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"cache_dir": tmp_path / "cache", "cache_max_bytes": 1000}
    assert open_artifact_store(None, **kw) is None
    assert open_artifact_store("", **kw) is None
    assert open_artifact_store("  ", **kw) is None
    fs = open_artifact_store(f"file://{tmp_path}/art", **kw)
    assert isinstance(fs, FileArtifactStore) and fs.root == tmp_path / "art" and fs.url == f"file://{tmp_path}/art"
    spaced = open_artifact_store("file:///srv/my%20art", **kw)
    assert isinstance(spaced, FileArtifactStore) and spaced.root == Path("/srv/my art")
    s3 = open_artifact_store("s3://my-bucket/some/prefix/", **kw)
    assert isinstance(s3, CachedArtifactStore) and isinstance(s3.inner, S3ArtifactStore)
    assert (s3.inner.bucket, s3.inner.prefix, s3.url) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    bare = open_artifact_store("s3://my-bucket", **kw)
    assert isinstance(bare, CachedArtifactStore) and bare.url == "s3://my-bucket"


@pytest.mark.parametrize(
    "url",
    ["file://relative/path", "file:relative", "file:/one-slash", "file:///a/../b", "file:///a?x=1",
     "s3://", "s3://Bad_Bucket/p", "s3://ab/p", "s3://bucket/a//b", "s3://bucket/../x", "s3://bucket/a b",
     "s3://key:secret@bucket/p", "s3://bucket:9000/p", "gs://bucket/p", "http://host/x", "/abs/path", "bucket"],
)
def test_open_artifact_store_rejects_bad_urls(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match=r"^BALPM_ARTIFACT_URL must be file:///absolute/path or s3://bucket/prefix"):
        open_artifact_store(url, cache_dir=tmp_path, cache_max_bytes=10)


def test_bad_url_message_hides_credentials(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        open_artifact_store("s3://AKIA:hunter2@bucket/p", cache_dir=tmp_path, cache_max_bytes=10)
    assert "hunter2" not in str(info.value) and "AKIA" not in str(info.value)
