// The capture viewer: /api/captures/{id} with bodies decoded and formatted.

import { getJSON, NotAvailable } from "./api.js";
import { fmtBytes, h, replace } from "./dom.js";
import { SSEParser } from "./sse.js";

function decodeBase64(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

/** Bytes → {text} when valid UTF-8, else {binary}. */
function asText(bytes) {
  try {
    return { text: new TextDecoder("utf-8", { fatal: true }).decode(bytes) };
  } catch {
    return { binary: bytes };
  }
}

function headerValue(headers, name) {
  if (!headers) return "";
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name);
  const v = key ? headers[key] : "";
  return Array.isArray(v) ? v[0] : (v || "");
}

function pretty(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return null; }
}

function headersView(headers) {
  const entries = Object.entries(headers || {}).sort(([a], [b]) => a.localeCompare(b));
  if (!entries.length) return h("p.muted.small", "none captured");
  return h("dl.kv", entries.map(([k, v]) => [h("dt", k), h("dd", Array.isArray(v) ? v.join(", ") : String(v))]));
}

function hexPreview(bytes) {
  const n = Math.min(bytes.length, 256);
  const lines = [];
  for (let i = 0; i < n; i += 16) {
    const row = Array.from(bytes.slice(i, Math.min(i + 16, n)));
    lines.push(`${i.toString(16).padStart(6, "0")}  ${row.map((b) => b.toString(16).padStart(2, "0")).join(" ")}`);
  }
  return lines.join("\n") + (bytes.length > n ? "\n…" : "");
}

/** The assembled assistant text of an OpenAI-style stream, if any. */
function assemble(events) {
  let content = "";
  let reasoning = "";
  for (const ev of events) {
    const delta = ev.json?.choices?.[0]?.delta || {};
    const text = ev.json?.choices?.[0]?.text;
    if (typeof delta.content === "string") content += delta.content;
    if (typeof delta.reasoning_content === "string") reasoning += delta.reasoning_content;
    if (typeof text === "string") content += text;
    if (typeof ev.json?.content === "string") content += ev.json.content;
    if (ev.json?.type === "content_block_delta" && typeof ev.json?.delta?.text === "string") content += ev.json.delta.text;
  }
  return { content, reasoning };
}

function bodyView(b64, headers, label) {
  if (b64 === null || b64 === undefined) return h("p.muted.small", `${label}: not captured`);
  const bytes = decodeBase64(b64);
  const ctype = headerValue(headers, "content-type").toLowerCase();
  const decoded = asText(bytes);
  const title = h("h3", `${label} `, h("span.muted.small", `${ctype || "no content type"} · ${fmtBytes(bytes.length)}`));
  if (decoded.binary) {
    return h("section", title, h("p.muted.small", "Binary body; first bytes:"), h("pre.code", hexPreview(decoded.binary)));
  }
  const text = decoded.text;
  const looksSSE = ctype.includes("text/event-stream") || /^(data|event):/m.test(text.slice(0, 200));
  if (looksSSE) {
    const parser = new SSEParser();
    const events = [...parser.feed(text), ...parser.end()].map((ev, i) => {
      let json = null;
      try { json = JSON.parse(ev.data); } catch { /* [DONE] or text */ }
      return { ...ev, n: i + 1, json };
    });
    const { content, reasoning } = assemble(events);
    const eventsList = h("div.events", events.map((ev) => h("div.event",
      h("div.n", `#${ev.n}${ev.event && ev.event !== "message" ? ` · ${ev.event}` : ""}`),
      h("pre", ev.json ? JSON.stringify(ev.json, null, 2) : ev.data))));
    const assembled = h("div", { hidden: true },
      reasoning ? [h("h3", "reasoning_content"), h("pre.code", reasoning)] : null,
      h("h3", "content"), h("pre.code", content || "(no text content)"));
    const raw = h("pre.code", { hidden: true }, text);
    const views = [eventsList, assembled, raw];
    const buttons = ["Events", "Text", "Raw"].map((name, i) => h("button", { type: "button", "aria-pressed": String(i === 0),
      onclick: () => {
        views.forEach((v, j) => { v.hidden = j !== i; });
        buttons.forEach((b, j) => b.setAttribute("aria-pressed", String(j === i)));
      } }, name));
    return h("section", title,
      h("div.toolbar", h("span.seg", buttons), h("span.muted.small", `${events.length} events`)),
      eventsList, assembled, raw);
  }
  const formatted = pretty(text);
  return h("section", title, h("pre.code", formatted ?? text));
}

/** Open the viewer dialog for capture `id`. */
export async function openCapture(id) {
  let dialog = document.getElementById("capture-dialog");
  if (!dialog) {
    dialog = h("dialog#capture-dialog", { "aria-labelledby": "capture-title" });
    dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
    document.body.append(dialog);
  }
  const body = h("div.dlg-body", h("p.muted", "Loading…"));
  replace(dialog,
    h("div.dlg-head", h("h2#capture-title", `Capture #${id}`),
      h("button", { type: "button", onclick: () => dialog.close(), "aria-label": "Close" }, "Close")),
    body);
  if (!dialog.open) dialog.showModal();
  try {
    const cap = await getJSON(`/api/captures/${encodeURIComponent(id)}`);
    replace(body,
      h("p", h("code", cap.req_path || "")),
      h("h3", "Request headers"), headersView(cap.req_headers),
      bodyView(cap.req_body, cap.req_headers, "Request body"),
      h("h3", "Response headers"), headersView(cap.resp_headers),
      bodyView(cap.resp_body, cap.resp_headers, "Response body"));
  } catch (err) {
    replace(body, err instanceof NotAvailable
      ? h("p.note", "Captures are not available on this server.")
      : h("p.note.bad", `Could not load capture #${id}: ${err.message}`));
  }
  return dialog;
}
