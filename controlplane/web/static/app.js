// gpumesh web view: reads /api/stream (server-sent events, one whole frame per event) with the bearer
// token in the Authorization header, and draws the frame with DOM calls (textContent only: nothing
// received is parsed as HTML). No libraries, no build step, no requests to other origins.
"use strict";

const state = { token: "", frame: null, retry: 1000, controller: null };

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "title") e.title = v;
    else if (k === "style") e.style.cssText = v;   // CSSOM: allowed by the page's CSP (style-src 'self')
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// A stable hue per tenant, so one tenant's slots have one colour everywhere.
// (Golden-angle steps: names that differ in one letter, team-a and team-b, get far-apart hues.)
function hue(tenant) {
  let h = 0;
  for (const ch of tenant) h = (h * 31 + ch.charCodeAt(0)) % 100003;
  return Math.round((h * 137.508) % 360);
}

function slotCell(cell, i) {
  if (!cell) return el("span", { class: "slot free", title: "free" });
  const first = cell.start === i ? " first" : "";   // where an instance begins: a divider
  if (!cell.tenant) {
    return el("span", { class: "slot carved" + first, "data-profile": cell.profile,
                        title: `${cell.profile}@${cell.start} (carved; no slice of yours)` });
  }
  return el("span", { class: "slot held" + first, "data-slice": cell.slice, "data-tenant": cell.tenant,
                      style: `background: hsl(${hue(cell.tenant)} 65% 55%)`,
                      title: `${cell.slice} · ${cell.tenant} · ${cell.profile}@${cell.start} ${cell.state}` });
}

function gpuCard(g) {
  const util = g.utilization === null ? "-" : `${Math.round(g.utilization)}%`;
  const temp = g.temperature_c === null ? "-" : `${Math.round(g.temperature_c)}°C`;
  const used = g.memory_used_bytes === null ? "-" : bytes(g.memory_used_bytes);
  const card = el("div", { class: `gpu lvl-${g.level}`, "data-node": g.node, "data-index": String(g.index),
                           title: `${g.uuid}\nmemory pressure: ${g.memory_pressure || "-"}\n` +
                                  `thermal: ${g.thermal_state || "-"}\nhealth: ${g.health || "-"}` +
                                  (g.health_reason ? ` (${g.health_reason})` : "") });
  card.append(el("div", { class: "gpu-head" }, el("b", {}, `gpu${g.index}`), " ", g.model,
                 el("span", { class: `lvl ${g.level}` }, g.level)));
  const mem = el("div", { class: "slots memory" });
  g.slots.memory.forEach((c, i) => mem.append(slotCell(c, i)));
  const cmp = el("div", { class: "slots compute" });
  g.slots.compute.forEach((c, i) => cmp.append(slotCell(c, i)));
  card.append(mem, cmp);
  const pct = g.utilization === null ? 0 : Math.max(0, Math.min(100, g.utilization));
  card.append(el("div", { class: "bar" }, el("span", { style: `width: ${pct}%` })));
  card.append(el("div", { class: "gpu-foot" }, `util ${util} · mem ${used} / ${bytes(g.memory_total_bytes)} · ${temp}`,
                 g.mig_mode.startsWith("enabled") ? " · MIG" : (g.sharing ? ` · ${g.sharing}` : "")));
  return card;
}

function drawFleet(frame) {
  const fleet = $("fleet");
  fleet.replaceChildren();
  for (const n of frame.nodes) {
    const node = el("div", { class: "node" + (n.ready ? "" : " notready") + (n.cordoned ? " cordoned" : ""),
                             "data-node": n.name });
    node.append(el("h3", {}, n.name, n.ready ? "" : " (NotReady)", n.cordoned ? " (cordoned)" : ""));
    const gpus = el("div", { class: "gpus" });
    for (const g of n.gpus) gpus.append(gpuCard(g));
    node.append(gpus);
    fleet.append(node);
  }
  if (!frame.nodes.length) fleet.append(el("p", { class: "empty" }, "no nodes yet"));
}

function fill(id, rows, make) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map(make));
  $(`${id}-count`).textContent = `(${rows.length})`;
}

function age(iso) {
  if (!iso) return "-";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 90 ? `${Math.round(s)}s` : s < 5400 ? `${Math.round(s / 60)}m` : `${Math.round(s / 3600)}h`;
}

