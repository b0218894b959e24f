import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from conftest import require_o_direct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptavg.errors import OutputError
from ckptavg.formats.dtypes import safetensors_name
from ckptavg.formats.safetensors_header import Entry, layout_order
from ckptavg.run import direct
from ckptavg.run.transaction import OutputTransaction
from ckptavg.run.writer import SafetensorsWriter

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def sample(dtype, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


def write_dict(path, tensors, metadata=None):
    """Write a dict through the streaming writer, in safetensors' layout order."""
    entries = layout_order(Entry(n, safetensors_name(t.dtype), tuple(t.shape)) for n, t in tensors.items())
    writer = SafetensorsWriter(path, entries, metadata or {})
    for entry in entries:
        writer.write(entry.name, 0, tensors[entry.name].contiguous())
    writer.finish()


@pytest.fixture
def small_staging(monkeypatch):
    """One-page staging buffers: small tensors then take every path of `direct`."""
    monkeypatch.setattr(direct, "STAGING_BYTES", 4096)


def in_chunks(writer, name, tensor, elements):
    """Write `tensor` into `name` piece by piece, as the engine hands out chunks."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), elements):
        writer.write(name, start * flat.element_size(), flat[start : start + elements])


def header(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


@pytest.mark.usefixtures("small_staging", "output_io")
class TestSafetensorsWriter:
    @pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
    def test_round_trip_every_dtype(self, tmp_path, dtype):
        tensors = {
            "matrix": sample(dtype, (3, 5)),
            "scalar": sample(dtype, ()),
            "empty": sample(dtype, (0, 4)),
            "vector": sample(dtype, (7,)),
        }
        write_dict(tmp_path / "out.safetensors", tensors, {"format": "pt"})
        loaded = load_file(tmp_path / "out.safetensors")
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == dtype and loaded[name].shape == tensor.shape
            assert torch.equal(
                loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            )

    def test_layout_matches_what_safetensors_writes(self, tmp_path):
        tensors = {
            "b.int": sample(torch.int64, (3,)),
            "a.half": sample(torch.float16, (5,)),
            "c.flag": sample(torch.bool, (3,)),
            "a.float": sample(torch.float32, (2, 3)),
            "z.bf16": sample(torch.bfloat16, (1,)),
            "u.fp8": sample(torch.float8_e4m3fn, (3,)),
            "y.u16": sample(torch.uint16, (2,)),
        }
        save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
        write_dict(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
        their_length, theirs = header(tmp_path / "theirs.safetensors")
        our_length, ours = header(tmp_path / "ours.safetensors")
        assert our_length % 8 == 0
        assert {n: v["data_offsets"] for n, v in ours.items() if n != "__metadata__"} == {
            n: v["data_offsets"] for n, v in theirs.items() if n != "__metadata__"
        }
        assert (tmp_path / "ours.safetensors").read_bytes()[8 + our_length :] == (
            tmp_path / "theirs.safetensors"
        ).read_bytes()[8 + their_length :]

    def test_metadata_is_kept(self, tmp_path):
        write_dict(
            tmp_path / "m.safetensors",
            {"x": torch.ones(2)},
            {"format": "pt", "ckptavg.method": "swa"},
        )
        with safe_open(tmp_path / "m.safetensors", "pt") as f:
            assert f.metadata() == {"format": "pt", "ckptavg.method": "swa"}

    def test_reserved_name_is_refused(self, tmp_path):
        with pytest.raises(OutputError, match="named '__metadata__', which safetensors reserves"):
            SafetensorsWriter(tmp_path / "x.safetensors", [Entry("__metadata__", "F32", (1,))], {})

    def test_writing_starts_no_other_process(self, tmp_path):
        """Starting writeback early must not cost a child process (ctypes' find_library runs ldconfig)."""
        script = f"""
import sys, torch, ckptavg.run.writer as writer
writer.WRITEBACK_BYTES = 1  # start writeback after every write
sys.addaudithook(lambda event, args: event.startswith(("subprocess", "os.fork", "os.posix_spawn"))
                 and sys.exit(f"started a process: {{event}} {{args}}"))
from pathlib import Path
from ckptavg.formats.safetensors_header import Entry
out = Path({str(tmp_path / "o.safetensors")!r})
w = writer.SafetensorsWriter(out, [Entry("t", "F32", (4,))], {{}})
w.write("t", 0, torch.ones(4))
w.finish()
"""
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert torch.equal(load_file(tmp_path / "o.safetensors")["t"], torch.ones(4))

    def test_short_data_is_an_error(self, tmp_path):
        writer = SafetensorsWriter(tmp_path / "x.safetensors", [Entry("x", "F32", (4,))], {})
        writer.write("x", 0, torch.ones(2))
        with pytest.raises(OutputError, match="wrote 8 of 16 data bytes"):
            writer.finish()
        writer.abort()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        st.dictionaries(
            st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
                lambda name: name != "__metadata__"
            ),
            st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 4), max_size=3)),
            max_size=6,
        )
    )
    def test_random_state_dicts_round_trip(self, tmp_path_factory, spec):
        path = tmp_path_factory.mktemp("prop") / "p.safetensors"
        tensors = {
            name: sample(dtype, tuple(shape), seed=i) for i, (name, (dtype, shape)) in enumerate(spec.items())
        }
        write_dict(path, tensors)
        loaded = load_file(path)
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
            assert torch.equal(
                loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            )


