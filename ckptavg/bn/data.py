"""Batches for the BatchNorm pass: an image folder, a tensor file, or a callable.

- a folder of images, in class subfolders (ImageFolder layout, same order as
  torchvision's `ImageFolder`) or flat, decoded with the usual evaluation
  transform (resize, center crop, normalize), in `workers` processes;
- a tensor file holding inputs along dim 0: `.npy`, `.safetensors`, or `.pt`/`.pth` holding
  a tensor, an `(inputs, targets)` tuple or list, or a dict of tensors (`data_key` picks one),
  read by torch's weights-only unpickler and mapped;
- `package.module:callable` returning an iterable of batches.

Unreadable images are skipped and counted (or refused with `strict`); a batch
is a tensor, or a dict of tensors for models called as `model(**batch)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, name_list
from ..options import option
from .imports import resolve_callable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_FRACTION = 0.875  # resize to image_size / 0.875, then center-crop (256 -> 224)


@dataclass(frozen=True)
class DataOptions:
    """Where the batches come from and how many."""

    data: str = option(
        group="BatchNorm pass",
        metavar="PATH|SPEC",
        help="Data for the BatchNorm pass: an image folder (class subfolders or flat), a tensor file "
        "(.safetensors, .npy, or .pt holding a tensor, an (inputs, targets) tuple or a dict of tensors) "
        "or package.module:callable returning batches.",
    )
    batch_size: int = option(
        32, group="BatchNorm pass", minimum=1, show_default=True, help="Inputs per batch."
    )
    samples: int | None = option(
        None, group="BatchNorm pass", minimum=1, help="Use this many inputs, drawn with --seed."
    )
    max_batches: int | None = option(
        None, group="BatchNorm pass", minimum=1, help="Stop after this many batches."
    )
    workers: int = option(
        0,
        group="BatchNorm pass",
        minimum=0,
        show_default=True,
        cli_default=2,
        help="Processes decoding images (0: decode in this process).",
    )
    seed: int = option(0, group="BatchNorm pass", show_default=True, help="Seed for drawing --samples.")
    data_key: str | None = option(
        None,
        group="BatchNorm pass",
        metavar="NAME",
        help="Tensor files holding several tensors: the one holding the inputs.",
    )
    image_size: int | None = option(
        None, group="BatchNorm pass", minimum=1, help="Center-crop size [default: 224]."
    )
    resize_size: int | None = option(
        None,
        group="BatchNorm pass",
        minimum=1,
        help="Resize the shorter side to this before cropping [default: image size / 0.875].",
    )
    mean: tuple[float, ...] | None = option(
        None,
        group="BatchNorm pass",
        metavar="R,G,B",
        parse="floats",
        help="Normalization mean [default: ImageNet's].",
    )
    std: tuple[float, ...] | None = option(
        None,
        group="BatchNorm pass",
        metavar="R,G,B",
        parse="floats",
        help="Normalization std [default: ImageNet's].",
    )
    strict_data: bool = option(
        False, group="BatchNorm pass", help="Fail on an unreadable image instead of skipping it."
    )


@dataclass
class Batches:
    """An iterable of input batches that counts what it gave and what it skipped."""

    description: str
    _make: object = field(repr=False)
    samples: int = 0
    batches: int = 0
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator:
        for batch, bad in self._make():
            self.skipped.extend(bad)
            if batch is None:
                continue
            self.batches += 1
            self.samples += _batch_size(batch)
            yield batch


def open_batches(options: DataOptions, model=None) -> Batches:
    """The batches `options.data` names, bounded by `samples` and `max_batches`.

    `model` supplies timm's preprocessing config for timm models.

    Raises:
        InputError: no such path, no images in a folder, a tensor file without the tensor.
        ImportSpecError: a `package.module:callable` that does not resolve.
    """
    if options.batch_size < 1:
        raise InputError(f"`batch_size` must be at least 1, got {options.batch_size}")
    path = Path(options.data)
    if not path.exists() and ":" in options.data:
        return _callable_batches(options)
    if not path.exists():
        raise InputError(f"{path}: no such folder or file for `data`")
    if path.is_dir():
        return _image_batches(path, options, model)
    if path.suffix in TENSOR_SUFFIXES:
        return _tensor_batches(path, options)
    raise InputError(
        f"{path}: `data` must be an image folder, a tensor file ({', '.join(TENSOR_SUFFIXES)}) "
        "or package.module:callable"
    )


def _bounded(batches, options: DataOptions) -> Iterator:
    """Stop after `max_batches`, and trim so that no more than `samples` inputs are used."""
    remaining = options.samples
    for count, batch in enumerate(batches):
        if options.max_batches is not None and count >= options.max_batches:
            return
        if remaining is not None:
            if remaining <= 0:
                return
            batch = _head(batch, remaining)
            remaining -= _batch_size(batch)
        yield batch


def _subset(count: int, options: DataOptions) -> list[int]:
    """Which of `count` inputs to use: all, or `samples` of them drawn with `seed`, in their order."""
    import torch

    if options.samples is None or options.samples >= count:
        return list(range(count))
    generator = torch.Generator().manual_seed(options.seed)
    return sorted(torch.randperm(count, generator=generator)[: options.samples].tolist())


# --- image folders ---------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """The images of a flat folder, else of its class subfolders in torchvision's ImageFolder order."""
    flat = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if flat:
        return flat
    files = []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        for root, _, names in sorted(os.walk(class_folder, followlinks=True)):
            files += [Path(root) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return files


def eval_transform(options: DataOptions, model=None):
    """Resize, center-crop, to tensor, normalize; timm models bring their own config."""
    from torchvision import transforms

    timm_config = _timm_config(model) if model is not None else None
    if timm_config is not None:
        import timm.data

        if options.image_size:
            timm_config["input_size"] = (3, options.image_size, options.image_size)
        if options.image_size and options.resize_size:
            timm_config["crop_pct"] = options.image_size / options.resize_size
        timm_config["mean"] = options.mean or timm_config["mean"]
        timm_config["std"] = options.std or timm_config["std"]
        return timm.data.create_transform(**timm_config)
    size = options.image_size or DEFAULT_IMAGE_SIZE
    resize = options.resize_size or round(size / DEFAULT_CROP_FRACTION)
    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(options.mean or IMAGENET_MEAN, options.std or IMAGENET_STD),
        ]
    )


