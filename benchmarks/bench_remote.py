"""Benchmark: `ckptavg swa` on a series in S3, against the same server's raw range-read rate.

Starts a moto S3 server on 127.0.0.1 in a process of its own (its CPU and memory stay out of the
processes measured), uploads COUNT safetensors checkpoints of SIZE MB of bf16 (Llama-like shapes:
two embeddings, attention and MLP matrices, norms), then measures, interleaved over rounds:
  floor:   python -c "import torch, safetensors" (what every torch program pays to start)
  raw N:   every input byte read by s3fs range requests of REMOTE_BLOCK_BYTES, N at a time, the data
           discarded (`fs.open(...)._fetch_range`, as ckptavg reads); raw 8 is the baseline
  local:   ckptavg swa on local copies of the same files (its output is the reference)
  ckptavg: ckptavg swa 's3://bench/series/*.safetensors' -o a local file, with --read-ahead and
           --remote-requests varied one at a time around the defaults (64MB, 8)
It reports median wall times, the input rate after start-up (input bytes / (wall - floor)) against
the raw rate, CPU seconds (the process's and its children's, and the server's meanwhile), and the
peak anonymous memory (RssAnon of the process, private dirty pages of its children, sampled every
20 ms; the median of the rounds' peaks) over the floor, against floor + 256 MB + the read-ahead. Every
remote output's tensors (names, dtypes, shapes, offsets and bytes) must equal the local one's.

moto's GET copies the whole object, and scans it, for every range request (its range handling
slices a full copy), which makes the server, not the reader, the limit. The benchmark's server
therefore answers a GET with a Range header from the byte range alone, as S3 does; --stock-moto
measures moto unchanged.

Not part of `make bench`: it needs the test extras (s3fs, moto[server]). From the repository root
(the ckptavg measured is the one `python -m ckptavg` imports there):
    .venv/bin/python benchmarks/bench_remote.py [--size 256] [--count 4] [--rounds 3]
        [--read-ahead 8MB,64MB,256MB] [--requests 1,2,8,16] [--stock-moto]
The series is generated once under benchmarks/data/remote/ and reused; results/bench_remote.json
holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_average import llama_layer_shapes, sampled_run, warm, write_time

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "remote"
RESULTS = HERE / "results"
PYTHON = sys.executable
BUCKET = "bench"
MEMORY_BOUND_MB = 256  # peak anonymous memory allowed over the start-up floor, beyond the read-ahead
ENV = {
    **os.environ,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,  # nothing of this machine's profiles
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1",
}


# ----------------------------------------------------------------------------- the series


def llm_state(megabytes: float, seed: int):
    """bf16 tensors of about `megabytes`, Llama-like: two embeddings, then layers of attention and
    MLP matrices with their norms."""
    import torch

    hidden, inter = 1024, 2816
    budget = int(megabytes * 1e6) // 2  # elements
    vocab = min(32000, max(256, budget // (4 * hidden)))  # the embeddings take at most half
    layer = 4 * hidden * hidden + 3 * inter * hidden + 2 * hidden
    layers = max(1, round((budget - 2 * vocab * hidden - hidden) / layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    shapes.update(llama_layer_shapes(layers, hidden, inter))
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in shapes.items()}


def ensure_series(megabytes: float, count: int) -> list[Path]:
    from safetensors.torch import save_file

    folder = DATA / f"{megabytes:g}mb"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"step_{i}.safetensors" for i in range(1, count + 1)]
    for i, path in enumerate(paths, 1):
        if not path.exists():
            print(f"generating {path}", file=sys.stderr, flush=True)
            save_file(llm_state(megabytes, i), path.with_suffix(".tmp"), metadata={"format": "pt"})
            path.with_suffix(".tmp").rename(path)
    return paths


# ----------------------------------------------------------------------------- the server


def serve(port: int, stock: bool) -> None:
    """Run moto's S3 server on 127.0.0.1:`port` until stdin closes."""
    from moto.server import ThreadedMotoServer

    if not stock:
        _ranged_gets()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()  # the parent closes it (or exits)
    server.stop()


