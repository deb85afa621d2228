"""The payload log: batching off the request path, partitioned layout, no record lost on close, time windows,
and faults: a failing sink, a full spill buffer, SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow.fs as pafs
import pytest
from prometheus_client import REGISTRY

from loopform.payloads import CALLER, PayloadLog, PayloadLogError, list_files, partition_dir, read_payloads

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 1, 10, 15, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _spill_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs without a spill_dir (and their subprocesses) spill under the test's folder, not the shared temp dir."""
    monkeypatch.setenv("LOOPFORM_PAYLOAD_SPILL_DIR", str(tmp_path / "default-spill"))


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


def test_the_caller_column_reads_back_beside_rows_written_without_it(tmp_path: Path) -> None:
    """Rows of a service name their authenticated caller; rows written before callers were recorded read as null,
    and a log of only unauthenticated records (caller None) still unifies with the named ones."""
    uri = str(tmp_path / "lake")
    for records in (
        [_record(0, T0)],  # before callers were recorded: no column
        [{**_record(1, T0 + timedelta(minutes=1)), CALLER: None}],  # outside a request: null
        [{**_record(i, T0 + timedelta(minutes=i)), CALLER: name} for i, name in ((2, "alice"), (3, "anonymous"))],
    ):
        with PayloadLog(uri, "fraud") as log:
            log.log(records)
    rows = read_payloads(uri, "fraud")
    assert rows[CALLER].tolist()[:2] == [None, None] and rows[CALLER].tolist()[2:] == ["alice", "anonymous"]


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
    log = PayloadLog(str(blocker), "fraud", flush_rows=1000, flush_seconds=3600, spill_dir=tmp_path / "spill")
    log.log([_record(i) for i in range(3)])
    with pytest.raises(PayloadLogError, match=r"3 payload records could not be written.*stay in"):
        log.close()
    assert log.failed == 3 and log.written == 0 and log.dropped == 0
    # Not lost: the next log on the same spill folder ships them once the lake can be written.
    blocker.unlink()
    PayloadLog(str(blocker), "fraud", spill_dir=tmp_path / "spill").close()
    assert sorted(read_payloads(str(blocker), "fraud")["request_id"]) == ["r0", "r1", "r2"]


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


# --- faults: a failing sink, a full spill buffer, SIGKILL ------------------------------------------------


def _dropped(model: str, reason: str) -> float:
    return REGISTRY.get_sample_value("loopform_payload_rows_dropped_total", {"model": model, "reason": reason}) or 0.0


def _wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Poll `condition` (generous bound: the machine is shared); a test asserts on the result."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class _FlakyStore(pafs.FSSpecHandler):
    """An fsspec object store whose puts fail while `down` is set, as S3 answering 503."""

    def __init__(self, fs: Any) -> None:
        super().__init__(fs)
        self.down = threading.Event()

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        if self.down.is_set():
            raise OSError("503 Service Unavailable (test)")
        return super().open_output_stream(path, metadata)


@dataclass
class Sink:
    """A lake that can be broken and repaired: a local folder blocked by a file, or a flaky object store."""

    uri: str
    filesystem: pafs.FileSystem | None
    break_: Callable[[], None]
    repair: Callable[[], None]
    local: bool

    def read(self, model: str) -> pd.DataFrame:
        return read_payloads(self.uri, model, filesystem=self.filesystem)


