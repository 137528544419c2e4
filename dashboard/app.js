// pgrelay's dashboard: the exposed tables, their live events, and the relay's vital signs.
// Served at / with the relay's JS client (/client.js); no build step. Every value from the
// database is put on the page as text (textContent), never as HTML.
import { Relay } from "/client.js";

const KEEP_EVENTS = 200;
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem("pgrelay-token") ?? undefined;
const tables = new Map(); // resource -> { row cells, count, recent event times }
const delays = [];
let relay = null;

/** GET a relay route with the token, if any. */
function get(path, init = {}) {
  const headers = { ...(init.headers ?? {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  return fetch(path, { ...init, headers });
}

function problem(text) {
  $("problem").hidden = !text;
  $("problem").textContent = text ?? "";
}

/** The relay's Prometheus text, as name{labels} -> value. */
function parseMetrics(text) {
  const values = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    values.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return values;
}

function label(table) {
  return table.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

let previous = null;
async function refreshMetrics() {
  try {
    const response = await fetch("/metrics");
    if (!response.ok) return;
    const metrics = parseMetrics(await response.text());
    const listening = metrics.get("pgrelay_capture_listening") === 1;
    const stuck = metrics.get("pgrelay_horizon_stuck_seconds") ?? 0;
    $("capture").dataset.state = listening ? "ok" : "down";
    $("capture").textContent = listening
      ? stuck > 60 ? `listening; horizon held ${stuck} s` : "listening"
      : "reconnecting";
    $("connections").textContent = metrics.get("pgrelay_ws_connections") ?? "–";
    let subscriptions = 0;
    const now = performance.now();
    for (const [resource, table] of tables) {
      const subs = metrics.get(`pgrelay_subscriptions{table="${label(resource)}"}`) ?? 0;
      const events = metrics.get(`pgrelay_table_events_total{table="${label(resource)}"}`) ?? 0;
      subscriptions += subs;
      table.cells.subs.textContent = subs;
      table.cells.events.textContent = events;
    }
    $("subscriptions").textContent = subscriptions;
    const captured = metrics.get("pgrelay_events_captured_total") ?? 0;
    if (previous) {
      const rate = (captured - previous.captured) / ((now - previous.at) / 1000);
      $("rate").textContent = rate.toFixed(rate < 10 ? 1 : 0);
    }
    previous = { captured, at: now };
  } catch {
    $("capture").dataset.state = "down";
    $("capture").textContent = "relay unreachable";
  }
}

/** Row counts: the planner's estimate for large tables (exact below it), then kept by events. */
async function refreshCount(resource) {
  const response = await get(`/api/${encodeURIComponent(resource)}?limit=0`, {
    method: "HEAD",
    headers: { Prefer: "count=estimated" },
  });
  const range = response.headers.get("Content-Range") ?? "";
  const total = Number(range.split("/")[1]);
  const table = tables.get(resource);
  if (table && Number.isFinite(total)) {
    table.count = total;
    table.cells.rows.textContent = total;
  }
}

function addTableRow(resource) {
  const tr = document.createElement("tr");
  tr.dataset.table = resource;
  const cells = {};
  for (const name of ["name", "rows", "subs", "events", "rate"]) {
    cells[name] = tr.appendChild(document.createElement("td"));
  }
  cells.name.textContent = resource;
  cells.rows.textContent = "…";
  $("tables").tBodies[0].appendChild(tr);
  tables.set(resource, { cells, count: null, times: [] });
}

// Live events, newest first; held back while the pointer is over the list.
let hovering = false;
let held = [];
$("events").addEventListener("mouseenter", () => {
  hovering = true;
});
$("events").addEventListener("mouseleave", () => {
  hovering = false;
  const batch = held;
  held = [];
  $("paused").hidden = true;
  for (const item of batch) show(item);
});

function show(item) {
  if (hovering) {
    held.push(item);
    if (held.length > KEEP_EVENTS) held.shift();
    $("paused").hidden = false;
    $("held").textContent = held.length;
    return;
  }
  const list = $("events");
  list.insertBefore(item, list.firstChild);
  while (list.children.length > KEEP_EVENTS) list.lastChild.remove();
}

function onChange(resource, change) {
  const table = tables.get(resource);
  const m = change.event;
  if (!m) return;
  if (table) {
    if (table.count !== null) {
      if (m.type === "create") table.count += 1;
      if (m.type === "delete") table.count = Math.max(0, table.count - 1);
      if (m.type === "truncate") table.count = 0;
      table.cells.rows.textContent = table.count;
    }
    const now = performance.now();
    table.times.push(now);
    while (table.times.length && now - table.times[0] > 5000) table.times.shift();
  }
  if (m.ts) {
    delays.push(Date.now() - Date.parse(m.ts));
    if (delays.length > 100) delays.shift();
    const sorted = [...delays].sort((a, b) => a - b);
    const p50 = sorted[Math.floor(sorted.length / 2)];
    $("lag").textContent = `${Math.max(0, p50)} / ${Math.max(0, sorted.at(-1))} ms`;
  }
  const item = document.createElement("li");
  item.dataset.table = resource;
  item.dataset.type = m.type;
  const type = item.appendChild(document.createElement("span"));
  type.className = `type type-${m.type}`;
  type.textContent = m.type;
  item.appendChild(document.createElement("span")).textContent = resource;
  const body = item.appendChild(document.createElement("code"));
  body.textContent = JSON.stringify(m.type === "delete" ? m.old ?? m.id : m.data ?? {});
  item.title = `seq ${m.seq} at ${m.ts}`;
  show(item);
}

function updateRates() {
  const now = performance.now();
  for (const table of tables.values()) {
    while (table.times.length && now - table.times[0] > 5000) table.times.shift();
    table.cells.rate.textContent = (table.times.length / 5).toFixed(1);
  }
}

async function start() {
  const index = await fetch("/", { headers: { Accept: "application/json" } }).then((r) => r.json());
  $("version").textContent = `v${index.version}`;
  const response = await get("/api");
  if (response.status === 401) {
    $("login").hidden = false;
    sessionStorage.removeItem("pgrelay-token");
    if (token) $("login-error").textContent = "that token was refused";
    return;
  }
  if (!response.ok) {
    problem(`The relay answered ${response.status} for /api`);
    return;
  }
  $("login").hidden = true;
  const { tables: list } = await response.json();
  $("tables").tBodies[0].replaceChildren();
  tables.clear();
  relay?.close();
  relay = new Relay({ token });
  relay.on("status", (status) => {
    $("socket").textContent = status;
  });
  relay.on("error", (error) => {
    problem(error.closeCode === 4001 ? `Token refused: ${error.message}` : error.message);
    if (relay.status === "open") setTimeout(() => problem(null), 5000);
  });
  for (const t of list.filter((t) => t.rights.read)) {
    addTableRow(t.name);
    refreshCount(t.name).catch(() => {});
    const subscription = relay.subscribe(t.name, { snapshot: false });
    subscription.on("change", (change) => onChange(t.name, change));
    subscription.on("reset", (reason) => {
      onChange(t.name, { event: { type: "reset", reason, data: { reason } } });
      refreshCount(t.name).catch(() => {});
    });
  }
  if (tables.size === 0) problem("No table this caller may read is exposed.");
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim() || undefined;
  if (token) sessionStorage.setItem("pgrelay-token", token);
  start();
});

setInterval(refreshMetrics, 1000);
setInterval(updateRates, 1000);
// Estimates drift from events the page did not see (reconnects, other filters): refresh them.
setInterval(() => {
  for (const resource of tables.keys()) refreshCount(resource).catch(() => {});
}, 30_000);
refreshMetrics();
start().catch((err) => problem(`Cannot load the dashboard: ${err.message}`));
