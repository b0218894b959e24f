"""hf:// inputs through the real huggingface_hub client, against a local Hub on 127.0.0.1."""

import json
import shutil
import tempfile

import pytest
import torch
from click.testing import CliRunner
from conftest import perturbed_states
from hub_server import HubServer, Repo
from safetensors import safe_open
from safetensors.torch import load_file, save

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import InputError
from ckptavg.inputs.hub import HubOptions, HubSpec


def weights(state) -> bytes:
    return save(state, metadata={"format": "pt"})


@pytest.fixture
def states():
    return perturbed_states(4)


@pytest.fixture
def hub(monkeypatch, tmp_path, states):
    """Repos org/run (branches step1, step2, step10; main holds checkpoint-* folders), org/sharded."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = server.repos["org/run"] = Repo()
    for branch, state in zip(("step1", "step2", "step10"), states, strict=False):
        run.commit(
            {
                "model.safetensors": weights(state),
                "config.json": b'{"model_type": "small"}',
                "optimizer.pt": b"optimizer state, never fetched" * 100,
            },
            branch=branch,
        )
    run.commit(
        {
            "README.md": b"# run",
            **{
                f"checkpoint-{step}/{name}": data
                for step, state in ((100, states[0]), (20, states[1]))
                for name, data in (
                    ("model.safetensors", weights(state)),
                    ("optimizer.pt", b"o" * 500),
                    ("trainer_state.json", b"{}"),
                )
            },
        },
        branch="main",
    )
    sharded = server.repos["org/sharded"] = Repo()
    names = sorted(states[3])
    halves = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    files = {shard: weights({n: states[3][n] for n in keys}) for shard, keys in halves.items()}
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {n: shard for shard, keys in halves.items() for n in keys}}
    ).encode()
    files["config.json"] = b"{}"
    sharded.commit(files, branch="main")
    server.repos["org/gated"] = Repo(gated=True)
    yield server
    server.stop()


def local_average(tmp_path, states, name):
    paths = []
    for i, state in enumerate(states):
        path = tmp_path / "local" / name / f"{i}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(weights(state))
        paths.append(path)
    ckptavg.average(paths, ckptavg.ema(0.7), out=tmp_path / "local" / f"{name}.safetensors", keep_order=True)
    return load_file(tmp_path / "local" / f"{name}.safetensors")


def hub_average(tmp_path, specs, name="hub.safetensors", **options):
    plan = ckptavg.average(specs, ckptavg.ema(0.7), out=tmp_path / name, hub=HubOptions(**options))
    return plan, load_file(tmp_path / name)


def assert_same(ours, expected):
    assert ours.keys() == expected.keys()
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key


class TestSpec:
    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("hf://org/run", HubSpec("org/run", None, "")),
            ("hf://org/run@step14*", HubSpec("org/run", "step14*", "")),
            ("hf://org/run@v1/checkpoint-*/", HubSpec("org/run", "v1", "checkpoint-*")),
            ("hf://org/run@refs/pr/3/sub/model.bin", HubSpec("org/run", "refs/pr/3", "sub/model.bin")),
            ("hf://org/run@refs%2Fpr%2F3", HubSpec("org/run", "refs/pr/3", "")),
        ],
    )
    def test_parse(self, spec, expected):
        assert HubSpec.parse(spec) == expected

    def test_not_a_hub_path(self):
        with pytest.raises(InputError, match="write hf://ORG/REPO"):
            HubSpec.parse("hf://just-a-name")


class TestRevisions:
    def test_revisions_average_as_the_same_files_do_locally(self, tmp_path, hub, states):
        plan, ours = hub_average(
            tmp_path, ["hf://org/run@step1", "hf://org/run@step2", "hf://org/run@step10"]
        )
        assert_same(ours, local_average(tmp_path, states[:3], "revisions"))
        assert not any("optimizer.pt" in path for path in hub.downloads())
        shas = [hub.repos["org/run"].branches[b] for b in ("step1", "step2", "step10")]
        with safe_open(tmp_path / "hub.safetensors", "pt") as f:
            inputs = json.loads(f.metadata()["ckptavg.inputs"])
        assert [i["path"] for i in inputs] == [f"hf://org/run@{sha}/model.safetensors" for sha in shas]
        assert "hf://org/run@step10/model.safetensors" in "\n".join(plan.describe())

    def test_glob_over_branches_in_natural_order(self, tmp_path, hub, states):
        plan, ours = hub_average(tmp_path, ["hf://org/run@step*"])
        assert [ck.label for ck in plan.checkpoints] == [
            f"hf://org/run@{b}/model.safetensors" for b in ("step1", "step2", "step10")
        ]
        assert_same(ours, local_average(tmp_path, states[:3], "glob"))

    def test_glob_over_folders_at_one_revision(self, tmp_path, hub, states):
        plan, ours = hub_average(tmp_path, ["hf://org/run/checkpoint-*"])
        assert [ck.label for ck in plan.checkpoints] == [
            "hf://org/run@main/checkpoint-20/model.safetensors",
            "hf://org/run@main/checkpoint-100/model.safetensors",
        ]
        assert_same(ours, local_average(tmp_path, [states[1], states[0]], "folders"))
        assert not any("optimizer" in path or "trainer_state" in path for path in hub.downloads())

    def test_a_run_at_the_root_expands_to_its_trainer_checkpoints(self, tmp_path, hub, states):
        plan, _ = hub_average(tmp_path, ["hf://org/run"])
        assert len(plan.checkpoints) == 2

    def test_sharded_checkpoint_and_its_config(self, tmp_path, hub, states):
        plan = ckptavg.average(
            ["hf://org/sharded", "hf://org/run@step1"], ckptavg.swa(), out=f"{tmp_path}/out/", keep_order=True
        )
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
        expected = {
            n: (states[3][n] + states[0][n]) / 2 if states[0][n].is_floating_point() else states[0][n]
            for n in states[0]
        }
        ours = load_file(tmp_path / "out" / "model.safetensors")
        for name in expected:
            torch.testing.assert_close(ours[name], expected[name])
        assert len(plan.checkpoints) == 2

    def test_hub_and_local_inputs_mix(self, tmp_path, hub, states):
        local = tmp_path / "mine.safetensors"
        local.write_bytes(weights(states[3]))
        plan, _ = hub_average(tmp_path, [local, "hf://org/run@step1"])
        assert {ck.label for ck in plan.checkpoints} == {str(local), "hf://org/run@step1/model.safetensors"}


class TestCache:
    def test_second_run_downloads_nothing(self, tmp_path, hub):
        hub_average(tmp_path, ["hf://org/run@step*"], name="a.safetensors")
        fetched = len(hub.downloads())
        assert sum(path.endswith("model.safetensors") for path in hub.downloads()) == 3
        hub_average(tmp_path, ["hf://org/run@step*"], name="b.safetensors")
        assert len(hub.downloads()) == fetched
        assert (tmp_path / "hf" / "hub" / "models--org--run").is_dir()

    def test_offline_uses_the_cache_alone(self, tmp_path, hub, states):
        hub_average(tmp_path, ["hf://org/run@step*"], name="online.safetensors")
        hub.stop()
        _, ours = hub_average(tmp_path, ["hf://org/run@step*"], name="offline.safetensors", offline=True)
        assert_same(ours, load_file(tmp_path / "online.safetensors"))

    def test_offline_from_the_environment(self, tmp_path, hub, monkeypatch):
        hub_average(tmp_path, ["hf://org/run@step1"], name="online.safetensors")
        requests = len(hub.requests)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub_average(tmp_path, ["hf://org/run@step1"], name="offline.safetensors")
        assert len(hub.requests) == requests

    def test_offline_cache_miss_names_repo_and_revision(self, tmp_path, hub):
        hub_average(tmp_path, ["hf://org/run@step1"])
        with pytest.raises(
            InputError, match=r"hf://org/run@step2: not in the cache .* \(offline\); run once"
        ):
            hub_average(tmp_path, ["hf://org/run@step2"], name="x.safetensors", offline=True)

    def test_offline_cache_miss_names_the_file(self, tmp_path, hub):
        hub_average(tmp_path, ["hf://org/run@step1"])
        (
            tmp_path
            / "hf"
            / "hub"
            / "models--org--run"
            / "snapshots"
            / hub.repos["org/run"].branches["step1"]
            / "model.safetensors"
        ).unlink()
        with pytest.raises(InputError, match=r"hf://org/run@step1: model\.safetensors is not in the cache"):
            hub_average(tmp_path, ["hf://org/run@step1"], name="x.safetensors", offline=True)


class TestErrors:
    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            (
                "hf://org/nope",
                r"hf://org/nope: repository org/nope not found on http://127\.0\.0\.1:\d+ \(if it is private",
            ),
            ("hf://org/run@step99", r"hf://org/run@step99: org/run has no revision 'step99'"),
            (
                "hf://org/run@stepX*",
                r"no branch or tag of org/run on the Hub matches 'stepX\*' \(there: main, step1",
            ),
            (
                "hf://org/run@step1/nope.safetensors",
                r"hf://org/run@step1 has no file or folder 'nope\.safetensors'",
            ),
            ("hf://org/run/nothing-*", r"nothing at hf://org/run@main matches 'nothing-\*'"),
            ("hf://org/gated", r"hf://org/gated: org/gated is gated; request access"),
        ],
    )
    def test_one_line_and_nothing_written(self, tmp_path, hub, spec, message):
        with pytest.raises(InputError, match=message):
            hub_average(tmp_path, [spec])
        assert not (tmp_path / "hub.safetensors").exists()

    def test_server_down(self, tmp_path, hub):
        hub.stop()
        with pytest.raises(InputError, match=r"hf://org/run@step1: cannot .* Hub at http://127\.0\.0\.1"):
            hub_average(tmp_path, ["hf://org/run@step1"])

    def test_disk_too_small_for_the_download(self, tmp_path, hub, monkeypatch):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6, 10))
        with pytest.raises(
            InputError,
            match=r"the Hub inputs need .* but only 10 B is free there; pass `stream` to read them",
        ):
            hub_average(tmp_path, ["hf://org/run@step1"])
        assert hub.downloads() == []
        result = CliRunner().invoke(
            main, ["swa", "hf://org/run@step1", "-o", str(tmp_path / "o.safetensors")]
        )
        assert result.exit_code == 1 and "pass --stream to read them by range requests" in result.output

    def test_cli_prints_one_line(self, tmp_path, hub):
        result = CliRunner().invoke(
            main, ["swa", "hf://org/run@step99", "-o", str(tmp_path / "o.safetensors")]
        )
        assert result.exit_code == 1
        assert result.output.strip().count("\n") == 0 and "has no revision 'step99'" in result.output


class TestPlanningWithoutDownloading:
    def test_dry_run_reads_headers_only(self, tmp_path, hub):
        result = CliRunner().invoke(
            main, ["ema", "--decay", "0.5", "hf://org/run@step*", "hf://org/sharded", "--dry-run"]
        )
        assert result.exit_code == 0, result.output
        assert "hf://org/run@step10/model.safetensors  (header only, not downloaded)" in result.output
        assert "tensors:    9 (8 averaged: 8 in float64, correctly rounded" in result.output
        assert not any(path.endswith(".safetensors") for path in hub.downloads())
        assert any(ranged and path.endswith("model.safetensors") for _, path, ranged in hub.requests)

    def test_dry_run_finds_mismatches_before_any_download(self, tmp_path, hub):
        hub.repos["org/run"].commit({"model.safetensors": weights({"other": torch.ones(2)})}, branch="step3")
        result = CliRunner().invoke(main, ["swa", "hf://org/run@step*", "--dry-run"])
        assert result.exit_code == 1
        assert "hf://org/run@step3/model.safetensors: lacks 9 tensors" in result.output
        assert hub.downloads() == []

    def test_inspect_a_hub_checkpoint(self, hub):
        result = CliRunner().invoke(main, ["inspect", "hf://org/sharded"])
        assert result.exit_code == 0, result.output
        assert "hf://org/sharded@main/model.safetensors.index.json  (header only" in result.output
        assert "tensors: 9, parameters: 179" in result.output
        assert not any(path.endswith(".safetensors") for path in hub.downloads())


def cached_files(tmp_path) -> list[str]:
    """What the Hub cache holds beyond huggingface_hub's bookkeeping: downloaded files and their links."""
    cache = tmp_path / "hf" / "hub"
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file() and {"blobs", "snapshots"} & set(p.parts)
    )


