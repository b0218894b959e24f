"""A hostile or broken Hub: nothing written outside the cache, no hang, one clean `error:` line.

The real huggingface_hub client talks to the local server of `hub_server.py`, switched to
misbehave (`HubServer.hostile`, bad refs, bad files); every case runs through the CLI.
"""

import json
import shutil
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import perturbed_states
from hub_server import HubServer, Repo
from safetensors.torch import save

from ckptavg.cli import main

ESCAPE = "../../../../escaped"  # from the cache's refs/<name>/ or snapshots/<sha>/ folder to tmp_path/escaped
ESCAPE_FROM_BLOBS = "../../../escaped"  # from the cache's blobs/ folder to tmp_path/escaped
HUGE_HEADER = struct.pack("<Q", 2**40) + b"{" * 64  # a safetensors file announcing a 1 TiB header


class Hung(BaseException):
    """A run went past its deadline (a BaseException, so the CLI cannot turn it into an error line)."""


@contextmanager
def deadline(seconds: float):
    """Interrupt the test's main thread if the code under test hangs."""

    def give_up(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """org/run (branches step1, step2) and org/sharded (an index, two shards); the cache is tmp_path/cache."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CKPTAVG_HUB_TIMEOUT", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    states = perturbed_states(2)
    run = server.repos["org/run"] = Repo()
    for branch, state in zip(("step1", "step2"), states, strict=True):
        run.commit({"model.safetensors": save(state), "config.json": b"{}"}, branch=branch)
    names = sorted(states[0])
    halves = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    files = {shard: save({n: states[0][n] for n in keys}) for shard, keys in halves.items()}
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {n: shard for shard, keys in halves.items() for n in keys}}
    ).encode()
    server.repos["org/sharded"] = Repo()
    server.repos["org/sharded"].commit(files, branch="main")
    yield server
    server.stop()


def ckptavg(tmp_path: Path, *args: str, within: float = 20):
    """Run the CLI on the args (output to tmp_path/out) and return (result, seconds taken)."""
    started = time.monotonic()
    with deadline(within):
        result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out" / "avg.safetensors")])
    return result, time.monotonic() - started


def assert_refused(result, tmp_path: Path, *expected: str) -> None:
    """Exit 1, one clean `error:` line holding every expected text, nothing written outside the cache."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    for text in expected:
        assert text in lines[0], result.output
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "cache")]
    assert outside == [], outside


def test_a_good_hub_still_works(tmp_path, hub):
    result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step*", "hf://org/sharded")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "avg.safetensors").is_file()


class TestUnsafeNames:
    @pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
    @pytest.mark.parametrize(
        ("kind", "spec", "name"),
        [
            ("branch", "hf://org/run@step*", f"step9/{ESCAPE}"),
            ("tag", "hf://org/run@step*", f"step3/{ESCAPE}"),
            ("pull request", "hf://org/run@refs/pr/*", f"refs/pr/1/{ESCAPE}"),
            ("branch", "hf://org/run@step*", "step4\\..\\x"),
            ("branch", "hf://org/run@step*", "step5\x00"),
            ("branch", "hf://org/run@step*", "step6\nx"),
            ("branch", "hf://org/run@*", "/tmp/escaped"),
        ],
    )
    def test_refs(self, tmp_path, hub, kind, spec, name, dry_run):
        run = hub.repos["org/run"]
        sha = run.branches["step2"]
        {"branch": run.branches, "tag": run.tags, "pull request": run.pull_requests}[kind][name] = sha
        result, _ = ckptavg(tmp_path, "swa", spec, *(["--dry-run"] if dry_run else []))
        assert_refused(
            result, tmp_path, f"error: {spec}: the Hub listed a {kind} named {name!r}", "not a safe"
        )

    def test_refs_in_the_cache_offline(self, tmp_path, hub):
        ckptavg(tmp_path, "swa", "hf://org/run@step*")
        shutil.rmtree(tmp_path / "out")
        refs = tmp_path / "cache" / "models--org--run" / "refs"
        (refs / "step\\9").write_text(hub.repos["org/run"].branches["step1"])
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step*", "--offline")
        assert_refused(result, tmp_path, "the cache", "a ref named 'step\\\\9'", "not a safe")

    @pytest.mark.parametrize("sha", [ESCAPE, "A" * 40, "abc123", "0" * 39 + "g"])
    def test_commit_ids(self, tmp_path, hub, sha):
        hub.hostile.sha = sha
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1")
        assert_refused(result, tmp_path, "hf://org/run@step1: the Hub resolved step1 to", repr(sha), "not a")

    @pytest.mark.parametrize(
        "path",
        [
            f"{ESCAPE}/model.safetensors",
            "/abs/model.safetensors",
            "a\\b.safetensors",
            "x\x00.bin",
            "a//b.bin",
        ],
    )
    def test_tree_paths(self, tmp_path, hub, path):
        hub.hostile.tree = [{"type": "file", "path": path, "size": 1, "oid": "0" * 40}]
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1")
        assert_refused(result, tmp_path, f"the Hub listed a file named {path!r}", "not a safe")

    @pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
    @pytest.mark.parametrize(
        ("weight_map", "problem"),
        [
            ({"w": f"{ESCAPE}.safetensors"}, "a file named '../../../../escaped.safetensors'"),
            ({"w": "/etc/passwd"}, "a file named '/etc/passwd'"),
            ({"w": 1}, "not a mapping of tensor names to file names"),
            (["model-00001-of-00002.safetensors"], "not a mapping of tensor names to file names"),
        ],
    )
    def test_weight_map(self, tmp_path, hub, weight_map, problem, dry_run):
        repo = hub.repos["org/sharded"]
        files = dict(repo.commits[repo.branches["main"]])
        files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
        repo.commit(files, branch="main")
        result, _ = ckptavg(tmp_path, "swa", "hf://org/sharded", *(["--dry-run"] if dry_run else []))
        assert_refused(result, tmp_path, "hf://org/sharded: ", "model.safetensors.index.json", problem)


