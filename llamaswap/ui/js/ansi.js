// ANSI escape codes (SGR colours and styles) to DOM spans.  Other control
// sequences (cursor moves, erase, OSC titles) are dropped.  The renderer
// keeps its style state across calls, as a terminal would across lines.

// CSI ... final byte, or OSC ... BEL/ST, or a lone two-byte escape.
const ESCAPE = /\x1b\[([0-9;:?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;

function color256(n) {
  if (n < 16) return `var(--ansi-${n})`;
  if (n < 232) {
    const i = n - 16;
    const steps = [0, 95, 135, 175, 215, 255];
    return `rgb(${steps[Math.floor(i / 36)]},${steps[Math.floor(i / 6) % 6]},${steps[i % 6]})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g},${g},${g})`;
}

export class AnsiRenderer {
  constructor() { this.reset(); }

  reset() {
    this.fg = null;
    this.bg = null;
    this.bold = false;
    this.dim = false;
    this.italic = false;
    this.underline = false;
    this.strike = false;
    this.inverse = false;
  }

  applySGR(params) {
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) this.reset();
      else if (c === 1) this.bold = true;
      else if (c === 2) this.dim = true;
      else if (c === 3) this.italic = true;
      else if (c === 4) this.underline = true;
      else if (c === 7) this.inverse = true;
      else if (c === 9) this.strike = true;
      else if (c === 22) { this.bold = false; this.dim = false; }
      else if (c === 23) this.italic = false;
      else if (c === 24) this.underline = false;
      else if (c === 27) this.inverse = false;
      else if (c === 29) this.strike = false;
      else if (c >= 30 && c <= 37) this.fg = `var(--ansi-${c - 30})`;
      else if (c === 39) this.fg = null;
      else if (c >= 40 && c <= 47) this.bg = `var(--ansi-${c - 40})`;
      else if (c === 49) this.bg = null;
      else if (c >= 90 && c <= 97) this.fg = `var(--ansi-${c - 90 + 8})`;
      else if (c >= 100 && c <= 107) this.bg = `var(--ansi-${c - 100 + 8})`;
      else if (c === 38 || c === 48) {
        let value = null;
        if (codes[i + 1] === 5 && codes.length > i + 2) {
          value = color256(codes[i + 2] & 255);
          i += 2;
        } else if (codes[i + 1] === 2 && codes.length > i + 4) {
          value = `rgb(${codes[i + 2] & 255},${codes[i + 3] & 255},${codes[i + 4] & 255})`;
          i += 4;
        } else {
          break;
        }
        if (c === 38) this.fg = value; else this.bg = value;
      }
    }
  }

  styled() {
    return this.fg || this.bg || this.bold || this.dim || this.italic || this.underline || this.strike || this.inverse;
  }

  span(text) {
    if (!this.styled()) return document.createTextNode(text);
    const el = document.createElement("span");
    el.textContent = text;
    const fg = this.inverse ? (this.bg || "var(--bg)") : this.fg;
    const bg = this.inverse ? (this.fg || "var(--text)") : this.bg;
    if (fg) el.style.color = fg;
    if (bg) el.style.backgroundColor = bg;
    if (this.bold) el.classList.add("ansi-bold");
    if (this.dim) el.classList.add("ansi-dim");
    if (this.italic) el.classList.add("ansi-italic");
    if (this.underline) el.classList.add("ansi-underline");
    if (this.strike) el.classList.add("ansi-strike");
    return el;
  }

  /** Nodes for one piece of text (usually a line, without its newline). */
  render(text) {
    const nodes = [];
    let last = 0;
    ESCAPE.lastIndex = 0;
    for (let m = ESCAPE.exec(text); m; m = ESCAPE.exec(text)) {
      if (m.index > last) nodes.push(this.span(text.slice(last, m.index)));
      if (m[2] === "m") this.applySGR(m[1]);
      last = ESCAPE.lastIndex;
    }
    if (last < text.length) nodes.push(this.span(text.slice(last)));
    return nodes;
  }
}

/** The text with every escape sequence removed (for filtering). */
export function stripAnsi(text) {
  return text.replace(ESCAPE, "");
}
