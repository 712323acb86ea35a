"""Where rows come from and where answers go: Parquet (local, s3://), HF datasets.

Resolves ``--input`` into a Ray Dataset whose rows carry a stable ``id``, and builds
the filesystem objects for ``s3://`` with an optional endpoint. Credentials come only
from the standard AWS chain; nothing here logs a URL with secrets.

This module does not decode images or run models.
"""

from __future__ import annotations

import os
import posixpath
import re

from hired_batch.config import ConfigError, JobConfig, S3Options
from hired_batch.engine.inputs import redact_url

ROW_ID = "id"  # every row read carries its id (as text) under this name


# Retries of every S3 request the job makes. Everything reaches S3 through s3fs
# (``pyarrow_fs`` wraps it for pyarrow and Ray Data), which retries in two layers:
# 1) botocore, per request: "standard" mode retries throttling (503 SlowDown), 5xx
#    (500 InternalError) and dropped or refused connections with exponential backoff
#    and jitter (at most 20 s per wait), up to ``total_max_attempts`` tries in all (the
#    first included; botocore's ``max_attempts`` would count retries only). Its default
#    is 3 tries (5 in "legacy" mode), too few for a store under load; "adaptive" would
#    add a client-side rate limiter, which per-process clients cannot coordinate.
# 2) s3fs, around each call: 5 tries (its class default) on errors botocore gave up on
#    that look transient (timeouts, truncated bodies, "SlowDown"), backoff 0.1 * 1.7^i s.
# A request is thus tried up to 10 x 5 times before the job sees an error.
S3_BOTOCORE_RETRIES = {"total_max_attempts": 10, "mode": "standard"}


def configure_s3_retries() -> None:
    """Make ``S3_BOTOCORE_RETRIES`` the default of every s3fs filesystem in this process.

    fsspec applies ``fsspec.config.conf["s3"]`` to each ``S3FileSystem`` however it is
    made (``pyarrow_fs``, ``fsspec.open`` of an image URL, ``get_fs_token_paths``), and
    only to S3: passing botocore's ``config_kwargs`` in the storage options instead would
    break the same options used for http(s) image URLs. A filesystem pickled to a Ray
    worker keeps the options it was made with. Settings a user gave through fsspec's own
    configuration (``FSSPEC_S3='{"config_kwargs": ...}'`` or its config file) win.
    """
    import fsspec.config

    s3 = fsspec.config.conf.setdefault("s3", {})
    s3.setdefault("config_kwargs", {}).setdefault("retries", dict(S3_BOTOCORE_RETRIES))


configure_s3_retries()  # every process that reads or writes through this module


def s3_endpoint(opts: S3Options) -> str | None:
    return opts.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def fsspec_options(opts: S3Options) -> dict:
    """storage_options for fsspec/s3fs.

    Directory listings are never cached: the driver lists the output and checkpoint
    prefixes while Ray workers add and delete files there (a resume deletes the files
    of uncommitted writes), and fsspec shares one s3fs instance per process, so a
    cached listing would name files that are gone.
    """
    ep = s3_endpoint(opts)
    fresh = {"use_listings_cache": False}
    return {**fresh, "client_kwargs": {"endpoint_url": ep}} if ep else fresh


def pyarrow_fs(path: str, opts: S3Options):
    """(pyarrow filesystem, path without scheme) for a local or s3:// path.

    S3 goes through s3fs (wrapped for pyarrow): the same client reads images, inputs
    and writes outputs, and S3-compatible stores that reject the native client's
    multipart checksums still work.
    """
    import pyarrow.fs as pafs

    if path.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(**fsspec_options(opts))
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(path)


def output_filesystem(path: str, endpoint: str | None):
    """(filesystem, path) for pyarrow to read a finished job's output (``score``,
    ``visualize --from-output``): s3:// goes through ``pyarrow_fs``, the one S3 client
    (s3fs: ``--s3-endpoint``, else ``AWS_ENDPOINT_URL_S3``, and the job's retry policy),
    so they read wherever ``run`` wrote; other paths come back as they are (filesystem
    None), for pyarrow to resolve. ConfigError for an endpoint with a non-S3 path.
    """
    if endpoint is not None and not path.startswith("s3://"):
        raise ConfigError(f"--s3-endpoint expects an s3:// output, got {path!r}")
    if not path.startswith("s3://"):
        return None, path
    return pyarrow_fs(path, S3Options(endpoint=endpoint))


