"""`infermesh features get|ingest`: inspect one entity's stored features, load a CSV or Parquet file into a view.

Both call the feature service's internal API (protos/feature_store.proto) directly: ListFeatureViews for the
view's schema, ReadFeatures to inspect, StreamWriteFeatures to ingest. Ingestion is idempotent: a row whose event
time is older than the stored one is skipped, an equal one re-applies, so a failed load can simply be re-run.

File layout: one column named after the view's entity key (e.g. `user_id`), one event time column
(`event_time_ms`, integer Unix epoch milliseconds, or `event_time`, a timestamp), and any of the view's features.
An empty cell (or NaN) means "no value": the row updates the features it has. The schema is checked before
anything is written; a value that is not a number stops the load with its row and column (rows before it stay
written); a row with no entity id, no event time, no feature value or an infinite one is rejected and counted.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from infermesh.proto import feature_store_pb2 as fpb

EVENT_TIME_MS = "event_time_ms"
EVENT_TIME = "event_time"
DEFAULT_BATCH_ROWS = 1_000
MAX_REPORTED_REJECTS = 5
PROGRESS_INTERVAL_S = 0.2


class SchemaError(Exception):
    """The file does not fit the view (exit 1, nothing written)."""


@dataclass
class IngestSummary:
    rows: int = 0
    written: int = 0
    skipped_older: int = 0
    rejected: int = 0
    rejects: list[str] = field(default_factory=list)  # the first few, "row 7: no entity id"
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "written": self.written,
            "skipped_older": self.skipped_older,
            "rejected": self.rejected,
            "rows_per_s": round(self.rows / self.seconds) if self.seconds > 0 else None,
            "first_rejects": self.rejects,
        }


@dataclass(frozen=True)
class Layout:
    """Which column of the file is what."""

    entity: str
    event_time: str
    features: tuple[str, ...]


def check_schema(view: fpb.FeatureView, columns: Sequence[str], numeric: dict[str, bool]) -> Layout:
    """The file's columns against the view; SchemaError naming the column that does not fit."""
    known = {feature.name for feature in view.features}
    if view.entity_key not in columns:
        raise SchemaError(f"no column '{view.entity_key}': view '{view.name}' is keyed by it")
    times = [name for name in (EVENT_TIME_MS, EVENT_TIME) if name in columns]
    if len(times) != 1:
        raise SchemaError(f"give exactly one event time column, '{EVENT_TIME_MS}' (epoch ms) or '{EVENT_TIME}'")
    features = [name for name in columns if name not in (view.entity_key, times[0])]
    for name in features:
        if name not in known:
            raise SchemaError(f"column '{name}' is not a feature of view '{view.name}' (features: {sorted(known)})")
        if not numeric.get(name, True):
            raise SchemaError(f"column '{name}' is not numeric; feature values are numbers")
    if not features:
        raise SchemaError(f"no feature columns; view '{view.name}' has {sorted(known)}")
    return Layout(view.entity_key, times[0], tuple(features))


def _arrow() -> Any:
    try:
        import pyarrow
    except ImportError as error:  # an install without it: say what is missing, not a traceback
        raise SchemaError("pyarrow is needed to read CSV and Parquet files (pip install pyarrow)") from error
    return pyarrow


