"""bn-update against torch's own update_bn on the same model and the same batches."""

import json

import numpy as np
import pytest
import torch
import torchvision
from bn_sources import KeywordNet, batches, dict_batches
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import update_bn
from torchvision import transforms

import ckptavg
from ckptavg.bn.data import DataOptions
from ckptavg.bn.imports import ImportSpecError
from ckptavg.bn.statistics import BatchNormPass, NoBatchNormError, write_with_new_statistics
from ckptavg.cli import main
from ckptavg.errors import InputError, MismatchError

MODEL = "torchvision.models:resnet18"
KWARGS = {"num_classes": 10}
IMAGE_OPTIONS = {"image_size": 32, "resize_size": 36, "batch_size": 8}
TRANSFORM = transforms.Compose(
    [
        transforms.Resize(36),
        transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)


def resnet(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture
def weights(tmp_path):
    """A resnet18 checkpoint whose BatchNorm statistics are stale (as after averaging)."""
    state = {k: v.clone() for k, v in resnet().state_dict().items()}
    for name, tensor in state.items():
        if name.endswith(("running_mean", "running_var")):
            tensor.uniform_(0.5, 2.0)
    path = tmp_path / "swa.safetensors"
    save_file(state, path, metadata={"format": "pt", "ckptavg.method": "swa"})
    return path


def write_images(folder, count, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for c, name in enumerate(("cat", "dog", "fish")):
        write_images(root / name, 7 + c, seed=c)
    return root


def expected_statistics(weights_path, loader):
    model = resnet(seed=1)  # other random weights: the checkpoint's must be loaded
    model.load_state_dict(load_file(weights_path))
    update_bn(loader, model)
    return model.state_dict()


def run_bn(weights_path, data, out, **options):
    options = {**IMAGE_OPTIONS, "workers": 0, **options}
    bn = BatchNormPass(
        model=MODEL, model_kwargs=KWARGS, device="cpu", data=DataOptions(data=str(data), **options)
    )
    with ckptavg.open_checkpoint(weights_path) as checkpoint:
        plan, batches = write_with_new_statistics(checkpoint, bn, output=out, provenance=checkpoint.metadata)
    return load_file(out), plan, batches


def assert_statistics_match(ours, expected, original):
    for name, value in expected.items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(ours[name], value, msg=name)
        else:
            assert torch.equal(ours[name], original[name]), f"{name} must be copied unchanged"


class TestAgainstUpdateBn:
    def test_image_folder_with_class_subfolders(self, tmp_path, weights, image_folder):
        ours, plan, batches = run_bn(weights, image_folder, tmp_path / "out.safetensors")
        dataset = torchvision.datasets.ImageFolder(image_folder, transform=TRANSFORM)
        expected = expected_statistics(weights, torch.utils.data.DataLoader(dataset, batch_size=8))
        assert_statistics_match(ours, expected, load_file(weights))
        assert batches.samples == 24 and ours["bn1.num_batches_tracked"].item() == 3
        record = json.loads(plan.metadata()["ckptavg.bn"])
        assert record["samples"] == 24 and record["model"] == MODEL
        assert plan.metadata()["ckptavg.method"] == "swa"  # the averaging's record is kept

    def test_flat_folder_with_a_corrupt_image_and_workers(self, tmp_path, weights):
        folder = tmp_path / "flat"
        write_images(folder, 10)
        (folder / "img_04.png").write_bytes(b"not a png")
        ours, _, batches = run_bn(weights, folder, tmp_path / "out.safetensors", workers=2)
        assert len(batches.skipped) == 1 and "img_04.png" in batches.skipped[0]
        good = sorted(p for p in folder.iterdir() if p.name != "img_04.png")
        images = [TRANSFORM(Image.open(p).convert("RGB")) for p in good]
        # The bad file sits in the first batch of 8, so that batch holds 7 images.
        loader = [torch.stack(images[:7]), torch.stack(images[7:])]
        assert_statistics_match(ours, expected_statistics(weights, loader), load_file(weights))

    def test_strict_data_refuses_a_corrupt_image(self, tmp_path, weights):
        folder = tmp_path / "flat"
        write_images(folder, 3)
        (folder / "img_01.png").write_bytes(b"not a png")
        with pytest.raises(InputError, match=r"unreadable image: .*img_01\.png .*drop `strict_data`"):
            run_bn(weights, folder, tmp_path / "out.safetensors", strict_data=True)
        assert not (tmp_path / "out.safetensors").exists()

    @pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
    def test_tensor_file(self, tmp_path, weights, suffix):
        inputs = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        path = tmp_path / f"inputs{suffix}"
        if suffix == ".safetensors":
            save_file({"inputs": inputs}, path)
        elif suffix == ".pt":
            torch.save({"inputs": inputs, "labels": torch.zeros(20)}, path)
        else:
            np.save(path, inputs.numpy())
        options = {"data_key": "inputs"} if suffix == ".pt" else {}
        ours, _, _ = run_bn(weights, path, tmp_path / "out.safetensors", batch_size=6, **options)
        expected = expected_statistics(weights, list(inputs.split(6)))
        assert_statistics_match(ours, expected, load_file(weights))

    def test_samples_are_drawn_with_the_seed(self, tmp_path, weights):
        inputs = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        save_file({"x": inputs}, tmp_path / "inputs.safetensors")
        ours, _, batches = run_bn(
            weights,
            tmp_path / "inputs.safetensors",
            tmp_path / "out.safetensors",
            batch_size=4,
            samples=8,
            seed=11,
        )
        chosen = sorted(torch.randperm(20, generator=torch.Generator().manual_seed(11))[:8].tolist())
        expected = expected_statistics(weights, list(inputs[chosen].split(4)))
        assert batches.samples == 8
        assert_statistics_match(ours, expected, load_file(weights))

    def test_callable_returning_batches(self, tmp_path, weights):
        ours, _, _ = run_bn(weights, "bn_sources:batches", tmp_path / "out.safetensors", max_batches=4)
        expected = expected_statistics(weights, batches()[:4])
        assert_statistics_match(ours, expected, load_file(weights))

    def test_dict_batches_call_the_model_with_keywords(self, tmp_path):
        torch.manual_seed(0)
        model = KeywordNet()
        save_file(model.state_dict(), tmp_path / "kw.safetensors")
        bn = BatchNormPass(
            model="bn_sources:KeywordNet", device="cpu", data=DataOptions(data="bn_sources:dict_batches")
        )
        with ckptavg.open_checkpoint(tmp_path / "kw.safetensors") as checkpoint:
            write_with_new_statistics(checkpoint, bn, output=tmp_path / "out.safetensors", provenance={})
        update_bn([b["pixels"] for b in dict_batches()], model)
        torch.testing.assert_close(
            load_file(tmp_path / "out.safetensors")["bn.running_var"], model.bn.running_var
        )

    def test_chained_after_swa(self, tmp_path, image_folder):
        paths = []
        for seed in range(3):
            paths.append(tmp_path / f"step_{seed}.safetensors")
            save_file(resnet(seed).state_dict(), paths[-1])
        bn = BatchNormPass(
            model=MODEL,
            model_kwargs=KWARGS,
            device="cpu",
            data=DataOptions(data=str(image_folder), workers=0, **IMAGE_OPTIONS),
        )
        plan = ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "swa_bn.safetensors", bn=bn)
        ckptavg.average(paths, ckptavg.swa(), out=tmp_path / "swa.safetensors")
        dataset = torchvision.datasets.ImageFolder(image_folder, transform=TRANSFORM)
        expected = expected_statistics(
            tmp_path / "swa.safetensors", torch.utils.data.DataLoader(dataset, batch_size=8)
        )
        ours = load_file(tmp_path / "swa_bn.safetensors")
        assert_statistics_match(ours, expected, load_file(tmp_path / "swa.safetensors"))
        with safe_open(tmp_path / "swa_bn.safetensors", "pt") as f:
            metadata = f.metadata()
        assert metadata["ckptavg.method"] == "swa" and len(json.loads(metadata["ckptavg.inputs"])) == 3
        assert json.loads(metadata["ckptavg.bn"])["samples"] == 24
        assert plan.output == tmp_path / "swa_bn.safetensors"
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
            "step_0.safetensors",
            "step_1.safetensors",
            "step_2.safetensors",
            "swa.safetensors",
            "swa_bn.safetensors",
        ]


class TestBadInput:
    def test_model_without_batchnorm(self, tmp_path, weights, image_folder):
        bn = BatchNormPass(model="torch.nn:Identity", device="cpu", data=DataOptions(data=str(image_folder)))
        with (
            ckptavg.open_checkpoint(weights) as checkpoint,
            pytest.raises(NoBatchNormError, match="no BatchNorm"),
        ):
            write_with_new_statistics(checkpoint, bn, output=tmp_path / "out.safetensors", provenance={})
        assert not (tmp_path / "out.safetensors").exists()

    def test_weights_that_do_not_fit_suggest_strip_prefix(self, tmp_path, image_folder):
        save_file({f"module.{k}": v for k, v in resnet().state_dict().items()}, tmp_path / "ddp.safetensors")
        with pytest.raises(MismatchError, match=r"122 missing .* try `strip_prefix=module\.`"):
            run_bn(tmp_path / "ddp.safetensors", image_folder, tmp_path / "out.safetensors")

    def test_wrong_model_kwargs(self, tmp_path, weights, image_folder):
        bn = BatchNormPass(
            model=MODEL,
            model_kwargs={"num_classes": 7},
            device="cpu",
            data=DataOptions(data=str(image_folder)),
        )
        with (
            ckptavg.open_checkpoint(weights) as checkpoint,
            pytest.raises(MismatchError, match=r"'fc\.weight' has shape"),
        ):
            write_with_new_statistics(checkpoint, bn, output=tmp_path / "out.safetensors", provenance={})

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("nonexistent_package_xyz.nets:build", "cannot import nonexistent_package_xyz"),
            ("torchvision.models:resnet_nope", "has no 'resnet_nope'"),
            ("resnet18", "write it as package.module:callable"),
        ],
    )
    def test_import_specs_that_do_not_resolve(self, tmp_path, weights, image_folder, spec, message):
        bn = BatchNormPass(model=spec, device="cpu", data=DataOptions(data=str(image_folder)))
        with ckptavg.open_checkpoint(weights) as checkpoint, pytest.raises(ImportSpecError, match=message):
            write_with_new_statistics(checkpoint, bn, output=tmp_path / "out.safetensors", provenance={})

    def test_no_images(self, tmp_path, weights):
        (tmp_path / "empty" / "class").mkdir(parents=True)
        with pytest.raises(InputError, match="no images"):
            run_bn(weights, tmp_path / "empty", tmp_path / "out.safetensors")

    def test_a_failing_callable(self, tmp_path, weights):
        with pytest.raises(InputError, match="calling it failed: RuntimeError: no data today"):
            run_bn(weights, "bn_sources:broken", tmp_path / "out.safetensors")


