"""A real browser on the Dagster UI: headless Debian Chromium driven by Selenium (Debian's chromedriver).

`look_at_table(url, ...)` opens the asset graph of the table's cluster, the table's partitions and its checks, waits
until each shows what a user looks for, saves a screenshot of each and returns the visible text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_texts(driver: Any, texts: list[str], timeout: float = 60) -> str:
    """Wait until the page's visible text contains every one of `texts`; return that text."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            body = driver.find_element("tag name", "body").text
        except Exception:
            body = ""
        if all(text in body for text in texts):
            return str(body)
        time.sleep(1)
    raise AssertionError(f"the page {driver.current_url} never showed {texts}; it showed:\n{body[:6000]}")


def dismiss_dialogs(driver: Any, settle: float = 3.0) -> None:
    """Close the UI's first-visit newsletter dialog (it appears a moment after the page) and let the page settle."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        for button in driver.find_elements("xpath", "//button[normalize-space()='Skip']"):
            try:
                button.click()
            except Exception:
                pass  # gone between the lookup and the click
        time.sleep(0.5)


def open_partition(driver: Any, partition: str) -> None:
    """Click the day in the partition list, as a user does (for the picture only: the page may re-render under
    the clicks, which is never a failure)."""
    try:
        for row in driver.find_elements("xpath", f"//*[normalize-space(text())='{partition}']"):
            if "No partition selected" not in driver.find_element("tag name", "body").text:
                return
            try:
                row.click()
            except Exception:
                continue  # the timeline's label, not the list's row
            time.sleep(2)
    except Exception:
        return  # an element went stale while the page re-rendered


def look_at_table(
    url: str, graph_texts: list[str], asset_path: list[str], check_names: list[str], partition: str, out: Path
) -> dict[str, str]:
    """Screens a user opens for one table: the asset lineage (showing `graph_texts`: with a few assets their nodes,
    with many the per-cluster groups), the table's partitions, its checks."""
    out.mkdir(parents=True, exist_ok=True)
    asset_url = f"{url}/assets/{'/'.join(asset_path)}"
    screens = {
        "asset-graph": (f"{url}/asset-groups", graph_texts),  # the lineage: source -> landing -> BigQuery
        "partitions": (f"{asset_url}?view=partitions", [partition, "Materialized"]),
        "checks": (f"{asset_url}?view=checks", check_names),
    }
    texts = {}
    with chromium() as driver:
        for name, (page, expected) in screens.items():
            driver.get(page)
            texts[name] = wait_for_texts(driver, expected)
            dismiss_dialogs(driver)
            if name == "partitions":
                open_partition(driver, partition)
            driver.save_screenshot(str(out / f"{name}.png"))
    return texts