def check_no_inline_credentials(url: str) -> None:
    """Refuse user:secret@ URLs: credentials belong in the AWS chain, not in logs."""
    from urllib.parse import urlsplit

    if "://" in url and "@" in (urlsplit(url).netloc or ""):
        raise ConfigError(
            f"credentials inside a URL are not accepted ({redact_url(url)}); "
            "use the AWS credential chain (env, ~/.aws, instance role)"
        )


def list_parquet_files(inputs: list[str], opts: S3Options) -> list[str]:
    """Expand files, directories and globs into a sorted list of Parquet files; every
    one of ``inputs`` must match at least one (ConfigError naming those that match none)."""
    import fsspec

    found: list[str] = []
    empty = []  # specs that matched no Parquet file: a typo in one of several drops its data
    for spec in inputs:
        check_no_inline_credentials(spec)
        before = len(found)
        try:
            fs, _, paths = fsspec.get_fs_token_paths(spec, storage_options=fsspec_options(opts))
        except Exception as e:  # noqa: BLE001 - the message may echo the URL; say only the type
            raise ConfigError(f"cannot list input {redact_url(spec)}: {type(e).__name__}") from None
        for p in paths:
            if fs.isdir(p):
                found += [f for f in fs.find(p) if f.endswith(".parquet")]
            elif fs.exists(p):
                found.append(p)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found = [f if proto in ("file", "local") or "://" in f else f"{proto}://{f}" for f in found]
        if len(found) == before:
            empty.append(redact_url(spec))
    if empty:
        of = f" (of {len(inputs)} --input values)" if len(inputs) > 1 else ""
        raise ConfigError(f"no Parquet files found at {empty}{of}; expected files, directories or globs")
    return sorted(set(found))


def parquet_schema_names(path: str, opts: S3Options) -> list[str]:
    """Column names of one Parquet file (for fail-fast column checks)."""
    return list(parquet_schema(path, opts).names)


def parquet_schema(path: str, opts: S3Options):
    """The Arrow schema of one Parquet file, from its footer (``parquet_footer``)."""
    return parquet_footer(path, opts)[0]


def parquet_footer(path: str, opts: S3Options):
    """(Arrow schema, row count) of one Parquet file, from its footer (no data pages read).

    ConfigError naming the file when it cannot be opened or its footer read (0 bytes,
    truncated, not Parquet, no permission): one bad shard must not cost a traceback.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.startswith("s3://"):
        found = _s3_footer(path, opts)
        if found is not None:
            return found
    fs, p = pyarrow_fs(path, opts)
    try:
        with fs.open_input_file(p) as fh:
            f = pq.ParquetFile(fh)
            return f.schema_arrow, f.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(
            f"input file {path} is not a readable Parquet file: {first_line(e)}; fix or remove it"
        ) from None


FOOTER_TAIL_BYTES = 1 << 16  # an S3 footer read: the file's last 64 KiB (as pyarrow reads), holding most footers


def footer_from_tail(tail: bytes):
    """(Arrow schema, row count) from a Parquet file's last bytes, or None when they do not
    hold its whole footer (a large footer, a file that is no Parquet: read it the long way)."""
    f = _file_of_tail(tail)
    return None if f is None else (f.schema_arrow, f.metadata.num_rows)


def metadata_from_tail(tail: bytes):
    """A Parquet file's ``FileMetaData`` from its last bytes, or None (``footer_from_tail``)."""
    f = _file_of_tail(tail)
    return None if f is None else f.metadata


