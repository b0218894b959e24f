"""The `ckptavg` command line: flags made from the library's option dataclasses, one library call per
command, its result printed, errors as one line.

Only this package imports click. Heavy imports (torch) happen inside commands,
so `ckptavg --help` and `--version` answer at once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

import click

from .. import __version__
from ..run import interrupts, supervision
from .averaging import anneal, avg, ema, phema, swa
from .flags import CONTEXT, EXIT_ERROR, report_interrupt
from .others import bn_update, inspect
from .soup import soup


def run() -> None:
    """The `ckptavg` console script: `main`, then leave without the interpreter's teardown.

    Tearing down the modules after `import torch` takes a noticeable part of a
    small run, and does nothing a finished command needs: its output is already
    fsynced and renamed. The exit handlers libraries registered (workers to stop,
    logs to flush) still run, and the standard streams are flushed. A traceback
    (--debug) exits the usual way.

    Signals are honoured from here on (see `interrupts`), and the work runs under a
    supervising parent (see `supervision`), so even a crash ends in one line.
    """
    try:
        with interrupts.honoured():
            code = supervision.run_supervised(_main)
    except KeyboardInterrupt as e:  # before the command started
        try:
            report_interrupt(e)
        except SystemExit as exit:
            code = exit.code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (ckptavg inspect | head)
            stream.flush()
    os._exit(code)


def _main() -> int:
    """`main` as an exit code, with the exit handlers libraries registered run."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = EXIT_ERROR
    # atexit has no public call that runs the handlers without the interpreter's teardown.
    atexit._run_exitfuncs()
    return code or 0


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="ckptavg")
def main():
    """Average model checkpoints: EMA, SWA or explicit weights.

    Inputs are checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt), Hugging Face
    model folders (model.safetensors, pytorch_model.bin, or shards with an index),
    runs of Trainer checkpoint-N folders, DeepSpeed global_stepN folders,
    torch.distributed.checkpoint (DCP) folders and their step-N runs, PEFT adapter
    folders, quoted glob patterns, s3:// gs:// az:// https:// URLs, or Hugging Face
    Hub paths hf://ORG/REPO[@REVISION][/PATH] (revisions and paths may be globs). They are
    averaged in natural order (step_2 before step_10), one tensor at a time, so
    memory stays flat whatever the model size. The output is written atomically:
    a failed or interrupted run leaves nothing behind. Torch files are loaded with
    weights_only=True: nothing in a checkpoint ever runs. The only code ckptavg
    imports on your behalf is what --model, --data and --eval name (bn-update, --bn-data,
    soup).

    \b
    ckptavg swa 'ckpts/*.safetensors' -o swa.safetensors
    ckptavg ema --decay 0.9 'ckpts/*.safetensors' -o ema.safetensors --dry-run
    ckptavg swa 'hf://org/run@step14*' -o swa/ --stream   # by range requests, no download
    ckptavg ema --decay 0.9 's3://runs/llama/step-*/' --last 8 -o s3://runs/llama/ema/
    ckptavg inspect ema.safetensors
    torchrun --nproc-per-node 8 -m ckptavg swa 'ckpt/step-*' -o swa/   # one run over 8 processes

    \b
    Environment: HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE as huggingface_hub
    reads them; CKPTAVG_HUB_TIMEOUT, how many seconds a Hub request may wait or
    stall before the run stops (default 60); under torchrun, CKPTAVG_DIST_TIMEOUT,
    how long a rank waits for the others (default 300).
    """


for command in (swa, ema, avg, anneal, phema, soup, bn_update, inspect):
    main.add_command(command)
