"""The playground in a real browser (headless Chromium from Debian, Selenium) against a real `unlock-serve` on
the tiny model: the key, side-by-side answers that equal the API's, a strength sweep, the capability view,
admin upload and delete, hostile text shown as text, and the Content-Security-Policy enforced.

Screenshots are written to test-outputs/playground/ (gitignored); docs/playground.png is one of them.
The tests run in file order on one page, as a person would use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from browser import chromium
from serve_harness import tiny_server

from unlock import Capability, TargetInfo

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-outputs" / "playground"
API_KEY, ADMIN_KEY = "page-api-key", "page-admin-key"
PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:"
MAX_TOKENS = 12
WAIT_S = 300  # a hang guard for the page's requests on a loaded machine, not a timing assertion
HOSTILE = '<img src=x onerror="document.title=`pwned`">'  # no single quote: repr() in messages keeps it as is
TITLE = "unlock-serve playground"
SWEEP = [0.0, 0.5, 1.0, 2.0, 3.0]
MAX_STRENGTH = 8.0


def artifact(
    name: str, seed: int, strength: float = 3.0, target_name: str = "tiny", **metadata: str
) -> bytes:
    directions = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))  # [layers, hidden]
    target = TargetInfo("qwen2", 4, 64, target_name)
    return Capability.from_directions(
        name, directions, [0, 1, 2, 3], "rotate", strength, target, metadata
    ).to_bytes()


STEER = artifact("steer", seed=1)
# Markup in every free-text field the page shows: its provenance, its target's name.
MARKUP = artifact(
    "markup", seed=2, strength=0.5, target_name="<b>tiny</b>", source_locked=HOSTILE,
    source_unlocked="<i>u</i>", n="48", rank="16", error_kind="holdout",
    alignment_errors=json.dumps([0.1, 0.2, 0.15, 0.3]), source_layers=json.dumps([0, 2, 3, 5]),
)  # fmt: skip
FRESH = artifact("fresh", seed=3)
BAD_NAME = artifact(HOSTILE, seed=4)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tiny_target_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    keys = ("--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    limit = {"UNLOCK_MAX_STRENGTH": f"{MAX_STRENGTH:g}"}  # not the default: the page must ask the server
    proc = tiny_server(tiny_target_model, tmp / "registry", tmp / "server.log", *keys, env=limit).start()
    for data in (STEER, MARKUP):
        r = httpx.post(f"{proc.url}/v1/capabilities", content=data, headers=bearer(ADMIN_KEY), timeout=120)
        assert r.status_code == 201, r.text
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    out = {}
    for name, data in (("fresh", FRESH), ("bad-name", BAD_NAME)):
        out[name] = folder / f"{name}.safetensors"
        out[name].write_bytes(data)
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    browser = chromium(tmp_path_factory.mktemp("chromium-profile"))
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def shown_status(server, name: str) -> int:
    """The status of `GET /v1/capabilities/{name}`, asked of the API directly."""
    return httpx.get(f"{server.url}/v1/capabilities/{name}", headers=bearer(API_KEY), timeout=60).status_code


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def find_all(driver, css: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def state_of(driver, css: str) -> str | None:
    return find(driver, css).get_attribute("data-state")


def set_value(driver, element, value: str) -> None:
    """What dragging a slider or picking an option does: set the value, fire input and change."""
    driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));",
        element,
        value,
    )


def row(driver, name: str):
    rows = [
        r for r in find_all(driver, "#capability-list li.capability") if r.get_attribute("data-name") == name
    ]
    return rows[0] if rows else None


def listed(driver) -> list[str]:
    # One script call: the list may be re-rendered between finding its rows and reading them.
    return driver.execute_script(
        "return [...document.querySelectorAll('#capability-list li.capability')].map(li => li.dataset.name)"
    )


def no_markup_rendered(driver, root_css: str) -> None:
    assert find_all(driver, f"{root_css} img, {root_css} b, {root_css} i, {root_css} script") == []
    assert driver.title == TITLE


def test_the_key_is_asked_once_and_kept_in_this_tab_only(server, driver):
    driver.get(f"{server.url}/playground")
    wait(driver, lambda d: find(d, "#key-panel").is_displayed(), "the key panel")
    assert not find(driver, "#app").is_displayed()
    shot(driver, "1-key")
    find(driver, "#api-key").send_keys("not-the-key")
    find(driver, "#key-form button").click()
    wait(driver, lambda d: "wrong API key" in find(d, "#key-message").text, "the server's 403 message")
    assert find(driver, "#key-message").text == "wrong API key for GET /v1/models"
    field = find(driver, "#api-key")
    field.clear()
    field.send_keys(API_KEY)
    find(driver, "#key-form button").click()
    wait(driver, lambda d: find(d, "#app").is_displayed(), "the app after the right key")
    assert find(driver, "#model-name").text == "tiny"
    assert driver.execute_script("return sessionStorage.getItem('unlock.apiKey')") == API_KEY
    assert driver.execute_script("return localStorage.length") == 0
    driver.refresh()  # the same tab: not asked again
    wait(driver, lambda d: find(d, "#app").is_displayed() and listed(d), "the app after a reload")
    assert not find(driver, "#key-panel").is_displayed()
    assert listed(driver) == ["markup", "steer"]
    assert find(row(driver, "steer"), ".cap-meta").text == "rotate · layers 0–3 · default 3"
    assert find(row(driver, "markup"), ".cap-meta").text == "rotate · layers 0–3 · default 0.5"
    shot(driver, "2-loaded")


def run_prompt(driver) -> tuple[str, str]:
    find(driver, "#run").click()
    wait(driver, lambda d: state_of(d, "#answers") == "done", "both answers")
    return find(driver, "#answer-plain .text").text, find(driver, "#answer-steered .text").text


def test_steered_and_unsteered_answers_stream_side_by_side_as_the_api_gives_them(server, driver):
    find(driver, "input[name=route][value=completion]").click()
    prompt = find(driver, "#prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    set_value(driver, find(driver, "#max-tokens"), str(MAX_TOKENS))
    find(row(driver, "steer"), ".cap-toggle").click()
    plain, steered = run_prompt(driver)
    assert plain and steered and plain != steered
    assert find(driver, "#answer-steered .label").text == "steer@3"
    assert find(driver, "#compare-message").text == "The answers differ."
    shot(driver, "3-answers")

    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    api = [
        httpx.post(f"{server.url}/v1/completions", json=b, headers=bearer(API_KEY), timeout=120)
        for b in (body, {**body, "capabilities": [{"name": "steer", "strength": 3}]})
    ]
    # innerText drops the trailing whitespace a <pre> may end with
    assert [r.json()["choices"][0]["text"].strip() for r in api] == [plain.strip(), steered.strip()]

    set_value(driver, find(row(driver, "steer"), ".cap-strength"), "0")
    assert find(row(driver, "steer"), ".strength-value").text == "0"
    plain0, steered0 = run_prompt(driver)
    assert steered0 == plain0 == plain  # strength 0 is unsteered
    assert find(driver, "#answer-steered .label").text == "steer@0"
    assert find(driver, "#compare-message").text == "The two answers are identical."
    set_value(driver, find(row(driver, "steer"), ".cap-strength"), "3")

    # The tokens it edits, overridden for this request: every token instead of rotate's last prompt token.
    set_value(driver, find(row(driver, "steer"), ".cap-positions"), "all")
    _, steered_all = run_prompt(driver)
    assert find(driver, "#answer-steered .label").text == "steer@3:all"
    overridden = {**body, "capabilities": [{"name": "steer", "strength": 3, "positions": "all"}]}
    api_all = httpx.post(
        f"{server.url}/v1/completions", json=overridden, headers=bearer(API_KEY), timeout=120
    )
    assert api_all.json()["choices"][0]["text"].strip() == steered_all.strip()
    set_value(driver, find(row(driver, "steer"), ".cap-positions"), "")


def test_a_sweep_charts_one_point_per_strength(server, driver):
    set_value(driver, find(driver, "#sweep-capability"), "steer")
    field = find(driver, "#sweep-strengths")
    field.clear()
    field.send_keys("0, 9")  # past this server's limit: refused on the page, no request sent
    find(driver, "#run-sweep").click()
    assert find(driver, "#sweep-message").text == "strengths must be numbers within ±8, separated by commas"
    field.clear()
    field.send_keys(", ".join(f"{s:g}" for s in SWEEP))
    find(driver, "#run-sweep").click()
    wait(driver, lambda d: state_of(d, "#sweep-panel") == "done", "the sweep")
    assert find(driver, "#sweep-message").text == f"steer at {len(SWEEP)} strengths"
    lengths = find_all(driver, "figure[data-measure=length] circle.point")
    shifts = find_all(driver, "figure[data-measure=logprob-shift] circle.point")
    assert len(lengths) == len(shifts) == len(SWEEP)
    assert [float(p.get_attribute("data-x")) for p in shifts] == SWEEP
    values = [float(p.get_attribute("data-y")) for p in shifts]
    assert abs(values[0]) < 1e-3, values  # strength 0: the unsteered distribution
    assert max(abs(v) for v in values) > 0.01, values
    assert len(find_all(driver, "#sweep-table tbody tr")) == len(SWEEP)
    shot(driver, "4-sweep")


def test_the_capability_view_plots_layer_norms_and_shows_provenance_as_text(server, driver):
    find(row(driver, "markup"), "button.quiet").click()
    wait(driver, lambda d: find(d, "#capability-view").get_attribute("data-name") == "markup", "the view")
    bars = find_all(driver, "#norm-chart rect.bar")
    norms = Capability.from_bytes(MARKUP).target_directions().norm(dim=-1).tolist()
    assert [float(b.get_attribute("data-value")) for b in bars] == pytest.approx(norms, rel=1e-5)
    text = find(driver, "#provenance").text
    assert f"locked {HOSTILE}; unlocked <i>u</i>" in text
    assert "<b>tiny</b> (qwen2, 4 layers, hidden 64)" in text
    assert "48 examples" in text and "\n16\n" in text and "0.188 mean over 4 layers (holdout)" in text
    assert [c.text for c in find_all(driver, "#layer-table tbody tr td:nth-child(2)")] == ["0", "2", "3", "5"]
    no_markup_rendered(driver, "#capability-view")
    shot(driver, "5-capability")


def test_admins_upload_and_delete_and_see_the_server_s_errors_as_text(server, driver, files):
    find(driver, "#admin summary").click()
    find(driver, "#admin-key").send_keys("not-the-admin-key")
    find(driver, "#upload-file").send_keys(str(files["fresh"]))
    find(driver, "#upload").click()
    message = lambda d: find(d, "#admin-message").text  # noqa: E731
    wait(driver, lambda d: message(d).startswith("403"), "the 403")
    wrong = httpx.post(
        f"{server.url}/v1/capabilities", content=FRESH, headers=bearer("not-the-admin-key"), timeout=60
    )
    assert message(driver) == f"403: {wrong.json()['error']['message']}"
    assert "fresh" not in listed(driver)

    field = find(driver, "#admin-key")
    field.clear()
    field.send_keys(ADMIN_KEY)
    find(driver, "#upload").click()
    wait(driver, lambda d: message(d).startswith("Uploaded"), "the upload")
    wait(driver, lambda d: "fresh" in listed(d), "the list after the upload")  # refreshed after the message
    assert shown_status(server, "fresh") == 200

    # A name made of markup: the server refuses it and the page shows the server's words, as text.
    refused = httpx.post(
        f"{server.url}/v1/capabilities", content=BAD_NAME, headers=bearer(ADMIN_KEY), timeout=60
    )
    assert refused.status_code == 400
    find(driver, "#upload-file").send_keys(str(files["bad-name"]))
    find(driver, "#upload").click()
    wait(driver, lambda d: message(d).startswith("400"), "the 400")
    assert message(driver) == f"400: {refused.json()['error']['message']}"
    assert HOSTILE in message(driver)
    no_markup_rendered(driver, "#admin")
    shot(driver, "6-admin")

    delete = find(row(driver, "fresh"), "button[data-action=delete]")
    delete.click()
    assert delete.text == "confirm delete"  # nothing is deleted on one click
    delete.click()
    wait(driver, lambda d: "fresh" not in listed(d), "the delete")
    assert message(driver) == "Deleted fresh."
    assert shown_status(server, "fresh") == 404


def test_the_browser_enforces_the_content_security_policy(server, driver):
    page_log = [entry["message"] for entry in driver.get_log("browser")]
    assert not [m for m in page_log if "Content Security Policy" in m], page_log
    injected = driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.inlineRan = true';"
        "document.body.append(s); return window.inlineRan === true;"
    )
    assert injected is False
    other_origin = server.url.replace("127.0.0.1", "localhost")
    fetched = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0] + '/health').then(() => done('fetched'), (e) => done('refused: ' + e));",
        other_origin,
    )
    assert fetched.startswith("refused"), fetched
    refusals = [entry["message"] for entry in driver.get_log("browser")]
    assert any("Content Security Policy" in m for m in refusals), refusals
    driver.set_window_size(1400, 2200)
    plain, steered = run_prompt(driver)  # back at the default strength, for the picture
    assert plain != steered
    find(row(driver, "steer"), "button.quiet").click()
    wait(driver, lambda d: find(d, "#capability-view").get_attribute("data-name") == "steer", "the view")
    driver.execute_script("window.scrollTo(0, 0)")
    shot(driver, "playground")
