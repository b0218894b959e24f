"""End-to-end averaging through the library, against torch's own AveragedModel."""

import pytest
import torch
from conftest import SmallNet, perturbed_states, save_series, temp_files
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel

import ckptavg
from ckptavg.errors import InputError, MismatchError, OutputError
from ckptavg.plan.spans import spans


def torch_average(states, decay=None):
    """What torch computes: AveragedModel (SWA) or torchvision's reference EMA, over the buffers too."""
    model = SmallNet()
    avg_fn = None if decay is None else (lambda avg, param, n: decay * avg + (1 - decay) * param)
    averaged = AveragedModel(model, avg_fn=avg_fn, use_buffers=True)
    for state in states:
        model.load_state_dict(state)
        averaged.update_parameters(model)
    return averaged.module.state_dict()


def assert_matches_torch(ours, expected, states, dtype):
    for name, value in expected.items():
        if value.is_floating_point():
            assert ours[name].dtype == dtype
            want = value.to(dtype)
            tolerance = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
            torch.testing.assert_close(ours[name], want, **tolerance)
        else:
            assert torch.equal(ours[name], states[-1][name]), f"{name} must be the last checkpoint's"


class TestAgainstAveragedModel:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_swa_matches_averaged_model(self, tmp_path, states, dtype):
        paths = save_series(tmp_path / "ckpts", states, dtype=dtype)
        ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "swa.safetensors")
        rounded = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()} for s in states]
        expected = torch_average(
            [{k: v.float() if v.is_floating_point() else v for k, v in s.items()} for s in rounded]
        )
        assert_matches_torch(load_file(tmp_path / "swa.safetensors"), expected, states, dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
    def test_ema_matches_torchvision_reference(self, tmp_path, states, dtype, decay):
        paths = save_series(tmp_path / "ckpts", states, dtype=dtype)
        ckptavg.average(paths, ckptavg.ema(decay), out=tmp_path / "ema.safetensors")
        rounded = [
            {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in s.items()} for s in states
        ]
        assert_matches_torch(
            load_file(tmp_path / "ema.safetensors"), torch_average(rounded, decay), states, dtype
        )

    def test_natural_order_decides_ema_order(self, tmp_path):
        states = perturbed_states(12)
        paths = save_series(tmp_path / "ckpts", states)  # step_1 ... step_12
        shuffled = [paths[i] for i in (11, 0, 9, 1, 10, 2, 3, 8, 4, 7, 5, 6)]
        ckptavg.average(shuffled, ckptavg.ema(0.8), out=tmp_path / "ema.safetensors")
        assert_matches_torch(
            load_file(tmp_path / "ema.safetensors"),
            torch_average(states, 0.8),
            states,
            torch.float32,
        )

    def test_keep_order_follows_the_given_order(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states)
        ckptavg.average(paths[::-1], ckptavg.ema(0.8), out=tmp_path / "ema.safetensors", keep_order=True)
        ours = load_file(tmp_path / "ema.safetensors")
        expected = torch_average(states[::-1], 0.8)
        torch.testing.assert_close(ours["fc.weight"], expected["fc.weight"])
        assert torch.equal(ours["bn.num_batches_tracked"], states[0]["bn.num_batches_tracked"])


class TestEngine:
    def test_large_tensors_are_summed_in_chunks(self, tmp_path, monkeypatch, states):
        monkeypatch.setattr(
            "ckptavg.run.engine.CHUNK_ELEMENTS", 7
        )  # smaller than most tensors, odd on purpose
        paths = save_series(tmp_path / "ckpts", states, dtype=torch.bfloat16)
        ckptavg.average(paths, ckptavg.ema(0.7), out=tmp_path / "ema.safetensors", dtype="float32")
        rounded = [
            {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in s.items()} for s in states
        ]
        assert_matches_torch(
            load_file(tmp_path / "ema.safetensors"),
            torch_average(rounded, 0.7),
            states,
            torch.float32,
        )

    def test_sums_leave_a_core_to_a_page_cache_writer_then_restore_torch_threads(
        self, tmp_path, series, monkeypatch, output_io
    ):
        """Only a writer copying into the page cache needs a core of its own."""
        from ckptavg.run.engine import Engine

        seen, real_sum, failing = [], Engine._sum, []

        def observed_sum(self, *args):
            seen.append(torch.get_num_threads())
            if failing:
                raise RuntimeError("interrupted mid-run")
            return real_sum(self, *args)

        monkeypatch.setattr(Engine, "_sum", observed_sum)
        before = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            ckptavg.average(series, ckptavg.swa(), out=tmp_path / "a.safetensors")
            assert torch.get_num_threads() == 3
            failing.append(True)
            with pytest.raises(RuntimeError, match="interrupted"):
                ckptavg.average(series, ckptavg.swa(), out=tmp_path / "b.safetensors")
            assert torch.get_num_threads() == 3
        finally:
            torch.set_num_threads(before)
        assert len(seen) > 1 and set(seen) == ({3} if output_io == "direct" else {2})

    def test_inputs_may_mix_dtypes_per_tensor(self, tmp_path, states):
        fp32 = save_series(tmp_path / "a", states[:2], name="step_{}")
        bf16 = save_series(tmp_path / "b", states[2:], dtype=torch.bfloat16, name="step_{}")
        ckptavg.average(fp32 + bf16, ckptavg.swa(), out=tmp_path / "swa.safetensors", keep_order=True)
        ours = load_file(tmp_path / "swa.safetensors")
        inputs = states[:2] + [
            {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in s.items()}
            for s in states[2:]
        ]
        assert_matches_torch(ours, torch_average(inputs), states, torch.float32)

    def test_output_dtype_can_be_chosen(self, tmp_path, series):
        ckptavg.average(series, ckptavg.swa(), out=tmp_path / "o.safetensors", dtype="bfloat16")
        ours = load_file(tmp_path / "o.safetensors")
        assert ours["fc.weight"].dtype == torch.bfloat16
        assert ours["bn.num_batches_tracked"].dtype == torch.int64

    def test_float64_accumulation(self, tmp_path):
        states = [{"w": torch.full((4,), 1.0 + i * 1e-9, dtype=torch.float64)} for i in range(3)]
        paths = []
        for i, state in enumerate(states):
            save_file(state, tmp_path / f"s{i}.safetensors")
            paths.append(tmp_path / f"s{i}.safetensors")
        ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "o.safetensors", accum_dtype="float64")
        assert load_file(tmp_path / "o.safetensors")["w"][0].item() == pytest.approx(1.0 + 1e-9, abs=1e-15)

    def test_weighted_average(self, tmp_path, series, states):
        ckptavg.average(series[:3], ckptavg.weighted([1, 1, 2]), out=tmp_path / "o.safetensors")
        ours = load_file(tmp_path / "o.safetensors")
        expected = (
            0.25 * states[0]["fc.weight"] + 0.25 * states[1]["fc.weight"] + 0.5 * states[2]["fc.weight"]
        )
        torch.testing.assert_close(ours["fc.weight"], expected)

    def test_provenance_metadata(self, tmp_path, series):
        ckptavg.average(series, ckptavg.ema(0.9), out=tmp_path / "o.safetensors")
        with safe_open(tmp_path / "o.safetensors", "pt") as f:
            metadata = f.metadata()
        assert metadata["format"] == "pt"
        assert metadata["ckptavg.method"] == "ema"
        assert metadata["ckptavg.params"] == '{"decay": 0.9}'
        assert metadata["ckptavg.version"] == ckptavg.__version__
        inputs = __import__("json").loads(metadata["ckptavg.inputs"])
        assert [i["path"] for i in inputs] == [str(p) for p in series]
        assert [i["weight"] for i in inputs] == pytest.approx(ckptavg.ema(0.9).weights(5))

    def test_single_checkpoint_is_copied(self, tmp_path, series, states):
        plan = ckptavg.average(series[:1], ckptavg.swa(), out=tmp_path / "o.safetensors")
        assert any("output is a copy" in w for w in plan.warnings)
        ours = load_file(tmp_path / "o.safetensors")
        for name, value in states[0].items():
            assert torch.equal(ours[name], value)


