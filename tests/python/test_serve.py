"""``scopegym serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) through Selenium drives the dashboard of a BO run on a simulated grid task,
checks that the frame and the maps update, pauses (the step count stops), vetoes the proposed
point, changes β, resumes, and checks that interventions.jsonl and results.json record the three
interventions with their values. A screenshot goes to the test's tmp_path and, when
SCOPEGYM_TEST_ARTIFACTS is set, to that folder as serve.png."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (requirements-dev.txt)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
TASK = "scopegym/StemEelsExplore-v2"
BUDGET = 60


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1600"):
        opts.add_argument(a)
    service = webdriver.ChromeService(executable_path=driver)
    b = webdriver.Chrome(options=opts, service=service)
    b.set_page_load_timeout(30)
    b.set_script_timeout(30)
    return b


def _text(b, id_: str) -> str:
    return b.find_element(By.ID, id_).text


def _canvas(b, id_: str) -> str:
    return b.execute_script(f"return document.getElementById('{id_}').toDataURL();")


def _frames(b) -> list[str]:
    return b.execute_script("return [...document.querySelectorAll('#frame, #frames-extra img')].map((i) => i.src);")


def _wait(b, cond, what: str, timeout: float = 60):
    return WebDriverWait(b, timeout, poll_frequency=0.1).until(lambda _: cond(), message=what)


def test_dashboard_in_headless_chromium(tmp_path: Path):
    if not Path(BIN).exists():
        pytest.skip(f"build the CLI first (cargo build): {BIN}")
    out = tmp_path / "run"
    cfg = tmp_path / "env.toml"
    cfg.write_text(f"budget = {BUDGET}\n")
    # n_initial = 2: the GP maps appear after two measurements.
    # The example limits' dose budget would end the episode after a few spectra.
    limits = tmp_path / "limits.toml"
    limits.write_text('[stem]\ndose_budget = "1e9 e/Å^2"\n')
    agent_cfg = tmp_path / "agent.toml"
    agent_cfg.write_text("n_initial = 2\n")
    proc = subprocess.Popen(
        [BIN, "serve", TASK, "--agent", "bo", "--port", "0", "--seed", "1", "--out", str(out),
         "--env-config", str(cfg), "--config", str(agent_cfg), "--pace", "0.25", "--limits", str(limits)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    b = None
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.stderr.read() if proc.poll() is not None else "")
        b = _browser()
        b.get(url)
        step = lambda: int(_text(b, "runstep"))  # noqa: E731

        # Frames and maps update while the run goes.
        _wait(b, lambda: step() >= 3, "the run does not advance")
        assert b.find_element(By.ID, "acq-controls").is_displayed(), "BO's acquisition controls are hidden"
        src1 = _frames(b)
        map1 = _canvas(b, "map-acq")
        s1 = step()
        _wait(b, lambda: step() >= s1 + 2, "the run stalls")
        src2 = _frames(b)
        map2 = _canvas(b, "map-acq")
        assert len(src1) >= 2 and all(s.startswith("data:image/png;base64,") for s in src1 + src2)
        assert src1 != src2, "the observation's images did not change"
        assert map1 != map2, "the acquisition map did not change"

        # Pause: the step count stops.
        b.find_element(By.ID, "pause").click()
        _wait(b, lambda: _text(b, "status") == "paused", "no pause")
        paused_at = step()
        time.sleep(1.0)
        assert step() == paused_at, "steps went on while paused"
        assert paused_at < BUDGET, "the run ended before the pause; raise BUDGET"

        # Veto the proposed point: the proposal changes.
        proposed = _text(b, "proposed")
        b.find_element(By.ID, "veto").click()
        _wait(b, lambda: _text(b, "proposed") != proposed, "the veto did not change the proposal")
        assert "veto" in _text(b, "msg")

        # β = 2.5.
        beta = b.find_element(By.ID, "beta")
        beta.clear()
        beta.send_keys("2.5")
        b.find_element(By.ID, "set-beta").click()
        _wait(b, lambda: "beta" in _text(b, "msg"), "β not set")
        _wait(b, lambda: '"beta": 2.5' in _text(b, "agent-extra"), "the page does not show β")
        _wait(b, lambda: _text(b, "interventions").count("step") == 3, "interventions not shown")
        assert step() == paused_at

        shot = tmp_path / "serve.png"
        b.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        art = os.environ.get("SCOPEGYM_TEST_ARTIFACTS")
        if art:
            Path(art).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(art) / "serve.png")
            assert (Path(art) / "serve.png").stat().st_size > 0

        # Resume: the run goes on to its end.
        b.find_element(By.ID, "resume").click()
        _wait(b, lambda: _text(b, "status") == "finished", "the run did not finish", timeout=240)

        rec = [json.loads(line) for line in (out / "interventions.jsonl").read_text().splitlines()]
        kinds = [r["kind"] for r in rec]
        assert kinds == ["pause", "veto", "set_control", "resume"], kinds
        assert all(r["step"] == paused_at for r in rec), rec
        veto, ctl = rec[1], rec[2]
        assert str(veto["value"]["action"]) == proposed
        assert ctl["value"] == {"name": "beta", "value": 2.5}
        results = json.loads((out / "results.json").read_text())
        assert [r["kind"] for r in results["interventions"]] == kinds
        assert results["provenance"]["agent_config"]["config"]["acquisition"] == {"ucb": {"beta": 2.5}}
        assert results["per_seed"][0]["episodes"][0]["steps"] == BUDGET
        taken = [json.loads(line)["action"] for line in (out / "steps.jsonl").read_text().splitlines()]
        assert veto["value"]["action"] not in taken
    finally:
        if b is not None:
            b.quit()
        proc.kill()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def test_dkl_embedding_scatter_is_drawn(tmp_path: Path):
    """A DKL run: once the model takes over, the page shows the embedding scatter of the
    measured points (coloured pixels on its canvas) beside the maps."""
    if not Path(BIN).exists():
        pytest.skip(f"build the CLI first (cargo build): {BIN}")
    cfg = tmp_path / "env.toml"
    cfg.write_text("budget = 12\n")
    limits = tmp_path / "limits.toml"
    limits.write_text('[stem]\ndose_budget = "1e9 e/Å^2"\n')
    agent_cfg = tmp_path / "dkl.toml"
    agent_cfg.write_text("n_initial = 3\nhidden = 16\nepochs_initial = 30\nepochs_step = 5\n")
    proc = subprocess.Popen(
        [BIN, "serve", TASK, "--agent", "dkl", "--port", "0", "--seed", "1", "--out", str(tmp_path / "run"),
         "--env-config", str(cfg), "--config", str(agent_cfg), "--pace", "0.1", "--limits", str(limits)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    b = None
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            err = proc.stderr.read() if proc.wait(timeout=60) is not None else ""
            if "torch" in err:
                pytest.skip("the CLI was built without the torch feature")
            raise AssertionError(err)
        b = _browser()
        b.get(url)
        _wait(b, lambda: b.execute_script("return !document.getElementById('fig-scatter').hidden"),
              "no embedding scatter", timeout=120)
        # Pixels that are neither white nor grey inside the plot (left of the colour bar): the
        # points.
        coloured = b.execute_script(
            "const c = document.getElementById('scatter'), d = c.getContext('2d')"
            ".getImageData(0, 0, c.width - 62, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) {"
            "  const r = d[i], g = d[i + 1], bl = d[i + 2];"
            "  if (Math.max(r, g, bl) - Math.min(r, g, bl) > 40) n++; }"
            "return n;")
        assert coloured > 100, coloured
        assert "z0" in _text(b, "scatter-axes")
        assert b.execute_script("return !document.getElementById('fig-acq').hidden")
    finally:
        if b is not None:
            b.quit()
        proc.kill()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def test_agents_without_acquisition_settings_show_no_such_controls(tmp_path: Path):
    """The heuristic has no acquisition, β or ξ: the page hides those controls (BO shows them,
    see the first test)."""
    if not Path(BIN).exists():
        pytest.skip(f"build the CLI first (cargo build): {BIN}")
    cfg = tmp_path / "env.toml"
    cfg.write_text(f"budget = {BUDGET}\n")
    limits = tmp_path / "limits.toml"
    limits.write_text('[stem]\ndose_budget = "1e9 e/Å^2"\n')
    proc = subprocess.Popen(
        [BIN, "serve", TASK, "--agent", "heuristic", "--port", "0", "--seed", "1", "--out", str(tmp_path / "run"),
         "--env-config", str(cfg), "--pace", "0.1", "--limits", str(limits)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    b = None
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.stderr.read() if proc.poll() is not None else "")
        b = _browser()
        b.get(url)
        _wait(b, lambda: int(_text(b, "runstep")) >= 2, "the run does not advance")
        assert not b.find_element(By.ID, "acq-controls").is_displayed()
        assert b.find_element(By.ID, "pause").is_displayed()
    finally:
        if b is not None:
            b.quit()
        proc.kill()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass
