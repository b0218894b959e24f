"""The script users write without ckptavg: load every checkpoint whole, sum in fp32, save.

The baseline that `bench_average.py` compares against, run in the same benchmark.
Usage: python naive_average.py IN1.safetensors IN2.safetensors ... OUT.safetensors
"""

import sys

from safetensors.torch import load_file, save_file

paths, out = sys.argv[1:-1], sys.argv[-1]
total = None
for path in paths:
    state = load_file(path)
    if total is None:
        dtypes = {name: tensor.dtype for name, tensor in state.items()}
        total = {name: tensor.float() for name, tensor in state.items()}
    else:
        for name, tensor in state.items():
            total[name] += tensor.float()
save_file({name: (tensor / len(paths)).to(dtypes[name]) for name, tensor in total.items()}, out)
