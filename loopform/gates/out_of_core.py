"""Validation, drift and OOD gates over Parquet larger than memory, with the in-memory gates' exact statistics.

A window of traffic or training data can outgrow a pod (50M rows x 20 columns of float64 is 8 GB in
memory, several times that in pandas). Here DuckDB reads the Parquet files and does the one thing that
needs all values at once, sorting a column, out of core (its `memory_limit`, spilling to
`temp_directory`); everything else is a streaming pass or an aggregate. The numbers and decisions are
the in-memory gates' (`loopform.gates.drift`, `loopform.gates.validation`): the same method selection,
thresholds, calibrated decision and failure lines, shared code, not a copy.

Per numeric column, one query sorts the finite values of reference and current together, tagged by side,
and streams them in chunks. One pass over that stream gives, exactly:

- both empirical CDFs at every distinct value (ties grouped, cumulative counts carried across chunks):
  the Kolmogorov-Smirnov statistic max |F_ref - F_cur| (its p-value as scipy's ks_2samp takes it from the
  statistic and the sizes; small samples are handed to ks_2samp itself) and the first Wasserstein distance
  as the integral of |F_ref - F_cur| between consecutive distinct values (the CDF form; the in-memory gate
  integrates the quantile functions: the same number up to float rounding, ~1e-15 relative);
- the distinct values and counts of each side when few (Evidently's discrete methods, chi-square, z and
  Jensen-Shannon, take them as the in-memory gate does);
- the reference's sorted values as the bootstrap null needs them: their content hash, which seeds the
  null exactly as in memory, and a scratch file of them in the temp directory, read once more to look up
  the values and partial integrals of the CDF at the bootstrap's drawn positions. The null is a sample, so
  it needs the values themselves: this gives the very same draws (same seed, same positions), not another
  sample.

The reference std is DuckDB's stddev_pop (numpy's np.std up to rounding). Categorical columns and labels
are GROUP BY counts, in the order of first appearance (Parquet file order, then row order), which is what
pandas' value_counts(sort=False) gives and what seeds their null. Validation is one aggregate query
(missing, out-of-range and fractional values, labels, distinct ids) over the Parquet schema's types. The
OOD envelope's quantiles are numpy's linear interpolation of order statistics DuckDB finds with top-N
queries from the nearer end; the OOD rate is one aggregate query.

The drift report is the in-memory gate's page (`loopform.gates.report`) with every statistic and decision,
without the per-feature distribution pictures (those read the sorted columns in memory).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loopform.gates.drift import _DISCRETE_VALUES as DISCRETE_VALUES
from loopform.gates.drift import (
    FEW_VALUES,
    CalibratedDrift,
    CalibratedFeature,
    ColumnProfile,
    DriftInputError,
    DriftStats,
    FeatureDrift,
    Kind,
    cached_null,
    calibrated_decision,
    calibrated_statistic,
    counts_score,
    decision_rule,
    drift_input_failure,
    drift_result,
    feature_decision,
    label_check,
    label_shift,
    null_draws,
    null_jensenshannon,
    null_rows,
    null_wasserstein_runs,
    null_wasserstein_windows,
    reference_digest,
    select_method,
)
from loopform.gates.ood import DEFAULT_MARGIN, DEFAULT_QUANTILE, Envelope, ood_decision
from loopform.gates.result import GateResult
from loopform.gates.validation import TableFacts, required_columns, validation_result
from loopform.spec import GatesSpec

if TYPE_CHECKING:
    import duckdb

    from loopform.contract import Contract, Feature

MEMORY_LIMIT = "1GB"
"""DuckDB's buffer limit by default: with Python, numpy chunks and Arrow the process stays under 2 GiB."""
CHUNK_ROWS = 1 << 20  # rows per streamed chunk of a sorted column (16 MiB of values and sides)
KS_EXACT_ROWS = 10_000  # scipy's ks_2samp computes the exact p-value up to this many rows a side (MAX_AUTO_N)
_INTEGERS = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
_FLOATS = {"FLOAT", "DOUBLE"}
_STRINGS = {"VARCHAR"}
_PANDAS_NAMES = {  # DuckDB's type of a Parquet column -> the dtype pandas reads it as (for failure lines)
    "TINYINT": "int8",
    "SMALLINT": "int16",
    "INTEGER": "int32",
    "BIGINT": "int64",
    "UTINYINT": "uint8",
    "USMALLINT": "uint16",
    "UINTEGER": "uint32",
    "UBIGINT": "uint64",
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "BOOLEAN": "bool",
    "VARCHAR": "object",
    "TIMESTAMP": "datetime64[ns]",
    "TIMESTAMP_NS": "datetime64[ns]",
    "TIMESTAMP WITH TIME ZONE": "datetime64[ns, UTC]",
    "TIMESTAMPTZ_NS": "datetime64[ns, UTC]",
}

