"""Damaged or unusual checkpoints through the real CLI: refused with one line, or read exactly."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fuzz_worker import model_state, rewrite_archive
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.cli import main

CLI = Path(sys.executable).with_name("ckptavg")


def refused(args, *fragments: str) -> str:
    """Run the CLI; it must exit 1 with one `error:` line holding every fragment, and write nothing."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0], lines
    for fragment in fragments:
        assert fragment in lines[0]
    if "-o" in args:
        out = Path(args[args.index("-o") + 1])
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if ".ckptavg-tmp" in p.name]
    return lines[0]


def saved(path: Path, content) -> Path:
    torch.save(content, path)
    return path


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    return model_state(seed)


class TestTorchArchives:
    def test_a_storage_record_shorter_than_its_tensor_is_refused(self, tmp_path):
        raw = saved(tmp_path / "a.pt", state()).read_bytes()
        weight_record = "a/data/0"  # torch.save numbers storages in order: conv.weight first
        short = rewrite_archive(raw, lambda name, data: data[:8] if name == weight_record else data)
        (tmp_path / "short.pt").write_bytes(short)
        good = saved(tmp_path / "good.pt", state(1))
        refused(
            ["swa", good, tmp_path / "short.pt", "-o", tmp_path / "o.safetensors"],
            "short.pt: tensor 'conv.weight' needs 432 bytes but its record 'data/0' holds 8",
        )

    def test_a_record_past_the_end_of_the_file_is_refused_before_reading(self, tmp_path):
        raw = bytearray(saved(tmp_path / "a.pt", state()).read_bytes())
        with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
            header = archive.getinfo("a/data/0").header_offset
        raw[header + 28 : header + 30] = (0xFFFF).to_bytes(2, "little")  # the local header's extra length
        (tmp_path / "long.pt").write_bytes(raw)
        refused(["inspect", tmp_path / "long.pt"], "long.pt: record 'data/0' ends at byte", "past the end")

    def test_a_compressed_tensor_record_is_refused(self, tmp_path):
        raw = saved(tmp_path / "a.pt", state()).read_bytes()
        (tmp_path / "z.pt").write_bytes(rewrite_archive(raw, lambda name, data: data, compress="a/data/0"))
        refused(["inspect", tmp_path / "z.pt"], "z.pt: record 'data/0' is compressed")

    @pytest.mark.parametrize(
        ("tensor", "says"),
        [
            (
                torch.eye(3).to_sparse(),
                "is a sparse tensor (sparse_coo), which ckptavg cannot average; save it dense",
            ),
            (torch.eye(3).to_sparse_csr(), "is a sparse tensor (sparse_csr)"),
            (torch.empty(3, 3, device="meta"), "is on the meta device"),
        ],
        ids=["sparse_coo", "sparse_csr", "meta"],
    )
    def test_tensors_that_cannot_be_averaged_are_named(self, tmp_path, tensor, says):
        good = saved(tmp_path / "good.pt", {**state(1), "w": torch.zeros(3, 3)})
        odd = saved(tmp_path / "odd.pt", {**state(), "w": tensor})
        refused(["inspect", odd], f"odd.pt: tensor 'w' {says}")
        refused(["swa", good, odd, "-o", tmp_path / "o.safetensors"], f"odd.pt: tensor 'w' {says}")

    def test_an_expanded_view_averages_as_its_values(self, tmp_path):
        """Saved views with stride 0 (transformers' expanded `position_ids` buffers) are ordinary tensors."""
        paths = [
            saved(tmp_path / f"{i}.pt", {**state(i), "w": torch.full((4,), float(i)).expand(3, 4)})
            for i in range(2)
        ]
        out = tmp_path / "o.safetensors"
        result = CliRunner().invoke(main, ["swa", *map(str, paths), "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        assert torch.equal(load_file(out)["w"], torch.full((3, 4), 0.5))

    @pytest.mark.filterwarnings("ignore::UserWarning")
    def test_a_quantized_tensor_is_named(self, tmp_path):
        quantized = torch.quantize_per_tensor(torch.rand(3, 3), 0.1, 0, torch.qint8)
        odd = saved(tmp_path / "odd.pt", {**state(), "w": quantized})
        refused(["inspect", odd], "odd.pt: tensor 'w' is a quantized tensor (torch.qint8)", "dequantize")

    def test_sparse_tensors_outside_the_weights_do_not_matter(self, tmp_path):
        content = {"state_dict": state(), "optimizer": {"grad": torch.eye(3).to_sparse()}}
        out = tmp_path / "o.safetensors"
        result = CliRunner().invoke(main, ["swa", str(saved(tmp_path / "a.pt", content)), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert load_file(out).keys() == state().keys()


class TestShapes:
    def test_a_zero_dimension_beside_a_huge_one_is_refused_in_safetensors(self, tmp_path):
        header = {
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "z": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [8, 8]},
        }
        path = write_safetensors(tmp_path / "z.safetensors", json.dumps(header), b"\0" * 8)
        says = "z.safetensors: tensor 'z' has shape [0, 4611686018427387904], too large"
        refused(["inspect", path], says)
        refused(["swa", path, "-o", tmp_path / "o.safetensors"], says)

    def test_a_zero_dimension_beside_a_huge_one_is_refused_in_torch_files(self, tmp_path):
        odd = saved(tmp_path / "odd.pt", {**state(), "empty": torch.empty(0, 2**62)})
        refused(["inspect", odd], "odd.pt: tensor 'empty' has shape [0, 4611686018427387904]")

    def test_a_name_listed_twice_in_a_safetensors_header_is_refused(self, tmp_path):
        entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
        path = write_safetensors(tmp_path / "d.safetensors", f'{{"a": {entry}, "a": {entry}}}', b"\0" * 4)
        refused(["inspect", path], "d.safetensors: not a readable safetensors file", "lists 'a' twice")


def write_safetensors(path: Path, header_text: str, data: bytes) -> Path:
    text = header_text.encode() + b" " * (-len(header_text.encode()) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


class TestFloat8:
    @pytest.fixture(params=["safetensors", "torch"])
    def series(self, request, tmp_path):
        torch.manual_seed(0)
        states = [
            {"e4m3": torch.randn(5, 7).to(torch.float8_e4m3fn), "e5m2": torch.randn(9).to(torch.float8_e5m2)}
            for _ in range(3)
        ]
        paths = []
        for i, content in enumerate(states):
            path = tmp_path / f"step_{i}.{'safetensors' if request.param == 'safetensors' else 'pt'}"
            save_file(content, path) if request.param == "safetensors" else torch.save(content, path)
            paths.append(path)
        return paths, states

    def test_float8_tensors_read_exactly(self, series):
        paths, states = series
        for path, expected in zip(paths, states, strict=True):
            with ckptavg.open_checkpoint(path) as ck:
                assert {n: i.dtype for n, i in ck.tensors.items()} == {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
                for name, tensor in expected.items():
                    assert ck.get(name).dtype == tensor.dtype
                    assert torch.equal(ck.get(name).view(torch.uint8), tensor.view(torch.uint8))
                if path.suffix == ".safetensors":
                    run = ck.get_run(["e4m3"])
                    assert torch.equal(run.view(torch.uint8), expected["e4m3"].reshape(-1).view(torch.uint8))

    def test_float8_averages_in_float32_and_keeps_its_dtype(self, series, tmp_path):
        paths, states = series
        out = tmp_path / "o.safetensors"
        result = CliRunner().invoke(main, ["swa", *map(str, paths), "-o", str(out)])
        assert result.exit_code == 0, result.output
        ours = load_file(out)
        for name in states[0]:
            expected = (sum(s[name].float() for s in states) / len(states)).to(states[0][name].dtype)
            assert ours[name].dtype == expected.dtype
            # the sums round differently from this oracle's: at most one float8 step apart
            step = torch.finfo(expected.dtype).eps
            torch.testing.assert_close(ours[name].float(), expected.float(), rtol=step, atol=1e-3)


class TestCircularSymlinks:
    def test_a_shard_that_loops_is_named(self, tmp_path):
        folder = tmp_path / "model"
        folder.mkdir()
        save_file({"a": torch.ones(2)}, folder / "part-1.safetensors")
        os.symlink(folder / "part-2.safetensors", folder / "part-2.safetensors")
        index = {"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        refused(
            ["inspect", folder / "model.safetensors.index.json"],
            "names shard part-2.safetensors, a symlink that loops back on itself (circular)",
        )

    def test_an_input_that_loops_is_one_line_from_the_installed_command(self, tmp_path):
        os.symlink(tmp_path / "loop.safetensors", tmp_path / "loop.safetensors")
        done = subprocess.run(
            [CLI, "swa", tmp_path / "loop.safetensors", "-o", tmp_path / "o.safetensors"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.splitlines() == [done.stderr.strip()]
        assert done.stderr.startswith(f"error: {tmp_path / 'loop.safetensors'}:")
        assert not (tmp_path / "o.safetensors").exists()
