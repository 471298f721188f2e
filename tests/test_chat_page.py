"""The chat page at GET / in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against `sambay serve` on 127.0.0.1 with the embedded default model. It types a
message, waits for the streamed reply and checks that the page shows what the API streamed; the
screenshot it takes goes to the test's temporary folder, or to docs/chat-page.png with
SAMBAY_SCREENSHOT=docs/chat-page.png (how the one in the docs was made): a test run never edits the tree.

Skipped, saying why, where no browser can be had (scripts/setup installs chromium and
chromium-driver with apt-get when it runs as root).
"""

import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from sambay.bench.serve import spawn, wait_ready

webdriver = pytest.importorskip("selenium.webdriver", reason="the chat page test needs selenium "
                                "(pip install 'sambay[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("SAMBAY_SCREENSHOT")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("chat-page") / "server.log"
    proc, url = spawn(["--threads", "1", "--host", "127.0.0.1", "--max-model-len", "1024"], log)
    try:
        wait_ready(url, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not BROWSER or not DRIVER:
        pytest.skip("no chromium / chromedriver on PATH: install Debian's chromium and chromium-driver "
                    "(scripts/setup does, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1200,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_is_served_from_the_package(server):
    with urllib.request.urlopen(server + "/") as r:
        page = r.read().decode()
        assert r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "reasoning_content" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: works offline


def test_chat_in_headless_chromium(server, browser, tmp_path):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text not in ("", "connecting..."))
    assert not browser.find_element(By.ID, "model").text.startswith("not connected")
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.send_keys("40")
    browser.find_element(By.ID, "temperature").send_keys("0")
    box = browser.find_element(By.ID, "input")
    box.send_keys("Tell me a story about a lighthouse.")
    browser.find_element(By.ID, "send").click()
    reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[-1]
    wait.until(lambda d: reply.get_attribute("data-finish"))
    assert reply.get_attribute("data-finish") in ("stop", "length"), reply.text
    answer = reply.find_element(By.CSS_SELECTOR, ".content").text
    assert answer.strip(), reply.text
    assert "finish: " in reply.find_element(By.CSS_SELECTOR, ".meta").text
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.find_element(By.CSS_SELECTOR, ".content").text for u in user] == ["Tell me a story about a lighthouse."]
    # a second turn carries the conversation: two user bubbles, two replies
    box.send_keys("And then?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait.until(lambda d: second.get_attribute("data-finish"))
    assert second.get_attribute("data-finish") in ("stop", "length")
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "chat-page.png"
    shot.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0


def test_stop_button_ends_a_reply(server, browser):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text not in ("", "connecting..."))
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("900")
    browser.find_element(By.ID, "input").send_keys("Write a long story.")
    browser.find_element(By.ID, "send").click()
    reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[-1]
    wait.until(lambda d: reply.find_element(By.CSS_SELECTOR, ".content").text)  # streaming has begun
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: reply.get_attribute("data-finish"))
    assert reply.get_attribute("data-finish") in ("stopped", "stop")
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")
