"""What torchrun runs in the distributed tests: the ckptavg command, with one rank made to stall
after its share when CKPTAVG_TEST_STALL_RANK names it (so a test can kill it mid-run), and the
byte ranges each rank fetches of remote inputs logged when CKPTAVG_TEST_RANGE_LOG names a file."""

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

range_log = os.environ.get("CKPTAVG_TEST_RANGE_LOG")
if range_log:  # every byte range this rank fetches of a remote input, to see that it reads its share only
    from ckptavg.formats import remote_files

    read_range = remote_files.RemoteSafetensorsFile.read_range

    def logged(self, begin, end):
        with open(f"{range_log}.{os.environ.get('RANK', 'single')}", "a") as log:
            log.write(f"{self.remote.path} {begin} {end}\n")
        return read_range(self, begin, end)

    remote_files.RemoteSafetensorsFile.read_range = logged

from ckptavg.cli import run  # noqa: E402

sys.argv = ["ckptavg", *sys.argv[1:]]
run()
