"""torch's AveragedModel states, averaged by the CLI, load strictly into the plain model."""

import argparse

import pytest
import torch
from click.testing import CliRunner
from conftest import SmallNet
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ckptavg
from ckptavg.cli import main


def run(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def ema_states(count: int) -> list[dict]:
    """`AveragedModel(model).state_dict()` after real SGD steps, as a training loop saves it."""
    torch.manual_seed(0)
    model = SmallNet()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for _ in range(count):
        for _ in range(2):
            loss = model(torch.randn(4, 3, 8, 8)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update_parameters(model)
        states.append({k: v.clone() for k, v in ema.state_dict().items()})
    return states


def assert_plain_mean(out_state: dict, states: list[dict]) -> None:
    """Loads strictly into the plain model, and holds the float64 mean of the wrapped module's floats."""
    SmallNet().load_state_dict(out_state, strict=True)
    for name, value in out_state.items():
        stored = [state[f"module.{name}"] for state in states]
        if value.is_floating_point():
            mean = torch.stack([s.double() for s in stored]).mean(dim=0)
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(value, stored[-1]), name


def test_averaged_model_states_load_into_the_plain_model(tmp_path):
    states = ema_states(3)
    assert next(iter(states[0])) == "n_averaged" and states[0]["n_averaged"].dtype == torch.long
    paths = []
    for i, state in enumerate(states, 1):
        paths.append(tmp_path / f"ema_{i}.pt")
        torch.save(state, paths[-1])
    report = run("swa", *paths, "-o", tmp_path / "swa.pt")
    assert "AveragedModel state: dropped 'n_averaged', stripped its 'module.'" in report
    assert_plain_mean(torch.load(tmp_path / "swa.pt", weights_only=True), states)


def test_torchvision_reference_model_ema_key(tmp_path):
    """torchvision's references save `model_ema.state_dict()` under `model_ema`, beside `args`."""
    states = ema_states(3)
    paths = []
    for i, state in enumerate(states, 1):
        paths.append(tmp_path / f"model_{i}.pth")
        content = {"model": {}, "model_ema": state, "epoch": i, "args": argparse.Namespace(lr=0.1)}
        torch.save(content, paths[-1])
    run("ema", *paths, "--decay", "0.5", "--key", "model_ema", "-o", tmp_path / "ema.safetensors")
    out = load_file(tmp_path / "ema.safetensors")
    SmallNet().load_state_dict(out, strict=True)
    # the same average as of the plain modules' states
    plain = []
    for i, state in enumerate(states, 1):
        plain.append(tmp_path / f"plain_{i}.safetensors")
        save_file({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}, plain[-1])
    ckptavg.average(plain, ckptavg.ema(0.5), tmp_path / "ref.safetensors")
    reference = load_file(tmp_path / "ref.safetensors")
    assert out.keys() == reference.keys()
    assert all(torch.equal(out[k], reference[k]) for k in out)


def test_a_wrapper_inside_a_larger_module_loses_only_its_counter(tmp_path):
    class Trainer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = SmallNet()
            self.ema = AveragedModel(self.net, use_buffers=True)

    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"trainer_{seed}.safetensors")
        save_file(Trainer().state_dict(), paths[-1])  # safetensors too: the counter is known by dtype
    report = run("swa", *paths, "-o", tmp_path / "out.safetensors")
    assert "AveragedModel state: dropped 'ema.n_averaged')" in report
    out = load_file(tmp_path / "out.safetensors")
    expected = Trainer().state_dict().keys() - {"ema.n_averaged"}
    assert out.keys() == expected


@pytest.mark.parametrize(
    "counter", [torch.tensor(3.0), torch.tensor([1, 2]), torch.tensor(True)], ids=["float", "vector", "bool"]
)
def test_other_tensors_named_n_averaged_are_weights(tmp_path, counter):
    state = {"n_averaged": counter, "module.w": torch.ones(2)}
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        save_file(state, path)
    with ckptavg.open_checkpoints(paths) as checkpoints:
        assert set(checkpoints[0].tensors) == {"n_averaged", "module.w"}
        assert not any("AveragedModel" in note for note in checkpoints[0].notes)
