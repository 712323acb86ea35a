"""Every input id present and unique, checked without the driver holding the ids (issue 22 item 1).

One algorithm, two places to run it. *Map*: read a group of files' id columns (as text),
find the first null (in file order) or a file whose ids cannot be decoded, and tag each
id with a hash bucket. *Reduce*: per bucket, count the ids seen more than once. An input
of at most ``IDS_CHECKED_IN_DRIVER`` rows (the footers say how many, for free) is checked
in the driver before Ray starts, as one map and one reduce: a mistake in a small job costs
seconds and the driver at most that many ids. A larger input is checked by Ray tasks as
soon as Ray is up, before the job deletes (``--overwrite``) or writes anything: the
driver holds only object refs and the messages, so its memory is flat in the rows, and
the work spreads over the cluster. Either way a duplicate or null id is refused with the
same one line (a ConfigError: exit 2), before any row is processed.
"""

from __future__ import annotations

from hired_batch.config import ColumnSpec, ConfigError, JobConfig, S3Options

# Inputs with at most this many rows are checked in the driver, before Ray starts (~100 B
# of driver memory per id as Arrow strings and their counts); more rows: Ray tasks
IDS_CHECKED_IN_DRIVER = 200_000
ID_TASKS_PER_CPU = 2  # map tasks per cluster CPU: enough to spread, few enough that each is worth a task
ID_BUCKETS_MAX = 64  # reduce tasks at most: a bucket of 100 M ids / 64 is ~1.5 M ids, a small task


def duplicate_ids_error(repeats: int, examples: list, where: str, c: ColumnSpec) -> ConfigError:
    """The one line for ids seen more than once (``repeats``: each repeat counted)."""
    return ConfigError(
        f"{repeats} duplicate id(s) in {where}, e.g. {examples[:3]}; ids (column "
        f"{c.id_column!r}) must be unique: {unique_id_advice(c)}"
    )


def null_ids_error(first_row: int, nulls: int, where: str, c: ColumnSpec) -> ConfigError:
    """The one line for ``nulls`` null ids in ``where``, the first at ``first_row``."""
    more = f" (and {nulls - 1} other row(s))" if nulls > 1 else ""
    return ConfigError(
        f"id column {c.id_column!r} is null in {where} row {first_row}{more}, counting rows "
        f"from 0; every row needs an id: {unique_id_advice(c)}"
    )


def unique_id_advice(c: ColumnSpec) -> str:
    """What to do about bad ids: dropping --id-column only helps where the user gave it."""
    if c.id_column_given:
        return (
            f"give --id-column a column of unique values, or drop it (ids are then the input's "
            f"{ColumnSpec.id_column!r} column, or generated FILE#ROW when it has none)"
        )
    return f"fix column {c.id_column!r}, or name a column of unique values with --id-column"


def file_ids(f: str, id_column: str, opts: S3Options):
    """The id column of input file ``f`` as an Arrow string array; ConfigError naming the
    file when its pages cannot be decoded (the ids are needed before anything runs).
    An s3:// file is read in ranged GETs (``s3_ids``) where it can be."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.job import sources

    ids = s3_ids(f, id_column, opts) if f.startswith("s3://") else None
    if ids is not None:
        return ids
    fs, p = sources.pyarrow_fs(f, opts)
    try:
        return pq.read_table(p, columns=[id_column], filesystem=fs).column(0).cast(pa.string()).combine_chunks()
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(
            f"id column {id_column!r} of input file {f} cannot be read: {sources.first_line(e)}; fix or remove the file"
        ) from None


def s3_ids(f: str, id_column: str, opts: S3Options):
    """``file_ids`` of an s3:// file in one suffix-range GET for its footer and one ranged GET
    per row group for the id column's pages (pyarrow over s3fs makes four to five requests
    a file, and on S3 each is a round trip); None on any failure: the long way reads the
    file again and names what is wrong."""
    from hired_batch.job import sources

    try:
        fs, p, tail = sources.s3_tail(f, opts)
        return ids_from_ranges(tail, lambda a, b: fs.cat_file(p, start=a, end=b), id_column)
    except Exception:  # noqa: BLE001 - the long way raises the one-line ConfigError
        return None


def ids_from_ranges(tail: bytes, fetch, id_column: str):
    """The id column (Arrow strings) of a Parquet file given its last bytes (``tail``) and
    ``fetch(start, end)``, which returns the file's bytes in [start, end): the footer comes
    from the tail, then one fetch per row group reads the id column's pages and nothing
    else. None when the tail does not hold the footer or the file has no such column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.job import sources

    meta = sources.metadata_from_tail(tail)
    ranges = None if meta is None else id_chunk_ranges(meta, id_column)
    if ranges is None:
        return None
    chunks = {a: fetch(a, b) for a, b in ranges}
    size = chunk_end(meta) + len(tail)  # an upper bound of the file's size: the reader only clamps to it
    source = pa.PythonFile(_Ranges(chunks, size), mode="r")
    table = pq.ParquetFile(source, metadata=meta, pre_buffer=False).read(columns=[id_column])
    return table.column(0).cast(pa.string()).combine_chunks()


