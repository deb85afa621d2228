"""The payload log: every served request and its prediction, as partitioned Parquet in the data lake.

The service hands records to `PayloadLog.log`, which only enqueues them; a background thread batches them
into Parquet files at `<uri>/model=<model>/date=YYYY-MM-DD/hour=HH/<uuid>.parquet`, so writing never sits on
the request path. The queue is bounded: if the writer falls behind, `log` blocks (back-pressure) instead of
dropping records, because the drift monitor must see what was served. `close()` drains the queue, so a
graceful shutdown loses nothing. The drift monitor reads a time window back with `read_payloads`.

`uri` is a local path, `file://...`, or any URI pyarrow or fsspec understands (`s3://`, `gs://`, `az://`,
`memory://`). Heavy imports (pyarrow, pandas) happen inside the functions that use them.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

TIME = "time"  # column every record carries: when the request was answered (tz-aware UTC)
_FILE_SUFFIX = ".parquet"


class PayloadLogError(RuntimeError):
    """The payload log could not write records (they are reported, never silently dropped)."""


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path of `uri`: pyarrow's own for local/file/s3/gs, fsspec for the rest."""
    import pyarrow.fs as pafs

    if filesystem is not None:
        return filesystem, uri.split("://", 1)[-1].rstrip("/") if "://" in uri else uri.rstrip("/")
    if "://" not in uri:
        from pathlib import Path

        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception:  # scheme pyarrow lacks (memory://, az:// without Azure support): go through fsspec
        import fsspec

        fsspec_fs, path = fsspec.core.url_to_fs(uri)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    return fs, path.rstrip("/")


def partition_dir(root: str, model: str, when: datetime) -> str:
    """Hive-style partition folder of a record answered at `when` (UTC)."""
    when = when.astimezone(UTC)
    return f"{root}/model={model}/date={when:%Y-%m-%d}/hour={when:%H}"


@dataclass
class _Flush:
    """Queue marker: write everything received before it, then set `done`."""

    done: threading.Event
    stop: bool = False


