"""Outputs to s3:// against moto's S3 server on 127.0.0.1 through s3fs: multipart uploads completed
only at the commit, a folder's index last, nothing left behind by a failed run, `force`."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import perturbed_states
from safetensors.torch import load, save

import ckptavg
from ckptavg import schedules
from ckptavg.cli import main
from ckptavg.errors import NonFiniteError, OutputError
from ckptavg.options import OutputOptions, ReadOptions
from ckptavg.run import remote_output

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from inputs import test_remote

s3 = test_remote.s3  # the server fixture (moto's state is the process's: one server at a time)


def inputs(tmp_path, count=3, big=3_000_000):
    """Local checkpoints whose `big` tensor (12 MB) takes two parts of an upload."""
    paths = []
    for i, state in enumerate(perturbed_states(count)):
        state["big"] = torch.linspace(0, 1, big) * (i + 1)
        path = tmp_path / f"step_{i + 1}.safetensors"
        path.write_bytes(save(state))
        paths.append(path)
    return paths


def to_s3(paths, options, url, **output):
    return ckptavg.average_many(
        paths,
        [schedules.swa()],
        read=ReadOptions(storage_options=options),
        output=OutputOptions(output=url, **output),
    )[0]


def leftovers(fs, bucket="runs"):
    return fs.list_multipart_uploads(bucket)


def test_file_equals_the_local_average_byte_for_byte(s3, tmp_path, monkeypatch):
    fs, options = s3
    parts = []
    original = remote_output.RemoteSafetensorsWriter.__init__

    def watched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        parts.append(self._file)

    monkeypatch.setattr(remote_output.RemoteSafetensorsWriter, "__init__", watched)
    paths = inputs(tmp_path)
    ckptavg.average(paths, schedules.swa(), tmp_path / "local.safetensors")
    plan = to_s3(paths, options, "s3://runs/out/swa.safetensors")
    assert fs.cat_file("runs/out/swa.safetensors") == (tmp_path / "local.safetensors").read_bytes()
    assert len(parts[0].parts) == 2  # a multipart upload
    assert plan.metadata()["ckptavg.method"] == "swa"
    assert not leftovers(fs)
    assert not list(tmp_path.glob(".*ckptavg-tmp*"))


def test_folder_shards_then_index(s3, tmp_path, monkeypatch):
    fs, options = s3
    order = []
    monkeypatch.setattr(remote_output.RemoteSafetensorsWriter, "complete", _logged("complete", order))
    original_filesystem = remote_output.filesystem

    def filesystem(url, options):  # the run's file system, its `pipe_file` logged
        run_fs, path = original_filesystem(url, options)
        original_pipe = run_fs.pipe_file

        def pipe_file(key, *args, **kwargs):
            order.append(("pipe", key.rsplit("/", 1)[-1]))
            return original_pipe(key, *args, **kwargs)

        monkeypatch.setattr(run_fs, "pipe_file", pipe_file)  # the instance's sync method
        return run_fs, path

    monkeypatch.setattr(remote_output, "filesystem", filesystem)
    paths = inputs(tmp_path, big=1000)
    for path in paths:
        folder = tmp_path / path.stem
        folder.mkdir()
        path.rename(folder / "model.safetensors")
        (folder / "config.json").write_text("{}")
    paths = [tmp_path / path.stem / "model.safetensors" for path in paths]
    ckptavg.average(paths, schedules.swa(), f"{tmp_path}/local/", max_shard_size="2KB")
    plan = to_s3(paths, options, "s3://runs/folder/", max_shard_size="2KB")
    assert plan.warnings == []
    local = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert "config.json" in local
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/folder", detail=False)) == local
    for name in local:  # the same bytes as the local output's
        remote, here = fs.cat_file(f"runs/folder/{name}"), (tmp_path / "local" / name).read_bytes()
        assert remote == here, name
    shards = len(local) - 2
    assert order[shards:] == [("pipe", "config.json"), ("pipe", "model.safetensors.index.json")]
    assert all(kind == "complete" for kind, _ in order[:shards])


def _logged(kind, order):
    original = remote_output.RemoteSafetensorsWriter.complete

    def complete(self):
        order.append((kind, self.key.rsplit("/", 1)[-1]))
        original(self)

    return complete


def test_failure_leaves_no_object_and_no_upload(s3, tmp_path, monkeypatch):
    fs, options = s3
    uploaded = []
    original = remote_output.RemoteSafetensorsWriter.abort

    def abort(self):
        uploaded.append(len(self._file.parts))
        original(self)

    monkeypatch.setattr(remote_output.RemoteSafetensorsWriter, "abort", abort)
    paths = inputs(tmp_path)
    state = perturbed_states(1)[0]
    state["big"] = torch.linspace(0, 1, 3_000_000)
    state["zz"] = torch.tensor([float("nan")])  # the last tensor, after a part was uploaded
    paths[-1].write_bytes(save(state))
    for path in paths[:-1]:
        loaded = load(path.read_bytes())
        loaded["zz"] = torch.tensor([1.0])
        path.write_bytes(save(loaded))
    with pytest.raises(NonFiniteError):
        to_s3(paths, options, "s3://runs/failed/avg.safetensors")
    assert uploaded and uploaded[0] >= 1  # parts had been uploaded, then the upload was aborted
    assert not fs.exists("runs/failed/avg.safetensors")
    assert not leftovers(fs)


def test_interrupt_mid_upload_leaves_no_object_and_no_upload(s3, tmp_path, monkeypatch):
    fs, options = s3
    original = remote_output.RemoteSafetensorsWriter.write

    def write(self, *args):
        original(self, *args)
        if self._file.parts:  # a part is uploaded: Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(remote_output.RemoteSafetensorsWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        to_s3(inputs(tmp_path), options, "s3://runs/interrupted/avg.safetensors")
    assert not fs.exists("runs/interrupted/avg.safetensors")
    assert not leftovers(fs)


def test_failed_commit_of_a_folder_removes_its_shards(s3, tmp_path, monkeypatch):
    fs, options = s3
    calls = []
    original = remote_output.RemoteSafetensorsWriter.complete

    def complete(self):
        calls.append(self.key)
        if len(calls) == 2:
            raise OSError("the storage went away")
        original(self)

    monkeypatch.setattr(remote_output.RemoteSafetensorsWriter, "complete", complete)
    with pytest.raises(OutputError, match="the storage went away"):
        to_s3(inputs(tmp_path, big=1000), options, "s3://runs/broken/", max_shard_size="2KB")
    assert not fs.exists("runs/broken") or not fs.ls("runs/broken")
    assert not leftovers(fs)


def test_existing_output_replaced_only_with_force(s3, tmp_path):
    fs, options = s3
    fs.pipe_file("runs/kept/avg.safetensors", b"a user's object")
    fs.pipe_file("runs/kept/dir/notes.txt", b"notes")
    paths = inputs(tmp_path, big=10)
    with pytest.raises(OutputError, match="already exists; pass `force`"):
        to_s3(paths, options, "s3://runs/kept/avg.safetensors")
    for force in (False, True):  # as for a local folder: never into objects ckptavg did not write
        with pytest.raises(OutputError, match="holds objects that ckptavg did not write; write to a new"):
            to_s3(paths, options, "s3://runs/kept/dir/", force=force)
    assert fs.cat_file("runs/kept/avg.safetensors") == b"a user's object"
    to_s3(paths, options, "s3://runs/kept/avg.safetensors", force=True)
    assert load(fs.cat_file("runs/kept/avg.safetensors")).keys() == load(paths[0].read_bytes()).keys()


def test_force_replaces_an_older_folder_output_whole_and_keeps_what_a_user_added(s3, tmp_path):
    fs, options = s3
    paths = inputs(tmp_path, big=1000)
    to_s3(paths, options, "s3://runs/again/", max_shard_size="2KB")
    old = set(fs.ls("runs/again", detail=False, refresh=True))
    assert len(old) > 3  # shards and their index
    fs.pipe_file("runs/again/eval.json", b"{}")
    with pytest.raises(OutputError, match="already holds a checkpoint; pass `force`"):
        to_s3(paths, options, "s3://runs/again/")
    plan = to_s3(paths, options, "s3://runs/again/", force=True)  # one file now, no index
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/again", detail=False, refresh=True))
    assert names == ["eval.json", "model.safetensors"]
    assert "removes:    model-00001-of-" in "\n".join(plan.describe())
    assert load(fs.cat_file("runs/again/model.safetensors")).keys() == load(paths[0].read_bytes()).keys()
    to_s3(paths, options, "s3://runs/again/", force=True, max_shard_size="2KB")  # and back
    assert "runs/again/model.safetensors" not in fs.ls("runs/again", detail=False, refresh=True)
    assert fs.cat_file("runs/again/eval.json") == b"{}"


def test_an_input_as_output_refused_even_with_force(s3, tmp_path):
    fs, options = s3
    paths = inputs(tmp_path, big=10)
    fs.pipe_file("runs/inputs/a/model.safetensors", paths[0].read_bytes())
    specs = ["s3://runs/inputs/a/model.safetensors", *paths[1:]]
    for url in ("s3://runs/inputs/a/model.safetensors", "s3://runs/inputs/"):
        with pytest.raises(OutputError, match="is an input or holds one"):
            to_s3(specs, options, url, force=True)
    assert fs.cat_file("runs/inputs/a/model.safetensors") == paths[0].read_bytes()


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("s3://runs/x/avg.pt", {}),
        ("s3://runs/x/avg.ckpt", {}),
        ("s3://runs/x/", {"format": "dcp"}),
    ],
)
def test_other_layouts_refused_in_one_line(s3, tmp_path, url, extra):
    _, options = s3
    with pytest.raises(OutputError, match=r"outputs to a URL are \.safetensors files or folders"):
        to_s3(inputs(tmp_path, big=10), options, url, **extra)


def test_cli_to_s3(s3, tmp_path):
    fs, options = s3
    paths = inputs(tmp_path, big=10)
    args = ["swa", *map(str, paths), "-o", "s3://runs/cli/avg.safetensors"]
    dry = CliRunner().invoke(main, [*args, "--dry-run", "--storage-options", json.dumps(options)])
    assert "writes:     s3://runs/cli/avg.safetensors" in dry.output
    assert not fs.exists("runs/cli/avg.safetensors")
    result = CliRunner().invoke(main, [*args, "--storage-options", json.dumps(options)])
    assert result.exit_code == 0, result.output
    assert fs.exists("runs/cli/avg.safetensors")
    again = CliRunner().invoke(main, [*args, "--storage-options", json.dumps(options)])
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert "s3://runs/cli/avg.safetensors: already exists; pass --force" in again.output
    assert "testing" not in again.output
