"""Outputs like the last input (`like_last`, `.ckpt`, `.pth.tar`): checkpoints saved by Lightning,
torchvision's reference scripts and timm from a few real training steps, averaged, then loaded and
resumed with each library's own code; the untouched records copied byte for byte."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import needed_module
from safetensors.torch import save_file
from torch import nn

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import OutputError
from ckptavg.units import format_bytes


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def records(path: Path) -> dict[str, bytes]:
    """Each record's bytes by its name in the archive's folder (zipfile checks every CRC-32)."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename.partition("/")[2]: archive.read(info) for info in archive.infolist()}


def places(path: Path) -> list[tuple[str, int, int]]:
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, i.header_offset, i.file_size) for i in archive.infolist()]


def mean(states: list[dict], name: str) -> torch.Tensor:
    return (sum(s[name].double() for s in states) / len(states)).float()


def assert_only_weights_rewritten(output: Path, last: Path, averaged: int) -> None:
    """Same records at the same places; only `averaged` storages differ, the pickle and every other
    record (optimizer moments, version records) are the last input's bytes."""
    assert places(output) == places(last)
    new, old = records(output), records(last)
    changed = [name for name in new if new[name] != old[name]]
    assert all(name.startswith("data/") for name in changed)
    assert len(changed) == averaged
    assert new["data.pkl"] == old["data.pkl"]


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def batches(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        for _ in range(count)
    ]


def train_step(model, optimizer, batch) -> None:
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """Three `.ckpt` files from six training steps (three epochs) of a tiny LightningModule."""
    lightning = needed_module("lightning")
    folder = tmp_path_factory.mktemp("lightning")
    module_class = _lightning_module(lightning)
    torch.manual_seed(0)
    _trainer(lightning, folder, max_steps=6).fit(module_class(), _loader())
    paths = sorted(folder.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    assert [p.name for p in paths] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    return lightning, module_class, folder, paths


class TestLightning:
    def test_load_from_checkpoint_and_resume(self, lightning_run):
        lightning, module_class, folder, paths = lightning_run
        output = folder / "avg.ckpt"
        result = run_cli("swa", *paths, "-o", output)
        assert result.exit_code == 0, result.output
        assert f"wrote {output} ({format_bytes(output.stat().st_size)}, " in result.output  # the file, whole
        states = [torch.load(p, weights_only=False)["state_dict"] for p in paths]
        loaded = module_class.load_from_checkpoint(output)
        assert loaded.hparams.hidden == 8
        for name, value in loaded.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, mean(states, name), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(value, states[-1][name])
        content = torch.load(output, weights_only=False)
        last = torch.load(paths[-1], weights_only=False)
        assert content["global_step"] == last["global_step"] == 6
        assert content["pytorch-lightning_version"] == last["pytorch-lightning_version"]
        for new, old in zip(
            content["optimizer_states"][0]["state"].values(),
            last["optimizer_states"][0]["state"].values(),
            strict=True,
        ):
            assert torch.equal(new["exp_avg"], old["exp_avg"])
        floating = sum(1 for v in states[-1].values() if v.is_floating_point())
        assert_only_weights_rewritten(output, paths[-1], floating)

        steps = []
        resumed = _trainer(lightning, folder, max_steps=8)
        resumed.callbacks.append(_StepCounter(lightning, steps))
        resumed.fit(module_class(), _loader(), ckpt_path=output)
        assert resumed.global_step == 8
        assert len(steps) == 2  # continued from the last checkpoint's step 6

    def test_plan_lists_what_is_carried_over(self, lightning_run):
        _, _, folder, paths = lightning_run
        result = run_cli("swa", *paths, "-o", folder / "planned.ckpt", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "like the last input (as .ckpt implies)" in result.output
        assert "tensors of 'state_dict' put in place" in result.output
        carried = next(line for line in result.output.splitlines() if line.startswith("carried:"))
        assert f"from {paths[-1]}:" in carried
        for key in (
            "epoch",
            "global_step",
            "optimizer_states",
            "lr_schedulers",
            "callbacks",
            "hyper_parameters",
            "pytorch-lightning_version",
        ):
            assert key in carried
        assert not (folder / "planned.ckpt").exists()

    def test_wrap_key_contradicts_like_last(self, lightning_run):
        _, _, folder, paths = lightning_run
        result = run_cli("swa", *paths, "-o", folder / "wrapped.ckpt", "--wrap-key", "state_dict")
        assert result.exit_code != 0
        assert "--like-last" in result.output and "--wrap-key" in result.output
        assert "Traceback" not in result.output


def _lightning_module(lightning):
    class TinyModule(lightning.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.model = nn.Sequential(
                nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3)
            )

        def training_step(self, batch, batch_index):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2)}

    TinyModule.__module__ = __name__  # found again by load_from_checkpoint's hparams
    return TinyModule


