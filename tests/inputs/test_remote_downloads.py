"""URL inputs read from a local copy: torch files, DCP folders saved by `dcp.save` and DeepSpeed folders
saved by DeepSpeed, in S3 (moto's server through s3fs), average exactly as the same local inputs do;
the temporary folder is gone after every run, a dry run downloads no weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import needed_module, perturbed_states, save_torch_shards
from s3_server import s3_server
from safetensors.torch import load_file

import ckptavg
from ckptavg import disk
from ckptavg.cli import main
from ckptavg.errors import InputError
from ckptavg.formats import remote_downloads
from ckptavg.options import OutputOptions, ReadOptions

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

FORMATS = Path(__file__).parents[1] / "formats"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as found:
        yield found


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """The system's temporary folder, as TMPDIR sets it: this test's own, to see what is left there."""
    import tempfile

    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def downloaded(monkeypatch):
    """The objects downloaded whole (URLs), and those copied for planning only."""
    seen = {"whole": [], "skeleton": []}
    download, skeleton = remote_downloads.PinnedObject.download, remote_downloads.PinnedObject.skeleton

    def whole(self, target, reader):
        seen["whole"].append(self.url)
        return download(self, target, reader)

    def planning(self, target, reader):
        fetched = skeleton(self, target, reader)
        seen["skeleton"].append((self.url, fetched, self.size))
        return fetched

    monkeypatch.setattr(remote_downloads.PinnedObject, "download", whole)
    monkeypatch.setattr(remote_downloads.PinnedObject, "skeleton", planning)
    return seen


def upload_folder(fs, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe(f"runs/{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


def averages(specs, out, options=None, **read):
    plans = ckptavg.average_many(
        [str(s) for s in specs],
        [ckptavg.ema(0.5)],
        read=ReadOptions(storage_options=options or {}, **read),
        output=OutputOptions(output=str(out)),
    )
    return plans[0], load_file(out)


def dry_run(specs, options, **read):
    plans = ckptavg.average_many(
        specs, [ckptavg.ema(0.5)], read=ReadOptions(storage_options=options, **read), dry_run=True
    )
    return plans[0]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def torch_files(s3, tmp_path_factory):
    """Lightning-style `.ckpt` files (weights under `state_dict` with a `model.` prefix, an epoch, hyper-
    parameters), in S3 and on disk."""
    fs, _ = s3
    local = tmp_path_factory.mktemp("torch")
    for epoch, state in enumerate(perturbed_states(3), 1):
        big = {f"model.big_{i}": torch.linspace(0, epoch, 100_000) + i for i in range(3)}
        content = {
            "state_dict": {**{f"model.{k}": v for k, v in state.items()}, **big},
            "val_loss": torch.tensor(1.0 / epoch),  # a scalar tensor, read when the file is opened
            "epoch": epoch,
            "global_step": 100 * epoch,
            "hyper_parameters": {"lr": 0.1},
        }
        torch.save(content, local / f"epoch={epoch}.ckpt")
    upload_folder(fs, local, "dl/torch")
    return local


@pytest.fixture(scope="module")
def dcp_run(s3, tmp_path_factory):
    """A torchtitan-style run of DCP folders saved by `dcp.save`, with a file that is not the
    checkpoint's beside each."""
    fs, _ = s3
    out = tmp_path_factory.mktemp("dcp")
    saved = subprocess.run(
        [sys.executable, str(FORMATS / "dcp_saver.py"), str(out), "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    run = out / "titan"
    upload_folder(fs, run, "dl/dcp")
    for step in ("step-10", "step-20", "step-30"):
        fs.pipe(f"runs/dl/dcp/{step}/notes.txt", b"not part of the checkpoint")
    return run


@pytest.fixture(scope="module")
def deepspeed_run(s3, tmp_path_factory):
    """ZeRO-2 and ZeRO-3 runs saved by DeepSpeed on two ranks (`global_stepN` folders, `latest`)."""
    needed_module("deepspeed")
    fs, _ = s3
    out = tmp_path_factory.mktemp("deepspeed")
    saved = subprocess.run(
        [sys.executable, str(FORMATS / "deepspeed_saver.py"), str(out), "2", "2,3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    for stage in (2, 3):
        upload_folder(fs, out / f"zero{stage}", f"dl/zero{stage}")
    return out


def test_torch_files_average_as_local_ones(s3, torch_files, tmp_path, private_tmp, downloaded, monkeypatch):
    _, options = s3
    monkeypatch.setattr(remote_downloads, "REMOTE_BLOCK_BYTES", 2**14)  # many blocks, the window full
    local_plan, local = averages(
        sorted(torch_files.glob("*.ckpt")), tmp_path / "local.safetensors", strip_prefix="model."
    )
    plan, remote = averages(
        ["s3://runs/dl/torch/*.ckpt"],
        tmp_path / "remote.safetensors",
        options,
        strip_prefix="model.",
        read_ahead="64KB",
    )
    assert_same(remote, local)
    assert len(downloaded["whole"]) == 3 and not downloaded["skeleton"]
    for checkpoint in plan.checkpoints:
        assert checkpoint.label.startswith("s3://runs/dl/torch/epoch=")
        assert "etag" in checkpoint.origin
        assert any(n.startswith("downloaded to a temporary folder first (") for n in checkpoint.notes)
    assert [ck.scalars.get("epoch") for ck in plan.checkpoints] == [1.0, 2.0, 3.0]
    assert [ck.scalars.get("val_loss") for ck in plan.checkpoints] == [
        pytest.approx(1 / e) for e in (1, 2, 3)
    ]
    assert [ck.notes[0] for ck in plan.checkpoints] == [ck.notes[0] for ck in local_plan.checkpoints]
    assert list(private_tmp.iterdir()) == []


def test_dry_run_downloads_no_weights(s3, torch_files, dcp_run, private_tmp, downloaded):
    _, options = s3
    planned = dry_run(["s3://runs/dl/torch/*.ckpt"], options, strip_prefix="model.")
    assert not downloaded["whole"] and len(downloaded["skeleton"]) == 3
    assert all(fetched < size / 20 for _, fetched, size in downloaded["skeleton"])  # no values
    local = dry_run([str(p) for p in sorted(torch_files.glob("*.ckpt"))], {}, strip_prefix="model.")
    for ck, here in zip(planned.checkpoints, local.checkpoints, strict=True):
        assert ck.tensors == here.tensors and ck.scalars == here.scalars
        assert "planned from its zip directory" in ck.notes[-1]
        assert "a run downloads it to a temporary folder first" in ck.notes[-1]

    planned = dry_run(["s3://runs/dl/dcp/"], options)
    assert downloaded["whole"] == [f"s3://runs/dl/dcp/step-{s}/.metadata" for s in (10, 20, 30)]
    local = dry_run([str(dcp_run)], {})
    for ck, here in zip(planned.checkpoints, local.checkpoints, strict=True):
        assert ck.tensors == here.tensors
        assert "planned from its .metadata" in ck.notes[-1]
    assert list(private_tmp.iterdir()) == []


def test_dcp_run_averages_as_local_one(s3, dcp_run, tmp_path, private_tmp, downloaded):
    _, options = s3
    _, local = averages([dcp_run], tmp_path / "local.safetensors")
    plan, remote = averages(["s3://runs/dl/dcp"], tmp_path / "remote.safetensors", options)
    assert_same(remote, local)
    assert [ck.label for ck in plan.checkpoints] == [f"s3://runs/dl/dcp/step-{s}" for s in (10, 20, 30)]
    names = {url.rsplit("/", 1)[1] for url in downloaded["whole"]}
    assert names == {".metadata", "__0_0.distcp"}  # never notes.txt
    assert all(any("downloaded to a temporary" in n for n in ck.notes) for ck in plan.checkpoints)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_run_averages_as_local_one(s3, deepspeed_run, stage, tmp_path, private_tmp, downloaded):
    _, options = s3
    _, local = averages([deepspeed_run / f"zero{stage}"], tmp_path / "local.safetensors")
    plan, remote = averages([f"s3://runs/dl/zero{stage}"], tmp_path / "remote.safetensors", options)
    assert_same(remote, local)
    assert [ck.label.rsplit("/", 1)[1] for ck in plan.checkpoints] == [
        "global_step1",
        "global_step2",
        "global_step3",
    ]
    names = {url.rsplit("/", 1)[1] for url in downloaded["whole"]}
    if stage == 2:  # the module's weights only: the optimizer's partitions are never fetched
        assert names == {"mp_rank_00_model_states.pt"}
    else:
        assert names == {
            f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
        }
    assert list(private_tmp.iterdir()) == []


def test_deepspeed_master_weights_and_dry_run(s3, deepspeed_run, tmp_path, downloaded):
    _, options = s3
    spec = "s3://runs/dl/zero2/global_step2"
    _, local = averages(
        [deepspeed_run / "zero2" / "global_step2"], tmp_path / "l.safetensors", master_weights=True
    )
    plan, remote = averages([spec], tmp_path / "r.safetensors", options, master_weights=True)
    assert_same(remote, local)
    assert any("optim_states" in url for url in downloaded["whole"])
    planned = dry_run([spec], options, master_weights=True)
    assert planned.checkpoints[0].tensors == plan.checkpoints[0].tensors
    assert "planned from its zip directories" in planned.checkpoints[0].notes[-1]


def test_cli_plan_says_downloaded(s3, torch_files, tmp_path, private_tmp):
    _, options = s3
    args = ["swa", "s3://runs/dl/torch/*.ckpt", "--storage-options", json.dumps(options), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "swa.safetensors")])
    assert result.exit_code == 0, result.output
    assert "s3://runs/dl/torch/epoch=1.ckpt" in result.output
    assert "downloaded to a temporary folder first (" in result.output
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "a run downloads it to a temporary folder first (" in result.output
    assert list(private_tmp.iterdir()) == []


def test_not_enough_room_is_one_line(s3, torch_files, tmp_path, private_tmp, monkeypatch):
    # No file system small enough can be mounted without root: the free space is what is faked.
    _, options = s3
    monkeypatch.setattr(disk, "free_space", lambda path: 1000)
    args = ["swa", "s3://runs/dl/torch/*.ckpt", "--storage-options", json.dumps(options)]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "swa.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: s3://runs/dl/torch/epoch=1.ckpt: downloading it needs "), line
    assert f"in {private_tmp}, which has 1.0 kB free; point TMPDIR at a folder with more room" in line
    assert list(private_tmp.iterdir()) == [] and not (tmp_path / "swa.safetensors").exists()


def test_failed_and_interrupted_runs_leave_nothing(s3, torch_files, tmp_path, private_tmp, monkeypatch):
    fs, options = s3
    fs.pipe("runs/dl/bad/a.pt", (torch_files / "epoch=1.ckpt").read_bytes())
    fs.pipe("runs/dl/bad/b.pt", b"PK\x03\x04 not an archive")
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match=r"^s3://runs/dl/bad/b.pt: "):
        averages(["s3://runs/dl/bad/*.pt"], out, options)
    assert list(private_tmp.iterdir()) == [] and not out.exists()

    opened = remote_downloads.open_checkpoint
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return opened(*args, **kwargs)

    monkeypatch.setattr(remote_downloads, "open_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        averages(["s3://runs/dl/torch/*.ckpt"], out, options)
    assert list(private_tmp.iterdir()) == [] and not out.exists()


def test_object_changed_during_download_refused(s3, torch_files, tmp_path, private_tmp, monkeypatch):
    fs, options = s3
    fs.pipe("runs/dl/changing/a.ckpt", (torch_files / "epoch=1.ckpt").read_bytes())
    fs.pipe("runs/dl/changing/b.ckpt", (torch_files / "epoch=2.ckpt").read_bytes())
    read_range = remote_downloads.PinnedObject.read_range
    replaced = []

    def replacing(self, begin, end):
        if not replaced and self.url.endswith("b.ckpt"):  # a new upload over it, mid-download
            replaced.append(True)
            fs.pipe("runs/dl/changing/b.ckpt", (torch_files / "epoch=3.ckpt").read_bytes())
        return read_range(self, begin, end)

    monkeypatch.setattr(remote_downloads.PinnedObject, "read_range", replacing)
    with pytest.raises(InputError, match=r"^s3://runs/dl/changing/b.ckpt: changed while being read"):
        averages(["s3://runs/dl/changing/*.ckpt"], tmp_path / "out.safetensors", options)
    assert list(private_tmp.iterdir()) == []


def test_a_folder_that_is_no_checkpoint_is_one_line(s3, tmp_path):
    fs, options = s3
    fs.pipe("runs/dl/notes/readme.txt", b"nothing")
    with pytest.raises(InputError, match=r"^s3://runs/dl/notes/readme.txt: not a checkpoint ckptavg reads"):
        averages(["s3://runs/dl/notes/readme.txt"], tmp_path / "out.safetensors", options)


def test_torch_shards_average_as_local_ones(s3, tmp_path, private_tmp, downloaded):
    """A Hugging Face folder of `pytorch_model-0000N-of-00002.bin` shards and their index."""
    fs, options = s3
    folders = []
    for step, state in enumerate(perturbed_states(2), 1):
        folder = tmp_path / "local" / f"checkpoint-{step}"
        save_torch_shards(folder, state, split=3)
        (folder / "optimizer.pt").write_bytes(b"never read")
        folders.append(folder)
    upload_folder(fs, tmp_path / "local", "dl/shards")
    _, local = averages(folders, tmp_path / "local.safetensors")
    plan, remote = averages(["s3://runs/dl/shards"], tmp_path / "remote.safetensors", options)
    assert_same(remote, local)
    assert [ck.label.rsplit("/", 2)[1] for ck in plan.checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert {url.rsplit("/", 1)[1] for url in downloaded["whole"]} == {
        "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    }
    assert list(private_tmp.iterdir()) == []


def test_an_index_naming_a_file_elsewhere_is_refused(s3, tmp_path, private_tmp):
    fs, options = s3
    fs.pipe("runs/dl/escape/pytorch_model.bin.index.json", b'{"weight_map": {"w": "../../x.bin"}}')
    with pytest.raises(InputError, match=r"names shard '\.\./\.\./x\.bin', not a file beside the index$"):
        averages(["s3://runs/dl/escape/pytorch_model.bin.index.json"], tmp_path / "o.safetensors", options)
    assert list(private_tmp.iterdir()) == []


def test_dry_run_of_a_damaged_archive_is_one_line(s3, tmp_path, private_tmp):
    fs, options = s3
    fs.pipe("runs/dl/damaged/a.pt", b"PK\x03\x04" + bytes(100))
    with pytest.raises(InputError, match=r"^s3://runs/dl/damaged/a.pt: not a readable torch checkpoint"):
        dry_run(["s3://runs/dl/damaged/a.pt"], options)
    assert list(private_tmp.iterdir()) == []


def test_ctrl_c_mid_download_leaves_nothing_in_tmpdir(s3, tmp_path, ckptavg_command):
    """The command, with TMPDIR set, interrupted while a torch file is being downloaded."""
    import signal
    import time

    fs, options = s3
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(40_000_000, dtype=torch.uint8)}, path)
    fs.pipe("runs/dl/big/a.pt", path.read_bytes())
    fs.pipe("runs/dl/big/b.pt", path.read_bytes())
    tmpdir = tmp_path / "tmpdir-of-the-command"
    tmpdir.mkdir()
    command = [
        str(ckptavg_command),
        "swa",
        "s3://runs/dl/big/*.pt",
        "-o",
        str(tmp_path / "out.safetensors"),
        "--storage-options",
        json.dumps(options),
        "--read-ahead",
        "4MB",
        "--remote-requests",
        "1",
    ]
    process = subprocess.Popen(
        command, env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while not any(tmpdir.glob("ckptavg-download-*/*/a.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(tmpdir.glob("ckptavg-download-*/*/a.pt")), "no download under TMPDIR"
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode != 0 and "Traceback" not in output, output
    assert list(tmpdir.iterdir()) == [] and not (tmp_path / "out.safetensors").exists()


def test_a_torch_model_folder_gives_a_folder_output_its_config(s3, tmp_path, private_tmp):
    """A Hugging Face folder in torch form (`pytorch_model.bin` beside `config.json`) in S3."""
    fs, options = s3
    for step, state in enumerate(perturbed_states(2), 1):
        folder = tmp_path / "local" / f"step_{step}"
        folder.mkdir(parents=True)
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({"model_type": "small", "step": step}))
    upload_folder(fs, tmp_path / "local", "dl/torch_model")
    result = CliRunner().invoke(
        main,
        [
            "swa",
            "s3://runs/dl/torch_model/step_*/",
            "-o",
            f"{tmp_path}/out/",
            "--storage-options",
            json.dumps(options),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["step"] == 2  # the last input's
    assert list(private_tmp.iterdir()) == []
