// Playground: streamed chat through /v1/chat/completions.

import { apiFetch, requestLogin } from "../api.js";
import { fmtNumber, h, replace } from "../dom.js";
import { isAbort, readSSE } from "../sse.js";
import { store } from "../store.js";

const STORE_KEY = "llamaswap.playground";

function errorMessage(json, fallback) {
  const e = json?.error;
  if (typeof e === "string") return e;
  return e?.message || json?.message || fallback;
}

export function mount(main, { params }) {
  const saved = (() => { try { return JSON.parse(sessionStorage.getItem(STORE_KEY) || "{}"); } catch { return {}; } })();
  let model = params.get("model") || saved.model || "";
  let history = [];            // [{role, content}]
  let controller = null;

  const modelSelect = h("select#pg-model", { "aria-label": "Model", onchange: () => { model = modelSelect.value; save(); } });
  const maxTokens = h("input", { type: "number", min: 1, max: 32768, value: saved.maxTokens || 256, "aria-label": "Max tokens", style: { width: "6.5em" } });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: 0.1, value: saved.temperature ?? 0.7, "aria-label": "Temperature", style: { width: "5em" } });
  const system = h("textarea", { rows: 2, placeholder: "System prompt (optional)", "aria-label": "System prompt" }, saved.system || "");
  const chat = h("div.chat#chat", { "aria-live": "polite" });
  const input = h("textarea#pg-input", { rows: 3, placeholder: "Say something… (Enter to send, Shift+Enter for a new line)", "aria-label": "Message",
    onkeydown: (e) => { if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); } } });
  const sendButton = h("button.primary#pg-send", { type: "button", onclick: () => send() }, "Send");
  const stopButton = h("button#pg-stop", { type: "button", disabled: true, onclick: () => controller?.abort() }, "Stop");
  const clearButton = h("button", { type: "button", onclick: () => { if (!controller) { history = []; replace(chat, intro()); } } }, "Clear");

  replace(main,
    h("div.page-head", h("h1", "Playground"), h("label.small.muted", "Model", modelSelect),
      h("label.small.muted", "max tokens", maxTokens), h("label.small.muted", "temperature", temperature), clearButton),
    h("details.panel", h("summary.small.muted", "System prompt"), system),
    chat,
    h("div.composer", input, h("div.buttons", sendButton, stopButton)));
  replace(chat, intro());

  function intro() {
    return h("p.empty", "Pick a model and send a message. Replies stream in as they are generated; a model that is not running is started first.");
  }

  function save() {
    try {
      sessionStorage.setItem(STORE_KEY, JSON.stringify({ model, maxTokens: Number(maxTokens.value), temperature: Number(temperature.value), system: system.value }));
    } catch { /* ignore */ }
  }

  function fillModels() {
    const choices = store.models.map((m) => m.id);
    if (model && !choices.includes(model)) choices.unshift(model);
    if (!model && choices.length) model = choices[0];
    replace(modelSelect, choices.length
      ? choices.map((id) => h("option", { value: id, selected: id === model }, id))
      : h("option", { value: "" }, "no models"));
  }

  async function send() {
    const text = input.value.trim();
    if (!text || controller || !model) return;
    save();
    if (chat.querySelector(".empty")) chat.replaceChildren();
    input.value = "";
    history.push({ role: "user", content: text });
    chat.append(h("div.msg.user", h("div.who", "you"), h("div.text", text)));

    const reasoningPre = h("pre");
    const reasoning = h("details", { hidden: true }, h("summary.small.muted", "reasoning / loading"), reasoningPre);
    const out = h("div.text.caret");
    const foot = h("div.foot");
    const bubble = h("div.msg.assistant", { dataset: { state: "streaming" } }, h("div.who", model), reasoning, out, foot);
    chat.append(bubble);
    bubble.scrollIntoView({ block: "end" });

    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    messages.push(...history);
    const body = { model, messages, stream: true, stream_options: { include_usage: true } };
    const mt = Number(maxTokens.value);
    if (mt > 0) body.max_tokens = mt;
    const temp = Number(temperature.value);
    if (Number.isFinite(temp)) body.temperature = temp;

    controller = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    const started = performance.now();
    let firstTokenAt = null;
    let content = "";
    let chunks = 0;
    let timings = null;
    let usage = null;
    let error = null;
    try {
      let res;
      for (let attempt = 0; attempt < 3; attempt++) {
        res = await apiFetch("/v1/chat/completions", {
          method: "POST", signal: controller.signal,
          headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
          body: JSON.stringify(body),
        });
        if (res.status !== 401) break;
        await requestLogin(attempt > 0);
      }
      if (!res.ok) {
        const t = await res.text();
        let j = null;
        try { j = JSON.parse(t); } catch { /* text */ }
        throw new Error(errorMessage(j, t.trim() || `HTTP ${res.status}`));
      }
      const ctype = res.headers.get("content-type") || "";
      if (!ctype.includes("text/event-stream")) {
        const j = await res.json();
        content = j?.choices?.[0]?.message?.content ?? "";
        out.textContent = content;
        timings = j?.timings || null;
        usage = j?.usage || null;
      } else {
        await readSSE(res, (ev) => {
          if (ev.data === "[DONE]") return;
          let j;
          try { j = JSON.parse(ev.data); } catch { return; }
          if (j.error) { error = errorMessage(j, "error"); return; }
          if (j.timings) timings = j.timings;
          if (j.usage) usage = j.usage;
          const delta = j.choices?.[0]?.delta || {};
          if (typeof delta.reasoning_content === "string" && delta.reasoning_content) {
            reasoning.hidden = false;
            if (!content) reasoning.open = true;
            reasoningPre.textContent += delta.reasoning_content;
            reasoningPre.scrollTop = reasoningPre.scrollHeight;
          }
          if (typeof delta.content === "string" && delta.content) {
            if (firstTokenAt === null) { firstTokenAt = performance.now(); reasoning.open = false; }
            chunks++;
            content += delta.content;
            out.textContent = content;
          }
        });
      }
    } catch (err) {
      error = isAbort(err) ? "stopped" : err.message;
    } finally {
      controller = null;
      sendButton.disabled = false;
      stopButton.disabled = true;
      out.classList.remove("caret");
    }
    const elapsed = (performance.now() - started) / 1000;
    if (content) history.push({ role: "assistant", content });
    else history.pop();
    const figures = [];
    if (timings && timings.predicted_per_second > 0) {
      figures.push(`${fmtNumber(timings.predicted_per_second, 1)} tokens/s`);
      if (timings.prompt_per_second > 0) figures.push(`prompt ${fmtNumber(timings.prompt_per_second, 1)} t/s`);
      if (timings.predicted_n) figures.push(`${timings.predicted_n} tokens`);
    } else if (chunks) {
      const n = usage?.completion_tokens || chunks;
      const genSeconds = firstTokenAt ? (performance.now() - firstTokenAt) / 1000 : elapsed;
      figures.push(`≈${fmtNumber(n / Math.max(genSeconds, 0.001), 1)} tokens/s (counted)`, `${n} tokens`);
    }
    figures.push(`${elapsed.toFixed(2)} s total`);
    replace(foot, figures.join(" · "));
    bubble.dataset.state = error ? "error" : "done";
    if (error) bubble.append(h("p.error", error === "stopped" ? "Stopped." : `Error: ${error}`));
    if (!content && !error) out.textContent = "(empty reply)";
    bubble.scrollIntoView({ block: "end" });
    input.focus();
  }

  const offs = [store.on("models", fillModels)];
  fillModels();
  return () => {
    offs.forEach((off) => off());
    controller?.abort();
  };
}
