"""The web demo in a real browser: headless Chromium (Debian's, driven by selenium through
chromedriver) loads the page, types a Chinese prompt, clicks Draw, waits for the image and saves
a screenshot of the page; the picture shown must be the requested size. Then it uploads a
picture to the caption tab and waits for the answer.

Needs the system packages chromium and chromium-driver (``make system-deps``); skipped where
they are missing. ``MARS_SCREENSHOT=docs/serve.png`` also writes the screenshot there (the
README's picture is made that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.test_generate import tiny_pipeline
from tests.test_serve import running_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "一个红色的圆形在一个蓝色的正方形的上面"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver; make system-deps)",
    ),
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1100,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # the driver by path: selenium then never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_draws_a_typed_prompt_at_the_requested_size(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = tiny_pipeline(resolutions=["64x64"], plan=True).save_pretrained(tmp_path / "mars")
    with running_server(ckpt, tmp_path / "run") as url:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        box.send_keys(PROMPT)
        browser.find_element(By.CSS_SELECTOR, "#draw").click()
        size = wait.until(lambda driver: driver.execute_script(
            "const img = document.querySelector('#images img');"
            "return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;"
        ))
        assert size == [64, 64]
        assert browser.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value") == PROMPT
        shot = tmp_path / "serve.png"
        assert browser.save_screenshot(str(shot))

        # the caption tab: upload a picture of another size, get a caption and the resize note
        Image.new("RGB", (80, 40), "white").save(tmp_path / "upload.png")
        browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Caption')]").click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]"))).send_keys(str(tmp_path / "upload.png"))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#upload img")))  # uploaded and shown
        browser.find_element(By.CSS_SELECTOR, "#caption").click()
        note = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#caption-note").text)
        assert note == "The image is 80x40: resized to 64x64, the nearest size this model was trained on."
    with Image.open(shot) as image:
        assert image.size[0] > 500
    if os.environ.get("MARS_SCREENSHOT"):
        shutil.copyfile(shot, Path(os.environ["MARS_SCREENSHOT"]))