class TestSharding:
    def test_sharded_output_loads_through_its_index(self, tmp_path, series, states):
        plan = ckptavg.average(series, ckptavg.swa(), out=f"{tmp_path}/swa/", max_shard_size=300)
        index = __import__("json").loads((tmp_path / "swa" / "model.safetensors.index.json").read_text())
        assert len(plan.files) > 1 and set(index["weight_map"].values()) == {f.name for f in plan.files}
        ours = {}
        for shard in sorted(set(index["weight_map"].values())):
            ours.update(load_file(tmp_path / "swa" / shard))
        assert ours.keys() == index["weight_map"].keys()
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
        assert_matches_torch(ours, torch_average(states), states, torch.float32)

    def test_sharded_inputs_are_one_checkpoint_each(self, tmp_path, series, states):
        for i in (1, 2, 3):
            ckptavg.average(
                [series[i - 1]], ckptavg.swa(), out=f"{tmp_path}/run/step_{i}/", max_shard_size=300
            )
        ckptavg.average([f"{tmp_path}/run/step_*"], ckptavg.swa(), out=tmp_path / "swa.safetensors")
        assert_matches_torch(
            load_file(tmp_path / "swa.safetensors"),
            torch_average(states[:3]),
            states[:3],
            torch.float32,
        )

    def test_folder_output_that_fits_one_file_is_model_safetensors(self, tmp_path, series):
        ckptavg.average(series, ckptavg.swa(), out=f"{tmp_path}/swa/")
        assert [p.name for p in (tmp_path / "swa").iterdir()] == ["model.safetensors"]

    def test_index_naming_a_missing_shard(self, tmp_path, series):
        ckptavg.average(series, ckptavg.swa(), out=f"{tmp_path}/swa/", max_shard_size=300)
        next((tmp_path / "swa").glob("model-00002-*")).unlink()
        with pytest.raises(InputError, match=r"names shard model-00002-of-\d+\.safetensors, which does not"):
            ckptavg.average([tmp_path / "swa", *series], ckptavg.swa(), out=tmp_path / "o.safetensors")


