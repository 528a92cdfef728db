// Small inline-SVG charts: a line of points per x (the strength sweep) and bars per layer (direction norms).

import { fmt, svg } from "./dom.js";

const W = 320;
const H = 180;
const PAD = { left: 48, right: 12, top: 24, bottom: 36 };

function scale(values, from, to) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    lo -= Math.abs(lo) * 0.1 || 1;
    hi += Math.abs(hi) * 0.1 || 1;
  }
  const map = (v) => from + ((v - lo) / (hi - lo)) * (to - from);
  map.lo = lo;
  map.hi = hi;
  return map;
}

function frame(title, xLabel, yLabel, y) {
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  chart.append(svg("title", {}, title));
  chart.append(svg("text", { x: PAD.left, y: 14, class: "chart-title" }, title));
  const bottom = H - PAD.bottom;
  chart.append(svg("line", { x1: PAD.left, y1: bottom, x2: W - PAD.right, y2: bottom, class: "axis" }));
  chart.append(svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: bottom, class: "axis" }));
  for (const v of [y.lo, (y.lo + y.hi) / 2, y.hi]) {
    chart.append(svg("text", { x: PAD.left - 4, y: y(v) + 4, class: "tick y" }, fmt(v)));
  }
  chart.append(svg("text", { x: (W + PAD.left) / 2, y: H - 4, class: "axis-label" }, xLabel));
  chart.append(
    svg("text", { x: 12, y: (H - PAD.bottom + PAD.top) / 2, class: "axis-label y-label",
                  transform: `rotate(-90 12 ${(H - PAD.bottom + PAD.top) / 2})` }, yLabel),
  );
  return chart;
}

// points: [{x, y, note}] where y may be null (no value: no point). One circle.point per valued x.
export function lineChart(points, { title, xLabel, yLabel }) {
  const valued = points.filter((p) => p.y !== null && Number.isFinite(p.y));
  const x = scale(points.map((p) => p.x), PAD.left + 10, W - PAD.right - 10);
  const y = scale(valued.length ? valued.map((p) => p.y) : [0], H - PAD.bottom - 8, PAD.top + 8);
  const chart = frame(title, xLabel, yLabel, y);
  for (const p of points) {
    chart.append(svg("text", { x: x(p.x), y: H - PAD.bottom + 14, class: "tick x" }, fmt(p.x)));
  }
  chart.append(
    svg("polyline", { class: "series", points: valued.map((p) => `${x(p.x)},${y(p.y)}`).join(" ") }),
  );
  for (const p of valued) {
    const point = svg("circle", { cx: x(p.x), cy: y(p.y), r: 4, class: `point${p.bound ? " bound" : ""}`,
                                  dataset: { x: p.x, y: p.y } });
    point.append(svg("title", {}, `${fmt(p.x)}: ${fmt(p.y)}${p.note ? ` (${p.note})` : ""}`));
    chart.append(point);
  }
  return chart;
}

// bars: [{label, value, note}]: one rect.bar each.
export function barChart(bars, { title, xLabel, yLabel }) {
  const y = scale([0, ...bars.map((b) => b.value ?? 0)], H - PAD.bottom, PAD.top + 8);
  const chart = frame(title, xLabel, yLabel, y);
  const slot = (W - PAD.left - PAD.right) / Math.max(bars.length, 1);
  const every = Math.ceil(bars.length / 12); // at most about 12 labels: a 24-layer model's would overlap
  bars.forEach((b, i) => {
    const left = PAD.left + i * slot;
    const top = y(b.value ?? 0);
    const bar = svg("rect", { x: left + slot * 0.15, y: top, width: slot * 0.7, height: y(0) - top,
                              class: "bar", dataset: { label: b.label, value: b.value } });
    bar.append(svg("title", {}, `${b.label}: ${fmt(b.value)}${b.note ? ` (${b.note})` : ""}`));
    chart.append(bar);
    if (i % every === 0) {
      chart.append(svg("text", { x: left + slot / 2, y: H - PAD.bottom + 14, class: "tick x" }, b.label));
    }
  });
  return chart;
}
