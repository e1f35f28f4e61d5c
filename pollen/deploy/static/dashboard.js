// The pollen run's status page: polls /api/status (the same JSON the tests read) and
// draws it. Every value from the run (client names, errors, config) goes in as text
// (textContent), never as markup. No library, no network access beyond this server.
"use strict";

const FINAL = ["completed", "failed", "interrupted"];
const SVG = "http://www.w3.org/2000/svg";
const SERIES = [["train", "train (clients)"], ["evaluate", "eval (clients)"], ["server", "server test set"]];
const token = new URLSearchParams(window.location.search).get("token");

function $(id) { return document.getElementById(id); }

function text(id, value) { $(id).textContent = value === null || value === undefined ? "-" : String(value); }

function ago(seconds, now) {
  if (seconds === null || seconds === undefined) { return "not yet"; }
  const d = Math.max(0, Math.round(now - seconds));
  return d < 120 ? d + " s ago" : Math.round(d / 60) + " min ago";
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (cls) { td.className = cls; }
  row.appendChild(td);
}

function showClients(clients, now) {
  const body = $("clients").querySelector("tbody");
  body.replaceChildren();
  for (const c of clients) {
    const row = document.createElement("tr");
    row.dataset.client = c.name;
    cell(row, c.name, "name");
    cell(row, ago(c.last_seen, now));
    cell(row, c.rounds, "num");
    cell(row, c.failures, c.failures ? "num failed-cell" : "num");
    cell(row, c.last_error || "");
    body.appendChild(row);
  }
  $("no-clients").hidden = clients.length > 0;
}

function showConfig(config) {
  const box = $("config");
  box.replaceChildren();
  for (const key of Object.keys(config).sort()) {
    const item = document.createElement("div");
    const name = document.createElement("span");
    name.className = "key";
    name.textContent = key + ": ";
    item.appendChild(name);
    item.appendChild(document.createTextNode(JSON.stringify(config[key])));
    box.appendChild(item);
  }
}

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) { el.setAttribute(k, String(v)); }
  parent.appendChild(el);
  return el;
}

function chart(svg, curves, metric, numRounds) {
  svg.replaceChildren();
  const W = 420, H = 220, L = 44, R = 10, T = 10, B = 30;
  const values = [];
  for (const [key] of SERIES) {
    for (const p of curves) { const v = p[key + "_" + metric]; if (typeof v === "number") { values.push(v); } }
  }
  const top = metric === "accuracy" ? 1 : Math.max(1e-9, ...values) * 1.1;
  const last = Math.max(1, numRounds, ...curves.map((p) => p.round));
  const x = (r) => L + (last <= 1 ? 0.5 : (r - 1) / (last - 1)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, svg);
  svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, svg);
  for (const v of [0, top / 2, top]) {
    const label = svgEl("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, svg);
    label.textContent = v.toPrecision(2);
  }
  const step = Math.max(1, Math.ceil(last / 10));
  for (let r = 1; r <= last; r += step) {
    const label = svgEl("text", { x: x(r), y: H - B + 14, "text-anchor": "middle" }, svg);
    label.textContent = String(r);
  }
  const caption = svgEl("text", { x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle" }, svg);
  caption.textContent = "round";
  // Accuracy rises and loss falls: the legend goes where the curves are not.
  const shown = SERIES.filter(([key]) => curves.some((p) => typeof p[key + "_" + metric] === "number"));
  let legendY = metric === "accuracy" ? H - B - 8 - 14 * (shown.length - 1) : T + 12;
  for (const [key, name] of SERIES) {
    const points = curves.filter((p) => typeof p[key + "_" + metric] === "number");
    if (!points.length) { continue; }
    const path = points.map((p) => x(p.round).toFixed(1) + "," + y(p[key + "_" + metric]).toFixed(1));
    svgEl("polyline", { points: path.join(" "), class: "line " + key }, svg);
    for (const p of points) {
      svgEl("circle", { cx: x(p.round), cy: y(p[key + "_" + metric]), r: 3, class: key }, svg);
    }
    const legend = svgEl("text", { x: W - R - 4, y: legendY, "text-anchor": "end", class: "legend " + key }, svg);
    legend.textContent = name;
    legendY += 14;
  }
}

function show(s) {
  const state = $("state");
  state.textContent = s.status;
  state.className = "state " + s.status;
  text("message", s.error || s.phase || "");
  text("model", s.config.model ? "- " + s.config.model : "");
  text("round", s.round || "-");
  text("num-rounds", s.num_rounds);
  text("rounds-done", s.rounds_done);
  text("elapsed", s.elapsed_seconds === null ? "" : Math.round(s.elapsed_seconds) + " s of training recorded");
  const fraction = s.num_rounds ? Math.min(1, s.rounds_done / s.num_rounds) : 0;
  $("bar-fill").style.width = (100 * fraction).toFixed(1) + "%";
  $("bar").setAttribute("aria-valuemax", String(s.num_rounds));
  $("bar").setAttribute("aria-valuenow", String(s.rounds_done));
  showClients(s.clients, s.now);
  chart($("chart-accuracy"), s.curves, "accuracy", s.num_rounds);
  chart($("chart-loss"), s.curves, "loss", s.num_rounds);
  showConfig(s.config);
  text("run-dir", s.run_dir);
  text("updated", new Date(s.now * 1000).toLocaleTimeString());
  document.body.dataset.status = s.status;
  document.body.dataset.round = String(s.round);
}

async function poll() {
  let delay = 1000;
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const reply = await fetch("api/status", { headers, cache: "no-store" });
    if (reply.ok) {
      const s = await reply.json();
      show(s);
      delay = 1000 * (s.poll_seconds || 1);
      if (FINAL.includes(s.status)) { return; } // the run is over: nothing will change
    } else {
      $("state").textContent = reply.status === 401 ? "token needed" : "error " + reply.status;
      $("state").className = "state unreachable";
      if (reply.status === 401) { return; }
    }
  } catch (err) {
    $("state").textContent = "unreachable";
    $("state").className = "state unreachable";
    delay = 3000;
  }
  window.setTimeout(poll, delay);
}

poll();
