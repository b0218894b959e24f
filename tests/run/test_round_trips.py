"""Series saved by training libraries' own code, averaged by the CLI, loaded back by their own loaders.

Each library saves a few checkpoints of a tiny model after real optimizer steps
(models built from configs, nothing downloaded); the output must load with that
library's loader and hold the float64 mean of what the library itself saved.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptavg.cli import main
from ckptavg.schedules import power_ema

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


def run(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def float64_mean(states: list[dict]) -> dict:
    return {
        name: torch.stack([s[name].double() for s in states]).mean(0)
        for name in states[0]
        if states[0][name].is_floating_point()
    }


def assert_mean_of(state: dict, states: list[dict]) -> None:
    expected = float64_mean(states)
    assert set(expected) <= set(state)
    for name, mean in expected.items():
        torch.testing.assert_close(state[name].double(), mean, rtol=1e-6, atol=1e-7, msg=name)


def train_steps(model, batch, steps: int, optimizer) -> None:
    for _ in range(steps):
        loss = model(*batch)
        loss = loss if isinstance(loss, torch.Tensor) else loss.sample
        loss.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def diffusers_runs(tmp_path_factory):
    """A tiny UNet2DModel trained 3 steps, its weights and its EMAModel saved after each step
    as a diffusers training script saves them (`step_N/` folders)."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    ema = EMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config, decay=0.9)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    batch = (torch.randn(2, 3, 8, 8), torch.tensor([1, 5]))
    for step in (100, 200, 300):
        train_steps(unet, batch, 2, optimizer)
        ema.step(unet.parameters())
        unet.save_pretrained(root / "unet" / f"step_{step}")
        ema.save_pretrained(root / "unet_ema" / f"step_{step}")
    return root


class TestDiffusers:
    def test_the_average_loads_with_from_pretrained(self, diffusers_runs, tmp_path):
        from diffusers import UNet2DModel

        run("swa", diffusers_runs / "unet" / "step_*", "-o", f"{tmp_path}/swa/")
        assert (tmp_path / "swa" / "diffusion_pytorch_model.safetensors").is_file()
        assert (tmp_path / "swa" / "config.json").is_file()
        loaded = UNet2DModel.from_pretrained(tmp_path / "swa").state_dict()
        saved = [
            load_file(p)
            for p in sorted(diffusers_runs.glob("unet/step_*/diffusion_pytorch_model.safetensors"))
        ]
        assert_mean_of(loaded, saved)

    def test_post_hoc_ema_reads_steps_from_the_folders_and_loads_as_an_ema_model(
        self, diffusers_runs, tmp_path
    ):
        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        plan = run("ema", "--sigma-rel", "0.2", diffusers_runs / "unet_ema" / "step_*", "--dry-run")
        assert "steps:      from file names" in plan
        run("ema", "--sigma-rel", "0.2", diffusers_runs / "unet_ema" / "step_*", "-o", f"{tmp_path}/ema/")
        ema = EMAModel.from_pretrained(tmp_path / "ema", model_cls=UNet2DModel)
        assert ema.decay == 0.9  # its own settings came with its config
        weights = power_ema(sigma_rel=0.2).weights(3, [100, 200, 300])
        snapshots = [
            load_file(p)
            for p in sorted(diffusers_runs.glob("unet_ema/step_*/diffusion_pytorch_model.safetensors"))
        ]
        model = UNet2DModel.from_pretrained(tmp_path / "ema")
        ema.copy_to(model.parameters())
        for name, value in model.state_dict().items():
            expected = sum(w * s[name].double() for w, s in zip(weights, snapshots, strict=True))
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)


class TestTransformersTrainer:
    def test_trainer_checkpoints_average_into_a_model_from_pretrained_loads(self, tmp_path):
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16))
        data = [
            {"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(8)
        ]
        arguments = TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=6,
            save_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_strategy="no",
        )
        Trainer(model=model, args=arguments, train_dataset=data).train()
        folders = sorted((tmp_path / "run").glob("checkpoint-*"))
        assert len(folders) == 3 and (folders[0] / "optimizer.pt").is_file()
        out = run("swa", tmp_path / "run", "--dry-run")
        assert "checkpoint-2" in out and "checkpoint-6" in out
        run("swa", tmp_path / "run", "-o", f"{tmp_path}/swa/")
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "swa").state_dict()
        assert_mean_of(loaded, [load_file(f / "model.safetensors") for f in folders])


class TestAccelerate:
    @staticmethod
    def save_run(root, models: int):
        from accelerate import Accelerator

        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        nets = [
            torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            for _ in range(models)
        ]
        optimizer = torch.optim.SGD([p for n in nets for p in n.parameters()], lr=0.1)
        *nets, optimizer = accelerator.prepare(*nets, optimizer)
        for step in (1, 2, 3):
            loss = sum(net(torch.randn(3, 4)).pow(2).mean() for net in nets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            accelerator.save_state(root / f"step_{step}")
        return nets

    def test_load_state_reads_the_average(self, tmp_path):
        from accelerate import Accelerator

        self.save_run(tmp_path / "run", models=1)
        saved = [load_file(tmp_path / "run" / f"step_{s}" / "model.safetensors") for s in (1, 2, 3)]
        plan = run("ema", "--decay", "0.5", "--per-step", tmp_path / "run" / "step_*", "--dry-run")
        assert "steps:      from file names" in plan and "3  " + str(tmp_path / "run" / "step_3") in plan
        run("swa", tmp_path / "run" / "step_*", "-o", f"{tmp_path}/avg/")
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        accelerator = Accelerator(cpu=True)
        fresh = accelerator.prepare(fresh)
        accelerator.load_state(tmp_path / "avg")
        assert_mean_of(fresh.state_dict(), saved)

    def test_a_second_model_is_chosen_by_name_and_keeps_it(self, tmp_path):
        self.save_run(tmp_path / "run", models=2)
        result = CliRunner().invoke(main, ["swa", str(tmp_path / "run" / "step_*"), "-o", f"{tmp_path}/avg/"])
        assert result.exit_code == 1
        assert "holds the weights of 2 models ('model', 'model_1'): take one with --weights-name model" in (
            result.output
        )
        run("swa", tmp_path / "run" / "step_*", "--weights-name", "model_1", "-o", f"{tmp_path}/avg/")
        saved = [load_file(tmp_path / "run" / f"step_{s}" / "model_1.safetensors") for s in (1, 2, 3)]
        assert_mean_of(load_file(tmp_path / "avg" / "model_1.safetensors"), saved)
