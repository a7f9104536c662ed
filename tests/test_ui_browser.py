"""The MLflow UI in a real browser: headless Chromium shows a tiny run's teacher and student accuracy.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium. Without them the test
is skipped. The same helpers take the screenshot in ``docs/``:

    python -m tests.test_ui_browser --tracking-uri sqlite:///mlflow.db --experiment hdkd \\
        --output docs/images/mlflow-runs.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SERVER_START_TIMEOUT_S = 120
PAGE_TIMEOUT_S = 60
ACCURACY_KEYS = ("eval/teacher_accuracy", "eval/student_accuracy")


def _browser_missing() -> str | None:
    """Return why the browser test cannot run here, or None when it can."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        return f"{' and '.join(missing)} not found (install Debian's chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui_server(tracking_uri: str, log_path: Path):
    """Run ``mlflow server`` on a free 127.0.0.1 port over the given store, and stop it on exit."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not respond on {base_url}/health within "
                                   f"{SERVER_START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@contextmanager
def headless_chromium(width: int, height: int):
    """Start headless Chromium with a fresh profile and no background network traffic, and quit it on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="hdkd-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PAGE_TIMEOUT_S)


def open_runs_table(driver, base_url: str, experiment_id: str) -> None:
    """Open the experiment's runs table in the model-training view, with the side panels closed."""
    from selenium.webdriver.common.by import By

    # MLflow 3 opens experiments in its GenAI view. The workflowType=machine_learning parameter selects the runs
    # table instead.
    driver.get(f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    _wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[role=gridcell][col-id='attributes.`Run Name`']"))
    for label in ("Close", "Toggle sidebar"):
        for button in driver.find_elements(By.CSS_SELECTOR, f"button[aria-label='{label}']"):
            if button.is_displayed():
                button.click()


def _tree_node(driver, name: str):
    from selenium.webdriver.common.by import By

    nodes = driver.find_elements(By.CSS_SELECTOR, "[class*='tree-treenode']")
    return next((node for node in nodes if node.text == name), None)


def _is_checked(node) -> bool:
    from selenium.webdriver.common.by import By

    return bool(node.find_elements(By.CSS_SELECTOR, "[class*='tree-checkbox-checked']"))


def set_columns(driver, shown: tuple[str, ...] = (), hidden: tuple[str, ...] = ()) -> None:
    """Tick (``shown``) or untick (``hidden``) runs-table columns in the Columns menu, found by their search."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait = _wait(driver)
    button = next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Columns")
    button.click()
    search = wait.until(lambda d: [field for field in d.find_elements(By.CSS_SELECTOR,
                                                                       "input[placeholder='Search columns']")
                                   if field.is_displayed()])[0]
    for name, checked in [(name, True) for name in shown] + [(name, False) for name in hidden]:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)
        search.send_keys(name)
        node = wait.until(lambda d: _tree_node(d, name))
        if _is_checked(node) != checked:
            node.find_element(By.CSS_SELECTOR, "[class*='tree-checkbox']").click()
        wait.until(lambda d: (node := _tree_node(d, name)) is not None and _is_checked(node) == checked)
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)


def fit_column_widths(driver) -> None:
    """Widen the metric, param and tag columns to their titles (a double click on the resize handle)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    column_ids = [header.get_attribute("col-id") for header in driver.find_elements(By.CSS_SELECTOR,
                                                                                        "[role=columnheader]")]
    for column_id in [c for c in column_ids if c and c.startswith(("metrics.", "params.", "tags."))]:
        # The header is rendered again after each resize, so it is looked up again each time.
        handles = driver.find_elements(By.CSS_SELECTOR,
                                       f'[role=columnheader][col-id="{column_id}"] .ag-header-cell-resize')
        try:
            if handles:
                ActionChains(driver).double_click(handles[0]).perform()
        except WebDriverException:
            continue
    driver.execute_script("document.activeElement && document.activeElement.blur()")


def cell_text(driver, run_id: str, column_id: str) -> str:
    """Return the text of one runs-table cell, waiting until the grid has rendered it."""
    from selenium.webdriver.common.by import By

    selector = f'[row-id="{run_id}"] [role=gridcell][col-id="{column_id}"]'
    return _wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))[0].text.strip()


# --- The test -------------------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.slow
def test_ui_runs_table_shows_accuracies(mlflow_store, tiny_config, tmp_path):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    import mlflow
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    from hdkd.cli import main

    values = {**tiny_config, "training.num_train_epochs": 1, "tracking.log_model": False,
              "tracking.run_name": "ui-check"}
    args = ["train"]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    run = mlflow.search_runs(experiment_names=["hdkd-test"], output_format="list")[0]

    screenshot_dir = Path(os.environ.get("HDKD_SCREENSHOT_DIR") or tmp_path)
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    screenshot = screenshot_dir / "mlflow-runs-table.png"
    with mlflow_ui_server(mlflow_store, tmp_path / "server.log") as base_url, \
            headless_chromium(1600, 800) as driver:
        open_runs_table(driver, base_url, run.info.experiment_id)
        assert cell_text(driver, run.info.run_id, "attributes.`Run Name`").endswith("ui-check")

        # The table shows no metric columns until they are ticked in the Columns menu.
        assert not driver.find_elements(By.CSS_SELECTOR, "[col-id^='metrics.']")
        set_columns(driver, shown=ACCURACY_KEYS)
        fit_column_widths(driver)
        for key in ACCURACY_KEYS:
            column_id = f"metrics.`{key}`"
            header = driver.find_element(By.CSS_SELECTOR, f'[role=columnheader][col-id="{column_id}"]')
            assert header.text == key
            displayed = cell_text(driver, run.info.run_id, column_id)
            assert float(displayed) == pytest.approx(run.data.metrics[key], abs=1e-3), key
        assert driver.save_screenshot(str(screenshot))

    # The screenshot is the viewport: the window width, and the height less the browser's own bars.
    image = imread(screenshot)
    assert image.shape[1] == 1600
    assert image.shape[0] > 400


# --- Docs screenshot ------------------------------------------------------------------------------------


def take_docs_screenshot(tracking_uri: str, experiment: str, output: Path, width: int, height: int) -> Path:
    """Save the runs table of an experiment with the columns that docs/mlflow-ui.md recommends."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"experiment {experiment!r} not found in {tracking_uri}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, \
            mlflow_ui_server(tracking_uri, Path(scratch) / "server.log") as base_url, \
            headless_chromium(width, height) as driver:
        open_runs_table(driver, base_url, found.experiment_id)
        set_columns(driver, shown=("distill.hidden_weight", "training.learning_rate", *ACCURACY_KEYS,
                                   "eval/agreement", "hdkd.random_weights"),
                    hidden=("Dataset", "Source", "Models"))
        fit_column_widths(driver)
        time.sleep(1)
        driver.save_screenshot(str(output))
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot the MLflow runs table for the docs.")
    parser.add_argument("--tracking-uri", required=True, help="store with the runs, e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="hdkd", help="experiment name (default hdkd)")
    parser.add_argument("--output", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1600, help="window width in pixels (default 1600)")
    parser.add_argument("--height", type=int, default=560, help="window height in pixels (default 560)")
    cli_args = parser.parse_args()
    if reason := _browser_missing():
        raise SystemExit(reason)
    print(take_docs_screenshot(cli_args.tracking_uri, cli_args.experiment, cli_args.output, cli_args.width,
                               cli_args.height))
