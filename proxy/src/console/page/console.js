// The cutover console: reads the admin API's JSON (/routes, /history, /shadow) every
// REFRESH_MS and draws it; its buttons call the same write API as `ficus ramp`.
// Everything that comes from the proxy or its backends is set as text, never as HTML.
"use strict";

const REFRESH_MS = 1000;
const READ_TIMEOUT_MS = 5000;
// A ramp command may wait up to 3 s for the shared state store.
const WRITE_TIMEOUT_MS = 10000;
const HISTORY_MS = 15 * 60 * 1000;
const TOKEN_KEY = "ficus-admin-token";
const SVG = "http://www.w3.org/2000/svg";

const state = {
  routes: null,           // the last GET /routes
  shadow: new Map(),      // route name -> its GET /shadow report
  history: new Map(),     // route name -> points, oldest first
  lastPoint: 0,           // at_ms of the newest point held, for /history?since=
  interval: 5,            // seconds between two history points
  cards: new Map(),       // route name -> the card's elements
};

// --- small DOM helpers --------------------------------------------------------------------

/** An element with attributes and children (strings become text nodes). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replaces `slot`'s children, keeping open the `<details>` the operator opened. */
function replaceKeepingOpen(slot, children) {
  const open = new Set([...slot.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  slot.replaceChildren(...children);
  for (const details of slot.querySelectorAll("details")) details.open = open.has(details.dataset.key);
}

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

const $ = (id) => document.getElementById(id);

function fmt(value, digits = 1, unit = "") {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return `${Number(value).toFixed(digits)}${unit}`;
}

function percentText(value) {
  return `${+Number(value).toFixed(2)}%`;
}

function duration(seconds) {
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${+(seconds / 3600).toFixed(1)} h`;
}

/** How long before the proxy's own clock (`now` of /routes) `iso` is. */
function since(iso, now) {
  const seconds = Math.max(0, Math.round((Date.parse(now) - Date.parse(iso)) / 1000));
  if (Number.isNaN(seconds)) return "";
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

// --- reading the API ----------------------------------------------------------------------

async function getJson(path) {
  const response = await fetch(path, {
    cache: "no-store",
    headers: { Accept: "application/json" },
    signal: AbortSignal.timeout(READ_TIMEOUT_MS),
  });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${(await response.text()).trim()}`);
  return response.json();
}

let refreshes = 0;   // refreshes started
let drawn = 0;       // the latest refresh drawn

async function refresh() {
  const number = ++refreshes;
  let routes, history, shadow;
  try {
    routes = await getJson("routes");
    [history, shadow] = await Promise.all([
      getJson(`history?since=${state.lastPoint}`),
      routes.routes.some((r) => r.shadow) ? getJson("shadow") : { routes: [] },
    ]);
  } catch (error) {
    const live = $("live");
    live.className = "live down";
    live.textContent = `DISCONNECTED: ${error.message}. Showing the last data read; retrying.`;
    return;
  }
  // A write's refresh may overtake the periodic one: never draw older data over newer.
  if (number < drawn) return;
  drawn = number;
  state.routes = routes;
  mergeHistory(history);
  state.shadow = new Map(shadow.routes.map((report) => [report.route, report]));
  // A drawing error is a bug: it propagates to the console, not into "DISCONNECTED".
  render();
  const live = $("live");
  live.className = "live";
  live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
}

// Times are the proxy's (`at_ms`), never this browser's, whose clock may be off.
function mergeHistory(history) {
  state.interval = history.interval_seconds;
  for (const [name, points] of Object.entries(history.routes)) {
    const held = state.history.get(name) || [];
    for (const point of points) {
      if (!held.length || point.at_ms > held[held.length - 1].at_ms) held.push(point);
      state.lastPoint = Math.max(state.lastPoint, point.at_ms);
    }
    state.history.set(name, held);
  }
  const cutoff = state.lastPoint - HISTORY_MS;
  for (const held of state.history.values()) {
    while (held.length && held[0].at_ms < cutoff) held.shift();
  }
}

// --- drawing ------------------------------------------------------------------------------

function render() {
  const table = state.routes;
  $("version").textContent = table.version;
  $("loaded").textContent = `${table.loaded_at} (${since(table.loaded_at, table.now)})`;
  $("file").textContent = table.routes_file;
  $("store").textContent = storeText(table.ramp_store);

  const failure = table.last_reload_error;
  const error = $("reload-error");
  error.hidden = !failure;
  if (failure) {
    error.textContent =
      `Reload error at ${failure.at}: the file was rejected and the previous table still serves.\n` +
      failure.errors.join("\n");
  }
  $("reload-list").replaceChildren(
    ...[...table.reloads].reverse().map((r) =>
      h("li", { class: r.result === "error" ? "bad" : null },
        `${r.at} · ${r.trigger} · ${r.result.toUpperCase()}`,
        r.version ? ` · version ${r.version}` : "",
        r.errors ? ` · ${r.errors.join("; ")}` : "")),
  );

  const names = new Set(table.routes.map((r) => r.name));
  for (const [name, card] of state.cards) {
    if (!names.has(name)) {
      card.root.remove();
      state.cards.delete(name);
    }
  }
  for (const name of state.history.keys()) {
    if (!names.has(name)) state.history.delete(name);
  }
  const main = $("routes");
  table.routes.forEach((route, index) => {
    let card = state.cards.get(route.name);
    if (!card) {
      card = makeCard(route.name);
      state.cards.set(route.name, card);
    }
    if (main.children[index] !== card.root) main.insertBefore(card.root, main.children[index] || null);
    fillCard(card, route);
  });
  const empty = $("no-routes");
  empty.hidden = table.routes.length > 0;
  empty.textContent = `No routes: every request goes to the default backend, ${table.default_backend}.`;

  $("backends").tBodies[0].replaceChildren(...table.backends.map((b) =>
    h("tr", {},
      h("td", {}, b.name),
      h("td", { class: "mono" }, b.address),
      h("td", {}, b.health_check ? (b.up ? h("span", { class: "state done" }, "UP") : h("span", { class: "state down" }, "DOWN")) : "not checked"),
      h("td", { class: "mono" }, b.health_check ? `${b.health_check.path} every ${b.health_check.interval}` : "–"))));
}

function storeText(store) {
  if (!store) return "–";
  if (store.kind === "file") return `file ${store.path}`;
  const where = store.reachable ? "reachable" : `UNREACHABLE: ${store.error}`;
  return `PostgreSQL, replica ${store.replica}, ${where}${store.deciding ? ", deciding" : ""}`;
}

/** A route's card: slots filled on every refresh, and buttons made once. */
function makeCard(name) {
  const slot = (cls) => h("div", { class: cls });
  const card = {
    root: h("article", { class: "route", "data-route": name }),
    head: slot("route-head"),
    match: h("p", { class: "match" }),
    move: slot("move"),
    bar: h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 }, h("div", { class: "fill" })),
    ramp: slot("ramp"),
    numbers: slot("numbers"),
    charts: slot("charts"),
    shadow: slot("shadow"),
    actions: slot("actions"),
    buttons: [],
  };
  const command = (verb, label, cls) => {
    const button = h("button", { type: "button", class: cls, "data-command": verb,
      onclick: () => write(`routes/${encodeURIComponent(name)}/${verb}`, `${name}: ${label}`) }, label);
    card.buttons.push(button);
    return button;
  };
  card.actions.append(
    command("pause", "Pause"),
    command("resume", "Resume"),
    command("rollback", "Roll back to 0%", "danger"),
    command("advance", "Advance a step"),
  );
  card.root.append(card.head, card.match, card.move, card.bar, card.ramp, card.numbers, card.charts, card.shadow, card.actions);
  return card;
}

