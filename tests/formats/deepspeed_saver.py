"""Saves DeepSpeed checkpoints of a small model with DeepSpeed's own code, for test_deepspeed.py.

    python deepspeed_saver.py OUT WORLD_SIZE STAGE[,STAGE...]

Starts WORLD_SIZE processes (gloo, CPU), each running a few Adam steps per ZeRO stage and saving
`OUT/zero{STAGE}/global_step{1,2,3}` with `engine.save_checkpoint`. The model has a tied weight
(shared params), a frozen layer and BatchNorm buffers, and sizes that leave ZeRO's partitions
uneven, so parameters straddle ranks and carry padding.
"""

import os
import sys

from process_group import launch

STEPS = 3


def save(out: str, stages: list[int]) -> None:
    import deepspeed
    import deepspeed.comm.torch
    import torch

    # DeepSpeed's shared-memory all-reduce is a C++ extension built on first use: not needed here.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 5)
            self.a = torch.nn.Linear(5, 7)
            self.bn = torch.nn.BatchNorm1d(7)
            self.b = torch.nn.Linear(7, 3)
            self.frozen = torch.nn.Linear(3, 3)
            self.frozen.requires_grad_(False)
            self.head = torch.nn.Linear(5, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            h = self.emb(x).mean(1)
            return self.frozen(self.b(self.bn(self.a(h)))).sum() + self.head(h).sum()

    for stage in stages:
        torch.manual_seed(0)
        model = Model()
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**6,
        }
        # A torch optimizer: DeepSpeed's own Adam is a C++ extension built on first use.
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        data = torch.Generator().manual_seed(int(os.environ["RANK"]))
        for step in range(1, STEPS + 1):
            loss = engine(torch.randint(0, 11, (4, 2), generator=data)).pow(2).mean()
            engine.backward(loss)
            engine.step()
            engine.save_checkpoint(f"{out}/zero{stage}", tag=f"global_step{step}")
        engine.destroy()


if __name__ == "__main__":
    out, world, stages = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    if "RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:], world, __file__, env={"DS_ACCELERATOR": "cpu"}))
    save(out, stages)