class TableFile:
    """A CSV or Parquet file read in record batches; `total_rows` when the format knows it up front."""

    def __init__(self, path: Path, batch_rows: int) -> None:
        pa = _arrow()
        self.path = path
        self.batch_rows = batch_rows
        self.parquet = path.suffix.lower() in (".parquet", ".pq")
        self.total_rows: int | None = None
        if self.parquet:
            import pyarrow.parquet as pq

            try:
                self._file = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as error:
                raise SchemaError(f"{path}: not a readable Parquet file: {error}") from None
            schema = self._file.schema_arrow
            self.columns = list(schema.names)
            self.types = {name: schema.field(name).type for name in self.columns}
            self.total_rows = self._file.metadata.num_rows
        elif path.suffix.lower() in (".csv", ".txt"):
            import pyarrow.csv as pcsv

            try:
                with path.open("r", encoding="utf-8") as stream:
                    header = stream.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as error:
                raise SchemaError(f"{path}: cannot read it: {error}") from None
            self.columns = [name.strip().strip('"') for name in header.split(",")] if header else []
            self.types = {}
            self._pcsv = pcsv
        else:
            raise SchemaError(f"{path}: give a .csv or .parquet file")

    def numeric(self) -> dict[str, bool]:
        pa = _arrow()
        return {
            name: pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)
            for name, kind in self.types.items()
        }

    def batches(self, layout: Layout) -> Iterator[Any]:
        pa = _arrow()
        if self.parquet:
            yield from self._file.iter_batches(batch_size=self.batch_rows, columns=list(self.columns))
            return
        types: dict[str, Any] = {name: pa.float64() for name in layout.features}
        types[layout.entity] = pa.string()
        types[layout.event_time] = pa.int64() if layout.event_time == EVENT_TIME_MS else pa.timestamp("ms", "UTC")
        try:
            reader = self._pcsv.open_csv(
                self.path,
                read_options=self._pcsv.ReadOptions(block_size=1 << 20),
                convert_options=self._pcsv.ConvertOptions(
                    column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=True
                ),
            )
        except pa.ArrowInvalid as error:  # the first block is read (and converted) on opening
            raise SchemaError(self._conversion_error(str(error))) from None
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as error:
                raise SchemaError(self._conversion_error(str(error))) from None
            yield batch

    def _conversion_error(self, text: str) -> str:
        """pyarrow's "In CSV column #2: CSV conversion error to double: invalid value 'x'" names no row: find
        the first value of that column that does not convert (an error path: the file is read again)."""
        found = re.search(r"column #(\d+)", text)
        index = int(found[1]) if found else -1
        if not 0 <= index < len(self.columns):
            return f"{self.path}: {text.splitlines()[0]}"
        name = self.columns[index]
        convert: Any = int if name == EVENT_TIME_MS else float
        with self.path.open("r", encoding="utf-8", newline="") as stream:
            for line, record in enumerate(csv.reader(stream), start=1):
                if line == 1 or index >= len(record) or not record[index].strip():
                    continue
                try:
                    convert(record[index])
                except ValueError:
                    if name == EVENT_TIME:
                        break  # a timestamp: pyarrow's own words say it best
                    kind = "an integer (epoch ms)" if convert is int else "a number"
                    return f"{self.path} line {line}, column '{name}': {record[index][:40]!r} is not {kind}"
        return f"{self.path}, column '{name}': {text.splitlines()[0]}"


def _event_times_ms(column: Any, name: str) -> list[int | None]:
    pa = _arrow()
    if name == EVENT_TIME_MS:
        if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
            raise SchemaError(f"column '{EVENT_TIME_MS}' must hold integer epoch milliseconds")
        return list(column.to_pylist())
    if not pa.types.is_timestamp(column.type):
        raise SchemaError(f"column '{EVENT_TIME}' must be a timestamp")
    return list(column.cast(pa.timestamp("ms", column.type.tz)).cast(pa.int64()).to_pylist())


def rows_of(batch: Any, layout: Layout, first_row: int, summary: IngestSummary) -> list[fpb.FeatureRow]:
    """One record batch → the rows to write; rejected rows counted in `summary` (row numbers 1-based, data rows)."""
    entities = batch.column(batch.schema.get_field_index(layout.entity)).to_pylist()
    times = _event_times_ms(batch.column(batch.schema.get_field_index(layout.event_time)), layout.event_time)
    values = [batch.column(batch.schema.get_field_index(name)).to_pylist() for name in layout.features]
    rows: list[fpb.FeatureRow] = []
    for offset, (entity, event_time_ms) in enumerate(zip(entities, times, strict=True)):
        given = {}
        problem = ""
        for name, column in zip(layout.features, values, strict=True):
            value = column[offset]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if math.isinf(value):
                problem = f"column '{name}' is infinite"
                break
            given[name] = value
        entity_id = "" if entity is None else str(entity)
        if not problem:
            if not entity_id:
                problem = f"no {layout.entity}"
            elif not event_time_ms or event_time_ms <= 0:
                problem = f"no {layout.event_time} (or not after 1970)"
            elif not given:
                problem = "no feature values"
        if problem:
            summary.rejected += 1
            if len(summary.rejects) < MAX_REPORTED_REJECTS:
                summary.rejects.append(f"row {first_row + offset}: {problem}")
            continue
        rows.append(fpb.FeatureRow(entity_id=entity_id, values=given, event_time_ms=event_time_ms))
    return rows


class Progress:
    """One self-rewriting line on stderr while a terminal watches; silent otherwise (logs stay clean)."""

    def __init__(self, label: str, total: int | None, stream: IO[str] = sys.stderr) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.enabled = stream.isatty()
        self.started = time.perf_counter()
        self._shown = 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._shown < PROGRESS_INTERVAL_S):
            return
        self._shown = now
        rate = done / max(now - self.started, 1e-9)
        if self.total:
            width = 30
            filled = int(width * min(done / self.total, 1.0))
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,}"
        else:
            bar = f"{done:,} rows"
        self.stream.write(f"\r{self.label} {bar}  {rate:,.0f} rows/s")
        if final:
            self.stream.write("\n")
        self.stream.flush()


