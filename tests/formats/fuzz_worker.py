"""Fuzz worker: mutates valid checkpoints and runs each mutant through the real CLI, in this process.

`tests/test_fuzz.py` runs it in a subprocess, so that a crash or a hang of ckptavg
shows as the case that caused it. Each case is made from `--seed` and its number
alone, so one command reproduces it (and `--keep` leaves its files behind):

    .venv/bin/python tests/formats/fuzz_worker.py --seed 0 --cases 17 --keep /tmp/case17

Protocol on stdout: one JSON object per line: `{"ready": true}` once imported,
then per case `{"case": n, "started": true}` and `{"case": n, "mutation": ..., "problems": [...]}`.
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import random
import re
import shutil
import struct
import sys
import tempfile
import traceback
import zipfile
from functools import cache
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptavg.cli import main

ODD_NAMES = ("w\nerror: forged", "w\r", "w\x00", "\x1b[31mw", "w\u2028", "w\u202e", "", "é漢字🙂", "n" * 5000)
HUGE = (2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30)
DTYPES = (
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "F4",
    "f32",
    "",
)
STORAGE_TYPES = tuple(
    f"{name}Storage".encode()
    for name in (
        "Double",
        "Half",
        "BFloat16",
        "Long",
        "Byte",
        "Bool",
        "QInt8",
        "ComplexFloat",
        "Untyped",
        "No",
    )
)
SUFFIXES = {"safetensors": ".safetensors", "torch": ".pt"}


def model_state(seed: int) -> dict[str, torch.Tensor]:
    """A small model's weights, in several dtypes, with a BatchNorm counter."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator),
        "bn.running_var": torch.rand(4, generator=generator),
        "bn.num_batches_tracked": torch.tensor(100 * (seed + 1)),
        "fc.weight": torch.randn(10, 4, generator=generator).half(),
        "fc.bias": torch.randn(10, generator=generator).bfloat16(),
    }


@cache
def valid_bytes(kind: str, seed: int) -> bytes:
    """A valid checkpoint file of the model, as bytes."""
    if kind == "torch":
        buffer = io.BytesIO()
        torch.save(model_state(seed), buffer)
        return buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        save_file(model_state(seed), f"{folder}/m.safetensors", metadata={"format": "pt", "step": "7"})
        return Path(folder, "m.safetensors").read_bytes()


