// Activity: the request table, a speed chart, stats and the capture viewer.

import { getJSON, NotAvailable } from "../api.js";
import { openCapture } from "../capture.js";
import { lineChart } from "../chart.js";
import { fmtDuration, fmtNumber, fmtSpeed, fmtTime, fmtTokens, h, replace, throttle, unavailable } from "../dom.js";
import { store } from "../store.js";

const COLUMNS = [
  { key: "id", label: "ID", num: true, cell: (r) => r.id },
  { key: "time", label: "Time", cell: (r) => h("span", { title: r.timestamp }, fmtTime(r.timestamp)) },
  { key: "model", label: "Model", cell: (r) => h("code", r.model) },
  { key: "req_path", label: "Path", cls: "hide-narrow", cell: (r) => h("code", r.req_path) },
  { key: "resp_status_code", label: "Status", num: true, cell: (r) => h("span", {
    class: r.resp_status_code >= 200 && r.resp_status_code < 300 ? "status-ok" : "status-bad", title: r.error_msg || "" }, r.resp_status_code) },
  { key: "cached", label: "Cached", num: true, cls: "hide-narrow", cell: (r) => fmtTokens(r.tokens?.cache_tokens) },
  { key: "prompt", label: "Prompt", num: true, cell: (r) => fmtTokens(r.tokens?.input_tokens) },
  { key: "generated", label: "Generated", num: true, cell: (r) => fmtTokens(r.tokens?.output_tokens) },
  { key: "prompt_speed", label: "Prompt t/s", num: true, cls: "hide-narrow", cell: (r) => fmtSpeed(r.tokens?.prompt_per_second) },
  { key: "gen_speed", label: "Gen t/s", num: true, cell: (r) => fmtSpeed(r.tokens?.tokens_per_second) },
  { key: "duration", label: "Duration", num: true, cell: (r) => fmtDuration(r.duration_ms) },
];

