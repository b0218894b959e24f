"""Mutation fuzz: damaged safetensors headers and torch archives are averaged or refused cleanly.

Each mutant of a valid checkpoint is inspected, planned (`--dry-run`) and averaged
with a valid checkpoint of the same model through the real CLI, in worker processes
(`fuzz_worker.py`) so that a crash or a hang shows as the case that caused it.
`CKPTAVG_FUZZ_CASES` sets how many cases run (`make fuzz` runs thousands),
`CKPTAVG_FUZZ_SEED` which ones.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CASES = int(os.environ.get("CKPTAVG_FUZZ_CASES", "600"))
SEED = int(os.environ.get("CKPTAVG_FUZZ_SEED", "0"))
WORKERS = 2
CASE_LIMIT_S = 30  # a case takes well under a second: more is a hang
START_LIMIT_S = 120  # importing torch on a loaded machine
WORKER = Path(__file__).with_name("fuzz_worker.py")


def reproduce(case: int) -> str:
    return f"{sys.executable} {WORKER} --seed {SEED} --cases {case} --keep /tmp/ckptavg-case{case}"


class Worker:
    """One worker process and a thread that hands its stdout over line by line."""

    def __init__(self, cases: list[int], folder: Path):
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), "--seed", str(SEED), "--cases", ",".join(map(str, cases))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=folder,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, limit_s: float) -> dict | None:
        """The next report; None once the process has ended. Raises queue.Empty past the limit."""
        return self.lines.get(timeout=limit_s)

    def stop(self) -> str:
        """Kill the process (if still running); what it wrote on stderr, and how it ended."""
        self.process.kill()
        stderr = self.process.stderr.read()
        self.process.wait()
        return f"exit {self.process.returncode}; stderr: {stderr[-3000:]}"


def run_cases(cases: list[int], folder: Path) -> tuple[list[dict], list[str]]:
    """Run cases in workers, starting a new one after a crash or a hang; (reports, failures)."""
    folder.mkdir(parents=True, exist_ok=True)
    reports, failures = [], []
    pending = list(cases)
    while pending:
        worker = Worker(pending, folder)
        started, limit = None, START_LIMIT_S
        while True:
            try:
                line = worker.next(limit)
            except queue.Empty:
                ended = worker.stop()
                failures.append(
                    f"case {started}: hang (no answer in {limit} s); {ended}; {reproduce(started)}"
                )
                break
            if line is None:
                ended = worker.stop()
                if started is not None:
                    failures.append(f"case {started}: the worker died ({ended}); {reproduce(started)}")
                elif pending:
                    failures.append(f"the worker ended before any case: {ended}")
                    return reports, failures
                break
            limit = CASE_LIMIT_S
            if line.get("started"):
                started = line["case"]
            elif "problems" in line:
                reports.append(line)
                pending.remove(line["case"])
                started = None
        if started is not None:
            pending.remove(started)
    return reports, failures


def test_mutants_are_averaged_or_refused_with_one_error_line(tmp_path):
    shards = [list(range(first, CASES, WORKERS)) for first in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(run_cases, shards, [tmp_path / f"worker{i}" for i in range(WORKERS)]))
    reports = [report for shard_reports, _ in results for report in shard_reports]
    failures = [failure for _, shard_failures in results for failure in shard_failures]
    failures += [
        f"case {r['case']} ({r['mutation']}): {problem}; {reproduce(r['case'])}"
        for r in reports
        for problem in r["problems"]
    ]
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures)
    assert len(reports) == CASES
    succeeded = sum(r["outcomes"][-1].startswith("0") for r in reports)
    assert 0 < succeeded < CASES, "mutants should both pass and fail, else the fuzz tests nothing"
