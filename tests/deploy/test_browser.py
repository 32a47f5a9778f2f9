"""The web page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
through selenium) loads `/` from uvicorn, submits a question about a fixture image and reads the
answer from the page. Skipped without Chromium, unless DUALHEAD_REQUIRE_BROWSER=1 (CI) makes it fail."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest
import torch

from dualhead.deploy.serve import create_app
from dualhead.vqa.data import AnswerVocab
from dualhead.vqa.model import DualHeadVQA
from tests.conftest import draw_shape, tiny_model_config

CHROMIUM = os.environ.get("DUALHEAD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DUALHEAD_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_BROWSER = os.environ.get("DUALHEAD_REQUIRE_BROWSER", "") not in ("", "0")
HEADS = {"binary": "yes/no head", "open": "open-ended head"}


def _browser_or_skip() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    message = ""
    if missing:
        message = f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            message = "selenium is not installed: pip install -e '.[dev]'"
    if message:
        if REQUIRE_BROWSER:
            pytest.fail(message + " (DUALHEAD_REQUIRE_BROWSER is set)")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_model():
    """A tiny model served by uvicorn on 127.0.0.1, in a thread of this process."""
    _browser_or_skip()
    import uvicorn

    torch.manual_seed(0)
    model = DualHeadVQA(tiny_model_config(), AnswerVocab(["red", "green", "blue", "circle", "square"]))
    port = _free_port()
    config = uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield model, f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_answers_a_question_about_an_image(served_model, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    model, url = served_model
    image = tmp_path / "green_square.png"
    draw_shape(image, "square", "green", size=48)
    question = "what color is the shape?"
    expected = model.answer([image], [question])[0]

    browser.get(url)
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 30).until(expected_conditions.visibility_of_element_located((By.ID, "result")))

    assert browser.find_element(By.ID, "error").is_displayed() is False
    assert browser.find_element(By.ID, "answer").text == expected.answer
    assert browser.find_element(By.ID, "head").text == HEADS[expected.head]
    assert browser.find_element(By.ID, "probability").text == f"{100 * expected.probability:.1f}%"
    rows = browser.find_elements(By.CSS_SELECTOR, "#top li")
    assert [row.find_element(By.TAG_NAME, "span").text for row in rows] == [name for name, _ in expected.top]
    widths = [row.find_element(By.CLASS_NAME, "fill").value_of_css_property("width") for row in rows]
    assert float(widths[0].removesuffix("px")) >= float(widths[-1].removesuffix("px")) > 0


def test_the_page_shows_the_service_s_error_for_a_file_that_is_not_an_image(served_model, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = served_model
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    browser.get(url)
    browser.find_element(By.ID, "image").send_keys(str(notes))
    browser.find_element(By.ID, "question").send_keys("is it red?")
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 30).until(expected_conditions.visibility_of_element_located((By.ID, "error")))
    assert "not an image in an accepted format" in browser.find_element(By.ID, "error").text
    assert not browser.find_element(By.ID, "result").is_displayed()