class TestFailures:
    def test_mismatched_names_are_listed(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states[:2])
        save_file(
            {k: v for k, v in states[2].items() if k != "fc.bias"} | {"head.w": torch.ones(1)},
            tmp_path / "ckpts" / "step_3.safetensors",
        )
        with pytest.raises(
            MismatchError,
            match=r"step_3\.safetensors: lacks 1 tensor of .*step_1\.safetensors "
            r"\('fc\.bias'\) and has 1 tensor that .* lacks \('head\.w'\)",
        ):
            ckptavg.average(
                [*paths, tmp_path / "ckpts" / "step_3.safetensors"],
                ckptavg.swa(),
                out=tmp_path / "o.safetensors",
            )
        assert not (tmp_path / "o.safetensors").exists()

    def test_mismatched_shapes_name_the_tensor(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states[:2])
        save_file(states[2] | {"fc.weight": torch.ones(3, 4)}, tmp_path / "ckpts" / "step_3.safetensors")
        with pytest.raises(
            MismatchError,
            match=r"step_3\.safetensors: tensor 'fc\.weight' has shape \(3, 4\), "
            r"expected \(10, 4\) as in .*step_1\.safetensors",
        ):
            ckptavg.average(
                [*paths, tmp_path / "ckpts" / "step_3.safetensors"],
                ckptavg.swa(),
                out=tmp_path / "o.safetensors",
            )

    def test_float_with_integer_is_refused(self, tmp_path, states):
        paths = save_series(tmp_path / "ckpts", states[:2])
        save_file(
            states[1] | {"fc.bias": torch.ones(10, dtype=torch.int32)},
            tmp_path / "ckpts" / "step_3.safetensors",
        )
        with pytest.raises(MismatchError, match=r"tensor 'fc\.bias' is I32 but F32"):
            ckptavg.average(
                [*paths, tmp_path / "ckpts" / "step_3.safetensors"],
                ckptavg.swa(),
                out=tmp_path / "o.safetensors",
            )

    def test_missing_file(self, tmp_path, series):
        with pytest.raises(InputError, match=r"nope\.safetensors: no such file"):
            ckptavg.average(
                [*series, tmp_path / "nope.safetensors"],
                ckptavg.swa(),
                out=tmp_path / "o.safetensors",
            )

    def test_not_a_safetensors_file(self, tmp_path, series):
        (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        with pytest.raises(InputError, match=r"bad\.safetensors: not a readable safetensors file"):
            ckptavg.average(
                [*series, tmp_path / "bad.safetensors"],
                ckptavg.swa(),
                out=tmp_path / "o.safetensors",
            )

    def test_existing_output_needs_force(self, tmp_path, series):
        out = tmp_path / "o.safetensors"
        out.write_bytes(b"keep me")
        with pytest.raises(OutputError, match="already exists; pass `force`"):
            ckptavg.average(series, ckptavg.swa(), out=out)
        assert out.read_bytes() == b"keep me"
        ckptavg.average(series, ckptavg.swa(), out=out, force=True)
        assert "fc.weight" in load_file(out)

    def test_output_that_is_an_input_is_refused_even_with_force(self, tmp_path, series):
        before = series[0].read_bytes()
        with pytest.raises(OutputError, match="is an input"):
            ckptavg.average(series, ckptavg.swa(), out=series[0], force=True)
        assert series[0].read_bytes() == before

    def test_output_folder_holding_inputs_is_refused(self, tmp_path, series):
        with pytest.raises(OutputError, match="is an input"):
            ckptavg.average(series, ckptavg.swa(), out=f"{series[0].parent}/", force=True)

    def test_exception_mid_write_leaves_nothing(self, tmp_path, series, monkeypatch):
        out = tmp_path / "out" / "o.safetensors"
        out.parent.mkdir()
        out.write_bytes(b"previous result")
        calls = {"n": 0}
        from ckptavg.run import writer as writer_module

        real_write = writer_module.SafetensorsWriter.write

        def failing_write(self, name, start, tensor):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device")
            real_write(self, name, start, tensor)

        monkeypatch.setattr(writer_module.SafetensorsWriter, "write", failing_write)
        with pytest.raises(OSError, match="No space left"):
            ckptavg.average(series, ckptavg.swa(), out=out, force=True)
        assert out.read_bytes() == b"previous result"
        assert temp_files(tmp_path) == []

    def test_sharded_output_failure_leaves_no_folder(self, tmp_path, series, monkeypatch):
        from ckptavg.run import writer as writer_module

        def failing_finish(self):
            raise KeyboardInterrupt

        monkeypatch.setattr(writer_module.SafetensorsWriter, "finish", failing_finish)
        with pytest.raises(KeyboardInterrupt):
            ckptavg.average(series, ckptavg.swa(), out=f"{tmp_path}/swa/", max_shard_size=300)
        assert not (tmp_path / "swa").exists()
        assert temp_files(tmp_path) == []

    def test_output_needing_more_than_the_free_space(self, tmp_path, series, monkeypatch):
        import shutil

        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6, 100))
        with pytest.raises(OutputError, match="only 100 B is free there"):
            ckptavg.average(series, ckptavg.swa(), out=tmp_path / "o.safetensors")
        assert not (tmp_path / "o.safetensors").exists()


