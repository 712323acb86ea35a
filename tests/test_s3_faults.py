"""The S3 retry policy (hired_batch.job.sources) against our fault-injecting proxy in front
of moto: the faults reach a client without retries, and the job's own filesystems ride
them out. The whole job through the proxy runs in tests/test_cluster.py."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.s3_fault_proxy import FAKE_AWS, FAULTS, FaultProxy, MotoS3


@pytest.fixture(scope="module")
def s3():
    """(moto URL, boto3 client straight to moto); fake credentials in the environment."""
    import boto3

    old = {k: os.environ.get(k) for k in FAKE_AWS}
    os.environ.update(FAKE_AWS)
    try:
        with MotoS3() as url:
            client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
            client.create_bucket(Bucket="flaky")
            yield url, client
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def proxy(s3, request):
    p = FaultProxy(s3[0], rate=request.param, seed=13)
    p.start()
    yield p
    p.stop()


@pytest.mark.parametrize("proxy", [0.3], indirect=True)
def test_proxy_faults_reach_a_client_without_retries(s3, proxy):
    """Every fault kind happens, is seen as a failure by a client that does not retry,
    and the proxy's fault share is close to the rate asked for."""
    import boto3
    import botocore.config
    import botocore.exceptions

    bare = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )
    failed = 0
    for i in range(60):
        try:
            bare.put_object(Bucket="flaky", Key=f"bare/{i}", Body=b"x" * i)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            failed += 1
    assert all(proxy.counts[f] > 0 for f in FAULTS), proxy.counts
    assert failed == proxy.faults  # one try each: every fault is a failed call
    assert 0.15 * 60 <= proxy.faults <= 0.45 * 60, proxy.counts


@pytest.mark.parametrize("proxy", [0.2], indirect=True)
def test_job_filesystems_retry_through_faults(s3, proxy):
    """The filesystems the job builds (sources.pyarrow_fs for Parquet, fsspec.open with
    the job's storage options for image URLs) write and read back through a 20 %
    fault rate with no error, and carry the documented botocore retry policy."""
    import fsspec

    from hired_batch.config import S3Options
    from hired_batch.job.sources import S3_BOTOCORE_RETRIES, fsspec_options, pyarrow_fs

    opts = S3Options(endpoint=proxy.url)
    fs, root = pyarrow_fs("s3://flaky/parquet", opts)
    assert fs.handler.fs.config_kwargs["retries"] == S3_BOTOCORE_RETRIES
    tables = {f"{root}/part-{i}.parquet": pa.table({"i": list(range(i, i + 50))}) for i in range(5)}
    for path, t in tables.items():
        pq.write_table(t, path, filesystem=fs)
    for path, t in tables.items():
        assert pq.read_table(path, filesystem=fs).equals(t)
    for i in range(5):
        with fsspec.open(f"s3://flaky/bare-{i}", "wb", **fsspec_options(opts)) as f:
            f.write(b"img" * i)
        with fsspec.open(f"s3://flaky/bare-{i}", "rb", **fsspec_options(opts)) as f:
            assert f.read() == b"img" * i
    assert proxy.faults >= 5 and all(proxy.counts[k] for k in FAULTS), proxy.counts


def test_user_fsspec_config_overrides_the_retry_policy():
    """A user's FSSPEC_S3 setting (fsspec's own configuration, read at import in every
    process that has it in its environment) wins over the job's default policy."""
    import json
    import subprocess
    import sys

    mine = {"config_kwargs": {"retries": {"total_max_attempts": 20, "mode": "adaptive"}}}
    code = (
        "import json; from hired_batch.config import S3Options; from hired_batch.job.sources import pyarrow_fs; "
        "print(json.dumps(pyarrow_fs('s3://b/k', S3Options())[0].handler.fs.config_kwargs))"
    )
    env = dict(os.environ, FSSPEC_S3=json.dumps(mine))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == mine["config_kwargs"]
