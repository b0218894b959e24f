"""Runs under torchrun (gloo, CPU): two processes, or two "nodes" on this machine, give outputs
byte-identical to a single process; a failing, killed or interrupted rank leaves nothing behind."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from ckptavg.errors import RankError
from ckptavg.run import distributed
from ckptavg.run.split import shares

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("torchrun_worker.py")
LIMIT = 60  # seconds any one launch may take: a hang fails the test instead of blocking CI

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")


def _series(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        state = {
            "a.weight": torch.randn(300, 70, generator=g),
            "b.bias": torch.randn(513, generator=g).to(torch.bfloat16),
            "c.steps": torch.tensor([i]),
            "d.weight": torch.randn(64, 40, generator=g),
        }
        path = folder / f"step_{i + 1}.safetensors"
        save_file(state, path, metadata={"format": "pt"})
        paths.append(path)
    return paths


def _env(**extra) -> dict:
    env = {**os.environ, "CKPTAVG_DIST_TIMEOUT": "20", "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def _single(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptavg", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )


def _torchrun(args: list[str], cwd: Path, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), str(WORKER), *args]
    return subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=LIMIT)


@functools.cache
def _rendezvous_store():
    """The c10d rendezvous store of the two-node launches, hosted here for the whole session: its port
    is listening before any agent starts and never released, so nothing else can take it in between
    (a port found free and closed can be, before an agent binds it)."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)


def _two_nodes(args: list[str], cwds: tuple[Path, Path], **env) -> list[subprocess.Popen]:
    """Two agents of one rendezvous (a fresh id each launch), both clients of `_rendezvous_store`.
    Each has its own local address: no host name looked up, and ranks (ordered by address, then
    pid, which wraps) always put node 0 first."""
    port, run = _rendezvous_store().port, uuid.uuid4().hex
    return [
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                run,
                "--rdzv-conf",
                "is_host=0",
                "--local-addr",
                f"127.0.0.{node + 1}",
                "--max-restarts",
                "0",
                str(WORKER),
                *args,
            ],
            cwd=cwd,
            env=_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node, cwd in enumerate(cwds)
    ]


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"a launch did not end within {LIMIT} s: {err[-2000:]}")
        results.append((process.returncode, out + err))
    return results


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("error:", "terminated", "interrupted"))]


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".ckptavg-tmp" in p.name]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return _series(tmp_path_factory.mktemp("series"))


@pytest.mark.parametrize(
    ("args", "outputs"),
    [
        (["swa", "-o", "out.safetensors"], ["out.safetensors"]),
        (["ema", "--decay", "0.8", "-o", "out/", "--max-shard-size", "40kB"], ["out"]),
        (
            ["ema", "--sigma-rel", "0.1", "--sigma-rel", "0.2", "-o", "ema_{sigma_rel}.safetensors"],
            ["ema_0.1.safetensors", "ema_0.2.safetensors"],
        ),
        (["swa", "-o", "out.pt"], ["out.pt"]),
    ],
    ids=["swa-file", "ema-shards", "sigma-rel-two", "torch-file"],
)
def test_two_processes_write_what_one_writes(tmp_path, series, args, outputs):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    inputs = [str(p) for p in series]
    done = _single([args[0], *inputs, *args[1:]], one)
    assert done.returncode == 0, done.stderr
    done = _torchrun([args[0], *inputs, *args[1:]], two)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == len(outputs)  # rank 0 alone speaks
    for name in outputs:
        mine, theirs = (
            sorted((one / name).rglob("*")) or [one / name],
            sorted((two / name).rglob("*")) or [two / name],
        )
        assert [p.relative_to(one) for p in mine] == [p.relative_to(two) for p in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert a.read_bytes() == b.read_bytes(), a.name
    if args[2:3] == ["out/"]:
        assert len(list((two / "out").glob("*.safetensors"))) > 1
    assert _temporaries(two) == []


def test_the_library_inside_a_group_its_caller_set_up(tmp_path, series):
    one = tmp_path / "one.safetensors"
    assert _single(["swa", *map(str, series), "-o", str(one)], tmp_path).returncode == 0
    script = WORKER.with_name("library_in_group_worker.py")
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(tmp_path / "two.safetensors"),
    ]
    command += map(str, series)
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "two.safetensors").read_bytes() == one.read_bytes()
    assert _temporaries(tmp_path) == []


