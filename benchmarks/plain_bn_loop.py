"""The loop users write without ckptavg: decode in this process, update_bn, save.

Baseline for bench_bn.py. Usage: python plain_bn_loop.py WEIGHTS.safetensors IMAGE_FOLDER OUT.safetensors
"""

import sys

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import update_bn
from torchvision import transforms

weights, folder, out = sys.argv[1:4]
model = torchvision.models.resnet18(num_classes=10)
model.load_state_dict(load_file(weights))
transform = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)
loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, transform), batch_size=32)
update_bn(loader, model)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
