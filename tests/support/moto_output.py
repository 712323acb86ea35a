"""A job output on a local moto S3 server, as ``score`` and ``visualize --from-output`` read it."""

from __future__ import annotations

import contextlib

from support.s3_fault_proxy import MotoS3

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@contextlib.contextmanager
def output_on_s3(monkeypatch, local_file: str, url: str = "s3://jobs/run1"):
    """Serve ``local_file`` as the one Parquet file under ``url`` (s3://BUCKET/PREFIX) on a
    127.0.0.1 moto server with fake credentials; yields the endpoint. AWS_ENDPOINT_URL is
    cleared so only what the test sets (a flag, AWS_ENDPOINT_URL_S3) points at it."""
    import boto3

    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket, prefix = url[len("s3://") :].split("/", 1)
    with MotoS3() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=bucket)
        s3.upload_file(local_file, bucket, f"{prefix}/part-0.parquet")
        yield endpoint
