"""KnnConvention through the API: proto <-> domain settings, stored JSON, SDK and CLI."""

from __future__ import annotations

import json

import pytest

from balpm import cli
from balpm.client import Client
from balpm.v1 import balpm_pb2 as pb
from balpm_server.acquisition import KnnConvention
from balpm_server.domain import models as m
from balpm_server.errors import InvalidArgument
from balpm_server.storage.sqlite_store import settings_from_json, settings_to_json
from balpm_server.transport import convert


def info(settings: m.PoolSettings) -> m.PoolInfo:
    return m.PoolInfo("p", "t", settings, m.PoolState.READY, "", 0.0)


@pytest.mark.parametrize(
    ("number", "want"),
    [
        (pb.KNN_CONVENTION_UNSPECIFIED, KnnConvention.STANDARD),
        (pb.KNN_CONVENTION_STANDARD, KnnConvention.STANDARD),
        (pb.KNN_CONVENTION_AUTHORS, KnnConvention.AUTHORS),
    ],
)
def test_pool_settings_knn_convention_both_ways(number, want):
    settings = convert.pool_settings_from_pb(pb.PoolSettings(knn_convention=number))
    assert settings.knn_convention is want
    back = convert.pool_to_pb(info(settings)).settings.knn_convention
    assert back == (pb.KNN_CONVENTION_AUTHORS if want is KnnConvention.AUTHORS else pb.KNN_CONVENTION_STANDARD)


def test_unknown_knn_convention_number_is_invalid_argument():
    with pytest.raises(InvalidArgument) as e:
        convert.pool_settings_from_pb(pb.PoolSettings(knn_convention=99))  # proto3 enums are open
    assert (e.value.field, e.value.reason) == ("settings.knn_convention", "UNKNOWN_ENUM")


def test_stored_settings_json_round_trip_and_old_json_loads_as_standard():
    s = m.PoolSettings(knn_convention=KnnConvention.AUTHORS, knn_k=7)
    raw = settings_to_json(s)
    assert json.loads(raw)["knn_convention"] == "AUTHORS"
    loaded = settings_from_json(raw)
    assert loaded == s and loaded.knn_convention is KnnConvention.AUTHORS
    old = json.loads(raw)
    del old["knn_convention"]  # settings stored before the field existed
    assert settings_from_json(json.dumps(old)).knn_convention is KnnConvention.STANDARD
    with pytest.raises(ValueError):
        m.PoolSettings(knn_convention="NOPE")  # type: ignore[arg-type]


def test_sdk_create_pool_accepts_the_convention_by_name(monkeypatch):
    sent: list[pb.CreatePoolRequest] = []
    c = Client("127.0.0.1:1")
    try:
        monkeypatch.setattr(c, "_call", lambda method, req, **kw: sent.append(req) or pb.CreatePoolResponse())
        c.create_pool("p", knn_convention="authors")
        c.create_pool("q", knn_convention=pb.KNN_CONVENTION_STANDARD)
    finally:
        c.close()
    assert [r.settings.knn_convention for r in sent] == [pb.KNN_CONVENTION_AUTHORS, pb.KNN_CONVENTION_STANDARD]


def test_cli_knn_convention_flag():
    parser = cli.build_parser()
    assert parser.parse_args(["pools", "create", "p", "--knn-convention", "authors"]).knn_convention == "AUTHORS"
    assert parser.parse_args(["pools", "create", "p"]).knn_convention is None
    with pytest.raises(SystemExit):
        parser.parse_args(["pools", "create", "p", "--knn-convention", "paper"])