def bn_update(weights, image_folder, *options, model=MODEL):
    """`ckptavg bn-update` of the test weights over the test images, with a 10-class model."""
    kwargs = ["--model-kwargs", '{"num_classes": 10}'] if model == MODEL else []
    return CliRunner().invoke(
        main, ["bn-update", str(weights), "--model", model, *kwargs, "--data", str(image_folder), *options]
    )


class TestCommandLine:
    def test_bn_update(self, tmp_path, weights, image_folder):
        result = bn_update(
            weights,
            image_folder,
            *("--image-size", "32", "--resize-size", "36", "--batch-size", "8", "--workers", "0"),
            *("-o", str(tmp_path / "out.safetensors")),
        )
        assert result.exit_code == 0, result.output
        assert "recomputed BatchNorm statistics over 24 inputs in 3 batches" in result.output
        dataset = torchvision.datasets.ImageFolder(image_folder, transform=TRANSFORM)
        expected = expected_statistics(weights, torch.utils.data.DataLoader(dataset, batch_size=8))
        assert_statistics_match(load_file(tmp_path / "out.safetensors"), expected, load_file(weights))

    def test_dry_run_checks_model_weights_and_data(self, tmp_path, weights, image_folder):
        result = bn_update(weights, image_folder, "--dry-run")
        assert result.exit_code == 0, result.output
        assert "20 BatchNorm layers, the weights fit" in result.output
        assert "(24 of 24 images)" in result.output

    def test_swa_with_bn_data_needs_a_model(self, tmp_path, weights, image_folder):
        result = CliRunner().invoke(
            main, ["swa", str(weights), "--bn-data", str(image_folder), "-o", str(tmp_path / "o.safetensors")]
        )
        assert result.exit_code == 2 and "add --model" in result.output

    def test_errors_are_one_line(self, tmp_path, weights, image_folder):
        result = bn_update(
            weights, image_folder, "-o", str(tmp_path / "o.safetensors"), model="torch.nn:Identity"
        )
        assert result.exit_code == 1
        assert result.output.strip().count("\n") == 0 and "no BatchNorm layer" in result.output