def _loader():
    x, y = zip(*batches(2), strict=True)  # two steps an epoch
    data = torch.utils.data.TensorDataset(torch.cat(x), torch.cat(y))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(lightning, folder: Path, *, max_steps: int):
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=folder, filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    return lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[checkpoints],
        default_root_dir=folder,
    )


def _StepCounter(lightning, steps: list):
    class StepCounter(lightning.Callback):
        def on_train_batch_start(self, trainer, *args):
            steps.append(trainer.global_step)

    return StepCounter()


class TestTorchvisionReference:
    """The checkpoint format of torchvision's references/classification/train.py."""

    @pytest.fixture
    def saved(self, tmp_path):
        needed_module("torchvision")
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        torch.manual_seed(0)
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        model_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        args = argparse.Namespace(lr=0.1, epochs=3, model="tiny", output_dir=str(tmp_path))
        paths = []
        for epoch in range(3):
            for batch in batches(2, seed=epoch):
                train_step(model, optimizer, batch)
                model_ema.update_parameters(model)
            scheduler.step()
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "args": args,
                "model_ema": model_ema.state_dict(),
            }
            paths.append(tmp_path / f"model_{epoch}.pth")
            torch.save(checkpoint, paths[-1])
        return paths

    def test_resume(self, tmp_path, saved):
        output = tmp_path / "swa.pth"
        plan = ckptavg.average(saved, ckptavg.swa(), output, like_last=True)
        assert any("`like_last`" in line for line in plan.describe())
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        with torch.serialization.safe_globals([argparse.Namespace]):  # its `args`, as for its own files
            checkpoint = torch.load(output, map_location="cpu", weights_only=True)
            last = torch.load(saved[-1], map_location="cpu", weights_only=True)
            states = [torch.load(p, weights_only=True)["model"] for p in saved]
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch = checkpoint["epoch"] + 1
        assert start_epoch == 3 and checkpoint["args"] == last["args"]
        for name, value in model.state_dict().items():
            expected = mean(states, name) if value.is_floating_point() else states[-1][name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        for name, value in checkpoint["model_ema"].items():  # not averaged: the last one's, unchanged
            assert torch.equal(value, last["model_ema"][name])
        assert optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
            last["optimizer"]["state"][0]["momentum_buffer"]
        )
        train_step(model, optimizer, batches(1)[0])  # and training goes on from there
        # averages that equal the last input's values exactly (inputs all alike) leave its bytes as they were
        changed = sum(
            1 for n, v in states[-1].items() if v.is_floating_point() and not mean(states, n).equal(v)
        )
        assert_only_weights_rewritten(output, saved[-1], changed)

    def test_model_ema_averaged_in_place(self, tmp_path, saved):
        output = tmp_path / "ema_swa.pth"
        ckptavg.average(saved, ckptavg.swa(), output, key="model_ema", like_last=True)
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(output, weights_only=True)
            inputs = [torch.load(p, weights_only=True) for p in saved]
        states = [content["model_ema"] for content in inputs]
        torch.testing.assert_close(
            checkpoint["model_ema"]["module.0.weight"], mean(states, "module.0.weight")
        )
        assert checkpoint["model_ema"]["n_averaged"].equal(states[-1]["n_averaged"])
        for name, value in checkpoint["model"].items():
            assert torch.equal(value, inputs[-1]["model"][name])

    def test_batchnorm_statistics_recomputed_in_place(self, tmp_path, saved):
        """SWA with a BatchNorm pass, written like the last input: `train.py --resume` reads it, and
        its weights are torch's update_bn over the average."""
        from torch.optim.swa_utils import update_bn

        data = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
        torch.save(data, tmp_path / "data.pt")
        output = tmp_path / "swa_bn.pth"
        result = run_cli(
            "swa", *saved, "--key", "model", "--like-last", "-o", output, "--bn-data", tmp_path / "data.pt",
            "--model", f"{__name__}:tiny_net", "--batch-size", "8",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(output, weights_only=True)
            inputs = [torch.load(p, weights_only=True) for p in saved]
        oracle = tiny_net()
        oracle.load_state_dict(
            {
                n: mean([c["model"] for c in inputs], n) if v.is_floating_point() else v
                for n, v in inputs[-1]["model"].items()
            }
        )
        update_bn([(b,) for b in data.split(8)], oracle)
        for name, value in oracle.state_dict().items():
            torch.testing.assert_close(checkpoint["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        averaged_mean = mean([c["model"] for c in inputs], "1.running_mean")
        assert not torch.allclose(checkpoint["model"]["1.running_mean"], averaged_mean)  # the pass ran
        assert checkpoint["epoch"] == inputs[-1]["epoch"] and checkpoint["args"] == inputs[-1]["args"]
        for name, value in checkpoint["model_ema"].items():
            assert torch.equal(value, inputs[-1]["model_ema"][name])
        result = run_cli(
            "bn-update", output, "--key", "model", "--like-last", "-o", tmp_path / "again.pth",
            "--data", tmp_path / "data.pt", "--model", f"{__name__}:tiny_net", "--batch-size", "8",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        with torch.serialization.safe_globals([argparse.Namespace]):
            again = torch.load(tmp_path / "again.pth", weights_only=True)
        update_bn([(b,) for b in data.split(8)], oracle)
        for name, value in oracle.state_dict().items():
            torch.testing.assert_close(again["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert again["optimizer"]["state"][0]["momentum_buffer"].equal(
            inputs[-1]["optimizer"]["state"][0]["momentum_buffer"]
        )


class TestTimm:
    def test_checkpoint_saver_resume_and_load(self, tmp_path):
        timm = needed_module("timm")
        from timm.models import load_checkpoint, resume_checkpoint
        from timm.utils import CheckpointSaver, ModelEmaV3

        torch.manual_seed(0)
        model = tiny_net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        model_ema = ModelEmaV3(model, decay=0.9)
        saver = CheckpointSaver(
            model,
            optimizer,
            model_ema=model_ema,
            checkpoint_dir=str(tmp_path),
            recovery_dir=str(tmp_path),
            max_history=5,
        )
        for epoch in range(3):
            for batch in batches(2, seed=epoch):
                train_step(model, optimizer, batch)
                model_ema.update(model)
            saver.save_checkpoint(epoch, metric=float(epoch))
        paths = sorted(tmp_path.glob("checkpoint-*.pth.tar"))
        assert len(paths) == 3
        output = tmp_path / "averaged" / "swa.pth.tar"
        result = run_cli("swa", *paths, "-o", output)
        assert result.exit_code == 0, result.output

        states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
        last = torch.load(paths[-1], weights_only=True)
        resumed, resumed_optimizer = tiny_net(), torch.optim.AdamW(tiny_net().parameters(), lr=0.01)
        resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.01)
        assert resume_checkpoint(resumed, str(output), resumed_optimizer, log_info=False) == 3
        for name, value in resumed.state_dict().items():
            expected = mean(states, name) if value.is_floating_point() else states[-1][name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        ema = tiny_net()
        load_checkpoint(ema, str(output), use_ema=True)
        for name, value in ema.state_dict().items():
            assert torch.equal(value, last["state_dict_ema"][name])
        assert timm.__version__


class TestRecords:
    """Storages shared, offset or strided; what cannot be rewritten alone is refused in one line."""

    def save(self, folder: Path, make) -> list[Path]:
        torch.manual_seed(0)
        folder.mkdir()
        paths = []
        for step in range(3):
            paths.append(folder / f"step_{step}.pt")
            torch.save(make(step), paths[-1])
        return paths

    def test_views_and_tied_weights(self, tmp_path):
        def make(step):
            flat = torch.randn(30)
            tied = torch.randn(3, 2)
            return {
                "state_dict": {"a": flat[0:10], "b": flat[10:20].view(2, 5), "embed": tied, "head": tied},
                "step": step,
            }

        paths = self.save(tmp_path / "in", make)
        output = tmp_path / "out.pt"
        plan = ckptavg.average(paths, ckptavg.swa(), output, like_last=True)
        assert [t.name for t in plan.tensors if t.same_as] == ["head"]
        got = torch.load(output, weights_only=True)["state_dict"]
        inputs = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
        for name in ("a", "b", "embed"):
            torch.testing.assert_close(got[name], mean(inputs, name))
        assert got["head"].data_ptr() == got["embed"].data_ptr()  # still one storage
        untouched = slice(80, 120)  # flat[20:30]: in the record, in no tensor: kept as it was
        assert (
            bytes(got["a"].untyped_storage())[untouched]
            == bytes(inputs[-1]["a"].untyped_storage())[untouched]
        )
        records(output)  # every CRC-32 right

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (lambda w: {"state_dict": {"w": w}, "also": w[1:]}, "outside 'state_dict'"),
            (lambda w: {"state_dict": {"w": w.t()}}, "strided view"),
            (lambda w: {"state_dict": {"w": w[0], "v": w[0, 1:]}}, "share bytes"),
        ],
    )
    def test_refused_in_one_line(self, tmp_path, content, message):
        paths = self.save(tmp_path / "in", lambda step: content(torch.randn(4, 3)))
        with pytest.raises(OutputError, match=message) as raised:
            ckptavg.average(paths, ckptavg.swa(), tmp_path / "out.ckpt")
        assert "\n" not in str(raised.value) and str(paths[-1]) in str(raised.value)
        assert not (tmp_path / "out.ckpt").exists()

    def test_last_input_dropped(self, tmp_path):
        def make(step):
            weights = torch.randn(4)
            if step == 2:
                weights[0] = float("nan")
            return {"state_dict": {"w": weights}, "step": step}

        paths = self.save(tmp_path / "in", make)
        plan = ckptavg.average(paths, ckptavg.swa(), tmp_path / "out.ckpt", nonfinite="skip-checkpoint")
        assert plan.layout.like_last.label == str(paths[1])
        got = torch.load(tmp_path / "out.ckpt", weights_only=True)
        inputs = [torch.load(p, weights_only=True)["state_dict"] for p in paths[:2]]
        assert got["step"] == 1  # like the last input averaged
        torch.testing.assert_close(got["state_dict"]["w"], mean(inputs, "w"))

    def test_dtype_changes_refused(self, tmp_path):
        paths = self.save(tmp_path / "in", lambda step: {"state_dict": {"w": torch.randn(4)}})
        with pytest.raises(OutputError, match="keeps the last input's dtypes"):
            ckptavg.average(paths, ckptavg.swa(), tmp_path / "out.ckpt", dtype="bfloat16")

    def test_last_input_must_be_a_torch_archive(self, tmp_path):
        paths = self.save(tmp_path / "in", lambda step: {"w": torch.randn(4)})
        save_file({"w": torch.randn(4)}, tmp_path / "in" / "step_3.safetensors")
        result = run_cli(
            "swa", *paths, tmp_path / "in" / "step_3.safetensors", "-o", tmp_path / "out.pth.tar"
        )
        assert result.exit_code == 1
        assert "as .pth.tar implies" in result.output and "is not a torch file" in result.output
        assert len(result.output.strip().splitlines()) == 1
