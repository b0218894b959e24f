"""Average a series larger than this machine's RAM, and report peak anonymous memory.

Writes N checkpoints of SIZE GB of bf16 each (default 3 x 10 GB) with ckptavg's own
streaming writer, so generating them does not need the memory either, then runs
`ckptavg swa` on them, sampling RssAnon every 20 ms, and `ckptavg` on two tiny
checkpoints as the start-up baseline. The data stays in --folder for later runs
unless --clean.

Usage: python benchmarks/bench_larger_than_ram.py [--count 3] [--gigabytes 10] [--folder DIR] [--clean]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from bench_average import ensure_tiny, measure

HERE = Path(__file__).resolve().parent
TENSOR_ELEMENTS = 128 * 2**20  # 256 MB of bf16 per tensor


def generate(path: Path, gigabytes: float, seed: int) -> None:
    import torch

    from ckptavg.formats.safetensors_header import Entry, layout_order
    from ckptavg.run.writer import SafetensorsWriter

    count = max(1, round(gigabytes * 1e9 / (2 * TENSOR_ELEMENTS)))
    entries = layout_order(
        Entry(f"layers.{i:03d}.weight", "BF16", (TENSOR_ELEMENTS // 4096, 4096)) for i in range(count)
    )
    generator = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(path.with_suffix(".tmp"), entries, {"format": "pt"})
    for entry in entries:
        writer.write(entry.name, 0, torch.randn(TENSOR_ELEMENTS, generator=generator).to(torch.bfloat16))
    writer.finish()
    path.with_suffix(".tmp").rename(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--gigabytes", type=float, default=10)
    parser.add_argument("--folder", type=Path, default=HERE / "data" / "larger_than_ram")
    parser.add_argument("--clean", action="store_true", help="delete the series afterwards")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    paths = [args.folder / f"step_{i}.safetensors" for i in range(1, args.count + 1)]
    for seed, path in enumerate(paths):
        if not path.exists():
            start = time.perf_counter()
            generate(path, args.gigabytes, seed)
            print(f"generated {path} in {time.perf_counter() - start:.0f} s", flush=True)
    total = sum(p.stat().st_size for p in paths)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = args.folder / "swa.safetensors"
    tiny = ensure_tiny()
    ckptavg = [sys.executable, "-m", "ckptavg"]
    _tiny_wall, tiny_anon = measure(
        [*ckptavg, "swa", *map(str, tiny), "-o", str(args.folder / "tiny.safetensors"), "--force", "-q"]
    )
    wall, anon = measure(
        [*ckptavg, "swa", *map(str, paths), "-o", str(out), "--force", "-q", "--device", "cpu"]
    )
    print(
        f"{args.count} checkpoints, {total / 1e9:.1f} GB in all, on a machine with {ram / 1e9:.1f} GB of RAM"
    )
    print(
        f"ckptavg swa: {wall:.1f} s ({total / 1e9 / wall:.2f} GB/s of input), peak anonymous memory "
        f"{anon:.0f} MB ({anon - tiny_anon:.0f} MB over its start-up of {tiny_anon:.0f} MB)"
    )
    out.unlink(missing_ok=True)
    if args.clean:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