def _timm_config(model) -> dict | None:
    if not type(model).__module__.startswith("timm."):
        return None
    import timm.data

    return dict(timm.data.resolve_data_config({}, model=model))


class _ImageFiles:
    """A map-style dataset of image files; an unreadable one yields its path instead of a tensor."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except Exception as e:  # PIL raises many kinds for damaged files
            return f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _collate(items: list) -> tuple:
    """A batch of the readable images, and the unreadable ones' descriptions."""
    import torch

    good = [item for item in items if not isinstance(item, str)]
    return (torch.stack(good) if good else None), [item for item in items if isinstance(item, str)]


def _image_batches(folder: Path, options: DataOptions, model) -> Batches:
    from torch.utils.data import DataLoader, Subset

    files = image_files(folder)
    if not files:
        raise InputError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its class subfolders"
        )
    dataset = Subset(_ImageFiles(files, eval_transform(options, model)), _subset(len(files), options))
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.workers,
        collate_fn=_collate,
    )

    def make():
        for count, (batch, bad) in enumerate(loader):
            if bad and options.strict_data:
                raise InputError(f"unreadable image: {bad[0]}; drop `strict_data` to skip such files")
            if options.max_batches is not None and count >= options.max_batches:
                return
            yield batch, bad

    return Batches(f"{folder} ({len(dataset)} of {len(files)} images)", make)


# --- tensor files and callables ---------------------------------------------------------------


