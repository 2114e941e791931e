"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): the flow a user clicks through."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_image_folder, tiny_config
from dashboard_support import private_root, serving
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
README_SCREENSHOT = REPO / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return private_root(tmp_path_factory, "browser")


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    with serving(root, tmp_path_factory, "browser-db") as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=server.url, viewport={"width": 1360, "height": 1000})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        # what the Content-Security-Policy blocked (an inline script, a style) is only a console message
        page.on("console", lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None)
        page.errors = errors
        page.goto(f"/web/login?token={server.token}")  # the login URL the dashboard prints on its first start
        assert page.url.endswith("/web/runs")
        yield page
        browser.close()


def shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_create_project_paste_config_queue_and_see_a_finished_run(page, tmp_path):
    page.goto("/web/projects")
    page.fill("#new-project input[name=name]", "fashion")
    page.fill("#new-project input[name=description]", "the quickstart")
    page.click("#new-project button")
    expect(page.locator("h1")).to_contain_text("fashion / configs")

    page.fill("#new-config input[name=name]", "quickstart")
    page.fill("#new-config textarea[name=text]", (REPO / "configs" / "quickstart.yaml").read_text())
    shot(page, tmp_path, "1-config")
    page.click("#new-config button")
    expect(page.locator("h1")).to_contain_text("fashion / runs")

    page.click("text=Queue run")
    expect(page.locator("#run-state")).to_contain_text("queued")
    shot(page, tmp_path, "2-queued-run")

    page.goto("/web/runs")
    expect(page.locator("table.runs")).to_contain_text("seed=1")
    expect(page.locator("table.runs")).to_contain_text("queued")
    shot(page, tmp_path, "3-runs-list")

    page.click("table.runs a:has-text('seed=1')")
    expect(page.locator("#run-state")).to_contain_text("succeeded")
    expect(page.locator("#chart-train .uplot")).to_be_visible()  # the chart was drawn from the run's TensorBoard events
    expect(page.locator("#chart-val .uplot")).to_be_visible()
    matrix = page.locator("img#confusion-matrix")
    expect(matrix).to_be_visible()
    assert matrix.evaluate("img => img.complete && img.naturalWidth > 100")  # the PNG really loaded
    run_page = shot(page, tmp_path, "4-run-page")
    if os.environ.get("UTP_UPDATE_DOCS") == "1":  # refresh the README's picture on purpose, not on every test run
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(run_page, README_SCREENSHOT)

    page.goto("/web/runs")
    page.locator("input[name=ids]").nth(1).check()
    page.locator("input[name=ids]").nth(2).check()
    page.click("#compare button")
    expect(page.locator("#differences")).to_contain_text("train.seed")
    expect(page.locator("#chart-compare-val .uplot")).to_be_visible()
    shot(page, tmp_path, "5-compare")

    page.goto("/web/sweeps")
    page.click("text=seeds")
    expect(page.locator("#tasks")).to_contain_text("FAILED")
    shot(page, tmp_path, "6-sweep-board")

    page.goto("/web/projects")
    expect(page.locator("table")).to_contain_text("fashion")
    shot(page, tmp_path, "7-projects")
    page.goto("/web/agents")
    page.fill("input[name=name]", "cpu-box")
    page.fill("input[name=host]", "127.0.0.1")
    page.click("form.card button")
    expect(page.locator("table")).to_contain_text("cpu-box")
    expect(page.locator("table")).to_contain_text("CPU only")
    shot(page, tmp_path, "8-agents")
    assert page.errors == []  # no JavaScript error on any page
    print(f"screenshots in {tmp_path}")


