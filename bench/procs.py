"""Process bookkeeping the benches share (Linux /proc): CPU seconds, RSS, peak RSS, child setup."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
from pathlib import Path

HOST = "127.0.0.1"


def child_setup() -> None:
    """In every child: default SIGTERM, and SIGTERM when the bench dies, even by SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def family(pid: int) -> list[int]:
    """`pid` and every process below it (`serve --workers N`: the master and its N workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in children.read_text().split()]
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
    return found


def _one_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and the processes below it."""
    return sum(_one_cpu_seconds(each) for each in family(pid))


def _one_status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def status_mb(pid: int, key: str) -> float:
    """A /proc/<pid>/status figure in MB, summed over `pid` and the processes below it: VmRSS
    (now), VmHWM (peak since start or the last reset; for several processes, the sum of their
    peaks, an upper bound)."""
    return sum(_one_status_mb(each, key) for each in family(pid))


def reset_peak_rss(pid: int) -> None:
    """VmHWM back to the current RSS, so the next peak is one cell's own (Linux 4.0 and later)."""
    for each in family(pid):
        Path(f"/proc/{each}/clear_refs").write_text("5")
