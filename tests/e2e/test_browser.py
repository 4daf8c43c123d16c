"""The app in a real browser: open it, run a round, label three suggestions with the keyboard, undo
one, export CSV and check its rows. Screenshots of each page go to artifacts/screenshots/."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from speler.project import Project

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"

pytestmark = pytest.mark.timeout(300)

EPOCHS = 3
SAMPLE = "synthetic_actions"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def _idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(IDLE, timeout=timeout)


def _goto(page, name: str) -> None:
    page.locator('[data-testid="stTopNavLink"]', has_text=name).first.click()
    page.get_by_role("heading", name=name, exact=True).wait_for(timeout=30_000)
    _idle(page)


def _shot(page, name: str, *, bottom: bool = False) -> None:
    """The viewport (1280×800) as the person sees it; with ``bottom`` also scrolled to the end."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(600)  # let plots finish drawing
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    if bottom:  # the page scrolls inside Streamlit's main element, not the document
        main = page.locator('[data-testid="stMain"]')
        main.evaluate("e => e.scrollTo(0, e.scrollHeight)")
        page.wait_for_timeout(600)
        page.screenshot(path=str(SCREENSHOTS / f"{name}-bottom.png"))
        main.evaluate("e => e.scrollTo(0, 0)")


CURRENT = ".st-key-current_sample h4"


def _sample_id(page) -> str:
    return page.locator(CURRENT).first.inner_text().strip()


def test_round_label_undo_export(app_server, page):
    from playwright.sync_api import expect

    page.goto(app_server.url)
    page.get_by_role("heading", name="Project", exact=True).wait_for(timeout=120_000)
    _idle(page, timeout=120_000)
    expect(page.get_by_text("Labels per class", exact=True)).to_be_visible()  # no round yet
    _shot(page, "project", bottom=True)

    with Project.open(app_server.home, SAMPLE) as project:
        imported = int((project.store.human_labels() >= 0).sum())
        n = project.store.n

    # Round 0 with a few epochs
    _goto(page, "Round")
    page.get_by_text("Settings for the next round").click()
    epochs = page.get_by_role("spinbutton", name="Training epochs")
    epochs.fill(str(EPOCHS))
    epochs.press("Enter")
    _idle(page)
    page.get_by_role("button", name="Run round 0").click()
    expect(page.get_by_text("Training: epoch")).to_be_visible(timeout=60_000)
    expect(page.get_by_role("button", name="Cancel round")).to_be_visible()
    _shot(page, "round_running")
    expect(page.get_by_text("Round 0 done")).to_be_visible(timeout=200_000)
    _idle(page)
    _shot(page, "round")

    # Label three suggestions with the number keys, undo one with U
    _goto(page, "Label")
    heading = page.get_by_role("heading", name="Label", exact=True)
    labeled = []
    for _ in range(3):
        before = _sample_id(page)
        heading.click()  # focus on the page, not in a text field, so shortcuts fire
        page.keyboard.press("1")
        expect(page.locator(CURRENT).first).not_to_have_text(
            before, timeout=30_000)
        _idle(page)
        labeled.append(before)
    _shot(page, "label", bottom=True)
    heading.click()
    page.keyboard.press("u")
    expect(page.locator(CURRENT).first).to_have_text(labeled[-1],
                                                                             timeout=30_000)
    _idle(page)
    expect(page.locator('[data-testid="stToast"]', has_text=f"Undid {labeled[-1]}")).to_be_visible()
    _shot(page, "label_after_undo")
    with Project.open(app_server.home, SAMPLE) as project:
        human = project.store.human_labels()
        assert int((human >= 0).sum()) == imported + 2
        assert human[project.store.sample_index(labeled[-1])] == -1

    _goto(page, "Diagnostics")
    page.wait_for_timeout(1500)
    _shot(page, "diagnostics", bottom=True)

    # Export CSV and check its rows
    _goto(page, "Export")
    _shot(page, "export")
    with page.expect_download(timeout=60_000) as info:
        page.locator(".st-key-download_csv").get_by_role("button", name="CSV", exact=True).click()
    table = pd.read_csv(io.BytesIO(open(info.value.path(), "rb").read()), keep_default_na=False)
    assert len(table) == n
    human = table[table["source"] == "human"]
    assert sorted(human["id"]) == sorted(labeled[:2])
    assert human["annotator"].eq("browser-test").all()
    assert (table["source"] == "imported").sum() == imported
    rest = table[~table["source"].isin(["human", "imported"])]
    assert len(rest) == n - imported - 2
    assert (rest["source"] == "propagated").sum() > 0.9 * len(rest)
    assert (rest.loc[rest["source"] == "propagated", "label"] != "").all()


def test_import_from_server_path_hides_labels_and_keeps_its_tab(app_server, page):
    """Import the fully labeled BasicMotions file with its labels hidden, from the Server path
    tab: the name is prefilled, the tab stays open after the import reruns the page, and the new
    project starts unlabeled."""
    from playwright.sync_api import expect

    path = Path(__file__).resolve().parents[2] / "sample_data" / "basicmotions" / "BasicMotions_TRAIN.ts"
    page.goto(app_server.url)
    page.get_by_role("heading", name="Project", exact=True).wait_for(timeout=120_000)
    _idle(page, timeout=120_000)
    page.get_by_role("tab", name="Server path").click()
    _idle(page)
    field = page.locator(".st-key-server_path input")
    field.fill(str(path))
    field.press("Enter")
    _idle(page)
    name = page.locator(".st-key-path_name input")
    expect(name).to_have_value("BasicMotions_TRAIN")
    name.fill("bm_browser")
    name.press("Enter")
    _idle(page)
    choice = page.locator(".st-key-path_labels input")  # a combobox: type to pick
    choice.click()
    choice.fill("Hide them")
    page.get_by_role("option", name="Hide them: start unlabeled").wait_for(timeout=10_000)
    choice.press("Enter")
    _idle(page)
    _shot(page, "project_import")
    page.get_by_role("button", name="Import path").click()
    expect(page.get_by_text("Imported 40 samples")).to_be_visible(timeout=120_000)
    _idle(page)
    expect(page.get_by_role("tab", name="Server path")).to_have_attribute("aria-selected", "true")
    _shot(page, "project_imported")
    with Project.open(app_server.home, "bm_browser") as project:
        assert (project.store.human_labels() == -1).all()