def ingest(
    stub: Any, view: fpb.FeatureView, path: Path, batch_rows: int, timeout_s: float, metadata: Sequence[Any] = ()
) -> IngestSummary:
    """Stream the file's rows to the feature service in batches of `batch_rows`, one stream, answers in order."""
    table = TableFile(path, batch_rows)
    layout = check_schema(view, table.columns, table.numeric())
    summary = IngestSummary()
    progress = Progress(f"ingest {view.name}", table.total_rows)
    started = time.perf_counter()

    failures: list[BaseException] = []

    def requests() -> Iterator[fpb.WriteFeaturesRequest]:
        try:
            yield from file_requests()
        except Exception as error:
            # gRPC would end the call as UNKNOWN "Exception iterating requests!": keep the reason to report it.
            # (Not GeneratorExit: that is gRPC closing this generator because the call ended, e.g. refused.)
            failures.append(error)
            raise

    def file_requests() -> Iterator[fpb.WriteFeaturesRequest]:
        first_row = 1
        pending: list[fpb.FeatureRow] = []
        for batch in table.batches(layout):
            pending.extend(rows_of(batch, layout, first_row, summary))
            first_row += batch.num_rows
            summary.rows += batch.num_rows
            while len(pending) >= batch_rows:
                yield fpb.WriteFeaturesRequest(feature_view=view.name, rows=pending[:batch_rows])
                del pending[:batch_rows]
        if pending:
            yield fpb.WriteFeaturesRequest(feature_view=view.name, rows=pending)

    responses = stub.StreamWriteFeatures(requests(), timeout=timeout_s, metadata=list(metadata))
    try:
        for response in responses:
            summary.written += response.written
            summary.skipped_older += response.skipped_older
            progress.update(summary.written + summary.skipped_older + summary.rejected)
    except Exception:
        if failures:
            raise failures[0] from None
        raise
    progress.update(summary.rows, final=True)
    summary.seconds = time.perf_counter() - started
    return summary


def format_summary(view: str, path: Path, summary: IngestSummary) -> str:
    lines = [
        f"ingested {path} into view {view}: {summary.rows:,} rows in {summary.seconds:.1f}s",
        f"  written        {summary.written:,}",
        f"  skipped older  {summary.skipped_older:,}  (a newer event was stored)",
        f"  rejected       {summary.rejected:,}",
    ]
    lines += [f"    {reject}" for reject in summary.rejects]
    if summary.rejected > len(summary.rejects):
        lines.append(f"    ... {summary.rejected - len(summary.rejects):,} more")
    return "\n".join(lines)


def describe_entity(
    view: fpb.FeatureView, entity_id: str, response: fpb.ReadFeaturesResponse, now_ms: int
) -> tuple[dict[str, Any], str]:
    """One entity's vector, its event time and age, as a document and as text."""
    statuses = [fpb.FeatureStatus.Name(status) for status in response.statuses]
    present_ages = [age for age in response.ages_ms if age >= 0]
    age_ms = max(present_ages) if present_ages else None
    event_time = None
    if age_ms is not None:
        event_time = datetime.fromtimestamp((now_ms - age_ms) / 1000, tz=UTC).isoformat(timespec="milliseconds")
    stale = "STALE" in statuses
    document = {
        "view": view.name,
        view.entity_key: entity_id,
        "found": age_ms is not None,
        "event_time": event_time,
        "age_ms": age_ms,
        "max_age_ms": view.max_age_ms,
        "stale": stale,
        "features": [
            {"name": name, "value": value, "status": status}
            for name, value, status in zip(response.feature_names, response.values, statuses, strict=True)
        ],
    }
    if age_ms is None:
        head = f"{view.name} {view.entity_key}={entity_id}: no features stored (the view's defaults are served)"
    else:
        freshness = f"STALE (max_age {view.max_age_ms / 1000:g}s)" if stale else "fresh"
        head = f"{view.name} {view.entity_key}={entity_id}\n  event time  {event_time} (from its age)\n"
        head += f"  age         {age_ms / 1000:.3f}s, {freshness}"
    width = max([len("FEATURE"), *(len(name) for name in response.feature_names)])
    table = [f"{'FEATURE'.ljust(width)}  {'VALUE':>14}  STATUS"]
    for name, value, status in zip(response.feature_names, response.values, statuses, strict=True):
        table.append(f"{name.ljust(width)}  {value:>14.6g}  {status}")
    return document, head + "\n" + "\n".join(table)
