"""Hypothesis fuzzing of every BalpmService RPC against one running server.

Per RPC, `EXAMPLES` requests (2000, or BALPM_FUZZ_EXAMPLES; the `slow` tier) and, as a separate
pass for the fast tiers, `REDUCED_EXAMPLES` (200), mixing three kinds:

* random bytes sent to the method path (no serializer), including empty messages;
* valid-looking messages generated from the proto descriptor (huge and empty strings,
  NUL bytes, NaN/inf, negative and extreme integers, unknown enum numbers, wrong
  feature lengths), biased towards the ids that exist so calls reach deep code;
* such messages serialised and then mutated (bit flips, truncation, insertions).

UploadItems (a client stream) also gets garbage and truncated streams. The server must
never answer INTERNAL or UNKNOWN, and must be healthy and working afterwards.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balpm import Client
from balpm.errors import NotFoundError
from balpm.v1 import balpm_pb2 as pb
from tests.conftest import BACKENDS, ServerThread, backend_overrides, make_settings, synthetic_items

EXAMPLES = int(os.environ.get("BALPM_FUZZ_EXAMPLES", "2000"))  # the full count (slow tier)
REDUCED_EXAMPLES = min(EXAMPLES, 200)  # the fast tiers' pass over every RPC
SERVICE = pb.DESCRIPTOR.services_by_name["BalpmService"]
DIM = 4
N_ITEMS = 60
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
COUNTS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

# RPCs in test order; DeletePool last (and never on the main pool).
RPCS = [
    "GetPool",
    "ListPools",
    "CreatePool",
    "UploadItems",
    "IngestLabels",
    "AcquireBatch",
    "ReleaseItems",
    "ExcludeItems",
    "UpdateItemScores",
    "Predict",
    "Evaluate",
    "ExportLabels",
    "ExportItems",
    "UpdatePosterior",
    "GetOperation",
    "WatchOperation",
    "CancelOperation",
    "DeletePool",
]


class World:
    """Ids that exist on the fuzzed server."""

    pool = "fz"
    items: ClassVar[list[str]] = [f"it-{i}" for i in range(N_ITEMS)]
    operations: ClassVar[list[str]] = ["train-0000000000000000"]


BIG_TEXT = "x" * 150_000  # over the 100k-character text limit
SPECIAL_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "../../etc/passwd",
    "fz/../fz",
    "%s%n%x",
    "é",
    "😀" * 10,
    "\ud7ff",
    "a" * 64,
    "a" * 129,
    "DROP TABLE pools;--",
    "Bearer x",
]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e20, -1.0]


# Short random text, or a special string; BIG_TEXT is one of 16 specials (about 3% of texts).
ANY_TEXT = st.one_of(st.text(max_size=12), st.sampled_from([*SPECIAL_TEXT, BIG_TEXT]))


def id_of(known: list[str]) -> st.SearchStrategy[str]:
    """Mostly an existing id, else junk."""
    return st.one_of(st.sampled_from(known), st.sampled_from(known), ANY_TEXT)


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(width=64), st.sampled_from(SPECIAL_FLOATS))


def feature_vector() -> st.SearchStrategy[list[float]]:
    ok = st.lists(st.floats(-10, 10, width=32), min_size=DIM, max_size=DIM)
    bad = st.lists(st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf])), max_size=DIM + 2)
    return st.one_of(ok, ok, bad)


def overrides(rpc: str) -> dict[str, st.SearchStrategy[Any]]:
    """Field-name strategies that steer messages towards existing resources."""
    pools = [World.pool, "fz-other", "p-del"] if rpc != "DeletePool" else ["p-del", "fz-other"]
    return {
        "pool_id": id_of(pools),
        "item_id": id_of(World.items),
        "item_ids": st.lists(id_of(World.items), max_size=4),
        "label_id": id_of([f"lbl-{i}" for i in range(5)]),
        "request_id": id_of(["req-1", "req-2"]),
        "annotator_id": id_of(["ann", "alice"]),
        "operation_id": id_of(World.operations),
        "prompt_features": feature_vector(),
        "completion_a_features": feature_vector(),
        "completion_b_features": feature_vector(),
        "batch_size": st.one_of(st.integers(0, 20), st.sampled_from([0, 10_000, 10_001, 2**32 - 1])),
        "page_size": st.one_of(st.integers(0, 20), st.sampled_from([0, 1000, 10_000, 10_001, 2**31 - 1, -1])),
        "epochs": st.one_of(st.integers(0, 3), st.sampled_from([0, 10_001, 2**32 - 1])),
        "feature_dim": st.one_of(st.integers(0, 8), st.sampled_from([0, 65_536, 65_537, 2**32 - 1])),
        "hidden_sizes": st.lists(st.one_of(st.integers(0, 16), st.sampled_from([16_385, 2**32 - 1])), max_size=10),
        "ensemble_size": st.one_of(st.integers(0, 4), st.sampled_from([65, 2**32 - 1])),
        "knn_k": st.one_of(st.integers(0, 20), st.sampled_from([1025, 2**32 - 1])),
        "labels_per_item": st.one_of(st.integers(0, 3), st.sampled_from([1001, 2**32 - 1])),
        "lease_ttl_s": floats(),
        "page_token": st.one_of(st.sampled_from(["", "MQ==", "LTE=", "OTk5OTk5OTk5OTk5OTk5OTk5OTk=", "!!"]), ANY_TEXT),
        "lora_model_path": st.sampled_from(["", "/nonexistent", "../../"]),
    }


INT_RANGES = {
    d.FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def scalar(field: d.FieldDescriptor, rpc: str, depth: int) -> st.SearchStrategy[Any]:
    """A strategy for one (non-repeated) value of `field`."""
    ct = field.cpp_type
    if ct in INT_RANGES:
        lo, hi = INT_RANGES[ct]
        return st.one_of(st.integers(max(lo, -3), min(hi, 30)), st.sampled_from([lo, hi]), st.integers(lo, hi))
    if ct in (d.FieldDescriptor.CPPTYPE_DOUBLE, d.FieldDescriptor.CPPTYPE_FLOAT):
        return floats() if ct == d.FieldDescriptor.CPPTYPE_DOUBLE else st.floats(width=32)
    if ct == d.FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if ct == d.FieldDescriptor.CPPTYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 60), st.sampled_from([2**31 - 1, -(2**31)]))
    if ct == d.FieldDescriptor.CPPTYPE_STRING:
        return st.binary(max_size=16) if field.type == d.FieldDescriptor.TYPE_BYTES else ANY_TEXT
    return message_strategy(field.message_type, rpc, depth + 1)


def _repeated(field: d.FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == d.FieldDescriptor.LABEL_REPEATED


def message_strategy(desc: d.Descriptor, rpc: str, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type `desc` with any subset of fields set (nested up to depth 3)."""
    cls = pb.DESCRIPTOR.pool.FindMessageTypeByName(desc.full_name)
    from google.protobuf import message_factory

    msg_cls = message_factory.GetMessageClass(cls)
    named = overrides(rpc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.message_type is not None and depth >= 3:
            continue
        if f.name in named:
            fields[f.name] = named[f.name]
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            continue
        elif _repeated(f):
            n = 6 if f.message_type is not None else 4
            fields[f.name] = st.lists(scalar(f, rpc, depth), max_size=n)
        else:
            fields[f.name] = scalar(f, rpc, depth)

    def build(values: dict[str, Any]) -> Message:
        msg = msg_cls()
        for name, value in values.items():
            field = desc.fields_by_name[name]
            if field.message_type is not None and not _repeated(field):
                getattr(msg, name).CopyFrom(value)
            elif _repeated(field):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg

    # Ids that lead to existing resources are always set; everything else is optional (random
    # bytes and mutations cover missing ids).
    required = {k: fields.pop(k) for k in list(fields) if k in ("pool_id", "operation_id", "header")}
    return st.fixed_dictionaries(required, optional=fields).map(build)


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply byte-level mutations (0 flip, 1 truncate, 2 insert, 3 delete) at positions."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf and kind != 2:
            continue
        i = pos % (len(buf) + (1 if kind == 2 else 0))
        if kind == 0:
            buf[i] ^= 1 << (value % 8)
        elif kind == 1:
            del buf[i:]
        elif kind == 2:
            buf[i:i] = bytes([value % 256])
        else:
            del buf[i]
    return bytes(buf)


MUTATIONS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)


