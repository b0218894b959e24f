"""Benchmark: `ckptavg swa` and `ckptavg ema` against the naive script and the machine's floor.

Generates two series once (under benchmarks/data, reused on later runs):
  llm:    8 checkpoints x ~1 GB bf16, Llama-like shapes (502M params, 309 tensors, a 32000x1024 embedding)
  resnet: 20 checkpoints x ~100 MB fp32, ResNet-50 shapes with BatchNorm buffers
  torch:  2 torch checkpoints x 3 GB: 1 GB of fp32 weights under 'model' next to a 2 GB Adam state
Then runs each command as a whole process, interleaved over rounds, page cache hot, and reports
the median wall time and the peak anonymous memory (RssAnon, sampled every 20 ms), with ratios
against baselines measured in the same run:
  floor:  python -c "import torch, safetensors" (what every torch program pays to start)
  tiny:   ckptavg swa on two tiny checkpoints (ckptavg's own fixed start-up cost)
  naive:  benchmarks/naive_average.py (load_file every checkpoint, sum in fp32, save_file)
With a CUDA device (--device auto finds one), `ckptavg swa --device cuda` runs too, and its input
rate is reported against the host-to-device copy rate measured in the same run.

Usage: python benchmarks/bench_average.py [--rounds 3] [--series llm,resnet] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
PYTHON = sys.executable
CKPTAVG = [PYTHON, "-m", "ckptavg"]
MEMORY_BOUND_MB = 256  # peak anonymous memory allowed over ckptavg's own start-up


def llama_layer_shapes(layers: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a Llama-like model's layers: attention and MLP matrices, their norms."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def llm_state(seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab, layers = 1024, 2816, 32000, 34
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    shapes.update(llama_layer_shapes(layers, hidden, inter))
    return {n: torch.randn(s, generator=generator, dtype=torch.bfloat16) for n, s in shapes.items()}


def resnet_state(seed: int):
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.resnet50().state_dict()
    return {
        n: (t + torch.randn_like(t) * 0.01 if t.is_floating_point() else t + seed).contiguous()
        for n, t in state.items()
    }


def torch_training_checkpoint(seed: int):
    """A 1 GB fp32 model saved by a training loop, with an Adam state twice its size."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    model = {f"layers.{i}.weight": torch.randn(4096, 4096, generator=generator) for i in range(15)}
    optimizer = {
        "state": {
            i: {"step": torch.tensor(seed), "exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
            for i, t in enumerate(model.values())
        },
        "param_groups": [{"lr": 1e-3, "params": list(range(len(model)))}],
    }
    return {"model": model, "optimizer": optimizer, "epoch": seed}


SERIES = {"llm": (8, llm_state), "resnet": (20, resnet_state), "torch": (2, torch_training_checkpoint)}


def ensure_series(name: str) -> list[Path]:
    from safetensors.torch import save_file

    count, make = SERIES[name]
    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".pt" if name == "torch" else ".safetensors"
    paths = [folder / f"step_{i}{suffix}" for i in range(1, count + 1)]
    for i, path in enumerate(paths, 1):
        if not path.exists():
            print(f"generating {path}", file=sys.stderr)
            if suffix == ".pt":
                import torch

                torch.save(make(i), path.with_suffix(".tmp"))
            else:
                save_file(make(i), path.with_suffix(".tmp"), metadata={"format": "pt"})
            path.with_suffix(".tmp").rename(path)
    return paths


def ensure_tiny() -> list[Path]:
    import torch
    from safetensors.torch import save_file

    folder = DATA / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"step_{i}.safetensors" for i in (1, 2)]
    for i, path in enumerate(paths):
        if not path.exists():
            save_file({"w": torch.full((4,), float(i))}, path)
    return paths


def rss_anon_kb(pid: int) -> int:
    """Anonymous memory of a process and its descendants, in kB (0 once it has exited).

    The process counts its RssAnon. A descendant counts only its private dirty
    pages: a child forked but not yet exec'd (torch's import runs `ldconfig -p`
    so) shares its parent's pages, which its RssAnon would count a second time.
    """
    return _field_kb(f"/proc/{pid}/status", "RssAnon:") + _descendants_kb(pid)


def _descendants_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return sum(_field_kb(f"/proc/{c}/smaps_rollup", "Private_Dirty:") + _descendants_kb(c) for c in children)


