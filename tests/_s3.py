"""A throwaway S3 endpoint for storage tests: moto's server on 127.0.0.1, fake credentials."""

from __future__ import annotations

import contextlib
import os

from _gloo import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def credentials():
    """The fake credentials in os.environ (Ray workers started inside inherit them)."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def bucket(name: str = "runs"):
    """Yields a function: key -> `s3://<bucket>/<key>?endpoint_override=...` on a fresh server."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with credentials():
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=name)

            def uri(key: str = "") -> str:
                path = f"{name}/{key}".rstrip("/")
                return f"s3://{path}?endpoint_override=127.0.0.1:{port}&scheme=http"

            yield uri
    finally:
        server.stop()
