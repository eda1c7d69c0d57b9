"""`postdiff demo`, as a person meets it: the page served on a free local port, driven by headless Chromium
(Debian's chromium + chromium-driver, installed by scripts/setup.sh) through selenium: a prompt typed, Generate
pressed, both images shown, the saving on the page equal to postdiff's accounting of the same plans, and bad
input answered by a message in the page, not a traceback. Plus the command line and the page's input checks."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import socket
import sys

import pytest
from typer.testing import CliRunner

from postdiff import api
from postdiff.cli import app as cli_app
from postdiff.config import PostDiffConfig
from postdiff.loading import EMBEDDED_GUIDANCE, load_pipeline
from postdiff.models import plan_macs_per_image

MISSING_PYTHON = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
MISSING_BROWSER = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
needs_gradio = pytest.mark.skipif("gradio" in MISSING_PYTHON,
                                  reason="gradio is not installed: pip install 'postdiff[demo]' (scripts/setup.sh does)")
needs_browser = pytest.mark.skipif(bool(MISSING_PYTHON or MISSING_BROWSER), reason=(
    f"not installed: {', '.join(MISSING_PYTHON + MISSING_BROWSER)} (scripts/setup.sh installs the demo and test "
    "extras and Debian's chromium + chromium-driver)"))

PROMPT, STEPS, SEED = "a photo of a sneaker", 6, 3
WAIT_S = 60


def test_demo_help_names_its_options_and_the_extra():
    result = CliRunner().invoke(cli_app, ["demo", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    for option in ("--model", "--host", "--port", "--share", "--no-share", "postdiff[demo]"):
        assert option in result.output


def test_demo_without_gradio_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "postdiff.demo", raising=False)
    result = CliRunner().invoke(cli_app, ["demo"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "needs gradio" in output and "pip install 'postdiff[demo]'" in output
    assert "Traceback" not in output


@needs_gradio
@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps=0 is not allowed"), ("steps", None, "steps=None is not allowed"),
    ("seed", -1, "seed=-1 is not allowed"), ("beta", "2", "beta=2.0 is not allowed"),
    ("beta", "half", "beta='half' is not allowed: expected a number, or blank"),
    ("guidance", math.nan, "guidance=nan is not allowed"), ("cache_interval", "0", "cache_interval=0 is not allowed"),
    ("cache_interval", "2.5", "cache_interval=2.5 is not allowed: expected a whole number"),
])
def test_the_page_refuses_bad_fields_naming_them(field, value, message):
    from postdiff.demo import read_request

    fields = dict(prompt=PROMPT, seed=0, steps=8, guidance=3.0, preset="paper", beta="", switch="",
                  cache_interval="", cfg_stop="")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_request("testbed", EMBEDDED_GUIDANCE, **{**fields, field: value})


@needs_gradio
def test_blank_knobs_keep_the_preset_and_filled_ones_override_it():
    from postdiff.demo import read_request

    fields = dict(prompt=PROMPT, seed=0, steps=8, guidance=None, preset="paper", beta="", switch=" ",
                  cache_interval="", cfg_stop="none")
    assert read_request("testbed", 3.0, **fields).config == PostDiffConfig.preset("paper", family="testbed")
    assert read_request("testbed", 3.0, **fields).arguments["guidance_scale"] == 3.0  # blank: the model's default
    changed = read_request("testbed", 3.0, **{**fields, "beta": "0.75", "cfg_stop": "5"}).config
    assert changed == PostDiffConfig.preset("paper", family="testbed").with_changes(beta=0.75, cfg_stop=5)


@needs_gradio
def test_the_plan_picture_has_a_column_per_step_and_marks_what_is_cheaper():
    from postdiff.demo import plan_figure, plan_rows

    plan = expected_plans()[1]
    rows = dict(plan_rows(plan))
    assert [full for full, _ in rows["latent"]] == [False] * 3 + [True] * 3  # switch 0.5 of 6 steps
    # cache interval 2, the deep cache reset at the switch (step 3 recomputes)
    assert [text for _, text in rows["deep blocks"]] == ["run", "cache", "run", "run", "cache", "run"]
    assert all(full for full, _ in rows["CFG"])
    assert len(plan_figure(plan).axes[0].patches) == 4 * STEPS


def expected_plans():
    """The baseline's and the paper preset's plans for the test's call, from postdiff's own planning."""
    pipe, _ = load_pipeline("testbed")
    arguments = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=EMBEDDED_GUIDANCE)
    plans = []
    for config in (PostDiffConfig(), PostDiffConfig.preset("paper", family=api.preset_family(pipe))):
        with api.applied(pipe, config):
            plans.append(api.plan_call(pipe, **arguments))
    return pipe, plans[1], plans[0]


def expected_saving() -> str:
    pipe, postdiff_plan, baseline_plan = expected_plans()
    return f"{1 - plan_macs_per_image(pipe, postdiff_plan) / plan_macs_per_image(pipe, baseline_plan):.1%}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def page_url():
    from postdiff.demo import launch

    port = free_port()
    served = launch(None, "127.0.0.1", port, share=False, block=False)
    yield f"http://127.0.0.1:{port}/"
    served.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")  # both paths given: selenium downloads nothing
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def type_into(browser, field_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.CSS_SELECTOR, f"#{field_id} input, #{field_id} textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text, Keys.TAB)  # Tab: the field's change event, before the click


def summary_after_click(browser, expected_word: str) -> str:
    """Press Generate and wait for the summary to say `expected_word` (set only by this run's answer)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    summary = browser.find_element(By.CSS_SELECTOR, "#summary")
    WebDriverWait(browser, WAIT_S).until(lambda _: expected_word in summary.text)
    return summary.text


def shown_images(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [image.get_attribute("src") for panel in ("baseline", "postdiff")
            for image in browser.find_elements(By.CSS_SELECTOR, f"#{panel} img")]


@needs_browser
def test_the_page_generates_both_images_and_reports_the_accounted_saving_then_refuses_bad_input(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url)
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
    type_into(browser, "prompt", PROMPT)
    type_into(browser, "steps", str(STEPS))
    type_into(browser, "seed", str(SEED))
    text = summary_after_click(browser, "saved")
    WebDriverWait(browser, WAIT_S).until(lambda b: len(shown_images(b)) == 2)
    assert all(source and source.startswith(("http", "data:")) for source in shown_images(browser))
    saving = re.search(r"PostDiff saved (-?\d+\.\d)% of the denoiser MACs", text)
    assert saving, text
    assert float(saving.group(1)) > 0
    assert f"{saving.group(1)}%" == expected_saving()
    assert f"{STEPS} steps" in text and f"seed {SEED}" in text

    type_into(browser, "beta", "2")
    refused = summary_after_click(browser, "Refused")
    assert "beta=2.0 is not allowed: expected a number in (0, 1]" in refused
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in page and "Error" not in page
    assert shown_images(browser) == []  # the previous run's images do not stand beside a refused config
