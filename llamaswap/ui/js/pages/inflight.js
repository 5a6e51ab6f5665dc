// In flight: requests being served now, with cancel.

import { getJSON, NotAvailable, request } from "../api.js";
import { fmtBytes, fmtDuration, h, replace, unavailable } from "../dom.js";
import { store } from "../store.js";

const POLL_MS = 2000;

function entriesOf(body) {
  if (Array.isArray(body)) return body;
  return body?.requests || body?.data || body?.inflight || [];
}

export function mount(main) {
  let polled = null;        // Map from /api/inflight when events do not carry inflight
  let pollTimer = null;
  let tickTimer = null;
  let notAvailable = false;
  const open = new Set();   // ids whose headers are expanded
  const cancelling = new Map(); // id -> "…" | error text

  const tableBox = h("div.panel.flush");
  const message = h("div");
  const source = h("span.muted.small");
  replace(main, h("div.page-head", h("h1", "In flight"), source), message, tableBox);

  function current() {
    if (store.inflightLive) return store.inflight;
    return polled || new Map();
  }

  async function poll() {
    clearTimeout(pollTimer);
    if (store.inflightLive) { draw(); return; }
    if (!document.hidden) {
      try {
        const body = await getJSON("/api/inflight");
        polled = new Map(entriesOf(body).map((r) => [String(r.id), r]));
        notAvailable = false;
      } catch (err) {
        if (err instanceof NotAvailable) notAvailable = true;
        else replace(message, h("p.note.bad", `Could not list requests: ${err.message}`));
      }
      draw();
    }
    pollTimer = setTimeout(poll, notAvailable ? POLL_MS * 5 : POLL_MS);
  }

  async function cancel(id) {
    cancelling.set(id, "…");
    draw();
    try {
      await request(`/api/inflight/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      cancelling.delete(id);
      if (polled) polled.delete(id);
    } catch (err) {
      cancelling.set(id, err instanceof NotAvailable ? "cancel is not available on this server" : err.message);
    }
    draw();
    if (!store.inflightLive) poll();
  }

  function elapsed(r) {
    const t = Date.parse(r.timestamp);
    if (Number.isFinite(t)) return Math.max(0, Date.now() - t);
    return r.elapsed_ms ?? null;
  }

  function headerList(headers) {
    const entries = Object.entries(headers || {});
    if (!entries.length) return h("span.muted.small", "none");
    return h("dl.kv", entries.sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => [h("dt", k), h("dd", String(v))]));
  }

  function draw() {
    source.textContent = store.inflightLive ? "live from /api/events" : notAvailable ? "" : `refreshing every ${POLL_MS / 1000} s`;
    if (!store.inflightLive && notAvailable) {
      replace(message);
      replace(tableBox, unavailable("In-flight request tracking (/api/inflight and /api/events)"));
      return;
    }
    const rows = [...current().values()].sort((a, b) => Number(a.id) - Number(b.id) || String(a.id).localeCompare(String(b.id)));
    if (!rows.length) {
      replace(tableBox, h("p.empty", "No requests in flight."));
      return;
    }
    const body = [];
    for (const r of rows) {
      const id = String(r.id);
      const status = r.resp_headers && Object.keys(r.resp_headers).length ? "streaming" : "waiting";
      const note = cancelling.get(id);
      body.push(h("tr", { dataset: { id } },
        h("td.num", id),
        h("td", h("code", r.model || "")),
        h("td.hide-narrow", h("code", `${r.method || ""} ${r.req_path || ""}`)),
        h("td", h(`span.badge.state-${status === "streaming" ? "ready" : "starting"}`, status)),
        h("td.num", { dataset: { elapsed: id } }, fmtDuration(elapsed(r))),
        h("td.num", fmtBytes(r.resp_bytes ?? 0)),
        h("td.hide-narrow", r.remote_ip || ""),
        h("td",
          h("button.small", { type: "button", onclick: () => { if (open.has(id)) open.delete(id); else open.add(id); draw(); } }, open.has(id) ? "Hide" : "Headers"), " ",
          h("button.small.danger", { type: "button", dataset: { cancel: id }, disabled: note === "…", onclick: () => cancel(id) }, note === "…" ? "Cancelling…" : "Cancel"),
          note && note !== "…" ? h("div.error.small", note) : null)));
      if (open.has(id)) {
        body.push(h("tr", h("td", { colspan: 8 },
          h("div.grid.two", h("div", h("h3", "Request headers"), headerList(r.req_headers)),
            h("div", h("h3", "Response headers"), headerList(r.resp_headers))),
          r.metadata ? h("div.small.muted", `metadata: ${JSON.stringify(r.metadata)}`) : null)));
      }
    }
    replace(tableBox, h("div.table-wrap", h("table#inflight-table",
      h("thead", h("tr", h("th.num", "ID"), h("th", "Model"), h("th.hide-narrow", "Request"), h("th", "State"),
        h("th.num", "Elapsed"), h("th.num", "Bytes out"), h("th.hide-narrow", "Client"), h("th", ""))),
      h("tbody", body))));
  }

  const offs = [store.on("inflight", draw), store.on("mode", () => poll())];
  poll();
  // Only the elapsed cells change every second: leave the buttons alone.
  tickTimer = setInterval(() => {
    for (const cell of tableBox.querySelectorAll("[data-elapsed]")) {
      const r = current().get(cell.dataset.elapsed);
      if (r) cell.textContent = fmtDuration(elapsed(r));
    }
  }, 1000);
  return () => {
    offs.forEach((off) => off());
    clearTimeout(pollTimer);
    clearInterval(tickTimer);
  };
}
