"""One benchmark command as its own process, under the heavy-job lock of a shared machine: how long it ran
(the wait for the lock not counted), its own peak resident memory, and its output. Used by the evals that
compare whole `surgery` commands (bench_scale_cpu, bench_train_modes)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import time


def run_locked(cmd: list[str], lock: str | None = None, env: dict | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB of the command's process, stdout); exits with the command's stderr tail if it
    fails. The child's output goes to files and it is reaped by os.wait4, which returns its own resource usage."""
    handle = open(lock, "w") if lock else None
    if handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            seconds = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
    finally:
        if handle:
            handle.close()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, stdout