class PayloadLog:
    """Background writer of partitioned Parquet payload records.

    Records are flat mappings of scalars (request fields, prediction, score, model version, ...). A record
    without a `time` gets the time it was logged. Thread-safe: many request threads may log at once.
    """

    def __init__(
        self,
        uri: str,
        model: str,
        *,
        flush_rows: int = 1000,
        flush_seconds: float = 5.0,
        max_queue: int = 100_000,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        if flush_rows < 1 or flush_seconds <= 0 or max_queue < 1:
            raise ValueError("flush_rows and max_queue must be >= 1 and flush_seconds > 0")
        if not model or "/" in model or "=" in model:
            raise ValueError(f"model name {model!r} cannot be a partition value")
        self.uri = uri
        self.model = model
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._fs, self._root = resolve(uri, filesystem)
        self._queue: queue.Queue[dict[str, Any] | _Flush] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # orders log() against close(): nothing is enqueued after the stop marker
        self._closed = False
        self.written = 0  # rows written so far
        self.files: list[str] = []  # files written so far
        self.failed = 0  # rows that could not be written at close (kept in memory until then)
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name=f"payload-log-{model}", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a daemon thread would be killed at exit: drain it first

    # --- producer side -------------------------------------------------------------------------

    def log(self, records: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Enqueue one record or many; returns at once unless the queue is full (then waits for the writer)."""
        batch = [records] if isinstance(records, Mapping) else list(records)
        now = datetime.now(UTC)
        with self._lock:
            if self._closed:
                raise PayloadLogError(f"payload log {self.uri} (model {self.model}) is closed")
            for record in batch:
                row = dict(record)
                stamp = row.get(TIME)
                if stamp is None:
                    row[TIME] = now
                elif not isinstance(stamp, datetime) or stamp.tzinfo is None:
                    raise ValueError(f"record field {TIME!r} must be a timezone-aware datetime, got {stamp!r}")
                self._queue.put(row)

    def flush(self, timeout: float | None = None) -> None:
        """Write everything logged so far before returning (tests, the local loop before the monitor reads)."""
        marker = _Flush(threading.Event())
        with self._lock:
            if self._closed:
                return
            self._queue.put(marker)
        if not marker.done.wait(timeout):
            raise PayloadLogError(f"payload log flush did not finish in {timeout} s")
        self._raise_error()

    def close(self, timeout: float | None = None) -> None:
        """Drain the queue, write the last files and stop the writer; safe to call more than once."""
        marker = _Flush(threading.Event(), stop=True)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(marker)
        atexit.unregister(self.close)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PayloadLogError(f"payload log writer did not stop in {timeout} s")
        self._raise_error()

    def __enter__(self) -> PayloadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Records (and markers) waiting in the queue."""
        return self._queue.qsize()

    def _raise_error(self) -> None:
        if self._error is not None and self.failed:
            raise PayloadLogError(f"{self.failed} payload records could not be written: {self._error}") from self._error

    # --- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        buffer: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if isinstance(item, dict):
                buffer.append(item)
                if len(buffer) < self.flush_rows:
                    continue
            buffer = self._write(buffer, final=isinstance(item, _Flush) and item.stop)
            deadline = time.monotonic() + self.flush_seconds
            if isinstance(item, _Flush):
                item.done.set()
                if item.stop:
                    return

    def _write(self, buffer: list[dict[str, Any]], *, final: bool) -> list[dict[str, Any]]:
        """Write the buffer; on failure keep it for the next round (or count it as failed at close)."""
        if not buffer:
            return buffer
        attempts = 3 if final else 1
        for attempt in range(attempts):
            try:
                self._write_partitions(buffer)
                self._error = None
                return []
            except Exception as error:  # object store hiccup, full disk: keep the rows, retry later
                self._error = error
                log.warning("payload log write of %d rows failed (attempt %d): %s", len(buffer), attempt + 1, error)
                if final and attempt + 1 < attempts:
                    time.sleep(0.5 * (attempt + 1))
        if final:
            self.failed += len(buffer)
            log.error("payload log lost %d rows at close: %s", len(buffer), self._error)
            return []
        return buffer

    def _write_partitions(self, buffer: list[dict[str, Any]]) -> None:
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        groups: dict[str, list[dict[str, Any]]] = {}
        for row in buffer:
            groups.setdefault(partition_dir(self._root, self.model, row[TIME]), []).append(row)
        local = isinstance(self._fs, pafs.LocalFileSystem)
        for folder, rows in groups.items():
            table = _to_table(rows)
            self._fs.create_dir(folder, recursive=True)
            path = f"{folder}/{uuid.uuid4().hex}{_FILE_SUFFIX}"
            # Local files appear atomically under their final name (readers skip the temporary one);
            # object-store puts are atomic already.
            target = f"{folder}/.{uuid.uuid4().hex}.tmp" if local else path
            pq.write_table(table, target, filesystem=self._fs, compression="zstd")
            if local:
                self._fs.move(target, path)
            self.files.append(path)
            self.written += len(rows)


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows to an Arrow table with `time` as timestamp[us, UTC] (column order: time first)."""
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    index = table.schema.get_field_index(TIME)
    column = table.column(index).cast(pa.timestamp("us", tz="UTC"))
    table = table.remove_column(index)
    return table.add_column(0, TIME, column)


def _partition_hour(path: str) -> datetime | None:
    """The UTC hour a partition path stands for, from its date=/hour= parts."""
    parts = dict(part.split("=", 1) for part in path.split("/") if "=" in part)
    try:
        return datetime.strptime(f"{parts['date']} {parts['hour']}", "%Y-%m-%d %H").replace(tzinfo=UTC)
    except (KeyError, ValueError):
        return None


def list_files(
    uri: str,
    model: str,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> list[str]:
    """Payload files of `model` whose hour partition overlaps [since, until), pruned by path only."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri, filesystem)
    base = f"{root}/model={model}"
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = []
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if info.type != pafs.FileType.File or not name.endswith(_FILE_SUFFIX) or name.startswith((".", "_")):
            continue
        hour = _partition_hour(info.path)
        if hour is None:
            continue
        if since is not None and hour + timedelta(hours=1) <= since:
            continue
        if until is not None and hour >= until:
            continue
        files.append(info.path)
    return sorted(files)


def read_payloads(
    uri: str,
    model: str,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> pd.DataFrame:
    """Payload records of `model` answered in [since, until) (tz-aware), ordered by time.

    Partitions outside the window are never opened; files whose columns differ (a feature added later)
    are unified, missing values as nulls.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"time window bounds must be timezone-aware, got {bound!r}")
    fs, _ = resolve(uri, filesystem)
    files = list_files(uri, model, since, until, filesystem=filesystem)
    if not files:
        return pd.DataFrame({TIME: pd.Series([], dtype="datetime64[us, UTC]")})
    tables = [pq.read_table(path, filesystem=fs, partitioning=None) for path in files]
    table = pa.concat_tables(tables, promote_options="permissive")
    mask = None
    if since is not None:
        mask = pc.greater_equal(table[TIME], pa.scalar(since, pa.timestamp("us", tz="UTC")))
    if until is not None:
        upper = pc.less(table[TIME], pa.scalar(until, pa.timestamp("us", tz="UTC")))
        mask = upper if mask is None else pc.and_(mask, upper)
    if mask is not None:
        table = table.filter(mask)
    frame = table.to_pandas()
    return frame.sort_values(TIME, kind="stable").reset_index(drop=True)
