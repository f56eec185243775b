"""The web page in a real browser (headless Chromium through Playwright) against a live gateway:
what a person does, and what the gateway and its upstream see of it."""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image
from playwright.sync_api import expect

from tests.conftest import png_bytes
from tests.ui.conftest import ADMIN, Site

# The README's pictures: IMAGEGATE_SCREENSHOTS=docs/screenshots refreshes them; by default the
# tests write elsewhere, so a test run leaves the checkout as it was.
SHOTS = Path(os.environ.get("IMAGEGATE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "imagegate-screenshots")


def open_playground(page: Any, site: Site, *, remember: bool = False) -> None:
    page.goto(f"{site.url}/")  # redirected to ui/
    page.fill("#api-key", site.key)
    if remember:
        page.check("#remember")
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model option[value=demo]")).to_have_count(1)


def ask(page: Any, prompt: str, model: str = "demo", *, stream: bool = True, seed: int | None = None) -> None:
    page.select_option("#model", model)
    page.fill("#prompt", prompt)
    page.set_checked("#stream", stream)
    if seed is not None:
        page.select_option("#seed-mode", "fixed")
        page.fill("#seed", str(seed))
    page.fill("#size", "256x256")


def done_cell(page: Any, model: str) -> Any:
    cell = page.locator(f"#results .cell[data-model='{model}']").first
    expect(cell).to_have_attribute("data-state", re.compile("done|failed|cancelled"))
    return cell


def test_generate_with_a_fixed_seed_shows_seed_cost_and_provider(page: Any, site: Site) -> None:
    open_playground(page, site)
    ask(page, "a red fox in the snow", seed=42)
    page.click("#generate")
    cell = done_cell(page, "demo")
    expect(cell).to_have_attribute("data-state", "done")
    expect(cell.locator("img")).to_have_attribute("alt", "a red fox in the snow")
    text = cell.inner_text()
    assert "42" in text and "demo" in text and "$0.000098" in text  # 256² × 0.0015 USD/MP
    expect(page.locator("#gallery .cell")).to_have_count(1)
    expect(page.locator("#balance")).to_contain_text("9.999902")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "playground.png"), full_page=True)
    assert page.problems == []


def test_previews_stream_before_the_final_image_and_cancel_releases_the_hold(page: Any, site: Site) -> None:
    open_playground(page, site)
    ask(page, "a lighthouse", seed=1)
    page.click("#generate")
    cell = done_cell(page, "demo")
    expect(cell).to_have_attribute("data-state", "done")
    assert int(cell.get_attribute("data-previews")) == 2  # partial_image events, then the completed one
    start = site.usage()["balance_micros"]
    site.upstream.behave(delay_s=20)
    ask(page, "a slow one", model="remote")
    page.click("#generate")
    deadline = time.monotonic() + 10
    while not site.upstream.requests:  # the gateway is waiting on the upstream now
        assert time.monotonic() < deadline
        time.sleep(0.02)
    page.keyboard.press("Escape")
    expect(page.locator("#results .cell[data-model=remote]")).to_have_attribute("data-state", "cancelled")
    deadline = time.monotonic() + 10
    while site.usage()["balance_micros"] != start:  # the hold is released once the gateway sees the client go
        assert time.monotonic() < deadline, site.usage()
        time.sleep(0.05)


def test_compare_three_models_with_one_failing_route(page: Any, site: Site) -> None:
    open_playground(page, site)
    ask(page, "a castle on a hill", seed=7)
    for model in ("demo", "remote", "broken"):
        page.check(f"#compare-models input[value='{model}']")
    expect(page.locator("#quote")).to_contain_text("compare total")
    page.click("#compare")
    for model in ("demo", "remote"):
        expect(page.locator(f"#results .cell[data-model='{model}']")).to_have_attribute("data-state", "done")
    failed = page.locator("#results .cell[data-model='broken']")
    expect(failed).to_have_attribute("data-state", "failed")
    expect(failed.locator(".status")).to_contain_text(re.compile("route|healthy|unavailable|upstream", re.I))
    expect(page.locator("#results .cell img")).to_have_count(2)
    page.screenshot(path=str(SHOTS / "compare.png"), full_page=True)


