"""`infermesh features ingest|get` as a user runs them: the CLI in its own process, a real feature service
process, a real redis-server; CSV and Parquet files written here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from demo.processes import ServiceProcess
from demo.redis_server import RedisServer
from feature_service.store import FeatureStore
from feature_service.views import FeatureView
from tests.cli.runner import run_cli
from tests.feature_service.conftest import WRITE_TOKEN
from tests.feature_service.test_feature_service_grpc import start_service


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, views_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = start_service(tmp_path_factory.mktemp("feature_cli"), redis_server.url, views_file)
    yield process
    process.stop()


def cli(service: ServiceProcess, *args: str | Path) -> tuple[int, str, str]:
    done = run_cli(
        "features", *args, INFERMESH_FEATURE_SERVICE_URL=service.address, INFERMESH_FEATURE_WRITE_TOKEN=WRITE_TOKEN
    )
    return done.returncode, done.stdout, done.stderr


async def test_csv_ingest_writes_counts_and_rejects(
    service: ServiceProcess, redis_admin: redis.Redis, store: FeatureStore, tmp_path: Path
) -> None:
    t = now_ms() - 1_000
    path = tmp_path / "users.csv"
    path.write_text(
        "user_id,event_time_ms,a,c\n"
        f"u1,{t},1.5,3\n"
        f"u2,{t},2.5,\n"  # no c: a partial row
        f",{t},1,1\n"  # row 3: no entity id
        f"u4,,1,1\n"  # row 4: no event time
        f"u5,{t},,\n"  # row 5: no values
        f"u6,{t},inf,1\n"  # row 6: infinite
    )
    code, out, err = cli(service, "ingest", "user", path, "--json")
    assert code == 1, err
    summary = json.loads(out)
    assert (summary["rows"], summary["written"], summary["skipped_older"], summary["rejected"]) == (6, 2, 0, 4)
    assert summary["first_rejects"] == [
        "row 3: no user_id",
        "row 4: no event_time_ms (or not after 1970)",
        "row 5: no feature values",
        "row 6: column 'a' is infinite",
    ]
    assert "4 rows rejected" in err
    block = await store.read("user", ["u1", "u2"], ["a", "c"])
    assert block.values.tolist() == [[1.5, 3.0], [2.5, 0.0]]  # u2's c never written: its default

    # Idempotent: the same file again changes nothing; an older event is skipped, a newer one wins.
    path.write_text(f"user_id,event_time_ms,a\nu1,{t},1.5\nu1,{t - 10},9\nu2,{t + 10},7\n")
    code, out, err = cli(service, "ingest", "user", path)
    assert code == 0, err
    assert "written        2" in out and "skipped older  1" in out
    block = await store.read("user", ["u1", "u2"], ["a"])
    assert block.values.tolist() == [[1.5], [7.0]]


async def test_parquet_ingest_with_timestamps(service: ServiceProcess, store: FeatureStore, tmp_path: Path) -> None:
    rows = 2_500
    t = now_ms() - 5_000
    table = pa.table(
        {
            "merchant_id": [f"m{i}" for i in range(rows)],
            "event_time": pa.array([t * 1000] * rows, type=pa.timestamp("us", "UTC")),
            "x": pa.array([float(i) for i in range(rows)], type=pa.float32()),
            "y": pa.array([i % 7 for i in range(rows)], type=pa.int64()),
        }
    )
    path = tmp_path / "merchants.parquet"
    pq.write_table(table, path)
    code, out, err = cli(service, "ingest", "merchant", path, "--batch-rows", "1000", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["written"], summary["rejected"]) == (rows, 0)
    block = await store.read("merchant", ["m0", "m1234"])
    assert block.values.tolist() == [[0.0, 0.0], [1234.0, float(1234 % 7)]]
    assert 5_000 <= int(block.ages_ms[0, 0]) < 65_000  # the file's event time, not the time of the load


@pytest.mark.parametrize(
    ("header", "line", "message"),
    [
        ("user_id,event_time_ms,a,zzz", "u1,1,1,1", "column 'zzz' is not a feature of view 'user'"),
        ("id,event_time_ms,a", "u1,1,1", "no column 'user_id'"),
        ("user_id,a", "u1,1", "event time column"),
        ("user_id,event_time_ms,a", "u1,1,abc", "line 2, column 'a'"),
    ],
)
def test_schema_errors_name_the_column(
    service: ServiceProcess, redis_admin: redis.Redis, tmp_path: Path, header: str, line: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"{header}\n{line}\n")
    code, _out, err = cli(service, "ingest", "user", path)
    assert code == 1
    assert message in err
    assert "Traceback" not in err
    assert redis_admin.dbsize() == 0  # nothing written


async def test_get_prints_vector_event_time_and_age(
    service: ServiceProcess, store: FeatureStore, views: dict[str, FeatureView]
) -> None:
    t = now_ms() - 120_000  # older than the user view's max_age (60 s)
    await store.write("user", [("u9", {"a": 4.0, "b": 5.0}, t)])
    code, out, err = cli(service, "get", "user", "u9", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["found"] and document["stale"]
    assert 120_000 <= document["age_ms"] < 180_000
    assert [(f["name"], f["value"], f["status"]) for f in document["features"]] == [
        ("a", 4.0, "STALE"),
        ("b", 5.0, "STALE"),
        ("c", 0.0, "NOT_FOUND"),
    ]
    code, out, _err = cli(service, "get", "user", "u9")
    assert "age" in out and "STALE" in out and "event time" in out

    code, out, err = cli(service, "get", "user", "nobody")
    assert code == 1 and "no features stored" in out
    code, _out, err = cli(service, "get", "nope", "u1")
    assert code == 1 and "no feature view 'nope'" in err


def test_ingest_without_the_write_token_is_refused_with_a_hint(
    service: ServiceProcess, redis_admin: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "users.csv"
    path.write_text(f"user_id,event_time_ms,a\nu1,{now_ms()},1.5\n")
    for token, hint in [("", "hint: set INFERMESH_FEATURE_WRITE_TOKEN"), ("imw_wrong", "is not accepted")]:
        done = run_cli(
            "features",
            "ingest",
            "user",
            path,
            INFERMESH_FEATURE_SERVICE_URL=service.address,
            INFERMESH_FEATURE_WRITE_TOKEN=token,
        )
        assert done.returncode == 1, done.stderr
        assert "UNAUTHENTICATED" in done.stderr and hint in done.stderr
        assert "imw_wrong" not in done.stderr + service.log_path.read_text()
    assert redis_admin.dbsize() == 0