ParquetSource = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class Table:
    """A data set DuckDB reads lazily: a SELECT, and how to order its rows as pandas would hold them."""

    sql: str
    order: str | None = None
    """Expression of the rows' order (first appearance decides the order of a categorical column's values)."""
    hidden: tuple[str, ...] = ()
    """Columns the SELECT adds for `order`, not part of the data."""

    @classmethod
    def parquet(cls, source: ParquetSource) -> Table:
        """Parquet files, globs or folders (every *.parquet below), read in sorted path order."""
        files = parquet_files(source)
        listed = ", ".join(_literal(f) for f in files)
        sql = f"SELECT * FROM read_parquet([{listed}], filename=true, file_row_number=true)"
        return cls(sql, "struct_pack(f := filename, r := file_row_number)", ("filename", "file_row_number"))

    @property
    def relation(self) -> str:
        return f"({self.sql})"

    def where(self, condition: str) -> Table:
        """The rows where `condition` (SQL) holds."""
        return Table(f"SELECT * FROM {self.relation} WHERE {condition}", self.order, self.hidden)


def parquet_files(source: ParquetSource) -> list[str]:
    """The Parquet files of paths, globs and folders, sorted; FileNotFoundError when there are none."""
    items = [source] if isinstance(source, str | Path) else list(source)
    files: set[str] = set()
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.update(str(p) for p in path.rglob("*.parquet"))
        else:
            files.update(glob.glob(str(item), recursive=True))
    if not files:
        raise FileNotFoundError(f"no Parquet files at {', '.join(map(str, items))}")
    return sorted(files)


def parquet_bytes(source: ParquetSource) -> int:
    """Size on disk of a Parquet source (what decides whether a window is read into memory)."""
    return sum(os.path.getsize(f) for f in parquet_files(source))


