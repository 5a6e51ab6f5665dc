// Models: the listing from /v1/models with live states, load and unload.

import { getJSON, HttpError, NotAvailable, postJSON, request } from "../api.js";
import { fmtNumber, h, replace, unavailable } from "../dom.js";
import { store } from "../store.js";

export function upstreamPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

// Placement: which states hold a model's footprint (as the server counts them).
const HOLDING = new Set(["starting", "ready", "stopping"]);
const SERIES = 6; // colours .seg.c0 … .seg.c5

export function fmtSize(n) {
  if (n === null || n === undefined) return "–";
  const units = [["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024]];
  for (const [unit, size] of units) if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  return `${n} B`;
}

const CAPABILITY_LABELS = {
  vision: "vision",
  audio_transcriptions: "transcription",
  audio_speech: "speech",
  image_generation: "image gen",
  image_to_image: "img2img",
  function_calling: "tools",
  reranker: "reranker",
};

export function mount(main) {
  const busy = new Map();   // id -> "loading" | "unloading"
  const errors = new Map(); // id -> message
  let filter = "";
  let showUnlisted = false;
  let unloadAllArmed = null;
  let profiles = null;      // null: not fetched; false: not available

  const grid = h("div.models", { "aria-live": "polite" });
  const summary = h("span.muted.small#models-summary");
  const info = h("div");
  const search = h("input", { type: "search", placeholder: "Filter models…", "aria-label": "Filter models",
    oninput: () => { filter = search.value.trim().toLowerCase(); draw(); } });
  const unlistedToggle = h("label.small.muted", { hidden: true },
    h("input", { type: "checkbox", onchange: (e) => { showUnlisted = e.target.checked; draw(); } }), "show unlisted");
  const profileBox = h("span");
  const unloadAll = h("button.danger", { type: "button", onclick: onUnloadAll, title: "Stop every running model" }, "Unload all");
  // Placement (/api/resources): one bar per resource, each loaded model's share.
  let resources = store.resources;
  const resourceBox = h("section.resources#resources", { hidden: true, "aria-label": "Resources" });

  replace(main,
    h("div.page-head", h("div.title", h("h1", "Models"), summary), profileBox, search, unlistedToggle, unloadAll),
    info, resourceBox, grid);

  async function loadResources() {
    try {
      resources = await getJSON("/api/resources");
    } catch (err) {
      resources = null;
      if (!(err instanceof NotAvailable)) console.warn("resources:", err.message);
    }
    drawResources();
    draw();
  }

  function colourOf(id) {
    const ids = Object.keys(resources?.models || {}).sort();
    return `c${Math.max(ids.indexOf(id), 0) % SERIES}`;
  }

  function resourceBar(name, figures) {
    const total = figures.total || 1;
    const holders = Object.entries(resources.models || {})
      .filter(([id, held]) => held[name] && HOLDING.has(store.stateOf(id)))
      .sort(([a], [b]) => a.localeCompare(b));
    const pct = (n) => `${Math.min(100, (100 * n) / total).toFixed(2)}%`;
    const free = figures.free;
    const bar = h("div.bar", { role: "img", "aria-label": `${name}: ${fmtSize(figures.reserved)} reserved of ${fmtSize(figures.total)}` },
      holders.map(([id, held]) => h(`span.seg.${colourOf(id)}`, {
        style: { width: pct(held[name].bytes) },
        title: `${id}: ${fmtSize(held[name].bytes)} (${held[name].source})`,
        dataset: { model: id, source: held[name].source },
      })),
      free === null || free === undefined || free >= total ? null
        : h("span.free-mark", { style: { left: pct(Math.max(total - free, 0)) }, title: `${fmtSize(free)} free (probe)` }));
    const legend = holders.map(([id, held]) => h("li", { dataset: { model: id } },
      h(`span.swatch.${colourOf(id)}`), h("code", id), ` ${fmtSize(held[name].bytes)} `,
      h("span.tag", { dataset: { role: "source" } }, held[name].source)));
    return h("div.resource", { dataset: { resource: name } },
      h("div.row", h("code.name", name),
        h("span.small.muted", { dataset: { role: "figures" } },
          `${fmtSize(figures.reserved)} reserved of ${fmtSize(figures.total)} · `,
          free === null || free === undefined ? "free unknown" : `${fmtSize(free)} free`)),
      bar,
      legend.length ? h("ul.legend", legend) : null);
  }

  function drawResources() {
    const names = Object.keys(resources?.resources || {});
    resourceBox.hidden = names.length === 0;
    if (!names.length) { replace(resourceBox); return; }
    replace(resourceBox, names.map((name) => resourceBar(name, resources.resources[name])));
  }

  function footprintLine(id) {
    const held = resources?.models?.[id];
    if (!held || !Object.keys(held).length) return null;
    return h("div.meta", { dataset: { role: "footprint" } }, "holds ",
      Object.entries(held).map(([name, fp]) => h("span.tag", { title: `footprint source: ${fp.source}` },
        `${name} ${fmtSize(fp.bytes)} · ${fp.source}`)));
  }

  async function onUnloadAll() {
    if (!unloadAllArmed) {
      unloadAll.textContent = "Click again to unload all";
      unloadAllArmed = setTimeout(() => { unloadAllArmed = null; unloadAll.textContent = "Unload all"; }, 3000);
      return;
    }
    clearTimeout(unloadAllArmed);
    unloadAllArmed = null;
    unloadAll.disabled = true;
    unloadAll.textContent = "Unloading…";
    try {
      await postJSON("/api/models/unload");
      errors.clear();
    } catch (err) {
      replace(info, h("p.note.bad", `Unload all failed: ${err.message}`));
    } finally {
      unloadAll.disabled = false;
      unloadAll.textContent = "Unload all";
      store.refreshSoon();
    }
  }

  async function load(id) {
    busy.set(id, "loading");
    errors.delete(id);
    draw();
    store.refreshSoon();
    try {
      // Starts the model through the scheduler and answers once it is ready.
      await request(`/api/models/load/${upstreamPath(id)}`, { method: "POST" });
    } catch (err) {
      errors.set(id, err instanceof NotAvailable ? "this model cannot be loaded here" : err.message);
    } finally {
      busy.delete(id);
      store.refreshSoon();
      draw();
    }
  }

  async function unload(id) {
    busy.set(id, "unloading");
    errors.delete(id);
    draw();
    try {
      await request(`/api/models/unload/${upstreamPath(id)}`, { method: "POST" });
    } catch (err) {
      errors.set(id, err.message);
    } finally {
      busy.delete(id);
      store.refreshSoon();
      draw();
    }
  }

  async function loadProfiles() {
    try {
      profiles = await getJSON("/api/profiles");
    } catch (err) {
      profiles = false;
      if (!(err instanceof NotAvailable)) console.warn("profiles:", err.message);
    }
    drawProfiles();
  }

  function drawProfiles() {
    if (!profiles || !Array.isArray(profiles.profiles) || profiles.profiles.length === 0) {
      replace(profileBox);
      return;
    }
    const active = store.profile !== undefined ? store.profile : profiles.active;
    const select = h("select", { "aria-label": "Active profile", onchange: async () => {
      select.disabled = true;
      try {
        await request("/api/profiles/active", { method: "PUT", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ name: select.value || null }) });
        profiles.active = select.value || null;
      } catch (err) {
        replace(info, h("p.note.bad", `Could not change profile: ${err.message}`));
      } finally {
        select.disabled = false;
        store.refreshModels();
      }
    } },
    h("option", { value: "" }, "no profile"),
    profiles.profiles.map((p) => h("option", { value: p.id, selected: p.id === active, title: p.description || "" }, p.id)));
    replace(profileBox, h("label.small.muted", "Profile", select));
  }

  function entries() {
    const list = store.models.map((m) => ({ ...m, listed: true }));
    const ids = new Set(list.map((m) => m.id));
    for (const s of store.statusList || []) {
      if (ids.has(s.id)) continue;
      if (s.unlisted || s.peerID) {
        list.push({
          id: s.id, name: s.name, description: s.description, listed: false, unlisted: s.unlisted,
          meta: { llamaswap: s.peerID ? { type: "peer", peerID: s.peerID } : { type: "model", aliases: s.aliases } },
        });
      }
    }
    return list.sort((a, b) => a.id.localeCompare(b.id));
  }

  function card(m) {
    const meta = m.meta?.llamaswap || {};
    const type = meta.type || "model";
    const realId = type === "alias" ? meta.modelID : m.id;
    const local = type === "model" || type === "alias";
    let state;
    if (local) state = store.stateOf(realId);
    else state = ["loaded", "unavailable"].includes(m.status?.value) ? m.status.value : "unloaded";
    const action = busy.get(m.id);
    if (action === "loading" && state === "stopped") state = "starting";
    if (action === "unloading" && state === "ready") state = "stopping";

    const tags = [];
    if (type !== "model") tags.push(h("span.tag", type));
    if (m.unlisted) tags.push(h("span.tag", "unlisted"));
    if (type === "alias") tags.push(h("span.tag", `alias of ${meta.modelID}`));
    if (type === "peer" && meta.peerID) tags.push(h("span.tag", `peer ${meta.peerID}`));
    if (type === "peer" && meta.peer?.state === "down") tags.push(h("span.tag", "peer down"));
    for (const [cap, on] of Object.entries(m.capabilities || {})) if (on) tags.push(h("span.tag", CAPABILITY_LABELS[cap] || cap));
    if (m.context_length) tags.push(h("span.tag", `ctx ${fmtNumber(m.context_length)}`));

    const details = [];
    if (Array.isArray(meta.aliases) && meta.aliases.length) {
      details.push(h("div.meta", "aliases: ", meta.aliases.map((a) => h("code.tag", a))));
    }
    if (type === "selector") {
      details.push(h("div.meta", `selector · ${meta.strategy || "?"}`,
        meta.spillover ? ` · spillover ${meta.spillover}` : "",
        Array.isArray(meta.targets) && meta.targets.length ? [" → ", meta.targets.map((t) => h("code.tag", t))] : ""));
    }
    const userMeta = Object.entries(meta).filter(([k]) => !["type", "aliases", "modelID", "peerID", "strategy", "targets", "spillover"].includes(k));
    if (userMeta.length) {
      details.push(h("div.meta", userMeta.map(([k, v]) => h("span.tag", `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`))));
    }

    const running = state !== "stopped" && state !== "shutdown" && state !== "unloaded";
    const actions = [];
    if (local) {
      actions.push(h("button.small", { type: "button", disabled: Boolean(action) || running, dataset: { action: "load" },
        onclick: () => load(m.id) }, action === "loading" ? "Loading…" : "Load"));
      actions.push(h("button.small.danger", { type: "button", disabled: Boolean(action) || !running, dataset: { action: "unload" },
        onclick: () => unload(realId) }, action === "unloading" ? "Unloading…" : "Unload"));
      actions.push(h("a.button.small", { href: `/ui/logs?source=${encodeURIComponent(realId)}`, "data-route": "" }, "Logs"));
    }
    if (type !== "profile") {
      actions.push(h("a.button.small", { href: `/ui/playground?model=${encodeURIComponent(m.id)}`, "data-route": "" }, "Chat"));
    }

    return h("article.model", { dataset: { model: m.id, state } },
      h("div.row", h("span.id", m.id), h(`span.badge.state-${state}`, { dataset: { role: "state" } }, state)),
      m.name && m.name !== m.id ? h("div.name", m.name) : null,
      m.description ? h("div.desc", m.description) : null,
      tags.length ? h("div", tags) : null,
      details,
      local ? footprintLine(realId) : null,
      errors.has(m.id) ? h("p.error", errors.get(m.id)) : null,
      state === "starting" ? loadingBar(store.loading.get(realId)) : null,
      actions.length ? h("div.actions", actions) : null);
  }

  // A starting model's load: a bar for the percent read, and the time left.
  function loadingBar(p) {
    if (!p || p.percent == null) return null;
    const left = p.eta_s != null ? ` · about ${Math.round(p.eta_s)} s left` : "";
    return h("div.loading", { dataset: { role: "loading" } },
      h("progress", { max: 100, value: p.percent }),
      h("span.meta", `${Math.round(p.percent)}%${left}`));
  }

  function draw() {
    const all = entries();
    const running = [...store.status.values()].filter((st) => st !== "stopped" && st !== "shutdown").length;
    const local = all.filter((m) => (m.meta?.llamaswap?.type || "model") === "model").length;
    summary.textContent = store.modelsReady ? `${local} model${local === 1 ? "" : "s"} · ${running} running` : "";
    unlistedToggle.hidden = !all.some((m) => m.unlisted);
    const visible = all.filter((m) => (showUnlisted || !m.unlisted)
      && (!filter || `${m.id} ${m.name || ""} ${m.description || ""} ${(m.meta?.llamaswap?.aliases || []).join(" ")}`.toLowerCase().includes(filter)));
    if (store.modelsError && !store.models.length) {
      const err = store.modelsError;
      replace(info, err instanceof NotAvailable ? unavailable("The model list (/v1/models)") : h("p.note.bad", `Could not list models: ${err.message}`));
    } else if (!(store.modelsError instanceof HttpError)) {
      replace(info);
    }
    if (!visible.length) {
      replace(grid, h("p.empty", store.modelsReady ? (filter ? "No models match the filter." : "No models are configured.") : "Loading models…"));
      return;
    }
    replace(grid, visible.map(card));
  }

  const offs = [
    store.on("models", draw),
    store.on("status", () => {
      draw();
      drawResources();
      // Without the event stream, reserved amounts are polled with the states.
      if (store.mode !== "live") loadResources();
    }),
    store.on("loading", draw),
    store.on("profile", drawProfiles),
    store.on("resources", (data) => { resources = data; drawResources(); draw(); }),
  ];
  draw();
  store.refreshModels();
  loadProfiles();
  loadResources();
  return () => {
    offs.forEach((off) => off());
    clearTimeout(unloadAllArmed);
  };
}
