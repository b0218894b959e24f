"""torch.distributed.checkpoint (DCP) folders, saved by `dcp.save` itself (dcp_saver.py): one process
and FSDP2 over two gloo processes, torchtitan's layout (torch_save serialization) and a nested one
(safetensors serialization), the optimizer's state saved beside the model."""

import os
import pickle
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import needed_module
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

import ckptavg
from ckptavg.errors import InputError
from ckptavg.formats import dcp_transforms
from ckptavg.formats.readers import open_checkpoint

SAVER = Path(__file__).with_name("dcp_saver.py")
LOADER = Path(__file__).with_name("dcp_loader.py")
STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    found = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"dcp{world}")
        saved = subprocess.run(
            [sys.executable, str(SAVER), str(out), str(world)], capture_output=True, text=True, timeout=180
        )
        assert saved.returncode == 0, saved.stderr[-3000:]
        found[world] = out
    return found


def expected(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "expected" / f"step-{step}.pt")


def swa_of(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The average torch's AveragedModel computes over the same state dicts."""
    model = torch.nn.ParameterDict(
        {k.replace(".", "_"): torch.nn.Parameter(v.clone()) for k, v in states[0].items()}
    )
    averaged = AveragedModel(model)
    for state in states:
        for k, v in state.items():
            model[k.replace(".", "_")].data.copy_(v)
        averaged.update_parameters(model)
    return {k: averaged.module[k.replace(".", "_")].detach() for k in states[0]}


def assert_close(found: dict, wanted: dict) -> None:
    assert sorted(found) == sorted(wanted)
    for name, value in wanted.items():
        torch.testing.assert_close(found[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("layout", ["titan", "nested"])
def test_a_run_is_averaged_as_averaged_model_does(runs, world, layout, tmp_path):
    out = tmp_path / "swa.safetensors"
    plan = ckptavg.average([runs[world] / layout], ckptavg.swa(), out)
    assert plan.steps == list(STEPS)
    assert_close(load_file(out), swa_of([expected(runs[world], s) for s in STEPS]))


def test_each_tensor_is_what_dcp_loads(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = runs[2] / "titan" / "step-20"
    dcp_to_torch_save(folder, tmp_path / "full.pt")
    loaded = torch.load(tmp_path / "full.pt")
    with open_checkpoint(folder) as ck:
        assert sorted(ck.tensors) == sorted(expected(runs[2], 20))
        for name in ck.tensors:
            assert torch.equal(ck.get(name), loaded[name])


def test_a_split_tensor_is_read_one_engine_chunk_at_a_time(runs):
    with open_checkpoint(runs[2] / "titan" / "step-10") as ck:
        flat = ck.get_run(["0.weight"])  # 11 rows: 6 on rank 0, 5 on rank 1
        window = flat[30:42]  # 6 values of each rank's chunk
        assert window.numel() == 12
        assert torch.equal(window, expected(runs[2], 10)["0.weight"].reshape(-1)[30:42])
        assert flat[0:6].untyped_storage().nbytes() > 6 * 4  # within one chunk: a view of the map


def test_chunk_layouts_may_differ_between_inputs(runs, tmp_path):
    """A run resumed on another world size: one chunk in one input, two in the other."""
    out = tmp_path / "mixed.safetensors"
    ckptavg.average([runs[1] / "titan" / "step-10", runs[2] / "titan" / "step-20"], ckptavg.swa(), out)
    assert_close(load_file(out), swa_of([expected(runs[1], 10), expected(runs[2], 20)]))


def test_the_optimizer_state_is_never_read(runs, tmp_path):
    """Its chunks overwritten with garbage: the average is the same."""
    from ckptavg.formats.dcp_metadata import read_metadata

    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[2] / "titan" / "step-10"), str(folder)], check=True)
    meta = read_metadata(folder / ".metadata")
    for (fqn, _), stored in meta.storage.items():
        if fqn.startswith("optimizer."):
            with open(folder / stored.file, "r+b") as f:
                f.seek(stored.offset)
                f.write(b"\xff" * stored.length)
    with open_checkpoint(folder) as ck:
        assert "left out: optimizer (21 tensors), lr_scheduler, train_state" in ck.notes
        for name, value in expected(runs[2], 10).items():
            assert torch.equal(ck.get(name), value)


def test_inspect_says_what_is_model_and_what_is_left_out(runs):
    found = ckptavg.inspect(runs[2] / "nested" / "step-10")
    assert found.notes[0] == "DCP (safetensors serialization, 2 files), the 'model' state dict"
    assert found.notes[1:] == [
        "left out: optimizer (21 tensors), step",
        "chunks: 7 tensors in 2 chunks along dim 0",
    ]
    assert found.tensors["0.weight"].shape == (11, 6)


def test_key_picks_another_nested_state_dict(runs):
    with open_checkpoint(runs[1] / "nested" / "step-10", key="optimizer.state.0.weight") as ck:
        assert sorted(ck.tensors) == ["exp_avg", "exp_avg_sq", "step"]
    with pytest.raises(
        InputError, match=r"holds no tensors under `key=ema`; its state dict holds 'model', 'optimizer'"
    ):
        open_checkpoint(runs[1] / "nested" / "step-10", key="ema")


def test_malicious_metadata_runs_no_code(runs, tmp_path):
    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[1] / "titan" / "step-10"), str(folder)], check=True)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(
        InputError, match=r"\.metadata: its metadata names posix\.system, which DCP metadata is not"
    ):
        open_checkpoint(folder)
    assert not marker.exists()


