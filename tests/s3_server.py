"""A real S3 API server on 127.0.0.1 (moto's threaded server), reached through s3fs exactly as AWS is."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str = "runs") -> Iterator[tuple[object, dict]]:
    """The server, running while inside; yields an s3fs file system on it and the storage options
    that reach it (for `--storage-options`). Nothing of this machine's AWS configuration is read."""
    import s3fs
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in ("AWS_DEFAULT_REGION", "AWS_CONFIG_FILE")}
    os.environ.update(AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    try:
        fs = s3fs.S3FileSystem(**options)
        fs.makedirs(bucket, exist_ok=True)
        yield fs, options
    finally:
        server.stop()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})
