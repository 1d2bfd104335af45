// The SynapseDB console: a page over the admin API (the same routes as /v1/openapi.json).
// No framework and no build step; every value from the API goes in as text, never as HTML.
"use strict";

const TOKEN_KEY = "synapse-console-token";
const $ = (id) => document.getElementById(id);
const pages = ["overview", "conflicts", "repair", "endpoints", "tail"];
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = null;

// One element with text and an optional class.
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, cls) {
  const tr = document.createElement("tr");
  if (cls) tr.className = cls;
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

function json(value) {
  const td = document.createElement("td");
  td.appendChild(el("pre", JSON.stringify(value, null, 1)));
  return td;
}

function stateCell(component) {
  const state = (component && component.state) || "unknown";
  return el("td", state, "state state-" + state);
}

// A component's error, code and fix as a full-width row (nothing when it runs).
function problemRow(component, span) {
  if (!component || !component.error) return null;
  const td = el("td", "", "problem");
  td.colSpan = span;
  td.appendChild(el("span", (component.code || "") + " " + component.error, "error"));
  if (component.hint) td.appendChild(el("div", "fix: " + component.hint, "hint"));
  return row([td]);
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, options.headers || {});
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    signOut("The token is not accepted (401): sign in again.");
    throw new Error("unauthorized");
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = body.error || {};
    throw new Error(`${response.status} ${e.code || ""}: ${e.message || "request failed"}${e.hint ? " — fix: " + e.hint : ""}`);
  }
  return body;
}

function signOut(message) {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(timer);
  for (const p of pages) $(p).hidden = true;
  $("login").hidden = false;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const candidate = $("token").value.trim();
  const response = await fetch("/v1/topology", { headers: { Authorization: "Bearer " + candidate } });
  if (response.status === 200) {
    token = candidate;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start();
  } else if (response.status === 403) {
    $("login-error").textContent = "This token lacks the admin scope: use a token with `admin: true`.";
  } else {
    $("login-error").textContent = `Not a valid token (${response.status}).`;
  }
});

$("sign-out").addEventListener("click", () => signOut("Signed out."));

function start() {
  $("login").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  if (!location.hash) location.hash = "#overview";
  show();
}

function show() {
  const page = pages.includes(location.hash.slice(1)) ? location.hash.slice(1) : "overview";
  for (const p of pages) $(p).hidden = p !== page;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === "#" + page);
  clearInterval(timer);
  if (page === "overview") {
    overview();
    timer = setInterval(overview, 2000);
  } else if (page === "conflicts") {
    conflicts();
    timer = setInterval(conflicts, 5000);
  } else if (page === "endpoints") {
    endpoints();
  } else if (page === "tail") {
    streams();
  }
}

window.addEventListener("hashchange", () => token && show());

// ---- Overview: topology and lag, refreshed every 2 s ----
async function overview() {
  let t;
  try {
    t = await apiJson("/v1/topology");
  } catch (e) {
    $("status").textContent = e.message;
    return;
  }
  $("status").textContent = "";
  $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  $("ready").replaceChildren(el("span", t.ready ? "ready: every part runs" : "not ready: see the parts below", t.ready ? "ok" : "bad"));
  const parked = (t.components || []).filter((c) => c.state === "parked");
  const box = $("parked");
  box.replaceChildren();
  if (parked.length) {
    box.appendChild(el("p", `${parked.length} part(s) parked: fix the cause, then resume.`, "error"));
    for (const c of parked) box.appendChild(el("div", `${c.component}: ${c.code} ${c.error} — fix: ${c.hint}`, "hint"));
    const resume = el("button", "Resume parked parts");
    resume.id = "resume";
    resume.addEventListener("click", async () => {
      const r = await apiJson("/v1/components/resume", { method: "POST", body: "{}" }).catch((e) => ({ error: e.message }));
      box.appendChild(el("p", r.error || "resumed: " + JSON.stringify(r)));
    });
    box.appendChild(resume);
  }
  fill("nodes", (t.nodes || []).map((n) =>
    row([n.name, n.region || "", el("td", n.phase, n.phase === "member" ? "ok" : "state-copying"), n.records_behind, n.caught_up ? "yes" : "no"])));
  const sourceRows = [];
  for (const s of t.sources || []) {
    sourceRows.push(row([s.source, stateCell(s.component), s.lag_seconds.toFixed(2), bytes(s.slot_lag_bytes), s.captured_lsn, s.confirmed_lsn], "source"));
    const p = problemRow(s.component, 6);
    if (p) sourceRows.push(p);
  }
  fill("sources", sourceRows);
  const applierRows = [];
  for (const a of t.targets || []) {
    const lag = a.lag_seconds === undefined ? "—" : a.lag_seconds.toFixed(2);
    const behind = a.behind_records === undefined ? "—" : a.behind_records;
    const state = stateCell(a.component);
    if (a.copy && a.component && a.component.state === "copying") {
      const bar = el("progress");
      bar.max = a.copy.chunks;
      bar.value = a.copy.chunks_done;
      state.append(" ", bar, el("small", ` ${a.copy.chunks_done}/${a.copy.chunks} chunks, ${a.rows_copied} rows`));
    }
    applierRows.push(row([`${a.source} → ${a.target}${a.shard ? " (" + a.shard + ")" : ""}`, state, lag, behind, a.applied_lsn], "applier"));
    const p = problemRow(a.component, 5);
    if (p) applierRows.push(p);
  }
  fill("appliers", applierRows);
  fill("indexes", (t.indexes || []).map((i) => row([i.name, i.table, i.items, i.lsn || "loading", i.dead_letters])));
  $("indexes-box").hidden = !(t.indexes || []).length;
}