function draw(frame) {
  state.frame = frame;
  const gpus = frame.nodes.reduce((a, n) => a + n.gpus.length, 0);
  $("summary").textContent = `${frame.nodes.length} nodes · ${gpus} GPUs · ${frame.slices.length} slices`;
  const p = frame.principal;
  $("who").textContent = p.admin ? `${p.name} (admin)` : `${p.name} (${p.role}, tenant ${p.tenant})`;
  drawFleet(frame);
  const tenants = [...new Set(frame.slices.map(s => s.tenant))].sort();
  $("tenants").replaceChildren(...tenants.map(t => el("span", { class: "tenant", "data-tenant": t },
    el("span", { class: "slot", style: `background: hsl(${hue(t)} 65% 55%)` }), ` ${t}`)));
  fill("slices", frame.slices, s => el("tr", { class: "slice", "data-id": s.id, "data-tenant": s.tenant },
    el("td", {}, s.id), el("td", {}, s.tenant), el("td", {}, `${s.node}/gpu${s.gpu_index}`),
    el("td", {}, s.isolation), el("td", {}, s.profile ? `${s.profile}@${s.placement ? s.placement.start : "?"}` : "-"),
    el("td", {}, bytes(s.memory_bytes)), el("td", {}, `${Math.round(s.compute_share * 100)}%`),
    el("td", { class: `state ${s.state}` }, s.state)));
  fill("workloads", frame.workloads, w => el("tr", { class: "workload", "data-id": w.id },
    el("td", {}, w.id), el("td", {}, w.tenant), el("td", {}, w.slice_id), el("td", {}, w.node),
    el("td", { class: `state ${w.state}` }, w.state), el("td", { class: "cmd" }, w.command.join(" "))));
  fill("migrations", frame.migrations, m => el("tr", { class: "migration", "data-id": m.id },
    el("td", {}, m.id), el("td", {}, m.workload_id), el("td", {}, m.tenant),
    el("td", {}, m.source_node), el("td", {}, m.target_node), el("td", {}, m.phase),
    el("td", {}, Number(m.state_bytes) ? `${Math.round(100 * Number(m.bytes_sent) / Number(m.state_bytes))}%`
                                       : bytes(Number(m.bytes_sent)))));   // int64s arrive as strings
  fill("deployments", frame.deployments, d => el("tr", { class: "deployment", "data-name": d.name },
    el("td", {}, d.name), el("td", {}, d.tenant), el("td", {}, d.variant ? `${d.model}/${d.variant}` : d.model),
    el("td", {}, `${d.status.ready_replicas}/${d.replicas}`),
    el("td", {}, d.replica_list.map(r => `${r.id} ${r.state}`).join(", ")), el("td", {}, d.backend.kind)));
  fill("events", frame.events || [], e => el("tr", { class: `event ${e.type || ""}`, "data-kind": e.kind,
                                                    "data-name": e.name },
    el("td", {}, age(e.last_timestamp)), el("td", {}, e.type), el("td", {}, e.reason),
    el("td", {}, `${e.kind}/${e.name}`), el("td", { class: "msg" }, e.message + (e.count > 1 ? ` (×${e.count})` : ""))));
  document.body.dataset.at = frame.at;
}

function setStatus(text, cls) {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${cls || ""}`;
}

function askToken(message) {
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("not signed in", "bad");
}

async function stream() {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  state.controller = new AbortController();
  let resp;
  try {
    resp = await fetch("/api/stream", { headers, signal: state.controller.signal, cache: "no-store" });
  } catch (e) {
    return retry(`disconnected (${e.message})`);
  }
  if (resp.status === 401 || resp.status === 403) {
    const body = await resp.json().catch(() => ({}));
    return askToken((body.error && body.error.message) || resp.statusText);
  }
  if (!resp.ok) return retry(`HTTP ${resp.status}`);
  $("login").hidden = true;
  setStatus("live", "good");
  state.retry = 1000;
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, at);
        buf = buf.slice(at + 2);
        const data = chunk.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
        if (data) draw(JSON.parse(data));
      }
    }
  } catch (e) {
    return retry(`disconnected (${e.message})`);
  }
  retry("stream ended");
}

function retry(why) {
  setStatus(`${why}; retrying…`, "bad");
  setTimeout(stream, state.retry);
  state.retry = Math.min(state.retry * 2, 15000);
}

function start() {
  // A token may come in the URL's fragment (never sent to the server): #token=...
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("gpumesh-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  state.token = sessionStorage.getItem("gpumesh-token") || "";
  $("login").addEventListener("submit", ev => {
    ev.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("gpumesh-token", state.token);
    if (state.controller) state.controller.abort();
    stream();
  });
  stream();
}

document.addEventListener("DOMContentLoaded", start);