@pytest.fixture(params=["local", "object-store"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    if request.param == "local":
        lake = tmp_path / "lake"
        yield Sink(str(lake), None, lambda: lake.write_text("not a folder"), lambda: lake.unlink(), local=True)
        return
    store = _FlakyStore(fsspec.filesystem("memory"))
    yield Sink(
        f"memory://flaky-{time.monotonic_ns()}/payloads",
        pafs.PyFileSystem(store),
        store.down.set,
        store.down.clear,
        local=False,
    )


def test_a_failing_sink_that_recovers_loses_nothing(sink: Sink, tmp_path: Path) -> None:
    spill_root = tmp_path / "spill"
    log = PayloadLog(
        sink.uri,
        "fraud",
        filesystem=sink.filesystem,
        flush_rows=50,
        flush_seconds=3600,
        max_queue=20,
        spill_dir=spill_root,
        retry_seconds=0.05,
        retry_max_seconds=0.2,
    )
    sink.break_()
    # Requests are still answered: 25 queues' worth of rows go through log() while nothing reaches the lake.
    producer = threading.Thread(target=lambda: [log.log(_record(i)) for i in range(500)])
    producer.start()
    producer.join(timeout=60)
    assert not producer.is_alive(), "log() blocked while the sink was down"
    with pytest.raises(PayloadLogError, match="500 payload records could not be written"):
        log.flush()
    assert log.written == 0 and log.spilled == 500 and log.dropped == 0
    spill_files = list(log.spill.iterdir())
    assert len(spill_files) == 10
    assert {stat.S_IMODE(path.stat().st_mode) for path in spill_files} == {0o600}
    assert stat.S_IMODE(log.spill.stat().st_mode) == 0o700

    sink.repair()  # no call from here on: the shipper retries on its own, with backoff
    assert _wait_for(lambda: log.written == 500), f"shipped {log.written} of 500 after the sink recovered"
    log.log([_record(i) for i in range(500, 510)])
    log.close()

    frame = sink.read("fraud")
    assert len(frame) == 510 and frame["request_id"].is_unique
    assert set(frame["request_id"]) == {f"r{i}" for i in range(510)}
    assert log.spilled == 0 and log.failed == 0 and not list(log.spill.iterdir())  # shipped, nothing left
    if sink.local:
        assert {stat.S_IMODE(Path(path).stat().st_mode) for path in log.files} == {0o600}


def test_a_full_spill_buffer_drops_rows_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lake = tmp_path / "lake"
    lake.write_text("not a folder")  # the sink fails throughout
    model = "fullbuffer"
    batches = [[_record(1000 * b + i, T0) for i in range(100)] for b in range(5)]  # same shape, same file size
    probe = PayloadLog(str(lake), "probe", flush_rows=100, flush_seconds=3600, spill_dir=tmp_path / "probe")
    probe.log(batches[0])  # the size of one batch's spill file
    with pytest.raises(PayloadLogError):
        probe.close()
    (size,) = {path.stat().st_size for path in probe.spill.iterdir()}

    before = _dropped(model, "buffer_full")
    log = PayloadLog(
        str(lake),
        model,
        flush_rows=100,
        flush_seconds=3600,
        spill_dir=tmp_path / "spill",
        spill_max_bytes=5 * size // 2,
    )
    with caplog.at_level(logging.ERROR, logger="loopform.payloads"):
        for batch in batches:
            log.log(batch)
            with pytest.raises(PayloadLogError):
                log.flush()
    assert log.spilled == 200 and log.dropped == 300  # room for two batches of five
    assert _dropped(model, "buffer_full") - before == 300
    assert _dropped(model, "spill_error") == _dropped(model, "invalid_rows") == 0  # exported, at zero
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 3 and all(
        f"model {model} dropped 100 rows (buffer_full): spill folder {log.spill} holds" in m for m in drops
    )

    lake.unlink()
    log.close()
    frame = read_payloads(str(lake), model)
    assert set(frame["request_id"]) == {f"r{1000 * b + i}" for b in (0, 1) for i in range(100)}  # oldest kept
    assert log.written == 200 and len(frame) == 200


def test_rows_that_cannot_be_encoded_are_dropped_and_counted(tmp_path: Path) -> None:
    model = "mixedtypes"
    before = _dropped(model, "invalid_rows")
    with PayloadLog(str(tmp_path), model, flush_rows=1000, flush_seconds=3600, spill_dir=tmp_path / "spill") as log:
        log.log([{"amount": 1.0, "time": T0}, {"amount": "one", "time": T0}])  # hour 10: not one Arrow type
        log.log({"amount": 2.0, "time": T0 + timedelta(hours=1)})  # hour 11: fine
    assert _dropped(model, "invalid_rows") - before == 2 and log.dropped == 2
    assert read_payloads(str(tmp_path), model)["amount"].tolist() == [2.0]


_KILLED_WRITER = """
import sys, time
from datetime import UTC, datetime
from loopform.payloads import PayloadLog

lake, spill, flush_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
log = PayloadLog(lake, "fraud", flush_rows=100_000, flush_seconds=flush_seconds, spill_dir=spill, retry_seconds=0.05)
i = 0
while True:
    now = time.time()
    log.log({"request_id": f"r{i}", "score": 0.5, "time": datetime.fromtimestamp(now, UTC)})
    print(i, now, flush=True)  # answered
    i += 1
    time.sleep(0.002)
"""


@pytest.mark.parametrize("sink_down", [False, True], ids=["sink-up", "sink-down"])
def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path: Path, sink_down: bool) -> None:
    flush_seconds = 0.5
    bound = 4 * flush_seconds  # one flush interval, plus generous time for the spill write on a shared machine
    lake, spill = tmp_path / "lake", tmp_path / "spill"
    if sink_down:
        lake.write_text("not a folder")  # rows reach the spill folder only
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(lake), str(spill), str(flush_seconds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "writer.err").open("w"),
        text=True,
    )
    answered: dict[str, float] = {}
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            i, at = line.split()
            answered[f"r{i}"] = float(at)
            if float(at) - answered["r0"] > 3 * bound:  # enough traffic before the window that may be lost
                break
        killed_at = time.time()
        os.kill(writer.pid, signal.SIGKILL)
        for line in writer.stdout:  # answered before the kill but not read yet
            i, at = line.split()
            answered[f"r{i}"] = float(at)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL, (tmp_path / "writer.err").read_text()

    if sink_down:
        assert lake.is_file()  # nothing reached the lake
        lake.unlink()
    PayloadLog(str(lake), "fraud", spill_dir=spill).close()  # the next process ships what the killed one spilled
    frame = read_payloads(str(lake), "fraud")
    assert frame["request_id"].is_unique
    kept = set(frame["request_id"])
    lost = {request_id: at for request_id, at in answered.items() if request_id not in kept}
    old = [request_id for request_id, at in answered.items() if at < killed_at - bound]
    assert len(old) > len(answered) / 2  # most of the traffic is older than the bound: the test can fail
    assert all(at >= killed_at - bound for at in lost.values()), (
        f"{len(lost)} rows lost, the oldest answered {killed_at - min(lost.values()):.2f} s before the kill"
    )
