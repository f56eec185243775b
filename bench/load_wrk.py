"""wrk as the load generator of bench/gateway_overhead.py: C, one thread, so that the client is
not what bounds a path that moves megabytes per request.

`ensure_wrk` installs Debian's `wrk` package when it is missing (root and apt-get needed; else
None and the bench falls back to its httpx load generator). `run_wrk` drives one URL with one
POST body for a fixed time; a Lua `done` hook prints the figures as one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# wrk's own summary, as JSON on one line: latencies in microseconds, duration too.
_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "duration_us": %%d, "bytes": %%d, "errors": %%d, "non2xx": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int  # socket errors and timeouts
    non2xx: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def ensure_wrk() -> str | None:
    """The wrk executable, installing Debian's package when it is missing; None when it cannot be had."""
    found = shutil.which("wrk")
    if found or not shutil.which("apt-get"):
        return found
    print("wrk is not installed: apt-get install -y wrk …", flush=True)
    for step in (["apt-get", "install", "-y", "-qq", "wrk"], ["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(step, check=False, capture_output=True, env={"DEBIAN_FRONTEND": "noninteractive",
                                                                     "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if shutil.which("wrk"):
            break
    return shutil.which("wrk")


def run_wrk(wrk: str, url: str, body: str, key: str, *, connections: int, seconds: float) -> WrkResult:
    """`connections` keep-alive connections on one thread, each sending `body` again as soon as its
    answer is read, for `seconds`."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % {"body": body, "key": key})
    try:
        out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "60s",
                              "-s", script.name, url], capture_output=True, text=True, check=True).stdout
    finally:
        Path(script.name).unlink()
    line = next(line for line in out.splitlines() if line.startswith("WRK "))
    fields = json.loads(line[4:])
    return WrkResult(fields["requests"], fields["duration_us"] / 1e6, fields["bytes"], fields["errors"],
                     fields["non2xx"], fields["p50_us"] / 1000, fields["p99_us"] / 1000)
