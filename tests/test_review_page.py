"""The reviewer's page in a real browser (Debian's headless Chromium through selenium): sign in with a
reviewer key, claim with `n`, edit the answer, submit with Ctrl+Enter, and the held client gets the
corrected answer; an app key is told it cannot review. Leaves a screenshot at
bench/out/review/page.png.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from core.db import Example, make_engine, session_factory, session_scope, upgrade, utcnow
from core.keys import create_key
from core.settings import load_settings
from gateway.app import create_app
from gateway.review.service import ReviewService

from .conftest import REPO, ServerThread, skip_or_fail

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = REPO / "bench" / "out" / "review" / "page.png"
ANSWER = "Tariff T896 is available in Leeds and York, with a fixed price until 2027."
FIXED = "Tariff T896 is available in Leeds only, with a fixed price until 2027."
# Turns before the question: the reviewer must see them, since the training example carries them.
CONVERSATION = [
    {"role": "system", "content": "You are Northwind Energy's tariff assistant. Answer in one sentence."},
    {"role": "user", "content": "Hello, I have a question about a tariff."},
    {"role": "assistant", "content": "Of course: which tariff?"},
]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        skip_or_fail("Debian's chromium and chromium-driver are not installed (deploy/scripts/ensure-services.sh)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never download a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1100,1250",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


@pytest.fixture
def gateway(tmp_path):
    settings = load_settings(None, var_dir=tmp_path, vllm={"url": "http://127.0.0.1:9"})
    upgrade(settings.database_url)
    sessions = session_factory(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        app_key, app_row = create_key(session, "shop", "app")
        reviewer_key = create_key(session, "alice", "reviewer")[0]
        app_key_id = app_row.id
    question = "Where is tariff T896 available, and until when is its price fixed?"
    row = {
        "id": uuid.uuid4().hex,
        "created_at": utcnow(),
        "api_key_id": app_key_id,
        "route": "support",
        "endpoint": "chat",
        "status_code": 202,
        "request_json": {"model": "support", "messages": CONVERSATION + [{"role": "user", "content": question}]},
        "prompt_text": "\n".join(f"{m['role']}: {m['content']}" for m in CONVERSATION) + f"\nuser: {question}",
        "answer_text": ANSWER,
        "risk": 0.78,
        "decision": "hold",
    }
    start = ANSWER.index(" and York")
    item_id = ReviewService(sessions, settings.review).hold(
        row,
        context="T896 (Northwind Fixed 2027) is available in Leeds. Its unit price is fixed until March 2027.",
        scores={"grounding": 0.34, "entities": 0.5, "numbers": 1.0, "uncertainty": 0.41},
        unsupported_spans=[(start, start + len(" and York"))],
    )
    with ServerThread(create_app(settings)) as server:
        yield {"url": server.url, "app_key": app_key, "reviewer_key": reviewer_key, "item_id": item_id,
               "sessions": sessions}  # fmt: skip


def press(driver, *keys) -> None:
    ActionChains(driver).send_keys(*keys).perform()


def sign_in(driver, url: str, key: str) -> None:
    driver.get(url + "/review")
    box = WebDriverWait(driver, 10).until(ec.visibility_of_element_located((By.ID, "key")))
    box.send_keys(key, Keys.ENTER)


def test_a_reviewer_corrects_a_held_answer_from_the_page(browser, gateway):
    wait = WebDriverWait(browser, 10)
    sign_in(browser, gateway["url"], gateway["reviewer_key"])
    wait.until(ec.visibility_of_element_located((By.ID, "work")))
    wait.until(ec.text_to_be_present_in_element((By.ID, "counts"), "1 waiting"))
    assert "Ctrl" in browser.find_element(By.CLASS_NAME, "shortcuts").text

    browser.find_element(By.TAG_NAME, "body").click()
    press(browser, "n")
    wait.until(ec.visibility_of_element_located((By.ID, "item")))
    assert browser.find_element(By.CSS_SELECTOR, "#answer mark").text.strip() == "and York"
    assert "Leeds" in browser.find_element(By.ID, "context").text
    assert "risk 0.78" in browser.find_element(By.ID, "scores").text
    shown = browser.find_element(By.ID, "conversation")
    assert shown.is_displayed() and all(turn["content"] in shown.text for turn in CONVERSATION)

    press(browser, "e")  # edit: the textarea opens with the answer in it, focused
    corrected = wait.until(ec.visibility_of_element_located((By.ID, "corrected")))
    assert corrected.get_attribute("value") == ANSWER
    corrected.clear()
    corrected.send_keys(FIXED)
    browser.find_element(By.ID, "reason").send_keys("York is not in the context")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "Decided: edit"))

    outcome = httpx.get(
        f"{gateway['url']}/v1/reviews/{gateway['item_id']}",
        headers={"Authorization": f"Bearer {gateway['app_key']}"},
    )
    assert outcome.status_code == 200
    assert (outcome.json()["verdict"], outcome.json()["answer"]) == ("edit", FIXED)
    with session_scope(gateway["sessions"]) as session:  # trained on: exactly the turns the page showed
        [trained] = session.scalars(select(Example.messages)).all()
    assert trained[:3] == CONVERSATION and trained[-1] == {"role": "assistant", "content": FIXED}

    press(browser, "n")  # nothing left
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "queue is empty"))


def test_an_app_key_is_told_it_cannot_review(browser, gateway):
    sign_in(browser, gateway["url"], gateway["app_key"])
    WebDriverWait(browser, 10).until(ec.text_to_be_present_in_element((By.ID, "message"), "cannot review"))
    assert browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "work").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('tunegate.reviewerKey')") is None
