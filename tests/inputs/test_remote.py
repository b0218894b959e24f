"""URL inputs through fsspec: s3:// against a real S3 API server on 127.0.0.1 (moto's, driven through
s3fs as against AWS), https:// against a local HTTP server that honours Range."""

import functools
import http.server
import json
import tempfile
import threading

import pytest
import torch
from click.testing import CliRunner
from conftest import perturbed_states
from s3_server import s3_server
from safetensors.torch import load_file, save

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import InputError
from ckptavg.formats import remote_files
from ckptavg.options import OutputOptions, ReadOptions

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; yields (fs, storage options)."""
    with s3_server() as found:
        yield found


@pytest.fixture
def small_blocks(monkeypatch):
    """Range requests of 16 KiB, so that each tensor takes many and the read-ahead bound matters."""
    monkeypatch.setattr(remote_files, "REMOTE_BLOCK_BYTES", 2**14)


def upload(fs, prefix: str, states) -> None:
    for step, state in zip((1, 2, 10), states, strict=False):
        fs.pipe(f"runs/{prefix}/step_{step}/model.safetensors", save(state, metadata={"format": "pt"}))
        fs.pipe(f"runs/{prefix}/step_{step}/config.json", b"{}")


def local_average(tmp_path, states, schedule):
    paths = []
    for step, state in zip((1, 2, 10), states, strict=False):
        path = tmp_path / "local" / f"step_{step}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(save(state, metadata={"format": "pt"}))
        paths.append(path)
    out = tmp_path / "local.safetensors"
    ckptavg.average(paths, schedule, out)
    return load_file(out)


def remote_average(specs, options, out, schedule, **read):
    plans = ckptavg.average_many(
        specs,
        [schedule],
        read=ReadOptions(storage_options=options, **read),
        output=OutputOptions(output=str(out)),
    )
    return plans[0], load_file(out)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def big_states(count):
    """SmallNet states with one larger tensor, so that it takes many range requests."""
    states = perturbed_states(count)
    for i, state in enumerate(states):
        state["big"] = torch.linspace(0, 1, 50_000) * (i + 1)
    return states


def test_glob_of_folders_averages_as_local_files(s3, tmp_path, small_blocks):
    fs, options = s3
    states = big_states(3)
    upload(fs, "glob", states)
    plan, remote = remote_average(
        ["s3://runs/glob/step_*/"], options, tmp_path / "out.safetensors", ckptavg.ema(0.5), read_ahead="64KB"
    )
    assert [ck.label for ck in plan.checkpoints] == [
        f"s3://runs/glob/step_{s}/model.safetensors" for s in (1, 2, 10)
    ]  # natural order: step_10 last
    assert all("etag" in ck.origin for ck in plan.checkpoints)
    assert same(remote, local_average(tmp_path, states, ckptavg.ema(0.5)))
    assert plan.working_bytes >= 64_000  # the read-ahead counted


def test_read_ahead_bounded(s3, tmp_path, monkeypatch, small_blocks):
    fs, options = s3
    upload(fs, "bounded", big_states(3))
    held = []
    reserve = remote_files.RangeReader.reserve

    def watched(self, nbytes, ahead):
        granted = reserve(self, nbytes, ahead)
        held.append(self._held)
        return granted

    monkeypatch.setattr(remote_files.RangeReader, "reserve", watched)
    remote_average(
        ["s3://runs/bounded/step_*/"], options, tmp_path / "o.safetensors", ckptavg.swa(), read_ahead="100KB"
    )
    assert max(held) <= 100_000 and max(held) >= 2 * 2**14  # ahead of the sums, within the bound


def test_run_folder_and_shards(s3, tmp_path, small_blocks):
    fs, options = s3
    states = big_states(2)
    fs.pipe("runs/trainer/checkpoint-20/model.safetensors", save(states[0]))
    names = sorted(states[1])
    halves = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, keys in halves.items():
        fs.pipe(f"runs/trainer/checkpoint-100/{shard}", save({n: states[1][n] for n in keys}))
    index = {"weight_map": {n: shard for shard, keys in halves.items() for n in keys}}
    fs.pipe("runs/trainer/checkpoint-100/model.safetensors.index.json", str(index).replace("'", '"').encode())
    fs.pipe("runs/trainer/checkpoint-100/optimizer.pt", b"never read")
    plan, remote = remote_average(["s3://runs/trainer"], options, tmp_path / "out.safetensors", ckptavg.swa())
    assert [ck.label.rsplit("/", 2)[1] for ck in plan.checkpoints] == ["checkpoint-20", "checkpoint-100"]
    expected = {k: (states[0][k].double() + states[1][k].double()) / 2 for k in states[0]}
    for name, value in remote.items():
        if value.is_floating_point():
            assert torch.equal(value, expected[name].to(value.dtype)), name


def test_changed_object_refused(s3, tmp_path, monkeypatch, small_blocks):
    fs, options = s3
    states = big_states(2)
    upload(fs, "changing", states)
    fetch = remote_files.RemoteSafetensorsFile.read_range
    replaced = []

    def read_range(self, begin, end):
        if not replaced and "step_2" in self.url:  # a new upload over it, mid-run
            replaced.append(True)
            fs.pipe("runs/changing/step_2/model.safetensors", save(states[0]))
        return fetch(self, begin, end)

    monkeypatch.setattr(remote_files.RemoteSafetensorsFile, "read_range", read_range)
    out = tmp_path / "out.safetensors"
    with pytest.raises(
        InputError, match=r"s3://runs/changing/step_2/model.safetensors: changed while being read"
    ):
        remote_average(["s3://runs/changing/step_*"], options, out, ckptavg.swa())
    assert not out.exists()


def test_missing_object_and_bucket_one_line(s3, tmp_path):
    _, options = s3
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match=r"^s3://runs/nothing.safetensors: no such object \(or bucket\)$"):
        remote_average(["s3://runs/nothing.safetensors"], options, out, ckptavg.swa())
    with pytest.raises(
        InputError, match=r"^s3://no-bucket/x/\*: (no such object \(or bucket\)|the pattern matches no)"
    ):
        remote_average(["s3://no-bucket/x/*"], options, out, ckptavg.swa())
    assert not out.exists()


def test_cli_with_storage_options(s3, tmp_path):
    fs, options = s3
    states = perturbed_states(3)
    upload(fs, "cli", states)
    import json

    out = tmp_path / "swa.safetensors"
    result = CliRunner().invoke(
        main,
        [
            "swa",
            "s3://runs/cli/step_*/model.safetensors",
            "-o",
            str(out),
            "--storage-options",
            json.dumps(options),
            "--read-ahead",
            "1MB",
            "--remote-requests",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert same(load_file(out), local_average(tmp_path, states, ckptavg.swa()))
    result = CliRunner().invoke(
        main,
        [
            "swa",
            "s3://runs/cli/none/*",
            "-o",
            str(tmp_path / "x.safetensors"),
            "--storage-options",
            json.dumps(options),
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "s3://runs/cli/none/*: the pattern matches no object or folder" in result.output


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, honouring `Range: bytes=a-b` (which SimpleHTTPRequestHandler does not)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        wanted = self.headers.get("Range")
        path = self.translate_path(self.path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.send_error(404)
            return
        if wanted:
            first, last = wanted.removeprefix("bytes=").split("-")
            begin, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {begin}-{end - 1}/{len(data)}")
            data = data[begin:end]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data)


def test_https_style_url_by_ranges(tmp_path, small_blocks):
    states = big_states(2)
    served = tmp_path / "served"
    served.mkdir()
    for i, state in enumerate(states):
        (served / f"step_{i}.safetensors").write_bytes(save(state, metadata={"format": "pt"}))
    handler = functools.partial(RangeHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        specs = [f"{base}/step_0.safetensors", f"{base}/step_1.safetensors"]
        _, remote = remote_average(specs, {}, tmp_path / "out.safetensors", ckptavg.swa(), read_ahead="32KB")
        local = [tmp_path / "served" / f"step_{i}.safetensors" for i in range(2)]
        ckptavg.average(local, ckptavg.swa(), tmp_path / "local.safetensors")
        assert same(remote, load_file(tmp_path / "local.safetensors"))
    finally:
        server.shutdown()


def test_a_folder_output_gets_the_config_of_the_last_remote_input(s3, tmp_path, monkeypatch):
    fs, options = s3
    upload(fs, "configs", perturbed_states(2))
    fs.pipe("runs/configs/step_2/config.json", b'{"model_type": "last"}')
    fs.pipe("runs/configs/step_2/tokenizer.json", b'{"version": "1.0"}')
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    result = CliRunner().invoke(
        main,
        [
            "swa",
            "s3://runs/configs/step_*/",
            "-o",
            f"{tmp_path}/out/",
            "--storage-options",
            json.dumps(options),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "copies:     config.json, tokenizer.json from s3://runs/configs/step_2" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (tmp_path / "out" / "config.json").read_bytes() == b'{"model_type": "last"}'
    assert list((tmp_path / "tmp").iterdir()) == []  # the fetched copies are removed
