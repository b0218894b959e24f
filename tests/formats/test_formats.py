"""Torch checkpoints and Hugging Face folders, in and out: same averages as from safetensors."""

import argparse
import json
import sys
import types

import pytest
import torch
from conftest import needed_module, perturbed_states, save_series, save_torch_shards, temp_files
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.errors import InputError, OutputError


def average_of(paths, tmp_path, name="ref.safetensors", **options):
    out = tmp_path / name
    ckptavg.average(paths, ckptavg.ema(0.8), out=out, **options)
    return load_file(out)


def assert_same_tensors(ours, expected):
    assert ours.keys() == expected.keys()
    for name in expected:
        assert ours[name].dtype == expected[name].dtype, name
        assert torch.equal(ours[name], expected[name]), name


@pytest.fixture
def reference(tmp_path, states):
    """The EMA of the plain safetensors series: what every other format must reproduce."""
    return average_of(save_series(tmp_path / "st", states), tmp_path)


def prefixed(state, prefix):
    return {prefix + name: tensor for name, tensor in state.items()}


class TestTorchInputs:
    def test_flat_state_dict(self, tmp_path, states, reference):
        paths = []
        for i, state in enumerate(states, 1):
            torch.save(state, tmp_path / f"step_{i}.pt")
            paths.append(tmp_path / f"step_{i}.pt")
        assert_same_tensors(average_of(paths, tmp_path, "out.safetensors"), reference)

    def test_timm_style_state_dict_and_ema(self, tmp_path, states, reference):
        ema_states = perturbed_states(len(states), seed=7)
        paths = []
        for i, (state, ema) in enumerate(zip(states, ema_states, strict=True), 1):
            content = {
                "epoch": i,
                "arch": "smallnet",
                "state_dict": state,
                "state_dict_ema": ema,
                "optimizer": {"state": {0: {"momentum_buffer": torch.randn(10, 4)}}},
                "metric": 0.5,
            }
            torch.save(content, tmp_path / f"checkpoint-{i}.pth.tar")  # as timm's train.py names them
            paths.append(tmp_path / f"checkpoint-{i}.pth.tar")
        assert_same_tensors(average_of(paths, tmp_path, "a.safetensors"), reference)
        ema_reference = average_of(save_series(tmp_path / "ema_st", ema_states), tmp_path, "b.safetensors")
        assert_same_tensors(average_of(paths, tmp_path, "c.safetensors", key="state_dict_ema"), ema_reference)

    def test_torchvision_reference_style_with_module_prefix_and_n_averaged(self, tmp_path, states, reference):
        paths = []
        for i, state in enumerate(states, 1):
            model_ema = {"n_averaged": torch.tensor(i), **prefixed(state, "module.")}
            content = {
                "model": state,
                "model_ema": model_ema,
                "optimizer": {},
                "lr_scheduler": {},
                "epoch": i,
                "args": argparse.Namespace(lr=0.1, data_path="/data"),
            }
            torch.save(content, tmp_path / f"model_{i}.pth")
            paths.append(tmp_path / f"model_{i}.pth")
        assert_same_tensors(average_of(paths, tmp_path, "a.safetensors"), reference)
        # AveragedModel's counter is dropped and its `module.` stripped: the plain model's state
        assert_same_tensors(average_of(paths, tmp_path, "b.safetensors", key="model_ema"), reference)
        stripped = average_of(paths, tmp_path, "c.safetensors", key="model_ema", strip_prefix=["module."])
        assert_same_tensors(stripped, reference)

    def test_lightning_style_ckpt(self, tmp_path, states, reference, monkeypatch):
        # Lightning keeps hyper-parameters in its AttributeDict; made here without installing Lightning.
        module = types.ModuleType("lightning.fabric.utilities.data")
        for parent in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))

        class AttributeDict(dict):
            pass

        AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
        module.AttributeDict = AttributeDict
        monkeypatch.setitem(sys.modules, module.__name__, module)
        paths = []
        for i, state in enumerate(states, 1):
            content = {
                "epoch": i,
                "global_step": 100 * i,
                "pytorch-lightning_version": "2.4.0",
                "state_dict": prefixed(state, "model."),
                "optimizer_states": [{}],
                "lr_schedulers": [],
                "hyper_parameters": AttributeDict(lr=0.1, layers=3),
            }
            torch.save(content, tmp_path / f"epoch={i}-step={100 * i}.ckpt")
            paths.append(tmp_path / f"epoch={i}-step={100 * i}.ckpt")
        assert_same_tensors(
            average_of(paths, tmp_path, "out.safetensors", strip_prefix=["model."]), reference
        )

    def test_hugging_face_sharded_bin_folders(self, tmp_path, states, reference):
        for i, state in enumerate(states, 1):
            folder = tmp_path / "run" / f"step_{i}"
            save_torch_shards(folder, state, split=4)
            (folder / "config.json").write_text("{}")
        assert_same_tensors(
            average_of([str(tmp_path / "run" / "step_*")], tmp_path, "out.safetensors"), reference
        )

    def test_legacy_non_zip_file(self, tmp_path, states, reference):
        paths = []
        for i, state in enumerate(states, 1):
            torch.save(state, tmp_path / f"s{i}.pt", _use_new_zipfile_serialization=False)
            paths.append(tmp_path / f"s{i}.pt")
        assert_same_tensors(average_of(paths, tmp_path, "out.safetensors"), reference)

    def test_formats_can_be_mixed(self, tmp_path, states, reference):
        st = save_series(tmp_path / "st", states)
        torch.save(states[-1], tmp_path / "st" / "step_5.pt")
        st[-1].unlink()
        assert_same_tensors(
            average_of([*st[:-1], tmp_path / "st" / "step_5.pt"], tmp_path, "o.safetensors"), reference
        )

    def test_plan_says_which_key_and_prefixes(self, tmp_path, states):
        torch.save({"model": prefixed(states[0], "module."), "epoch": 1, "note": "x"}, tmp_path / "a.pt")
        with ckptavg.open_checkpoints([tmp_path / "a.pt"], strip_prefix=["module."]) as (ck,):
            assert ck.notes == ["torch, key 'model'", "stripped 'module.'"]
            plan = ckptavg.build_plan([ck], ckptavg.swa())
            assert "a.pt  (torch, key 'model'; stripped 'module.')" in "\n".join(plan.describe())

    def test_non_tensor_entries_are_skipped_and_counted(self, tmp_path, states):
        torch.save({"state_dict": {**states[0], "_metadata_version": 2, "note": "x"}}, tmp_path / "a.pt")
        with ckptavg.open_checkpoints([tmp_path / "a.pt"]) as (ck,):
            assert "2 non-tensor entries skipped" in ck.notes
            assert set(ck.tensors) == set(states[0])

    def test_missing_key_lists_what_is_there(self, tmp_path, states):
        torch.save({"model": states[0], "epoch": 1}, tmp_path / "a.pt")
        with pytest.raises(
            InputError, match=r"a\.pt: has no 'model_ema' \(top-level keys: 'model', 'epoch'\)"
        ):
            ckptavg.open_checkpoint(tmp_path / "a.pt", key="model_ema")

    def test_no_weights_found(self, tmp_path):
        torch.save({"epoch": 1, "step": 2}, tmp_path / "a.pt")
        with pytest.raises(InputError, match=r"no weights found .* choose a key with `key`"):
            ckptavg.open_checkpoint(tmp_path / "a.pt")

    def test_stripping_into_duplicate_names_is_refused(self, tmp_path):
        torch.save({"module.w": torch.ones(1), "w": torch.ones(1)}, tmp_path / "a.pt")
        with pytest.raises(InputError, match=r"'module\.w' and 'w' are both 'w' after stripping"):
            ckptavg.open_checkpoint(tmp_path / "a.pt", strip_prefix=["module."])

    def test_not_a_torch_file(self, tmp_path):
        (tmp_path / "a.pt").write_bytes(b"not a checkpoint at all")
        with pytest.raises(InputError, match=r"a\.pt: not a readable torch checkpoint"):
            ckptavg.open_checkpoint(tmp_path / "a.pt")


