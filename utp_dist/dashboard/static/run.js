// The run page stays live by fetching itself: every few seconds while the run is active, each part that changed
// (title and state, where, progress, queue, figures, files, log) is swapped in from one fresh server render, so the
// parts never disagree; the charts are fed the curves that render carries. A failed fetch (a server restarting)
// waits twice as long each time, up to 15 s, says so, and the page picks up again once the server answers.
"use strict";
(() => {
  const PARTS = ["run-title", "where", "progress", "queue", "figures", "files", "log-tail"];
  const ACTIVE = ["queued", "claimed", "running", "stopping"];
  const EVERY_MS = 3000, MAX_WAIT_MS = 15000;
  const charts = {
    train: utp.liveChart(document.getElementById("chart-train"), "train loss per step", "step"),
    valLoss: utp.liveChart(document.getElementById("chart-val-loss"), "val loss per epoch", "epoch"),
    val: utp.liveChart(document.getElementById("chart-val"), "val metrics per epoch", "epoch"),
  };

  function draw(doc) {
    const s = JSON.parse(doc.getElementById("run-series").textContent);
    charts.train(["train loss"], [s.train.train_loss]);
    charts.valLoss(["val_loss"], [utp.oneBased(s.val.val_loss)]);
    const metrics = Object.keys(s.val).filter((k) => k !== "val_loss");
    charts.val(metrics, metrics.map((k) => utp.oneBased(s.val[k])));
  }

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
