"""`ckptavg soup` on a small CNN fine-tuned here on scikit-learn's digits: the greedy soup never scores
below its best ingredient on the held-out split, and leaves out an ingredient trained on shuffled labels
while the uniform soup is hurt by it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import needed_module
from safetensors.torch import load_file, save_file
from torch import nn

import ckptavg
from ckptavg.cli import main
from ckptavg.errors import OptionsError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WIDTH = 8


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits():
    needed_module("sklearn")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits as module
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def _train(model, inputs, labels, *, epochs: int, lr: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.fixture(scope="module")
def ingredients(digits, tmp_path_factory):
    """Fine-tunes of one pre-trained model (seeds and learning rates), and one trained on shuffled labels.

    Returns (folder, good paths, broken path, held-out inputs, held-out labels)."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits.load_digits_split(0)
    base = digits.SmallCNN(WIDTH)
    _train(base, x_train, y_train, epochs=3, lr=0.05, seed=0)
    folder = tmp_path_factory.mktemp("soup")
    good = []
    for seed, lr in ((1, 0.02), (2, 0.05), (3, 0.03)):
        model = digits.SmallCNN(WIDTH)
        model.load_state_dict(base.state_dict())
        _train(model, x_train, y_train, epochs=2, lr=lr, seed=seed)
        good.append(folder / f"finetune_{seed}.safetensors")
        save_file(model.state_dict(), good[-1])
    broken_model = digits.SmallCNN(WIDTH)
    broken_model.load_state_dict(base.state_dict())
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(9))]
    _train(broken_model, x_train, shuffled, epochs=4, lr=0.1, seed=9)
    broken = folder / "finetune_shuffled.safetensors"
    save_file(broken_model.state_dict(), broken)
    return folder, good, broken, x_test, y_test


def _accuracy(digits, x, y):
    def evaluate(model):
        return digits.evaluate(model, x, y)[0]

    return evaluate


def _score_file(digits, path, x, y) -> float:
    model = digits.SmallCNN(WIDTH)
    model.load_state_dict(load_file(path))
    return digits.evaluate(model, x, y)[0]


def test_greedy_soup_never_below_its_best_ingredient_and_leaves_out_the_broken_one(
    digits, ingredients, tmp_path
):
    folder, good, broken, x, y = ingredients
    evaluate = _accuracy(digits, x, y)
    scores = {p.name: _score_file(digits, p, x, y) for p in [*good, broken]}
    assert scores[broken.name] < 0.5 < min(scores[p.name] for p in good)
    rows = []
    plan = ckptavg.soup(
        [*good, broken],
        greedy=True,
        eval=evaluate,
        model="digits:SmallCNN",
        model_kwargs={"width": WIDTH},
        output=ckptavg.OutputOptions(output=str(tmp_path / "greedy.safetensors")),
        on_row=rows.append,
    )
    greedy_score = _score_file(digits, tmp_path / "greedy.safetensors", x, y)
    assert greedy_score >= max(scores.values())
    assert broken.name not in {Path(ck.label).name for ck in plan.checkpoints}
    assert rows[0].kept and not next(r for r in rows if r.ingredient.endswith(broken.name)).kept
    assert rows[0].score == max(scores.values())  # best first
    for row in rows:
        assert row.score == pytest.approx(scores[Path(row.ingredient).name], abs=1e-9)
    kept_scores = [r.soup_score for r in rows if r.kept]
    assert greedy_score == pytest.approx(kept_scores[-1], abs=1e-6)
    recorded = json.loads(ckptavg.inspect(tmp_path / "greedy.safetensors").metadata["ckptavg.soup"])
    assert [r["kept"] for r in recorded] == [r.kept for r in rows]
    # the soup written equals the uniform average of the kept ingredients (swa over them)
    kept = [folder / Path(ck.label).name for ck in plan.checkpoints]
    ckptavg.average(kept, ckptavg.swa(), out=tmp_path / "swa.safetensors")
    for name, tensor in load_file(tmp_path / "swa.safetensors").items():
        torch.testing.assert_close(load_file(tmp_path / "greedy.safetensors")[name], tensor)

    ckptavg.soup([*good, broken], output=ckptavg.OutputOptions(output=str(tmp_path / "uniform.safetensors")))
    uniform_score = _score_file(digits, tmp_path / "uniform.safetensors", x, y)
    assert uniform_score < max(scores[p.name] for p in good) and uniform_score < greedy_score


def test_cli_greedy_soup_with_an_eval_module_scores_file_and_bn_data(
    digits, ingredients, tmp_path, monkeypatch
):
    _, good, broken, x, y = ingredients
    save_file({"inputs": x[:200].contiguous()}, tmp_path / "bn.safetensors")
    torch.save((x, y), tmp_path / "heldout.pt")
    (tmp_path / "soup_evals.py").write_text(
        "import torch, digits\n"
        f"x, y = torch.load({str(tmp_path / 'heldout.pt')!r})\n"
        "calls = []\n"
        "def loss(model):\n"
        "    calls.append(1)\n"
        "    return digits.evaluate(model, x, y)[1]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    given = {good[0].name: 0.001}  # measured before: the best by far
    (tmp_path / "scores.json").write_text(json.dumps(given))
    done = cli(
        "soup", "--greedy", *good, broken,
        "--model", "digits:SmallCNN", "--model-kwargs", json.dumps({"width": WIDTH}),
        "--eval", "soup_evals:loss", "--mode", "min", "--scores", "scores.json",
        "--bn-data", "bn.safetensors", "--device", "cpu",
        "-o", "soup.safetensors",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert any("in memory" in line and "running sums" in line for line in lines)
    first = next(i for i, line in enumerate(lines) if "(score given)" in line)
    assert good[0].name in lines[first] and "kept" in lines[first]
    assert any("left out" in line and broken.name in line for line in lines)
    assert "recomputed BatchNorm statistics" in done.output
    import soup_evals

    assert len(soup_evals.calls) == 3 + 3  # the three ingredients not given, then three candidates
    metadata = ckptavg.inspect(tmp_path / "soup.safetensors").metadata
    assert "ckptavg.bn" in metadata and json.loads(metadata["ckptavg.soup"])[0]["score_given"]
    assert json.loads(metadata["ckptavg.params"])["greedy"] is True
    dry = cli("soup", "--greedy", *good, "--model", "digits:SmallCNN", "--model-kwargs", '{"width": 8}',
              "--eval", "soup_evals:loss", "--dry-run")  # fmt: skip
    assert dry.exit_code == 0 and "in memory" in dry.output and "dry run" in dry.output


def test_refusals(ingredients, tmp_path):
    _, good, _, _, _ = ingredients
    with pytest.raises(OptionsError, match="greedy soup needs a score"):
        ckptavg.soup(good, greedy=True, dry_run=True)
    done = cli("soup", "--greedy", *good, "--eval", "x:y", "-o", tmp_path / "s.safetensors")
    assert done.exit_code == 2 and "--model" in done.output
    done = cli(
        "soup", "--greedy", *good, "--model", "digits:SmallCNN", "--eval", "nowhere_module:score",
        "-o", tmp_path / "s.safetensors",
    )  # fmt: skip
    assert done.exit_code == 1 and "--eval nowhere_module:score" in done.output
    assert len(done.output.strip().splitlines()) == 1