@contextmanager
def connect(
    memory_limit: str = MEMORY_LIMIT, temp_directory: str | Path | None = None, threads: int | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection limited to `memory_limit`, spilling to a fresh folder under `temp_directory` (the
    system's temp folder by default), removed after; `threads` defaults to the CPUs this process may use."""
    import duckdb

    scratch = Path(tempfile.mkdtemp(prefix="loopform-ooc-", dir=temp_directory))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    config: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": memory_limit,
        "temp_directory": str(scratch / "duckdb"),
        "threads": int(threads or cpus or 1),
        "preserve_insertion_order": False,
    }
    con = duckdb.connect(config=config)
    try:
        yield con
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


def scratch_folder(con: duckdb.DuckDBPyConnection) -> Path:
    """The connection's scratch folder (parent of DuckDB's temp directory), removed with it: working files go there."""
    found = con.execute("SELECT current_setting('temp_directory')").fetchall()[0]
    assert found is not None
    return Path(found[0]).parent


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    if isinstance(value, str | Path):
        return "'" + str(value).replace("'", "''") + "'"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _table(source: ParquetSource | Table) -> Table:
    return source if isinstance(source, Table) else Table.parquet(source)


def column_types(con: duckdb.DuckDBPyConnection, table: Table) -> dict[str, str]:
    """Column name -> DuckDB type, in the data's column order."""
    described = con.execute(f"DESCRIBE SELECT * FROM {table.relation}").fetchall()
    return {str(row[0]): str(row[1]) for row in described if row[0] not in table.hidden}


def _numeric(duck_type: str) -> bool:
    return duck_type in _INTEGERS or duck_type in _FLOATS or duck_type.startswith("DECIMAL")


def _present(column: str, duck_type: str) -> str:
    """SQL: the value is not missing (null, or NaN in a float column: pandas' isna)."""
    q = _identifier(column)
    return f"({q} IS NOT NULL AND NOT isnan({q}))" if duck_type in _FLOATS else f"({q} IS NOT NULL)"


def _timezone_aware(duck_type: str) -> bool:
    return duck_type.startswith("TIMESTAMPTZ") or duck_type.endswith("WITH TIME ZONE")


def _dtype_name(duck_type: str) -> str:
    return _PANDAS_NAMES.get(duck_type, duck_type)


# --- validation ------------------------------------------------------------------------------------------


def table_facts(
    con: duckdb.DuckDBPyConnection, table: Table, contract: Contract, *, require_label: bool = False
) -> TableFacts:
    """The validation gate's measurements of a table DuckDB reads: types from its schema, counts in one scan."""
    types = column_types(con, table)
    entity, timestamp, event_id, label = contract.entity, contract.timestamp, contract.id, contract.label
    rel = table.relation
    type_errors: dict[str, str] = {}
    if entity in types and types[entity] not in _INTEGERS:
        type_errors[entity] = f"has dtype {_dtype_name(types[entity])}, expected int64 ids"
    if timestamp in types and not _timezone_aware(types[timestamp]):
        type_errors[timestamp] = f"has dtype {_dtype_name(types[timestamp])}, expected timezone-aware datetimes (UTC)"
    for feature in contract.features:
        if feature.name in types:
            problem = _dtype_problem(con, table, feature, types[feature.name])
            if problem:
                type_errors[feature.name] = problem
    label_fits = False
    if label in types:
        problem = _label_problem(con, table, contract, types[label])
        if problem:
            type_errors[label] = problem
        label_fits = problem is None

    checked = [c for c in (event_id, *required_columns(contract, require_label)) if c in types]
    checked = list(dict.fromkeys(checked))
    parts = ["count(*)"]
    parts += [f"count(*) FILTER (WHERE NOT {_present(c, types[c])})" for c in checked]
    ranged = [f for f in contract.features if f.name in types and f.name not in type_errors]
    parts += [_out_of_range(f, types[f.name]) for f in ranged]
    if label_fits:
        present = _present(label, types[label])
        parts += [f"count(*) FILTER (WHERE {present})", f"avg({_identifier(label)}) FILTER (WHERE {present})"]
    if event_id in types:
        q = _identifier(event_id)
        parts += [f"count(DISTINCT {q})", f"count(*) FILTER (WHERE {q} IS NULL)"]
    row = con.execute(f"SELECT {', '.join(parts)} FROM {rel}").fetchall()[0]
    assert row is not None
    values = iter(row)
    rows = int(next(values))
    facts = TableFacts(rows, list(types), type_errors, {}, {})
    facts.missing_count.update({c: int(next(values)) for c in checked})
    facts.out_of_range_count.update({f.name: int(next(values)) for f in ranged})
    if label_fits:
        labelled, mean = int(next(values)), next(values)
        if labelled:
            facts.label_summary["label_rate" if contract.classification else "label_mean"] = float(mean)
    if event_id in types:
        distinct, nulls = int(next(values)), int(next(values))
        facts.duplicate_ids = rows - distinct - (1 if nulls else 0)  # pandas' duplicated(): one null is first
    return facts


def _out_of_range(feature: Feature, duck_type: str) -> str:
    """SQL: present values outside the feature's range or categories (NaN is missing, +-inf is outside)."""
    q = _identifier(feature.name)
    present = _present(feature.name, duck_type)
    if feature.kind == "categorical":
        listed = ", ".join(_literal(c) for c in feature.categories or ())
        return (
            f"count(*) FILTER (WHERE {present} AND {q} NOT IN ({listed}))"
            if listed
            else f"count(*) FILTER (WHERE {present})"
        )
    low = -math.inf if feature.min is None else feature.min
    high = math.inf if feature.max is None else feature.max
    inside = f"CAST({q} AS DOUBLE) >= {_float(low)} AND CAST({q} AS DOUBLE) <= {_float(high)}"
    return f"count(*) FILTER (WHERE {present} AND NOT ({inside}))"


def _float(value: float) -> str:
    return f"'{value}'::DOUBLE" if not math.isfinite(value) else repr(float(value))


def _dtype_problem(con: duckdb.DuckDBPyConnection, table: Table, feature: Feature, duck_type: str) -> str | None:
    """Why this column's storage type does not fit the feature, or None (`validation._dtype_problem`'s rules)."""
    q = _identifier(feature.name)
    if feature.kind == "categorical":
        if duck_type in _STRINGS or duck_type.startswith("ENUM"):
            return None
        return f"has dtype {_dtype_name(duck_type)}, expected strings"
    if duck_type == "BOOLEAN" or not _numeric(duck_type):
        example = con.execute(f"SELECT {q} FROM {table.relation} WHERE {q} IS NOT NULL LIMIT 1").fetchall()
        shown = f" (e.g. {example[0][0]!r})" if example else ""
        return f"has dtype {_dtype_name(duck_type)}, expected {feature.dtype}{shown}"
    if feature.dtype == "int64" and duck_type in _FLOATS:
        found = con.execute(
            f"SELECT count(*) FROM {table.relation} WHERE isfinite({q}) AND {q} <> floor({q})"
        ).fetchall()[0]
        if found is not None and found[0]:
            return f"has fractional values, expected integers ({feature.dtype})"
    return None


def _label_problem(con: duckdb.DuckDBPyConnection, table: Table, contract: Contract, duck_type: str) -> str | None:
    """Why the label column does not fit the contract's task, or None (`validation._label_problem`'s rules)."""
    low, high = contract.label_range or (0, 1)
    if duck_type == "BOOLEAN" or not _numeric(duck_type):
        expected = "0/1 integers" if contract.classification else f"numbers in its range [{low:g}, {high:g}]"
        return f"has dtype {_dtype_name(duck_type)}, expected {expected}"
    q, present = _identifier(contract.label), _present(contract.label, duck_type)
    if contract.classification:
        others = con.execute(
            f"SELECT DISTINCT {q} FROM {table.relation} WHERE {present} AND {q} NOT IN (0, 1) ORDER BY 1 LIMIT 5"
        ).fetchall()
        return f"holds values other than 0/1: {[r[0] for r in others]}" if others else None
    outside = f"{present} AND NOT (CAST({q} AS DOUBLE) >= {_float(low)} AND CAST({q} AS DOUBLE) <= {_float(high)})"
    found = con.execute(f"SELECT count(*) FROM {table.relation} WHERE {outside}").fetchall()[0]
    count = int(found[0]) if found is not None else 0
    if not count:
        return None
    examples = con.execute(f"SELECT DISTINCT {q} FROM {table.relation} WHERE {outside} LIMIT 6").fetchall()
    shown = ", ".join(f"{r[0]}" for r in examples[:5]) + (", ..." if len(examples) > 5 else "")
    return f"has {count} values outside its range [{low:g}, {high:g}] (e.g. {shown})"


def validate_data(
    data: ParquetSource | Table,
    gates: GatesSpec,
    contract: Contract,
    *,
    require_label: bool = False,
    memory_limit: str = MEMORY_LIMIT,
    temp_directory: str | Path | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> GateResult:
    """`loopform.gates.validation.validate_data` over Parquet (or a DuckDB `Table`): same checks, numbers and
    failure lines (dtypes are named as pandas reads the Parquet types)."""
    table = _table(data)
    if con is None:
        with connect(memory_limit, temp_directory) as own:
            return validate_data(table, gates, contract, require_label=require_label, con=own)
    facts = table_facts(con, table, contract, require_label=require_label)
    return validation_result(facts, gates, contract, require_label)


# --- drift -----------------------------------------------------------------------------------------------


@dataclass
class _Merged:
    """One numeric column of both sides, from one pass over their values sorted together."""

    n_reference: int
    n_current: int
    ks: float = 0.0  # max |F_ref - F_cur| over the distinct values
    wasserstein: float = 0.0  # integral of |F_ref - F_cur|: W1, not normed
    digest: bytes = b""
    values_file: Path | None = None  # the reference's sorted finite values, float64 (only when needed)
    runs: list[list[Any]] = field(default_factory=lambda: [[], [], [], []])  # ref values, counts, cur values, counts
    distinct: list[int] = field(default_factory=lambda: [0, 0])  # distinct values a side (exact up to its runs' limit)


class _MergedPass:
    """`_merge`'s state over the sorted stream: cumulative counts, and the group of equal values still open."""

    def __init__(self, merged: _Merged) -> None:
        self.out = merged
        self.counts = [0, 0]  # reference and current values seen so far
        self.closed = [0, 0]  # the same, at the end of the last closed group
        self.open: float | None = None  # value of the last group, which may continue into the next chunk
        self.last: tuple[float, float] | None = None  # (value, |F_ref - F_cur|) of the last closed group

    def chunk(self, values: np.ndarray, current: np.ndarray) -> None:
        cum_cur = self.counts[1] + np.cumsum(current, dtype=np.int64)
        cum_ref = self.counts[0] + np.arange(1, values.size + 1, dtype=np.int64) - (cum_cur - self.counts[1])
        ends = np.flatnonzero(values[:-1] != values[1:])  # a group closes at these positions
        groups, refs, curs = values[ends], cum_ref[ends], cum_cur[ends]
        if self.open is not None and values[0] != self.open:  # the open group ended with the last chunk
            groups = np.concatenate(([self.open], groups))
            refs = np.concatenate(([self.counts[0]], refs))
            curs = np.concatenate(([self.counts[1]], curs))
        self.open, self.counts = float(values[-1]), [int(cum_ref[-1]), int(cum_cur[-1])]
        self._close(groups, refs, curs)

    def finish(self) -> None:
        if self.open is not None:
            self._close(np.array([self.open]), np.array([self.counts[0]]), np.array([self.counts[1]]))
            self.open = None

    def _close(self, groups: np.ndarray, refs: np.ndarray, curs: np.ndarray) -> None:
        """Groups of equal values that ended, with the cumulative counts at their ends."""
        if groups.size == 0:
            return
        out = self.out
        gaps = np.abs(refs / out.n_reference - curs / out.n_current)  # |F_ref - F_cur| on [value, next value)
        out.ks = max(out.ks, float(gaps.max()))
        if self.last is not None:
            out.wasserstein += self.last[1] * (float(groups[0]) - self.last[0])
        out.wasserstein += float(np.dot(gaps[:-1], np.diff(groups)))
        self.last = (float(groups[-1]), float(gaps[-1]))
        for side, cumulative in ((0, refs), (1, curs)):
            limit = DISCRETE_VALUES if side == 0 else FEW_VALUES
            if out.distinct[side] > limit:  # past the limit only "more than the limit" matters
                continue
            sizes = np.diff(cumulative, prepend=self.closed[side])
            seen = np.flatnonzero(sizes)
            kept = seen[: limit + 1 - len(out.runs[2 * side])]
            out.runs[2 * side] += groups[kept].tolist()
            out.runs[2 * side + 1] += sizes[kept].tolist()
            out.distinct[side] += int(seen.size)
        self.closed = [int(refs[-1]), int(curs[-1])]


def _merge(
    con: duckdb.DuckDBPyConnection,
    reference: Table,
    current: Table,
    column: str,
    n_reference: int,
    n_current: int,
    *,
    keep_values: bool,
) -> _Merged:
    """Sort the column's finite values of both sides together (DuckDB, out of core) and read them once."""
    q = f"CAST({_identifier(column)} AS DOUBLE)"
    sql = (
        f"SELECT v, s FROM (SELECT {q} AS v, false AS s FROM {reference.relation} WHERE isfinite({q}) "
        f"UNION ALL SELECT {q} AS v, true AS s FROM {current.relation} WHERE isfinite({q})) ORDER BY v"
    )
    merged = _Merged(n_reference, n_current)
    state = _MergedPass(merged)
    digest = reference_digest("numeric", n_reference)
    if keep_values:
        handle, name = tempfile.mkstemp(suffix=".f8", dir=scratch_folder(con))
        os.close(handle)
        merged.values_file = Path(name)
    cursor = con.cursor()  # its own result: a failure mid-stream leaves the connection usable
    try:
        with open(merged.values_file, "wb") if merged.values_file else nullcontext() as sink:
            for batch in cursor.sql(sql).to_arrow_reader(CHUNK_ROWS):
                values = batch.column(0).to_numpy()
                current_side = batch.column(1).to_numpy(zero_copy_only=False)
                if values.size == 0:
                    continue
                state.chunk(values, current_side)
                ref_values = np.ascontiguousarray(values[~current_side])
                digest.update(ref_values + 0.0)  # zeros as +0.0, as drift._digest hashes them
                if sink is not None:
                    ref_values.tofile(sink)
    finally:
        cursor.close()
    state.finish()
    merged.digest = digest.digest()
    return merged


def _lookup(path: Path, m: int) -> Any:
    """positions -> (r[i], A(r[i])) of the sorted reference stored at `path`, as the in-memory null computes
    them (`drift._null_wasserstein`): A(r[i]) = (upper * r[i] - prefix[upper]) / m, upper = values <= r[i],
    prefix the running sum in order (bit for bit: the same additions in the same order), in one read."""

    def lookup(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wanted, inverse = np.unique(positions, return_inverse=True)
        values = np.empty(wanted.size)
        upper = np.empty(wanted.size, dtype=np.int64)
        prefix = np.empty(wanted.size)
        pending: list[int] = []  # wanted indices whose group of equal values reaches the chunk's end
        carry, start, next_wanted = 0.0, 0, 0
        with open(path, "rb") as stream:
            while start < m:
                chunk = np.fromfile(stream, dtype=np.float64, count=CHUNK_ROWS)
                size = chunk.size
                sums = np.cumsum(np.concatenate(([carry], chunk)))  # sums[i] = prefix[start + i]
                if pending:
                    end = int(np.searchsorted(chunk, values[pending[0]], side="right"))
                    if end < size or start + size == m:
                        upper[pending], prefix[pending] = start + end, sums[end]
                        pending = []
                stop = int(np.searchsorted(wanted, start + size, side="left"))
                here = np.arange(next_wanted, stop)
                if here.size:
                    values[here] = chunk[wanted[here] - start]
                    ends = np.searchsorted(chunk, values[here], side="right")
                    closed = (ends < size) | (start + size == m)
                    upper[here[closed]] = start + ends[closed]
                    prefix[here[closed]] = sums[ends[closed]]
                    pending += here[~closed].tolist()
                next_wanted, carry, start = stop, float(sums[-1]), start + size
        area = (upper * values - prefix) / m
        return values[inverse].reshape(positions.shape), area[inverse].reshape(positions.shape)

    return lookup


def _counts(con: duckdb.DuckDBPyConnection, table: Table, column: str, duck_type: str) -> tuple[list[Any], list[int]]:
    """Distinct present values of a column and their counts, in order of first appearance."""
    q = _identifier(column)
    present = f"{q} IS NOT NULL" + (f" AND isfinite({q})" if duck_type in _FLOATS else "")
    order = f", min({table.order}) AS o" if table.order else ""
    rows = con.execute(
        f"SELECT k, c FROM (SELECT {q} AS k, count(*) AS c{order} FROM {table.relation} WHERE {present} "
        f"GROUP BY k) ORDER BY {'o' if table.order else 'k'}"
    ).fetchall()
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def _categorical_profile(keys: list[Any], counts: list[int], column: str, kind: Kind, side: str) -> ColumnProfile:
    n = int(sum(counts))
    if n == 0:
        raise DriftInputError(f"column {column!r} in {side} data has no values (all missing)")
    key_array = np.empty(len(keys), dtype=object)
    key_array[:] = keys
    return ColumnProfile(column, kind, n, None, key_array, np.asarray(counts, dtype=np.int64), len(keys), 0.0)


def _side_profile(column: str, n: int, std: float, runs: tuple[list[Any], list[int]], distinct: int) -> ColumnProfile:
    """A numeric column's profile without its values: what method selection and the discrete tests read."""
    keys = counts = None
    if distinct <= FEW_VALUES:
        keys, counts = np.asarray(runs[0], dtype=np.float64), np.asarray(runs[1], dtype=np.int64)
    return ColumnProfile(column, "numeric", n, None, keys, counts, distinct, std)


@dataclass
class _Sides:
    """Row counts and per-column sizes of both sides, from one aggregate query a side."""

    rows: tuple[int, int]
    finite: dict[str, tuple[int, int]]
    std: dict[str, float]


def _sizes(con: duckdb.DuckDBPyConnection, tables: tuple[Table, Table], numeric: Sequence[str]) -> _Sides:
    rows: list[int] = []
    finite: dict[str, list[int]] = {c: [] for c in numeric}
    std: dict[str, float] = {}
    for side, table in enumerate(tables):
        parts = ["count(*)"]
        for column in numeric:
            q = f"CAST({_identifier(column)} AS DOUBLE)"
            parts += [f"count(*) FILTER (WHERE isfinite({q}))"]
            parts += [f"stddev_pop({q}) FILTER (WHERE isfinite({q}))"] if side == 0 else []
        row = con.execute(f"SELECT {', '.join(parts)} FROM {table.relation}").fetchall()[0]
        assert row is not None
        values = iter(row)
        rows.append(int(next(values)))
        for column in numeric:
            finite[column].append(int(next(values)))
            if side == 0:
                found = next(values)
                std[column] = float(found) if found is not None else 0.0
    return _Sides((rows[0], rows[1]), {c: (v[0], v[1]) for c, v in finite.items()}, std)


def _ks_p_value(
    con: duckdb.DuckDBPyConnection, tables: tuple[Table, Table], column: str, d: float, n: int, m: int
) -> float:
    """scipy's ks_2samp p-value: up to KS_EXACT_ROWS a side its exact method on the values themselves (few),
    above it Smirnov's asymptotic formula of the statistic, as ks_2samp computes it."""
    from scipy.stats import distributions, ks_2samp

    if max(n, m) <= KS_EXACT_ROWS:
        q = f"CAST({_identifier(column)} AS DOUBLE)"
        sides = [
            con.execute(f"SELECT {q} AS v FROM {t.relation} WHERE isfinite({q})").fetchnumpy()["v"] for t in tables
        ]
        return float(ks_2samp(np.sort(sides[0]), np.sort(sides[1]))[1])
    big, small = sorted([float(n), float(m)], reverse=True)
    return float(np.clip(distributions.kstwo.sf(d, np.round(big * small / (big + small))), 0, 1))


@dataclass
class _Column:
    """A column's drift and its calibrated decision."""

    drift: FeatureDrift
    calibrated: CalibratedFeature | None


def _tail_positions(n: int, quantile: float) -> list[int]:
    positions = []
    for q in (quantile, 1 - quantile):
        virtual = (n - 1) * q
        first = n - 1 if virtual >= n - 1 else math.floor(virtual)
        positions += [first, min(first + 1, n - 1)]
    return positions


def _tails(picked: dict[int, float], n: int, quantile: float) -> tuple[float, float]:
    """np.quantile(values, [quantile, 1 - quantile]) from the order statistics numpy's linear method reads."""
    out = []
    for q in (quantile, 1 - quantile):
        virtual = (n - 1) * q
        first = n - 1 if virtual >= n - 1 else math.floor(virtual)
        a, b = picked[first], picked[min(first + 1, n - 1)]
        gamma, difference = virtual - first, b - a
        out.append(float(b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma))
    return out[0], out[1]


def _numeric_column(
    con: duckdb.DuckDBPyConnection,
    tables: tuple[Table, Table],
    column: str,
    sides: _Sides,
    gates: GatesSpec,
    *,
    level: float | None,
    draws: int | None,
) -> _Column:
    """Evidently's method and score and, at `level`, the calibrated decision of one numeric column."""
    n, m = sides.finite[column]
    for count, side in ((n, "reference"), (m, "current")):
        if count == 0:
            raise DriftInputError(f"column {column!r} in {side} data has no values (all missing or infinite)")
    merged = _merge(con, *tables, column, n, m, keep_values=level is not None)
    try:
        std = sides.std[column]
        ref = _side_profile(column, n, std, (merged.runs[0], merged.runs[1]), merged.distinct[0])
        cur = _side_profile(column, m, 0.0, (merged.runs[2], merged.runs[3]), merged.distinct[1])
        method = select_method(ref, cur)
        norm = max(std, 0.001)
        if method == "ks":
            score = _ks_p_value(con, tables, column, merged.ks, n, m)
        elif method == "wasserstein":
            score = merged.wasserstein / norm
        else:
            score = counts_score(method, ref, cur)
        drift = feature_decision(column, "numeric", method, score, gates, n, m)
        if level is None:
            return _Column(drift, None)
        statistic = calibrated_statistic(ref, cur)
        distance = merged.wasserstein / norm if statistic == "wasserstein" else counts_score(statistic, ref, cur)
        draws = draws or null_draws(level)
        rows = null_rows(m)

        def simulate(rng: np.random.Generator) -> np.ndarray:
            if statistic == "jensenshannon":
                assert ref.counts is not None
                return null_jensenshannon(ref.counts, rows, draws, rng)
            if merged.distinct[0] <= DISCRETE_VALUES:
                values, counts = np.asarray(merged.runs[0]), np.asarray(merged.runs[1], dtype=np.int64)
                return null_wasserstein_runs(values, counts, norm, rows, draws, rng)
            assert merged.values_file is not None
            return null_wasserstein_windows(_lookup(merged.values_file, n), n, norm, rows, draws, rng)

        scores = cached_null(merged.digest, statistic, rows, draws, simulate)
        return _Column(drift, calibrated_decision(column, statistic, distance, scores, n, m, gates, level))
    finally:
        if merged.values_file is not None:
            merged.values_file.unlink(missing_ok=True)


def _categorical_column(
    con: duckdb.DuckDBPyConnection,
    tables: tuple[Table, Table],
    column: str,
    kind: Kind,
    types: tuple[dict[str, str], dict[str, str]],
    gates: GatesSpec,
    *,
    level: float | None,
    draws: int | None,
) -> _Column:
    ref = _categorical_profile(*_counts(con, tables[0], column, types[0][column]), column, kind, "reference")
    cur = _categorical_profile(*_counts(con, tables[1], column, types[1][column]), column, kind, "current")
    method = select_method(ref, cur)
    drift = feature_decision(column, kind, method, counts_score(method, ref, cur), gates, ref.n, cur.n)
    if level is None:
        return _Column(drift, None)
    from loopform.gates.drift import calibrate_feature

    return _Column(drift, calibrate_feature(ref, cur, gates, level=level, draws=draws, evidently=drift))


def _kind(con: duckdb.DuckDBPyConnection, table: Table, column: str, duck_type: str) -> Kind:
    """`drift.column_kind` from the Parquet type: floats are numeric, integers with few values categorical."""
    if duck_type in _FLOATS or duck_type.startswith("DECIMAL"):
        return "numeric"
    if duck_type in _INTEGERS:
        found = con.execute(f"SELECT count(DISTINCT {_identifier(column)}) FROM {table.relation}").fetchall()[0]
        return "categorical" if found is not None and found[0] <= 10 else "numeric"
    return "categorical"


def compute_drift(
    reference: ParquetSource | Table,
    current: ParquetSource | Table,
    columns: Sequence[str],
    gates: GatesSpec | None = None,
    *,
    kinds: dict[str, Kind] | None = None,
    calibrate: bool = False,
    memory_limit: str = MEMORY_LIMIT,
    temp_directory: str | Path | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> DriftStats:
    """`loopform.gates.drift.compute_drift` over Parquet: the same methods, scores, thresholds and decisions
    (and calibrated decisions), without the column profiles (the values never sit in memory)."""
    if con is None:
        with connect(memory_limit, temp_directory) as own:
            return compute_drift(reference, current, columns, gates, kinds=kinds, calibrate=calibrate, con=own)
    return _drift(con, _table(reference), _table(current), list(columns), gates or GatesSpec(), kinds, calibrate)


def _drift(
    con: duckdb.DuckDBPyConnection,
    reference: Table,
    current: Table,
    columns: list[str],
    gates: GatesSpec,
    kinds: dict[str, Kind] | None,
    calibrate: bool,
) -> DriftStats:
    """`compute_drift` on an open connection."""
    types = (column_types(con, reference), column_types(con, current))
    for side, found in zip(("reference", "current"), types, strict=True):
        missing = [c for c in columns if c not in found]
        if missing:
            raise DriftInputError(f"{side} data lacks column(s) {', '.join(map(repr, missing))}")
    kinds = {c: (kinds or {}).get(c) or _kind(con, reference, c, types[0][c]) for c in columns}
    for column in columns:
        for side, found in zip(("reference", "current"), types, strict=True):
            if kinds[column] == "numeric" and (found[column] == "BOOLEAN" or not _numeric(found[column])):
                raise DriftInputError(
                    f"column {column!r} in {side} data should be numeric but has dtype {_dtype_name(found[column])}"
                )
    needed, level = decision_rule(gates, len(columns))
    draws = null_draws(level)
    numeric = [c for c in columns if kinds[c] == "numeric"]
    sides = _sizes(con, (reference, current), numeric)
    results: dict[str, _Column] = {}
    for column in columns:
        if kinds[column] == "numeric":
            results[column] = _numeric_column(
                con,
                (reference, current),
                column,
                sides,
                gates,
                level=level if calibrate else None,
                draws=draws,
            )
        else:
            results[column] = _categorical_column(
                con,
                (reference, current),
                column,
                kinds[column],
                types,
                gates,
                level=level if calibrate else None,
                draws=draws,
            )
    calibrated = None
    if calibrate:
        calibrated = CalibratedDrift(
            {c: r.calibrated for c, r in results.items() if r.calibrated is not None},
            false_alarm_rate=gates.drift.false_alarm_rate,
            max_drift_share=gates.drift.max_drift_share,
            features_needed=needed,
            feature_level=level,
        )
    return DriftStats({c: r.drift for c, r in results.items()}, *sides.rows, calibrated, profiles={})


def _label_check(
    con: duckdb.DuckDBPyConnection, reference: Table, current: Table, gates: GatesSpec, contract: Contract
) -> tuple[dict[str, Any] | None, list[str]]:
    """The drift gate's label check (`drift.label_shift_failure`) when both sides carry the label."""
    label = contract.label
    types = (column_types(con, reference), column_types(con, current))
    if label not in types[0] or label not in types[1]:
        return None, []
    found = con.execute(f"SELECT count(*) FROM {current.relation} WHERE {_present(label, types[1][label])}").fetchall()[
        0
    ]
    if found is None or not found[0]:
        return None, []
    try:
        if contract.task == "classification":
            ref, cur = (
                _categorical_profile(*_counts(con, t, label, types[i][label]), label, "categorical", side)
                for i, (t, side) in enumerate(((reference, "reference"), (current, "current")))
            )
            return _with_failure(label_check(label_shift(ref, cur, gates, label), label))
        if any(not _numeric(t[label]) or t[label] == "BOOLEAN" for t in types):
            raise DriftInputError(f"column {label!r} should be numeric")
        sides = _sizes(con, (reference, current), [label])
        column = _numeric_column(
            con, (reference, current), label, sides, gates, level=gates.drift.label_shift_p_value, draws=None
        )
        assert column.calibrated is not None
        return _with_failure(label_check(column.calibrated, label))
    except DriftInputError as error:
        return None, [f"cannot compare label {label!r}: {error}"]


def _with_failure(checked: tuple[dict[str, Any], str | None]) -> tuple[dict[str, Any], list[str]]:
    return checked[0], [checked[1]] if checked[1] else []


def drift_gate(
    reference: ParquetSource | Table,
    current: ParquetSource | Table,
    gates: GatesSpec,
    contract: Contract,
    report_path: Path | None = None,
    *,
    columns: Sequence[str] | None = None,
    labels: bool = True,
    memory_limit: str = MEMORY_LIMIT,
    temp_directory: str | Path | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> GateResult:
    """`loopform.gates.drift.drift_gate` over Parquet: the same calibrated decision, metrics, label check and
    failure lines; the report holds every statistic and decision (no distribution pictures)."""
    if con is None:
        with connect(memory_limit, temp_directory) as own:
            return drift_gate(reference, current, gates, contract, report_path, columns=columns, labels=labels, con=own)
    ref, cur = _table(reference), _table(current)
    try:
        stats = _drift(con, ref, cur, list(columns or contract.feature_names), gates, contract.kinds, True)
    except DriftInputError as error:
        rows = con.execute(f"SELECT count(*) FROM {cur.relation}").fetchall()[0]
        return drift_input_failure(error, gates, int(rows[0]) if rows else 0)
    label, failures = _label_check(con, ref, cur, gates, contract) if labels else (None, [])
    return drift_result(stats, gates, label, failures, report_path)


# --- OOD -------------------------------------------------------------------------------------------------


def fit_envelope(
    con: duckdb.DuckDBPyConnection,
    reference: Table,
    columns: Sequence[str],
    kinds: dict[str, Kind],
    *,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
) -> Envelope:
    """`loopform.gates.ood.fit_envelope` of a table: numpy's linear quantiles from the order statistics they
    interpolate (`_order_statistics`), the categories from GROUP BY."""
    types = column_types(con, reference)
    absent = [c for c in columns if c not in types]
    if absent:
        raise ValueError(f"reference data lacks column(s) {', '.join(map(repr, absent))}")
    bounds: dict[str, tuple[float, float]] = {}
    categories: dict[str, frozenset[Any]] = {}
    for column in columns:
        if kinds.get(column) == "categorical":
            categories[column] = frozenset(_counts(con, reference, column, types[column])[0])
            continue
        if types[column] == "BOOLEAN" or not _numeric(types[column]):
            raise ValueError(
                f"reference column {column!r} should be numeric but has dtype {_dtype_name(types[column])}"
            )
        q = f"CAST({_identifier(column)} AS DOUBLE)"
        n = int(con.execute(f"SELECT count(*) FROM {reference.relation} WHERE isfinite({q})").fetchall()[0][0])
        if n == 0:
            raise ValueError(f"reference column {column!r} has no finite values")
        picked = _order_statistics(con, reference, q, n, _tail_positions(n, quantile))
        low, high = _tails(picked, n, quantile)
        width = high - low
        bounds[column] = (float(low - margin * width), float(high + margin * width))
    return Envelope(bounds, categories, quantile, margin)


def _order_statistics(
    con: duckdb.DuckDBPyConnection, table: Table, value: str, n: int, positions: Sequence[int]
) -> dict[int, float]:
    """Values at these positions of the `n` finite values of `value` sorted: each a top-N query from the nearer
    end (a heap of the tail's size, no full sort)."""
    found: dict[int, float] = {}
    for position in sorted(set(positions)):
        ascending = position < n / 2
        offset = position if ascending else n - 1 - position
        rows = con.execute(
            f"SELECT {value} AS v FROM {table.relation} WHERE isfinite({value}) "
            f"ORDER BY v {'ASC' if ascending else 'DESC'} LIMIT 1 OFFSET {offset}"
        ).fetchall()
        found[position] = float(rows[0][0])
    return found


def ood_gate(
    reference: ParquetSource | Table,
    current: ParquetSource | Table,
    gates: GatesSpec,
    contract: Contract,
    *,
    columns: Sequence[str] | None = None,
    memory_limit: str = MEMORY_LIMIT,
    temp_directory: str | Path | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> GateResult:
    """`loopform.gates.ood.ood_gate` over Parquet: the same envelope, rates, decision and failure line."""
    if con is None:
        with connect(memory_limit, temp_directory) as own:
            return ood_gate(reference, current, gates, contract, columns=columns, con=own)
    ref, cur = _table(reference), _table(current)
    columns = list(columns or contract.feature_names)
    envelope = fit_envelope(con, ref, columns, contract.kinds)
    types = column_types(con, cur)
    rows = int(con.execute(f"SELECT count(*) FROM {cur.relation}").fetchall()[0][0])
    metrics: dict[str, Any] = {"ood_rate": None, "max_ood_rate": gates.max_ood_rate, "rows": rows}
    if rows == 0:
        return GateResult("ood", False, metrics, ["current data is empty"])
    failures = [f"current data lacks column {c!r}" for c in columns if c not in types]
    for column in envelope.bounds:
        if column in types and (types[column] == "BOOLEAN" or not _numeric(types[column])):
            failures.append(f"column {column!r} should be numeric but has dtype {_dtype_name(types[column])}")
    if failures:
        return GateResult("ood", False, metrics, failures)
    outside = {c: _outside(c, envelope, types[c]) for c in columns}
    parts = [f"count(*) FILTER (WHERE {condition})" for condition in outside.values()]
    parts.append(f"count(*) FILTER (WHERE {' OR '.join(outside.values())})")
    counts = con.execute(f"SELECT {', '.join(parts)} FROM {cur.relation}").fetchall()[0]
    per_feature = {c: int(counts[i]) / rows for i, c in enumerate(columns)}
    return ood_decision(int(counts[-1]), rows, per_feature, envelope, gates, metrics)


def _outside(column: str, envelope: Envelope, duck_type: str) -> str:
    """SQL: the value is outside the envelope (missing values never are; +-inf always is)."""
    q = _identifier(column)
    if column in envelope.bounds:
        low, high = envelope.bounds[column]
        v = f"CAST({q} AS DOUBLE)"
        return f"(NOT isnan({v}) AND ({v} < {_float(low)} OR {v} > {_float(high)} OR isinf({v})))"
    listed = ", ".join(_literal(c) for c in sorted(envelope.categories[column], key=str))
    present = _present(column, duck_type)
    return f"({present} AND {q} NOT IN ({listed}))" if listed else present
