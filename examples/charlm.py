"""The language-model demo's model, data and training: a small character-level transformer.

The text is the source of Python's own standard library (the top-level `*.py` files of
the running interpreter), so nothing is downloaded; files are split into training and
held-out ones by name, so no held-out line was ever seen in training. Characters outside
ASCII become `?`, which keeps the vocabulary at 128 and the loss per character.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

VOCAB = 128


@dataclass(frozen=True)
class ModelShape:
    context: int = 64
    width: int = 64
    layers: int = 3
    heads: int = 4


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.heads = shape.heads
        self.attention_norm = nn.LayerNorm(shape.width)
        self.qkv = nn.Linear(shape.width, 3 * shape.width)
        self.attention_out = nn.Linear(shape.width, shape.width)
        self.mlp_norm = nn.LayerNorm(shape.width)
        self.mlp = nn.Sequential(
            nn.Linear(shape.width, 4 * shape.width), nn.GELU(), nn.Linear(4 * shape.width, shape.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(nn.Module):
    """GPT-style decoder over ASCII characters, with learned positions and an untied head."""

    def __init__(self, shape: ModelShape = ModelShape()):
        super().__init__()
        self.context = shape.context
        self.tokens = nn.Embedding(VOCAB, shape.width)
        self.positions = nn.Embedding(shape.context, shape.width)
        self.blocks = nn.Sequential(*(Block(shape) for _ in range(shape.layers)))
        self.final_norm = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, VOCAB, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.head(self.final_norm(self.blocks(x)))


def load_stdlib_text(held_out_every: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(training ids, held-out ids): every `held_out_every`-th source file by name is held out."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    if len(files) < 2 * held_out_every:
        raise SystemExit(f"found only {len(files)} standard-library source files in {folder}")
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace").encode("ascii", errors="replace")
        parts[index % held_out_every == 0].append(text)
    train, held_out = (torch.frombuffer(bytearray(b"\n".join(p)), dtype=torch.uint8).long() for p in parts)
    return train, held_out


def batch_at(text: torch.Tensor, step: int, seed: int, size: int, context: int):
    """The batch of training step `step`: the same for every run of `seed`, branched or not."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(text) - context - 1, (size,), generator=generator)
    window = torch.stack([text[s : s + context + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def held_out_windows(text: torch.Tensor, count: int, context: int) -> torch.Tensor:
    """Fixed, evenly spaced windows of the held-out text: every model is scored on the same ones."""
    starts = torch.linspace(0, len(text) - context - 1, count).long()
    return torch.stack([text[s : s + context + 1] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model: nn.Module, windows: torch.Tensor, batch: int = 128) -> float:
    """Mean cross-entropy in nats per character over every position of the windows."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch):
        logits = model(chunk[:, :-1])
        total += functional.cross_entropy(
            logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
        ).item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


@dataclass(frozen=True)
class Recipe:
    """AdamW with a linear warmup, then a constant learning rate; the decay is the branch's."""

    learning_rate: float = 1e-2
    warmup_steps: int = 50
    batch_size: int = 32
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """Weight decay on the weight matrices only, not on biases, LayerNorms or embeddings (GPT-2's rule)."""
    matrices, others = [], []
    for name, parameter in model.named_parameters():
        is_matrix = parameter.dim() == 2 and not name.startswith(("tokens.", "positions."))
        (matrices if is_matrix else others).append(parameter)
    groups = [
        {"params": matrices, "weight_decay": recipe.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=recipe.betas)


def constant_with_warmup(recipe: Recipe):
    """The stable run's rate: a linear warmup, then constant."""
    return lambda step: recipe.learning_rate * min(1.0, step / recipe.warmup_steps)


def linear_decay(start: int, end: int, recipe: Recipe):
    """The cooled-down branch's rate: from the constant one at `start` linearly to zero at `end`."""
    return lambda step: recipe.learning_rate * (end - step) / (end - start)


def train_steps(model, optimizer, text, seed: int, steps: range, learning_rate, recipe: Recipe, after_step):
    """Train for `steps` at `learning_rate(step)`, calling `after_step(step)` after each."""
    for step in steps:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        inputs, targets = batch_at(text, step, seed, recipe.batch_size, model.context)
        loss = functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        if not math.isfinite(loss.item()):
            raise SystemExit(
                f"training diverged at step {step} (loss {loss.item()}): lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
        optimizer.step()
        after_step(step)