def bn_inputs():
    return torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(3))


TARGETS = torch.arange(20) % 10
# What people save with torch.save, and the --data-key each needs.
SAVED_FORMS = {
    "bare tensor": (lambda x: x, None),
    "(inputs, targets) tuple": (lambda x: (x, TARGETS), None),
    "[inputs, targets] list": (lambda x: [x, TARGETS], None),
    "dict of one tensor": (lambda x: {"images": x, "note": "val split"}, None),
    "dict of several": (lambda x: {"targets": TARGETS, "images": x}, "images"),
}


class TestTensorFileForms:
    @pytest.mark.parametrize("form", SAVED_FORMS)
    def test_each_form_through_bn_update(self, tmp_path, weights, form):
        make, key = SAVED_FORMS[form]
        inputs = bn_inputs()
        torch.save(make(inputs), tmp_path / "inputs.pt")
        result = bn_update(
            weights,
            tmp_path / "inputs.pt",
            *(("--data-key", key) if key else ()),
            *("--batch-size", "6", "-o", tmp_path / "out.safetensors"),
        )
        assert result.exit_code == 0, result.output
        assert "over 20 inputs in 4 batches" in result.output
        expected = expected_statistics(weights, list(inputs.split(6)))
        assert_statistics_match(load_file(tmp_path / "out.safetensors"), expected, load_file(weights))

    def test_a_legacy_file_and_a_mapped_one(self, tmp_path):
        from ckptavg.bn.data import _load_inputs

        inputs = bn_inputs()
        torch.save(inputs, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
        assert torch.equal(_load_inputs(tmp_path / "legacy.pt", None), inputs)
        torch.save((inputs, TARGETS), tmp_path / "mapped.pt")
        loaded = _load_inputs(tmp_path / "mapped.pt", None)
        with open("/proc/self/maps") as maps:  # the inputs are a map of the file, not a copy
            assert str(tmp_path / "mapped.pt") in maps.read()
        assert torch.equal(loaded, inputs)

    @pytest.mark.parametrize(
        ("content", "options", "message"),
        [
            (
                {"targets": TARGETS, "images": bn_inputs()},
                (),
                "holds 2 tensors ('targets', 'images'); choose one with --data-key",
            ),
            (
                {"images": bn_inputs()},
                ("--data-key", "x"),
                "has no tensor 'x' (it has 'images'); check --data-key",
            ),
            ((bn_inputs(), TARGETS), ("--data-key", "images"), "holds a tuple, not a dict; drop --data-key"),
            (torch.tensor(1.0), (), "the inputs are a single number"),
            ({"step": 3}, (), "holds no tensor"),
            ("a string", (), "holds a str; a --data tensor file holds the inputs"),
            (
                torch.utils.data.TensorDataset(bn_inputs()),
                (),
                "torch.utils.data.dataset.TensorDataset, which could run code",
            ),
        ],
        ids=["several", "missing key", "key for a tuple", "scalar", "no tensor", "str", "pickled class"],
    )
    def test_refusals_are_one_line(self, tmp_path, weights, content, options, message):
        torch.save(content, tmp_path / "inputs.pt")
        result = bn_update(weights, tmp_path / "inputs.pt", *options, "-o", tmp_path / "out.safetensors")
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out.safetensors").exists()

    def test_swa_with_bn_data_reads_a_bare_tensor(self, tmp_path, weights):
        inputs = bn_inputs()
        torch.save(inputs, tmp_path / "inputs.pt")
        result = CliRunner().invoke(
            main,
            [
                *(
                    "swa",
                    str(weights),
                    str(weights),
                    "--model",
                    MODEL,
                    "--model-kwargs",
                    '{"num_classes": 10}',
                ),
                *("--bn-data", str(tmp_path / "inputs.pt"), "--batch-size", "6"),
                *("-o", str(tmp_path / "out.safetensors")),
            ],
        )
        assert result.exit_code == 0, result.output
        expected = expected_statistics(weights, list(inputs.split(6)))
        assert_statistics_match(load_file(tmp_path / "out.safetensors"), expected, load_file(weights))
