"""Demo: save a series of checkpoints along a short training run, then average them with ckptavg.

Run with `make demo`. Everything is written under examples/output/ (ignored by git):
  ckpts/step_*.safetensors   one checkpoint per 20 training steps of a small CNN with BatchNorm
  ema.safetensors            ckptavg ema --decay 0.7 over them
  swa.safetensors            ckptavg swa over the last five
  swa_sharded/               the same average as Hugging Face shards
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUTPUT = Path(__file__).resolve().parent / "output"
CKPTS = OUTPUT / "ckpts"


def train_and_save(checkpoints: int = 10, steps_between: int = 20) -> None:
    """A small CNN on a synthetic task, saved every `steps_between` SGD steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(512, 3, 16, 16)
    labels = (images.mean(dim=(1, 2, 3)) * 20).long().clamp(-5, 4) + 5
    CKPTS.mkdir(parents=True)
    for step in range(1, checkpoints * steps_between + 1):
        batch = torch.randint(0, len(images), (64,))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % steps_between == 0:
            state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
            save_file(state, CKPTS / f"step_{step}.safetensors", metadata={"format": "pt"})
    print(f"saved {checkpoints} checkpoints in {CKPTS}")


def ckptavg(*args: str) -> None:
    """Run the installed command line in examples/output, as a user would type it."""
    print(f"\n$ {shlex.join(['ckptavg', *args])}", flush=True)
    subprocess.run([sys.executable, "-m", "ckptavg", *args], check=True, cwd=OUTPUT)


def main() -> None:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    train_and_save()
    ckptavg("ema", "--decay", "0.999", "ckpts/step_*.safetensors", "--dry-run")
    ckptavg("ema", "--decay", "0.7", "ckpts/step_*.safetensors", "-o", "ema.safetensors")
    last_five = [f"ckpts/step_{step}.safetensors" for step in range(120, 201, 20)]
    ckptavg("swa", *last_five, "-o", "swa.safetensors")
    ckptavg("swa", *last_five, "-o", "swa_sharded/", "--max-shard-size", "20kB")
    ckptavg("inspect", "ema.safetensors", "--no-tensors")


if __name__ == "__main__":
    main()
