"""The payload log: batching off the request path, partitioned layout, no record lost on close, time windows."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from loopform.payloads import PayloadLog, PayloadLogError, list_files, partition_dir, read_payloads

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 1, 10, 15, tzinfo=UTC)


def _record(i: int, when: datetime | None = None) -> dict:
    record = {"request_id": f"r{i}", "amount": float(i), "channel": "web", "prediction": i % 2, "score": i / 1e4}
    if when is not None:
        record["time"] = when
    return record


def test_close_drains_every_record_logged_from_many_threads(tmp_path: Path) -> None:
    log = PayloadLog(str(tmp_path), "fraud", flush_rows=64, flush_seconds=3600, max_queue=50)

    def worker(offset: int) -> None:
        for i in range(offset, offset + 250):
            log.log(_record(i))

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()

    frame = read_payloads(str(tmp_path), "fraud")
    assert len(frame) == 8 * 250 == log.written
    assert frame["request_id"].is_unique
    assert set(frame["request_id"]) == {f"r{k * 1000 + i}" for k in range(8) for i in range(250)}
    assert str(frame["time"].dtype) == "datetime64[us, UTC]"


def test_rows_threshold_batches_files(tmp_path: Path) -> None:
    with PayloadLog(str(tmp_path), "fraud", flush_rows=10, flush_seconds=3600) as log:
        log.log([_record(i, T0) for i in range(25)])
    sizes = sorted(len(pd.read_parquet(path)) for path in log.files)
    assert sizes == [5, 10, 10]


def test_seconds_threshold_writes_without_more_traffic(tmp_path: Path) -> None:
    log = PayloadLog(str(tmp_path), "fraud", flush_rows=1000, flush_seconds=0.2)
    log.log([_record(i) for i in range(5)])
    for _ in range(600):  # the writer flushes on its own; poll instead of sleeping a fixed time
        if log.written == 5:
            break
        time.sleep(0.05)
    assert log.written == 5 and len(log.files) == 1
    assert len(read_payloads(str(tmp_path), "fraud")) == 5
    log.close()


def test_flush_makes_records_readable(tmp_path: Path) -> None:
    log = PayloadLog(str(tmp_path), "fraud", flush_rows=1000, flush_seconds=3600)
    log.log([_record(i) for i in range(7)])
    log.flush()
    assert len(read_payloads(str(tmp_path), "fraud")) == 7
    log.log(_record(7))
    log.close()
    assert len(read_payloads(str(tmp_path), "fraud")) == 8


def test_partitions_by_model_date_hour_and_reads_a_window(tmp_path: Path) -> None:
    times = [T0 + timedelta(minutes=20 * i) for i in range(12)]  # 10:15 .. 13:55 over four hours
    with PayloadLog(f"file://{tmp_path}", "fraud", flush_rows=1000, flush_seconds=3600) as log:
        log.log([_record(i, when) for i, when in enumerate(times)])
    with PayloadLog(str(tmp_path), "other", flush_rows=1000, flush_seconds=3600) as other:
        other.log([_record(i, T0) for i in range(3)])

    folders = sorted({str(Path(path).parent.relative_to(tmp_path)) for path in log.files})
    assert folders == [f"model=fraud/date=2026-03-01/hour={h}" for h in ("10", "11", "12", "13")]
    assert partition_dir("root", "fraud", T0) == "root/model=fraud/date=2026-03-01/hour=10"

    since, until = T0 + timedelta(minutes=45), T0 + timedelta(hours=2, minutes=30)  # 11:00 .. 12:45
    window = read_payloads(str(tmp_path), "fraud", since, until)
    expected = [f"r{i}" for i, when in enumerate(times) if since <= when < until]
    assert list(window["request_id"]) == expected and len(expected) == 5
    # Partitions outside the window are pruned by path: only hours 11 and 12 are opened.
    assert len(list_files(str(tmp_path), "fraud", since, until)) == 2
    assert len(read_payloads(str(tmp_path), "fraud")) == 12
    assert len(read_payloads(str(tmp_path), "other")) == 3
    assert read_payloads(str(tmp_path), "missing").empty


def test_object_store_uri_through_fsspec() -> None:
    uri = f"memory://lake-{time.monotonic_ns()}/payloads"
    with PayloadLog(uri, "fraud", flush_rows=4, flush_seconds=3600) as log:
        log.log([_record(i, T0) for i in range(10)])
    frame = read_payloads(uri, "fraud", since=T0 - timedelta(minutes=1))
    assert sorted(frame["request_id"], key=lambda r: int(r[1:])) == [f"r{i}" for i in range(10)]
    assert all("/model=fraud/date=2026-03-01/hour=10/" in path for path in log.files)


def test_columns_added_later_are_unified(tmp_path: Path) -> None:
    with PayloadLog(str(tmp_path), "fraud", flush_rows=2, flush_seconds=3600) as log:
        log.log([{"amount": 1, "time": T0}, {"amount": 2, "time": T0}])
        log.log([{"amount": 3.5, "card_id": 9, "time": T0}, {"amount": 4.5, "card_id": 10, "time": T0}])
    frame = read_payloads(str(tmp_path), "fraud")
    assert sorted(frame["amount"].tolist()) == [1.0, 2.0, 3.5, 4.5]
    assert frame["card_id"].isna().sum() == 2


def test_rejects_naive_time_and_logging_after_close(tmp_path: Path) -> None:
    log = PayloadLog(str(tmp_path), "fraud")
    with pytest.raises(ValueError, match="timezone-aware"):
        log.log({"amount": 1.0, "time": datetime(2026, 1, 1)})
    log.close()
    log.close()  # idempotent
    with pytest.raises(PayloadLogError, match="closed"):
        log.log({"amount": 1.0})
    with pytest.raises(ValueError, match="timezone-aware"):
        read_payloads(str(tmp_path), "fraud", since=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="partition value"):
        PayloadLog(str(tmp_path), "a/b")


def test_write_failure_is_reported_not_silent(tmp_path: Path) -> None:
    blocker = tmp_path / "lake"
    blocker.write_text("a file where the lake folder should be")
    log = PayloadLog(str(blocker), "fraud", flush_rows=1000, flush_seconds=3600)
    log.log([_record(i) for i in range(3)])
    with pytest.raises(PayloadLogError, match="3 payload records could not be written"):
        log.close()
    assert log.failed == 3 and log.written == 0


def test_explicit_filesystem(tmp_path: Path) -> None:
    with PayloadLog(str(tmp_path / "x"), "fraud", filesystem=pafs.LocalFileSystem()) as log:
        log.log(_record(1, T0))
    assert len(read_payloads(str(tmp_path / "x"), "fraud", filesystem=pafs.LocalFileSystem())) == 1


def test_interpreter_exit_drains_an_unclosed_log(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from loopform.payloads import PayloadLog
        log = PayloadLog({str(tmp_path)!r}, "fraud", flush_rows=100000, flush_seconds=3600)
        for i in range(1234):
            log.log({{"request_id": f"r{{i}}", "score": 0.5}})
        # no close(): the atexit hook must drain the background writer
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)
    frame = read_payloads(str(tmp_path), "fraud")
    assert len(frame) == 1234 and frame["request_id"].is_unique
