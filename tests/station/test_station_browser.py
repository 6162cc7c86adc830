"""The operator station as a person uses it: a real line (`grad-edge run --serve`, a real
process on a synthetic belt), a real headless Chromium through selenium. Screenshots go to
each test's temporary folder."""

from __future__ import annotations

import sqlite3

import yaml
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait


def wait(driver, seconds: float = 30) -> WebDriverWait:
    return WebDriverWait(driver, seconds, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,))


def text(driver, element_id: str) -> str | None:
    """An element's text, read in one step (the line view replaces its elements each second)."""
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e && e.textContent.trim();",
        element_id)


def number(driver, element_id: str) -> int:
    return int(text(driver, element_id).split()[0])


def test_line_view_shows_the_running_line_and_updates_itself_when_frames_are_judged(
        running_line, browser, tmp_path):
    browser.get(running_line.url)
    wait(browser).until(lambda d: text(d, "frames-belt") and number(d, "frames-belt") > 0)
    browser.execute_script("window.notReloaded = true;")
    first = number(browser, "frames-belt")
    # The page fetches its numbers again by itself: no reload, more frames.
    wait(browser).until(lambda d: number(d, "frames-belt") > first)
    assert browser.execute_script("return window.notReloaded === true;")
    assert text(browser, "state-belt") == "UP"
    assert text(browser, "health") == "healthy"
    # The line's counters from issue 8 are there: missed rejects, alarms, accounting.
    assert number(browser, "missed-belt") == 0
    assert number(browser, "alarms-total") == 0
    assert "captured" in text(browser, "accounting-belt")
    assert float(text(browser, "fps-belt")) > 0
    assert text(browser, "p50-belt").endswith("ms")
    # The latest judged frames, as pictures with score against threshold and verdict.
    wait(browser).until(lambda d: d.execute_script(
        "const i = document.querySelector('figure.live img'); return i && i.naturalWidth > 0;"))
    src, caption = browser.execute_script(
        "const f = document.querySelector('figure.live');"
        "return [f.querySelector('img').src, f.querySelector('figcaption').textContent];")
    assert " / " in caption and any(v in caption for v in ("OK", "DEFECT", "UNKNOWN"))
    assert src.startswith(running_line.url + "live/belt/")
    browser.save_screenshot(str(tmp_path / "line.png"))
    assert (tmp_path / "line.png").stat().st_size > 1000


def test_an_operator_marks_a_defect_false_positive_and_the_database_row_changes_when_submitted(
        running_line, browser, tmp_path):
    browser.get(running_line.url)
    browser.find_element(By.ID, "nav-defects").click()
    wait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#defects a.open")
                            or d.refresh())
    link = browser.find_element(By.CSS_SELECTOR, "#defects a.open")
    defect_id = int(link.text)
    thumb = browser.find_element(By.CSS_SELECTOR, f"#defect-{defect_id} img.thumb")
    assert thumb.get_attribute("src").endswith(f"/defects/{defect_id}/thumb.jpg")
    link.click()

    # The full frame with its heatmap, the box drawn over it, the score against the threshold.
    wait(browser).until(lambda d: d.execute_script(
        "const i = document.getElementById('picture'); return i.complete && i.naturalWidth > 0;"))
    assert "against threshold" in browser.find_element(By.ID, "score").text
    if browser.find_elements(By.ID, "box"):
        rect = browser.find_element(By.CSS_SELECTOR, "#box rect")
        assert float(rect.get_attribute("width")) > 0
    browser.find_element(By.ID, "show-heatmap").click()      # the frame alone
    assert browser.find_element(By.ID, "picture").get_attribute("src").endswith("/frame.jpg")

    browser.find_element(By.ID, "operator").send_keys("maria")
    browser.find_element(By.ID, "comment").send_keys("oil stain, part is good")
    browser.find_element(By.ID, "do-fp").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "message")))
    assert browser.find_element(By.ID, "message").text.startswith(
        f"defect {defect_id} marked false positive by maria")
    assert "false positive (maria)" in browser.find_element(By.ID, "judgement").text
    browser.save_screenshot(str(tmp_path / "defect.png"))
    assert (tmp_path / "defect.png").stat().st_size > 1000

    with sqlite3.connect(running_line.db) as con:
        row = con.execute("SELECT judgement, judged_by, judgements, acknowledged FROM defects "
                          "WHERE id = ?", (defect_id,)).fetchone()
        action = con.execute("SELECT operator, action, comment, via FROM operator_actions "
                             "WHERE defect_id = ?", (defect_id,)).fetchall()
        audit = con.execute("SELECT operator, action, target, via FROM audit").fetchall()
    assert row == ("false_positive", "maria", 1, 1)
    assert action == [("maria", "false_positive", "oil stain, part is good",
                       "station 127.0.0.1")]
    assert ("maria", "false_positive", f"defect {defect_id}", "station 127.0.0.1") in audit

    # Filtered by false positive, the browser lists it.
    browser.get(running_line.url + "defects?fp=yes")
    ids = [int(a.text) for a in browser.find_elements(By.CSS_SELECTOR, "#defects a.open")]
    assert defect_id in ids