def _tensor_batches(path: Path, options: DataOptions) -> Batches:
    inputs = _load_inputs(path, options.data_key)
    indices = _subset(int(inputs.shape[0]), options)
    contiguous = indices == list(range(indices[0], indices[0] + len(indices))) if indices else True

    def make():
        import numpy
        import torch

        for start in range(0, len(indices), options.batch_size):
            if options.max_batches is not None and start // options.batch_size >= options.max_batches:
                return
            chosen = indices[start : start + options.batch_size]
            batch = inputs[chosen[0] : chosen[-1] + 1] if contiguous else inputs[chosen]
            yield (batch if isinstance(batch, torch.Tensor) else torch.from_numpy(numpy.array(batch))), []

    return Batches(f"{path} ({len(indices)} of {inputs.shape[0]} inputs)", make)


def _load_inputs(path: Path, key: str | None):
    """The inputs of a tensor file, mapped, not read whole (see `_inputs_in` for the forms)."""
    if path.suffix == ".npy":
        import numpy

        try:
            return numpy.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable .npy file ({e})") from e
    if path.suffix == ".safetensors":
        from ..formats.readers import open_checkpoint

        with open_checkpoint(path) as checkpoint:
            return _checked(path, checkpoint.get(_chosen(path, list(checkpoint.tensors), key)))
    from ..formats.torch_format import load_torch_data

    return _checked(path, _inputs_in(path, load_torch_data(path), key))


def _inputs_in(path: Path, content: object, key: str | None):
    """The inputs in what a `.pt` file holds: a tensor (`torch.save(inputs)`), the first of a tuple
    or list (`(inputs, targets)`), or a dict's tensor (`data_key` chooses among several)."""
    import torch

    if isinstance(content, torch.Tensor) or (
        isinstance(content, (tuple, list)) and content and isinstance(content[0], torch.Tensor)
    ):
        if key is not None:
            raise InputError(f"{path}: holds a {type(content).__name__}, not a dict; drop `data_key`")
        return content if isinstance(content, torch.Tensor) else content[0]
    if isinstance(content, dict):
        tensors = {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
        return tensors[_chosen(path, list(tensors), key)]
    raise InputError(
        f"{path}: holds a {type(content).__name__}; a `data` tensor file holds the inputs: a tensor, an "
        "(inputs, targets) tuple or a dict of tensors"
    )


def _chosen(path: Path, names: list[str], key: str | None) -> str:
    """`key`, if it is one of the names of a file's tensors, or its only one."""
    if not names:
        raise InputError(f"{path}: holds no tensor")
    if key is None and len(names) != 1:
        raise InputError(
            f"{path}: holds {len(names)} tensors ({name_list(names)}); choose one with `data_key`"
        )
    name = key or names[0]
    if name not in names:
        raise InputError(f"{path}: has no tensor '{name}' (it has {name_list(names)}); check `data_key`")
    return name


def _checked(path: Path, inputs):
    """Inputs that can be cut into batches along their first dimension."""
    import torch

    if inputs.layout != torch.strided:
        raise InputError(
            f"{path}: the inputs are a {inputs.layout} tensor; save them dense (tensor.to_dense())"
        )
    if inputs.dim() == 0:
        raise InputError(f"{path}: the inputs are a single number; save them along the first dimension")
    return inputs


def _callable_batches(options: DataOptions) -> Batches:
    source = resolve_callable(options.data, "data")

    def make():
        try:
            batches = source()
        except Exception as e:
            raise InputError(f"`data={options.data}`: calling it failed: {type(e).__name__}: {e}") from e
        for batch in _bounded(batches, options):
            yield (batch[0] if isinstance(batch, (list, tuple)) else batch), []

    return Batches(f"{options.data}()", make)


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return int(batch.shape[0])


def _head(batch, count: int):
    if isinstance(batch, dict):
        return {k: v[:count] for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_head(item, count) if hasattr(item, "shape") else item for item in batch)
    return batch[:count]
