"""Steps, step-aware and post-hoc EMA, selection, duplicates: against torch and the analytic profiles."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import SmallNet, perturbed_states, save_series
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

import ckptavg
from ckptavg import schedules
from ckptavg.cli import main
from ckptavg.errors import ScheduleError
from ckptavg.formats.readers import Checkpoint
from ckptavg.inputs.steps import infer_step


class TestInferStep:
    @pytest.mark.parametrize(
        ("label", "step"),
        [
            ("run/step_1000.safetensors", 1000),
            ("run/checkpoint-1500/model.safetensors", 1500),
            ("run/checkpoint-20/model.safetensors.index.json", 20),
            ("lightning/epoch=3-step=1000.ckpt", 1000),
            ("ckpts/model_01000.pt", 1000),
            ("hf://org/run@step142000/model.safetensors", 142000),
            ("ckpts/ema.safetensors", None),
            ("run/step_3/model_1.safetensors", 3),  # accelerate's second model, not step 1
            ("run/checkpoints/checkpoint_4/model.safetensors", 4),
            ("run/step_7/diffusion_pytorch_model.safetensors", 7),
            ("run/step_2/model-00001-of-00002.safetensors", 2),
            ("run/global_step9", 9),
            ("ckpts/model-00001-of-00002.safetensors", None),  # a shard's number is not a step
            ("ckpts/weights-00002-of-00003.safetensors", None),
            ("run/1500/pytorch_model.bin", 1500),
        ],
    )
    def test_from_the_name(self, label, step):
        assert infer_step(label, {})[0] == step

    def test_stored_numbers_win(self):
        assert infer_step("a/step_5.pt", {"epoch": 3.0, "global_step": 900.0}) == (
            900,
            "stored 'global_step'",
        )

    def test_from_a_torch_dict_and_safetensors_metadata(self, tmp_path, states):
        torch.save({"model": states[0], "epoch": 7}, tmp_path / "last.pt")
        save_file(states[1], tmp_path / "final.safetensors", metadata={"format": "pt", "step": "1200"})
        plan = ckptavg.build_plan(
            [
                ckptavg.open_checkpoint(tmp_path / "last.pt"),
                ckptavg.open_checkpoint(tmp_path / "final.safetensors"),
            ],
            ckptavg.swa(),
        )
        assert plan.steps == [7, 1200]
        assert plan.step_sources == ["stored 'epoch'", "stored 'step'"]


def ema_every_step(states, decay):
    model = SmallNet()
    averaged = AveragedModel(model, multi_avg_fn=None, avg_fn=get_ema_avg_fn(decay), use_buffers=True)
    for state in states:
        model.load_state_dict(state)
        averaged.update_parameters(model)
    return averaged.module.state_dict()


class TestStepAwareEma:
    def test_every_step_saved_equals_torch_per_step_ema(self, tmp_path):
        states = perturbed_states(12)
        paths = save_series(tmp_path / "run", states, name="step_{}")
        ckptavg.average(paths, ckptavg.ema(0.8, per_step=True), out=tmp_path / "o.safetensors")
        ours, expected = load_file(tmp_path / "o.safetensors"), ema_every_step(states, 0.8)
        for name, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(ours[name], value)

    @pytest.mark.parametrize("every", [2, 5, 10])
    def test_sparse_saves_match_the_per_step_ema_to_the_discretisation_error(self, tmp_path, every):
        slope, steps, decay = 0.01, 100, 0.95
        value = lambda t: torch.full((4,), 1.0 + slope * t)  # noqa: E731 (a parameter moving linearly)
        per_step = value(1)
        for t in range(2, steps + 1):
            per_step = decay * per_step + (1 - decay) * value(t)
        paths = []
        for t in range(every, steps + 1, every):
            paths.append(tmp_path / f"step_{t}.safetensors")
            save_file({"w": value(t)}, paths[-1])
        ckptavg.average(paths, ckptavg.ema(decay, per_step=True), out=tmp_path / "o.safetensors")
        error = (load_file(tmp_path / "o.safetensors")["w"] - per_step).abs().max().item()
        assert error <= slope * every  # each saved value stands for at most `every` steps of drift

    def test_the_result_does_not_depend_on_how_often_checkpoints_were_saved(self):
        dense = schedules.ema(0.99, per_step=True).weights(100, list(range(10, 1001, 10)))
        sparse = schedules.ema(0.99, per_step=True).weights(10, list(range(100, 1001, 100)))
        # The weight on steps 901-1000: ten checkpoints in one series, one in the other.
        assert sum(dense[-10:]) == pytest.approx(sparse[-1])

    def test_half_life(self):
        weights = schedules.ema(half_life=100).weights(2, [100, 200])
        assert weights == pytest.approx([0.5, 0.5])

    def test_unknown_steps_are_an_error(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states[:2], name="ckpt_{}")
        (tmp_path / "ckpts" / "ckpt_1.safetensors").rename(tmp_path / "ckpts" / "first.safetensors")
        with pytest.raises(
            ScheduleError, match="`per_step` needs the training step of every checkpoint; 1 unknown"
        ):
            ckptavg.average(
                [tmp_path / "ckpts" / "first.safetensors", paths[1]],
                ckptavg.ema(0.9, per_step=True),
                out=tmp_path / "o.safetensors",
            )

    def test_bias_correction_matches_a_zero_initialised_ema(self):
        decay, count = 0.9, 5
        values = [float(k) for k in range(1, count + 1)]
        average = 0.0
        for value in values:
            average = decay * average + (1 - decay) * value
        weights = schedules.ema(decay, bias_correction=True).weights(count)
        assert math.fsum(w * v for w, v in zip(weights, values, strict=True)) == pytest.approx(
            average / (1 - decay**count)
        )


class TestPowerEma:
    def test_sigma_rel_and_gamma_as_in_the_paper(self):
        assert schedules.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
        assert schedules.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
        for gamma in (0.0, 1.5, 6.94, 16.97, 100.0):
            assert schedules.sigma_rel_to_gamma(schedules.gamma_to_sigma_rel(gamma)) == pytest.approx(gamma)

    def test_gamma_zero_is_the_equal_average(self):
        assert schedules.power_ema(gamma=0).weights(4, [1000, 2000, 3000, 4000]) == pytest.approx([0.25] * 4)

    @pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
    def test_weights_of_a_dense_series_have_the_analytic_mean_and_std(self, sigma_rel):
        steps = list(range(1, 10001))
        weights = schedules.power_ema(sigma_rel=sigma_rel).weights(len(steps), steps)
        gamma = schedules.sigma_rel_to_gamma(sigma_rel)
        mean = math.fsum(w * s for w, s in zip(weights, steps, strict=True))
        assert mean == pytest.approx(10000 * (gamma + 1) / (gamma + 2), rel=1e-3)
        assert schedules.implied_sigma_rel(weights, steps) == pytest.approx(sigma_rel, rel=1e-2)

    def test_sigma_rel_out_of_range(self):
        with pytest.raises(ScheduleError, match=r"`sigma_rel` must be between 0 and 0\.289"):
            schedules.power_ema(sigma_rel=0.3)

    def test_several_outputs_from_one_read(self, tmp_path, monkeypatch):
        states = perturbed_states(6)
        paths = save_series(tmp_path / "run", states, name="step_{}000")
        reads = []
        real_get, real_get_run = Checkpoint.get, Checkpoint.get_run

        def get(self, name):
            reads.append((self.path, name))
            return real_get(self, name)

        def get_run(self, names, *part):
            reads.extend((self.path, name) for name in names)
            return real_get_run(self, names, *part)

        monkeypatch.setattr(Checkpoint, "get", get)
        monkeypatch.setattr(Checkpoint, "get_run", get_run)
        result = CliRunner().invoke(
            main,
            [
                "ema",
                "--sigma-rel",
                "0.05",
                "--sigma-rel",
                "0.15",
                *map(str, paths),
                "-o",
                str(tmp_path / "ema_{sigma_rel}.safetensors"),
            ],
        )
        assert result.exit_code == 0, result.output
        assert (
            len(reads) == len(set(reads)) == 6 * 8 + 1
        )  # 8 averaged tensors of 6 inputs, 1 copied: once each
        for sigma_rel in (0.05, 0.15):
            monkeypatch.setattr(Checkpoint, "get", real_get)
            monkeypatch.setattr(Checkpoint, "get_run", real_get_run)
            ckptavg.average(
                paths, ckptavg.power_ema(sigma_rel=sigma_rel), out=tmp_path / f"alone_{sigma_rel}.safetensors"
            )
            together, alone = (
                load_file(tmp_path / f"ema_{sigma_rel}.safetensors"),
                load_file(tmp_path / f"alone_{sigma_rel}.safetensors"),
            )
            for name in alone:
                assert torch.equal(together[name], alone[name]), name

    def test_several_outputs_need_a_pattern(self, tmp_path, series):
        result = CliRunner().invoke(
            main,
            [
                "ema",
                "--sigma-rel",
                "0.05",
                "--sigma-rel",
                "0.1",
                *map(str, series),
                "-o",
                str(tmp_path / "ema.safetensors"),
                "--steps",
                "1,2,3,4,5",
            ],
        )
        assert result.exit_code == 2 and "put {sigma_rel}" in result.output


class TestSelection:
    def test_last_k_by_step(self, tmp_path, states):
        paths = save_series(tmp_path / "run", states, name="step_{}00")
        plan = ckptavg.average(
            paths, ckptavg.swa(), out=tmp_path / "o.safetensors", selection=ckptavg.Selection(last=2)
        )
        assert [ck.path for ck in plan.checkpoints] == paths[-2:]
        assert "selected:   the last 2 by step (LAWA)" in "\n".join(plan.describe())

    def test_every_and_range(self, tmp_path, states):
        paths = save_series(tmp_path / "run", states, name="step_{}00")
        plan = ckptavg.build_plan(
            [ckptavg.open_checkpoint(p) for p in paths],
            ckptavg.swa(),
            selection=ckptavg.Selection(every=2, from_step=200),
        )
        assert plan.steps == [300, 500]

    def test_best_by_a_metric_stored_in_torch_checkpoints(self, tmp_path, states):
        paths = []
        for i, (state, acc) in enumerate(zip(states, [70.0, 75.5, 74.0, 71.2, 76.1], strict=True), 1):
            paths.append(tmp_path / f"checkpoint-{i}.pth")
            torch.save({"state_dict": state, "epoch": i, "best_acc1": acc}, paths[-1])
        plan = ckptavg.build_plan(
            [ckptavg.open_checkpoint(p) for p in paths],
            ckptavg.swa(),
            selection=ckptavg.Selection(best=2, metric="best_acc1"),
        )
        assert plan.steps == [2, 5]
        assert any("the best 2 by best_acc1 (max): 75.5, 76.1" in line for line in plan.describe())

    @pytest.mark.parametrize("suffix", [".csv", ".json"])
    def test_best_by_a_sidecar_file(self, tmp_path, states, suffix):
        paths = save_series(tmp_path / "run", states, name="step_{}")
        losses = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.4, 5: 0.8}
        metrics = tmp_path / f"metrics{suffix}"
        if suffix == ".csv":
            metrics.write_text("step,val_loss\n" + "".join(f"{s},{v}\n" for s, v in losses.items()))
        else:
            metrics.write_text(json.dumps([{"step": s, "val_loss": v} for s, v in losses.items()]))
        plan = ckptavg.build_plan(
            [ckptavg.open_checkpoint(p) for p in paths],
            ckptavg.swa(),
            selection=ckptavg.Selection(best=2, metric="val_loss", mode="min", metrics=metrics),
        )
        assert plan.steps == [2, 4]

    def test_best_without_a_metric_anywhere(self, tmp_path, states):
        paths = save_series(tmp_path / "run", states[:2], name="step_{}")
        with pytest.raises(ScheduleError, match="`best` needs a `metric`"):
            ckptavg.build_plan(
                [ckptavg.open_checkpoint(p) for p in paths],
                ckptavg.swa(),
                selection=ckptavg.Selection(best=1),
            )

    def test_cli(self, tmp_path, states):
        paths = save_series(tmp_path / "run", states, name="step_{}00")
        result = CliRunner().invoke(main, ["swa", *map(str, paths), "--last", "3", "--dry-run"])
        assert result.exit_code == 0, result.output
        assert (
            "selected:   the last 3 by step" in result.output and "step_100.safetensors" not in result.output
        )
        assert "effective:  3.00 checkpoints" in result.output and "implied sigma_rel" in result.output


def test_copies_with_the_same_content_are_flagged(tmp_path, states):
    paths = save_series(tmp_path / "run", states[:2], name="step_{}")
    copy = tmp_path / "elsewhere" / "step_3.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(paths[1].read_bytes())
    plan = ckptavg.build_plan([ckptavg.open_checkpoint(p) for p in [*paths, copy]], ckptavg.swa())
    assert any("has the same content as" in w and "counts twice" in w for w in plan.warnings)
