"""py-spy on a bench's server process: sample it while a cell runs, then print where its time went.

`record(pid, seconds)` starts `py-spy record` (raw collapsed stacks, idle threads left out) beside
the load; `summary(path)` reads the stacks back and prints the functions with the most samples of
their own and the most samples under them, as shares of all samples.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes] | None:
    """Sampling `pid` for `seconds` into `out`; None when py-spy is not installed."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy is not installed (pip install py-spy): no profile", flush=True)
        return None
    return subprocess.Popen([exe, "record", "--nonblocking", "-r", str(rate), "-d", str(int(seconds)), "-f", "raw",
                             "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _name(frame: str) -> str:
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0].rsplit('/', 1)[-1]}" + (")" if where else "")


def summary(path: Path, top: int = 20) -> None:
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_name(frame) for frame in stack.split(";") if frame]
        if not frames or not count.isdigit():
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for name in set(frames):
            under[name] += int(count)
    if not total:
        print("py-spy recorded no samples")
        return
    print(f"\nprofile ({total} samples): most samples of their own")
    for name, count in own.most_common(top):
        print(f"  {count / total * 100:5.1f}%  {name}")
    print("most samples under them (the frames every request passes through are near 100%)")
    for name, count in under.most_common(top * 2)[top // 2:]:
        print(f"  {count / total * 100:5.1f}%  {name}")
