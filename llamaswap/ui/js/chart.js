// A small two-series line chart in inline SVG (no library).

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/**
 * points: [{t: Date ms, a: number|null, b: number|null}], sorted by t.
 * Series a and b share the x axis; each has its own y scale (left/right)
 * because prompt speeds are often 10x generation speeds.
 */
export function lineChart(points, { labelA = "a", labelB = "b", width = 720, height = 220 } = {}) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${labelA} and ${labelB} over time` });
  const pad = { l: 44, r: 44, t: 10, b: 24 };
  const w = width - pad.l - pad.r;
  const hgt = height - pad.t - pad.b;
  const as = points.filter((p) => p.a !== null && p.a > 0);
  const bs = points.filter((p) => p.b !== null && p.b > 0);
  if (!points.length || (!as.length && !bs.length)) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "label" }, "no speed data yet"));
    return root;
  }
  const t0 = points[0].t;
  const t1 = points[points.length - 1].t;
  const span = Math.max(t1 - t0, 1);
  // With one point or identical times, spread points evenly instead.
  const useIndex = t1 === t0;
  const x = (p, i) => pad.l + (useIndex ? (points.length === 1 ? w / 2 : (i / (points.length - 1)) * w) : ((p.t - t0) / span) * w);
  const maxA = niceMax(Math.max(0, ...as.map((p) => p.a)));
  const maxB = niceMax(Math.max(0, ...bs.map((p) => p.b)));
  const ya = (v) => pad.t + hgt - (v / maxA) * hgt;
  const yb = (v) => pad.t + hgt - (v / maxB) * hgt;

  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (hgt * i) / 4;
    root.append(svg("line", { x1: pad.l, x2: pad.l + w, y1: y, y2: y, class: "axis" }));
    root.append(svg("text", { x: pad.l - 6, y: y + 3, "text-anchor": "end", class: "label" }, fmt(maxA * (1 - i / 4))));
    root.append(svg("text", { x: pad.l + w + 6, y: y + 3, class: "label" }, fmt(maxB * (1 - i / 4))));
  }
  const timeLabel = (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  root.append(svg("text", { x: pad.l, y: height - 6, class: "label" }, timeLabel(t0)));
  root.append(svg("text", { x: pad.l + w, y: height - 6, "text-anchor": "end", class: "label" }, timeLabel(t1)));

  const series = (key, y, cls, dot) => {
    const idx = points.map((p, i) => [p, i]).filter(([p]) => p[key] !== null && p[key] > 0);
    if (!idx.length) return;
    const d = idx.map(([p, i], n) => `${n ? "L" : "M"}${x(p, i).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, class: cls, "vector-effect": "non-scaling-stroke" }));
    if (idx.length <= 60) {
      for (const [p, i] of idx) {
        const c = svg("circle", { cx: x(p, i).toFixed(1), cy: y(p[key]).toFixed(1), r: 2.5, class: dot });
        c.append(svg("title", {}, `${fmt(p[key])} t/s`));
        root.append(c);
      }
    }
  };
  series("b", yb, "s2", "d2");
  series("a", ya, "s1", "d1");
  return root;
}

function fmt(v) {
  if (v >= 1000) return `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k`;
  return v >= 10 ? v.toFixed(0) : v.toFixed(1);
}
