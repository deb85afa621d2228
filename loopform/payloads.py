"""The payload log: every served request and its prediction, as partitioned Parquet in the data lake.

The service hands records to `PayloadLog.log`, which only enqueues them, so writing never sits on the request
path. Two background threads move them on:

- the collector batches records (every `flush_rows` rows or `flush_seconds`) into Parquet files in a local
  spill folder (files 0600): the write-ahead buffer that survives a failing sink and a killed process;
- the shipper copies each spill file, unchanged, to `<uri>/model=<model>/date=YYYY-MM-DD/hour=HH/<id>.parquet`
  and deletes it; while the sink fails it retries with exponential backoff, and requests are still answered.

The spill folder is bounded (`spill_max_bytes`): a batch that does not fit is dropped, logged and counted in
`loopform_payload_rows_dropped_total{model, reason}`. The in-memory queue is bounded too, but it never drops:
if the collector falls behind, `log` blocks (back-pressure). `close()` drains the queue and ships what it
can, so a graceful shutdown loses nothing; after SIGKILL only the rows of the last flush interval are lost,
and the next log started on the same spill folder ships what the killed one had spilled. A spill file keeps
its id in the lake, so shipping it twice (killed between the put and the delete) overwrites, never
duplicates. docs/payload-log.md states these guarantees. The drift monitor reads a window with `read_payloads`.
A service's records name the authenticated caller that sent them (`CALLER`).

`uri` is a local path, `file://...`, or any URI pyarrow or fsspec understands (`s3://`, `gs://`, `az://`,
`memory://`). Heavy imports (pyarrow, pandas, prometheus_client) happen inside the functions that use them.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import queue
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

TIME = "time"  # column every record carries: when the request was answered (tz-aware UTC)
#: Column of a service's records: the authenticated caller's name (`loopform.serving.auth`), `anonymous` where the
#: service allows unauthenticated traffic, null for records written outside a request (tests, the benchmark).
#: The drift monitor filters and weighs rows by it; the request's own caller-id field is another column.
CALLER = "caller"
_FILE_SUFFIX = ".parquet"

ENV_SPILL_DIR = "LOOPFORM_PAYLOAD_SPILL_DIR"
ENV_SPILL_MAX_BYTES = "LOOPFORM_PAYLOAD_SPILL_MAX_BYTES"
DEFAULT_SPILL_MAX_BYTES = 256 * 2**20  # a long lake outage cannot fill the pod's disk
#: Why rows were dropped: the spill folder was full, could not be written, or the rows could not be encoded.
DROP_REASONS = ("buffer_full", "spill_error", "invalid_rows")
_FILE_MODE = 0o600  # payloads hold card ids and amounts: owner only
_SPILL_NAME = re.compile(r"^(\d{8}T\d{2})-([0-9a-f]{32})-(\d+)\.parquet$")  # <hour>-<id>-<rows>
_STALE_TEMP_SECONDS = 3600  # a temporary spill file this old was left by a killed process
_FINAL_ATTEMPTS = 3  # shipping attempts at close (0.5 s, then 1 s apart)

_DROPPED: Any = None
_DROPPED_LOCK = threading.Lock()


class PayloadLogError(RuntimeError):
    """The payload log could not write records (they are reported, never silently dropped)."""


def _dropped_counter() -> Any:
    """`loopform_payload_rows_dropped_total{model, reason}` in the default registry, created once per process."""
    global _DROPPED
    with _DROPPED_LOCK:
        if _DROPPED is None:
            from prometheus_client import Counter

            _DROPPED = Counter(
                "loopform_payload_rows_dropped",
                "Payload rows never written to the lake, by reason (buffer_full: the local spill was full).",
                ["model", "reason"],
            )
        return _DROPPED


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path of `uri`: pyarrow's own for local/file/s3/gs, fsspec for the rest."""
    import pyarrow.fs as pafs

    if filesystem is not None:
        return filesystem, uri.split("://", 1)[-1].rstrip("/") if "://" in uri else uri.rstrip("/")
    if "://" not in uri:
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