class TestDevice:
    def test_cuda_without_a_gpu_is_a_clear_error(self, tmp_path, series):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is available here")
        with pytest.raises(ckptavg.CkptavgError, match="no CUDA device is available here; use `device=cpu`"):
            ckptavg.average(series, ckptavg.swa(), out=tmp_path / "o.safetensors", device="cuda")
        assert not (tmp_path / "o.safetensors").exists()

    def test_unknown_device(self, tmp_path, series):
        with pytest.raises(ckptavg.CkptavgError, match="`device=tpu7`: not a device name"):
            ckptavg.average(series, ckptavg.swa(), out=tmp_path / "o.safetensors", device="tpu7")


def test_memory_estimate_counts_only_the_staging_an_output_can_fill(tmp_path, series):
    from ckptavg.run import direct

    with ckptavg.open_checkpoints(series) as checkpoints:
        planned = ckptavg.build_plan(checkpoints, ckptavg.swa())
        written = ckptavg.build_plan(checkpoints, ckptavg.swa(), output=tmp_path / "o.safetensors")
    assert written.output_nbytes < direct.STAGING_BYTES  # SmallNet fills one staging buffer
    assert written.working_bytes - planned.working_bytes == direct.STAGING_BYTES


class TestRuns:
    def test_small_tensors_stored_back_to_back_are_summed_as_one_run(self, tmp_path, series, states):
        with ckptavg.open_checkpoints(series) as checkpoints:
            plan = ckptavg.build_plan(checkpoints, ckptavg.swa(), output=tmp_path / "o.safetensors")
            runs = [span for span in spans(plan) if len(span.tensors) > 1]
            assert len(runs) == 1 and len(runs[0].tensors) == 8  # every float tensor of SmallNet
            ckptavg.run_plan(plan)
        assert_matches_torch(
            load_file(tmp_path / "o.safetensors"), torch_average(states), states, torch.float32
        )

    def test_no_run_where_an_input_lays_tensors_out_differently(self, tmp_path, series, states):
        torch.save(states[2], tmp_path / "middle.pt")
        inputs = [series[0], series[1], tmp_path / "middle.pt", series[3], series[4]]
        with ckptavg.open_checkpoints(inputs, keep_order=True) as checkpoints:
            plan = ckptavg.build_plan(checkpoints, ckptavg.swa(), output=tmp_path / "o.safetensors")
            assert all(len(span.tensors) == 1 for span in spans(plan))
            ckptavg.run_plan(plan)
        assert_matches_torch(
            load_file(tmp_path / "o.safetensors"), torch_average(states), states, torch.float32
        )