# ---- safetensors mutations: each takes (rng, header dict, data bytes) and returns (file bytes, what it did)


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_safetensors(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + data


def tensor_names(header: dict) -> list[str]:
    return [name for name in header if name != "__metadata__"]


def mutate_offsets(rng, header, data):
    name = rng.choice(tensor_names(header))
    begin, end = header[name]["data_offsets"]
    other = header[rng.choice(tensor_names(header))]["data_offsets"]
    header[name]["data_offsets"] = rng.choice(
        [[begin + 1, end], [begin, end - 1], [end, begin], [0, 0], [begin, rng.choice(HUGE)], [-1, end],
         [begin], [begin, end, end], "x", [begin + 0.5, end], [rng.choice(HUGE), rng.choice(HUGE)], other,
         [begin, len(data) + 8]]
    )  # fmt: skip
    return join_safetensors(json.dumps(header).encode(), data), f"data_offsets of {name!r}"


def mutate_shape(rng, header, data):
    name = rng.choice(tensor_names(header))
    shape = header[name]["shape"]
    header[name]["shape"] = rng.choice(
        [[0, 2**62], [2**62, 4, 0], [0, 2**32, 2**32], [rng.choice(HUGE)], [-1], [], [1.5], ["4"],
         shape[::-1], [*shape, 1], [0], [*shape, 0], shape[1:], [2**32, 2**32], [[1]], None]
    )  # fmt: skip
    return join_safetensors(json.dumps(header).encode(), data), f"shape of {name!r}"


def mutate_dtype(rng, header, data):
    name = rng.choice(tensor_names(header))
    header[name]["dtype"] = rng.choice([*DTYPES, 5, None])
    return join_safetensors(json.dumps(header).encode(), data), f"dtype of {name!r}"


def mutate_entry(rng, header, data):
    name = rng.choice(tensor_names(header))
    field = rng.choice(["dtype", "shape", "data_offsets"])
    choice = rng.randrange(3)
    if choice == 0:
        del header[name][field]
    elif choice == 1:
        header[name]["extra"] = 1
    else:
        header[name] = rng.choice([[], "x", 3, None, {}])
    return join_safetensors(json.dumps(header).encode(), data), f"entry of {name!r} ({choice}, {field})"


def rename_tensor(rng, header, data):
    name = rng.choice(tensor_names(header))
    new = rng.choice([*ODD_NAMES, "__metadata__"])
    renamed = {(new if key == name else key): value for key, value in header.items()}
    return join_safetensors(json.dumps(renamed).encode(), data), f"{name!r} renamed to {new[:20]!r}"


def duplicate_key(rng, header, data):
    name = rng.choice([*tensor_names(header), "__metadata__"])
    text = json.dumps(header)
    copy = json.dumps({name: rng.choice(list(header.values()))})[1:-1]
    return join_safetensors(text[:-1].encode() + b", " + copy.encode() + b"}", data), f"{name!r} twice"


def mutate_metadata(rng, header, data):
    header["__metadata__"] = rng.choice(
        [{"a": 1}, {"a": None}, {"a": {"b": "c"}}, ["x"], "x", {"step": "1e400"}, {"step": "nan"},
         {"x\n": "y\x1b"}, {"k": "v" * 100_000}, {}, None]
    )  # fmt: skip
    return join_safetensors(json.dumps(header).encode(), data), "metadata"


def mutate_top_level(rng, header, data):
    choice = rng.choice([[], 3, {}, "x", None])
    return join_safetensors(json.dumps(choice).encode(), data), f"header {choice!r}"


def add_or_remove_tensor(rng, header, data):
    if rng.random() < 0.5:
        name = rng.choice(tensor_names(header))
        del header[name]
        return join_safetensors(json.dumps(header).encode(), data), f"{name!r} removed"
    header["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    return join_safetensors(json.dumps(header).encode(), data + b"\0\0\0\0"), "tensor added"


def mutate_header_text(rng, header, data):
    text = bytearray(json.dumps(header).encode())
    choice = rng.randrange(6)
    where = rng.randrange(len(text))
    if choice == 0:
        text = text[:where]
    elif choice == 1:
        text[where] = rng.randrange(256)
    elif choice == 2:
        text[where:where] = rng.choice(["\u2028", "\x00", "\xff", "é", "\\ud800", "🙂"]).encode(
            "utf-8", "surrogatepass"
        )
    elif choice == 3:
        numbers = list(re.finditer(rb"\d+", bytes(text)))
        number = rng.choice(numbers)
        new = rng.choice([b"1" * 400, b"1e400", b"-0", b"NaN", b"18446744073709551616", b"0.0"])
        text[number.start() : number.end()] = new
    elif choice == 4:
        text += rng.choice([b"\0\0\0\0", b"x", b"}"])
    else:
        text = b"\xef\xbb\xbf" + text
    return join_safetensors(bytes(text), data), f"header text edit {choice} at {where}"


def mutate_length_field(rng, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file_size = 8 + len(text) + len(data)
    length = rng.choice([0, 1, 7, len(text) - 1, len(text) + 1, len(text) + 8, file_size, file_size - 8,
                         2**63, 2**64 - 1, 100_000_001, rng.randrange(2**64)])  # fmt: skip
    return join_safetensors(text, data, length=length), f"header length {length}"


def truncate_or_extend(rng, header, data):
    raw = join_safetensors(json.dumps(header).encode(), data)
    if rng.random() < 0.7:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncated to {cut} bytes"
    return raw + b"\0" * rng.choice([1, 4, 8, 4096]), "bytes appended"


SAFETENSORS_MUTATIONS = (
    mutate_offsets, mutate_shape, mutate_dtype, mutate_entry, rename_tensor, duplicate_key, mutate_metadata,
    mutate_top_level, add_or_remove_tensor, mutate_header_text, mutate_length_field, truncate_or_extend,
)  # fmt: skip


# ---- torch archive mutations: each takes (rng, valid file bytes) and returns (file bytes, what it did)


def rewrite_archive(raw: bytes, change, compress: str | None = None) -> bytes:
    """The archive with each record's bytes passed through `change(name, data)` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = change(info.filename, source.read(info))
            if data is not None:
                method = zipfile.ZIP_DEFLATED if info.filename == compress else zipfile.ZIP_STORED
                target.writestr(info.filename, data, compress_type=method)
    return out.getvalue()


def record_names(raw: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return archive.namelist()


def mutate_pickle(rng, raw):
    choice = rng.randrange(5)

    def change(name, data):
        if not name.endswith("/data.pkl"):
            return data
        data = bytearray(data)
        where = rng.randrange(len(data))
        if choice == 0:
            data[where] = rng.randrange(256)
        elif choice == 1:
            del data[where : where + rng.randrange(1, 8)]
        elif choice == 2:
            data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif choice == 3:
            data = data[:where]
        else:
            for _ in range(rng.randrange(2, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    return rewrite_archive(raw, change), f"data.pkl edit {choice}"


def with_pickle(raw: bytes, edit) -> bytes:
    """The archive with `edit(data.pkl bytes)` in place of its pickle."""
    return rewrite_archive(raw, lambda name, data: edit(data) if name.endswith("/data.pkl") else data)


def mutate_pickle_number(rng, raw):
    """An integer of the pickle (a storage size, an offset, a dimension, a stride) set to another value
    of the same width, so that the pickle stays well formed."""
    widths = {"BININT1": (1, False), "BININT2": (2, False), "BININT": (4, True)}
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        pickle_bytes = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    numbers = [(op.name, at) for op, _, at in pickletools.genops(pickle_bytes) if op.name in widths]
    name, at = rng.choice(numbers)
    width, signed = widths[name]
    old = int.from_bytes(pickle_bytes[at + 1 : at + 1 + width], "little", signed=signed)
    low, high = (-(2 ** (8 * width - 1)), 2 ** (8 * width - 1) - 1) if signed else (0, 2 ** (8 * width) - 1)
    new = min(max(rng.choice([0, 1, old - 1, old + 1, old * 2, old // 2, high, low, -1]), low), high)

    def edit(data):
        return data[: at + 1] + new.to_bytes(width, "little", signed=signed) + data[at + 1 + width :]

    return with_pickle(raw, edit), f"pickle {name} at {at}: {old} -> {new}"


def mutate_storage_type(rng, raw):
    """A storage of another type than the tensor was saved with (the pickle names it by class)."""
    new = rng.choice(STORAGE_TYPES)
    return with_pickle(raw, lambda data: data.replace(b"FloatStorage", new, 1)), f"FloatStorage -> {new!r}"


def mutate_record(rng, raw):
    records = [name for name in record_names(raw) if "/data/" in name]
    target = rng.choice(records)
    choice = rng.randrange(6)
    if choice == 5:
        return rewrite_archive(raw, lambda name, data: data, compress=target), f"{target} compressed"

    def change(name, data):
        if name != target:
            return data
        return [data[: len(data) // 2], data + b"\0" * 64, None, b"", data[:-1], data][choice]

    renamed = rewrite_archive(raw, change)
    return renamed, f"{target} edit {choice}"


def zip_fields(raw: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, what) of the size, offset and count fields of the zip's headers and directory."""
    fields = []
    for match in re.finditer(rb"PK\x01\x02", raw):
        at = match.start()
        fields += [(at + 10, 2, "cd method"), (at + 16, 4, "cd crc"), (at + 20, 4, "cd compressed size"),
                   (at + 24, 4, "cd size"), (at + 28, 2, "cd name length"), (at + 30, 2, "cd extra length"),
                   (at + 42, 4, "cd header offset")]  # fmt: skip
    for match in re.finditer(rb"PK\x03\x04", raw):
        at = match.start()
        fields += [(at + 8, 2, "local method"), (at + 18, 4, "local compressed size"),
                   (at + 22, 4, "local size"), (at + 26, 2, "local name length"),
                   (at + 28, 2, "local extra length")]  # fmt: skip
    for match in re.finditer(rb"PK\x05\x06", raw):
        at = match.start()
        fields += [(at + 8, 2, "entries here"), (at + 10, 2, "entries"), (at + 12, 4, "cd length"),
                   (at + 16, 4, "cd offset")]  # fmt: skip
    return fields


def mutate_zip_field(rng, raw):
    at, width, what = rng.choice(zip_fields(raw))
    old = int.from_bytes(raw[at : at + width], "little")
    limit = 2 ** (8 * width) - 1
    new = rng.choice(
        [0, 1, old + 1, old - 1, old + 64, old - 64, old * 2, len(raw), limit, rng.randrange(limit)]
    )
    new = min(max(new, 0), limit)
    return raw[:at] + new.to_bytes(width, "little") + raw[at + width :], f"{what} at {at}: {old} -> {new}"


def truncate_archive(rng, raw):
    if rng.random() < 0.7:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncated to {cut} bytes"
    return raw + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "garbage appended"


def flip_archive_bytes(rng, raw):
    data = bytearray(raw)
    spots = [rng.randrange(len(data)) for _ in range(rng.randrange(1, 4))]
    for spot in spots:
        data[spot] = rng.randrange(256)
    return bytes(data), f"bytes at {spots} replaced"


TORCH_MUTATIONS = (
    mutate_pickle, mutate_pickle_number, mutate_pickle_number, mutate_storage_type, mutate_record,
    mutate_zip_field, mutate_zip_field, truncate_archive, flip_archive_bytes,
)  # fmt: skip


def make_mutant(seed: int, case: int) -> tuple[str, bytes, str]:
    """(format, mutant file bytes, what was done) for one case, from the seed and its number alone."""
    rng = random.Random(f"{seed}:{case}")
    kind = ("safetensors", "torch")[case % 2]
    raw = valid_bytes(kind, 0)
    if kind == "torch":
        mutation = rng.choice(TORCH_MUTATIONS)
        data, what = mutation(rng, raw)
    else:
        mutation = rng.choice(SAFETENSORS_MUTATIONS)
        header, tensor_bytes = split_safetensors(raw)
        data, what = mutation(rng, header, tensor_bytes)
    return kind, data, f"{kind}: {mutation.__name__}: {what}"


# ---- running a case


def judge(args: list[str], result, out: Path, writes: bool) -> list[str]:
    """What is wrong with one CLI run: it must succeed, or refuse with one `error:` line and write nothing."""
    command = " ".join(args[:1] + (["--dry-run"] if "--dry-run" in args else []))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        return [f"{command}: raised {type(result.exception).__name__}: {trace}"]
    leftovers = [p.name for p in out.parent.iterdir() if ".ckptavg-tmp" in p.name]
    if leftovers:
        return [f"{command}: left {leftovers}"]
    if result.exit_code == 0:
        if writes:
            try:
                load_file(out)
            except Exception as e:
                return [f"{command}: exit 0 but the output does not load: {e}"]
        elif out.exists():
            return [f"{command}: exit 0 and wrote {out.name}"]
        return []
    lines = result.stderr.splitlines()
    problems = []
    if result.exit_code != 1:
        problems.append(f"{command}: exit {result.exit_code}")
    if len(lines) != 1 or not lines[0].startswith("error:"):
        problems.append(f"{command}: stderr is not one error line: {result.stderr[:2000]!r}")
    elif lines[0].startswith("error: unexpected "):
        problems.append(f"{command}: {lines[0]}")
    if out.exists():
        problems.append(f"{command}: failed but wrote {out.name}")
    return problems


def safetensors_reads(path: Path) -> bool:
    """Whether safetensors itself loads the file: ckptavg must never read one it refuses."""
    try:
        load_file(path)
    except Exception:
        return False
    return True


def run_case(seed: int, case: int, folder: Path) -> dict:
    kind, data, what = make_mutant(seed, case)
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / f"good{SUFFIXES[kind]}"
    good.write_bytes(valid_bytes(kind, 1))
    mutant = folder / f"mutant{SUFFIXES[kind]}"
    mutant.write_bytes(data)
    out = folder / "out" / "avg.safetensors"
    out.parent.mkdir(exist_ok=True)
    problems, outcomes = [], []
    runs = (
        (["inspect", str(mutant)], False),
        (["swa", str(good), str(mutant), "-o", str(out), "--dry-run"], False),
        (["swa", str(good), str(mutant), "-o", str(out)], True),
    )
    for args, writes in runs:
        result = CliRunner().invoke(main, args)
        problems += judge(args, result, out, writes)
        outcomes.append(f"{result.exit_code} {result.stderr.strip()[:300]}")
        out.unlink(missing_ok=True)
    if kind == "safetensors" and not safetensors_reads(mutant) and outcomes[0].startswith("0 "):
        problems.append("inspect: read a file safetensors refuses (ckptavg parses headers itself)")
    return {"case": case, "mutation": what, "problems": problems, "outcomes": outcomes}


def report(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main_loop(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", required=True, help="comma-separated case numbers")
    parser.add_argument("--keep", type=Path, help="leave the files of each case in this folder")
    options = parser.parse_args(argv)
    root = options.keep or Path(tempfile.mkdtemp(prefix="ckptavg-fuzz-"))
    report({"ready": True})
    for case in (int(c) for c in options.cases.split(",") if c):
        report({"case": case, "started": True})
        folder = root / f"case{case}"
        report(run_case(options.seed, case, folder))
        if options.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    if options.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main_loop(sys.argv[1:])
