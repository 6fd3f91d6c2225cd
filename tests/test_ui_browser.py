"""The MLflow UI as a user sees it, rendered by a real browser (Debian's headless Chromium driven by chromedriver).

A tiny two-stage pipeline writes a sqlite store; `oodlab ui` serves it on a free port on 127.0.0.1; the page
`oodlab ui` prints must show each stage as its own row with OOD metric columns, chart the stages' per-epoch
curves together, and the pipeline's report.html must render in MLflow's artifact viewer with its images. A
teammate without that link, in a fresh browser (MLflow opens it in GenAI mode), who types the experiment's runs
page or clicks the experiment on the server's home page, must reach the same table in one click: from the
description's first line or the runs page's Views menu. Screenshots are saved under the test's temp folder
(their paths are printed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from servers import free_port, stop, wait_for_http

from oodlab import config
from oodlab.distributed import pipeline
from oodlab.distributed.tracking import VIEW_KEY, VIEW_NAME, metric_column, runs_path, with_view_link

pytestmark = pytest.mark.usefixtures("ray_cluster")
CHROMIUM, CHROMEDRIVER = "chromium", "chromedriver"
STAGES = {"baseline": {"epochs": 2, "lr": 0.05},
          "bg": {"init": "baseline", "epochs": 1, "lr": 0.01, "background": {"weight": 0.1}}}
NEW_SCORES = ["gen", "scale", "fdbd", "vim", "nnguide"]
EVAL = {"scores": ["msp", "energy"], "final_scores": ["msp", "energy", *NEW_SCORES]}
LINK_TEXT = "Compare the trained models"  # the description's first line
SETUP_HINT = "run `make setup` (scripts/setup.sh installs Debian's chromium and chromium-driver, and selenium)"


def browser():
    """Headless Chromium under selenium, 1920x1080; fails (never skips) when the browser is not installed."""
    binary, driver = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    if binary is None or driver is None:
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed for this test: {SETUP_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is needed for this test: {SETUP_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1920,1080"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for_text(driver, texts: list[str], timeout_s: float = 120) -> str:
    """The page's rendered text once it contains every one of `texts` (the UI loads its data asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = driver.find_element("tag name", "body").text
        missing = [t for t in texts if t not in body]
        if not missing:
            return body
        assert time.monotonic() < deadline, f"the page never showed {missing}; it shows:\n{body[:3000]}"
        time.sleep(1)


def wait_for_element(driver, css: str, timeout_s: float = 30):
    """The first element matching the CSS selector once the page has rendered it."""
    deadline = time.monotonic() + timeout_s
    while not (found := driver.find_elements("css selector", css)):
        assert time.monotonic() < deadline, f"the page never showed {css}"
        time.sleep(0.5)
    return found[0]


def shown(value: float) -> str:
    """A metric as MLflow's runs table shows it: the value unformatted, as JavaScript writes a number (the shortest
    digits that read back the same, as Python's repr, but 100 for 100.0)."""
    return repr(float(value)).removesuffix(".0")


def screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_root):
    """A finished two-stage pipeline and `oodlab ui` serving its store; yields (state, page URL, base URL, tmp)."""
    tmp = tmp_path_factory.mktemp("ui")
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({**tiny_raw(tmp, demo_root), "stages": STAGES, "eval": EVAL}))
    state = pipeline.run(config.load(path))
    port = free_port()
    log = tmp / "ui.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "oodlab.cli", "ui", str(path), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, "oodlab ui")
        page = re.search(r"open (\S+)", log.read_text()).group(1)  # the address `oodlab ui` tells the user to open
        yield state, page, base, tmp
    finally:
        stop(server)


def test_runs_page_shows_each_stage_with_ood_columns_and_their_curves(served):
    state, page, base, tmp = served
    assert page.startswith(f"{base}/#/experiments/") and "workflowType=machine_learning" in page
    driver = browser()
    try:
        driver.get(page)
        # One row per stage with its numbers, no click: the shared view sorts by a metric (child runs un-nest). The
        # table renders only the columns in view: the first headline columns.
        body = wait_for_text(driver, ["t/baseline", "t/bg", "id_acc", "ood/energy/all/auroc", "ood/energy/all/fpr95"])
        for name, record in state.stages.items():
            assert shown(record.metrics["id_acc"]) in body, f"{name}: its id_acc is not in the table"
        assert "GenAI" not in driver.current_url and "Runs" in body
        screenshot(driver, tmp / "runs_page.png")

        driver.get(f"{page}&compareRunsMode=CHART")  # the same view's charts: per-epoch curves of both stages
        charts = wait_for_text(driver, ["ood/energy/val/fpr95", "t/baseline (ood/energy/val/fpr95)",
                                        "t/bg (ood/energy/val/fpr95)"])
        assert "Model metrics (0)" not in charts
        screenshot(driver, tmp / "charts.png")
    finally:
        driver.quit()