def _field_kb(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak anonymous MB of one run of `command`."""
    wall, peak, _ = sampled_run(command)
    return wall, peak


def sampled_run(command: list[str], **popen) -> tuple[float, float, bytes]:
    """Wall seconds, peak anonymous MB (sampled every 20 ms) and stdout of one run of `command`,
    which must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_kb(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()}")
    return wall, peak / 1000, stdout


def warm(paths: list[Path]) -> None:
    # Flushed first: pages of a file written moments ago are dirty, and a child process's
    # Private_Dirty (how descendants are counted) would count them as its own memory.
    os.sync()
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def read_time(paths: list[Path]) -> float:
    """Seconds to read every input byte once from the page cache (the reading limit)."""
    start = time.perf_counter()
    warm(paths)
    return time.perf_counter() - start


def write_time(nbytes: int, folder: Path) -> float:
    """Seconds to write `nbytes` and fsync them (the writing limit), in 64 MB blocks."""
    block = os.urandom(64 * 2**20)
    path = folder / "write-limit.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for offset in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - offset)])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def describe_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    return f"{device} ({torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda})"


def host_to_device_rates(nbytes: int = 512 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """GB/s of copying to the GPU from pinned and from pageable host memory (best of `repeats`)."""
    import torch

    device_buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for pinned in (True, False):
        host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            device_buffer.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        rates.append(nbytes / best / 1e9)
    return rates[0], rates[1]


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (POSIX_FADV_DONTNEED), for cold-cache runs."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_series(name: str, rounds: int, out_dir: Path, cold: bool = False, device: str = "cpu") -> dict:
    paths = ensure_series(name)
    tiny = ensure_tiny()
    warm(paths)
    out = out_dir / f"{name}.safetensors"
    key = ["--key", "model"] if name == "torch" else []

    def ckptavg(*method: str, output: Path = out, on: str = "cpu") -> list[str]:
        return [
            *CKPTAVG,
            *method,
            *map(str, paths),
            *key,
            "-o",
            str(output),
            "--force",
            "-q",
            "--device",
            on,
        ]

    commands = {
        "floor": [PYTHON, "-c", "import torch, safetensors"],
        "tiny": [*CKPTAVG, "swa", *map(str, tiny), "-o", str(out_dir / "tiny.safetensors"), "--force", "-q"],
        "ckptavg swa": ckptavg("swa"),
        "ckptavg ema": ckptavg("ema", "--decay", "0.9"),
        "naive": [PYTHON, str(HERE / "naive_average.py"), *map(str, paths), str(out)],
    }
    if name == "torch":
        commands["ckptavg swa -o .pt"] = ckptavg("swa", output=out.with_suffix(".pt"))
    if device == "cuda":
        commands["ckptavg swa --device cuda"] = ckptavg("swa", on="cuda")
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
    reads, writes = [], []
    output_bytes = paths[0].stat().st_size
    for _ in range(rounds):
        if cold:
            evict(paths)
        reads.append(read_time(paths))
        writes.append(write_time(output_bytes, out_dir))
        for label, command in commands.items():
            out.unlink(missing_ok=True)
            if cold:
                evict(paths)
            runs[label].append(measure(command))
    median = {label: (statistics.median(w for w, _ in r), max(m for _, m in r)) for label, r in runs.items()}
    size = sum(p.stat().st_size for p in paths)
    return {
        "series": name,
        "inputs": len(paths),
        "input_bytes": size,
        "read_s": statistics.median(reads),
        "write_s": statistics.median(writes),
        "cold": cold,
        "median": median,
        "device": device,
        "host_to_device_gb_s": host_to_device_rates() if device == "cuda" else None,
    }


def report(result: dict) -> None:
    median = result["median"]
    floor_s, floor_mb = median["floor"]
    tiny_s, tiny_mb = median["tiny"]
    naive_s, _ = median["naive"]
    cache = "cold: evicted before each run" if result["cold"] else "page cache hot"
    limit = floor_s + max(result["read_s"], result["write_s"])
    print(
        f"\n{result['series']}: {result['inputs']} checkpoints, {result['input_bytes'] / 1e9:.2f} GB "
        f"({cache}); "
        f"reading every input byte once: {result['read_s']:.2f} s; writing and fsyncing the output's bytes: "
        f"{result['write_s']:.2f} s; limit = floor + max of the two = {limit:.2f} s"
    )
    print(f"{'command':<20}{'wall s':>8}{'anon MB':>9}{'vs naive':>10}{'anon over tiny':>16}")
    for label, (wall, anon) in median.items():
        print(f"{label:<20}{wall:8.2f}{anon:9.0f}{wall / naive_s:9.2f}x{anon - tiny_mb:14.0f} MB")
    print(
        f"floor = python -c 'import torch, safetensors' ({floor_s:.2f} s, {floor_mb:.0f} MB); "
        f"tiny = ckptavg's fixed start-up ({tiny_s:.2f} s, {tiny_mb:.0f} MB)"
    )
    for label in (label for label in median if label.startswith("ckptavg")):
        print(f"{label}: {median[label][0] / limit:.2f}x the limit")
        if label.endswith("--device cuda"):
            pinned, pageable = result["host_to_device_gb_s"]
            rate = result["input_bytes"] / (median[label][0] - tiny_s) / 1e9
            print(
                f"{label}: {rate:.1f} GB/s of input after start-up; host-to-device copies measured in "
                f"this run: {pinned:.1f} GB/s pinned, {pageable:.1f} GB/s pageable"
            )
        over = median[label][1] - tiny_mb
        verdict = "within" if over <= MEMORY_BOUND_MB else "OVER"
        print(
            f"{label}: peak anonymous memory {over:.0f} MB over start-up, "
            f"{verdict} the {MEMORY_BOUND_MB} MB bound"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--series", default="llm,resnet,torch")
    parser.add_argument(
        "--cold", action="store_true", help="evict the inputs from the page cache before each run"
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="also time --device cuda"
    )
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    import platform

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"device: {describe_device(device)}")
    results = []
    for name in args.series.split(","):
        result = bench_series(name, args.rounds, RESULTS, cold=args.cold, device=device)
        report(result)
        results.append(result)
    (RESULTS / "bench_average.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