function bytes(n) {
  if (n === undefined || n === null) return "—";
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  return (n / (1 << 20)).toFixed(1) + " MiB";
}

// ---- Conflicts: both versions and the result side by side ----
$("conflict-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  conflicts();
});

async function conflicts() {
  const q = new URLSearchParams({ limit: "100" });
  if ($("conflict-table").value.trim()) q.set("table", $("conflict-table").value.trim());
  if ($("conflict-node").value.trim()) q.set("node", $("conflict-node").value.trim());
  try {
    const r = await apiJson("/v1/conflicts?" + q);
    const unreachable = (r.unreachable || []).map((u) => `${u.node}: ${u.error}`).join("; ");
    $("conflict-note").textContent = `${r.conflicts.length} conflict(s)` + (unreachable ? ` — not answering: ${unreachable}` : "");
    fill("conflict-list", r.conflicts.map((c) => {
      const local = json(c.local && c.local.values);
      const remote = json(c.remote && c.remote.values);
      (c.resolution === "local_wins" ? local : remote).classList.add("winner");
      return row([c.detected_at, c.node, c.table, JSON.stringify(c.pk), c.kind + " (" + c.resolution + ")", local, remote, json(c.result && c.result.values)], "conflict");
    }));
  } catch (e) {
    $("conflict-note").textContent = e.message;
  }
}

// ---- Repair: run a check, see the differing keys, fix after a confirmation ----
function repairBody() {
  const tables = $("repair-tables").value.split(",").map((s) => s.trim()).filter(Boolean);
  return JSON.stringify(tables.length ? { tables } : {});
}

$("repair-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("repair-result");
  out.replaceChildren(el("p", "checking… (a consistent cut of every node, then the digests)"));
  $("fix-box").hidden = true;
  $("fix-result").replaceChildren();
  try {
    const reports = await apiJson("/v1/repair/check", { method: "POST", body: repairBody() });
    out.replaceChildren();
    let differing = 0;
    for (const r of reports) {
      differing += r.differing.length;
      const h = el("h3", `${r.table}: ${r.differing.length} differing row(s), ${r.differing_buckets} of ${r.buckets} buckets differ`, r.differing.length ? "bad" : "ok");
      h.classList.add("repair-table");
      out.appendChild(h);
      out.appendChild(el("p", `rows per node: ${r.nodes.map((n, i) => n + " " + r.rows[i]).join(", ")}; digests ${r.digests}; ${r.changing.length} key(s) changing (in flight, not drift)`));
      if (r.differing.length) {
        const t = document.createElement("table");
        t.className = "differing";
        t.appendChild(row([el("th", "key"), el("th", "missing on"), el("th", "holders (equal rows grouped)")]));
        for (const d of r.differing) {
          t.appendChild(row([JSON.stringify(d.key), d.missing_on.join(", ") || "—", d.holders.map((g) => g.join(" = ")).join(" ≠ ")], "differing-key"));
        }
        out.appendChild(t);
      }
    }
    $("fix-box").hidden = differing === 0;
    $("fix-confirm").hidden = true;
  } catch (e) {
    out.replaceChildren(el("p", e.message, "error"));
  }
});

$("fix").addEventListener("click", () => {
  $("fix-confirm").hidden = false;
});
$("fix-no").addEventListener("click", () => {
  $("fix-confirm").hidden = true;
});
$("fix-yes").addEventListener("click", async () => {
  $("fix-confirm").hidden = true;
  const out = $("fix-result");
  out.replaceChildren(el("p", "fixing…"));
  try {
    const results = await apiJson("/v1/repair/fix", { method: "POST", body: repairBody() });
    out.replaceChildren();
    for (const r of results) {
      const fixed = r.fix ? r.fix.written || r.fix.rows || r.fix : null;
      out.appendChild(el("p", `${r.check.table}: ${r.check.differing.length} differing, fixed: ${JSON.stringify(fixed)}`, "fixed"));
    }
  } catch (e) {
    out.replaceChildren(el("p", e.message, "error"));
  }
});