def _ranged_gets() -> None:
    """Let moto answer a GET with one byte range from that range of the object alone.

    moto's `get_object` returns the whole value (a copy of the object) and the range is sliced
    from it afterwards; here, during a ranged GET, the value is a stand-in whose slices read
    only their bytes from the object's buffer.
    """
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    ranged = threading.local()
    whole = FakeKey.value

    class RangedValue:
        def __init__(self, key):
            self.key = key

        def __len__(self) -> int:
            return self.key.size

        def __bool__(self) -> bool:
            return self.key.size > 0

        def __getitem__(self, window: slice) -> bytes:
            start, stop, _ = window.indices(self.key.size)
            with self.key.lock:
                self.key._value_buffer.seek(start)
                return self.key._value_buffer.read(max(0, stop - start))

    def value(self):
        return RangedValue(self) if getattr(ranged, "on", False) else whole.fget(self)

    FakeKey.value = property(value, whole.fset)
    get_object = S3Response.get_object

    def ranged_get_object(self):
        spec = self.headers.get("range", "")
        simple = spec.startswith("bytes=") and "," not in spec and not spec.startswith("bytes=-")
        ranged.on = simple
        try:
            return get_object(self)
        finally:
            ranged.on = False

    S3Response.get_object = ranged_get_object


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(stock: bool) -> tuple[subprocess.Popen, dict]:
    port = free_port()
    server = subprocess.Popen(
        [PYTHON, __file__, "--serve", str(port), *(["--stock-moto"] if stock else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a line per request
        env=ENV,
    )
    if server.stdout.readline().strip() != b"ready":
        raise SystemExit("the moto server did not start")
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    return server, options


def upload(paths: list[Path], options: dict) -> tuple[list[str], float]:
    import s3fs

    os.environ.update({k: v for k, v in ENV.items() if k.startswith(("AWS_", "NO_PROXY"))})
    fs = s3fs.S3FileSystem(**options)
    fs.makedirs(BUCKET, exist_ok=True)
    start = time.perf_counter()
    urls = []
    for path in paths:
        fs.put_file(str(path), f"{BUCKET}/series/{path.name}")
        urls.append(f"s3://{BUCKET}/series/{path.name}")
    return urls, time.perf_counter() - start


# ----------------------------------------------------------------------------- raw reads


def raw_read(urls: list[str], options: dict, requests: int) -> None:
    """Read every byte of `urls` as ckptavg's reader does (s3fs file, `_fetch_range` of
    REMOTE_BLOCK_BYTES, `requests` at a time), discard it, and print the seconds it took."""
    import s3fs
    import safetensors  # noqa: F401  (the same start-up as the other processes)
    import torch  # noqa: F401

    from ckptavg.memory import REMOTE_BLOCK_BYTES

    fs = s3fs.S3FileSystem(**options)
    start = time.perf_counter()
    files = [fs.open(url, "rb", block_size=2**16, cache_type="readahead") for url in urls]
    blocks = [
        (f, begin, min(begin + REMOTE_BLOCK_BYTES, f.size))
        for f in files
        for begin in range(0, f.size, REMOTE_BLOCK_BYTES)
    ]
    read, in_flight = 0, deque()
    with ThreadPoolExecutor(requests) as pool:
        for f, begin, end in blocks:  # `requests` at a time, each block dropped once read
            in_flight.append(pool.submit(f._fetch_range, begin, end))
            if len(in_flight) >= requests:
                read += len(in_flight.popleft().result())
        while in_flight:
            read += len(in_flight.popleft().result())
    elapsed = time.perf_counter() - start
    if read != sum(f.size for f in files):
        raise SystemExit(f"read {read} bytes, expected {sum(f.size for f in files)}")
    print(json.dumps({"seconds": elapsed, "bytes": read}))


# ----------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU seconds of process `pid` (/proc), or of the reaped children of this one."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(command: list[str], server: int | None = None) -> tuple[float, float, str, float, float]:
    """Wall seconds, peak anonymous MB, stdout, CPU seconds of one run of `command` (its own and
    its children's) and CPU seconds of the `server` process meanwhile."""
    cpu, server_cpu = cpu_seconds(), cpu_seconds(server) if server else 0.0
    wall, peak, stdout = sampled_run(command, env=ENV)
    server_cpu = cpu_seconds(server) - server_cpu if server else 0.0
    return wall, peak, stdout.decode(), cpu_seconds() - cpu, server_cpu


def tensors_of(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's tensor table (without its metadata) and its data bytes."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        return header, f.read()


def same_tensors(a: Path, b: Path) -> bool:
    return tensors_of(a) == tensors_of(b)


def size_bytes(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def bench(args) -> dict:
    from ckptavg.memory import READ_AHEAD_BYTES, REMOTE_REQUESTS

    paths = ensure_series(args.size, args.count)
    input_bytes = sum(p.stat().st_size for p in paths)
    RESULTS.mkdir(parents=True, exist_ok=True)
    local_out = RESULTS / "remote-reference.safetensors"
    remote_out = RESULTS / "remote-out.safetensors"
    server, options = start_server(args.stock_moto)
    try:
        urls, upload_s = upload(paths, options)
        print(
            f"uploaded {len(urls)} objects, {input_bytes / 1e9:.2f} GB, in {upload_s:.1f} s "
            f"({'stock moto' if args.stock_moto else 'moto, ranged GETs read only their range'})",
            flush=True,
        )
        warm(paths)
        glob = f"s3://{BUCKET}/series/*.safetensors"
        storage = json.dumps(options)
        default_ahead = f"{READ_AHEAD_BYTES // 2**20}MB"

        def remote(ahead: str, requests: int) -> list[str]:
            return [
                *[PYTHON, "-m", "ckptavg", "swa", glob, "-o", str(remote_out), "--force", "-q"],
                *["--storage-options", storage, "--read-ahead", ahead, "--remote-requests", str(requests)],
            ]

        commands: dict[str, list[str]] = {
            "floor": [PYTHON, "-c", "import torch, safetensors"],
            "local": [
                PYTHON,
                "-m",
                "ckptavg",
                "swa",
                *map(str, paths),
                "-o",
                str(local_out),
                "--force",
                "-q",
            ],
        }
        for n in args.requests:
            commands[f"raw {n}"] = [PYTHON, __file__, "--raw-read", str(n), "--options", storage, *urls]
        configs = [(a, REMOTE_REQUESTS) for a in args.read_ahead] + [
            (default_ahead, n) for n in args.requests if n != REMOTE_REQUESTS
        ]
        configs = list(dict.fromkeys([(default_ahead, REMOTE_REQUESTS), *configs]))
        for ahead, n in configs:
            commands[f"ckptavg {ahead} {n}"] = remote(ahead, n)
        runs: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label in commands}
        raw_s: dict[str, list[float]] = {label: [] for label in commands if label.startswith("raw")}
        writes, checked = [], set()
        labels = list(commands)
        for r in range(args.rounds):
            writes.append(write_time(paths[0].stat().st_size, RESULTS))
            shift = r % len(labels)
            for label in labels[shift:] + labels[:shift]:  # interleaved, in a rotating order
                wall, anon, stdout, cpu, server_cpu = measure(commands[label], server.pid)
                runs[label].append((wall, anon, cpu, server_cpu))
                if label in raw_s:
                    raw_s[label].append(json.loads(stdout)["seconds"])
                if label.startswith("ckptavg") and label not in checked:
                    if not local_out.exists():
                        measure(commands["local"])
                    if not same_tensors(remote_out, local_out):
                        raise SystemExit(f"{label}: the output differs from the local run's")
                    checked.add(label)
                print(f"round {r + 1}: {label}: {wall:.2f} s, {anon:.0f} MB", file=sys.stderr, flush=True)
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "inputs": len(paths),
        "input_bytes": input_bytes,
        "output_bytes": paths[0].stat().st_size,
        "upload_s": upload_s,
        "write_s": statistics.median(writes),
        "stock_moto": args.stock_moto,
        "rounds": args.rounds,
        "median": {
            label: (
                statistics.median(w for w, *_ in r),
                statistics.median(m for _, m, *_ in r),  # a fork's copied pages can spike one sample
                statistics.median(c for *_, c, _ in r),
                statistics.median(c for *_, c in r),
            )
            for label, r in runs.items()
        },
        "raw_read_s": {label: statistics.median(s) for label, s in raw_s.items()},
        "configs": configs,
        "default": (default_ahead, REMOTE_REQUESTS),
    }


def report(result: dict) -> None:
    median, raw = result["median"], result["raw_read_s"]
    size = result["input_bytes"]
    floor_s, floor_mb, floor_cpu, _ = median["floor"]
    ahead, requests = result["default"]
    base = size / raw[f"raw {requests}"] / 1e9
    print(
        f"\n{result['inputs']} × {result['output_bytes'] / 1e6:.0f} MB bf16 in S3 (moto on 127.0.0.1"
        f"{', stock' if result['stock_moto'] else ''}), {size / 1e9:.2f} GB; median of {result['rounds']} "
        f"interleaved rounds; floor {floor_s:.2f} s, {floor_cpu:.2f} CPU s, {floor_mb:.0f} MB; writing and "
        f"fsyncing the output's bytes alone: {result['write_s']:.2f} s\n"
    )
    print(
        "| command | wall time | past the floor | input rate | × raw 8 | CPU past the floor (server's) "
        "| peak anonymous memory | over the floor (bound) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| start-up floor | {floor_s:.2f} s | | | | | {floor_mb:.0f} MB | |")

    def row(name: str, label: str, rate: float, bound: float | None = None) -> None:
        wall, anon, cpu, server_cpu = median[label]
        over = anon - floor_mb
        limit = "" if bound is None else f" ({bound:.0f}{'' if over <= bound else ', OVER'})"
        print(
            f"| {name} | {wall:.2f} s | {wall - floor_s:.2f} s | {rate:.2f} GB/s | {rate / base:.2f} "
            f"| {cpu - floor_cpu:.2f} s ({server_cpu:.2f} s) | {anon:.0f} MB | {over:.0f} MB{limit} |"
        )

    for label in (label for label in median if label.startswith("raw")):
        name = f"raw range reads, {label.split()[1]} at a time (read time {raw[label]:.2f} s)"
        row(name, label, size / raw[label] / 1e9)
    row("`ckptavg swa` local files, page cache hot", "local", size / (median["local"][0] - floor_s) / 1e9)
    for ahead, n in result["configs"]:
        label = f"ckptavg {ahead} {n}"
        name = f"`ckptavg swa 's3://…'` --read-ahead {ahead} --remote-requests {n}"
        bound = MEMORY_BOUND_MB + size_bytes(ahead) / 1e6
        row(name, label, size / (median[label][0] - floor_s) / 1e9, bound)
    print(
        "\ninput rate: raw, input bytes / read time; ckptavg, input bytes / (wall time - floor). CPU: user "
        "and system seconds of the process and its children, and of the server meanwhile. Every remote "
        "output's tensors equal the local run's."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=float, default=256, help="MB per checkpoint")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-ahead", default="8MB,64MB,256MB")
    parser.add_argument("--requests", default="1,2,8,16")
    parser.add_argument("--stock-moto", action="store_true", help="moto unchanged (whole-object GETs)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--raw-read", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("urls", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.stock_moto)
    if args.raw_read:
        return raw_read(args.urls, json.loads(args.options), args.raw_read)
    args.read_ahead = args.read_ahead.split(",")
    args.requests = [int(n) for n in args.requests.split(",")]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, python {platform.python_version()}")
    result = bench(args)
    report(result)
    (RESULTS / "bench_remote.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
