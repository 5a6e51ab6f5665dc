// Logs: a live tail of /logs/stream[/proxy|/upstream|/<model>].

import { apiFetch, requestLogin } from "../api.js";
import { AnsiRenderer, stripAnsi } from "../ansi.js";
import { h, replace, unavailable } from "../dom.js";
import { isAbort, readText } from "../sse.js";
import { store } from "../store.js";

const MAX_LINES = 5000;
// Lines without colour codes still get their level coloured.
const LEVEL = /^(\S*\s*)?\[(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL)\]/;
const LEVEL_COLOUR = { DEBUG: "\x1b[2m", WARN: "\x1b[33m", WARNING: "\x1b[33m", ERROR: "\x1b[31m", CRITICAL: "\x1b[1;31m" };

function withLevelColour(text) {
  if (text.includes("\x1b")) return text;
  const m = LEVEL.exec(text);
  const code = m && LEVEL_COLOUR[m[2]];
  return code ? `${code}${text}\x1b[0m` : text;
}

function streamPath(source) {
  if (!source || source === "all") return "/logs/stream";
  if (source === "proxy" || source === "upstream") return `/logs/stream/${source}`;
  return `/logs/stream/${source.split("/").map(encodeURIComponent).join("/")}`;
}

export function mount(main, { params }) {
  let source = params.get("source") || "all";
  let filter = "";
  let paused = false;
  let pending = [];        // raw lines received while paused
  let partial = "";        // an unfinished last line
  let lines = [];          // [{el, text}]
  let controller = null;
  let reconnectTimer = null;
  let alive = true;
  let renderer = new AnsiRenderer();
  let partialEl = null;

  const view = h("div.logview#logview", { role: "log", "aria-live": "off", tabindex: 0 });
  const status = h("span.muted.small#log-status");
  const sourceSelect = h("select", { "aria-label": "Log source", onchange: () => { source = sourceSelect.value; updateUrl(); connect(); } });
  const filterInput = h("input", { type: "search", placeholder: "Filter lines…", "aria-label": "Filter lines",
    oninput: () => { filter = filterInput.value.toLowerCase(); applyFilter(); } });
  const pauseButton = h("button", { type: "button", "aria-pressed": "false", onclick: togglePause }, "Pause");
  const clearButton = h("button", { type: "button", onclick: () => { lines = []; partialEl = null; view.replaceChildren(); } }, "Clear");
  const box = h("div");

  replace(main,
    h("div.page-head", h("h1", "Logs"), h("label.small.muted", "Source", sourceSelect), filterInput, pauseButton, clearButton),
    box, h("p", status));
  replace(box, view);

  function fillSources() {
    const ids = new Set(store.models.filter((m) => (m.meta?.llamaswap?.type || "model") === "model").map((m) => m.id));
    for (const s of store.statusList || []) if (!s.peerID) ids.add(s.id);
    if (!["all", "proxy", "upstream"].includes(source)) ids.add(source);
    replace(sourceSelect,
      h("option", { value: "all", selected: source === "all" }, "everything"),
      h("option", { value: "proxy", selected: source === "proxy" }, "proxy"),
      h("option", { value: "upstream", selected: source === "upstream" }, "all upstreams"),
      ids.size ? h("optgroup", { label: "models" }, [...ids].sort().map((id) => h("option", { value: id, selected: id === source }, id))) : null);
  }

  function updateUrl() {
    const url = source === "all" ? "/ui/logs" : `/ui/logs?source=${encodeURIComponent(source)}`;
    history.replaceState(null, "", url);
  }

  function togglePause() {
    paused = !paused;
    pauseButton.textContent = paused ? "Resume" : "Pause";
    pauseButton.setAttribute("aria-pressed", String(paused));
    if (!paused) {
      const queued = pending;
      pending = [];
      addLines(queued, true);
    }
    showStatus();
  }

  function showStatus(text) {
    if (text !== undefined) status.dataset.base = text;
    const base = status.dataset.base || "";
    status.textContent = paused ? `${base} · paused${pending.length ? `, ${pending.length} new lines waiting` : ""}` : base;
  }

  function matches(text) {
    return !filter || text.toLowerCase().includes(filter);
  }

  function applyFilter() {
    for (const line of lines) line.el.classList.toggle("hidden", !matches(line.text));
  }

  function nearBottom() {
    return view.scrollHeight - view.scrollTop - view.clientHeight < 40;
  }

  /** Append complete lines (and, if `tail`, re-render the unfinished one). */
  function addLines(raw, tail) {
    const stick = nearBottom();
    const frag = document.createDocumentFragment();
    if (partialEl) { partialEl.remove(); lines.pop(); partialEl = null; }
    const all = tail && partial ? [...raw, partial] : raw;
    all.forEach((text, i) => {
      const isPartial = tail && partial && i === all.length - 1;
      // The partial line is re-rendered later: do not let it move the style state.
      const r = isPartial ? Object.assign(new AnsiRenderer(), renderer) : renderer;
      const el = h("div.line", r.render(withLevelColour(text)));
      const plain = stripAnsi(text);
      if (!matches(plain)) el.classList.add("hidden");
      lines.push({ el, text: plain });
      frag.append(el);
      if (isPartial) partialEl = el;
    });
    view.append(frag);
    while (lines.length > MAX_LINES) lines.shift().el.remove();
    if (stick) view.scrollTop = view.scrollHeight;
  }

  function onText(text) {
    const parts = (partial + text).split("\n");
    partial = parts.pop();
    const complete = parts.map((l) => (l.endsWith("\r") ? l.slice(0, -1) : l));
    if (paused) {
      pending.push(...complete);
      if (pending.length > MAX_LINES) pending = pending.slice(-MAX_LINES);
      showStatus();
      return;
    }
    addLines(complete, true);
  }

  async function connect() {
    controller?.abort();
    clearTimeout(reconnectTimer);
    const mine = new AbortController();
    controller = mine;
    lines = [];
    pending = [];
    partial = "";
    partialEl = null;
    renderer = new AnsiRenderer();
    view.replaceChildren();
    if (!box.contains(view)) replace(box, view);
    const path = streamPath(source);
    showStatus(`connecting to ${path}…`);
    try {
      let res = await apiFetch(path, { headers: { Accept: "text/plain" }, signal: mine.signal });
      if (res.status === 401) {
        await requestLogin(false);
        res = await apiFetch(path, { headers: { Accept: "text/plain" }, signal: mine.signal });
      }
      if (res.status === 404 || res.status === 405 || res.status === 501) {
        replace(box, unavailable(`The log stream ${path}`));
        showStatus("");
        return;
      }
      if (res.status === 400) {
        replace(box, h("p.note.bad", (await res.text()).trim() || "This log source is not valid."));
        showStatus("");
        return;
      }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      showStatus(`streaming ${path}`);
      await readText(res, onText);
      if (mine !== controller || !alive) return;
      showStatus(`${path} ended; reconnecting…`);
    } catch (err) {
      if (isAbort(err) || mine !== controller || !alive) return;
      showStatus(`${path}: connection lost (${err.message}); reconnecting…`);
    }
    reconnectTimer = setTimeout(() => { if (alive && mine === controller) connect(); }, 2000);
  }

  const offs = [store.on("models", fillSources), store.on("status", () => { if (sourceSelect.options.length <= 3) fillSources(); })];
  fillSources();
  connect();
  return () => {
    alive = false;
    offs.forEach((off) => off());
    controller?.abort();
    clearTimeout(reconnectTimer);
  };
}
