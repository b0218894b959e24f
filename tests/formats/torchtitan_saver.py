"""Saves a run of a small model with torchtitan's own CheckpointManager, for test_dcp.py.

    python torchtitan_saver.py OUT

One gloo process on the CPU: AdamW steps, a checkpoint every 10 steps (`OUT/checkpoint/step-N`,
model, optimizer, LR scheduler as torchtitan saves them) and the model's state dict at each in
`OUT/expected/step-N.pt`.
"""

import os
import socket
import sys


def save(out: str) -> None:
    import torch
    import torch.distributed as dist
    from torchtitan.components.checkpointer.dcp import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.05})]
    optimizers = OptimizersContainer.Config(param_groups=groups, implementation="for-loop").build(
        model_parts=[model]
    )
    schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=30)
    config = CheckpointManager.Config(enable=True, interval=10, keep_latest_k=0, last_save_model_only=False)
    manager = CheckpointManager(
        config,
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={},
        sd_adapter=None,
        base_folder=out,
    )
    os.makedirs(f"{out}/expected")
    for step in range(1, 31):
        optimizers.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizers.step()
        schedulers.step()
        manager.save(step, last_step=step == 30)
        if step % 10 == 0:
            torch.save(
                {k: v.detach().clone() for k, v in model.state_dict().items()},
                f"{out}/expected/step-{step}.pt",
            )
    manager.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    save(sys.argv[1])