class TestMalformedAnswers:
    @pytest.mark.parametrize("size", ["abc", -1, 1e400, None, True])
    def test_listed_sizes(self, tmp_path, hub, size):
        hub.hostile.sizes = {"model.safetensors": size}
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1")
        assert_refused(result, tmp_path, "the Hub listed 'model.safetensors' with size", "not a byte count")

    @pytest.mark.parametrize("dry_run", [False, True], ids=["download", "range-read"])
    def test_body_shorter_than_its_length(self, tmp_path, hub, dry_run):
        hub.hostile.short = r"/resolve/.*model\.safetensors$"
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1", *(["--dry-run"] if dry_run else []))
        assert_refused(result, tmp_path, "hf://org/run@step1: ")

    def test_huge_safetensors_header_over_a_range_request(self, tmp_path, hub):
        hub.repos["org/run"].commit({"model.safetensors": HUGE_HEADER}, branch="step3")
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step3", "--dry-run")
        assert_refused(result, tmp_path, "hf://org/run@step3: ", "model.safetensors", "safetensors header")

    @pytest.mark.parametrize("api", ["refs", "revision", "tree"])
    def test_invalid_json(self, tmp_path, hub, api):
        hub.hostile.garbage = rf"^/api/models/org/run/{api}"
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step*")
        assert_refused(result, tmp_path, "hf://org/run@step*: the Hub at", "not valid JSON")

    @pytest.mark.parametrize("header", ["ETag", "X-Repo-Commit"])
    def test_unsafe_file_headers(self, tmp_path, hub, header):
        if header == "ETag":
            hub.hostile.etag = ESCAPE_FROM_BLOBS
        else:
            hub.hostile.commit_header = ESCAPE
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1")
        assert_refused(result, tmp_path, f"hf://org/run@step1: the Hub at {hub.url}", header, "not a")


class TestDeadlines:
    @pytest.mark.parametrize(
        ("where", "dry_run"),
        [
            (r"^/api/models/org/run/tree", False),
            (r"/resolve/.*model\.safetensors$", False),
            (r"/resolve/.*model\.safetensors$", True),
        ],
        ids=["listing", "download", "range-read"],
    )
    @pytest.mark.parametrize("behaviour", ["trickle", "silent"])
    def test_a_stalled_hub_fails_in_bounded_time(self, tmp_path, hub, behaviour, where, dry_run):
        setattr(hub.hostile, behaviour, where)
        result, seconds = ckptavg(tmp_path, "swa", "hf://org/run@step1", *(["--dry-run"] if dry_run else []))
        assert_refused(result, tmp_path, f"hf://org/run@step1: the Hub at {hub.url}/", "stopped sending data")
        assert seconds < 8

    @pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
    def test_a_bad_timeout_setting(self, tmp_path, hub, monkeypatch, value):
        monkeypatch.setenv("CKPTAVG_HUB_TIMEOUT", value)
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1")
        assert_refused(result, tmp_path, f"CKPTAVG_HUB_TIMEOUT={value!r}")


def test_the_users_client_factory_is_put_back(tmp_path, hub):
    from huggingface_hub import get_session, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    made = []

    def users_factory():
        made.append(default_client_factory())
        return made[-1]

    set_client_factory(users_factory)
    try:
        result, _ = ckptavg(tmp_path, "swa", "hf://org/run@step1")
        assert result.exit_code == 0, result.output
        assert made, "ckptavg built its client from the user's factory"
        session = get_session()
        assert session is made[-1] and session.timeout.read is None
        assert len(session.event_hooks["response"]) == 0
    finally:
        set_client_factory(default_client_factory)
