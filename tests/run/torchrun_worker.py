"""What torchrun runs in the distributed tests: the ckptavg command, with one rank made to stall
after its share when CKPTAVG_TEST_STALL_RANK names it (so a test can kill it mid-run)."""

import os
import sys
import time
from pathlib import Path

from ckptavg.run import parallel

stalled_rank = os.environ.get("CKPTAVG_TEST_STALL_RANK")
if stalled_rank == os.environ.get("RANK"):
    summed = parallel._sum

    def stall(*args, **kwargs):
        found = summed(*args, **kwargs)
        Path(os.environ["CKPTAVG_TEST_STALLED"]).write_text(str(os.getpid()))
        time.sleep(60)
        return found

    parallel._sum = stall

from ckptavg.cli import run  # noqa: E402

sys.argv = ["ckptavg", *sys.argv[1:]]
run()
