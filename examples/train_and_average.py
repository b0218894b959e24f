"""Train a small CNN, save a checkpoint every epoch, average them with ckptavg, show the gain.

`make demo` runs this. On scikit-learn's handwritten digits (no download), a small CNN
with BatchNorm trains with SGD (momentum 0.9): a cosine decay of the learning rate from
0.1 to 0.01, then a constant rate of 0.05, the phase where weight averaging is known to
help (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", 2018). Every epoch is saved as safetensors. Then ckptavg averages
them, through the Python API and the CLI:

  - EMA over all checkpoints (Python API),
  - SWA over the constant-rate phase (CLI),
  - SWA + bn-update: BatchNorm statistics recomputed over the training inputs (CLI),

and each model is evaluated on the held-out split, for several seeds. The table (mean
and spread over seeds) goes to stdout and output/results.md, the plot to output/accuracy.png.

  python examples/train_and_average.py            # 3 seeds, 40 epochs (under a minute on 2 cores)
  python examples/train_and_average.py --quick    # 1 seed, 6 epochs (for tests)
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from digits import SmallCNN, evaluate, load_digits_split
from safetensors.torch import load_file, save_file
from torch import nn

import ckptavg

HERE = Path(__file__).resolve().parent
BASE_LR, LOW_LR, SWA_LR = 0.1, 0.01, 0.05
METHODS = ("last checkpoint", "EMA (all, decay 0.8)", "SWA (constant-rate phase)", "SWA + bn-update")


def learning_rate(epoch: int, swa_start: int) -> float:
    """Cosine decay from BASE_LR to LOW_LR, then a constant SWA_LR, as in the SWA paper."""
    if epoch <= swa_start:
        return LOW_LR + (BASE_LR - LOW_LR) * 0.5 * (1 + math.cos(math.pi * epoch / swa_start))
    return SWA_LR


def train(seed: int, epochs: int, swa_start: int, folder: Path) -> list[Path]:
    """Train and save one checkpoint per epoch; returns their paths, oldest first."""
    torch.manual_seed(seed)
    x_train, y_train, _, _ = load_digits_split(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, swa_start)
        model.train()
        for batch in torch.randperm(len(y_train)).split(32):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        path = folder / f"epoch_{epoch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
        paths.append(path)
    return paths


def ckptavg_cli(*args: str) -> None:
    """The installed command line, run from this folder so that `--model digits:SmallCNN` imports."""
    subprocess.run([sys.executable, "-m", "ckptavg", *args, "-q"], check=True, cwd=HERE)


def score(path: Path, x_test, y_test) -> tuple[float, float]:
    model = SmallCNN()
    model.load_state_dict(load_file(path))
    return evaluate(model, x_test, y_test)


def run_seed(seed: int, epochs: int, swa_start: int, output: Path) -> tuple[dict, list[float]]:
    folder = output / f"seed_{seed}"
    checkpoints = train(seed, epochs, swa_start, folder / "ckpts")
    x_train, _, x_test, y_test = load_digits_split(seed)
    save_file({"inputs": x_train.contiguous()}, folder / "train_inputs.safetensors")

    ckptavg.average(checkpoints, ckptavg.ema(0.8), out=folder / "ema.safetensors", force=True)
    ckptavg_cli("swa", *map(str, checkpoints[swa_start:]), "-o", str(folder / "swa.safetensors"), "--force")
    ckptavg_cli(
        "bn-update",
        str(folder / "swa.safetensors"),
        "--model",
        "digits:SmallCNN",
        "--data",
        str(folder / "train_inputs.safetensors"),
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "-o",
        str(folder / "swa_bn.safetensors"),
        "--force",
    )

    outputs = [
        checkpoints[-1],
        folder / "ema.safetensors",
        folder / "swa.safetensors",
        folder / "swa_bn.safetensors",
    ]
    results = {method: score(path, x_test, y_test) for method, path in zip(METHODS, outputs, strict=True)}
    curve = [score(path, x_test, y_test)[0] for path in checkpoints]
    return results, curve


def summarize(per_seed: list[dict]) -> list[str]:
    def cell(values: list[float], scale: float, digits: int) -> str:
        mean = statistics.mean(values) * scale
        spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    lines = ["| model | test accuracy (%) | test loss |", "| --- | --- | --- |"]
    for method in METHODS:
        accuracies = [r[method][0] for r in per_seed]
        losses = [r[method][1] for r in per_seed]
        lines.append(f"| {method} | {cell(accuracies, 100, 2)} | {cell(losses, 1, 4)} |")
    return lines


def plot(curves: list[list[float]], per_seed: list[dict], swa_start: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(curves[0]) + 1)
    figure, axes = plt.subplots(figsize=(7, 4))
    for i, curve in enumerate(curves):
        axes.plot(
            epochs, [100 * a for a in curve], color="0.6", lw=1, label="each checkpoint" if i == 0 else None
        )
    for method, color in zip(METHODS[1:], ("tab:blue", "tab:orange", "tab:green"), strict=True):
        mean = 100 * statistics.mean(r[method][0] for r in per_seed)
        axes.axhline(mean, color=color, ls="--", label=f"{method}: {mean:.2f}%")
    axes.axvspan(
        swa_start + 0.5, len(curves[0]) + 0.5, color="tab:orange", alpha=0.08, label="averaged by SWA"
    )
    axes.set_xlabel("epoch (one checkpoint each)")
    axes.set_ylabel("test accuracy (%)")
    low = min(min(c[swa_start // 2 :]) for c in curves) * 100
    axes.set_ylim(max(low - 1, 0), 100)
    axes.set_title(f"Handwritten digits, small CNN, {len(curves)} seed(s)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--swa-start", type=int, default=25, help="epochs before the constant-rate phase")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 epochs, 3 before the constant phase")
    parser.add_argument("--output", type=Path, default=HERE / "output")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.swa_start = 1, 6, 3
    torch.set_num_threads(1)  # a model this small waits on a second thread more than it gains from it
    per_seed, curves = [], []
    for seed in range(args.seeds):
        results, curve = run_seed(seed, args.epochs, args.swa_start, args.output)
        per_seed.append(results)
        curves.append(curve)
        print(f"seed {seed}: " + ", ".join(f"{m} {100 * r[0]:.2f}%" for m, r in results.items()), flush=True)
    table = summarize(per_seed)
    print("\n" + "\n".join(table))
    (args.output / "results.md").write_text("\n".join(table) + "\n")
    plot(curves, per_seed, args.swa_start, args.output / "accuracy.png")
    print(f"\nwrote {args.output / 'results.md'} and {args.output / 'accuracy.png'}")
    print(f"\n$ ckptavg inspect {args.output / 'seed_0' / 'swa_bn.safetensors'} --no-tensors", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptavg",
            "inspect",
            str(args.output / "seed_0" / "swa_bn.safetensors"),
            "--no-tensors",
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