class Exploit:
    """A pickle that creates a file when loaded without weights_only."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class UserConfig:
    pass


class TestSecurity:
    def test_code_in_a_pickle_never_runs(self, tmp_path, states):
        marker = tmp_path / "pwned"
        torch.save({"state_dict": states[0], "payload": Exploit(marker)}, tmp_path / "evil.pt")
        with pytest.raises(
            InputError, match=r"evil\.pt: refused: loading it needs io\.open, which could run code"
        ):
            ckptavg.average([tmp_path / "evil.pt"], ckptavg.swa(), out=tmp_path / "o.safetensors")
        assert not marker.exists()
        assert not (tmp_path / "o.safetensors").exists()

    def test_unknown_classes_are_named(self, tmp_path, states):
        torch.save({"state_dict": states[0], "config": UserConfig()}, tmp_path / "a.pt")
        with pytest.raises(InputError, match=r"needs test_formats\.UserConfig"):
            ckptavg.open_checkpoint(tmp_path / "a.pt")


class TestTiedTensors:
    def tied_state(self, seed):
        torch.manual_seed(seed)
        embedding = torch.randn(6, 4)
        return {"embed.weight": embedding, "head.weight": embedding, "head.bias": torch.randn(6)}

    def test_tied_tensors_are_averaged_once_and_keep_both_names(self, tmp_path):
        paths = []
        for i in range(3):
            torch.save(self.tied_state(i), tmp_path / f"s{i}.pt")
            paths.append(tmp_path / f"s{i}.pt")
        plan = ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "o.safetensors")
        assert [t.name for t in plan.computed] == ["embed.weight", "head.bias"]
        assert "tied:       'head.weight' = 'embed.weight'" in "\n".join(plan.describe())
        ours = load_file(tmp_path / "o.safetensors")
        expected = sum(self.tied_state(i)["embed.weight"] for i in range(3)) / 3
        torch.testing.assert_close(ours["embed.weight"], expected)
        assert torch.equal(ours["head.weight"], ours["embed.weight"])

    def test_ties_must_hold_in_every_input(self, tmp_path):
        torch.save(self.tied_state(0), tmp_path / "s0.pt")
        untied = {k: v.clone() for k, v in self.tied_state(1).items()}
        torch.save(untied, tmp_path / "s1.pt")
        plan = ckptavg.average(
            [tmp_path / "s0.pt", tmp_path / "s1.pt"], ckptavg.swa(), out=tmp_path / "o.safetensors"
        )
        assert len(plan.computed) == 3


class TestTorchOutput:
    def test_plain_state_dict(self, tmp_path, series, reference):
        ckptavg.average(series, ckptavg.ema(0.8), out=tmp_path / "ema.pt")
        loaded = torch.load(tmp_path / "ema.pt", weights_only=True)
        assert_same_tensors(loaded, reference)

    def test_keeps_the_order_of_a_torch_input(self, tmp_path, states):
        torch.save(states[0], tmp_path / "a.pt")
        ckptavg.average([tmp_path / "a.pt"], ckptavg.swa(), out=tmp_path / "o.pt")
        assert list(torch.load(tmp_path / "o.pt", weights_only=True)) == list(states[0])
        assert temp_files(tmp_path) == []

    def test_wrapped_with_provenance(self, tmp_path, series, reference):
        ckptavg.average(series, ckptavg.ema(0.8), out=tmp_path / "ema.pth", wrap_key="model")
        loaded = torch.load(tmp_path / "ema.pth", weights_only=True)
        assert_same_tensors(loaded["model"], reference)
        assert loaded["ckptavg"]["ckptavg.method"] == "ema"

    def test_empty_and_scalar_tensors(self, tmp_path):
        state = {"empty": torch.ones(0, 3), "scalar": torch.tensor(2.0), "w": torch.ones(3)}
        save_file(state, tmp_path / "a.safetensors")
        ckptavg.average([tmp_path / "a.safetensors"], ckptavg.swa(), out=tmp_path / "o.bin")
        assert_same_tensors(torch.load(tmp_path / "o.bin", weights_only=True), state)

    def test_wrap_key_needs_a_torch_output(self, tmp_path, series):
        with pytest.raises(OutputError, match="`wrap_key` applies to torch outputs"):
            ckptavg.average(series, ckptavg.swa(), out=tmp_path / "o.safetensors", wrap_key="model")

    def test_unknown_suffix(self, tmp_path, series):
        with pytest.raises(OutputError, match=r"o\.npz: give a file ending in \.safetensors, \.pt"):
            ckptavg.average(series, ckptavg.swa(), out=tmp_path / "o.npz")


class TestHuggingFaceFolders:
    def trainer_run(self, tmp_path, states):
        run = tmp_path / "run"
        for i, state in zip((500, 1000, 1500, 2000, 2500), states, strict=True):
            folder = run / f"checkpoint-{i}"
            folder.mkdir(parents=True)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps({"step": i}))
            (folder / "tokenizer.json").write_text("{}")
            for junk in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
                (folder / junk).write_bytes(b"trainer state")
            (folder / "trainer_state.json").write_text("{}")
        return run

    def test_trainer_run_expands_in_step_order(self, tmp_path, states, reference):
        run = self.trainer_run(tmp_path, states)
        assert_same_tensors(average_of([run], tmp_path, "o.safetensors"), reference)

    def test_folder_output_takes_the_last_inputs_config(self, tmp_path, states, reference):
        run = self.trainer_run(tmp_path, states)
        plan = ckptavg.average([str(run / "checkpoint-*")], ckptavg.ema(0.8), out=f"{tmp_path}/ema/")
        out = tmp_path / "ema"
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        assert json.loads((out / "config.json").read_text()) == {"step": 2500}
        assert "copies:     config.json, tokenizer.json" in "\n".join(plan.describe())
        assert_same_tensors(load_file(out / "model.safetensors"), reference)

    def test_folder_written_by_ckptavg_can_be_replaced(self, tmp_path, states):
        run = self.trainer_run(tmp_path, states)
        ckptavg.average([run], ckptavg.swa(), out=f"{tmp_path}/swa/")
        ckptavg.average([run], ckptavg.ema(0.5), out=f"{tmp_path}/swa/", force=True)
        with safe_open(tmp_path / "swa" / "model.safetensors", "pt") as f:
            assert f.metadata()["ckptavg.method"] == "ema"

    def test_a_users_folder_is_never_replaced(self, tmp_path, states):
        run = self.trainer_run(tmp_path, states)
        with pytest.raises(OutputError, match="holds files that ckptavg did not write"):
            ckptavg.average(
                [str(run / "checkpoint-*")][:1], ckptavg.swa(), out=f"{tmp_path}/run/", force=True
            )


class TestTransformersModels:
    """A tiny GPT-2 (tied embeddings) saved by transformers itself, averaged, loaded back."""

    @pytest.fixture
    def copies(self):
        transformers = needed_module("transformers")
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(transformers.GPT2LMHeadModel(config))
        return transformers, models

    def expected(self, models):
        from torch.optim.swa_utils import AveragedModel

        averaged = AveragedModel(models[0], use_buffers=True)
        for model in models:  # the first update copies
            averaged.update_parameters(model)
        return averaged.module.state_dict()

    def check(self, transformers, out, expected):
        loaded = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
        for name, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(loaded[name], value, msg=name)

    def test_sharded_safetensors_folders(self, tmp_path, copies):
        transformers, models = copies
        expected = self.expected(models)
        for i, model in enumerate(models):
            model.save_pretrained(tmp_path / f"step_{i}", max_shard_size="20KB")
        ckptavg.average(
            [str(tmp_path / "step_*")], ckptavg.swa(), out=f"{tmp_path}/swa/", max_shard_size="30kB"
        )
        assert (tmp_path / "swa" / "model.safetensors.index.json").exists()
        self.check(transformers, tmp_path / "swa", expected)

    def test_pytorch_model_bin_folders(self, tmp_path, copies):
        transformers, models = copies
        expected = self.expected(models)
        for i, model in enumerate(models):
            folder = tmp_path / f"step_{i}"
            model.config.save_pretrained(folder)
            torch.save(model.state_dict(), folder / "pytorch_model.bin")  # lm_head tied to wte in the file
        plan = ckptavg.average([str(tmp_path / "step_*")], ckptavg.swa(), out=f"{tmp_path}/swa/")
        assert any(t.same_as == "transformer.wte.weight" for t in plan.tensors)
        self.check(transformers, tmp_path / "swa", expected)