def test_a_missing_rank_file(runs, tmp_path):
    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[2] / "titan" / "step-10"), str(folder)], check=True)
    (folder / "__1_0.distcp").unlink()
    with pytest.raises(InputError, match=r"tensor '.*' is stored in __1_0\.distcp, which does not exist"):
        open_checkpoint(folder)


def test_a_truncated_file(runs, tmp_path):
    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[2] / "nested" / "step-10"), str(folder)], check=True)
    os.truncate(folder / "__0_0.distcp", 2000)
    with pytest.raises(
        InputError, match=r"__0_0\.distcp: tensor 'model\..*' .*(past the end|not a readable)"
    ):
        open_checkpoint(folder)


def test_a_chunk_that_disagrees_with_the_metadata(runs, tmp_path):
    """The metadata points 0.weight's chunk at the bytes of 1.bias's."""
    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[1] / "titan" / "step-10"), str(folder)], check=True)
    meta = pickle.loads((folder / ".metadata").read_bytes())  # the test's own file: trusted
    by_name = {index.fqn: index for index in meta.storage_data}
    meta.storage_data[by_name["0.weight"]] = meta.storage_data[by_name["1.bias"]]
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(
        InputError, match=r"tensor '0\.weight' \(chunk at \[0, 0\]\): holds a torch\.float32 tensor"
    ):
        open_checkpoint(folder)


@pytest.mark.parametrize("layout", ["titan", "nested"])
def test_a_dcp_output_loads_back_with_dcp_load(runs, layout, tmp_path):
    import torch.distributed.checkpoint as dcp

    ckptavg.average([runs[2] / layout], ckptavg.swa(), tmp_path / "swa.safetensors")
    ckptavg.average([runs[2] / layout], ckptavg.swa(), tmp_path / "swa", format="dcp")
    wanted = load_file(tmp_path / "swa.safetensors")
    fresh = {name: torch.zeros_like(value) for name, value in wanted.items()}
    state = {"model": fresh} if layout == "nested" else fresh  # under the inputs' keys
    dcp.load(state, checkpoint_id=tmp_path / "swa")
    for name, value in wanted.items():
        assert torch.equal(fresh[name], value)
    with open_checkpoint(tmp_path / "swa") as ck:  # and ckptavg reads it as an input
        assert all(torch.equal(ck.get(name), value) for name, value in wanted.items())
    with pytest.raises(ckptavg.OutputError, match=r"already holds a checkpoint; pass `force`"):
        ckptavg.average([runs[2] / layout], ckptavg.swa(), tmp_path / "swa")
    ckptavg.average([runs[2] / layout], ckptavg.ema(0.5), tmp_path / "swa", force=True)  # stays DCP
    assert sorted(os.listdir(tmp_path / "swa")) == [".metadata", "__0_0.distcp"]


