"""The script users write without ckptavg: load every checkpoint whole, sum in fp32, save.

The baseline that `bench_average.py` compares against, run in the same benchmark.
Usage: python naive_average.py IN1 IN2 ... OUT.safetensors  (inputs: .safetensors, or .pt holding 'model')
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def load(path):
    if path.endswith(".pt"):
        return torch.load(path, weights_only=True, map_location="cpu")["model"]
    return load_file(path)


paths, out = sys.argv[1:-1], sys.argv[-1]
total = None
for path in paths:
    state = load(path)
    if total is None:
        dtypes = {name: tensor.dtype for name, tensor in state.items()}
        total = {name: tensor.float() for name, tensor in state.items()}
    else:
        for name, tensor in state.items():
            total[name] += tensor.float()
save_file({name: (tensor / len(paths)).to(dtypes[name]) for name, tensor in total.items()}, out)