export function mount(main, { params }) {
  const state = { model: params.get("model") || "", limit: Number(params.get("limit")) || 25, page: 1, sort: "id", order: "desc" };
  let pollTimer = null;
  let seq = 0;

  const modelSelect = h("select", { "aria-label": "Model filter", onchange: () => { state.model = modelSelect.value; state.page = 1; refreshAll(); } });
  const limitSelect = h("select", { "aria-label": "Rows per page", onchange: () => { state.limit = Number(limitSelect.value); state.page = 1; loadTable(); } },
    [10, 25, 50, 100, 250].map((n) => h("option", { value: n, selected: n === state.limit }, `${n} rows`)));
  const tableBox = h("div.panel.flush");
  const chartBox = h("div.chart");
  const statsBox = h("div");
  const message = h("div");

  replace(main,
    h("div.page-head", h("h1", "Activity"), h("label.small.muted", "Model", modelSelect), limitSelect,
      h("button", { type: "button", onclick: () => refreshAll() }, "Refresh")),
    message,
    h("div.grid.two",
      h("section.panel", h("div.toolbar", h("h2.grow", "Speed over time"),
        h("div.legend", h("span", h("i", { style: { background: "var(--series-1)" } }), "generation t/s (left)"),
          h("span", h("i", { style: { background: "var(--series-2)" } }), "prompt t/s (right)"))), chartBox),
      h("section.panel", h("h2", "Statistics"), statsBox)),
    tableBox);

  function fillModels(seen = []) {
    const ids = new Set(store.models.filter((m) => (m.meta?.llamaswap?.type || "model") === "model").map((m) => m.id));
    for (const s of store.statusList || []) if (!s.peerID) ids.add(s.id);
    for (const id of seen) ids.add(id);
    if (state.model) ids.add(state.model);
    const current = state.model;
    replace(modelSelect, h("option", { value: "" }, "all models"),
      [...ids].sort().map((id) => h("option", { value: id, selected: id === current }, id)));
  }

  function query(extra = {}) {
    const q = new URLSearchParams();
    if (state.model) q.append("model", state.model);
    for (const [k, v] of Object.entries(extra)) q.set(k, v);
    return q.toString();
  }

  async function loadTable() {
    const mySeq = ++seq;
    try {
      const page = await getJSON(`/api/metrics/activity?${query({ limit: state.limit, page: state.page, sort: state.sort, order: state.order })}`);
      if (mySeq !== seq) return;
      drawTable(page);
      fillModels((page.data || []).map((r) => r.model));
    } catch (err) {
      if (mySeq !== seq) return;
      replace(tableBox, err instanceof NotAvailable ? unavailable("Activity (/api/metrics/activity)") : h("p.note.bad", `Could not load activity: ${err.message}`));
    }
  }

  function drawTable(page) {
    const rows = page.data || [];
    const head = h("tr", COLUMNS.map((c) => h("th.sortable", {
      class: [c.num ? "num" : "", c.cls || ""].join(" "),
      "aria-sort": state.sort === c.key ? (state.order === "asc" ? "ascending" : "descending") : null,
      tabindex: 0, dataset: { sort: c.key }, title: `Sort by ${c.label}`,
      onclick: () => sortBy(c.key),
      onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(c.key); } },
    }, c.label)), h("th", "Capture"));
    const body = rows.length
      ? rows.map((r) => h("tr", { dataset: { id: r.id } },
        COLUMNS.map((c) => h("td", { class: [c.num ? "num" : "", c.cls || ""].join(" ") }, c.cell(r))),
        h("td", r.has_capture
          ? h("button.small", { type: "button", dataset: { capture: r.id }, onclick: () => openCapture(r.id) }, "View")
          : h("span.muted.small", "–"))))
      : [h("tr", h("td.empty", { colspan: COLUMNS.length + 1 }, "No requests recorded yet. Try the Playground."))];
    const totalPages = Math.max(1, page.total_pages || 1);
    const pager = h("div.pager",
      h("span.muted.small", `${fmtNumber(page.total || 0)} requests`),
      h("button.small", { type: "button", disabled: state.page <= 1, onclick: () => { state.page--; loadTable(); } }, "‹ Prev"),
      h("span.small", `page ${state.page} of ${totalPages}`),
      h("button.small", { type: "button", disabled: state.page >= totalPages, onclick: () => { state.page++; loadTable(); } }, "Next ›"));
    replace(tableBox, h("div.table-wrap", h("table#activity-table", h("thead", head), h("tbody", body))), pager);
  }

  function sortBy(key) {
    if (state.sort === key) state.order = state.order === "asc" ? "desc" : "asc";
    else { state.sort = key; state.order = key === "model" || key === "req_path" ? "asc" : "desc"; }
    state.page = 1;
    loadTable();
  }

  async function loadChart() {
    try {
      const page = await getJSON(`/api/metrics/activity?${query({ limit: 200, sort: "id", order: "desc" })}`);
      const points = (page.data || []).slice().reverse()
        .filter((r) => r.resp_status_code === 200)
        .map((r) => ({ t: Date.parse(r.timestamp) || 0, a: r.tokens?.tokens_per_second ?? null, b: r.tokens?.prompt_per_second ?? null }));
      replace(chartBox, lineChart(points, { labelA: "generation tokens/s", labelB: "prompt tokens/s" }));
    } catch (err) {
      replace(chartBox, err instanceof NotAvailable ? h("p.muted.small", "Chart not available.") : h("p.note.bad", err.message));
    }
  }

  async function loadStats() {
    try {
      const s = await getJSON(`/api/metrics/stats${state.model ? `?model=${encodeURIComponent(state.model)}` : ""}`);
      drawStats(s);
    } catch (err) {
      replace(statsBox, err instanceof NotAvailable ? unavailable("Statistics (/api/metrics/stats)") : h("p.note.bad", err.message));
    }
  }

  function drawStats(s) {
    const stat = (k, v) => h("div.stat", h("div.v", v), h("div.k", k));
    const hist = (x) => {
      if (!x || !Array.isArray(x.bins)) return h("span.muted", "–");
      const max = Math.max(1, ...x.bins);
      return h("div.hist", { title: `${fmtSpeed(x.min)} – ${fmtSpeed(x.max)} t/s` },
        x.bins.map((b) => h("span", { style: { height: `${(b / max) * 100}%` } })));
    };
    const row = (label, x) => h("tr", h("th", label),
      ["p50", "p95", "p99"].map((p) => h("td.num", x ? fmtSpeed(x[p]) : "–")), h("td.hide-narrow", { style: { width: "35%" } }, hist(x)));
    replace(statsBox,
      h("div.stats",
        stat("requests", fmtNumber(s.total_requests ?? 0)),
        stat("input tokens", fmtNumber(s.total_input_tokens ?? 0)),
        stat("output tokens", fmtNumber(s.total_output_tokens ?? 0)),
        stat("cached tokens", fmtNumber(s.total_cache_tokens ?? 0))),
      h("div.table-wrap", h("table.pct", h("thead", h("tr", h("th", "tokens/s"), h("th.num", "p50"), h("th.num", "p95"), h("th.num", "p99"), h("th.hide-narrow", "distribution"))),
        h("tbody", row("prompt", s.prompt_histogram), row("generation", s.gen_histogram)))));
  }

  function refreshAll() {
    loadTable();
    loadChart();
    loadStats();
  }

  const onActivity = throttle(refreshAll, 1000);
  const schedulePoll = () => {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(() => {
      if (store.mode !== "live" && !document.hidden) refreshAll();
      schedulePoll();
    }, 5000);
  };

  const offs = [store.on("activity", onActivity), store.on("models", () => fillModels())];
  fillModels();
  refreshAll();
  schedulePoll();
  const capture = params.get("capture");
  if (capture) openCapture(capture);
  return () => {
    offs.forEach((off) => off());
    clearTimeout(pollTimer);
    document.getElementById("capture-dialog")?.close();
  };
}