def test_a_dcp_output_loads_into_a_sharded_model_in_two_processes(runs, tmp_path):
    """`dcp.load` into a fresh FSDP2 model on two gloo ranks: each rank's shards are the
    safetensors output's rows."""
    ckptavg.average([runs[2] / "nested"], ckptavg.swa(), tmp_path / "swa.safetensors")
    ckptavg.average([runs[2] / "nested"], ckptavg.swa(), tmp_path / "swa", format="dcp")
    loaded = subprocess.run(
        [sys.executable, str(LOADER), str(tmp_path / "swa"), str(tmp_path), "2", "model"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    wanted = load_file(tmp_path / "swa.safetensors")
    rows = {name: 0 for name in wanted}
    for rank in (0, 1):
        for name, (shard, offsets) in torch.load(tmp_path / f"rank-{rank}.pt").items():
            assert offsets[0] == rows[name] and all(o == 0 for o in offsets[1:])
            assert torch.equal(shard, wanted[name][offsets[0] : offsets[0] + shard.shape[0]])
            rows[name] += shard.shape[0]
    assert rows == {name: value.shape[0] for name, value in wanted.items()}


@pytest.mark.parametrize("world", [1, 2])
def test_compressed_chunks_average_as_the_uncompressed_ones(runs, world, tmp_path):
    """A series saved through DCP's ZStandard extension gives the uncompressed series' output."""
    needed_module("zstandard")
    plain = ckptavg.average([runs[world] / "titan"], ckptavg.swa(), tmp_path / "plain.safetensors")
    plan = ckptavg.average([runs[world] / "zstd"], ckptavg.swa(), tmp_path / "zstd.safetensors")
    found, wanted = load_file(tmp_path / "zstd.safetensors"), load_file(tmp_path / "plain.safetensors")
    assert sorted(found) == sorted(wanted)
    assert all(torch.equal(found[name], value) for name, value in wanted.items())
    chunks = 7 * world
    assert plan.checkpoints[0].notes[-1] == (
        f"{chunks} chunks stored through 'stream.zstd/1': decoded one at a time as the engine reads them"
    )
    decoded = sum(ck.decoded_bytes for ck in plan.checkpoints)
    assert decoded > 0 and plan.working_bytes == plain.working_bytes + decoded


def test_decoded_chunks_are_held_two_at_most_and_dropped(runs, monkeypatch):
    """Each chunk is decoded when first read, once; at most two stay decoded, of one tensor."""
    needed_module("zstandard")
    decode, decoded = dcp_transforms.decode, []

    def counted(*args):
        out, size = decode(*args)
        decoded.append(weakref.ref(out))
        return out, size

    monkeypatch.setattr(dcp_transforms, "decode", counted)
    wanted = expected(runs[2], 10)
    with open_checkpoint(runs[2] / "zstd" / "step-10") as ck:
        assert not decoded  # opening decodes nothing
        flat = ck.get_run(["0.weight"])
        for start in range(0, 66, 6):  # forward, one row at a time, across the two chunks
            assert torch.equal(flat[start : start + 6], wanted["0.weight"].reshape(-1)[start : start + 6])
        assert len(decoded) == 2
        assert torch.equal(ck.get("1.weight"), wanted["1.weight"])
        assert len(decoded) == 4
        assert [ref() is None for ref in decoded] == [True, True, False, False]


def test_an_unknown_transform_is_refused_by_name(runs, tmp_path):
    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[1] / "titan" / "step-10"), str(folder)], check=True)
    meta = pickle.loads((folder / ".metadata").read_bytes())  # the test's own file: trusted
    for index, info in meta.storage_data.items():
        if index.fqn == "1.bias":
            info.transform_descriptors = ["stream.rot13/1"]
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(
        InputError,
        match=r"__0_0\.distcp: tensor '1\.bias' \(chunk at \[0\]\): is stored through the DCP extension "
        r"transform 'stream\.rot13/1', which ckptavg does not decode",
    ):
        open_checkpoint(folder)


def test_a_damaged_compressed_chunk(runs, tmp_path):
    needed_module("zstandard")
    from ckptavg.formats.dcp_metadata import read_metadata

    folder = tmp_path / "step-10"
    subprocess.run(["cp", "-r", str(runs[1] / "zstd" / "step-10"), str(folder)], check=True)
    stored = read_metadata(folder / ".metadata").storage[("0.weight", (0, 0))]
    with open(folder / stored.file, "r+b") as f:
        f.seek(stored.offset)
        f.write(b"\0" * 8)
    with pytest.raises(
        InputError, match=r"__0_0\.distcp: tensor '0\.weight' \(chunk at \[0, 0\]\): cannot be decoded"
    ):
        ckptavg.average([folder], ckptavg.swa(), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_trainer_run_of_fsdp_checkpoints(runs, tmp_path):
    """accelerate's layout (a Trainer's with FSDP's sharded state dict): checkpoint-N/pytorch_model_fsdp_0
    holds the model as DCP, beside the optimizer's DCP folder and the trainer's files."""
    run = tmp_path / "run"
    for step in STEPS:
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("pytorch_model_fsdp_0", "optimizer_0"):
            subprocess.run(
                ["cp", "-r", str(runs[2] / "nested" / f"step-{step}"), str(folder / name)], check=True
            )
        (folder / "trainer_state.json").write_text("{}")
    plan = ckptavg.average([run], ckptavg.swa(), tmp_path / "swa.safetensors")
    assert plan.steps == list(STEPS)
    assert_close(load_file(tmp_path / "swa.safetensors"), swa_of([expected(runs[2], s) for s in STEPS]))


def test_a_torchtitan_run(tmp_path):
    """A run saved by torchtitan's own CheckpointManager (when torchtitan is installed: it is not a
    test extra, its dependencies are a trainer's)."""
    pytest.importorskip("torchtitan.components.checkpointer.dcp", reason="torchtitan is not installed")
    saved = subprocess.run(
        [sys.executable, str(SAVER.with_name("torchtitan_saver.py")), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    plan = ckptavg.average([tmp_path / "checkpoint"], ckptavg.swa(), tmp_path / "swa.safetensors")
    assert plan.steps == list(STEPS)
    assert "left out: optimizer (12 tensors), dataloader, lr_scheduler" in plan.checkpoints[0].notes
    assert_close(load_file(tmp_path / "swa.safetensors"), swa_of([expected(tmp_path, s) for s in STEPS]))
