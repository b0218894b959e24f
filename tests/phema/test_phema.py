"""`ckptavg phema` against ema-pytorch's PostHocEMA (snapshots it saved while training) and against
EDM2's `solve_posthoc_coefficients` worked out from the paper's formulas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import needed_module
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import InputError, ScheduleError
from ckptavg.phema.solve import Profile, solve
from ckptavg.schedules import sigma_rel_to_gamma

SNAPSHOT_SIGMA_REL = (0.05, 0.28)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def edm2_std_to_exp(std: float) -> float:
    """Equation 126 and Algorithm 2 of the paper: the real root of a cubic."""
    t = std**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def edm2_coefficients_by_integration(in_ofs, in_std, out_ofs, out_std, samples=400_000) -> np.ndarray:
    """EDM2's `solve_posthoc_coefficients` from the definitions, not the closed form: the profiles
    p(tau) = (g+1) tau^g / t^(g+1) on [0, t] sampled (midpoint rule), their inner products summed,
    the normal equations solved in float64, the weights normalized to sum to 1."""
    end = max(max(in_ofs), out_ofs)
    tau = (np.arange(samples, dtype=np.float64) + 0.5) * (end / samples)

    def profile(t, std):
        g = edm2_std_to_exp(std)
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    rows = np.stack([profile(t, s) for t, s in zip(in_ofs, in_std, strict=True)])
    target = profile(out_ofs, out_std)
    dt = end / samples
    gram, right = rows @ rows.T * dt, rows @ target * dt
    x = np.linalg.solve(gram, right)
    return x / x.sum()


def test_weights_equal_edm2_coefficients_from_the_papers_formulas():
    in_ofs = [400, 800, 1200, 1600, 2000, 400, 800, 1200, 1600, 2000]
    in_std = [0.05] * 5 + [0.10] * 5
    for out_ofs, out_std in ((2000, 0.15), (2000, 0.07), (1500, 0.10), (1000, 0.20)):
        expected = edm2_coefficients_by_integration(in_ofs, in_std, out_ofs, out_std)
        got = solve(
            [Profile(t, sigma_rel_to_gamma(s)) for t, s in zip(in_ofs, in_std, strict=True)],
            Profile(out_ofs, sigma_rel_to_gamma(out_std)),
        )
        assert np.allclose(got.weights, expected, atol=2e-5), (out_ofs, out_std)
        assert abs(sum(got.weights) - 1) < 1e-12


def test_a_profile_among_the_snapshots_is_exact_and_a_far_one_warned():
    snapshots = [Profile(t, sigma_rel_to_gamma(s)) for t in range(100, 1001, 100) for s in (0.05, 0.10)]
    exact = solve(snapshots, Profile(1000, sigma_rel_to_gamma(0.10)))
    assert exact.residual < 1e-6 and exact.weights[-1] == pytest.approx(1.0)
    assert solve(snapshots, Profile(1000, sigma_rel_to_gamma(0.15))).residual < 0.05
    schedule = ckptavg_schedule(0.01, snapshots, 1000)
    assert schedule.solution.residual > 0.05
    assert any("poorly represented" in w for w in schedule.warnings(len(snapshots)))
    with pytest.raises(ScheduleError, match="not independent"):
        solve([snapshots[0], snapshots[0]], Profile(1000, 1.0))


def ckptavg_schedule(sigma_rel, snapshots, step):
    from ckptavg.phema.schedule import PostHocEma

    return PostHocEma(sigma_rel, tuple(snapshots), step)


@pytest.fixture(scope="module")
def ema_pytorch_run(tmp_path_factory):
    """A short real training run under ema-pytorch's PostHocEMA: two profiles, a snapshot of each
    every 10 steps, in float32."""
    needed_module("ema_pytorch")
    from ema_pytorch import PostHocEMA

    folder = tmp_path_factory.mktemp("phema")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    emas = PostHocEMA(
        net,
        sigma_rels=SNAPSHOT_SIGMA_REL,
        update_every=1,
        checkpoint_every_num_steps=10,
        checkpoint_folder=str(folder / "snapshots"),
        checkpoint_dtype=torch.float32,
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    inputs, targets = torch.randn(256, 8), torch.randint(0, 3, (256,))
    for step in range(60):
        batch = torch.arange(step * 32, step * 32 + 32) % 256
        loss = torch.nn.functional.cross_entropy(net(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        emas.update()
    return emas, folder


def ema_pytorch_weights(emas, folder: Path, sigma_rel: float, step: int | None = None):
    """PostHocEMA's weights per snapshot file name (unnormalized, as it sums them)."""
    from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma as their_gamma
    from ema_pytorch.post_hoc_ema import solve_weights

    files = sorted((folder / "snapshots").glob("*.pt"))
    if step is not None:
        files = [f for f in files if int(f.stem.split(".")[1]) <= step]
    gammas = torch.tensor([emas.gammas[int(f.stem.split(".")[0])] for f in files])
    steps = torch.tensor([int(f.stem.split(".")[1]) for f in files])
    target = step if step is not None else int(steps.max())
    x = solve_weights(steps, gammas, torch.tensor([target]), torch.tensor([their_gamma(sigma_rel)]))
    return dict(zip((f.name for f in files), x.squeeze(-1).tolist(), strict=True))


