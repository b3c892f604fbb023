"""Full and read-only disks: stable statuses without server paths, nothing acknowledged lost, clean start-up errors.

The full-disk and read-only tests use real filesystems: a small tmpfs filled with a
file, and read-only (bind) mounts. They need root (as here and in CI); elsewhere
they skip, saying why. Every mount is undone in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from balpm import Client
from balpm.errors import BalpmError
from balpm_server import errors
from balpm_server.storage import faults
from balpm_server.storage.faults import storage_error
from balpm_server.transport import status
from tests.conftest import ServerThread, make_settings, synthetic_items
from tests.procserver import free_port

SMALL = {"ensemble_size": 2, "hidden_sizes": [16], "epochs": 5}
DIM = 8


# ---- mounts ------------------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs / read-only bind mount (tests run as root in CI)")


def _umount(path: Path) -> None:
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))  # busy (a file still open): detach lazily, never leave it mounted


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted at `path` for the duration of the block."""
    _need_root()
    path.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` remounted read-only (a bind mount over itself) for the duration of the block."""
    _need_root()
    r = _run("mount", "--bind", str(path), str(path))
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
    try:
        r = _run("mount", "-o", "remount,ro,bind", str(path))
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {r.stderr.strip()}")
        yield path
    finally:
        _umount(path)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until the filesystem has no byte left; returns it."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) == 0:
                        break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def running(data_dir: Path) -> Iterator[ServerThread]:
    """An in-process server (no extractor: client-feature pools) on `data_dir`."""
    srv = ServerThread(make_settings(data_dir, extractor=""))
    try:
        yield srv
    finally:
        srv.stop()


def assert_fault(err: BalpmError, code: grpc.StatusCode, reason: str) -> None:
    assert err.code == code, f"{err.code.name} {err.reason}: {err.message}"
    assert err.reason == reason, err
    assert "/" not in err.message, f"server path in message: {err.message}"


def labels(prefix: str, item_ids: list[str], annotator: str = "ann") -> list[dict[str, str]]:
    return [
        {"label_id": f"{prefix}-{iid}", "item_id": iid, "preference": "AB"[i % 2], "annotator_id": annotator}
        for i, iid in enumerate(item_ids)
    ]


def exported(c: Client, pool_id: str) -> list[str]:
    return [lb.label.label_id for lb in c.export_labels(pool_id)]


# ---- (a) a full disk ----------------------------------------------------------------------


def test_disk_full_returns_resource_exhausted_not_internal(tmp_path: Path) -> None:
    items, _ = synthetic_items(72, DIM, seed=0)
    # Texts larger than SQLite's page cache (2 MiB): the INSERT itself spills and fails, not only the COMMIT.
    big = [{**it, "prompt": "p" * 90_000, "completion_a": "a" * 90_000, "completion_b": "b" * 90_000}
           for it in items[60:]]
    with (
        tmpfs(tmp_path / "vol", size="16m") as vol,
        running(vol / "data") as srv,
        Client(srv.target, timeout_s=30) as c,
    ):
        c.create_pool("p", feature_source="CLIENT", feature_dim=DIM, **SMALL)
        assert c.upload_items("p", items[:40]).accepted_count == 40
        acked = labels("before", [f"it-{i}" for i in range(10)])
        c.ingest_labels("p", acked)
        filler = fill(vol)

        late_items = items[40:60]
        late_labels = labels("during", [f"it-{i}" for i in range(10, 20)])
        calls = {
            "CreatePool": lambda: c.create_pool("p2", feature_source="CLIENT", feature_dim=DIM, **SMALL),
            "UploadItems": lambda: c.upload_items("p", late_items),
            "UploadItems (large)": lambda: c.upload_items("p", big),
            "IngestLabels": lambda: c.ingest_labels("p", late_labels),
            "AcquireBatch": lambda: c.acquire("p", batch_size=3, strategy="RANDOM", annotator_id="ann"),
        }
        for name, call in calls.items():
            with pytest.raises(BalpmError) as exc:
                call()
            assert_fault(exc.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL")
            assert exc.value.metadata.get("cause") in ("SQLITE_FULL", "ENOSPC", "EDQUOT"), (name, exc.value.metadata)
        # The server keeps serving reads on the full disk.
        assert c.get_pool("p").label_count == 10
        assert sorted(exported(c, "p")) == sorted(lb["label_id"] for lb in acked)

        filler.unlink()  # the operator frees space: the same calls succeed, nothing is lost
        assert c.create_pool("p2", feature_source="CLIENT", feature_dim=DIM, **SMALL).pool_id == "p2"
        up = c.upload_items("p", late_items)
        assert (up.accepted_count, up.duplicate_count) == (20, 0)  # nothing was half-stored
        assert c.upload_items("p", big).accepted_count == len(big)
        assert c.get_pool("p").item_count == 72
        assert c.ingest_labels("p", late_labels).stored_count == 10
        assert len(c.acquire("p", batch_size=3, strategy="RANDOM", annotator_id="ann").items) == 3
        want = sorted(lb["label_id"] for lb in acked + late_labels)
        assert sorted(exported(c, "p")) == want


def test_disk_full_stop_and_restart_loses_no_acknowledged_label(tmp_path: Path) -> None:
    items, _ = synthetic_items(20, DIM, seed=1)
    with tmpfs(tmp_path / "vol") as vol:
        data = vol / "data"
        with running(data) as srv, Client(srv.target, timeout_s=30) as c:
            c.create_pool("p", feature_source="CLIENT", feature_dim=DIM, **SMALL)
            c.upload_items("p", items)
            acked = labels("a", [f"it-{i}" for i in range(5)])
            c.ingest_labels("p", acked)
            filler = fill(vol)
            for i in range(3):  # repeated failures leave no transaction behind
                with pytest.raises(BalpmError) as exc:
                    c.ingest_labels("p", labels(f"x{i}", ["it-7", "it-8"]))
                assert_fault(exc.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL")
        # Stopped while the disk is full (its closing checkpoint cannot grow the file), then space is freed.
        filler.unlink()
        with running(data) as srv, Client(srv.target, timeout_s=30) as c:
            assert sorted(exported(c, "p")) == sorted(lb["label_id"] for lb in acked)
            more = labels("b", [f"it-{i}" for i in range(5, 10)])
            assert c.ingest_labels("p", more).stored_count == 5
        with running(data) as srv, Client(srv.target, timeout_s=30) as c:
            assert sorted(exported(c, "p")) == sorted(lb["label_id"] for lb in acked + more)


# ---- (b) a read-only pools folder ---------------------------------------------------------


def _pool_with_labels(c: Client, data: Path, items: list[dict[str, Any]]) -> None:
    c.create_pool("p", feature_source="CLIENT", feature_dim=DIM, **SMALL)
    assert c.upload_items("p", items).accepted_count == len(items)
    c.ingest_labels("p", labels("l", [f"it-{i}" for i in range(12)]))
    # Let the background kNN graph build (started by the upload) save its file before the folder turns read-only.
    deadline = time.monotonic() + 15
    while not list(data.glob("pools/**/knn-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_read_only_pools_folder_returns_unavailable_not_internal(tmp_path: Path) -> None:
    items, _ = synthetic_items(40, DIM, seed=2)
    data = tmp_path / "data"
    with running(data) as srv, Client(srv.target, timeout_s=30) as c:
        _pool_with_labels(c, data, items[:30])
        with read_only(data / "pools"):
            with pytest.raises(BalpmError) as exc:
                c.upload_items("p", items[30:])
            assert_fault(exc.value, grpc.StatusCode.UNAVAILABLE, "STORAGE_READ_ONLY")
            # Metadata lives outside the pools folder: the server keeps working.
            assert len(c.acquire("p", batch_size=2, strategy="RANDOM", annotator_id="ann").items) == 2
            c.ingest_labels("p", labels("ro", ["it-20"]))
        up = c.upload_items("p", items[30:])
        assert (up.accepted_count, up.duplicate_count) == (10, 0)
        assert len(exported(c, "p")) == 13


def test_read_only_pools_folder_training_error_names_no_path(tmp_path: Path) -> None:
    items, _ = synthetic_items(30, DIM, seed=3)
    data = tmp_path / "data"
    with running(data) as srv, Client(srv.target, timeout_s=60) as c:
        _pool_with_labels(c, data, items)
        with read_only(data / "pools"):
            with pytest.raises(BalpmError) as exc:
                c.update_posterior("p", timeout_s=120)
            assert exc.value.code == grpc.StatusCode.UNAVAILABLE, exc.value
            assert "/" not in exc.value.message, f"server path in the operation error: {exc.value.message}"
            assert "read-only" in exc.value.message
        op = c.update_posterior("p", timeout_s=120)  # writable again: training succeeds
        assert op.result.posterior_version == 1
        assert c.get_pool("p").posterior_version == 1


# ---- (c) start-up -------------------------------------------------------------------------


def _start(data_dir: Path, timeout_s: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run `balpm-server` on `data_dir` expecting it to exit (a server that starts is killed: a failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BALPM_LOG_JSON": "true"}
    cmd = [sys.executable, "-m", "balpm_server.server", "--host", "127.0.0.1", "--port", str(free_port()),
           "--data-dir", str(data_dir), "--metrics-port", "-1"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"balpm-server kept running on a broken data dir; output: {e.stdout!r} {e.stderr!r}")


def assert_clean_startup_error(r: subprocess.CompletedProcess[str], reason: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    error_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("balpm-server: error:")]
    assert len(error_lines) == 1, r.stderr
    assert reason in error_lines[0], error_lines[0]


def _make_store(data: Path) -> None:
    """A data dir with a pool in it, written by a server that then stopped."""
    with running(data) as srv, Client(srv.target, timeout_s=30) as c:
        c.create_pool("p", feature_source="CLIENT", feature_dim=DIM, **SMALL)


@pytest.mark.parametrize("existing", [False, True], ids=["empty", "with-store"])
def test_startup_on_full_disk_exits_2_with_error_line_not_traceback(tmp_path: Path, existing: bool) -> None:
    with tmpfs(tmp_path / "vol") as vol:
        if existing:
            _make_store(vol / "data")
        fill(vol)
        assert_clean_startup_error(_start(vol / "data"), "DISK_FULL")


@pytest.mark.parametrize("existing", [False, True], ids=["empty", "with-store"])
def test_startup_on_read_only_data_dir_exits_2_with_error_line_not_traceback(tmp_path: Path, existing: bool) -> None:
    with tmpfs(tmp_path / "vol", size="16m") as vol:
        data = vol / "data"
        data.mkdir()
        if existing:
            _make_store(data)
        with read_only(data):
            assert_clean_startup_error(_start(data), "STORAGE_READ_ONLY")


# ---- (d) the classifier, fault by fault ---------------------------------------------------

PATH = "/srv/balpm/data/pools/p/features/a.f32"
EDQUOT = getattr(errno, "EDQUOT", None)
OS_CASES = [
    (errno.ENOSPC, "DISK_FULL"),
    (errno.EROFS, "STORAGE_READ_ONLY"),
    (errno.EACCES, "STORAGE_READ_ONLY"),
    (errno.EIO, "STORAGE_UNAVAILABLE"),
    *([(EDQUOT, "DISK_FULL")] if EDQUOT is not None else []),
]
SQLITE_CASES = [
    ("database or disk is full", "DISK_FULL"),
    ("attempt to write a readonly database", "STORAGE_READ_ONLY"),
    ("disk I/O error", "STORAGE_UNAVAILABLE"),
    ("unable to open database file", "STORAGE_UNAVAILABLE"),
]
CODES = {"DISK_FULL": grpc.StatusCode.RESOURCE_EXHAUSTED}


def _check(err: errors.BalpmError | None, reason: str) -> None:
    assert err is not None
    assert err.reason == reason
    assert status.grpc_code(err) == CODES.get(reason, grpc.StatusCode.UNAVAILABLE)
    assert err.message == faults.MESSAGES[reason]
    assert "/" not in err.message and "srv" not in err.message


@pytest.mark.parametrize(("code", "reason"), OS_CASES, ids=[errno.errorcode[c] for c, _ in OS_CASES])
def test_storage_error_classifies_os_errno_without_path(code: int, reason: str) -> None:
    exc = OSError(code, os.strerror(code), PATH)
    assert PATH in str(exc)
    err = storage_error(exc)
    _check(err, reason)
    assert err is not None and err.metadata["cause"] == errno.errorcode[code]
    # The subclasses Python raises (PermissionError, ...) are OSErrors with the same errno.
    _check(storage_error(PermissionError(code, os.strerror(code), PATH)), reason)


@pytest.mark.parametrize(("message", "reason"), SQLITE_CASES, ids=[r for _, r in SQLITE_CASES])
@pytest.mark.parametrize("cls", [sqlite3.OperationalError, sqlite3.DatabaseError])
def test_storage_error_classifies_sqlite_messages(cls: type[sqlite3.DatabaseError], message: str, reason: str) -> None:
    _check(storage_error(cls(message)), reason)


def test_storage_error_classifies_real_sqlite_errors(tmp_path: Path) -> None:
    db = tmp_path / "x.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.execute("PRAGMA max_page_count = 3")  # a database that is "full" after a few pages
    with pytest.raises(sqlite3.OperationalError) as full:
        conn.execute("INSERT INTO t VALUES (?)", (b"\0" * 100_000,))
    conn.close()
    _check(storage_error(full.value), "DISK_FULL")
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as readonly:
        ro.execute("INSERT INTO t VALUES (1)")
    ro.close()
    _check(storage_error(readonly.value), "STORAGE_READ_ONLY")
    with pytest.raises(sqlite3.OperationalError) as cantopen:
        sqlite3.connect(tmp_path / "missing" / "y.sqlite3")
    _check(storage_error(cantopen.value), "STORAGE_UNAVAILABLE")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Error while serializing: I/O error: No space left on device (os error 28)", "DISK_FULL"),
        ('I/O error: Read-only file system (os error 30) at path "/srv/x"', "STORAGE_READ_ONLY"),
    ],
)
def test_storage_error_classifies_rust_io_errors(text: str, reason: str) -> None:
    class SafetensorError(Exception):  # what safetensors raises: not an OSError
        pass

    _check(storage_error(SafetensorError(text)), reason)


def test_storage_error_follows_cause_and_context() -> None:
    # A failed ROLLBACK after a failed write: the write's fault is what the caller sees.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", PATH)
        except OSError:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active")  # noqa: B904
    except sqlite3.OperationalError as e:
        _check(storage_error(e), "DISK_FULL")
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system", PATH)
    _check(storage_error(wrapped), "STORAGE_READ_ONLY")
    hidden = RuntimeError("replaced on purpose")  # `raise ... from None` hides the context
    hidden.__context__, hidden.__suppress_context__ = OSError(errno.ENOSPC, "full", PATH), True
    assert storage_error(hidden) is None


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        OSError(errno.ENOENT, "No such file or directory", PATH),
        OSError("no errno"),
        sqlite3.IntegrityError("UNIQUE constraint failed: pools.pool_id"),
        sqlite3.OperationalError("no such table: pools"),
        sqlite3.OperationalError("database is locked"),
        RuntimeError("something (os error 2)"),
        errors.InvalidArgument("bad field", field="x"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:24],
)
def test_storage_error_ignores_other_failures(exc: BaseException) -> None:
    assert storage_error(exc) is None


def test_storage_error_never_reclassifies_domain_errors() -> None:
    err = errors.FailedPrecondition("corrupt pool", reason="CORRUPT_POOL")
    err.__cause__ = OSError(errno.EIO, "Input/output error", PATH)
    assert storage_error(err) is None


def test_storage_error_chain_with_cycle_terminates() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert storage_error(a) is None


class _Context:
    """The part of a ServicerContext `status.abort` uses."""

    def __init__(self) -> None:
        self.status: Any = None

    async def abort_with_status(self, st: Any) -> None:
        self.status = st
        raise grpc.aio.AbortError()


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (sqlite3.OperationalError("database or disk is full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL"),
        (OSError(errno.EROFS, "Read-only file system", PATH), grpc.StatusCode.UNAVAILABLE, "STORAGE_READ_ONLY"),
        (OSError(errno.EIO, "Input/output error", PATH), grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
    ],
    ids=["full", "read-only", "io-error"],
)
def test_abort_maps_storage_faults_not_internal(
    exc: BaseException, code: grpc.StatusCode, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = _Context()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(status.abort(ctx, exc, "IngestLabels"))  # type: ignore[arg-type]
    assert ctx.status.code == code
    assert "/" not in ctx.status.details
    infos = []
    for key, value in ctx.status.trailing_metadata:
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if d.Unpack(info):
                    infos.append(info)
    assert [i.reason for i in infos] == [reason]
    # The server log keeps the original, path included.
    assert any(PATH in r.getMessage() or "disk is full" in r.getMessage() for r in caplog.records)
