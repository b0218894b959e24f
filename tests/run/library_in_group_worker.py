"""A training script's end, under torchrun: it sets up its own process group, then averages its
checkpoints with the library, which must use that group (every rank takes a share of the work)."""

import sys

import torch.distributed as dist

import ckptavg

dist.init_process_group("gloo")
ckptavg.average(sys.argv[2:], ckptavg.swa(), out=sys.argv[1])
assert dist.is_initialized(), "the library must leave the caller's group as it found it"
dist.barrier()
dist.destroy_process_group()
