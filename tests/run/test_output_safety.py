"""What a run writes: no secrets through side-file links, no input overwritten, no user file lost."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import missing, save_series, temp_files
from safetensors import safe_open
from safetensors.torch import load_file

from ckptavg.cli import main
from ckptavg.inputs.side_files import MAX_SIDE_FILE_BYTES
from ckptavg.plan.layout import COPIED_KEY
from ckptavg.run.transaction import remove_stale_temporaries, temporary_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def model_folder(folder: Path, state, **side_files) -> Path:
    """A Hugging Face model folder: model.safetensors, config.json and the given side files."""
    save_series(folder, [state], name="model")
    (folder / "config.json").write_text('{"model_type": "small"}')
    for name, content in side_files.items():
        (folder / name).write_text(content)
    return folder


class TestSideFiles:
    def test_links_out_of_the_folder_are_not_copied(self, tmp_path, states):
        secret = tmp_path / "home" / "id_rsa"
        secret.parent.mkdir()
        secret.write_text("-----BEGIN PRIVATE KEY-----")
        folders = [
            model_folder(tmp_path / f"run{i}", states[i], **{"tokenizer.json": "{}"}) for i in range(2)
        ]
        (folders[1] / "tokenizer_config.json").symlink_to(secret)
        (folders[1] / "special_tokens_map.json").symlink_to("/proc/self/environ")
        result = run("swa", *folders, "-o", f"{tmp_path}/out/")
        assert result.exit_code == 0, result.output
        copied = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert copied == ["config.json", "model.safetensors", "tokenizer.json"]
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            assert f"warning: {folders[1] / name}: not copied to the output: it links to" in result.stderr
        assert "PRIVATE KEY" not in "".join(
            p.read_text(errors="replace") for p in (tmp_path / "out").glob("*.json")
        )

    def test_a_link_inside_the_folder_is_followed(self, tmp_path, states):
        folder = model_folder(tmp_path / "run", states[0], **{"tokenizer.real.json": '{"a": 1}'})
        (folder / "tokenizer.json").symlink_to("tokenizer.real.json")
        assert run("swa", folder, "-o", f"{tmp_path}/out/", "-q").exit_code == 0
        assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"a": 1}'
        assert not (tmp_path / "out" / "tokenizer.json").is_symlink()

    def test_copies_are_never_more_readable_than_their_source(self, tmp_path, states):
        folder = model_folder(tmp_path / "run", states[0], **{"tokenizer.json": "{}"})
        os.chmod(folder / "tokenizer.json", 0o600)
        assert run("swa", folder, "-o", f"{tmp_path}/out/", "-q").exit_code == 0
        assert stat.S_IMODE((tmp_path / "out" / "tokenizer.json").stat().st_mode) == 0o600

    def test_a_huge_side_file_is_left_out(self, tmp_path, states):
        folder = model_folder(tmp_path / "run", states[0])
        with open(folder / "vocab.txt", "wb") as f:
            f.truncate(MAX_SIDE_FILE_BYTES + 1)  # sparse: no disk used
        result = run("swa", folder, "-o", f"{tmp_path}/out/")
        assert result.exit_code == 0, result.output
        assert "vocab.txt: not copied to the output" in result.stderr
        assert not (tmp_path / "out" / "vocab.txt").exists()

    def test_the_output_records_what_it_copied(self, tmp_path, states):
        folder = model_folder(tmp_path / "run", states[0], **{"tokenizer.json": "{}"})
        assert run("swa", folder, "-o", f"{tmp_path}/out/", "-q").exit_code == 0
        with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
            assert json.loads(f.metadata()[COPIED_KEY]) == ["config.json", "tokenizer.json"]


class TestForceOntoAFolderOutput:
    def test_keeps_the_files_a_user_added_and_says_so(self, tmp_path, states):
        first = model_folder(tmp_path / "a", states[0], **{"tokenizer.json": "{}"})
        second = model_folder(tmp_path / "b", states[1])
        out = tmp_path / "out"
        assert run("swa", first, "-o", f"{out}/", "-q").exit_code == 0
        (out / "eval_results.json").write_text('{"accuracy": 0.9}')
        result = run("swa", second, "-o", f"{out}/", "--force")
        assert result.exit_code == 0, result.output
        assert f"keeps:      eval_results.json (not written by ckptavg) in {out}" in result.output
        assert sorted(p.name for p in out.iterdir()) == [
            "config.json",
            "eval_results.json",
            "model.safetensors",
        ]
        assert (out / "eval_results.json").read_text() == '{"accuracy": 0.9}'
        torch.testing.assert_close(load_file(out / "model.safetensors")["fc.weight"], states[1]["fc.weight"])
        assert temp_files(tmp_path) == []

    def test_old_shards_go(self, tmp_path, states):
        folder = model_folder(tmp_path / "a", states[0])
        out = tmp_path / "out"
        assert run("swa", folder, "-o", f"{out}/", "--max-shard-size", "200B", "-q").exit_code == 0
        assert len(list(out.glob("model-*.safetensors"))) > 1
        assert run("swa", folder, "-o", f"{out}/", "--force", "-q").exit_code == 0
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_a_hard_link_to_an_input_is_refused(tmp_path, series):
    alias = tmp_path / "alias.safetensors"
    os.link(series[0], alias)
    before = series[0].read_bytes()
    result = run("swa", *series, "-o", alias, "--force")
    assert result.exit_code == 1 and f"error: {alias}: is an input" in result.stderr, result.output
    assert series[0].read_bytes() == before


def test_a_hard_link_to_an_input_inside_a_folder_output_is_refused(tmp_path, series):
    out = tmp_path / "out"
    out.mkdir()
    os.link(series[0], out / "model.safetensors")
    result = run("swa", *series, "-o", f"{out}/", "--force")
    assert result.exit_code == 1 and "is an input" in result.stderr, result.output


class TestStaleTemporaries:
    def dead_pid(self) -> int:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        return child.pid

    def stale(self, target: Path, pid: int, *, old: bool = False) -> Path:
        path = temporary_path(target, old=old)
        return path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{pid}-"))

    def test_those_of_a_dead_process_are_removed_the_next_run(self, tmp_path, series):
        out = tmp_path / "o.safetensors"
        dead_file = self.stale(out, self.dead_pid())
        dead_file.write_bytes(b"x" * 1000)
        dead_folder = self.stale(tmp_path / "other", self.dead_pid())
        dead_folder.mkdir()
        (dead_folder / "model.safetensors").write_bytes(b"x")
        alive = self.stale(out, os.getppid())  # a process that is running
        alive.write_bytes(b"y")
        assert run("swa", *series, "-o", out, "-q").exit_code == 0
        assert not dead_file.exists() and not dead_folder.exists()
        assert alive.exists()

    def test_an_old_output_moved_aside_by_a_killed_run_is_put_back(self, tmp_path):
        target = tmp_path / "out"
        aside = self.stale(target, self.dead_pid(), old=True)
        aside.mkdir()
        (aside / "model.safetensors").write_bytes(b"the previous output")
        remove_stale_temporaries(tmp_path)
        assert (target / "model.safetensors").read_bytes() == b"the previous output"
        assert not aside.exists()


def test_a_read_only_file_system_is_one_line(tmp_path, series):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        missing("cannot mount a read-only file system here (mount -t tmpfs needs root)")
    try:
        for output in ("o.safetensors", "o.pt", "sub/o.safetensors", "folder/"):
            result = run("swa", *series, "-o", f"{mount}/{output}")
            assert result.exit_code == 1, result.output
            assert result.stderr.startswith("error: ") and "Read-only file system" in result.stderr
            assert "unexpected" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_torch_output_to_a_url_is_refused_not_written_as_a_local_folder(tmp_path, series, monkeypatch):
    from click.testing import CliRunner

    from ckptavg.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["swa", *map(str, series[:2]), "-o", "s3://bucket/avg.pt"])
    assert result.exit_code == 1
    assert "error: s3://bucket/avg.pt: outputs to a URL are .safetensors files or folders" in result.output
    assert not (tmp_path / "s3:").exists()
