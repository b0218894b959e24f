"""Runs a script in several processes of one gloo group, for the savers and loaders of tests/formats.

Each rank gets torch.distributed's environment (`MASTER_ADDR`, `MASTER_PORT`, `RANK`,
`LOCAL_RANK`, `WORLD_SIZE`) on a free loopback port; a launch that outlives its time-out
(a rank died and the others wait for it) is killed and reported as 124.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def launch(argv: list[str], world: int, script: str, timeout: float = 150, env: dict | None = None) -> int:
    """Runs `script` with `argv` in `world` processes of one gloo group; the worst exit status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, script, *argv],
            env={
                **os.environ,
                **(env or {}),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
            },
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    try:
        return max(process.wait(max(deadline - time.monotonic(), 0)) for process in ranks)
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        return 124
