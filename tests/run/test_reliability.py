"""Every bad input gets one clear line, and no run loses or corrupts a file."""

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import missing, poisoned_series, save_series, temp_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import CkptavgError, InputError, NonFiniteError

CKPTAVG = Path(sys.executable).with_name("ckptavg")


def valid_bytes(state) -> bytes:
    return save(state, metadata={"format": "pt"})


def with_header(data: bytes, edit) -> bytes:
    """The file with its JSON header changed by `edit(header) -> header`, data unchanged."""
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + length]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def set_offsets(name, begin, end):
    def edit(header):
        header[name]["data_offsets"] = [begin, end]
        return header

    return edit


def corpus(states) -> dict:
    """name -> (file name, bytes) of malformed checkpoints, each a mistake seen in the wild."""
    good = valid_bytes(states[0])
    (length,) = struct.unpack("<Q", good[:8])
    first = json.loads(good[8 : 8 + length])
    name = "fc.weight"
    begin, end = first[name]["data_offsets"]
    return {
        "empty file": ("c.safetensors", b""),
        "shorter than 8 bytes": ("c.safetensors", b"\x01\x02\x03"),
        "header length beyond the file": ("c.safetensors", struct.pack("<Q", 10**6) + b"{}"),
        "header too large": ("c.safetensors", struct.pack("<Q", 2**40) + b"{}"),
        "bad JSON": ("c.safetensors", struct.pack("<Q", 8) + b"{not js}"),
        "non-UTF-8 header": ("c.safetensors", struct.pack("<Q", 8) + b'{"\xff\xfe": 1}'),
        "unknown dtype": (
            "c.safetensors",
            with_header(good, lambda h: {**h, name: {**h[name], "dtype": "F99"}}),
        ),
        "offsets with a gap": ("c.safetensors", with_header(good, set_offsets(name, begin + 4, end))),
        "offsets that overlap": ("c.safetensors", with_header(good, set_offsets(name, begin - 4, end - 4))),
        "data shorter than the header says": ("c.safetensors", good[:-16]),
        "data longer than the header says": ("c.safetensors", good + b"\0" * 16),
        "a torch file that is not one": ("c.pt", b"PK\x03\x04 not really a zip"),
    }


@pytest.fixture
def good_series(tmp_path, states):
    return save_series(tmp_path / "ckpts", states[:2])


class TestMalformedInputs:
    @pytest.mark.parametrize(
        "case", list(corpus([{"fc.weight": torch.ones(10, 4), "fc.bias": torch.ones(10)}]))
    )
    def test_one_line_no_output_no_temp_files(self, tmp_path, states, good_series, case):
        file_name, data = corpus(states)[case]
        bad = tmp_path / "ckpts" / file_name
        bad.write_bytes(data)
        out = tmp_path / "out" / "o.safetensors"
        result = CliRunner().invoke(main, ["swa", *map(str, good_series), str(bad), "-o", str(out)])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], result.output
        assert "Traceback" not in result.output
        assert not out.exists() and temp_files(tmp_path) == []

    def test_index_naming_a_missing_shard(self, tmp_path, good_series):
        folder = tmp_path / "sharded"
        folder.mkdir()
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"fc.weight": "gone.safetensors"}})
        )
        with pytest.raises(InputError, match=r"names shard gone\.safetensors, which does not exist"):
            ckptavg.average([folder, *good_series], ckptavg.swa(), out=tmp_path / "o.safetensors")

    def test_index_listing_a_tensor_twice(self, tmp_path, good_series):
        folder = tmp_path / "sharded"
        folder.mkdir()
        (folder / "model.safetensors.index.json").write_text(
            '{"weight_map": {"fc.weight": "a.safetensors", "fc.weight": "b.safetensors"}}'
        )
        with pytest.raises(InputError, match=r"tensor 'fc\.weight' is listed twice"):
            ckptavg.average([folder], ckptavg.swa(), out=tmp_path / "o.safetensors")

    def test_same_file_twice_warns_that_it_counts_twice(self, tmp_path, good_series):
        plan = ckptavg.average(
            [good_series[0], good_series[0], good_series[1]],
            ckptavg.swa(),
            out=tmp_path / "o.safetensors",
            keep_order=True,
        )
        assert any("is given twice" in w and "counts twice" in w for w in plan.warnings)

    def test_a_file_that_changes_while_read_is_refused(self, tmp_path, good_series):
        with ckptavg.open_checkpoints(good_series) as checkpoints:
            plan = ckptavg.build_plan(checkpoints, ckptavg.swa(), output=tmp_path / "o.safetensors")
            with open(good_series[1], "ab") as f:  # another process still writing it
                f.write(b"\0" * 64)
            with pytest.raises(InputError, match=r"step_2\.safetensors: changed while being read"):
                ckptavg.run_plan(plan)
        assert not (tmp_path / "o.safetensors").exists() and temp_files(tmp_path) == []

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
        st.integers(0, 10**6),
    )
    def test_random_corruptions_give_an_error_or_a_valid_result(self, tmp_path, states, edits, cut):
        data = bytearray(valid_bytes(states[0]))
        for position, value in edits:
            data[position % len(data)] = value
        if cut % 3 == 0:
            data = data[: cut % len(data)]
        bad = tmp_path / "corrupt.safetensors"
        good = tmp_path / "good.safetensors"
        bad.write_bytes(bytes(data))
        save_file(states[1], good)
        out = tmp_path / "o.safetensors"
        out.unlink(missing_ok=True)
        try:
            ckptavg.average([good, bad], ckptavg.swa(), out=out, keep_order=True)
        except CkptavgError as e:
            assert "\n" not in str(e)
            assert not out.exists()
        else:
            assert set(load_file(out)) == set(states[1])
        assert temp_files(tmp_path) == []


