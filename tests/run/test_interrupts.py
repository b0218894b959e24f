"""Signals and deaths of the installed command: honoured always, one line, nothing left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import temp_files
from safetensors.torch import load_file, save_file

CKPTAVG = Path(sys.executable).with_name("ckptavg")
pytestmark = pytest.mark.usefixtures("ckptavg_command")

# torch's C++ code clears any exception raised while it imports numpy: a Ctrl-C or SIGTERM
# landing there was lost. This stands in for it: a library call that swallows the interrupt.
SWALLOWING_LIBRARY = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch

    original = torch.frombuffer

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.{signal})
            time.sleep(1)
        except BaseException:
            pass
        return original(*args, **kwargs)

    torch.frombuffer = swallowing
    sys.argv = ["ckptavg", *sys.argv[1:]]
    from ckptavg.cli import run
    run()
    """
)


@pytest.fixture
def small(tmp_path):
    paths = [tmp_path / f"s{i}.safetensors" for i in range(2)]
    for i, path in enumerate(paths):
        save_file({"w": torch.full((64,), float(i))}, path)
    return paths


@pytest.mark.parametrize("signum, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_swallowed_interrupt_is_still_honoured(tmp_path, small, signum, code):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"the previous average")
    script = SWALLOWING_LIBRARY.format(signal=signum)
    done = subprocess.run(
        [sys.executable, "-c", script, "swa", *map(str, small), "-o", str(out), "--force", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().endswith("nothing was written") and "Traceback" not in done.stderr
    assert out.read_bytes() == b"the previous average"
    assert temp_files(tmp_path) == []


def start(args, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [CKPTAVG, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )


def wait_for_temporaries(folder: Path, process: subprocess.Popen, written: int = 0) -> None:
    """Until the run's temporary output exists (and holds `written` bytes), or the run ends."""
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if any(path.is_file() and path.stat().st_size >= written for path in temp_files(folder)):
            return
        time.sleep(0.001)


@pytest.mark.parametrize("written_mb", [1, 64, 256])
def test_an_input_truncated_while_read_is_one_line(tmp_path, large_inputs, written_mb):
    """A page past the new end of a mapped file is SIGBUS: the supervising parent reports it."""
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(large_inputs[2].read_bytes())
    out = tmp_path / "o.safetensors"
    process = start(["swa", large_inputs[0], large_inputs[1], victim, "-o", out, "-q"])
    wait_for_temporaries(tmp_path, process, written=written_mb * 2**20)  # part of the average written
    assert process.poll() is None, "the run ended before the input could be truncated"
    os.truncate(victim, 4096)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {victim}: changed while"), stderr
    assert not out.exists() and temp_files(tmp_path) == []


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, large_inputs):
    out = tmp_path / "o.safetensors"
    process = start(["swa", *large_inputs, "-o", out, "-q"], start_new_session=True)
    wait_for_temporaries(tmp_path, process)
    os.killpg(process.pid, signal.SIGKILL)  # parent and child: nobody left to clean up
    process.communicate(timeout=60)
    assert temp_files(tmp_path), "the killed run left no temporary file to clean"
    done = subprocess.run(
        [CKPTAVG, "swa", *large_inputs[:2], "-o", out, "-q"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert temp_files(tmp_path) == []
    assert load_file(out)["w"][0, 0].item() == 0.5


def test_sigterm_to_the_command_reaches_the_work_and_cleans_up(tmp_path, large_inputs):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"the previous average")
    process = start(["swa", *large_inputs, "-o", out, "--force", "-q"])
    wait_for_temporaries(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal landed")
    assert process.returncode == 143, stderr
    assert stderr.strip() == "terminated: nothing was written"
    assert out.read_bytes() == b"the previous average" and temp_files(tmp_path) == []