def _file_of_tail(tail: bytes):
    import struct

    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(tail) < 12 or tail[-4:] != b"PAR1":
        return None
    n = struct.unpack("<I", tail[-8:-4])[0]
    if n + 8 > len(tail) - 4 * (len(tail) < FOOTER_TAIL_BYTES):  # a whole small file starts with PAR1 too
        return None
    return pq.ParquetFile(pa.BufferReader(b"PAR1" + tail[-(n + 8) :]))


def s3_tail(path: str, opts: S3Options):
    """(fsspec filesystem, path without scheme, the file's last ``FOOTER_TAIL_BYTES``) of an
    s3:// file, the tail in one suffix-range GET (no HEAD first). Raises what s3fs raises."""
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths(path, storage_options=fsspec_options(opts))
    return fs, p, fs.cat_file(p, start=-FOOTER_TAIL_BYTES)


def _s3_footer(path: str, opts: S3Options):
    """``footer_from_tail`` of one suffix-range GET (``s3_tail``): one request per file instead
    of pyarrow's three (two HEADs and a GET); None on any failure (the long way names it)."""
    try:
        return footer_from_tail(s3_tail(path, opts)[2])
    except Exception:  # noqa: BLE001 - the long way raises the one-line ConfigError
        return None


# Files read at once by the driver's bounded pools (footers before Ray, the ids a small
# input's check reads, the output's ids on resume): on S3 each read is a round trip or
# two, not bandwidth, so this many at once turn 10,000 shards from minutes into seconds
FOOTER_THREADS = 32