class TestNonFinite:
    def poisoned(self, tmp_path, states):
        return poisoned_series(tmp_path / "ckpts", states, "conv.weight", (0, 0, 0, 0))

    def test_error_names_checkpoint_and_tensor(self, tmp_path, states):
        paths = self.poisoned(tmp_path, states)
        with pytest.raises(
            NonFiniteError, match=r"step_3\.safetensors: tensor 'conv\.weight' holds NaN or Inf"
        ):
            ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "o.safetensors")
        assert not (tmp_path / "o.safetensors").exists()

    def test_warn_keeps_going(self, tmp_path, states):
        paths = self.poisoned(tmp_path, states)
        result = CliRunner().invoke(
            main, ["swa", *map(str, paths), "-o", str(tmp_path / "o.safetensors"), "--nonfinite", "warn"]
        )
        assert result.exit_code == 0, result.output
        assert "warning: " in result.output and "'conv.weight' holds NaN or Inf" in result.output
        assert torch.isnan(load_file(tmp_path / "o.safetensors")["conv.weight"]).any()

    def test_skip_checkpoint_drops_it_and_reweighs_the_rest(self, tmp_path, states):
        paths = self.poisoned(tmp_path, states)
        plan = ckptavg.average(
            paths, ckptavg.swa(), out=tmp_path / "o.safetensors", nonfinite="skip-checkpoint"
        )
        assert [ck.path for ck in plan.checkpoints] == [paths[0], paths[1], paths[3]]
        assert any(w.startswith(f"dropped {paths[2]}") for w in plan.warnings)
        ours = load_file(tmp_path / "o.safetensors")
        expected = (states[0]["fc.weight"] + states[1]["fc.weight"] + states[3]["fc.weight"]) / 3
        torch.testing.assert_close(ours["fc.weight"], expected)
        with ckptavg.open_checkpoint(tmp_path / "o.safetensors") as out:
            assert json.loads(out.metadata["ckptavg.dropped"])[0]["path"] == str(paths[2])
            assert len(json.loads(out.metadata["ckptavg.inputs"])) == 3

    def test_inf_in_a_single_checkpoint_copy(self, tmp_path, states):
        state = dict(states[0])
        state["fc.bias"] = torch.full((10,), float("inf"))
        save_file(state, tmp_path / "one.safetensors")
        with pytest.raises(NonFiniteError, match=r"'fc\.bias' holds NaN or Inf"):
            ckptavg.average([tmp_path / "one.safetensors"], ckptavg.swa(), out=tmp_path / "o.safetensors")


