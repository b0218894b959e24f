"""Benchmark: images/s of `ckptavg bn-update --workers 2` against a plain single-process loop.

Generates an image folder once (benchmarks/data/bn_images: 4 classes of 128 JPEGs, 400x300)
and a resnet18 checkpoint, then times both commands as whole processes (median of --rounds,
interleaved), each decoding with the usual evaluation transform (resize 256, crop 224) and
running torch's update_bn. Images/s counts the whole command, start-up included; the
start-up floor (python -c "import torch, torchvision") is printed beside it.

Usage: python benchmarks/bench_bn.py [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from bench_average import measure

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "bn_images"
RESULTS = HERE / "results"
CLASSES, PER_CLASS = 4, 128


def ensure_data() -> tuple[Path, Path]:
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import save_file

    weights = HERE / "data" / "resnet18.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = DATA / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            path = folder / f"{i:04d}.jpg"
            if not path.exists():
                pixels = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, quality=90)
    return weights, DATA


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    weights, folder = ensure_data()
    RESULTS.mkdir(parents=True, exist_ok=True)
    images = CLASSES * PER_CLASS
    commands = {
        "floor": [sys.executable, "-c", "import torch, torchvision"],
        f"ckptavg bn-update --workers {args.workers}": [
            sys.executable,
            "-m",
            "ckptavg",
            "bn-update",
            str(weights),
            "--model",
            "torchvision:resnet18",
            "--model-kwargs",
            '{"num_classes": 10}',
            "--data",
            str(folder),
            "--workers",
            str(args.workers),
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "-o",
            str(RESULTS / "bn.safetensors"),
            "--force",
            "-q",
        ],
        "plain loop (1 process)": [
            sys.executable,
            str(HERE / "plain_bn_loop.py"),
            str(weights),
            str(folder),
            str(RESULTS / "plain_bn.safetensors"),
        ],
    }
    runs: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(args.rounds):
        for label, command in commands.items():
            runs[label].append(measure(command)[0])
    print(f"{images} images, {os.cpu_count()} cores, resnet18 at 224x224, batches of 32")
    baseline = statistics.median(runs["plain loop (1 process)"])
    for label, walls in runs.items():
        wall = statistics.median(walls)
        rate = "" if label == "floor" else f"{images / wall:8.1f} img/s  {baseline / wall:5.2f}x"
        print(f"{label:<32}{wall:7.2f} s  {rate}")


if __name__ == "__main__":
    main()