class TestStream:
    def test_same_output_as_the_download_and_nothing_in_the_cache(self, tmp_path, hub):
        plan, _ = hub_average(tmp_path, ["hf://org/run@step*"], name="streamed.safetensors", stream=True)
        assert cached_files(tmp_path) == [] and hub.downloads() == []
        assert all(ranged for method, path, ranged in hub.requests if method == "GET" and "/resolve/" in path)
        assert "(read by byte ranges)" in "\n".join(plan.describe())
        hub_average(tmp_path, ["hf://org/run@step*"], name="downloaded.safetensors")
        assert cached_files(tmp_path) != []
        streamed = (tmp_path / "streamed.safetensors").read_bytes()
        assert streamed == (tmp_path / "downloaded.safetensors").read_bytes()  # provenance included

    def test_shards_to_a_folder_with_the_config_of_the_last(self, tmp_path, hub, monkeypatch):
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        CliRunner().invoke(
            main, ["swa", "hf://org/run@step1", "hf://org/sharded", "--keep-order", "-o", f"{tmp_path}/d/"]
        )
        result = CliRunner().invoke(
            main,
            [
                "swa",
                "hf://org/run@step1",
                "hf://org/sharded",
                "--keep-order",
                "--stream",
                "-o",
                f"{tmp_path}/s/",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "copies:     config.json from hf://org/sharded@main" in result.output
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]
        for name in ("config.json", "model.safetensors"):
            assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
        assert not list(tmp_path.glob("tmp/ckptavg-side-files-*/config.json"))  # removed after the run

    def test_dry_run_streams_headers_only(self, tmp_path, hub):
        result = CliRunner().invoke(
            main, ["ema", "--decay", "0.5", "hf://org/run@step*", "--stream", "--dry-run"]
        )
        assert result.exit_code == 0, result.output
        assert "hf://org/run@step10/model.safetensors  (read by byte ranges)" in result.output
        assert cached_files(tmp_path) == [] and hub.downloads() == []

    def test_torch_files_are_not_streamed(self, tmp_path, hub, states):
        buffer = __import__("io").BytesIO()
        torch.save(states[0], buffer)
        hub.repos["org/torch"] = Repo()
        hub.repos["org/torch"].commit({"pytorch_model.bin": buffer.getvalue()}, branch="main")
        result = CliRunner().invoke(
            main, ["swa", "hf://org/torch", "--stream", "-o", str(tmp_path / "o.safetensors")]
        )
        assert result.exit_code == 1
        assert result.output.strip() == (
            "error: hf://org/torch@main/pytorch_model.bin: --stream reads safetensors checkpoints only; "
            "leave out --stream to download this one to the cache"
        )

    def test_stream_and_offline_contradict(self, tmp_path, hub):
        with pytest.raises(InputError, match="`stream` reads from the Hub, which `offline` forbids"):
            hub_average(tmp_path, ["hf://org/run@step1"], stream=True, offline=True)