class TestOutputSafety:
    def test_symlinked_output_pointing_at_an_input_is_refused(self, tmp_path, good_series):
        link = tmp_path / "link.safetensors"
        link.symlink_to(good_series[0])
        before = good_series[0].read_bytes()
        with pytest.raises(ckptavg.OutputError, match="is an input"):
            ckptavg.average(good_series, ckptavg.swa(), out=link, force=True)
        assert good_series[0].read_bytes() == before

    def test_output_folder_that_cannot_be_created(self, tmp_path, good_series):
        (tmp_path / "a_file").write_text("x")
        result = CliRunner().invoke(
            main, ["swa", *map(str, good_series), "-o", str(tmp_path / "a_file" / "o.safetensors")]
        )
        assert result.exit_code == 1 and "cannot create the output here" in result.output
        assert temp_files(tmp_path) == []

    def test_full_disk(self, tmp_path, good_series):
        mount = tmp_path / "small"
        mount.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
        )
        if done.returncode != 0:
            missing(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
        try:
            big = {"w": torch.ones(64, 1024)}  # 256 kB: more than the file system holds
            save_file(big, tmp_path / "a.safetensors")
            save_file(big, tmp_path / "b.safetensors")
            (mount / "o.safetensors").write_bytes(b"previous")
            # The free-space check stops it before writing ...
            with pytest.raises(ckptavg.OutputError, match=r"only .* is free there"):
                ckptavg.average(
                    [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                    ckptavg.swa(),
                    out=mount / "o.safetensors",
                    force=True,
                )
            # ... and a disk that fills up while writing is caught too.
            import shutil

            real = shutil.disk_usage
            shutil.disk_usage = lambda path: real(path)._replace(free=10**9)
            try:
                with pytest.raises(ckptavg.OutputError, match="No space left on device"):
                    ckptavg.average(
                        [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                        ckptavg.swa(),
                        out=mount / "o.safetensors",
                        force=True,
                    )
            finally:
                shutil.disk_usage = real
            assert (mount / "o.safetensors").read_bytes() == b"previous"
            assert temp_files(mount) == []
        finally:
            subprocess.run(["umount", str(mount)], check=False)

    @pytest.mark.usefixtures("ckptavg_command")
    def test_a_write_refused_midway(self, tmp_path, output_io):
        """A file size limit (`ulimit -f`) stops the writes after 8 MB of a 24 MB output."""
        import resource

        inputs = [tmp_path / f"s{i}.safetensors" for i in range(2)]
        for i, path in enumerate(inputs):
            save_file({"w": torch.full((6, 2**20), float(i))}, path)
        out = tmp_path / "out" / "o.safetensors"
        out.parent.mkdir()
        out.write_bytes(b"the previous average")
        if output_io == "page-cache":  # the child process must write through the page cache too
            script = (
                "import os, sys; del os.O_DIRECT; from ckptavg.cli import run; sys.argv[0] = 'ckptavg'; run()"
            )
            command = [sys.executable, "-c", script]
        else:
            command = [CKPTAVG]
        limit = 8 * 2**20
        result = subprocess.run(
            [*command, "swa", *map(str, inputs), "-o", str(out), "--force"],
            capture_output=True,
            text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )
        assert result.returncode == 1, result.stderr
        assert f"error: {out}: write failed: File too large" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert out.read_bytes() == b"the previous average"
        assert temp_files(tmp_path) == []


@pytest.mark.usefixtures("ckptavg_command")
class TestSignals:
    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
    @pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
    def test_interrupted_run_keeps_the_previous_output(self, tmp_path, large_inputs, signum, delay):
        out = tmp_path / "o.safetensors"
        out.write_bytes(b"the previous average")
        process = subprocess.Popen(
            [CKPTAVG, "swa", *large_inputs, "-o", out, "--force"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not temp_files(tmp_path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        if process.returncode == 0:
            pytest.skip("the run finished before the signal landed")
        assert process.returncode == (130 if signum == signal.SIGINT else 143), stderr
        assert stderr.strip().endswith("nothing was written") and "Traceback" not in stderr
        assert out.read_bytes() == b"the previous average"
        assert temp_files(tmp_path) == []


INTERRUPT_AT_RANDOM = """
import faulthandler, random, signal
faulthandler.dump_traceback_later(50, exit=True)  # a hang shows where each thread waits
from ckptavg.run.pipeline import WriteQueue

def interrupt(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGALRM, interrupt)
released = []
for trial in range(1500):
    try:
        signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-5, 2e-3))
        with WriteQueue() as queue:
            for i in range(5000):
                queue.submit(lambda: None, release=lambda: released.append(1))
            queue.drain()
    except KeyboardInterrupt:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
print("ok", len(released) > 0)
"""


def test_an_interrupt_at_any_moment_never_deadlocks_the_writer_thread():
    """Ctrl-C raises between any two bytecodes; inside a Python-level lock that once hung the run."""
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPT_AT_RANDOM], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "True"]
    assert "Exception ignored" not in result.stderr
