"""Configuration: `${ENV}` interpolation, every bad key listed by path, exact prices, and the CLI.

The CLI tests run `imagegate` as a real subprocess: `check-config FILE`, and `serve` with no flags
in an empty working directory (the embedded config/default.yaml, bound to 127.0.0.1).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from imagegate.router.config import DEFAULT_CONFIG, Config, ConfigError, load, load_text
from imagegate.router.pipeline import Price
from tests.conftest import decode, free_port, wait_until_healthy

REPO = Path(__file__).resolve().parent.parent

VALID: dict[str, Any] = {
    "providers": {"demo": {"type": "demo"},
                  "up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}},
    "models": {
        "m": {"aliases": ["m-alias"], "price_per_mp": 0.0015,
              "limits": {"min_side": 64, "max_side": 2048, "multiple_of": 8, "max_n": 4},
              "routes": [{"provider": "demo", "model": "demo"}, {"provider": "up", "model": "x"}]},
        "q": {"sizes": ["1328x1328", "1664x928"], "price_per_mp": 0, "routes": [{"provider": "demo", "model": "demo"}]},
    },
    "default_model": "m",
    "auto": {"policy": "cheapest", "candidates": ["m", "q"]},
}


# -- helpers -------------------------------------------------------------------------------------

def valid_config() -> dict[str, Any]:
    return copy.deepcopy(VALID)


def put(cfg: Any, path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """Set cfg[path[0]][path[1]]… = value (creating mappings on the way); returns the root."""
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value
    return cfg


def problems_of(cfg: dict[str, Any] | str) -> list[str]:
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
    with pytest.raises(ConfigError) as info:
        load_text(text)
    assert info.value.problems, "a ConfigError must list its problems"
    return info.value.problems


def imagegate_command() -> list[str]:
    script = Path(sys.executable).parent / "imagegate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagegate"]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*imagegate_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})



# -- interpolation -------------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "env", "expected"), [
    ("${IG_T_A}", {"IG_T_A": "http://a.example"}, "http://a.example"),
    ("${IG_T_A:-http://default}", {}, "http://default"),
    ("${IG_T_A:-http://default}", {"IG_T_A": "http://set"}, "http://set"),
    ("${IG_T_A:-http://default}", {"IG_T_A": ""}, "http://default"),  # as in the shell: empty counts as unset
    ("${IG_T_A:-}", {}, ""),
    ("http://${IG_T_A}:${IG_T_B:-8000}/base", {"IG_T_A": "host"}, "http://host:8000/base"),
    ("$IG_T_A and ${ lower }", {"IG_T_A": "x"}, "$IG_T_A and ${ lower }"),  # not references: left alone
])
def test_env_interpolation(monkeypatch: pytest.MonkeyPatch, template: str, env: dict[str, str],
                           expected: str) -> None:
    for name in ("IG_T_A", "IG_T_B"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = load_text(yaml.safe_dump(put(valid_config(), ("server", "public_url"), template)))
    assert cfg.server.public_url == expected
    assert cfg.unset_env == []


def test_interpolated_values_are_typed_by_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IG_T_PORT", "9123")
    monkeypatch.delenv("IG_T_PRICE", raising=False)
    cfg = valid_config()
    put(cfg, ("server", "port"), "${IG_T_PORT:-8000}")
    put(cfg, ("models", "m", "price_per_mp"), "${IG_T_PRICE:-0.0015}")
    put(cfg, ("auto", "candidates"), ["${IG_T_CAND:-q}"])
    loaded = load_text(yaml.safe_dump(cfg))
    assert loaded.server.port == 9123
    assert loaded.models["m"].price_per_mp == Decimal("0.0015")
    assert loaded.auto.candidates == ["q"]


def test_unset_secret_becomes_empty_and_is_recorded_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IG_T_SECRET", raising=False)
    monkeypatch.setenv("IG_T_EMPTY", "")
    cfg = put(valid_config(), ("providers", "up", "api_key"), "${IG_T_SECRET}")
    put(cfg, ("providers", "up", "organization"), "${IG_T_EMPTY}")
    loaded = load_text(yaml.safe_dump(cfg))
    assert loaded.providers["up"]["api_key"] == ""
    assert loaded.unset_env == [("providers.up.api_key", "IG_T_SECRET"), ("providers.up.organization", "IG_T_EMPTY")]
    monkeypatch.setenv("IG_T_SECRET", "sk-from-env")
    assert load_text(yaml.safe_dump(cfg)).providers["up"]["api_key"] == "sk-from-env"


def test_default_yaml_reads_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGATE_PORT", raising=False)
    monkeypatch.delenv("IMAGEGATE_HOST", raising=False)
    cfg = load()
    assert (cfg.server.host, cfg.server.port, cfg.default_model) == ("127.0.0.1", 8000, "demo")
    assert cfg.source == str(DEFAULT_CONFIG)
    monkeypatch.setenv("IMAGEGATE_PORT", "8765")
    assert load(DEFAULT_CONFIG).server.port == 8765


# -- every bad key, by path ----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "value", "prefix", "fragment"), [
    (("models", "m", "routes", 1, "provider"), "a1111-b", "models.m.routes[1].provider: ",
     "unknown provider 'a1111-b'"),
    (("providers", "weird"), {"type": "nosuchkind"}, "providers.weird.type: ", "unknown provider type 'nosuchkind'"),
    (("providers", "up", "base_ulr"), "http://typo", "providers.up.base_ulr: ", "Extra inputs"),
    (("providers", "up", "timeout_s"), -1, "providers.up.timeout_s: ", "greater than 0"),
    (("bogus_top",), 1, "bogus_top: ", "Extra inputs"),
    (("server", "prot"), 80, "server.prot: ", "Extra inputs"),
    (("models", "m", "limits", "min_side"), 4096, "models.m.limits: ", "min_side is larger than max_side"),
    (("models", "m", "limits", "max_n"), 0, "models.m.limits.max_n: ", "greater than or equal to 1"),
    (("models", "m", "limits", "multiple_of"), 0, "models.m.limits.multiple_of: ", "greater than or equal to 1"),
    (("models", "m", "price_per_mp"), -0.5, "models.m.price_per_mp: ", "greater than or equal to 0"),
    (("models", "m", "default_size"), "big", "models.m.default_size: ", "WIDTHxHEIGHT"),
    (("models", "m", "defaults", "steps"), 500, "models.m.defaults.steps: ", "less than or equal to 60"),
    (("models", "m", "routes", 0, "retry", "attempts"), 0, "models.m.routes[0].retry.attempts: ", "greater"),
    (("models", "m", "routes"), [], "models.m.routes: ", "at least 1"),
    (("models", "q", "aliases"), ["m-alias"], "models.q.aliases: ", "'m-alias' is already a name of model 'm'"),
    (("models", "q", "aliases"), ["m"], "models.q.aliases: ", "'m' is already a name of model 'm'"),
    (("models", "q", "aliases"), ["auto"], "models.q: ", "'auto' is reserved"),
    (("models", "q", "sizes", 1), "4096x4096", "models.q.sizes[1]: ", "outside the model's limits"),
    (("default_model",), "nope", "default_model: ", "unknown model 'nope'"),
    (("auto", "candidates", 1), "ghost", "auto.candidates[1]: ", "unknown model 'ghost'"),
    (("auto", "policy"), "random", "auto.policy: ", "priority"),
])
def test_bad_key_is_reported_by_its_path(path: tuple[str | int, ...], value: Any, prefix: str,
                                         fragment: str) -> None:
    problems = problems_of(put(valid_config(), path, value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(prefix) and fragment in problems[0], problems


def test_several_problems_in_one_file_are_all_reported() -> None:
    text = """