def in_pool(fn, items: list) -> list:
    """``[fn(x) for x in items]`` in ``FOOTER_THREADS`` threads, results (and the first
    exception, by position) in the order of ``items``: concurrency changes no refusal."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(items)) or 1) as pool:
        return list(pool.map(fn, items))


def parquet_footers(files: list[str], opts: S3Options) -> dict:
    """{file: (Arrow schema, row count)} of every file, footers read in the bounded pool."""
    return dict(zip(files, in_pool(lambda f: parquet_footer(f, opts), files)))


def parquet_schemas(files: list[str], opts: S3Options) -> dict:
    """{file: Arrow schema} of every file (``parquet_footers``)."""
    return {f: schema for f, (schema, _) in parquet_footers(files, opts).items()}


def type_kind(t) -> str:
    """An Arrow type with its width and offset size dropped: what the job reads alike.

    Ray Data joins blocks from different files by widening (string + large_string,
    int32 + int64), so such shards mix safely. It would also turn string + binary into
    binary (a path read as image bytes) or int + float into float, so those kinds stay
    apart. Signed and unsigned integers stay apart too (uint64 does not fit int64).
    """
    import pyarrow as pa

    groups = (
        (("string", "large_string", "string_view"), "string"),
        (("binary", "large_binary", "binary_view"), "binary"),
    )
    for names, kind in groups:
        if str(t) in names:
            return kind
    if pa.types.is_signed_integer(t):
        return "int"
    if pa.types.is_unsigned_integer(t):
        return "uint"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_kind(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {type_kind(f.type)}" for f in t) + ">"
    return str(t)


def id_root(inputs: list[str], files: list[str]) -> str:
    """The directory generated ids (``FILE#ROW``) name files relative to: the common
    directory of the ``--input`` values (a directory itself; a file's or a glob's parent),
    so a file's ids stay the same when another input file is removed or added (a resume
    after removing an unreadable file must skip exactly the rows already written). ""
    for one file: its name alone. ``files``: what ``list_parquet_files`` found."""
    import glob

    bare_files = {f.split("://")[-1] for f in files}
    bases = []
    for spec in inputs:
        bare = (spec if "://" in spec else os.path.abspath(spec)).split("://")[-1].rstrip("/")
        if glob.has_magic(bare):
            bare = posixpath.dirname(re.split(r"[*?\[]", bare, maxsplit=1)[0] + "x")
        elif bare in bare_files:
            bare = posixpath.dirname(bare)
        bases.append(bare)
    return posixpath.commonpath(bases) if len(files) > 1 else ""


def read_parquet_rows(
    files: list[str],
    columns: list[str],
    id_column: str | None,
    opts: S3Options,
    num_cpus: float = 0.25,
    report_to: str | None = None,
    root: str | None = None,
):
    """Ray Dataset of the wanted columns plus a string ``id`` column.

    A real Ray ``Read`` (one task per file) so Ray Data's checkpoint filter can drop
    rows already written on resume. The id is the input's id column as text, or a
    stable ``file#row`` when the input has none. ``report_to``: the output directory;
    a row group that cannot be decoded is recorded there (``record_unreadable``) and
    skipped, so the other rows are still written (None: the error fails the job).
    ``root``: what generated ids are relative to (``id_root``; None: the files' common path).
    """
    import ray

    source = ParquetRowsDatasource(files, columns, id_column, opts, report_to=report_to, root=root)
    return ray.data.read_datasource(source, num_cpus=num_cpus)


def _ray_datasource_base():
    from ray.data.datasource import Datasource

    return Datasource


class ParquetRowsDatasource(_ray_datasource_base()):
    """One read task per Parquet file, read row group by row group; rows carry a string ``id``."""

    def __init__(
        self, files, columns, id_column, opts: S3Options, report_to: str | None = None, root: str | None = None
    ):
        self.files, self.columns, self.id_column, self.opts = list(files), list(columns), id_column, opts
        self.report_to = report_to  # output directory for unreadable row groups' records; None: raise
        bare = [f.split("://")[-1] for f in self.files]
        self.root = root if root is not None else posixpath.commonpath(bare) if len(bare) > 1 else ""

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = []
        for path in self.files:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,))
            tasks.append(ReadTask(lambda path=path: self._read(path), meta))
        return tasks

    def _read(self, path):
        """Yield one file's rows in chunks of at most 256, with the ``id`` column."""
        import pyarrow.parquet as pq

        fs, p = pyarrow_fs(path, self.opts)
        pf = pq.ParquetFile(p, filesystem=fs)
        row = 0  # the file's row number of the group's first row: generated ids stay put when a group fails
        for group in range(pf.metadata.num_row_groups):
            yield from self._read_group(pf, path, group, row)
            row += pf.metadata.row_group(group).num_rows

    def _read_group(self, pf, path: str, group: int, first_row: int):
        """One row group's chunks; a group that fails to decode is recorded and skipped."""
        import pyarrow as pa

        name, done = _short_name(path, self.root), 0
        wanted = self.columns + ([self.id_column] if self.id_column else [])
        try:
            for chunk in pf.iter_batches(batch_size=256, row_groups=[group], columns=wanted):
                table = self._with_ids(pa.Table.from_batches([chunk]), name, first_row + done)
                done += table.num_rows
                yield table
        except (OSError, pa.ArrowException) as e:
            if self.report_to is None or isinstance(e, FileNotFoundError):
                raise  # no place to record it; a file gone mid-run is no decode failure
            total = pf.metadata.row_group(group).num_rows
            record_unreadable(
                self.report_to,
                self.opts,
                dict(file=path, row_group=group, rows=total - done, rows_read=done, error=first_line(e)),
            )

    def _with_ids(self, table, name: str, first_row: int):
        import pyarrow as pa

        if self.id_column is None:
            ids = pa.array([f"{name}#{first_row + i}" for i in range(table.num_rows)], pa.string())
        else:
            ids = table.column(self.id_column).cast(pa.string())
            table = table.drop_columns([self.id_column]) if self.id_column not in self.columns else table
        return table.append_column(ROW_ID, ids)


# In --output: one JSON record per input row group this run could not decode. The
# output directory, not the checkpoint: every run has one (a checkpoint is optional and
# its layout is Ray's), the driver lists it after the write anyway, and Parquet readers
# (pyarrow, pandas, Ray, Spark) skip "_" names. One file per row group: read tasks run
# at once and object stores cannot append; a retried task rewrites the same name.
UNREADABLE_DIR = "_hired_batch_unreadable"


def _unreadable_fs(output: str, opts: S3Options):
    """(fsspec filesystem, the records' directory without scheme) under ``output``."""
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(output, storage_options=fsspec_options(opts))
    return fs, f"{root.rstrip('/')}/{UNREADABLE_DIR}"


def record_unreadable(output: str, opts: S3Options, record: dict) -> None:
    """Write one unreadable row group's record (file, row_group, rows lost, rows_read, error)."""
    import hashlib
    import json

    fs, d = _unreadable_fs(output, opts)
    fs.makedirs(d, exist_ok=True)
    key = hashlib.sha1(record["file"].encode()).hexdigest()[:16]
    fs.pipe_file(f"{d}/{key}-rg{record['row_group']}.json", json.dumps(record).encode())


def unreadable_records(output: str, opts: S3Options) -> list[dict]:
    """This run's records of unreadable row groups, sorted by file and row group."""
    import json

    fs, d = _unreadable_fs(output, opts)
    names = [f for f in fs.find(d) if f.endswith(".json")] if fs.isdir(d) else []
    records = [json.loads(fs.cat_file(f)) for f in names]
    return sorted(records, key=lambda r: (r["file"], r["row_group"]))


def clear_unreadable(output: str, opts: S3Options) -> None:
    """Forget an earlier run's records: each run reports only what it could not read."""
    fs, d = _unreadable_fs(output, opts)
    if fs.isdir(d):
        fs.rm(d, recursive=True)


def _short_name(path: str, root: str) -> str:
    bare = path.split("://")[-1]
    return posixpath.relpath(bare, root) if root else posixpath.basename(bare)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> (name, config, split); split defaults to train."""
    parts = spec[len("hf:") :].split(":")
    if not parts[0]:
        raise ConfigError(f"expected hf:NAME[:CONFIG][:SPLIT], got {spec!r}")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1] or None, parts[2]


def check_hf_input(spec: str) -> None:
    """Fail fast (ValueError, one line) on an ``hf:`` dataset that cannot be reached or
    has no such split: reads only its metadata (the hub, or the local cache offline),
    so the mistake costs seconds, not a Ray start."""
    if not spec.startswith("hf:"):
        return  # a save_to_disk directory: is_hf_input already found its metadata file
    import datasets

    name, config, split = parse_hf_spec(spec)
    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as e:  # noqa: BLE001 - hub, network, config errors all mean "cannot read it"
        raise ConfigError(
            f"cannot read Hugging Face dataset {spec!r}: {first_line(e)}; "
            "check the name and hub access (HF_HUB_OFFLINE, HF_TOKEN), or pass a local "
            "Parquet export or save_to_disk directory"
        ) from None
    splits = builder.info.splits
    if splits and split not in splits:
        raise ConfigError(f"Hugging Face dataset {spec!r} has no split {split!r}; it has {sorted(splits)}")


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters, control bytes as "?"
    (a decoder's message can quote the garbage it choked on)."""
    text = str(e).strip().splitlines()
    first = "".join(ch if ch.isprintable() else "?" for ch in (text[0][:200] if text else ""))
    return f"{type(e).__name__}: {first}"


def load_hf_table(spec: str):
    """A Hugging Face dataset (hub spec or ``save_to_disk`` directory) as a pyarrow Table.

    Images stay in the stored ``{bytes, path}`` struct; nothing is decoded here.
    """
    import datasets

    if spec.startswith("hf:"):
        name, config, split = parse_hf_spec(spec)
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except (ConnectionError, OSError) as e:  # checked up front; the hub can still go away since
            raise ConfigError(f"cannot load Hugging Face dataset {spec!r}: {first_line(e)}") from None
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else sorted(ds)[0]
            ds = ds[split]
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds.with_format("arrow")[:]


def is_hf_input(spec: str) -> bool:
    """True for hf:NAME specs and local ``save_to_disk`` directories."""
    if spec.startswith("hf:"):
        return True
    return (
        os.path.isdir(spec)
        and os.path.exists(os.path.join(spec, "dataset_info.json"))
        or (os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_dict.json")))
    )


def is_hf_job(job: JobConfig) -> bool:
    """True when the job reads one Hugging Face dataset rather than Parquet."""
    return len(job.inputs) == 1 and is_hf_input(job.inputs[0])
