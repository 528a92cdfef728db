"""Headless Chromium from Debian's packages (`chromium`, `chromium-driver`), driven by Selenium.

Nothing is downloaded: the browser and the driver are the system's. A missing one fails the test with the
command that installs it (`.ci/run` does).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Flags that let Chromium run as root in a container without a display and without reaching the network
# (a closed network refuses its background connections, many at a time).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1100",
]


def system_chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail(
            "the browser tests need Debian's Chromium and its driver: "
            f"apt-get install -y chromium chromium-driver (found chromium={browser}, chromedriver={driver})",
            pytrace=False,
        )
    return browser, driver


def chromium(profile_dir: Path):
    """A new headless Chromium with an empty profile in `profile_dir`; the browser console is recorded."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tests need selenium: pip install -e '.[test]'", pytrace=False)
    browser, driver = system_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium then never tries to fetch one.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
