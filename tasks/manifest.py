"""The Parquet manifest: one row per input image and model, typed columns, written atomically."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Location, StorageError, read_bytes, unstrip_protocol, write_bytes

SCHEMA = pa.schema([
    pa.field("input_uri", pa.string(), nullable=False),
    pa.field("output_uri", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok / skipped / error
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("input_bytes", pa.int64()),
    pa.field("input_version", pa.string()),  # the input's etag / generation / mtime when it was listed
    pa.field("output_bytes", pa.int64()),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("duration_ms", pa.float64()),
    pa.field("flow_run_id", pa.string()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("model_weights", pa.string()),  # a hash of the weights that made the output (older manifests: null)
    pa.field("output_quality", pa.int32()),  # JPEG/WebP quality it was encoded at (PNG and older manifests: null)
])
STATUSES = ("ok", "skipped", "error")


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_table(rows: list[dict]) -> pa.Table:
    columns = {field.name: [row.get(field.name) for row in rows] for field in SCHEMA}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_table(location: Location, table: pa.Table) -> None:
    write_bytes(location, table_bytes(table))


def read_table(location: Location) -> pa.Table | None:
    """The table at ``location``, or None when there is none (a missing part means "not done yet")."""
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None
    # Arrow's own buffer, not a Python file object: Arrow's I/O threads would call back into Python to read one,
    # and such a call still under way at interpreter exit aborts the process (apache/arrow#34314).
    try:
        return conform(pq.read_table(pa.BufferReader(data)))
    except (pa.ArrowException, ValueError) as error:  # not Parquet, or not this tool's columns
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StorageError(f"{location.display} is not a manifest this tool can read ({reason}); move it out of the "
                           "way or choose another destination") from None


def conform(table: pa.Table) -> pa.Table:
    """``table`` in this SCHEMA; a column that manifests written by earlier versions lack comes back empty."""
    missing = [field for field in SCHEMA if field.name not in table.column_names]
    for field in missing:
        table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def read_folder(folder: Location) -> list[pa.Table]:
    """Every table in ``folder`` (none when the folder is not there)."""
    fs, path = folder.filesystem()
    try:
        names = sorted(fs.find(path))
    except FileNotFoundError:
        return []
    tables = []
    for name in names:
        if name.endswith(".parquet"):
            table = read_table(Location(unstrip_protocol(fs, name), folder.options))
            if table is not None:
                tables.append(table)
    return tables


def combine(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return SCHEMA.empty_table()
    return pa.concat_tables([conform(t) for t in tables]).sort_by([("input_uri", "ascending"), ("model", "ascending")])


def counts(table: pa.Table) -> dict[str, int]:
    statuses = table.column("status").to_pylist()
    return {status: statuses.count(status) for status in STATUSES}