@pytest.mark.usefixtures("small_staging")
class TestWritingPastThePageCache:
    def test_writes_in_file_order_bypass_it(self, tmp_path):
        require_o_direct(tmp_path)
        tensors = {"a": sample(torch.float32, (3001,)), "b": sample(torch.bfloat16, (5003,), seed=1)}
        save_file(tensors, tmp_path / "theirs.safetensors")
        entries = layout_order(
            Entry(n, safetensors_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()
        )
        writer = SafetensorsWriter(tmp_path / "ours.safetensors", entries, {})
        for entry in entries:
            in_chunks(writer, entry.name, tensors[entry.name], 1000)
            assert writer.direct
        writer.finish()
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()

    def test_a_write_elsewhere_goes_through_it_from_then_on(self, tmp_path):
        require_o_direct(tmp_path)
        a, b = sample(torch.float32, (3001,)), sample(torch.float32, (10,), seed=1)
        writer = SafetensorsWriter(
            tmp_path / "x.safetensors", [Entry("a", "F32", (3001,)), Entry("b", "F32", (10,))], {}
        )
        writer.write("a", 0, a[:1500])
        assert writer.direct
        writer.write("b", 0, b)  # skips the rest of a, as a tied weight's copy does
        assert not writer.direct
        writer.write("a", 1500 * 4, a[1500:])
        writer.finish()
        loaded = load_file(tmp_path / "x.safetensors")
        assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)

    def test_abort_midway_closes_everything(self, tmp_path):
        require_o_direct(tmp_path)
        open_files = len(os.listdir("/proc/self/fd"))
        writer = SafetensorsWriter(tmp_path / "x.safetensors", [Entry("a", "F32", (30000,))], {})
        in_chunks(writer, "a", sample(torch.float32, (20000,)), 1000)
        writer.abort()
        assert len(os.listdir("/proc/self/fd")) == open_files


class TestOutputTransaction:
    def test_nothing_is_left_when_the_block_fails(self, tmp_path):
        target = tmp_path / "out.safetensors"
        with pytest.raises(RuntimeError), OutputTransaction(target, folder=False) as output:
            writer = output.safetensors(target.name, [Entry("x", "F32", (2,))], {})
            writer.write("x", 0, torch.ones(1))
            raise RuntimeError("boom")
        assert list(tmp_path.iterdir()) == []

    def test_existing_output_survives_a_failure(self, tmp_path):
        target = tmp_path / "out.safetensors"
        target.write_bytes(b"precious")
        with (
            pytest.raises(KeyboardInterrupt),
            OutputTransaction(target, folder=False, force=True) as output,
        ):
            output.safetensors(target.name, [Entry("x", "F32", (2,))], {})
            raise KeyboardInterrupt
        assert target.read_bytes() == b"precious"
        assert list(tmp_path.iterdir()) == [target]

    def test_existing_output_needs_force(self, tmp_path):
        target = tmp_path / "out.safetensors"
        target.write_bytes(b"precious")
        with pytest.raises(OutputError, match="already exists; pass `force`"):
            OutputTransaction(target, folder=False)

    def test_positioned_writes_in_any_order(self, tmp_path):
        entries = [Entry("a", "F32", (4,)), Entry("b", "F32", (2,))]
        writer = SafetensorsWriter(tmp_path / "x.safetensors", entries, {})
        writer.write("b", 0, torch.tensor([5.0, 6.0]))
        writer.write("a", 8, torch.tensor([3.0, 4.0]))
        writer.write("a", 0, torch.tensor([1.0, 2.0]))
        writer.finish()
        loaded = load_file(tmp_path / "x.safetensors")
        assert loaded["a"].tolist() == [1, 2, 3, 4] and loaded["b"].tolist() == [5, 6]

    def test_folder_with_foreign_files_is_never_replaced(self, tmp_path):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
        with pytest.raises(OutputError, match="holds files that ckptavg did not write"):
            OutputTransaction(tmp_path / "out", folder=True, force=True)

    def test_folder_commit_replaces_an_old_output_whole(self, tmp_path):
        target = tmp_path / "out"
        target.mkdir()
        write_dict(target / "model-00001-of-00002.safetensors", {"x": torch.ones(2)})
        (target / "model.safetensors.index.json").write_text('{"metadata": {"ckptavg.version": "0"}}')
        with OutputTransaction(target, folder=True, force=True) as output:
            write_dict(output.path_of("model.safetensors"), {"x": torch.ones(2)})
            output.commit()
        assert [p.name for p in target.iterdir()] == ["model.safetensors"]
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
