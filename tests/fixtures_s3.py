"""One S3-compatible object store per test session: moto's server mode on loopback (what Ray's own tests use
for ``s3://`` storage), started as its own process; buckets are created by the tests that use them.

The credentials are the standard AWS variables, set for this process and every process it starts (Ray nodes,
job entrypoints, the MLflow server); the secret is distinctive so tests can check it is never written down.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ports import free_port
from shared_services import shared

TEST_SECRET = "byol-ray-test-secret-7f3a9c"
os.environ["AWS_ACCESS_KEY_ID"] = "byol-ray-test-key"
os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups for credentials


class ObjectStore:
    """The running server: its endpoint, a boto3 client, and URIs in pyarrow's endpoint-in-the-URI form."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.hostport = endpoint.removeprefix("http://")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self, prefix: str = "b") -> str:
        """A new, empty bucket."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def uri(self, bucket: str, key: str = "") -> str:
        """``s3://bucket/key?endpoint_override=HOST:PORT&scheme=http`` (pyarrow's form for S3-compatible stores)."""
        path = f"{bucket}/{key}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.hostport}&scheme=http"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def upload(self, local: Path, bucket: str, key: str) -> None:
        self.client().upload_file(str(local), bucket, key)


def _start_moto(folder: Path) -> tuple[dict, int]:
    port = free_port()
    log = folder / "moto.log"
    moto = Path(sys.executable).with_name("moto_server")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.3)
    return {"endpoint": endpoint}, proc.pid


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> ObjectStore:
    """moto's S3 server on 127.0.0.1 and a free port, one per test session (shared by its xdist workers; the
    session's root process stops it at the end: tests/shared_services.py)."""
    return ObjectStore(shared(tmp_path_factory, "s3", _start_moto)["endpoint"])
