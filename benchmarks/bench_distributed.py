"""Throughput of one run with 1 and 2 processes (torchrun, gloo, CPU): GB of input per second, on a
series in the page cache and on one evicted from it (posix_fadvise DONTNEED, best effort).

    .venv/bin/python benchmarks/bench_distributed.py [--mb 256] [--count 4]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_average import evict
from safetensors.torch import save_file

TORCHRUN = Path(sys.executable).with_name("torchrun")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256, help="size of each checkpoint")
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        folder = Path(folder)
        paths = []
        elements = args.mb * 2**20 // 4 // 16
        for i in range(args.count):
            state = {f"layer{j}.weight": torch.randn(elements) for j in range(16)}
            paths.append(folder / f"step_{i}.safetensors")
            save_file(state, paths[-1])
        size = sum(p.stat().st_size for p in paths)
        for cached in (True, False):
            for processes in (1, 2):
                output = folder / f"out_{processes}.safetensors"
                launcher = [sys.executable, "-m", "ckptavg"]
                if processes > 1:
                    launcher = [
                        str(TORCHRUN),
                        "--standalone",
                        "--nproc-per-node",
                        str(processes),
                        "-m",
                        "ckptavg",
                    ]
                command = [*launcher, "swa", *map(str, paths), "-o", str(output), "--force", "--quiet"]
                if not cached:
                    evict(paths)
                else:
                    subprocess.run(command, check=True, capture_output=True)  # warm the cache
                started = time.monotonic()
                subprocess.run(command, check=True, capture_output=True)
                seconds = time.monotonic() - started
                where = "page cache" if cached else "evicted"
                print(
                    f"{where:10}  {processes} process(es): {seconds:6.2f} s  {size / seconds / 1e9:5.2f} GB/s"
                )


if __name__ == "__main__":
    main()
