import pytest

from ckptavg.errors import InputError
from ckptavg.inputs.folders import natural_key
from ckptavg.inputs.specs import resolve_sources as resolve


def resolve_sources(specs, **options):
    return [source.path for source in resolve(specs, **options)]


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


class TestResolveSources:
    def test_natural_order_whatever_the_given_order(self, tmp_path):
        paths = [touch(tmp_path / f"step_{n}.safetensors") for n in (10, 2, 1)]
        assert resolve_sources(paths) == [paths[2], paths[1], paths[0]]

    def test_keep_order(self, tmp_path):
        paths = [touch(tmp_path / f"step_{n}.safetensors") for n in (10, 2)]
        assert resolve_sources(paths, keep_order=True) == paths

    def test_quoted_glob_is_expanded(self, tmp_path):
        for n in (1, 2, 10):
            touch(tmp_path / f"step_{n}.safetensors")
        touch(tmp_path / "notes.txt")
        found = resolve_sources([str(tmp_path / "step_*.safetensors")])
        assert [p.name for p in found] == [
            "step_1.safetensors",
            "step_2.safetensors",
            "step_10.safetensors",
        ]

    def test_glob_matching_nothing(self, tmp_path):
        with pytest.raises(InputError, match="matches no file"):
            resolve_sources([str(tmp_path / "*.safetensors")])

    def test_folder_with_model_safetensors(self, tmp_path):
        model = touch(tmp_path / "run" / "model.safetensors")
        assert resolve_sources([tmp_path / "run"]) == [model]

    def test_folder_with_shard_index_is_one_input(self, tmp_path):
        index = touch(tmp_path / "run" / "model.safetensors.index.json")
        touch(tmp_path / "run" / "model-00001-of-00002.safetensors")
        touch(tmp_path / "run" / "model-00002-of-00002.safetensors")
        assert resolve_sources([tmp_path / "run"]) == [index]

    def test_folders_of_steps_sort_naturally(self, tmp_path):
        for n in (10, 9):
            touch(tmp_path / f"step_{n}" / "model.safetensors")
        found = resolve_sources([str(tmp_path / "step_*")])
        assert [p.parent.name for p in found] == ["step_9", "step_10"]

    def test_folder_of_several_files_asks_for_a_pattern(self, tmp_path):
        touch(tmp_path / "a.safetensors")
        touch(tmp_path / "b.safetensors")
        with pytest.raises(
            InputError,
            match=r"holds the weights of 2 models \('a', 'b'\): take one with `weights_name=a`"
            r".*\*\.safetensors",
        ):
            resolve_sources([tmp_path])

    def test_empty_folder(self, tmp_path):
        with pytest.raises(InputError, match=r"holds no checkpoint"):
            resolve_sources([tmp_path])

    def test_missing_file(self, tmp_path):
        with pytest.raises(InputError, match="no such file or folder"):
            resolve_sources([tmp_path / "nope.safetensors"])

    def test_no_inputs(self):
        with pytest.raises(InputError, match="no input checkpoints"):
            resolve_sources([])


def test_natural_key_orders_numbers_by_value():
    names = ["ckpt_100", "ckpt_20", "ckpt_3", "ckpt_20b"]
    assert sorted(names, key=natural_key) == ["ckpt_3", "ckpt_20", "ckpt_20b", "ckpt_100"]


class TestLinks:
    def test_a_recursive_glob_does_not_follow_a_link_to_its_own_folder(self, tmp_path):
        run = tmp_path / "run"
        paths = [touch(run / "a" / "step_1.safetensors"), touch(run / "b" / "c" / "step_2.safetensors")]
        (run / "a" / "loop").symlink_to("..")
        (run / "b" / "up").symlink_to(tmp_path)
        assert resolve_sources([str(run / "**" / "*.safetensors")]) == paths

    def test_a_circular_link_as_input(self, tmp_path):
        (tmp_path / "a.safetensors").symlink_to("b.safetensors")
        (tmp_path / "b.safetensors").symlink_to("a.safetensors")
        with pytest.raises(InputError, match="a symbolic link to nothing"):
            resolve_sources([tmp_path / "a.safetensors"])

    def test_a_circular_link_in_a_folder_is_passed_over_unless_it_is_the_weights(self, tmp_path):
        weights = touch(tmp_path / "model" / "model.safetensors")
        (tmp_path / "model" / "self").symlink_to("self")
        assert resolve_sources([tmp_path / "model"]) == [weights]


