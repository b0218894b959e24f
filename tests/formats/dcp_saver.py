"""Saves torch.distributed.checkpoint (DCP) runs of a small model with DCP's own code, for test_dcp.py.

    python dcp_saver.py OUT WORLD_SIZE

Starts WORLD_SIZE processes (gloo, CPU). With 2, the model is sharded by FSDP2 (`fully_shard`),
so each parameter is split into one chunk per rank, unevenly; with 1 it is a plain module. Each
run takes Adam steps and saves `step-10`, `step-20`, `step-30` with `dcp.save`, the optimizer's
state beside the model as trainers do, in two layouts and both serializations:

    OUT/titan/step-N       torchtitan's: the model's tensors at the top level, then optimizer,
                           lr_scheduler and train_state (torch_save serialization)
    OUT/nested/step-N      {"model": ..., "optimizer": ..., "step": N} (safetensors serialization)
    OUT/zstd/step-N        torchtitan's layout, every item compressed by DCP's ZStandard extension
                           (when zstandard is installed)
    OUT/expected/step-N.pt the model's full state dict as the training process held it
"""

import os
import sys

from process_group import launch

STEPS = (10, 20, 30)


def make_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 6),  # 11 rows: 6 and 5 on two ranks
        torch.nn.Linear(6, 7),
        torch.nn.LayerNorm(7),
        torch.nn.Linear(7, 3),
    )


def save(out: str, world: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    tokens = torch.randint(0, 11, (8,))
    for step in STEPS:
        for _ in range(2):
            optimizer.zero_grad()
            model(tokens).square().mean().backward()
            optimizer.step()
        model_sd = get_model_state_dict(model)
        optim_sd = get_optimizer_state_dict(model, optimizer)
        titan = {
            **model_sd,
            "optimizer": optim_sd,
            "lr_scheduler": {"last_epoch": step},
            "train_state": {"step": step},
        }
        dcp.save(titan, checkpoint_id=f"{out}/titan/step-{step}")
        if ZStandard.is_available():
            compressed = dcp.FileSystemWriter(f"{out}/zstd/step-{step}", _extensions=[ZStandard()])
            dcp.save(titan, storage_writer=compressed)
        writer = dcp.FileSystemWriter(
            f"{out}/nested/step-{step}", serialization_format=SerializationFormat.SAFETENSORS
        )
        dcp.save({"model": model_sd, "optimizer": optim_sd, "step": step}, storage_writer=writer)
        full = {
            name: value.full_tensor() if hasattr(value, "full_tensor") else value
            for name, value in model_sd.items()
        }
        if rank == 0:
            os.makedirs(f"{out}/expected", exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in full.items()}, f"{out}/expected/step-{step}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2])
    if "RANK" in os.environ:
        save(out, world)
    else:
        sys.exit(launch([out, str(world)], world, __file__))
