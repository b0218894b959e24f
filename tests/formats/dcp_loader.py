"""Loads a DCP folder into a fresh FSDP2-sharded model with DCP's own code, for test_dcp.py.

    python dcp_loader.py CHECKPOINT OUT WORLD_SIZE [KEY]

Starts WORLD_SIZE processes (gloo, CPU), each building dcp_saver's model sharded by `fully_shard`
on a CPU mesh, loading CHECKPOINT into its state dict with `dcp.load` (under KEY, when the model
was saved under one) and setting it into the model. Each rank then saves `OUT/rank-R.pt`: every
parameter's local shard and where that shard starts in the whole tensor.
"""

import os
import sys

from dcp_saver import make_model
from process_group import launch


def load(checkpoint: str, out: str, world: int, key: str | None) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dist.init_process_group("gloo")
    torch.manual_seed(5)  # other values than the saved ones, so a shard left unloaded shows
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for parameter in model.parameters():
        parameter.data.normal_()
    fully_shard(model, mesh=mesh)
    state = get_model_state_dict(model)
    dcp.load({key: state} if key else state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state)
    shards = {}
    for name, value in model.state_dict().items():
        _, offsets = compute_local_shape_and_global_offset(value.shape, mesh, value.placements)
        shards[name] = (value.to_local().detach().clone(), tuple(offsets))
    torch.save(shards, f"{out}/rank-{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    checkpoint, out, world, *key = sys.argv[1:]
    if "RANK" in os.environ:
        load(checkpoint, out, int(world), key[0] if key else None)
    else:
        sys.exit(launch([checkpoint, out, world, *key], int(world), __file__))