class TestOneModelPerFolder:
    """A folder's files are one model's weights in one or more forms, or several models to choose from."""

    def test_the_same_model_in_two_forms_takes_safetensors(self, tmp_path):
        best = touch(tmp_path / "m" / "model.safetensors")
        touch(tmp_path / "m" / "pytorch_model.bin")
        touch(tmp_path / "m" / "model.fp16.safetensors")
        assert resolve_sources([tmp_path / "m"]) == [best]

    def test_shards_are_read_through_their_index(self, tmp_path):
        for i in (1, 2):
            touch(tmp_path / "m" / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors")
        index = touch(tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json")
        assert resolve_sources([tmp_path / "m"]) == [index]
        index.unlink()
        with pytest.raises(InputError, match=r"holds shards .* but not their \.index\.json index"):
            resolve_sources([tmp_path / "m"])

    def test_accelerate_folders_with_two_models(self, tmp_path):
        for step in (1, 2):
            for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"):
                touch(tmp_path / "run" / f"step_{step}" / name)
            touch(tmp_path / "run" / f"step_{step}" / "random_states_0.pkl")
        with pytest.raises(
            InputError, match=r"step_1: holds the weights of 2 models \('model', 'model_1'\): take one with"
        ):
            resolve_sources([str(tmp_path / "run" / "step_*")])
        second = resolve_sources([str(tmp_path / "run" / "step_*")], weights_name="model_1")
        assert [p.relative_to(tmp_path / "run").as_posix() for p in second] == [
            "step_1/model_1.safetensors",
            "step_2/model_1.safetensors",
        ]
        with pytest.raises(
            InputError, match=r"holds no weights named model_7 \(it holds 'model', 'model_1'\)"
        ):
            resolve_sources([tmp_path / "run" / "step_1"], weights_name="model_7")


def trainer_fsdp_checkpoint(folder, models=("pytorch_model_fsdp_0",)):
    """A Trainer's checkpoint-N saved by accelerate with FSDP's sharded state dict."""
    for name in (*models, "optimizer_0"):
        touch(folder / name / ".metadata")
        touch(folder / name / "__0_0.distcp")
        touch(folder / name / "__1_0.distcp")
    for name in ("scheduler.pt", "rng_state_0.pth", "trainer_state.json", "training_args.bin"):
        touch(folder / name)
    return folder / models[0]


class TestTrainerFsdpFolders:
    def test_a_checkpoint_is_its_fsdp_model_folder(self, tmp_path):
        model = trainer_fsdp_checkpoint(tmp_path / "checkpoint-10")
        assert resolve_sources([tmp_path / "checkpoint-10"]) == [model]

    def test_a_run_of_them_in_step_order(self, tmp_path):
        models = [trainer_fsdp_checkpoint(tmp_path / f"checkpoint-{n}") for n in (20, 10)]
        assert resolve_sources([tmp_path]) == models[::-1]

    def test_every_form_of_checkpoint_n_in_one_run(self, tmp_path):
        fsdp = trainer_fsdp_checkpoint(tmp_path / "checkpoint-10")
        hf = touch(tmp_path / "checkpoint-20" / "model.safetensors")
        touch(tmp_path / "checkpoint-30" / ".metadata")
        touch(tmp_path / "checkpoint-30" / "__0_0.distcp")
        assert resolve_sources([tmp_path]) == [fsdp, hf, tmp_path / "checkpoint-30"]

    def test_several_models_ask_for_weights_name(self, tmp_path):
        trainer_fsdp_checkpoint(tmp_path / "checkpoint-10", ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1"))
        with pytest.raises(
            InputError,
            match=r"checkpoint-10: holds the FSDP checkpoints of 2 models \('pytorch_model_fsdp_0', "
            r"'pytorch_model_fsdp_1'\): take one with `weights_name=pytorch_model_fsdp_0`",
        ):
            resolve_sources([tmp_path])
        found = resolve_sources([tmp_path], weights_name="pytorch_model_fsdp_1")
        assert found == [tmp_path / "checkpoint-10" / "pytorch_model_fsdp_1"]

    def test_a_save_under_way(self, tmp_path):
        trainer_fsdp_checkpoint(tmp_path / "checkpoint-10")
        touch(tmp_path / "checkpoint-20" / "__0_0.distcp")
        with pytest.raises(
            InputError, match=r"checkpoint-20: holds no checkpoint \(its \*\.distcp files have no \.metadata"
        ):
            resolve_sources([tmp_path])

    def test_dcp_step_folders_beside_checkpoint_n_folders(self, tmp_path):
        touch(tmp_path / "step-10" / ".metadata")
        touch(tmp_path / "checkpoint-20" / "model.safetensors")
        with pytest.raises(
            InputError,
            match=r"holds DCP step folders \(step-10, \.\.\.\) and checkpoint-\* folders \(checkpoint-20, "
            r"\.\.\.\); pass the ones to average",
        ):
            resolve_sources([tmp_path])