// ---- Webhook endpoints: state, attempts, replay ----
let selected = null;

async function endpoints() {
  try {
    const r = await apiJson("/v1/endpoints");
    fill("endpoint-list", r.endpoints.map((e) => {
      const name = el("td");
      const link = el("a", e.name);
      link.href = "#endpoints";
      link.addEventListener("click", (event) => {
        event.preventDefault();
        attempts(e.name);
      });
      name.appendChild(link);
      const st = e.status || {};
      const state = e.disabled ? "disabled: " + e.disabled : st.breaker && st.breaker !== "closed" ? "breaker " + st.breaker : "delivering";
      const positions = Object.entries(st.positions || {}).map(([s, c]) => `${s} ${c || "—"}`).join(", ");
      const counts = `${st.delivered || 0} delivered, ${st.pending || 0} pending, ${st.dead_lettered || 0} dead-lettered`;
      return row([name, (e.spec && e.spec.url) || "", state, positions, counts], "endpoint");
    }));
  } catch (e) {
    $("status").textContent = e.message;
  }
}

async function attempts(name) {
  selected = name;
  $("endpoint-detail").hidden = false;
  $("endpoint-name").textContent = name;
  const r = await apiJson(`/v1/endpoints/${encodeURIComponent(name)}/attempts`).catch((e) => ({ attempts: [], error: e.message }));
  fill("attempts", r.attempts.map((a) => row([a.at, a.status === null ? "—" : a.status, a.outcome + (a.error ? ": " + a.error : ""), a.events, a.latency_ms.toFixed(1) + " ms"], "attempt")));
}

$("replay-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const from = $("replay-since").value.trim();
  const body = /^\d{4}-\d\d-\d\dT/.test(from) ? { since: from } : { cursor: from };
  try {
    const r = await apiJson(`/v1/endpoints/${encodeURIComponent(selected)}/replay`, { method: "POST", body: JSON.stringify(body) });
    $("replay-result").textContent = "replaying from " + JSON.stringify(r.replay_from || body);
    attempts(selected);
  } catch (e) {
    $("replay-result").textContent = e.message;
  }
});

// ---- Live tail of a stream (JSON lines, followed with the last cursor) ----
let tailing = null;

async function streams() {
  const r = await apiJson("/v1/streams").catch(() => ({ streams: [] }));
  const select = $("tail-stream");
  const current = select.value;
  select.replaceChildren(...r.streams.map((s) => {
    const o = el("option", s.name);
    o.value = s.name;
    return o;
  }));
  if (current) select.value = current;
}

$("tail-start").addEventListener("click", async () => {
  const name = $("tail-stream").value;
  if (!name) return;
  tailing = new AbortController();
  $("tail-start").disabled = true;
  $("tail-stop").disabled = false;
  const out = $("tail-out");
  let cursor = (await apiJson(`/v1/streams/${encodeURIComponent(name)}`)).cursor || "";
  out.textContent = `following ${name} after ${cursor || "the start"}\n`;
  while (tailing && !tailing.signal.aborted) {
    try {
      const q = new URLSearchParams({ live: "true", timeout_ms: "20000" });
      if (cursor) q.set("cursor", cursor);
      const response = await api(`/v1/streams/${encodeURIComponent(name)}/changes?${q}`, { signal: tailing.signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        const lines = buffered.split("\n");
        buffered = lines.pop();
        for (const line of lines.filter(Boolean)) {
          const event = JSON.parse(line);
          if (event.control) {
            if (event.cursor) cursor = event.cursor;
            continue;
          }
          if (event.synapsecursor) cursor = event.synapsecursor;
          const d = event.data || {};
          const summary = `${event.time || ""} ${d.op || event.type || ""} ${(d.source && d.source.table) || event.subject || ""} ${JSON.stringify(d.after || d.before || {})}`;
          out.textContent = summary + "\n" + out.textContent.slice(0, 40000);
        }
      }
    } catch (e) {
      if (tailing && !tailing.signal.aborted) {
        out.textContent = "stream ended: " + e.message + "\n" + out.textContent;
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }
});

$("tail-stop").addEventListener("click", () => {
  if (tailing) tailing.abort();
  tailing = null;
  $("tail-start").disabled = false;
  $("tail-stop").disabled = true;
});

if (token) start();
