"""The built wheel: one top-level package, `imagegate`, that serves the embedded default on its own.

The wheel is built from this checkout (not editable) and installed into a fresh virtual
environment. Its third-party dependencies are borrowed from the test environment's site-packages
(no downloads in tests), but the local backend's (torch, diffusers, transformers) are blocked
there: serving the default needs only the core.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import decode, free_port, wait_until_healthy

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "diffusers", "transformers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(out)], check=True, capture_output=True)
    [built] = out.glob("imagegate-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed, and nothing else of ours."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Lines of a .pth: a path is appended to sys.path (after the venv's own site-packages, so the
    # wheel's imagegate wins); a line starting with `import` runs. The .pth files *inside* the
    # borrowed directory (this checkout's editable install among them) are not processed.
    (site / "borrowed_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
        + f"import sys; sys.modules.update(dict.fromkeys({BLOCKED!r}))\n")
    return root


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(info).decode().split() == ["imagegate"]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        tops = {line.split("/", 1)[0] for line in archive.read(record).decode().splitlines() if line}
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"imagegate"}
    for shipped in ("imagegate/config/default.yaml", "imagegate/config/example.yaml",
                    "imagegate/config/examples/hosted.yaml", "imagegate/router/app.py",
                    "imagegate/router/http/static/index.html", "imagegate/router/http/static/playground.js",
                    "imagegate/router/http/static/app.css", "imagegate/router/http/static/admin.js",
                    "imagegate/providers/base.py", "imagegate/local_backend/jobs.py"):
        assert shipped in names
    assert not any(n.startswith("imagegate/tests") or "/bench/" in n for n in names)
    # torch and the other local-backend packages come only with the [local] extra.
    torch = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert torch and all("extra == \"local\"" in line for line in torch)


def test_the_installed_package_is_the_wheel_and_nothing_generic(venv: Path) -> None:
    probe = ("import importlib.util, imagegate; print(imagegate.__file__); "
             "print([m for m in ('router', 'providers', 'config', 'local_backend') if importlib.util.find_spec(m)])\n"
             "try:\n    import torch\nexcept ImportError:\n    print('no torch')")
    lines = subprocess.run([str(venv / "bin" / "python"), "-c", probe], check=True, capture_output=True, text=True,
                           cwd=venv).stdout.splitlines()
    assert Path(lines[0]).is_relative_to(venv)
    assert lines[1:] == ["[]", "no torch"]


@pytest.fixture
def served(venv: Path) -> Iterator[str]:
    port = free_port()
    log = venv / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "imagegate"), "serve", "--port", str(port)], cwd=venv,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, log.read_text)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_installed_wheel_serves_the_embedded_default(served: str, venv: Path) -> None:
    client = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=30)
    resp = client.images.generate(model="demo", prompt="a lighthouse at dusk", size="256x256")
    assert resp.data is not None
    assert decode(resp.data[0].b64_json or "").size == (256, 256)
    assert (venv / "data" / "imagegate.db").exists()  # the default's state, relative to where it runs