bogus_top: 1
providers:
  demo: {type: demo}
  weird: {type: nosuchkind}
models:
  sdxl:
    aliases: [stable-diffusion-xl]
    price_per_mp: -0.5
    limits: {max_n: 0}
    routes:
      - {provider: demo, model: demo}
      - {provider: a1111-b, model: sd_xl_base_1.0.safetensors}
  other:
    aliases: [stable-diffusion-xl]
    routes: [{provider: demo, model: demo}]
default_model: nope
auto: {candidates: [sdxl, ghost]}
"""
    problems = problems_of(text)
    expected = ["bogus_top: ", "providers.weird.type: unknown provider type 'nosuchkind'",
                "models.sdxl.price_per_mp: ", "models.sdxl.limits.max_n: ",
                "models.sdxl.routes[1].provider: unknown provider 'a1111-b'",
                "models.other.aliases: 'stable-diffusion-xl' is already a name of model 'sdxl'",
                "default_model: unknown model 'nope'", "auto.candidates[1]: unknown model 'ghost'"]
    assert sorted(p for p in problems if any(p.startswith(e) for e in expected)) == sorted(problems)
    assert [e for e in expected if not any(p.startswith(e) for p in problems)] == []


@pytest.mark.parametrize(("text", "fragment"), [
    ("models: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("server: {port: 80}\n", "models: "),
])
def test_unusable_files_are_reported(text: str, fragment: str) -> None:
    assert any(fragment in p for p in problems_of(text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.problems[0]


# -- exact prices --------------------------------------------------------------------------------

@pytest.mark.parametrize("written", ["0.0015", "'0.0015'", "0.00150"])
def test_price_stays_an_exact_decimal(written: str) -> None:
    cfg: Config = load_text(yaml.safe_dump(valid_config()).replace("price_per_mp: 0.0015", f"price_per_mp: {written}"))
    price = cfg.models["m"].price_per_mp
    assert isinstance(price, Decimal) and price == Decimal("0.0015")
    assert Price.of(1024, 1024, 1, price).cost_micros == 1573


@pytest.mark.parametrize(("width", "height", "n", "price", "megapixels", "micros"), [
    (1024, 1024, 1, "0.0015", "1.048576", 1573),      # 1572.864 µ$
    (512, 256, 2, "0.0015", "0.262144", 393),          # 393.216 µ$
    (1024, 1024, 4, "0.02", "4.194304", 83886),        # 83886.08 µ$
    (1328, 1328, 1, "0.02", "1.763584", 35272),        # 35271.68 µ$
    (1000, 1000, 1, "0.0000025", "1", 3),              # 2.5 µ$: half-up, not to even
    (1000, 1000, 1, "0.0000015", "1", 2),              # 1.5 µ$
    (64, 64, 1, "0", "0.004096", 0),
    (1920, 1080, 3, "0.1", "6.2208", 622080),          # 0.1 is exact as a Decimal, not as a float
])
def test_billing_is_exact(width: int, height: int, n: int, price: str, megapixels: str, micros: int) -> None:
    got = Price.of(width, height, n, Decimal(price))
    assert got.megapixels == Decimal(megapixels)
    assert got.cost_micros == micros and isinstance(got.cost_micros, int)
    assert got.cost == Decimal(micros) / 1_000_000
    assert got.header() == f"{Decimal(micros) / 1_000_000:.6f}"


# -- the command line ----------------------------------------------------------------------------

def test_check_config_lists_each_bad_path_and_exits_1(tmp_path: Path) -> None:
    cfg = put(valid_config(), ("models", "m", "routes", 1, "provider"), "a1111-b")
    put(cfg, ("default_model",), "nope")
    put(cfg, ("models", "m", "limits", "max_n"), 0)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert "models.m.routes[1].provider: unknown provider 'a1111-b'" in result.stderr
    assert "default_model: unknown model 'nope'" in result.stderr
    assert "models.m.limits.max_n: " in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_accepts_the_default_and_notes_unset_secrets(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(REPO / "config" / "default.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    cfg = put(valid_config(), ("providers", "up", "api_key"), "${IG_T_NEVER_SET_KEY}")
    file = tmp_path / "unset.yaml"
    file.write_text(yaml.safe_dump(cfg))
    noted = run_cli("check-config", str(file))
    assert noted.returncode == 0, noted.stderr
    assert "providers.up.api_key" in noted.stdout and "IG_T_NEVER_SET_KEY" in noted.stdout


def test_check_config_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1 and "cannot read" in result.stderr


def listening_addresses(port: int) -> set[str] | None:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on `port`; None off Linux."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    found = set()
    for table in tables:
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_serve_with_no_flags_uses_the_embedded_default(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "IMAGEGATE_PORT": str(port), "PYTHONPATH": str(REPO)}
    env.pop("IMAGEGATE_HOST", None)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*imagegate_command(), "serve"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(proc, url, log.read_text)
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            raw = client.images.with_raw_response.generate(prompt="a red fox", size="256x128")  # no model
            resp = raw.parse()
            img = decode(resp.data[0].b64_json)
            assert (img.format, img.size) == ("PNG", (256, 128))
            assert (raw.headers["x-imagegate-model"], raw.headers["x-imagegate-provider"]) == ("demo", "demo")
            assert listening_addresses(port) in (None, {"0100007F"})  # 127.0.0.1 only
            client.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()
    assert f"running on http://127.0.0.1:{port}" in log.read_text()
    assert (tmp_path / "data" / "artifacts").is_dir()  # ./data is relative to the working directory
