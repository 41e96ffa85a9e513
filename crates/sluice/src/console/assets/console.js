// Sluice console: the little the server-rendered pages cannot do alone.
// Live charts poll a JSON endpoint and draw an SVG line; destructive forms
// ask for confirmation. No framework, no build step.
"use strict";

const POINTS = 60;

function drawChart(svg, values, unit) {
  const w = 600, h = 120, pad = 4;
  const max = Math.max(1, ...values);
  const step = (w - 2 * pad) / (POINTS - 1);
  const start = POINTS - values.length;
  const points = values.map((v, i) =>
    `${(pad + (start + i) * step).toFixed(1)},${(h - pad - (v / max) * (h - 2 * pad)).toFixed(1)}`);
  // One point is a dot, not yet a line.
  svg.querySelector("polyline").setAttribute("points", points.join(" "));
  const [x, y] = points[points.length - 1].split(",");
  const dot = svg.querySelector("circle");
  dot.setAttribute("cx", x);
  dot.setAttribute("cy", y);
  dot.setAttribute("r", "3");
  const last = values.length ? values[values.length - 1] : 0;
  svg.parentElement.querySelector(".chart-now").textContent =
    `${Math.round(last).toLocaleString("en")} ${unit}`;
  svg.parentElement.querySelector(".chart-max").textContent =
    `max ${Math.round(max).toLocaleString("en")}`;
}

// data-source: JSON endpoint; data-field: the number in its answer;
// data-rate: plot the change per second rather than the value.
function liveChart(svg) {
  const source = svg.dataset.source, field = svg.dataset.field;
  const rate = svg.dataset.rate === "true", unit = svg.dataset.unit || "";
  const values = [];
  let previous = null;
  async function poll() {
    try {
      const r = await fetch(source, { headers: { Accept: "application/json" } });
      if (r.ok) {
        const now = await r.json();
        let v = now[field];
        if (rate) {
          v = previous && now.t > previous.t
            ? Math.max(0, (now[field] - previous[field]) * 1000 / (now.t - previous.t)) : null;
          previous = now;
        }
        if (v !== null && v !== undefined) {
          values.push(v);
          if (values.length > POINTS) values.shift();
          drawChart(svg, values, unit);
        }
      }
    } catch (e) {
      // The node is restarting or gone: keep the chart, try again.
    }
    setTimeout(poll, Number(svg.dataset.interval || 2000));
  }
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("svg.live-chart").forEach(liveChart);
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  });
});
