"""Train a small language model at a constant learning rate; compare averaging its checkpoints with a decay.

`make demo` runs this after the digits demo. A character-level transformer (`charlm.py`)
learns the source of Python's standard library with AdamW: a short warmup, then a
constant learning rate (the stable phase of a warmup-stable-decay run), a checkpoint
every few steps. At a high constant rate the last checkpoint is noisy; decaying the
rate removes that noise, and so, the literature finds, does averaging recent
checkpoints (Sanyal et al. 2023; Hägele et al. 2024; WSM, Tian et al. 2025). Per seed:

  - the stable run, saved every `DemoRun.every` steps as safetensors;
  - the cooled-down reference: a branch from the stable checkpoint `DemoRun.cooldown`
    steps before the end, with its optimizer state, decaying the rate linearly to zero
    by the last step, so it costs what the stable run costs;
  - averages of the stable checkpoints through the ckptavg command line, as a user
    would run them: `swa --last` (LAWA) and `anneal` over the cooldown's span, `ema
    --half-life` and `ema --sigma-rel` over the whole run.

Every model is scored on the same held-out files. The table (mean ± standard deviation
over seeds) goes to stdout and output/lm/results.md, the plot to output/lm/loss.png.

  python examples/train_lm_and_average.py            # 3 seeds, 320 steps
  python examples/train_lm_and_average.py --quick    # 1 seed, 40 steps (for tests)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
from charlm import (
    CharTransformer,
    Recipe,
    constant_with_warmup,
    held_out_loss,
    held_out_windows,
    linear_decay,
    load_stdlib_text,
    make_optimizer,
    train_steps,
)
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
LAST = "last stable checkpoint"
COOLED = "cooled-down run (linear decay to 0)"


@dataclass(frozen=True)
class DemoRun:
    """The stable run's length, how often it is saved and the cooldown's span (in steps), and the scoring."""

    steps: int = 320
    every: int = 16
    cooldown: int = 64
    recipe: Recipe = field(default_factory=Recipe)
    eval_windows: int = 256


QUICK = DemoRun(steps=40, every=10, cooldown=20, recipe=Recipe(warmup_steps=10), eval_windows=32)


def averages(run: DemoRun, folder: Path) -> tuple[list[list[str]], dict[str, Path]]:
    """The ckptavg commands (all but their inputs), and each table row's output.

    `anneal` and `swa --last` cover the cooldown's span; the EMAs weigh the whole run.
    Both --sigma-rel values come from one command, which reads the checkpoints once."""
    start, window, half_life = run.steps - run.cooldown, run.cooldown // run.every + 1, run.cooldown // 2
    arguments = {
        "swa.safetensors": f"swa --last {window}",
        "ema.safetensors": f"ema --half-life {half_life}",
        "anneal_linear.safetensors": f"anneal --shape linear --from-step {start}",
        "anneal_1-sqrt.safetensors": f"anneal --shape 1-sqrt --from-step {start}",
        "ema_sigma_{sigma_rel}.safetensors": "ema --sigma-rel 0.05 --sigma-rel 0.1",
    }
    commands = [[*args.split(), "-o", str(folder / name)] for name, args in arguments.items()]
    outputs = {
        f"swa --last {window} (LAWA)": folder / "swa.safetensors",
        f"ema --half-life {half_life}": folder / "ema.safetensors",
        "anneal --shape linear": folder / "anneal_linear.safetensors",
        "anneal --shape 1-sqrt": folder / "anneal_1-sqrt.safetensors",
        "ema --sigma-rel 0.05": folder / "ema_sigma_0.05.safetensors",
        "ema --sigma-rel 0.1": folder / "ema_sigma_0.1.safetensors",
    }
    return commands, outputs


def run_ckptavg(commands: list[list[str]], pattern: str) -> None:
    """The commands at once, one process each, as a user's shell would run them in the background."""
    running = [
        (command, subprocess.Popen([sys.executable, "-m", "ckptavg", *command, pattern, "--force", "-q"]))
        for command in commands
    ]
    for command, process in running:
        if process.wait() != 0:
            raise SystemExit(f"ckptavg {' '.join(command)} {pattern} failed (exit {process.returncode})")