function fillCard(card, route) {
  const ramp = route.ramp;
  const status = ramp ? ramp.status : "fixed";
  card.head.replaceChildren(
    h("h2", {}, route.name),
    h("span", { class: `state ${status}` }, ramp ? status.replace("_", " ").toUpperCase() : "FIXED SHARE"),
  );
  card.match.textContent = `${route.match || "every request"} · sticky by ${route.sticky}`;
  card.move.replaceChildren(
    h("span", { class: "backends-names" }, `${route.from} → ${route.to}`),
    h("span", {}, h("span", { class: "percent", "data-percent": route.percent }, percentText(route.percent)), ` of clients on ${route.to}`),
  );
  card.bar.setAttribute("aria-valuenow", route.percent);
  card.bar.setAttribute("aria-label", `${percentText(route.percent)} on ${route.to}`);
  card.bar.firstChild.style.width = `${Math.min(100, Math.max(0, route.percent))}%`;

  card.ramp.replaceChildren(...(ramp ? rampLines(route, ramp) : [h("p", { class: "why" }, "No ramp: the share is set in the route file.")]));
  card.actions.hidden = !ramp;

  const points = state.history.get(route.name) || [];
  card.numbers.replaceChildren(numbers(route, points[points.length - 1]));
  card.charts.replaceChildren(...charts(route, points));
  const report = state.shadow.get(route.name);
  replaceKeepingOpen(card.shadow, report ? shadowLines(report) : []);
}