def test_the_quote_equals_the_charge(page: Any, site: Site) -> None:
    open_playground(page, site)
    ask(page, "a quoted request", model="remote", stream=False, seed=3)
    expect(page.locator("#quote")).to_have_text(re.compile(r"^Quote: \$"))
    quoted = float(page.get_attribute("#quote", "data-cost"))
    start = site.usage()["balance_micros"]
    page.click("#generate")
    cell = done_cell(page, "remote")
    expect(cell).to_have_attribute("data-state", "done")
    assert float(cell.get_attribute("data-cost")) == quoted
    assert start - site.usage()["balance_micros"] == round(quoted * 1_000_000)
    assert len(site.upstream.requests) == 1  # the quote called no upstream


def test_an_edit_with_a_painted_mask_reaches_the_upstream_as_alpha(page: Any, site: Site, tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    source.write_bytes(png_bytes(512, 256, (30, 120, 200)))
    open_playground(page, site)
    ask(page, "paint a door", model="remote", stream=False)
    page.fill("#size", "")
    page.set_input_files("#edit-file", str(source))
    mask = page.locator("#edit-mask")
    expect(mask).to_be_visible()
    box = mask.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.click("#generate")
    expect(done_cell(page, "remote")).to_have_attribute("data-state", "done")
    files = {name: data for name, _, data in site.upstream.last.files}
    sent = Image.open(io.BytesIO(files["mask"]))
    assert sent.format == "PNG" and sent.size == (512, 256)  # exported once, at the image's size
    alpha = sent.convert("RGBA").getchannel("A")
    assert alpha.getpixel((60, 128)) == 0  # painted: transparent = edit
    assert alpha.getpixel((480, 128)) == 255 and alpha.getpixel((60, 10)) == 255  # untouched: kept


def test_the_gallery_survives_a_reload_and_the_key_is_never_in_local_storage(page: Any, site: Site) -> None:
    open_playground(page, site, remember=False)
    ask(page, "kept across reloads", seed=11)
    page.click("#generate")
    expect(page.locator("#gallery .cell")).to_have_count(1)
    page.reload()
    expect(page.locator("#gallery .cell")).to_have_count(1)
    expect(page.locator("#gallery .cell")).to_contain_text("kept across reloads")
    assert page.input_value("#api-key") == ""  # not remembered: memory only
    assert page.evaluate("() => Object.keys(localStorage)") == []
    open_playground(page, site, remember=True)
    page.reload()
    assert page.input_value("#api-key") == site.key  # remembered in this tab
    assert page.evaluate("() => Object.keys(localStorage)") == []
    assert page.evaluate("() => sessionStorage.getItem('imagegate.key')") == site.key
    page.click("#forget")
    assert page.evaluate("() => sessionStorage.length") == 0


def test_markup_in_a_prompt_is_shown_as_text(page: Any, site: Site) -> None:
    dialogs: list[str] = []

    def seen(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", seen)
    open_playground(page, site)
    prompt = "<img src=x onerror=alert(1)>"
    ask(page, prompt, seed=5)
    page.click("#generate")
    expect(done_cell(page, "demo")).to_have_attribute("data-state", "done")
    expect(page.locator("#gallery .cell .prompt")).to_have_text(prompt)
    assert page.locator("img[src=x]").count() == 0 and dialogs == []
    assert page.problems == []  # no page error, no CSP or Trusted Types violation


def test_the_console_shows_an_open_circuit_and_creates_and_revokes_a_key(page: Any, site: Site) -> None:
    failed = site.gateway.http.post("/v1/images/generations", json={"model": "broken", "prompt": "p"},
                                    headers={"authorization": f"Bearer {site.key}"})
    assert failed.status_code >= 500
    page.goto(f"{site.url}/ui/admin")
    page.fill("#admin-key", ADMIN)
    page.dispatch_event("#admin-key", "change")
    circuit = page.locator("#providers tr[data-provider=down] .circuit")
    expect(circuit).to_have_text("open")
    expect(circuit).to_have_class(re.compile(r"\bopen\b"))
    page.fill("#key-name", "made in the console")
    page.fill("#key-credits", "2.50")
    page.click("#create-key")
    expect(page.locator("#secret-value")).to_have_text(re.compile(r"^ig_"))
    row = page.locator("#keys tr", has_text="made in the console")
    expect(row).to_contain_text("2.50")
    page.on("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    expect(page.locator("#usage tbody tr")).to_have_count(0)
    assert page.problems == []