def test_phema_equals_ema_pytorch_synthesize_ema_model(ema_pytorch_run, tmp_path):
    emas, folder = ema_pytorch_run
    out = tmp_path / "phema_{sigma_rel}.safetensors"
    done = cli(
        "phema",
        "--sigma-rel", 0.15, "--sigma-rel", 0.10,
        folder / "snapshots" / "*.pt",
        "--snapshot-sigma-rel", ",".join(map(str, SNAPSHOT_SIGMA_REL)),
        "-o", out,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "fit:        residual" in done.output
    for sigma_rel in (0.15, 0.10):
        theirs = ema_pytorch_weights(emas, folder, sigma_rel)
        total = sum(theirs.values())
        synthesized = emas.synthesize_ema_model(sigma_rel=sigma_rel).state_dict()
        path = tmp_path / f"phema_{sigma_rel}.safetensors"
        ours = load_file(path)
        names = [n for n in synthesized if n.startswith("ema_model.")]
        assert names
        for name in names:
            torch.testing.assert_close(ours[name] * total, synthesized[name], rtol=1e-5, atol=1e-6)
        recorded = json.loads(ckptavg.inspect(path).metadata["ckptavg.inputs"])
        weights = {Path(item["path"]).name: item["weight"] for item in recorded}
        assert weights.keys() == theirs.keys()
        for name, weight in theirs.items():  # ema-pytorch holds the gammas in float32
            assert weights[name] == pytest.approx(weight / total, rel=1e-6, abs=1e-8)


def test_at_step_uses_the_snapshots_up_to_it(ema_pytorch_run):
    emas, folder = ema_pytorch_run
    (plan,) = ckptavg.post_hoc_ema(
        [folder / "snapshots" / "*.pt"],
        0.12,
        snapshot_sigma_rel=SNAPSHOT_SIGMA_REL,
        at_step=30,
        dry_run=True,
    )
    theirs = ema_pytorch_weights(emas, folder, 0.12, step=30)
    total = sum(theirs.values())
    assert [ck.label.rsplit("/", 1)[-1] for ck in plan.checkpoints] == [
        f"{i}.{s}.pt" for s in (10, 20, 30) for i in (0, 1)
    ]
    for ck, weight in zip(plan.checkpoints, plan.weights, strict=True):
        assert weight == pytest.approx(theirs[Path(ck.label).name] / total, rel=1e-6, abs=1e-8)
    assert plan.steps == [10, 10, 20, 20, 30, 30]
    assert any("3 later left out" in note or "6 later left out" in note for note in plan.selected)
    assert plan.schedule.params()["at_step"] == 30


def test_profiles_from_metadata_and_from_names(tmp_path):
    state = {"w": torch.ones(3)}
    for step in (100, 200):
        for sigma_rel in (0.05, 0.10):
            save_file(
                {"w": state["w"] * step * sigma_rel},
                tmp_path / f"ema_{sigma_rel}_step_{step}.safetensors",
                metadata={"sigma_rel": str(sigma_rel), "step": str(step)},
            )
    from_metadata = ckptavg.post_hoc_ema([tmp_path / "*"], 0.07, dry_run=True)[0]
    from_names = ckptavg.post_hoc_ema([tmp_path / "*"], 0.07, snapshot_sigma_rel=(0.05, 0.10), dry_run=True)[
        0
    ]
    assert from_metadata.weights == pytest.approx(from_names.weights)
    assert from_metadata.steps == [100, 100, 200, 200]
    effective = next(line for line in from_metadata.describe() if line.startswith("effective:"))
    assert "implied sigma_rel" not in effective  # the snapshots' spread is not the average's
    done = cli("phema", "--sigma-rel", 0.07, tmp_path / "*", "--snapshot-sigma-rel", "0.05,0.2", "--dry-run")
    assert done.exit_code == 1 and "--snapshot-sigma-rel" in done.output and "nowhere" in done.output


def test_refusals_are_one_line(tmp_path):
    (tmp_path / "network-snapshot-0671088-0.100.pkl").write_bytes(b"not read")
    done = cli("phema", "--sigma-rel", 0.1, tmp_path / "*.pkl", "-o", tmp_path / "out.safetensors")
    assert done.exit_code == 1
    assert "pickled network object" in done.output and "state_dict()" in done.output
    assert len(done.output.strip().splitlines()) == 1
    with pytest.raises(InputError, match="pickled"):
        ckptavg.post_hoc_ema([tmp_path], 0.1, dry_run=True)
    save_file({"w": torch.ones(2)}, tmp_path / "step_10.safetensors")
    done = cli("phema", "--sigma-rel", 0.1, tmp_path / "*.safetensors", "--dry-run")
    assert done.exit_code == 1 and "--snapshot-sigma-rel" in done.output
    assert len(done.output.strip().splitlines()) == 1


def test_poor_fit_is_warned_and_shown(ema_pytorch_run):
    _, folder = ema_pytorch_run
    done = cli(
        "phema",
        "--sigma-rel",
        0.01,
        folder / "snapshots" / "*.pt",
        "--snapshot-sigma-rel",
        "0.05,0.28",
        "--dry-run",
    )
    assert done.exit_code == 0, done.output
    assert "warning:" in done.output and "poorly represented" in done.output
    assert "phema (sigma_rel=0.01" in done.output and "residual" in done.output