function rampLines(route, ramp) {
  const current = ramp.steps.indexOf(ramp.percent);
  const steps = h("span", { class: "steps" }, ramp.steps.map((step, i) =>
    h("span", { class: i === current ? "now" : (current >= 0 && i < current ? "past" : null) }, percentText(step))));
  const where = current >= 0 ? `step ${current + 1} of ${ramp.steps.length}` : `before step 1 of ${ramp.steps.length}`;
  const lines = [h("p", { class: "ramp" }, h("b", {}, `Ramp ${where}: `), steps)];
  const recent = ramp.window;
  const limits = [];
  if (ramp.limits.max_error_rate != null) limits.push(`errors ≤ ${ramp.limits.max_error_rate}%`);
  if (ramp.limits.max_p99_ratio != null) limits.push(`p99 ≤ ${ramp.limits.max_p99_ratio}× ${route.from}'s`);
  if (ramp.limits.max_mismatch_rate != null) limits.push(`mismatches ≤ ${ramp.limits.max_mismatch_rate}%`);
  lines.push(h("p", { class: "why" }, `Each step holds ${duration(ramp.hold_seconds)} and ${ramp.min_requests} requests; limits: ${limits.join(", ") || "none"}. On this step for ${duration(ramp.on_step_seconds)}; last ${ramp.window_seconds} s: ${recent.to.answers} answers on ${route.to}, ${recent.to.failures} failed.`));
  const repeatsReason = ramp.reason && ramp.waiting.endsWith(ramp.reason);
  if (ramp.waiting && !repeatsReason) lines.push(h("p", { class: "why" }, h("b", {}, "Waiting: "), ramp.waiting));
  if (ramp.reason) lines.push(h("p", { class: "why" }, h("b", {}, `${ramp.status === "rolled_back" ? "Rolled back" : "Last change"}: `), ramp.reason));
  return lines;
}

function numbers(route, point) {
  const latency = (b) => (b.p50_ms == null ? "–" : `${fmt(b.p50_ms)} / ${fmt(b.p99_ms)} ms`);
  const row = (side, name, backend) => h("tr", {},
    h("td", { class: `side-${side}` }, `${name} (${side})`),
    h("td", { class: "num" }, point ? fmt(backend.requests_per_second, 1) : "–"),
    h("td", { class: `num${backend && backend.failed_percent > 0 ? " bad" : ""}` }, point ? fmt(backend.failed_percent, 1, "%") : "–"),
    h("td", { class: "num" }, point ? latency(backend) : "–"),
    h("td", {}, health(name)));
  const table = h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "Backend"), h("th", { class: "num" }, "req/s"), h("th", { class: "num" }, "errors"),
      h("th", { class: "num" }, "p50 / p99"), h("th", {}, "health"))),
    h("tbody", {}, row("to", route.to, point && point.to), row("from", route.from, point && point.from))));
  const fallbacks = point ? `${fmt(point.fallbacks_per_second, 1)}/s now, ` : "";
  const note = point
    ? `Over the last ${state.interval} s. `
    : `No traffic sampled yet (a sample every ${state.interval} s). `;
  return h("div", {}, table, h("p", { class: `note${route.fallbacks ? " bad" : ""}` },
    note, `Fallbacks to ${route.from}: ${fallbacks}${route.fallbacks} in total.`));
}

