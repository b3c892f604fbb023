"""The SDK's errors: one class per gRPC status code, and no builtin exception escaping the SDK."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

import balpm
from balpm import errors
from balpm.client import Client
from balpm.data import hide_preferences, read_jsonl
from balpm.errors import ERROR_CLASSES, BalpmError
from balpm.messages import UploadStream, item_message
from balpm.simulate import parse_rows
from balpm.v1 import balpm_pb2 as pb
from tests.client.conftest import FakeServicer, featurizing_pool
from tests.conftest import synthetic_items
from tests.procserver import ProcServer

EXPECTED = {
    grpc.StatusCode.CANCELLED: errors.CallCancelledError,
    grpc.StatusCode.UNKNOWN: errors.UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.ABORTED: errors.AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnimplementedError,
    grpc.StatusCode.INTERNAL: errors.InternalError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DATA_LOSS: errors.DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
}


def test_every_status_code_but_ok_maps_to_its_own_class() -> None:
    assert dict(ERROR_CLASSES) == EXPECTED
    assert set(ERROR_CLASSES) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, BalpmError) and cls.CODE is code
    assert errors.CallCancelledError is not asyncio.CancelledError
    assert not issubclass(errors.CallCancelledError, asyncio.CancelledError)
    with pytest.raises(TypeError):
        ERROR_CLASSES[grpc.StatusCode.OK] = BalpmError  # type: ignore[index]
    for name in ("ERROR_CLASSES", "AsyncClient", "WaitTimeoutError", "InvalidInputError", "InternalError"):
        assert hasattr(balpm, name)


def test_client_side_errors_subclass_the_code_they_resemble() -> None:
    assert issubclass(errors.WaitTimeoutError, errors.DeadlineExceededError)
    assert issubclass(errors.InvalidInputError, errors.InvalidArgumentError)
    assert issubclass(errors.MissingDependencyError, errors.FailedPreconditionError)
    e = errors.InvalidInputError.local("items[2].item_id: missing", field="items[2].item_id", reason="INVALID_INPUT")
    assert (e.code, e.field, e.reason, e.message) == (
        grpc.StatusCode.INVALID_ARGUMENT, "items[2].item_id", "INVALID_INPUT", "items[2].item_id: missing"
    )
    assert str(e) == "INVALID_ARGUMENT: items[2].item_id: missing [INVALID_INPUT]"
    missing = errors.missing_dependency("matplotlib", "sim", "plots")
    assert "pip install 'balpm[sim]'" in missing.message
    assert missing.metadata == {"module": "matplotlib", "extra": "sim"}


def test_from_rpc_error_keeps_the_rich_status_of_a_real_call(fake_server: tuple[str, FakeServicer]) -> None:
    target, servicer = fake_server
    servicer.get_pool = lambda n: grpc.StatusCode.PERMISSION_DENIED
    with Client(target, retry=False) as c, pytest.raises(errors.PermissionDeniedError) as e:
        c.get_pool("p")
    assert e.value.code is grpc.StatusCode.PERMISSION_DENIED and e.value.message == "scripted PERMISSION_DENIED"


def test_operation_errors_carry_their_details() -> None:
    info = error_details_pb2.ErrorInfo(reason="DISK_FULL", domain="balpm.dev", metadata={"cause": "ENOSPC"})
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="disk full")
    status.details.add().Pack(info)
    err = errors.from_status(status, reason="OPERATION_STATE_FAILED")
    assert isinstance(err, errors.ResourceExhaustedError)
    assert err.reason == "OPERATION_STATE_FAILED"
    assert err.metadata == {"cause": "ENOSPC", "error_reason": "DISK_FULL"}
    assert isinstance(errors.from_status(status_pb2.Status(code=0)), errors.UnknownError)  # no code: UNKNOWN


def test_a_wait_timeout_raises_the_sdk_error_not_the_builtin(fake_server: tuple[str, FakeServicer]) -> None:
    target, servicer = fake_server
    servicer.get_pool = lambda n: featurizing_pool("slow")
    with Client(target) as c, pytest.raises(errors.WaitTimeoutError) as e:
        c.wait_pool_ready("slow", timeout_s=0.3, poll_s=0.05)
    assert not isinstance(e.value, TimeoutError)
    assert e.value.reason == "WAIT_TIMEOUT" and "3/10" in e.value.message
    assert servicer.calls["GetPool"] >= 2


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1") as c, pytest.raises(errors.UnavailableError) as e:
        c.wait_ready(0.2)
    assert e.value.reason == "SERVER_UNREACHABLE"


BAD_INPUT = [
    (lambda c: c.acquire("p", batch_size=1, strategy="NOPE"), "strategy"),
    (lambda c: c.create_pool("p", feature_source="GPU"), "settings.feature_source"),
    (lambda c: c.create_pool("p", no_such_setting=1), "settings"),
    (lambda c: c.acquire("p", batch_size=1, no_such_option=1.0), "options"),
    (lambda c: c.ingest_labels("p", [{"item_id": "x", "preference": "A"}]), "labels[0].label_id"),
    (
        lambda c: c.ingest_labels("p", [{"label_id": "l", "item_id": "x", "preference": "C"}]),
        "labels[0].preference",
    ),
    (lambda c: c.predict("p", items=[{"prompt": "no id"}]), "items[0].item_id"),
    (lambda c: c.evaluate("p", [({"item_id": "x"}, "maybe")]), "items[0].preference"),
    (lambda c: c.upload_items("p", [], chunk_size=0), "chunk_size"),
    (lambda c: list(c.export_items("p", split="TRAIN")), "split"),
]


@pytest.mark.parametrize(("call", "field"), BAD_INPUT, ids=[field for _, field in BAD_INPUT])
def test_bad_local_input_is_invalid_input_before_any_call(call, field, fake_server) -> None:  # type: ignore[no-untyped-def]
    target, servicer = fake_server
    with Client(target) as c, pytest.raises(errors.InvalidInputError) as e:
        call(c)
    assert e.value.field == field, e.value
    assert "UploadItems" not in servicer.calls


def test_a_bad_item_mid_upload_raises_its_error_and_the_rest_is_not_sent(real_server: ProcServer, pool_id: str) -> None:
    items, _ = synthetic_items(30, 4, seed=1)
    bad = [
        (dict(items[25], item_id="bad", prompt_features=["a"] * 4), "items[25].prompt_features"),
        (dict(items[25], item_id="bad", split="HELDOUT"), "items[25].heldout_preference"),
    ]
    with Client(real_server.target) as c:
        c.create_pool(pool_id, feature_source="CLIENT", feature_dim=4)
        for item, field in bad:
            with pytest.raises(errors.InvalidInputError) as e:
                c.upload_items(pool_id, [*items[:25], item, *items[26:]], chunk_size=10)
            assert e.value.field == field
        assert c.get_pool(pool_id).item_count <= 20  # whole chunks before the bad one at most
        c.delete_pool(pool_id)


def test_a_bad_item_in_the_middle_of_an_upload_raises_its_error_not_a_cancelled_call() -> None:
    stream = UploadStream("p", [{"item_id": "a"}, {"prompt": "x"}], chunk_size=1, progress=None)
    cancelled = []
    stream.cancel = lambda: cancelled.append(True)
    msgs = list(stream)
    assert len(msgs) == 2 and cancelled == [True]  # the header and the first chunk, then cancel
    with pytest.raises(errors.InvalidInputError) as e:
        stream.outcome(None)
    assert e.value.field == "items[1].item_id"


def test_files_and_rows_fail_with_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidInputError, match="cannot read"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ok": 1}\n{not json\n')
    with pytest.raises(errors.InvalidInputError, match=r"bad\.jsonl:2"):
        list(read_jsonl(bad))
    notgz = tmp_path / "x.jsonl.gz"
    notgz.write_text("plain")
    with pytest.raises(errors.InvalidInputError):
        list(read_jsonl(notgz))
    gz = tmp_path / "ok.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"a": 1}\n\n[1]\n')
    with pytest.raises(errors.InvalidInputError, match="expected a JSON object"):
        list(read_jsonl(gz))
    with pytest.raises(errors.InvalidInputError) as e:
        hide_preferences([{"prompt": "p", "chosen": "a"}], 0)
    assert e.value.field == "rows[0].rejected"
    with pytest.raises(errors.InvalidInputError):
        parse_rows("10-20")
    assert parse_rows("5:") == (5, 1 << 62)
    heldout = item_message({"item_id": 7, "split": "heldout", "heldout_preference": "b"})
    assert (heldout.item_id, heldout.split, heldout.heldout_preference) == ("7", pb.SPLIT_HELDOUT, pb.PREFERENCE_B)


def test_label_studio_errors_are_balpm_errors() -> None:
    from balpm.integrations.label_studio import LabelStudioAPI, LabelStudioError

    assert issubclass(LabelStudioError, BalpmError)
    assert LabelStudioError("GET", "u", 404, "").code is grpc.StatusCode.NOT_FOUND
    assert LabelStudioError("GET", "u", 0, "refused").code is grpc.StatusCode.UNAVAILABLE
    assert LabelStudioError("GET", "u", 422, "").reason == "LABEL_STUDIO_HTTP_422"
    with pytest.raises(errors.InvalidInputError):
        LabelStudioAPI("http://127.0.0.1:1", "")
    with pytest.raises(LabelStudioError) as e:
        LabelStudioAPI("http://127.0.0.1:1", "tok", timeout_s=1).whoami()
    assert e.value.status == 0 and e.value.code is grpc.StatusCode.UNAVAILABLE