def test_shift_report_recounts_when_the_what_if_threshold_moves(running_line, browser, tmp_path):
    browser.get(running_line.url + "report")
    wait(browser).until(EC.presence_of_element_located((By.ID, "report")))
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#report th")]
    assert header[:4] == ["source", "parts", "frames", "defects"] and "FP rate" in header
    frames_at_load = int(browser.find_element(By.CSS_SELECTOR, "#report tr:nth-child(2) "
                                                               "td:nth-child(3)").text)
    slider = browser.find_element(By.CSS_SELECTOR, ".whatif-slider")

    def recount(value: str) -> tuple[int, int, str]:
        browser.execute_script("document.getElementById('whatif-belt').textContent = '';"
                               "arguments[0].value = arguments[1];"
                               "arguments[0].dispatchEvent(new Event('input'));", slider, value)
        wait(browser).until(lambda d: "frames at or above" in text(d, "whatif-belt"))
        said = text(browser, "whatif-belt")
        flagged, frames = (int(x) for x in said.split(" frames")[0].split(" of "))
        return flagged, frames, said

    # At the lowest score on the page, every frame it counted is flagged (the line runs on:
    # the recount may see more frames than the page did).
    low_flagged, frames, said = recount(slider.get_attribute("min"))
    assert frames >= frames_at_load > 0 and low_flagged >= frames_at_load
    assert "defective parts found" in said             # the synthetic line knows its truth
    high_flagged, _, _ = recount(slider.get_attribute("max"))
    assert high_flagged < low_flagged
    browser.save_screenshot(str(tmp_path / "report.png"))


def test_roi_drawn_on_a_frame_is_saved_into_the_config_file_keeping_its_comments(
        running_line, browser, tmp_path):
    browser.get(running_line.url + "roi/belt")
    wait(browser).until(lambda d: d.execute_script(
        "const i = document.getElementById('roi-image'); return i && i.naturalWidth > 0;"))
    operator = browser.find_element(By.NAME, "operator")
    operator.clear()                   # the station remembers the last operator's name
    operator.send_keys("li")
    svg = browser.find_element(By.ID, "roi-svg")
    size = svg.size
    ActionChains(browser).move_to_element_with_offset(svg, -size["width"] // 4,
                                                      -size["height"] // 4) \
        .click_and_hold().move_by_offset(size["width"] // 2, size["height"] // 2) \
        .release().perform()
    drawn = browser.find_element(By.ID, "roi-text").text
    browser.save_screenshot(str(tmp_path / "roi.png"))
    browser.find_element(By.ID, "roi-save").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "message")))
    assert "saved line.yaml sources[0].roi" in browser.find_element(By.ID, "message").text

    text = running_line.config.read_text()
    roi = yaml.safe_load(text)["sources"][0]["roi"]
    assert drawn == f"[{roi[0]}, {roi[1]}, {roi[2]}, {roi[3]}]"
    # Frame pixels (the frames are 64 x 64): about the middle half of the frame.
    assert 8 <= roi[0] < roi[2] <= 56 and 8 <= roi[1] < roi[3] <= 56
    assert text.startswith("# the line the station tests watch")       # comments kept
    with sqlite3.connect(running_line.db) as con:
        (target, operator, detail), = con.execute(
            "SELECT target, operator, detail FROM audit WHERE action = 'roi'").fetchall()
    assert target == "line.yaml sources[0].roi" and operator == "li"
    assert yaml.safe_load(detail)["new"] == roi
