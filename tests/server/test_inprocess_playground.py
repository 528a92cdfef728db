"""The playground's files, in process (fast tier): served from the package without a key, under a
Content-Security-Policy that forbids inline scripts and other origins, and free of inline code or styles
and of anything loaded from elsewhere. The page itself runs in a real browser in test_playground_browser."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib.resources import files

import pytest
from fake_engine import client, settings
from unlock_server.playground import ASSETS, CSP

STATIC = files("unlock_server") / "static"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with client(settings(tmp_path_factory.mktemp("playground"), api_key="k", admin_key="a")) as test_client:
        yield test_client


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] == "script":
            self.script_text += data.strip()


def test_page_and_assets_are_served_without_a_key_under_the_csp(api):
    page = api.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for response in [page, *(api.get(f"/playground/{name}") for name in ASSETS)]:
        assert response.status_code == 200, response.url
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
    assert api.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")
    directives = dict(d.split(" ", 1) for d in CSP.split("; "))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CSP and "*" not in CSP and "data:" not in CSP
    # Not an API operation: the OpenAPI schema (what schemathesis fuzzes) does not list the page.
    assert not [
        p for p in api.get("/openapi.json", headers={"x-api-key": "k"}).json()["paths"] if "playground" in p
    ]


@pytest.mark.parametrize(
    "path", ["/playground/secret.txt", "/playground/..%2Fsettings.py", "/playground/static"]
)
def test_only_the_listed_files_are_served(api, path):
    response = api.get(path)
    assert response.status_code == 404 and "content-security-policy" not in response.headers


def test_page_has_no_inline_script_style_or_handler():
    parser = Tags()
    parser.feed((STATIC / "playground.html").read_text())
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(a.get("src", "").startswith("/playground/") for a in scripts)
    assert parser.script_text == ""
    assert not [tag for tag, _ in parser.tags if tag == "style"]
    for tag, attrs in parser.tags:
        assert "style" not in attrs and not [a for a in attrs if a.startswith("on")], (tag, attrs)


def test_nothing_is_loaded_from_another_origin_and_no_server_text_becomes_html():
    shipped = {name: (STATIC / name).read_text() for name in [*ASSETS, "playground.html"]}
    assert set(ASSETS) | {"playground.html"} == {p.name for p in STATIC.iterdir()}, "an unlisted file ships"
    for name, text in shipped.items():
        # The SVG namespace is an identifier, not a fetch.
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+", text) if u != "http://www.w3.org"]
        assert not urls, (name, urls)
    scripts = "".join(text for name, text in shipped.items() if name.endswith(".js"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in scripts, sink
    assert "sessionStorage" in scripts and "localStorage" not in scripts  # the key lives in the tab only