def run_seed(seed: int, run: DemoRun, output: Path) -> dict:
    """One seed: the stable run, its cooled-down branch, the averages, and every held-out loss.

    One thread per process: on a model this small a second thread costs more in waiting
    than it computes, so the seeds run side by side in processes instead."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train_text, held_out_text = load_stdlib_text()
    model = CharTransformer()
    optimizer = make_optimizer(model, run.recipe)
    windows = held_out_windows(held_out_text, run.eval_windows, model.context)
    folder = output / f"seed_{seed}"
    (folder / "ckpts").mkdir(parents=True, exist_ok=True)
    start = run.steps - run.cooldown
    branch_point = {}

    def save(step: int) -> None:
        if step % run.every == 0:
            save_file(model.state_dict(), folder / "ckpts" / f"step_{step}.safetensors")
        if step == start:
            branch_point["model"] = copy.deepcopy(model.state_dict())
            branch_point["optimizer"] = copy.deepcopy(optimizer.state_dict())

    schedule = constant_with_warmup(run.recipe)
    train_steps(model, optimizer, train_text, seed, range(1, run.steps + 1), schedule, run.recipe, save)
    steps = [step for step in range(run.every, run.steps + 1, run.every) if step >= run.steps // 2]
    curve = [score(folder / "ckpts" / f"step_{step}.safetensors", windows) for step in steps]

    # The branch resumes from the step-`start` checkpoint and its optimizer state, and sees
    # the same batches the stable run saw over those steps: only the learning rate differs.
    cooled = CharTransformer()
    cooled.load_state_dict(branch_point["model"])
    cooled_optimizer = make_optimizer(cooled, run.recipe)
    cooled_optimizer.load_state_dict(branch_point["optimizer"])
    cooled_curve = {start: curve[steps.index(start)]}

    def score_cooled(step: int) -> None:
        if step % run.every == 0:
            cooled_curve[step] = held_out_loss(cooled, windows)

    decay = linear_decay(start, run.steps, run.recipe)
    train_steps(
        cooled,
        cooled_optimizer,
        train_text,
        seed,
        range(start + 1, run.steps + 1),
        decay,
        run.recipe,
        score_cooled,
    )

    commands, outputs = averages(run, folder)
    run_ckptavg(commands, str(folder / "ckpts" / "step_*.safetensors"))
    results = {LAST: curve[-1]}
    results.update({label: score(out, windows) for label, out in outputs.items()})
    results[COOLED] = cooled_curve[run.steps]
    return {
        "steps": steps,
        "curve": curve,
        "cooled_steps": list(cooled_curve),
        "cooled_curve": list(cooled_curve.values()),
        "results": results,
    }


def score(path: Path, windows: torch.Tensor) -> float:
    model = CharTransformer()
    model.load_state_dict(load_file(path))
    return held_out_loss(model, windows)


def summarize(per_seed: list[dict]) -> list[str]:
    """The table: each model's loss, and its paired difference from the last checkpoint, per seed."""

    def cell(values: list[float], digits: int = 4) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    lines = [
        "| model | held-out loss (nats/char) | bits/char | change from the last checkpoint (nats/char) |",
        "| --- | --- | --- | --- |",
    ]
    for label in per_seed[0]["results"]:
        losses = [seed["results"][label] for seed in per_seed]
        changes = [seed["results"][label] - seed["results"][LAST] for seed in per_seed]
        bits = [loss / math.log(2) for loss in losses]
        change = "" if label == LAST else cell(changes)
        lines.append(f"| {label} | {cell(losses)} | {cell(bits, 3)} | {change} |")
    return lines


def plot(per_seed: list[dict], run: DemoRun, path: Path) -> None:
    """Held-out loss per checkpoint and along the cooldown, the averages as lines; all seeds' mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_of(key: str) -> list[float]:
        return [statistics.mean(values) for values in zip(*(seed[key] for seed in per_seed), strict=True)]

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    axes.plot(
        per_seed[0]["steps"], mean_of("curve"), color="0.5", marker=".", label="stable run's checkpoints"
    )
    axes.plot(
        per_seed[0]["cooled_steps"], mean_of("cooled_curve"), color="black", lw=1.5, label="cooled-down run"
    )
    colors = iter(plt.get_cmap("tab10").colors)
    for label in per_seed[0]["results"]:
        if label in (LAST, COOLED):
            continue
        mean = statistics.mean(seed["results"][label] for seed in per_seed)
        axes.axhline(mean, color=next(colors), ls="--", lw=1.2, label=f"{label}: {mean:.3f}")
    cooled = mean_of("cooled_curve")[-1]
    axes.axhline(cooled, color="black", ls=":", lw=1.2, label=f"cooled-down run: {cooled:.3f}")
    axes.axvspan(
        run.steps - run.cooldown, run.steps, color="tab:blue", alpha=0.07, label="the cooldown's span"
    )
    axes.set_xlabel("training step")
    axes.set_ylabel("held-out loss (nats per character)")
    axes.set_title(
        f"Character-level transformer on Python's standard library, mean of {len(per_seed)} seed(s)"
    )
    axes.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_seeds(seeds: range, run: DemoRun, output: Path) -> Iterator[dict]:
    """Each seed's results in order; several seeds run side by side, one process each."""
    if len(seeds) == 1:
        yield run_seed(seeds[0], run, output)
        return
    with ProcessPoolExecutor(max_workers=len(seeds), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_seed, seed, run, output) for seed in seeds]
        for future in futures:
            yield future.result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps, a checkpoint every 10")
    parser.add_argument("--output", type=Path, default=HERE / "output" / "lm")
    args = parser.parse_args()
    run = QUICK if args.quick else DemoRun()
    seeds = range(1 if args.quick else args.seeds)
    per_seed = []
    for seed, result in zip(seeds, run_seeds(seeds, run, args.output), strict=True):
        per_seed.append(result)
        losses = ", ".join(f"{label} {loss:.4f}" for label, loss in result["results"].items())
        print(f"seed {seed}: {losses}", flush=True)
    table = summarize(per_seed)
    print("\n" + "\n".join(table))
    (args.output / "results.md").write_text("\n".join(table) + "\n")
    plot(per_seed, run, args.output / "loss.png")
    print(f"\nwrote {args.output / 'results.md'} and {args.output / 'loss.png'}", flush=True)


if __name__ == "__main__":
    main()
