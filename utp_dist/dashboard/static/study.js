// The study view of a search on the sweep board: the rung chart (the metric per epoch of every trial, with uPlot) and
// params against the metric (parallel coordinates, drawn as SVG). Trials that are out of the race (stopped early,
// failed) are faded. While the search is active the page fetches itself every few seconds and swaps in the tables
// and the charts' data from that one render, as the run page does.
"use strict";
(() => {
  const PARTS = ["tasks", "trials", "importances", "study-summary"];
  const EVERY_MS = 5000;
  const COLORS = ["#2458c4", "#d1495b", "#00798c", "#edae49", "#66a182", "#8d6a9f", "#30638e", "#e07a5f", "#3d405b", "#81b29a", "#f2cc8f", "#6d597a"];
  const FADED = ["stopped-early", "failed"];
  const SVG = "http://www.w3.org/2000/svg";
  const rungChartEl = document.getElementById("chart-rungs");
  const parallelEl = document.getElementById("chart-parallel");
  let rungPlot = null, rungKey = "";

  const color = (number) => COLORS[number % COLORS.length];
  const faded = (trial) => FADED.includes(trial.state);

  function empty(el, text) {
    el.textContent = "";
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = text;
    el.appendChild(p);
  }

  // metric per epoch, one series per trial; the rungs are the x ticks
  function drawRungs(study) {
    const trials = study.trials.filter((t) => t.curve.x.length);
    const key = trials.map((t) => `${t.number}:${t.state}`).join();
    const data = utp.align(trials.map((t) => t.curve));
    if (!trials.length) {
      if (rungPlot) rungPlot.destroy();
      rungPlot = null;
      rungKey = "";
      empty(rungChartEl, `${study.metric} per epoch: no evaluation yet`);
      return;
    }
    if (rungPlot && key === rungKey) {
      rungPlot.setData(data);
      return;
    }
    if (rungPlot) rungPlot.destroy();
    rungChartEl.textContent = "";
    rungKey = key;
    const last = study.rungs[study.rungs.length - 1];
    rungPlot = new uPlot(
      {
        title: `${study.metric} per epoch (rungs at ${study.rungs.join(", ")}; faded: stopped early or failed)`,
        width: Math.max(360, rungChartEl.clientWidth - 12),
        height: 300,
        scales: { x: { time: false, range: () => [0.5, last + 0.5] } },
        axes: [{ label: "epoch", splits: () => Array.from({ length: last }, (_, i) => i + 1) }, { label: study.metric }],
        series: [
          { label: "epoch" },
          ...trials.map((t) => ({
            label: `trial ${t.number}`,
            stroke: faded(t) ? `${color(t.number)}55` : color(t.number),
            width: faded(t) ? 1 : 2,
            dash: faded(t) ? [4, 4] : undefined,
            spanGaps: true,
            points: { size: 6, show: true, fill: faded(t) ? `${color(t.number)}55` : color(t.number) },
          })),
        ],
      },
      data,
      rungChartEl,
    );
  }

  // where a value lies on a parameter's axis, 0 (bottom) .. 1 (top)
  function position(param, value) {
    if (param.kind === "choice") {
      const i = param.choices.findIndex((c) => c === value);
      return param.choices.length > 1 ? i / (param.choices.length - 1) : 0.5;
    }
    const scale = param.kind === "log_uniform" ? Math.log10 : (v) => v;
    const [lo, hi] = [scale(param.low), scale(param.high)];
    return hi > lo ? (scale(value) - lo) / (hi - lo) : 0.5;
  }

  function text(svg, x, y, content, anchor = "middle") {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", y);
    t.setAttribute("text-anchor", anchor);
    t.textContent = content;
    svg.appendChild(t);
  }

  const short = (v) => (typeof v === "number" ? Number(v.toPrecision(3)).toString() : String(v));

  // one vertical axis per parameter and one for the metric; one line per trial with a value
  function drawParallel(study) {
    const trials = study.trials.filter((t) => t.value !== null);
    if (!trials.length) {
      empty(parallelEl, `params vs ${study.metric}: no trial has reached a rung yet`);
      return;
    }
    const values = trials.map((t) => t.value);
    const [vmin, vmax] = [Math.min(...values), Math.max(...values)];
    const metricAxis = { key: study.metric, kind: "uniform", low: vmin, high: vmax };
    const axes = [...study.params, metricAxis];
    const width = Math.max(360, parallelEl.clientWidth - 12), height = 300, top = 40, bottom = 40, side = 60;
    const x = (i) => side + (i * (width - 2 * side)) / Math.max(1, axes.length - 1);
    const y = (p) => top + (1 - p) * (height - top - bottom);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("class", "parallel");
    text(svg, width / 2, 16, `params vs ${study.metric} (at the highest rung each trial reached; faded: out of the race)`);
    axes.forEach((axis, i) => {
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("class", "axis");
      for (const [k, v] of [["x1", x(i)], ["x2", x(i)], ["y1", y(0)], ["y2", y(1)]]) line.setAttribute(k, v);
      svg.appendChild(line);
      text(svg, x(i), height - 8, axis.key);
      if (axis.kind === "choice") axis.choices.forEach((c) => text(svg, x(i) + 4, y(position(axis, c)) + 4, short(c), "start"));
      else {
        text(svg, x(i), y(1) - 6, short(axis.high));
        text(svg, x(i), y(0) + 14, short(axis.low));
      }
    });
    // the best trials are drawn last, on top
    const sign = study.mode === "max" ? 1 : -1;
    for (const t of [...trials].sort((a, b) => sign * (a.value - b.value))) {
      const points = axes.map((axis, i) => {
        const v = i === axes.length - 1 ? t.value : t.params[axis.key];
        return `${x(i)},${y(position(axis, v))}`;
      });
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", color(t.number));
      line.setAttribute("stroke-width", faded(t) ? 1 : 2.5);
      line.setAttribute("stroke-opacity", faded(t) ? 0.35 : 0.95);
      line.setAttribute("data-trial", t.number);
      const title = document.createElementNS(SVG, "title");
      title.textContent = `trial ${t.number} (${t.state}): ${study.metric} ${short(t.value)} at epoch ${t.epochs}`;
      line.appendChild(title);
      svg.appendChild(line);
    }
    parallelEl.textContent = "";
    parallelEl.appendChild(svg);
  }

  function draw(doc) {
    const study = JSON.parse(doc.getElementById("study-data").textContent);
    drawRungs(study);
    drawParallel(study);
    return study;
  }

  const active = (doc) => doc.getElementById("study-live")?.dataset.active === "1";

  async function poll() {
    try {
      const response = await fetch(location.pathname, { credentials: "same-origin", cache: "no-store" });
      const fresh = response.ok ? new DOMParser().parseFromString(await response.text(), "text/html") : null;
      if (fresh && fresh.getElementById("study-data")) {
        utp.swapIn(fresh, PARTS);
        draw(fresh);
        if (!active(fresh)) return;
      }
    } catch (err) {
      // the server is away (restarting): try again later
    }
    setTimeout(poll, EVERY_MS);
  }

  draw(document);
  if (active(document)) setTimeout(poll, EVERY_MS);
})();