def id_chunk_ranges(meta, id_column: str):
    """[(start, end)] of the id column's pages in each row group (dictionary page included),
    or None when no top-level column has that name."""
    out = []
    for r in range(meta.num_row_groups):
        rg = meta.row_group(r)
        col = next((rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == id_column), None)
        if col is None:
            return None
        out.append(chunk_range(col))
    return out


def chunk_range(col) -> tuple[int, int]:
    """(start, end) in the file of one column chunk's pages, its dictionary page included."""
    start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else None
    start = start or col.data_page_offset
    return start, start + col.total_compressed_size


def chunk_end(meta) -> int:
    """Where the last column chunk of the file ends (its footer follows)."""
    return max(
        [0]
        + [
            chunk_range(meta.row_group(r).column(j))[1]
            for r in range(meta.num_row_groups)
            for j in range(meta.row_group(r).num_columns)
        ]
    )


class _Ranges:
    """A read-only file of which only some byte ranges are known (``chunks``: start -> bytes):
    what pyarrow reads of the id column; a read anywhere else raises (the long way then)."""

    def __init__(self, chunks: dict, size: int):
        self.chunks, self.size, self.pos, self.closed = chunks, size, 0, False

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (offset, self.pos + offset, self.size + offset)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        for start, data in self.chunks.items():
            if start <= self.pos < start + len(data):
                end = len(data) if n is None or n < 0 else self.pos - start + n
                out = data[self.pos - start : end]
                if n is not None and n >= 0 and len(out) < n:
                    break  # a read past the fetched range
                self.pos += len(out)
                return out
        raise OSError(f"bytes at {self.pos} were not fetched")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def ids_by_bucket(files: list[str], c: ColumnSpec, opts: S3Options, buckets: int):
    """Map: (the first problem in ``files``' order as a message, or None; a table of
    ``id`` and its ``bucket`` (0..buckets-1), or None after a problem). Files are read in
    the driver's bounded pool (``sources.in_pool``), so the first problem is the one a
    serial read would meet."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from hired_batch.job import sources

    def read(f):
        try:
            ids = file_ids(f, c.id_column, opts)
        except ConfigError as e:
            return None, str(e)
        if ids.null_count:
            rows = pc.indices_nonzero(ids.is_null())
            return None, str(null_ids_error(rows[0].as_py(), len(rows), f, c))
        return ids, None

    read_files = sources.in_pool(read, files)
    problem = next((p for _, p in read_files if p is not None), None)
    if problem is not None:
        return problem, None
    ids = pa.concat_arrays([i for i, _ in read_files]) if read_files else pa.array([], pa.string())
    hashes = pd.util.hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)
    return None, pa.table({"id": ids, "bucket": pa.array((hashes % buckets).astype("uint16"))})


def duplicates_in(bucket: int, *tables) -> tuple[int, list]:
    """Reduce: (ids of ``bucket`` seen more than once, counting each repeat; up to three of
    them) over every map's table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.chunked_array(
        [t.filter(pc.equal(t["bucket"], bucket))["id"] for t in tables if t is not None], pa.string()
    )
    counts = pc.value_counts(ids).flatten() if len(ids) else None
    if counts is None:
        return 0, []
    values, n = counts
    twice = pc.greater(n, 1)
    repeats = pc.sum(pc.subtract(pc.filter(n, twice), 1)).as_py() or 0
    return repeats, pc.filter(values, twice)[:3].to_pylist()


