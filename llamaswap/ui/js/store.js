// Live server state: /api/events when the server has it, else polling
// /running and /v1/models.  Pages subscribe with store.on(kind, fn).

import { apiFetch, getJSON, NotAvailable, requestLogin } from "./api.js";
import { isAbort, readSSE } from "./sse.js";

const POLL_RUNNING_MS = 2000;
const POLL_MODELS_MS = 10000;
const EVENTS_REPROBE_MS = 60000;

class Store {
  constructor() {
    this.listeners = new Map();
    this.models = [];            // /v1/models data records
    this.modelsError = null;
    this.modelsReady = false;    // true after the first /v1/models answer (or error)
    this.status = new Map();     // id -> state (stopped/starting/ready/stopping/shutdown)
    this.statusList = null;      // last modelStatus payload (includes unlisted + peers)
    this.inflight = new Map();   // id -> entry, from inflight events
    this.inflightLive = false;   // true once /api/events delivered inflight data
    this.loading = new Map();    // id -> loadingProgress entry (percent, eta_s, elapsed_s)
    this.profile = undefined;    // active profile from profileChanged
    this.uiConfig = null;
    this.resources = null;       // last /api/resources body (resources events)
    this.mode = "connecting";    // live | polling | offline | connecting
    this.eventsAvailable = null; // null: unknown yet
    this.started = false;
    this.pollTimer = null;
    this.lastModelsAt = 0;
  }

  on(kind, fn) {
    if (!this.listeners.has(kind)) this.listeners.set(kind, new Set());
    this.listeners.get(kind).add(fn);
    return () => this.listeners.get(kind)?.delete(fn);
  }

  emit(kind, payload) {
    for (const fn of this.listeners.get(kind) || []) {
      try { fn(payload); } catch (err) { console.warn("listener failed", kind, err); }
    }
  }

  setMode(mode) {
    if (mode === this.mode) return;
    this.mode = mode;
    this.emit("mode", mode);
  }

  start() {
    if (this.started) return;
    this.started = true;
    this.refreshModels();
    this.connectEvents();
    this.schedulePoll(0);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.mode !== "live") this.schedulePoll(0);
    });
  }

  stateOf(id) {
    return this.status.get(id) || "stopped";
  }

  // -- /v1/models ----------------------------------------------------------

  async refreshModels() {
    this.lastModelsAt = Date.now();
    try {
      const body = await getJSON("/v1/models");
      this.models = Array.isArray(body?.data) ? body.data : [];
      this.modelsError = null;
      if (this.mode === "live" || this.statusList) {
        // statuses come from events; listing only fills gaps
      } else {
        for (const m of this.models) {
          if (!this.status.has(m.id) && m.status?.value === "loaded") this.status.set(m.id, "ready");
        }
      }
    } catch (err) {
      this.modelsError = err;
    }
    this.modelsReady = true;
    this.emit("models", this.models);
    return this.models;
  }

  // -- /api/events -----------------------------------------------------------

  async connectEvents() {
    let backoff = 1000;
    for (;;) {
      let gotData = false;
      try {
        const controller = new AbortController();
        this.eventsController = controller;
        const res = await apiFetch("/api/events", { headers: { Accept: "text/event-stream" }, signal: controller.signal });
        if (res.status === 401) {
          await requestLogin(false);
          continue;
        }
        if (res.status === 404 || res.status === 405 || res.status === 501) {
          this.eventsAvailable = false;
          this.setMode("polling");
          this.schedulePoll(0);
          await sleep(EVENTS_REPROBE_MS);
          continue;
        }
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        this.eventsAvailable = true;
        this.setMode("live");
        backoff = 1000;
        await readSSE(res, (ev) => {
          gotData = true;
          this.onEnvelope(ev.data);
        });
      } catch (err) {
        if (!isAbort(err) && !(err instanceof TypeError)) console.warn("events stream:", err);
      }
      // Stream ended (server reload/shutdown) or failed: poll meanwhile, reconnect.
      if (this.eventsAvailable) this.setMode(gotData ? "polling" : "offline");
      this.inflightLive = false;
      this.schedulePoll(0);
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 10000);
    }
  }

  onEnvelope(raw) {
    let env;
    try { env = JSON.parse(raw); } catch { return; }
    if (!env || typeof env.type !== "string") return;
    let data = env.data;
    if (typeof data === "string") {
      try { data = JSON.parse(data); } catch { /* keep the string */ }
    }
    switch (env.type) {
      case "modelStatus": this.onModelStatus(data); break;
      case "logData": this.emit("logData", data); break;
      case "activity": this.emit("activity", data); break;
      case "inflight": this.onInflight(data); break;
      case "loadingProgress":
        this.loading = new Map((data?.models || []).map((m) => [m.id, m]));
        this.emit("loading", this.loading);
        break;
      case "profileChanged":
        this.profile = data?.active ?? null;
        this.emit("profile", this.profile);
        this.refreshModels();
        break;
      case "uiConfig": this.uiConfig = data; this.emit("uiConfig", data); break;
      case "resources": this.resources = data; this.emit("resources", data); break;
      default: break;
    }
  }

  onModelStatus(list) {
    if (!Array.isArray(list)) return;
    this.statusList = list;
    const next = new Map();
    for (const m of list) if (m && m.id && !m.peerID) next.set(m.id, m.state || "stopped");
    this.status = next;
    this.emit("status", this.status);
    // New or removed models after a reload: keep the listing in step.
    const known = new Set(this.models.map((m) => m.id));
    if (list.some((m) => m && !m.unlisted && !m.peerID && !known.has(m.id))) this.refreshModels();
  }

  onInflight(data) {
    if (!data) return;
    this.inflightLive = true;
    if (data.operation === "snapshot") {
      this.inflight = new Map((data.requests || []).map((r) => [String(r.id), r]));
    } else if (data.operation === "upsert" && data.request) {
      this.inflight.set(String(data.request.id), data.request);
    } else if (data.operation === "remove") {
      this.inflight.delete(String(data.id));
    }
    this.emit("inflight", this.inflight);
  }

  // -- polling fallback ------------------------------------------------------

  /** After an action (load/unload): refresh now unless events will tell us. */
  refreshSoon() {
    if (this.mode !== "live") this.schedulePoll(0);
  }

  schedulePoll(delay) {
    clearTimeout(this.pollTimer);
    this.pollTimer = setTimeout(() => this.poll(), delay);
  }

  async poll() {
    if (this.mode === "live") return;
    if (document.hidden) { this.schedulePoll(POLL_RUNNING_MS); return; }
    try {
      const body = await getJSON("/running");
      const next = new Map();
      for (const r of body?.running || []) next.set(r.model, r.state);
      this.status = next;
      this.emit("status", this.status);
      if (this.mode !== "live") this.setMode("polling");
      if (Date.now() - this.lastModelsAt > POLL_MODELS_MS) this.refreshModels();
    } catch (err) {
      if (!(err instanceof NotAvailable) && this.mode !== "live") this.setMode("offline");
    }
    if (this.mode !== "live") this.schedulePoll(POLL_RUNNING_MS);
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export const store = new Store();