def models_table(driver, state) -> None:
    """The saved view as the page shows it: a row per trained model (no pipeline row), its ID accuracy and headline
    columns, and, scrolled to the right, every final score's AUROC column with each model's value."""
    from selenium.webdriver.common.by import By

    rows = f"{len(STAGES)} matching runs"  # the stage runs only, not the pipeline run
    body = wait_for_text(driver, ["t/baseline", "t/bg", "id_acc", "ood/energy/all/auroc", rows])
    for name, record in state.stages.items():
        assert shown(record.metrics["id_acc"]) in body, f"{name}: its id_acc is not in the table"
    driver.execute_script("arguments[0].scrollLeft = arguments[0].scrollWidth",
                          driver.find_element(By.CLASS_NAME, "ag-body-horizontal-scroll-viewport"))
    body = wait_for_text(driver, [f"ood/{s}/all/auroc" for s in NEW_SCORES])
    headers = driver.execute_script("return [...document.querySelectorAll('.ag-header-cell')]"
                                    ".map(e => e.getAttribute('col-id'))")
    assert {metric_column(f"ood/{s}/all/auroc") for s in NEW_SCORES} <= set(headers)
    for name, record in state.stages.items():
        for s in NEW_SCORES:
            assert shown(record.metrics[f"ood/{s}/all/auroc"]) in body, f"{name}: no {s} AUROC in the table"


def click_description_link(driver) -> None:
    """Click the link on the description's first line; it opens in a new tab, which becomes the current one."""
    from selenium.webdriver.common.by import By

    wait_for_text(driver, [LINK_TEXT])
    for got_it in driver.find_elements(By.XPATH, "//button[normalize-space()='Got it']"):  # a GenAI tip over the page
        got_it.click()
    tabs = len(driver.window_handles)
    driver.find_element(By.PARTIAL_LINK_TEXT, LINK_TEXT).click()
    deadline = time.monotonic() + 30
    while len(driver.window_handles) == tabs:
        assert time.monotonic() < deadline, "the description's link opened no tab"
        time.sleep(0.5)
    driver.switch_to.window(driver.window_handles[-1])


def test_the_experiment_page_without_the_printed_link_reaches_each_model_in_one_click(served):
    state, page, base, tmp = served
    from selenium.webdriver.common.by import By

    experiment = re.search(r"#/experiments/(\d+)/", page).group(1)
    driver = browser()  # a fresh profile: MLflow opens it in GenAI mode, the experiment's kind tag notwithstanding
    try:
        # The runs page, typed by hand: the description's first line carries the link, and Views lists the view.
        driver.get(f"{base}/#/experiments/{experiment}/runs")
        wait_for_text(driver, ["Training runs", LINK_TEXT])
        screenshot(driver, tmp / "runs_page_typed.png")
        driver.find_element(By.CSS_SELECTOR, '[data-testid="saved-views-trigger"]').click()
        item = wait_for_element(driver, f'[data-testid="saved-views-item-{VIEW_KEY}"]')
        assert item.text == VIEW_NAME
        item.click()
        models_table(driver, state)
        screenshot(driver, tmp / "view_from_menu.png")

        # The server's home page, the experiment's name, then the description's link.
        driver.get(f"{base}/")
        wait_for_text(driver, ["Recent Experiments", "test"])
        driver.find_element(By.LINK_TEXT, "test").click()
        click_description_link(driver)
        assert "workflowType=machine_learning" in driver.current_url
        models_table(driver, state)
        screenshot(driver, tmp / "view_from_home.png")
    finally:
        driver.quit()


def test_report_renders_in_the_artifact_viewer_with_its_images(served):
    state, page, base, tmp = served
    from selenium.webdriver.common.by import By

    experiment = re.search(r"#/experiments/(\d+)/", page).group(1)
    driver = browser()
    try:
        driver.get(f"{base}/#/experiments/{experiment}/runs/{state.parent_run_id}/artifacts/report.html"
                   "?workflowType=machine_learning")
        wait_for_text(driver, ["report.html"])
        deadline = time.monotonic() + 60
        while not driver.find_elements(By.TAG_NAME, "iframe"):
            assert time.monotonic() < deadline, "MLflow's artifact viewer did not render report.html"
            time.sleep(1)
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        report = wait_for_text(driver, ["t: stages compared", "Score energy", "Score msp", "Config"])
        assert all(f"\n{name} " in report for name in STAGES), "each stage has a row in the comparison tables"
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 3 * len(STAGES)  # ROC, histogram and per-epoch curve of each stage
        widths = [driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images]
        assert all(w and w > 100 for w in widths), f"images that did not decode: {widths}"
        driver.switch_to.default_content()
        screenshot(driver, tmp / "report_top.png")
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        driver.execute_script("arguments[0].scrollIntoView()", images[0])
        driver.switch_to.default_content()
        screenshot(driver, tmp / "report_images.png")
    finally:
        driver.quit()


def test_the_description_link_goes_first_and_keeps_what_a_teammate_wrote():
    link = with_view_link("", "7")
    assert link.startswith(f"**[{LINK_TEXT}]({runs_path('7')})**") and "\n" not in link
    notes = "Baselines for the March review.\n\nAsk Ana before deleting runs."
    assert with_view_link(notes, "7") == f"{link}\n\n{notes}"
    assert with_view_link(with_view_link(notes, "7"), "7") == f"{link}\n\n{notes}"  # replaced, not repeated
