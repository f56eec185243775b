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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def status_mb(pid: int, key: str) -> float:
    """A /proc/<pid>/status figure in MB: VmRSS (now), VmHWM (peak since start or the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def reset_peak_rss(pid: int) -> None:
    """VmHWM back to the current RSS, so the next peak is one cell's own (Linux 4.0 and later)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