function health(name) {
  const backend = state.routes.backends.find((b) => b.name === name);
  if (!backend || !backend.health_check) return "no check";
  return backend.up ? h("span", { class: "state done" }, "UP") : h("span", { class: "state down" }, "DOWN");
}

// Three small charts: the share (and the mismatch rate), errors and p99 per backend.
function charts(route, points) {
  if (points.length < 2) return [h("p", { class: "note" }, "Charts appear after two samples (10 s).")];
  const pick = (f) => points.map((p) => [p.at_ms, f(p)]);
  return [
    chart("Share, mismatches %", [
      { cls: "to", label: `share on ${route.to}`, data: pick((p) => p.percent) },
      { cls: "mismatch", label: "mismatches", data: pick((p) => p.mismatch_percent) },
    ], 100),
    chart("Errors %", [
      { cls: "to", label: route.to, data: pick((p) => p.to.failed_percent) },
      { cls: "from", label: route.from, data: pick((p) => p.from.failed_percent) },
    ], 5),
    chart("p99 ms", [
      { cls: "to", label: route.to, data: pick((p) => p.to.p99_ms) },
      { cls: "from", label: route.from, data: pick((p) => p.from.p99_ms) },
    ], 1),
  ];
}

function chart(title, series, minTop) {
  const W = 300, H = 90, PAD = 4;
  // The time axis ends at the newest sample and spans the data held (at least a minute), up
  // to the 15 minutes kept.
  const now = state.lastPoint;
  const first = Math.min(...series.flatMap((s) => s.data.map(([t]) => t)));
  const start = Math.max(now - HISTORY_MS, Math.min(first, now - 60 * 1000));
  const span = now - start;
  const values = series.flatMap((s) => s.data.map(([, v]) => v)).filter((v) => v !== null && v !== undefined);
  const top = Math.max(minTop, ...values) * 1.05;
  const x = (t) => PAD + ((t - start) / span) * (W - 2 * PAD);
  const y = (v) => H - PAD - (v / top) * (H - 2 * PAD);
  const el = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": title });
  const styles = { to: ["#1f6feb", ""], from: ["#8a5a00", "5 3"], mismatch: ["#cf222e", "1 3"] };
  for (const s of series) {
    // A gap (no answers in an interval) breaks the line instead of drawing it as zero.
    let d = "", pen = "M";
    for (const [t, v] of s.data) {
      if (v === null || v === undefined) { pen = "M"; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    }
    if (!d) continue;
    const [stroke, dash] = styles[s.cls];
    el.append(svg("path", { d, fill: "none", stroke, "stroke-width": 1.6, "stroke-dasharray": dash || "none", "vector-effect": "non-scaling-stroke" }));
  }
  const max = top / 1.05;
  return h("figure", { class: "chart" },
    h("figcaption", {}, `${title} · top ${fmt(max, max < 10 ? 1 : 0)} · last ${duration(Math.round(span / 1000))}`),
    el,
    h("div", { class: "legend" }, series.map((s) => h("span", {}, h("i", { class: s.cls }), s.label))));
}

function shadowLines(report) {
  const c = report.counts;
  const rate = report.mismatch_rate_percent;
  const lines = [
    h("h3", {}, `Shadow comparison (${report.percent}% of requests)`),
    h("p", { class: "counts" },
      h("span", {}, `match ${c.match}`),
      h("span", { class: c.mismatch ? "bad" : null }, `mismatch ${c.mismatch}`),
      h("span", { class: c.error ? "bad" : null }, `error ${c.error}`),
      h("span", {}, `skipped ${c.skipped}`),
      h("span", {}, `dropped ${c.dropped}`),
      h("span", { class: rate ? "bad" : null, "data-mismatch-rate": rate === null ? "" : rate }, `mismatch rate ${fmt(rate, 1, "%")}`)),
  ];
  if (report.top_fields.length) {
    lines.push(h("details", { "data-key": "fields" }, h("summary", {}, `Fields that differ most (${report.top_fields.length})`),
      h("ul", {}, report.top_fields.map((f) => h("li", { class: "diff" }, `${f.field} ×${f.count}: `,
        h("span", { class: "from" }, f.from), " → ", h("span", { class: "to" }, f.to))))));
  }
  if (report.last_mismatches.length) {
    const shown = report.last_mismatches.slice(0, 5);
    lines.push(h("details", { "data-key": "mismatches", class: "mismatches" },
      h("summary", {}, `Last mismatches (${shown.length} of ${report.last_mismatches.length} kept)`),
      shown.map((m) => {
        const diffs = [...m.differences, ...m.header_differences];
        return h("div", { class: "mismatch" },
          h("div", {}, h("b", {}, `${m.method} ${m.path}`), ` · ${m.at} · status ${m.from_status} → ${m.to_status}`),
          h("ul", {}, diffs.map((d) => h("li", { class: "diff" }, `${d.field}: `,
            h("span", { class: "from" }, String(d.from)), " → ", h("span", { class: "to" }, String(d.to))))));
      })));
  }
  return lines;
}

// --- writing ------------------------------------------------------------------------------

/** Asks for the admin token; resolves to the token ("" for none) or null if cancelled. */
function askToken() {
  const dialog = $("token-dialog"), input = $("token-input");
  input.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      $("token-send").onclick = $("token-cancel").onclick = input.onkeydown = dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    $("token-send").onclick = () => done(input.value.trim());
    $("token-cancel").onclick = () => done(null);
    // However the dialog closes (Esc included), the write goes on or is cancelled.
    dialog.onclose = () => done(null);
    input.onkeydown = (event) => { if (event.key === "Enter") done(input.value.trim()); };
    dialog.showModal();
    input.focus();
  });
}

