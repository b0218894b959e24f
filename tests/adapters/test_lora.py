"""LoRA adapters averaged exactly: three adapters trained with peft on a tiny GPT-2 (Conv1D layers,
fan_in_fan_out), of different ranks, targets and scalings (one rslora with per-module patterns),
averaged by the command line; the oracle for each adapter's update is peft's own merge_and_unload."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from ckptavg.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WEIGHTS = (1.0, 2.0, 3.0)
ADAPTERS = (
    {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]},
    {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]},
    {
        "r": 4,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "rank_pattern": {"mlp.c_proj": 3},
        "alpha_pattern": {"h.1.attn.c_attn": 5},
    },
)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_model():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def load_base(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def merged_state(base_folder, adapter_folder) -> dict:
    model = peft.PeftModel.from_pretrained(load_base(base_folder), adapter_folder)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The base model's folder, three adapter folders, and each adapter's update (peft's merge minus base)."""
    root = tmp_path_factory.mktemp("lora")
    tiny_model().save_pretrained(root / "base")
    base_state = load_base(root / "base").state_dict()
    folders, deltas = [], []
    for seed, settings in enumerate(ADAPTERS, 1):
        model = peft.get_peft_model(load_base(root / "base"), peft.LoraConfig(**settings))
        torch.manual_seed(seed)
        for module in model.modules():  # B starts at zero: give every layer an update to average
            if isinstance(module, peft.tuners.lora.LoraLayer):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            tokens = torch.randint(0, 64, (4, 16))
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        folder = root / "run" / f"checkpoint-{100 * seed}"
        model.save_pretrained(folder)
        folders.append(folder)
        merged = merged_state(root / "base", folder)
        deltas.append({k: merged[k] - base_state[k] for k in base_state})
    return root, folders, base_state, deltas


def mean_delta(deltas, weights=WEIGHTS):
    total = sum(weights)
    return {
        k: sum(w / total * d[k].double() for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]
    }


