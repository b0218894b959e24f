"""The command line: wiring, messages and exit codes, in-process and as the installed program."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptavg.cli import main

CKPTAVG = Path(sys.executable).with_name("ckptavg")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class TestAveragingCommands:
    def test_swa_writes_the_average(self, tmp_path, series, states):
        result = run("swa", *series, "-o", tmp_path / "swa.safetensors")
        assert result.exit_code == 0, result.output
        expected = sum(s["fc.weight"] for s in states) / len(states)
        torch.testing.assert_close(load_file(tmp_path / "swa.safetensors")["fc.weight"], expected)
        assert f"wrote {tmp_path / 'swa.safetensors'}" in result.output

    def test_quoted_glob(self, tmp_path, series):
        result = run(
            "ema",
            "--decay",
            "0.5",
            str(tmp_path / "ckpts" / "step_*.safetensors"),
            "-o",
            tmp_path / "ema.safetensors",
        )
        assert result.exit_code == 0, result.output
        assert (tmp_path / "ema.safetensors").exists()

    def test_dry_run_prints_the_plan_and_writes_nothing(self, tmp_path, series):
        result = run("ema", "--decay", "0.999", *series, "-o", tmp_path / "ema.safetensors", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "ema (decay=0.999) over 5 checkpoints" in result.output
        assert "0.9960" in result.output and str(series[0]) in result.output
        assert "99.6% of the weight on checkpoint 1" in result.output
        assert "dry run: nothing written" in result.output
        assert not (tmp_path / "ema.safetensors").exists()

    def test_dry_run_needs_no_output(self, series):
        result = run("swa", *series, "--dry-run")
        assert result.exit_code == 0, result.output
        assert "tensors:" in result.output

    def test_avg_with_weights(self, tmp_path, series, states):
        result = run("avg", "--weights", "1,3", *series[:2], "-o", tmp_path / "mix.safetensors")
        assert result.exit_code == 0, result.output
        expected = 0.25 * states[0]["fc.weight"] + 0.75 * states[1]["fc.weight"]
        torch.testing.assert_close(load_file(tmp_path / "mix.safetensors")["fc.weight"], expected)

    def test_avg_with_unreadable_weights(self, tmp_path, series):
        result = run("avg", "--weights", "1,x", *series[:2], "-o", tmp_path / "mix.safetensors")
        assert result.exit_code == 2
        assert "not a comma-separated list of numbers" in result.output

    def test_missing_output_is_a_usage_error(self, series):
        result = run("swa", *series)
        assert result.exit_code == 2
        assert "give an output with -o" in result.output

    def test_sharded_output_folder(self, tmp_path, series):
        result = run("swa", *series, "-o", f"{tmp_path}/swa/", "--max-shard-size", "300B")
        assert result.exit_code == 0, result.output
        assert (tmp_path / "swa" / "model.safetensors.index.json").exists()


class TestErrors:
    def test_error_is_one_line_without_traceback(self, tmp_path, series):
        result = run("swa", *series, tmp_path / "missing.safetensors", "-o", tmp_path / "o.safetensors")
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"error: {tmp_path / 'missing.safetensors'}: no such file or folder"
        ]

    def test_debug_shows_the_exception(self, tmp_path, series):
        result = run(
            "swa",
            *series,
            tmp_path / "missing.safetensors",
            "-o",
            tmp_path / "o.safetensors",
            "--debug",
        )
        assert result.exit_code == 1
        assert type(result.exception).__name__ == "InputError"

    def test_existing_output_without_force(self, tmp_path, series):
        (tmp_path / "o.safetensors").write_bytes(b"keep")
        result = run("swa", *series, "-o", tmp_path / "o.safetensors")
        assert result.exit_code == 1
        assert "already exists; pass --force to replace it" in result.output
        assert (tmp_path / "o.safetensors").read_bytes() == b"keep"

    def test_bad_decay(self, tmp_path, series):
        result = run("ema", "--decay", "2", *series, "-o", tmp_path / "o.safetensors")
        assert result.exit_code == 1
        assert "error: --decay must be between 0 and 1, got 2.0" in result.output


class TestMessagesSpeakFlags:
    """The library names its Python parameters (`decay=0.9`); each command says its own flags."""

    def test_python_names_in_the_library(self, tmp_path, series):
        import ckptavg

        needs = r"^`wrap_key` needs a torch output \(`output=out.pt`\)"
        with pytest.raises(ckptavg.CkptavgError, match=needs):
            ckptavg.build_plan([ckptavg.open_checkpoint(p) for p in series], ckptavg.swa(), wrap_key="m")

    def test_flags_with_values(self, tmp_path, series):
        result = run("ema", "--decay", "0.999", *series, "--dry-run")
        assert "--decay 0.999 over 5 checkpoints" in result.output
        assert "`" not in result.output

    def test_short_flag_and_renamed_flag(self, tmp_path, series):
        result = run("swa", *series)
        assert "give an output with -o PATH (or check the inputs with --dry-run)" in result.output
        result = run(
            "ema", "--sigma-rel", "0.1", "--sigma-rel", "0.2", "--steps", "1,2,3", *series,
            "--bn-data", tmp_path, "--model", "torch.nn:Identity", "-o", tmp_path / "o.safetensors",
        )  # fmt: skip
        assert "a BatchNorm pass (--bn-data) works with one output at a time; give one --sigma-rel" in (
            result.output
        )

    def test_the_same_parameter_under_another_flag(self, tmp_path):
        state = torch.nn.BatchNorm1d(4).state_dict()
        series = [tmp_path / f"bn_{i}.safetensors" for i in range(2)]
        for path in series:
            save_file(state, path)
        missing = tmp_path / "nothing"
        model = ["--model", "torch.nn:BatchNorm1d", "--model-kwargs", '{"num_features": 4}']
        result = run("swa", *series, "--bn-data", missing, *model, "-o", tmp_path / "o.safetensors")
        assert f"{missing}: no such folder or file for --bn-data" in result.output
        result = run("bn-update", series[0], "--data", missing, *model, "-o", tmp_path / "o.pt")
        assert f"{missing}: no such folder or file for --data" in result.output


class TestInspect:
    def test_shows_tensors_totals_and_provenance(self, tmp_path, series):
        run("ema", "--decay", "0.5", *series, "-o", tmp_path / "ema.safetensors")
        result = run("inspect", tmp_path / "ema.safetensors")
        assert result.exit_code == 0, result.output
        assert "fc.weight" in result.output and "F32" in result.output and "[10, 4]" in result.output
        assert "tensors: 9, parameters: 179" in result.output
        assert "ckptavg.method: ema" in result.output
        assert f"0.0625  {series[0]}" in result.output

    def test_json(self, tmp_path, series):
        result = run("inspect", "--json", series[0])
        assert result.exit_code == 0, result.output
        assert '"fc.weight"' in result.output and '"F32"' in result.output


@pytest.mark.usefixtures("ckptavg_command")
class TestInstalledProgram:
    def test_end_to_end_as_a_subprocess(self, tmp_path, series):
        done = subprocess.run(
            [CKPTAVG, "swa", *series, "-o", tmp_path / "swa.safetensors"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert "fc.weight" in load_file(tmp_path / "swa.safetensors")
        assert "wrote" in done.stdout.splitlines()[-1]  # piped output is flushed before the quick exit

    def test_exit_handlers_still_run_after_the_quick_exit(self, tmp_path):
        marker = tmp_path / "handler-ran"
        code = (
            f"import atexit, pathlib, sys\natexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
            "sys.argv = ['ckptavg', '--version']\nfrom ckptavg.cli import run\nrun()"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0 and "ckptavg, version" in done.stdout
        assert marker.read_text() == "yes"

    def test_usage_error_exit_code(self, tmp_path, series):
        done = subprocess.run([CKPTAVG, "swa", *series, "--bogus"], capture_output=True, text=True)
        assert done.returncode == 2 and "No such option '--bogus'" in done.stderr

    def test_a_reader_that_stops_early_ends_it_quietly(self, tmp_path):
        save_file({f"layer.{i}.weight": torch.ones(2) for i in range(3000)}, tmp_path / "many.safetensors")
        process = subprocess.Popen(
            [CKPTAVG, "inspect", tmp_path / "many.safetensors"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout.readline().strip().endswith(b"many.safetensors")
        process.stdout.close()  # as `| head -1` does
        stderr = process.stderr.read()
        assert process.wait() == 1 and stderr == b""

    def test_error_exit_code_and_single_line(self, tmp_path):
        done = subprocess.run(
            [CKPTAVG, "swa", tmp_path / "none.safetensors", "-o", tmp_path / "o.safetensors"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr

    def test_python_dash_m(self):
        done = subprocess.run([sys.executable, "-m", "ckptavg", "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "ckptavg swa" in done.stdout

    def test_help_and_version_do_not_import_torch(self):
        code = (
            "import sys\nfrom ckptavg.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.strip().splitlines()[-1] == "False"


class TestHostileNames:
    """A tensor name can hold a newline or an escape sequence: it must not forge a line of output."""

    NAMES = ("ok.weight", "forged\nerror: all fine", "red\x1b[31mtext", "back\rspace", "rtl\u202egnp.exe")

    @pytest.fixture
    def hostile(self, tmp_path):
        path = tmp_path / "hostile.safetensors"
        save_file({name: torch.ones(2) for name in self.NAMES}, path)
        return path

    def test_inspect_shows_one_escaped_row_per_tensor(self, hostile):
        result = run("inspect", hostile)
        assert result.exit_code == 0, result.output
        rows = [line for line in result.output.splitlines() if line.startswith("  ") and "F32" in line]
        assert len(rows) == len(self.NAMES)
        assert "\x1b" not in result.output and "\r" not in result.output and "\u202e" not in result.output
        assert "forged\\nerror: all fine" in result.output and "red\\x1b[31mtext" in result.output

    def test_an_error_naming_them_is_one_line(self, tmp_path, hostile):
        other = tmp_path / "other.safetensors"
        save_file({"ok.weight": torch.ones(2)}, other)
        result = run("swa", hostile, other, "-o", tmp_path / "o.safetensors")
        assert result.exit_code == 1
        assert len(result.stderr.strip().splitlines()) == 1 and "\x1b" not in result.stderr
        assert result.stderr.startswith("error: ")