def _refuse(problem: str | None, repeats: int, examples: list, n_files: int, c: ColumnSpec) -> None:
    if problem is not None:
        raise ConfigError(problem)
    if repeats:
        raise duplicate_ids_error(repeats, examples, f"{n_files} input file(s)", c)


def has_ids(schemas: dict, c: ColumnSpec) -> bool:
    """True when the files hold the id column (preflight made sure: all of them or none);
    generated ``FILE#ROW`` ids are unique by construction."""
    return all(c.id_column in s.names for s in schemas.values())


def check_ids_in_driver(files: list[str], job: JobConfig) -> None:
    """Refuse null and duplicate ids of a small input (``IDS_CHECKED_IN_DRIVER``) here."""
    problem, table = ids_by_bucket(files, job.columns, job.s3, buckets=1)
    repeats, examples = duplicates_in(0, table) if table is not None else (0, [])
    _refuse(problem, repeats, examples, len(files), job.columns)


def checked_on_ray(rows: int) -> bool:
    """True when an input of ``rows`` rows has its ids checked by Ray tasks, not the driver."""
    return rows > IDS_CHECKED_IN_DRIVER


def check_ids_on_ray(files: list[str], job: JobConfig) -> None:
    """Refuse null and duplicate ids of a large input with Ray tasks (Ray is up): the
    driver gets messages, counts and object refs, never the ids."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_maps = max(1, min(len(files), ID_TASKS_PER_CPU * cpus))
    buckets = max(1, min(ID_BUCKETS_MAX, ID_TASKS_PER_CPU * cpus))
    step = -(-len(files) // n_maps)
    read = ray.remote(num_returns=2)(ids_by_bucket)
    maps = [read.remote(files[i : i + step], job.columns, job.s3, buckets) for i in range(0, len(files), step)]
    problem = next((p for p in ray.get([m[0] for m in maps]) if p is not None), None)
    if problem is not None:
        _refuse(problem, 0, [], len(files), job.columns)
    reduce = ray.remote(duplicates_in)
    found = ray.get([reduce.remote(b, *[m[1] for m in maps]) for b in range(buckets)])
    examples = [e for _, ex in found for e in ex][:3]
    _refuse(None, sum(r for r, _ in found), examples, len(files), job.columns)


# The files of large inputs this process's preflight listed and read the footers of
# (``remember_large_input``): the Ray pass then needs neither the listing nor the footers
# again (at 2,000 shards on the moto S3 server, 44 s). Keyed by what chose the files.
_LARGE_INPUTS: dict = {}


def _input_key(job: JobConfig) -> tuple:
    return tuple(job.inputs), job.columns.id_column, job.s3


def remember_large_input(job: JobConfig, files: list[str]) -> None:
    """Preflight found ``job``'s input large, with ids: its files, for ``check_large_input_ids``."""
    _LARGE_INPUTS.clear()  # one job at a time: the last one's files
    _LARGE_INPUTS[_input_key(job)] = list(files)


def check_large_input_ids(job: JobConfig) -> None:
    """The Ray half of the id check: for Parquet input with an id column and more than
    ``IDS_CHECKED_IN_DRIVER`` rows (smaller ones were checked by preflight). The files
    preflight listed (``remember_large_input``), else listed and their footers read here."""
    from hired_batch.job import sources
    from hired_batch.job.image_folder import image_folder

    if sources.is_hf_job(job) or image_folder(job):
        return
    remembered = _LARGE_INPUTS.pop(_input_key(job), None)
    if remembered is not None:
        return check_ids_on_ray(remembered, job)
    files = sources.list_parquet_files(list(job.inputs), job.s3)
    footers = sources.parquet_footers(files, job.s3)
    if has_ids({f: s for f, (s, _) in footers.items()}, job.columns) and checked_on_ray(
        sum(n for _, n in footers.values())
    ):
        check_ids_on_ray(files, job)