def _spill_folder(base: str | Path, fs: pafs.FileSystem, root: str, model: str) -> Path:
    """The spill folder of one sink and model under `base`: logs of other lakes or models never share it."""
    digest = hashlib.sha256(f"{fs.type_name}:{root}".encode()).hexdigest()[:16]
    return Path(base).expanduser() / f"{model}-{digest}"


@dataclass
class _Flush:
    """Queue marker: write everything received before it, then set `done`."""

    done: threading.Event
    stop: bool = False


class PayloadLog:
    """Background writer of partitioned Parquet payload records, through a bounded local spill folder.

    Records are flat mappings of scalars (request fields, prediction, score, model version, ...). A record
    without a `time` gets the time it was logged. Thread-safe: many request threads may log at once.
    `spill_dir` (default $LOOPFORM_PAYLOAD_SPILL_DIR, else a folder in the temp dir) is a base folder shared
    by every log of the process and by the processes after it; `spill_max_bytes` (default
    $LOOPFORM_PAYLOAD_SPILL_MAX_BYTES, else 256 MiB) bounds what one sink and model keep there. A failing
    sink is retried after `retry_seconds`, doubling up to `retry_max_seconds`.
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
        spill_dir: str | Path | None = None,
        spill_max_bytes: int | None = None,
        retry_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
    ) -> None:
        if flush_rows < 1 or flush_seconds <= 0 or max_queue < 1:
            raise ValueError("flush_rows and max_queue must be >= 1 and flush_seconds > 0")
        if retry_seconds <= 0 or retry_max_seconds < retry_seconds:
            raise ValueError("retry_seconds must be > 0 and retry_max_seconds >= retry_seconds")
        if not model or "/" in model or "=" in model:
            raise ValueError(f"model name {model!r} cannot be a partition value")
        self.uri = uri
        self.model = model
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        self.spill_max_bytes = (
            int(os.environ.get(ENV_SPILL_MAX_BYTES, DEFAULT_SPILL_MAX_BYTES))
            if spill_max_bytes is None
            else spill_max_bytes
        )
        if self.spill_max_bytes < 1:
            raise ValueError(f"the spill folder's bound must be >= 1 byte, got {self.spill_max_bytes}")
        self._fs, self._root = resolve(uri, filesystem)
        _load_writer_modules()
        base = (
            spill_dir
            or os.environ.get(ENV_SPILL_DIR)
            or Path(tempfile.gettempdir()) / f"loopform-payloads-{os.getuid()}"
        )
        self.spill = _spill_folder(base, self._fs, self._root, model)
        try:
            Path(base).expanduser().mkdir(mode=0o700, parents=True, exist_ok=True)
            self.spill.mkdir(mode=0o700, exist_ok=True)
        except OSError as error:
            raise PayloadLogError(
                f"payload spill folder {self.spill} cannot be created (set {ENV_SPILL_DIR}): {error}"
            ) from error
        self._remove_stale_temporaries()
        self._dropped = _dropped_counter()
        for reason in DROP_REASONS:  # export zeros, so alerts on increase() see the first drop
            self._dropped.labels(model=model, reason=reason)
        self._queue: queue.Queue[dict[str, Any] | _Flush] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # orders log() against close(): nothing is enqueued after the stop marker
        self._ship_lock = threading.Lock()  # one shipping pass at a time in this process
        self._wake = threading.Event()  # a spill file is waiting (set at start: ship what a killed process left)
        self._wake.set()
        self._stopping = threading.Event()
        self._closed = False
        self.written = 0  # rows shipped to the lake so far (by this log)
        self.files: list[str] = []  # lake files written so far (by this log)
        self.dropped = 0  # rows dropped so far (spill full or unwritable), also in the Prometheus counter
        self.failed = 0  # rows still in the spill folder at close: not lost, shipped by the next log on it
        self._error: Exception | None = None
        self._collector = threading.Thread(target=self._collect, name=f"payload-log-{model}", daemon=True)
        self._shipper = threading.Thread(target=self._ship_loop, name=f"payload-ship-{model}", daemon=True)
        self._collector.start()
        self._shipper.start()
        atexit.register(self.close)  # daemon threads would be killed at exit: drain them first

    # --- producer side -------------------------------------------------------------------------

    def log(self, records: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Enqueue one record or many; returns at once unless the queue is full (then waits for the collector)."""
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
        """Spill everything logged so far and ship the spill once (tests, the local loop before the monitor reads).

        Raises PayloadLogError when the sink refuses: the rows stay in the spill folder and are retried.
        """
        marker = _Flush(threading.Event())
        with self._lock:
            if self._closed:
                return
            self._queue.put(marker)
        if not marker.done.wait(timeout):
            raise PayloadLogError(f"payload log flush did not finish in {timeout} s")
        if not self._ship():
            raise PayloadLogError(self._undelivered(self.spilled))

    def close(self, timeout: float | None = None) -> None:
        """Drain the queue, spill and ship the last rows and stop both threads; safe to call more than once."""
        marker = _Flush(threading.Event(), stop=True)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(marker)
        atexit.unregister(self.close)
        self._collector.join(timeout)
        if self._collector.is_alive():
            raise PayloadLogError(f"payload log writer did not stop in {timeout} s")
        self._stopping.set()
        self._wake.set()
        self._shipper.join(timeout)
        shipped = False
        for attempt in range(_FINAL_ATTEMPTS):  # an object-store hiccup at shutdown gets a second chance
            shipped = self._ship()
            if shipped:
                break
            if attempt + 1 < _FINAL_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
        # After a clean pass, files still there are being shipped by another process (a sibling worker).
        self.failed = 0 if shipped else self.spilled
        if self.failed:
            log.error("%s", self._undelivered(self.failed))
            raise PayloadLogError(self._undelivered(self.failed)) from self._error

    def __enter__(self) -> PayloadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Records (and markers) waiting in the queue."""
        return self._queue.qsize()

    @property
    def spilled(self) -> int:
        """Rows in the spill folder, waiting to be shipped."""
        return sum(rows for _, _, rows in self._spill_files())

    def _undelivered(self, rows: int) -> str:
        return (
            f"{rows} payload records could not be written to {self.uri}: {self._error}; they stay in "
            f"{self.spill}, shipped by the next payload log started on it"
        )

    def _drop(self, rows: int, reason: str, error: object) -> None:
        self.dropped += rows
        self._dropped.labels(model=self.model, reason=reason).inc(rows)
        log.error("payload log of model %s dropped %d rows (%s): %s", self.model, rows, reason, error)

    # --- collector thread: queue -> spill files ----------------------------------------------

    def _collect(self) -> None:
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
            if buffer:
                self._spill_rows(buffer)
                buffer = []
                self._wake.set()
            deadline = time.monotonic() + self.flush_seconds
            if isinstance(item, _Flush):
                item.done.set()
                if item.stop:
                    return

    def _spill_rows(self, rows: list[dict[str, Any]]) -> None:
        """One spill file per hour partition; what cannot be spilled is dropped and counted, never retried."""
        groups: dict[datetime, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(row[TIME].astimezone(UTC).replace(minute=0, second=0, microsecond=0), []).append(row)
        for hour, group in groups.items():
            try:
                self._write_spill_file(hour, _to_table(group))
            except _SpillFull as full:
                self._drop(len(group), "buffer_full", full)
            except (TypeError, ValueError) as error:  # mixed types in a column (ArrowInvalid): never writable
                self._drop(len(group), "invalid_rows", error)
            except Exception as error:  # local disk full or unwritable
                self._drop(len(group), "spill_error", error)

    def _write_spill_file(self, hour: datetime, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        temporary = self.spill / f".{uuid.uuid4().hex}.tmp"
        self.spill.mkdir(mode=0o700, parents=True, exist_ok=True)  # a temp-dir cleaner may have removed it
        try:
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE), "wb") as out:
                pq.write_table(table, out, compression="zstd")
            size = temporary.stat().st_size
            used = sum(nbytes for _, nbytes, _ in self._spill_files())
            if used + size > self.spill_max_bytes:
                raise _SpillFull(f"spill folder {self.spill} holds {used} bytes, bound {self.spill_max_bytes}")
            os.replace(temporary, self.spill / f"{hour:%Y%m%dT%H}-{uuid.uuid4().hex}-{table.num_rows}.parquet")
        finally:
            temporary.unlink(missing_ok=True)

    def _spill_files(self) -> list[tuple[Path, int, int]]:
        """(path, bytes, rows) of the complete spill files, oldest first."""
        entries = []
        if not self.spill.is_dir():  # removed by a temp-dir cleaner: recreated at the next spill write
            return []
        with os.scandir(self.spill) as scan:
            for entry in scan:
                match = _SPILL_NAME.match(entry.name)
                if match is None:
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # shipped meanwhile by another process
                    continue
                entries.append((stat.st_mtime, Path(entry.path), stat.st_size, int(match[3])))
        return [(path, size, rows) for _, path, size, rows in sorted(entries)]

    def _remove_stale_temporaries(self) -> None:
        """Half-written spill files of killed processes (current ones of live processes are younger)."""
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for path in self.spill.glob(".*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass

    # --- shipper thread: spill files -> lake -------------------------------------------------

    def _ship_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            if failures:  # back off: new spill files do not hurry a retry against a failing sink
                delay = min(self.retry_max_seconds, self.retry_seconds * 2 ** (failures - 1))
                self._stopping.wait(delay * random.uniform(0.5, 1.0))
            else:
                self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            failures = 0 if self._ship() else failures + 1

    def _ship(self) -> bool:
        """Ship every spill file, oldest first; False (and the error kept) when the sink refuses one."""
        with self._ship_lock:
            for path, _, rows in self._spill_files():
                try:
                    self._ship_file(path, rows)
                except Exception as error:  # object store down, lake folder unwritable: keep the file, retry
                    self._error = error
                    log.warning("payload log could not ship %s to %s: %s", path.name, self.uri, error)
                    return False
            self._error = None
            return True

    def _ship_file(self, path: Path, rows: int) -> None:
        """Copy one spill file to its partition under the spill file's id, then delete it.

        Processes sharing the spill folder (a service's workers, the next process) lock each file while they
        ship it; the lock goes away with its process, so a killed shipper's file is shipped by another.
        """
        try:
            handle = path.open("rb")
        except FileNotFoundError:  # shipped by another process
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process is shipping it
                return
            if not path.exists():  # shipped by another process between our open and our lock
                return
            hour, file_id = path.name.split("-")[:2]
            folder = partition_dir(self._root, self.model, datetime.strptime(hour, "%Y%m%dT%H").replace(tzinfo=UTC))
            target = f"{folder}/{file_id}{_FILE_SUFFIX}"
            self._put(folder, target, handle.read())
            path.unlink()
        self.files.append(target)
        self.written += rows

    def _put(self, folder: str, target: str, data: bytes) -> None:
        """Write `data` at `target` atomically: a local file appears 0600 under its final name; puts are atomic."""
        import pyarrow.fs as pafs

        if isinstance(self._fs, pafs.LocalFileSystem):
            os.makedirs(folder, exist_ok=True)
            temporary = f"{folder}/.{target.rsplit('/', 1)[-1]}.tmp"  # readers skip dot files
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
            with os.fdopen(descriptor, "wb") as out:
                os.fchmod(descriptor, _FILE_MODE)  # a temporary left by a killed process may predate the mode
                out.write(data)
            os.replace(temporary, target)
            return
        self._fs.create_dir(folder, recursive=True)
        with self._fs.open_output_stream(target) as out:
            out.write(data)


def _load_writer_modules() -> None:
    """Import now what the collector needs: at interpreter exit (the atexit drain) imports that start threads fail."""
    import pyarrow as pa
    import pyarrow.parquet

    pa.Table.from_pylist([{TIME: 0}])  # loads pandas through pyarrow's shim, when installed


class _SpillFull(Exception):
    """The spill folder has no room for a batch."""


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
