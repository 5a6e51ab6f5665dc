// Server-sent events over fetch(): EventSource cannot send Authorization.

/** Parse SSE text into events; feed() returns the events completed so far. */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
    this.id = "";
  }

  feed(text) {
    this.buffer += text;
    const out = [];
    let start = 0;
    for (;;) {
      const nl = this.buffer.indexOf("\n", start);
      if (nl < 0) break;
      let line = this.buffer.slice(start, nl);
      start = nl + 1;
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (this.data.length) out.push({ event: this.event || "message", data: this.data.join("\n"), id: this.id });
        this.event = "";
        this.data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id") this.id = value;
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }

  /** Whatever is left when the stream ends (a last event without a blank line). */
  end() {
    const out = this.feed("\n\n");
    this.buffer = "";
    return out;
  }
}

/** Read a Response body as text chunks; calls onText(chunk) for each. */
export async function readText(response, onText) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const text = decoder.decode(value, { stream: true });
      if (text) onText(text);
    }
    const rest = decoder.decode();
    if (rest) onText(rest);
  } finally {
    reader.releaseLock?.();
  }
}

/** Read a Response as SSE; calls onEvent({event, data, id}) for each. */
export async function readSSE(response, onEvent) {
  const parser = new SSEParser();
  await readText(response, (text) => {
    for (const ev of parser.feed(text)) onEvent(ev);
  });
  for (const ev of parser.end()) onEvent(ev);
}

/** True for the errors fetch() raises when we abort it ourselves. */
export function isAbort(err) {
  return err && (err.name === "AbortError" || err.name === "TimeoutError");
}