function showAnswer(kind, text) {
  const answer = $("answer");
  answer.hidden = false;
  answer.className = `answer ${kind}`;
  answer.textContent = text;
}

let writing = false;

async function write(path, label) {
  // One write at a time: a second click while the token is asked or an answer awaited is
  // ignored rather than sent twice.
  if (writing) return;
  writing = true;
  try {
    await send(path, label);
  } finally {
    writing = false;
  }
}

async function send(path, label) {
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (token === null) {
    token = await askToken();
    if (token === null) return showAnswer("refused", `${label}: cancelled, nothing was sent.`);
    sessionStorage.setItem(TOKEN_KEY, token);
  }
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let response, body;
  try {
    const signal = AbortSignal.timeout(WRITE_TIMEOUT_MS);
    response = await fetch(path, { method: "POST", headers, body: "{}", cache: "no-store", signal });
    body = (await response.text()).trim();
  } catch (error) {
    // Also what a token no header can carry gives: ask for it again next time.
    sessionStorage.removeItem(TOKEN_KEY);
    return showAnswer("refused", `${label}: not sent or not answered (${error.message}).`);
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showAnswer("refused", `${label}: REFUSED (401): ${body}. The token will be asked again.`);
  } else if (!response.ok) {
    showAnswer("refused", `${label}: REFUSED (${response.status}): ${describe(body)}`);
  } else {
    showAnswer("ok", `${label}: DONE. ${describe(body)}`);
  }
  refresh();
}

/** The API's answer in words: a ramp's new state, a reload's outcome, or the text as is. */
function describe(body) {
  let answer;
  try { answer = JSON.parse(body); } catch { return body; }
  if (!answer || typeof answer !== "object") return body;
  if (answer.error) return answer.error;
  if (answer.status) return `${answer.route} is ${answer.status.replace("_", " ")} at ${percentText(answer.percent)}${answer.reason ? `: ${answer.reason}` : ""}`;
  if (answer.result === "error") return `the file was rejected: ${answer.errors.join("; ")}`;
  if (answer.result) return `${answer.result}, version ${answer.version}`;
  return body;
}

// The next refresh is scheduled when one ends, so a slow proxy is never asked twice at once.
async function loop() {
  try {
    await refresh();
  } finally {
    setTimeout(loop, REFRESH_MS);
  }
}

function start() {
  $("reload").addEventListener("click", () => write("reload", "Reload"));
  loop();
}

start();