PER_EXAMPLE = 4  # requests sent per hypothesis example


def request_batch(desc: d.Descriptor, rpc: str) -> st.SearchStrategy[list[bytes]]:
    """`PER_EXAMPLE` request payloads: a structured message, two mutations of it, random bytes."""
    return st.tuples(message_strategy(desc, rpc), MUTATIONS, MUTATIONS, st.binary(max_size=48)).map(
        lambda t: [
            t[0].SerializeToString(),
            mutate(t[0].SerializeToString(), t[1]),
            mutate(t[0].SerializeToString(), t[2]),
            t[3],
        ]
    )


def upload_batch() -> st.SearchStrategy[list[list[bytes]]]:
    """`PER_EXAMPLE` UploadItems client streams: a header + chunks stream (the header sometimes
    missing, repeated or fuzzed), the same with one message mutated, the same truncated, and junk."""
    good_header = st.sampled_from(["fz", "fz-other", "nope"]).map(
        lambda p: pb.UploadItemsRequest(header=pb.UploadHeader(pool_id=p)).SerializeToString()
    )
    any_msg = message_strategy(pb.UploadItemsRequest.DESCRIPTOR, "UploadItems").map(lambda m: m.SerializeToString())
    chunk = message_strategy(pb.ItemChunk.DESCRIPTOR, "UploadItems").map(
        lambda c: pb.UploadItemsRequest(chunk=c).SerializeToString()
    )
    stream = st.tuples(
        st.one_of(good_header, good_header, any_msg), st.lists(st.one_of(chunk, chunk, any_msg), max_size=3)
    )

    def variants(
        t: tuple[tuple[bytes, list[bytes]], int, list[tuple[int, int, int]], list[bytes]],
    ) -> list[list[bytes]]:
        (head, rest), pos, ops, junk = t
        full = [head, *rest]
        mutated = list(full)
        mutated[pos % len(full)] = mutate(mutated[pos % len(full)], ops)
        return [full, mutated, full[: pos % len(full)], junk]

    return st.tuples(stream, st.integers(0, 10), MUTATIONS, st.lists(st.binary(max_size=24), max_size=3)).map(variants)


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def fuzz_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The fuzzed server, once per storage backend."""
    srv = ServerThread(
        make_settings(
            tmp_path_factory.mktemp("fuzz") / "data", extractor="", **backend_overrides(request, request.param)
        )
    )
    try:
        with Client(srv.target) as c:
            items, truth = synthetic_items(N_ITEMS, DIM, seed=0)
            heldout, _ = synthetic_items(6, DIM, seed=1)
            for it in heldout:
                it["item_id"] = "h-" + it["item_id"]
                it["split"] = "HELDOUT"
                it["heldout_preference"] = "A"
            c.create_pool(
                World.pool, feature_source="CLIENT", feature_dim=DIM, ensemble_size=2, hidden_sizes=[8], epochs=3
            )
            c.upload_items(World.pool, items + heldout)
            c.ingest_labels(
                World.pool,
                [{"label_id": f"seed-{i}", "item_id": f"it-{i}", "preference": truth[f"it-{i}"]} for i in range(20)],
            )
            op = c.update_posterior(World.pool, seed=0)
            World.operations = [op.operation_id]
            c.create_pool("fz-other", feature_source="CLIENT", feature_dim=DIM)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as ch:
        yield ch


def _call(fn: Any) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, fn()
    except grpc.RpcError as e:
        return e.code(), None


def _keep_pool_usable(channel: grpc.Channel, rpc: str, response: Any) -> None:
    """Cancel trainings the fuzzer started and release its leases, so later examples still reach deep code."""
    if rpc == "UpdatePosterior":
        op_id = pb.UpdatePosteriorResponse.FromString(response).operation.operation_id
        World.operations.append(op_id)
        req = pb.CancelOperationRequest(operation_id=op_id)
        _call(lambda: channel.unary_unary(f"/{SERVICE.full_name}/CancelOperation")(req.SerializeToString()))
    elif rpc == "AcquireBatch":
        for pool in (World.pool, "fz-other"):
            release = pb.ReleaseItemsRequest(pool_id=pool, item_ids=World.items)
            _call(lambda r=release: channel.unary_unary(f"/{SERVICE.full_name}/ReleaseItems")(r.SerializeToString()))


def _ensure_other_pool(target: str) -> None:
    """Recreate "fz-other" if an earlier pass's DeletePool examples deleted it."""
    with Client(target) as c:
        try:
            c.get_pool("fz-other")
        except NotFoundError:
            c.create_pool("fz-other", feature_source="CLIENT", feature_dim=DIM)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    "examples",
    [pytest.param(REDUCED_EXAMPLES, id="reduced"), pytest.param(EXAMPLES, id="full", marks=pytest.mark.slow)],
)
def test_fuzz_rpc(examples: int, rpc: str, fuzz_server: ServerThread, channel: grpc.Channel) -> None:
    _ensure_other_pool(fuzz_server.target)
    method = SERVICE.methods_by_name[rpc]
    path = f"/{SERVICE.full_name}/{rpc}"
    counts: collections.Counter[str] = collections.Counter()
    if method.client_streaming:
        call = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
        strategy: st.SearchStrategy[Any] = upload_batch()
    elif method.server_streaming:
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        strategy = request_batch(method.input_type, rpc)
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        strategy = request_batch(method.input_type, rpc)

    @settings(
        max_examples=-(-examples // PER_EXAMPLE),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=strategy)
    def run(batch: list[Any]) -> None:
        for raw in batch:
            if method.client_streaming:
                code, response = _call(lambda raw=raw: call(iter(raw), timeout=10))
            elif method.server_streaming:
                code, response = _call(lambda raw=raw: list(call(raw, timeout=3)))
            else:
                code, response = _call(lambda raw=raw: call(raw, timeout=10))
            counts[code.name] += 1
            if code == grpc.StatusCode.OK:
                _keep_pool_usable(channel, rpc, response)
            assert code not in FORBIDDEN, f"{rpc} answered {code.name} to {raw!r:.300}"

    run()
    COUNTS[rpc].update(counts)
    assert sum(counts.values()) >= examples


def test_server_healthy_after_fuzz(fuzz_server: ServerThread, channel: grpc.Channel) -> None:
    for rpc in RPCS:
        print(f"{rpc:18s} {sum(COUNTS[rpc].values()):6d} {dict(COUNTS[rpc].most_common())}")
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="balpm.v1.BalpmService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with Client(fuzz_server.target) as c:
        pool = c.get_pool(World.pool)
        assert pool.item_count >= N_ITEMS
        assert len(c.acquire(World.pool, batch_size=2, strategy="RANDOM", annotator_id="after").items) == 2
        assert c.predict(World.pool, item_ids=["it-1"]).predictions[0].prob_a > 0