def test_dry_run_says_what_each_rank_reads_and_writes(tmp_path, series):
    done = _torchrun(
        ["swa", *map(str, series), "-o", "x/", "--max-shard-size", "40kB", "--dry-run"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "under torchrun: 2 ranks" in done.stdout
    assert "rank 0 (" in done.stdout and "rank 1 (" in done.stdout
    assert not (tmp_path / "x").exists()


def test_a_batchnorm_pass_is_refused_in_one_line(tmp_path, series):
    done = _torchrun(
        ["bn-update", str(series[0]), "--model", "torch.nn:Identity", "--data", str(tmp_path), "-o", "o.pt"],
        tmp_path,
    )
    assert done.returncode != 0
    said = [line for line in (done.stdout + done.stderr).splitlines() if "runs in one process" in line]
    assert said == ["Error: bn-update runs in one process: run it without torchrun"], done.stderr
    assert not (tmp_path / "o.pt").exists()


# How torch's launcher says the two agents did not meet (the store's port can no longer be taken
# by another process, see `_rendezvous_store`; an agent slow to start on a loaded machine still
# could): the launch is made again, once.
_RENDEZVOUS_FAILED = ("RendezvousError", "RendezvousConnectionError", "RendezvousTimeoutError", "EADDRINUSE")


def test_two_nodes_by_rendezvous(tmp_path, series):
    args = ["swa", *map(str, series), "-o", str(tmp_path / "out.safetensors")]
    results = _finish(_two_nodes(args, (tmp_path, tmp_path)))
    if any(code != 0 and any(word in text for word in _RENDEZVOUS_FAILED) for code, text in results):
        results = _finish(_two_nodes(args, (tmp_path, tmp_path)))
    assert [code for code, _ in results] == [0, 0], results
    assert (
        _single(["swa", *map(str, series), "-o", str(tmp_path / "one.safetensors")], tmp_path).returncode == 0
    )
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()


def _nodes_one_cannot_read(tmp_path: Path, series: list[Path]) -> tuple[Path, Path]:
    """Two nodes' folders holding the series under in/, the second with a damaged step_2."""
    good, bad = tmp_path / "node0", tmp_path / "node1"
    for folder in (good, bad):
        (folder / "in").mkdir(parents=True)
        for path in series:
            (folder / "in" / path.name).write_bytes(path.read_bytes())
    (bad / "in" / "step_2.safetensors").write_bytes(b"not a checkpoint")
    return good, bad


def _previous_output(folder: Path) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out.safetensors").write_bytes(b"previous")  # not ckptavg's: kept unless --force
    return b"previous"


def test_an_input_one_rank_cannot_read(tmp_path, series):
    good, bad = _nodes_one_cannot_read(tmp_path, series)
    output = tmp_path / "shared"
    previous = _previous_output(output)
    started = time.monotonic()
    results = _finish(
        _two_nodes(["swa", "in/*.safetensors", "-o", str(output / "out.safetensors"), "--force"], (good, bad))
    )
    assert all(code != 0 for code, _ in results)
    assert time.monotonic() - started < LIMIT
    lines = _error_lines(results[0][1])
    assert len(lines) == 1 and "rank 1" in lines[0] and "step_2.safetensors" in lines[0], results[0][1]
    assert (output / "out.safetensors").read_bytes() == previous
    assert _temporaries(tmp_path) == []


def test_an_output_only_one_rank_sees(tmp_path, series):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    results = _finish(_two_nodes(["swa", *map(str, series), "-o", "out/avg.safetensors"], (node0, node1)))
    assert all(code != 0 for code, _ in results)
    lines = _error_lines(results[0][1])
    assert len(lines) == 1 and "rank 1" in lines[0] and "share" in lines[0], results[0][1]
    assert not (node0 / "out" / "avg.safetensors").exists()
    assert _temporaries(tmp_path) == []


def _stalled_launch(tmp_path: Path, series: list[Path], output: Path):
    flag = tmp_path / "stalled"
    process = subprocess.Popen(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(WORKER),
            "swa",
            *map(str, series),
            "-o",
            str(output),
            "--force",
        ],
        cwd=tmp_path,
        env=_env(CKPTAVG_TEST_STALL_RANK="1", CKPTAVG_TEST_STALLED=str(flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + LIMIT
    while not flag.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    return process, int(flag.read_text())


@pytest.mark.parametrize("how", ["sigkill-rank", "sigterm-launcher"])
def test_a_rank_killed_or_the_launcher_stopped_mid_run(tmp_path, series, how):
    output = tmp_path / "shared" / "out.safetensors"
    previous = _previous_output(output.parent)
    process, pid = _stalled_launch(tmp_path, series, output)
    started = time.monotonic()
    if how == "sigkill-rank":
        os.kill(pid, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGTERM)
    ((code, text),) = _finish([process])
    assert code != 0
    assert time.monotonic() - started < 40, text
    assert output.read_bytes() == previous
    assert _temporaries(tmp_path) == []
    assert "Traceback" not in "\n".join(_error_lines(text))


def test_the_split_is_balanced_by_bytes_and_covers_everything(series):
    from ckptavg.api import open_checkpoints
    from ckptavg.plan.plan import build_plan
    from ckptavg.plan.spans import spans
    from ckptavg.schedules import swa

    with open_checkpoints(series) as checkpoints:
        plan = build_plan(checkpoints, swa(), output="x.safetensors")
        work = spans(plan)
        for ranks in (1, 2, 3, 7):
            found = shares(plan, work, ranks)
            assert sum(s.reads for s in found) == plan.bytes_to_read
            assert max(s.reads for s in found) - min(s.reads for s in found) <= 2 * 3 * 8
            covered = {}
            for share in found:
                for part in share.spans:
                    covered.setdefault(part.name, []).append((part.start, part.end))
            for span in work:
                pieces = sorted(covered[span.name])
                assert pieces[0][0] == 0 and pieces[-1][1] == span.numel
                assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


def test_a_single_process_never_joins_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    with distributed.joined() as group:
        assert group is None
    assert issubclass(RankError, Exception)


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """Where the single process and the two ranks run."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    return one, two


def _ranges(log: Path) -> dict[str, list[tuple[int, int]]]:
    """The byte ranges of each object a process fetched, merged where they touch or overlap."""
    found: dict[str, list[tuple[int, int]]] = {}
    for line in log.read_text().splitlines() if log.exists() else ():
        path, begin, end = line.split()
        found.setdefault(path, []).append((int(begin), int(end)))
    return {path: _ranges_union(ranges) for path, ranges in found.items()}


def test_each_rank_fetches_only_its_share_of_remote_inputs(tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3_server import s3_server

    with s3_server() as (fs, options):
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            state = {
                "big.weight": torch.randn(3_000_000, generator=g),
                "small.bias": torch.randn(700, generator=g),
            }
            fs.pipe(f"runs/dist/step_{i + 1}.safetensors", save(state, metadata={"format": "pt"}))
        args = [
            "swa",
            "s3://runs/dist/*.safetensors",
            "--storage-options",
            json.dumps(options),
            "-o",
            "out.safetensors",
        ]
        one, two = _folders(tmp_path)
        log = tmp_path / "ranges"
        done = subprocess.run(
            [sys.executable, str(WORKER), *args],
            cwd=one,
            env=_env(CKPTAVG_TEST_RANGE_LOG=str(log)),
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
        assert done.returncode == 0, done.stderr
        done = _torchrun(args, two, CKPTAVG_TEST_RANGE_LOG=str(log))
        assert done.returncode == 0, done.stderr
    assert (two / "out.safetensors").read_bytes() == (one / "out.safetensors").read_bytes()
    single, first, second = (_ranges(Path(f"{log}.{who}")) for who in ("single", "0", "1"))
    assert first and second
    for path, ranges in single.items():
        theirs = sorted(first.get(path, []) + second.get(path, []))
        overlaps = [(a, b) for a, b in itertools.pairwise(theirs) if b[0] < a[1]]
        assert overlaps == [], f"{path}: bytes fetched by both ranks"
        assert _ranges_union(theirs) == ranges  # together, exactly what one process fetches


def _ranges_union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def test_remote_torch_files_downloaded_by_each_rank(tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import io

    from s3_server import s3_server

    with s3_server() as (fs, options):
        for i, path in enumerate(_series(tmp_path / "local")):
            state = load_file(path)
            buffer = io.BytesIO()
            torch.save({"state_dict": state, "epoch": i}, buffer)
            fs.pipe(f"runs/torch/epoch_{i}.pt", buffer.getvalue())
        args = [
            "swa",
            "s3://runs/torch/*.pt",
            "--storage-options",
            json.dumps(options),
            "-o",
            "out.safetensors",
        ]
        one, two = _folders(tmp_path)
        done = _single(args, one)
        assert done.returncode == 0, done.stderr
        (tmp_path / "tmp").mkdir()
        done = _torchrun(args, two, TMPDIR=str(tmp_path / "tmp"))
        assert done.returncode == 0, done.stderr
    assert (two / "out.safetensors").read_bytes() == (one / "out.safetensors").read_bytes()
    assert list((tmp_path / "tmp").glob("ckptavg-*")) == []  # each rank's download folder removed
