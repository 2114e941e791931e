// The run page stays live by fetching itself: every few seconds while the run is active, each part that changed
// (title and state, where, progress, queue, figures, files, log) is swapped in from one fresh server render, so the
// parts never disagree; the charts are fed the curves that render carries. A failed fetch (a server restarting)
// waits twice as long each time, up to 15 s, says so, and the page picks up again once the server answers.
"use strict";
(() => {
  const PARTS = ["run-title", "where", "progress", "queue", "figures", "predictions", "files", "log-tail"];
  const ACTIVE = ["queued", "claimed", "running", "stopping"];
  const EVERY_MS = 3000, MAX_WAIT_MS = 15000;
  const charts = {
    train: utp.liveChart(document.getElementById("chart-train"), "train loss", "step"),
    valLoss: utp.liveChart(document.getElementById("chart-val-loss"), "val loss", "epoch"),
    val: utp.liveChart(document.getElementById("chart-val"), "val metrics", "epoch"),
  };

  // system series by what they measure: one chart each, made on the first sample (a CPU run never makes the GPU ones)
  const SYSTEM = [
    ["util", "GPU utilisation (%)"], ["memory_used_mb", "GPU memory used (MiB)"], ["power_w", "GPU power (W)"],
    ["temperature_c", "GPU temperature (°C)"], ["cpu_percent", "process CPU (% of one core)"], ["ram_mb", "process RAM (MiB)"],
  ];
  const systemCharts = {};
  function drawSystem(system) {
    const box = document.getElementById("system-charts");
    document.getElementById("system-empty").hidden = Object.keys(system).length > 0;
    for (const [field, title] of SYSTEM) {
      const names = Object.keys(system).filter((k) => k === field || k.endsWith("/" + field)).sort();
      if (!names.length) continue;
      if (!systemCharts[field]) {
        const el = document.createElement("div");
        el.className = "chart";
        el.id = `chart-system-${field}`;
        box.appendChild(el);
        systemCharts[field] = utp.liveChart(el, title.split(" (")[0], "step");
      }
      systemCharts[field](names.map((n) => n.split("/")[0]), names.map((n) => system[n]));
    }
  }

  let series = null; // the newest curves, drawn again when a chart control changes
  function draw(doc) {
    if (doc) series = JSON.parse(doc.getElementById("run-series").textContent);
    const s = series;
    charts.train(["train loss"], [s.train.train_loss]);
    charts.valLoss(["val_loss"], [s.val.val_loss]);
    const metrics = Object.keys(s.val).filter((k) => k !== "val_loss");
    charts.val(metrics, metrics.map((k) => s.val[k]));
    drawSystem(s.system || {});
  }
  utp.onControls(() => draw(null));

  // the gallery's filters live outside the part that is swapped in, and apply again to each fresh gallery
  const filters = ["filter-true", "filter-predicted", "filter-wrong"].map((id) => document.getElementById(id));
  function filterGallery() {
    const [truth, predicted, wrong] = filters;
    let shown = 0;
    for (const tile of document.querySelectorAll("#predictions .tile")) {
      const keep = (!truth.value || tile.dataset.true === truth.value) && (!predicted.value || tile.dataset.predicted === predicted.value)
        && (!wrong.checked || tile.classList.contains("wrong"));
      tile.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    const count = document.getElementById("gallery-count");
    if (count) count.textContent = String(shown);
  }
  for (const el of filters) el.addEventListener("change", filterGallery);

  const state = () => document.querySelector("#run-state .state")?.textContent.trim();
  let wait = EVERY_MS;

  async function poll() {
    let fresh = null;
    try {
      const response = await fetch(location.pathname, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    } catch (err) {
      fresh = null; // the server is away (restarting): keep the page as it is and try again later
    }
    const status = document.getElementById("poll-status");
    const answered = Boolean(fresh && fresh.getElementById("run-series")); // not a login page or an error page
    if (answered) {
      utp.swapIn(fresh, PARTS);
      filterGallery();
      draw(fresh);
      wait = EVERY_MS;
      status.hidden = true;
    } else {
      wait = Math.min(wait * 2, MAX_WAIT_MS);
      status.textContent = `The dashboard did not answer; trying again in ${wait / 1000} s.`;
      status.hidden = false;
    }
    if (!answered || ACTIVE.includes(state())) setTimeout(poll, wait);
  }

  draw(document);
  if (ACTIVE.includes(state())) setTimeout(poll, EVERY_MS);
})();