LIVE_CHART = """async () => {
  const settle = () => new Promise((resolve) => setTimeout(resolve, 100));  // uPlot commits scale changes asynchronously
  const el = document.createElement("div");
  el.style.width = "600px";
  document.body.appendChild(el);
  const draw = utp.liveChart(el, "loss", "step");
  const curves = (n) => [{x: [...Array(n).keys()], y: [...Array(n).keys()]}, {x: [...Array(n).keys()], y: [...Array(n).keys()].map((v) => -v)}];
  draw(["a", "b"], curves(5));
  await settle();
  const plot = draw.plot();
  plot.setScale("x", {min: 1, max: 3});  // the user zoomed in
  plot.setSeries(2, {show: false});      // and switched series b off in the legend
  await settle();
  draw(["a", "b"], curves(9));           // new points arrive
  await settle();
  const kept = {same: draw.plot() === plot, min: plot.scales.x.min, max: plot.scales.x.max, shown: plot.series[2].show, points: plot.data[0].length};
  const other = utp.liveChart(el.appendChild(document.createElement("div")), "acc", "epoch");
  other(["a"], curves(3).slice(0, 1));
  await settle();
  other(["a"], curves(7).slice(0, 1));   // not zoomed: the chart grows with the data
  await settle();
  return {kept, grown: other.plot().scales.x.max};
}"""


def test_live_chart_keeps_zoom_and_selection_when_points_arrive(page):
    page.goto("/web/runs")
    result = page.evaluate(LIVE_CHART)
    assert result["kept"] == {"same": True, "min": 1, "max": 3, "shown": False, "points": 9}
    assert result["grown"] == 6
    assert page.errors == []


def test_api_docs_render_without_internet(page):
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info")).to_contain_text("utp_dist dashboard")
    expect(page.locator(".swagger-ui")).to_contain_text("/api/v1/runs/from-config/{config_id}")
    expect(page.locator(".swagger-ui .authorize")).to_be_visible()  # the bearer scheme: paste the token there
    assert page.errors == []


def test_sweep_board_refreshes_without_a_reload(page, root):
    page.goto("/web/sweeps")
    page.click("text=seeds")
    tasks = page.locator("#tasks")
    expect(tasks.locator("tr.kind-failed")).to_have_count(2)
    page.evaluate("() => { window.notReloaded = true; utp.refreshTables(['tasks'], 0.3); }")
    record = root / "sweeps" / "seeds" / "tasks" / "2.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "state": "COMPLETED", "exit_code": 0}))  # the task was rerun
    expect(tasks.locator("tr.kind-failed")).to_have_count(1)
    assert page.evaluate("() => window.notReloaded") is True  # the same page, its table swapped
    assert page.errors == []


def test_a_queued_run_goes_queued_running_succeeded_on_its_page_without_a_reload(page, server, root, tmp_path):
    """Issue 12: an agent takes the run; its page follows it through every state and fills its chart by itself."""
    with server.client() as api:
        for run in api.get("/api/v1/runs", params={"state": "queued"}).json():  # what earlier tests queued would go first
            api.post(f"/api/v1/runs/{run['id']}/cancel")
        images = make_image_folder(tmp_path / "shapes")
        project = api.post("/api/v1/projects", json={"name": "live"}).json()["id"]
        config = tiny_config(images, root, train={"epochs": 3, "log_every_n_steps": 1})
        config_id = api.post("/api/v1/configs", json={"project_id": project, "name": "tiny", "config": config}).json()["id"]
        run_id = api.post(f"/api/v1/runs/from-config/{config_id}", json={}).json()["run_id"]
    page.goto(f"/web/runs/{run_id}")
    expect(page.locator("#run-state")).to_contain_text("queued")
    page.evaluate("() => { window.notReloaded = true; }")
    command = [sys.executable, "-m", "utp_dist.agent", "--server", server.url, "--name", "browser-agent", "--gpus", "none", "--poll", "0.5"]
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            command, env={**os.environ, **server.xdg_env(), "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        expect(page.locator("#run-state")).to_contain_text("running", timeout=90_000)
        expect(page.locator("#run-state")).to_contain_text("succeeded", timeout=120_000)
        expect(page.locator("#chart-val .uplot")).to_be_visible()
        expect(page.locator("#queue")).to_contain_text("succeeded")  # the parts that change with the state came along
        expect(page.locator("#where")).to_contain_text("browser-agent")
        expect(page.locator("#log-tail")).to_contain_text("done: best")
        shot(page, tmp_path, "9-run-on-an-agent")
    finally:
        agent.terminate()  # SIGTERM: nothing runs any more, so it exits at once
        agent.wait(timeout=30)
    assert page.evaluate("() => window.notReloaded") is True
    assert page.errors == []