def logits(model):
    tokens = torch.arange(20).reshape(2, 10) % 64
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_concat_is_the_exact_mean_of_the_updates(trained, tmp_path):
    root, folders, base_state, deltas = trained
    out = tmp_path / "avg"
    result = run("avg", "--weights", "1,2,3", *folders, "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    assert config["rank_pattern"] == config["alpha_pattern"]
    # c_attn is in all three adapters (4 + 2 + 4), mlp.c_proj in two (4 + 3), attn.c_proj in two (4 + 4)
    ranks = {k: v for k, v in config["rank_pattern"].items()}
    assert set(ranks.values()) | {config["r"]} == {10, 8, 7, 6}

    averaged = peft.PeftModel.from_pretrained(load_base(root / "base"), out).eval()
    oracle = load_base(root / "base")
    delta = mean_delta(deltas)
    oracle.load_state_dict({k: (v.double() + delta[k]).float() for k, v in base_state.items()})
    torch.testing.assert_close(logits(averaged), logits(oracle), rtol=1e-5, atol=1e-5)
    merged = merged_state(root / "base", out)
    for name, value in base_state.items():
        torch.testing.assert_close(merged[name].double() - value.double(), delta[name], rtol=1e-5, atol=1e-6)


def test_svd_at_full_rank_equals_concat(trained, tmp_path):
    root, folders, base_state, deltas = trained
    out = tmp_path / "svd"
    result = run("swa", *folders, "--lora", "svd", "--rank", "64", "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    merged = merged_state(root / "base", out)
    delta = mean_delta(deltas, (1, 1, 1))
    for name, value in base_state.items():
        torch.testing.assert_close(merged[name].double() - value.double(), delta[name], rtol=1e-5, atol=1e-6)
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        energy = json.loads(f.metadata()["ckptavg.lora.kept_energy"])
    assert min(energy.values()) == pytest.approx(1.0)


def test_svd_truncates_to_the_best_rank_r_and_reports_the_energy_kept(trained, tmp_path):
    root, folders, base_state, deltas = trained
    out = tmp_path / "svd2"
    dry = run("swa", *folders, "--lora", "svd", "--rank", "2", "-o", f"{out}/", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "worst layer keeps" in dry.output and not out.exists()
    result = run("swa", *folders, "--lora", "svd", "--rank", "2", "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        energy = json.loads(f.metadata()["ckptavg.lora.kept_energy"])
    merged = merged_state(root / "base", out)
    delta = mean_delta(deltas, (1, 1, 1))
    for module, kept in energy.items():
        name = f"{module}.weight"
        u, s, vh = torch.linalg.svd(delta[name], full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(
            merged[name].double() - base_state[name].double(), best, rtol=1e-4, atol=1e-6
        )
        assert kept == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
    worst = min(energy, key=energy.get)
    assert f"{100 * energy[worst]:.2f}% of its update's energy ({worst})" in dry.output


def test_merge_into_the_base_writes_the_mean_of_the_merged_models(trained, tmp_path):
    root, folders, base_state, deltas = trained
    out = tmp_path / "merged"
    result = run(
        "ema", "--decay", "0.5", *folders, "--lora", "merge", "--base", root / "base", "-o", f"{out}/"
    )
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    weights = (0.25, 0.25, 0.5)  # torch's per-checkpoint EMA, decay 0.5, three checkpoints
    expected = mean_delta(deltas, weights)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            value.double(), base_state[name].double() + expected[name], rtol=1e-5, atol=1e-6
        )


def test_selection_applies_to_adapters(trained, tmp_path):
    _, folders, _, _ = trained
    result = run("swa", folders[0].parent, "--last", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "of 2 LoRA adapters" in result.output and "checkpoint-100" not in result.output.split("lora:")[0]
    assert "lora:       concat" in result.output


def refused(tmp_path, folders, edit=None, extra=()):
    copy = tmp_path / "odd"
    shutil.copytree(folders[0], copy)
    if edit is not None:
        config = json.loads((copy / "adapter_config.json").read_text())
        config.update(edit)
        (copy / "adapter_config.json").write_text(json.dumps(config))
    result = run("swa", copy, folders[1], *extra, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code != 0
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    return result.output.strip()


def test_unsupported_adapters_are_refused_in_one_line(trained, tmp_path):
    _, folders, _, _ = trained
    dora = refused(tmp_path / "dora", folders, {"use_dora": True})
    assert "DoRA" in dora and "merge_and_unload" in dora and "\n" not in dora
    other_base = refused(tmp_path / "base", folders, {"base_model_name_or_path": "someone/else"})
    assert "someone/else" in other_base and "one base model" in other_base
    ia3 = refused(tmp_path / "ia3", folders, {"peft_type": "IA3"})
    assert "IA3 adapter" in ia3


def test_adapters_are_never_averaged_with_full_checkpoints(trained, tmp_path):
    root, folders, _, _ = trained
    result = run("swa", folders[0], root / "base", "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 1
    assert "not a LoRA adapter" in result.output and "--lora merge" in result.output


def test_lora_options_need_their_companions(trained, tmp_path):
    _, folders, _, _ = trained
    result = run("swa", *folders, "--lora", "svd", "-o", f"{tmp_path}/out/")
    assert result.exit_code == 2 and "--lora svd needs the output's rank: give --rank" in result.output
    result = run("swa", *folders, "--lora", "merge", "-o", f"{tmp_path}/out/")
    assert result.exit_code == 2 and "--base" in result.output


def test_replacing_an_averaged_adapter_needs_force(trained, tmp_path):
    _, folders, _, _ = trained
    out = f"{tmp_path / 'avg'}/"
    assert run("swa", *folders, "-o", out).exit_code == 0
    again = run("swa", *folders, "-o", out)
    assert again.exit_code == 1 and "pass --force to replace it" in again.output
    assert run("swa", *folders, "-o", out, "--force").exit_code == 0


def test_embeddings_torch_files_and_the_python_api(tmp_path):
    """Llama adapters on embeddings (lora_embedding_A/B, the saved embedding weights), one in a torch
    file, averaged from Python: concat loads in peft, merge equals the mean of the merged models."""
    import ckptavg

    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    settings = [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        {
            "r": 2,
            "lora_alpha": 2,
            "target_modules": ["q_proj", "embed_tokens"],
            "rank_pattern": {"embed_tokens": 3},
        },
    ]
    folders, merged = [], []
    for seed, setting in enumerate(settings, 1):
        model = peft.get_peft_model(load_base(tmp_path / "base"), peft.LoraConfig(**setting))
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        folder = tmp_path / f"adapter_{seed}"
        model.save_pretrained(folder, safe_serialization=seed == 1)
        folders.append(folder)
        merged.append(merged_state(tmp_path / "base", folder))
    assert (folders[1] / "adapter_model.bin").exists()

    ckptavg.average(folders, ckptavg.swa(), out=f"{tmp_path / 'avg'}/")
    averaged = peft.PeftModel.from_pretrained(load_base(tmp_path / "base"), tmp_path / "avg")
    mean = {k: (merged[0][k].double() + merged[1][k].double()) / 2 for k in merged[0]}
    oracle = load_base(tmp_path / "base")
    oracle.load_state_dict({k: v.float() for k, v in mean.items()})
    torch.testing.assert_close(logits(averaged), logits(oracle), rtol=1e-5, atol=1e-5)

    lora = ckptavg.LoraOptions(lora="merge", base=str(tmp_path / "base"))
    plan = ckptavg.average(folders, ckptavg.swa(), out=tmp_path / "merged.safetensors", lora=lora)
    assert plan.mode == "merge" and len(plan.layers) == 5  # embed_tokens, 2 q_proj, 2 v_proj
    from safetensors.torch import load_file

    written = load_file(tmp_path / "merged.safetensors")
    for name, value in mean.items():
        torch.testing.assert_close(written[name].double(), value, rtol=1e-5, atol=1e-6)


def test_an_adapter_holding_nan_is_refused_or_dropped(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folders, _, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(folders[0], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    refused = run("swa", bad, folders[1], "-o", f"{tmp_path / 'out'}/")
    assert refused.exit_code == 1 and f"tensor '{name}' holds NaN or Inf" in refused.output
    dropped = run("swa", bad, *folders[1:], "-o", f"{tmp_path / 'out'}/", "--nonfinite", "skip-checkpoint")
    assert dropped.exit_code == 0, dropped.output
    assert f"dropped {bad / 'adapter_model.safetensors'}" in dropped.output
    assert "of 2 LoRA adapters" in dropped.output
