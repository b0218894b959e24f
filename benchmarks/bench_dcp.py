"""Average a DCP series in constant memory, against dcp_to_torch_save and a naive average.

Saves N DCP checkpoints (`dcp.save`, one process, torch_save serialization) of a model whose
largest tensor is SIZE MB of float32, with an Adam-like optimizer state beside it, then runs
`ckptavg swa` on them (safetensors out, then `--format dcp`), sampling RssAnon every 20 ms, and
`ckptavg` on two tiny checkpoints as the start-up baseline; then the usual alternative:
`dcp_to_torch_save` of each checkpoint followed by loading and averaging them in memory.

Usage: python benchmarks/bench_dcp.py [--count 3] [--megabytes 640] [--folder DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench_average import ensure_tiny, measure

NAIVE = """
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
folders, out = sys.argv[1:-1], sys.argv[-1]
total = None
for i, folder in enumerate(folders):
    dcp_to_torch_save(folder, f"{out}.{i}.pt")
    model = {k: v.float() for k, v in torch.load(f"{out}.{i}.pt")["model"].items()}
    total = model if total is None else {k: total[k] + model[k] for k in total}
torch.save({k: v / len(folders) for k, v in total.items()}, out)
"""


def save_series(folder: Path, count: int, megabytes: float) -> list[Path]:
    import torch
    import torch.distributed.checkpoint as dcp

    rows = max(1, int(megabytes * 1e6 / 4 / 4096))
    paths = []
    for step in range(1, count + 1):
        path = folder / f"step-{step}"
        if not (path / ".metadata").exists():
            torch.manual_seed(step)
            model = {"embed.weight": torch.randn(rows, 4096), "norm.weight": torch.ones(4096)}
            optimizer = {"state.embed.weight.exp_avg": torch.zeros(16, 16)}
            dcp.save({"model": model, "optimizer": optimizer, "step": step}, checkpoint_id=path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=640)
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_dcp_"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = save_series(folder / "run", args.count, args.megabytes)
    ckptavg = [sys.executable, "-m", "ckptavg"]
    tiny = ensure_tiny()
    _, baseline = measure(
        [*ckptavg, "swa", *map(str, tiny), "-o", str(folder / "tiny.safetensors"), "--force"]
    )
    runs = {
        "ckptavg swa -> safetensors": [
            *ckptavg,
            "swa",
            *map(str, paths),
            "-o",
            str(folder / "swa.safetensors"),
        ],
        "ckptavg swa -> --format dcp": [
            *ckptavg,
            "swa",
            *map(str, paths),
            "-o",
            f"{folder / 'swa_dcp'}/",
            "--format",
            "dcp",
        ],
        "dcp_to_torch_save + naive average": [
            sys.executable,
            "-c",
            NAIVE,
            *map(str, paths),
            str(folder / "naive.pt"),
        ],
    }
    print(f"{args.count} DCP checkpoints, largest tensor {args.megabytes:.0f} MB float32")
    print(f"start-up baseline (tiny run): {baseline:.0f} MB anonymous")
    for label, command in runs.items():
        for stale in ("swa.safetensors", "swa_dcp", "naive.pt"):
            target = folder / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        wall, peak = measure(command)
        print(f"{label:36s} {wall:6.1f} s  peak RssAnon {peak:7.0f} MB  (+{peak - baseline:.0f} MB)")


if __name__ == "__main__":
    main()
