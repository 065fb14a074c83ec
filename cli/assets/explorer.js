// attn explore: the page's script. It reads the tokens (JSON) and the matrices (base64 of one zlib
// stream) that `attn explore` put in the page, and draws them: no network, no libraries.
//
// Data, per stored layer and head (cli/explorer_page.py writes it):
//   codes       uint16, the lower triangle row by row: round((rowMax - score) * step), MASKED = hidden key
//   row_max     float32 per query row: the row's largest score
//   value_norms float32 per source: ‖v_j·W_O^h‖
// Weights are the softmax of the stored scores, computed here in float64.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const VIEWS = ["weights", "scores", "value-norms"];
  const VIEW_NAMES = { weights: "weight", scores: "score", "value-norms": "value norm" };
  const SINK_ONLY = 0.01; // as cli/render.py: under this share off the first token, skip-first has little to renormalise

  // --- reading the data ------------------------------------------------------------------------

  function fromBase64(text) {
    if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(text);
    const bin = atob(text);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  function section(buf, s) {
    if (s.type === "float32") return new Float32Array(buf.buffer, buf.byteOffset + s.offset, s.count);
    // uint16 stored as two byte planes (all low bytes, then all high bytes): interleave them again.
    const out = new Uint16Array(s.count);
    const lo = buf.subarray(s.offset, s.offset + s.count);
    const hi = buf.subarray(s.offset + s.count, s.offset + 2 * s.count);
    for (let k = 0; k < s.count; k++) out[k] = lo[k] | (hi[k] << 8);
    return out;
  }

  class Attention {
    constructor(meta, buf) {
      const byName = {};
      for (const s of meta.sections) byName[s.name] = section(buf, s);
      this.T = meta.ids.length;
      this.H = meta.n_heads;
      this.group = meta.n_heads / meta.n_kv_heads;
      this.layers = meta.layers;
      this.slot = new Map(meta.layers.map((layer, n) => [layer, n]));
      this.tri = (this.T * (this.T + 1)) / 2;
      this.codes = byName.codes;
      this.rowMax = byName.row_max;
      this.norms = byName.value_norms;
      this.step = meta.step;
      this.MASKED = meta.masked;
      // exp(-code / step): a row's weights are these over their sum (the row's maximum score is 0 here).
      this.E = new Float64Array(65536);
      for (let c = 0; c < 65536; c++) this.E[c] = Math.exp(-c / this.step);
      this.E[this.MASKED] = 0;
      // Per row: Z = the sum over every key, R = the sum over every key but the first (--skip-first).
      const rows = this.layers.length * this.H * this.T;
      this.Z = new Float64Array(rows);
      this.R = new Float64Array(rows);
      const E = this.E, codes = this.codes;
      for (let b = 0; b < this.layers.length * this.H; b++) {
        let at = b * this.tri;
        for (let i = 0; i < this.T; i++) {
          const first = E[codes[at]];
          let rest = 0;
          for (let j = 1; j <= i; j++) rest += E[codes[at + j]];
          this.Z[b * this.T + i] = first + rest;
          this.R[b * this.T + i] = rest;
          at += i + 1;
        }
      }
    }

    block(layer, head) {
      const n = this.slot.get(layer);
      return n === undefined ? -1 : n * this.H + head;
    }

    code(b, i, j) {
      return this.codes[b * this.tri + (i * (i + 1)) / 2 + j];
    }

    masked(b, i, j) {
      return j > i || this.code(b, i, j) === this.MASKED;
    }

    // The value the CLI prints for query i, key j; NaN where the mask hides the key or skip leaves it out.
    value(view, skip, b, i, j) {
      if (j > i || (skip && j === 0)) return NaN;
      const c = this.code(b, i, j);
      if (c === this.MASKED) return NaN;
      if (view === "scores") return this.rowMax[b * this.T + i] - c / this.step;
      const r = b * this.T + i;
      const den = skip ? this.R[r] : this.Z[r];
      const w = den > 0 ? this.E[c] / den : 0;
      return view === "weights" ? w : w * this.norms[b * this.T + j];
    }

    // Row i of `value` into out[0..i], in one pass over the row's codes (the thumbnails and matrices read every row).
    row(view, skip, b, i, out) {
      const base = b * this.tri + (i * (i + 1)) / 2, r = b * this.T + i;
      const codes = this.codes, E = this.E, MASKED = this.MASKED;
      const top = this.rowMax[r], step = this.step;
      const den = skip ? this.R[r] : this.Z[r];
      const norms = this.norms, nb = b * this.T;
      for (let j = 0; j <= i; j++) {
        const c = codes[base + j];
        if (c === MASKED || (skip && j === 0)) out[j] = NaN;
        else if (view === "scores") out[j] = top - c / step;
        else {
          const w = den > 0 ? E[c] / den : 0;
          out[j] = view === "weights" ? w : w * norms[nb + j];
        }
      }
    }

    // The share of query row i on the first token (raw, whatever skip says); NaN if the mask hides it.
    first(b, i) {
      const c = this.code(b, i, 0);
      return c === this.MASKED ? NaN : this.E[c] / this.Z[b * this.T + i];
    }
  }

  // --- text and numbers ------------------------------------------------------------------------

  function fmt(v, view) {
    if (!Number.isFinite(v)) return "masked";
    if (view === "scores") return v.toFixed(3);
    return v === 0 ? "0" : v.toPrecision(4);
  }

  function short(v) {
    if (!Number.isFinite(v)) return "–";
    const s = v.toFixed(2);
    return s.startsWith("0.") ? s.slice(1) : s;
  }

  // Tokens matching `text`, as `attn inspect --find` matches them (cli/tokens.py, match_text): a token
  // whose text, surrounding whitespace ignored, equals it; failing that, ignoring case; failing that,
  // every run of tokens whose bytes cover the text's bytes.
  function matchSpans(words, raws, text) {
    const needle = text.trim() || text;
    const key = text.trim() ? (s) => s.trim() : (s) => s;
    for (const same of [(s) => key(s) === needle, (s) => key(s).toLowerCase() === needle.toLowerCase()]) {
      const hits = [];
      words.forEach((s, i) => { if (s && same(s)) hits.push([i]); });
      if (hits.length) return hits;
    }
    const target = new TextEncoder().encode(needle);
    const starts = [];
    let total = 0;
    for (const r of raws) { starts.push(total); total += r.length; }
    const joined = new Uint8Array(total);
    raws.forEach((r, i) => joined.set(r, starts[i]));
    const spans = [];
    for (let k = 0; target.length && k + target.length <= total; k++) {
      let n = 0;
      while (n < target.length && joined[k + n] === target[n]) n++;
      if (n < target.length) continue;
      const end = k + target.length, span = [];
      raws.forEach((r, i) => { if (starts[i] < end && starts[i] + r.length > k) span.push(i); });
      spans.push(span);
      k = end - 1;
    }
    return spans;
  }

  function hexBytes(hex) {
    const out = new Uint8Array(hex.length / 2);
    for (let k = 0; k < out.length; k++) out[k] = parseInt(hex.slice(2 * k, 2 * k + 2), 16);
    return out;
  }

  // --- colours ---------------------------------------------------------------------------------

  function rgb(hex) {
    const h = hex.trim().replace("#", "");
    return [0, 2, 4].map((k) => parseInt(h.slice(k, k + 2), 16));
  }

  class Palette {
    constructor() { this.read(); }

    read() {
      const css = getComputedStyle(document.documentElement);
      const v = (name) => css.getPropertyValue(name).trim();
      const stops = [rgb(v("--scale0")), rgb(v("--scale1")), rgb(v("--scale2"))];
      this.rgb = [];
      this.css = [];
      this.ink = [];
      for (let n = 0; n < 256; n++) {
        const t = n / 255;
        const [a, b, f] = t < 0.5 ? [stops[0], stops[1], t * 2] : [stops[1], stops[2], t * 2 - 1];
        const c = a.map((x, k) => Math.round(x + (b[k] - x) * f));
        this.rgb.push(c);
        this.css.push(`rgb(${c[0]},${c[1]},${c[2]})`);
        const lum = 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
        this.ink.push(lum < 128 ? "#ffffff" : "#111111");
      }
      this.masked = rgb(v("--masked"));
      this.masked2 = rgb(v("--masked2"));
      this.leftout = rgb(v("--leftout"));
      this.accent = v("--accent");
      this.select = v("--select");
      this.fg = v("--fg");
      this.muted = v("--muted");
      this.bg = v("--bg");
    }

    // A diagonal hatch for masked cells, as a fill style of `ctx`.
    hatch(ctx, scale) {
      const n = Math.max(6, Math.round(6 * scale));
      const tile = document.createElement("canvas");
      tile.width = tile.height = n;
      const t = tile.getContext("2d");
      const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
      t.fillStyle = css(this.masked2);
      t.fillRect(0, 0, n, n);
      t.strokeStyle = css(this.masked);
      t.lineWidth = n / 3;
      t.beginPath();
      for (const o of [-n, 0, n]) { t.moveTo(o, n); t.lineTo(o + n, 0); }
      t.stroke();
      return ctx.createPattern(tile, "repeat");
    }

    index(level) {
      return Math.max(0, Math.min(255, Math.round(level * 255)));
    }
  }

  // Levels 0..1 of a run of values: weights as they are, scores from min to max, value norms from 0 to max.
  function scaler(values, view) {
    if (view === "weights") return (x) => Math.max(0, Math.min(1, x));
    let lo = Infinity, hi = -Infinity;
    for (const x of values) {
      if (Number.isFinite(x)) { if (x < lo) lo = x; if (x > hi) hi = x; }
    }
    if (view === "value-norms") lo = 0;
    const span = hi - lo;
    return (x) => (span > 0 ? (x - lo) / span : 1);
  }

  // --- the explorer ----------------------------------------------------------------------------

  class Explorer {
    constructor(meta, att) {
      this.meta = meta;
      this.att = att;
      this.T = att.T;
      this.H = att.H;
      this.palette = new Palette();
      this.state = {
        t: meta.query,
        focus: [meta.layers[0], 0],
        heads: [[meta.layers[0], 0]],
        dir: "from",
        view: "weights",
        skip: false,
        find: "",
        big: false,
        theme: "auto",
      };
      this.preview = null; // a hovered token, shown until the pointer leaves the strip
      this.locked = false; // a clicked token: hovering no longer previews
      this.thumbs = null; // per block, an offscreen canvas of the current view
      this.matrixImage = null;
      this.readFragment();
      this.applyTheme();
      this.buildStatic();
      this.buildStrip();
      this.bind();
      this.layout();
      this.renderAll();
      this.writeFragment(); // the address names the view from the start, ready to be shared
    }

    // --- state <-> URL fragment ---

    readFragment() {
      const p = new URLSearchParams(location.hash.slice(1));
      const s = this.state, T = this.T;
      const int = (x) => (/^-?\d+$/.test(x || "") ? parseInt(x, 10) : null);
      const head = (x) => {
        const m = /^(\d+)\.(\d+)$/.exec(x || "");
        if (!m) return null;
        const pair = [parseInt(m[1], 10), parseInt(m[2], 10)];
        return this.att.block(pair[0], pair[1]) >= 0 && pair[1] < this.H ? pair : null;
      };
      // What the fragment leaves out (or names wrongly) takes the page's default: a link names the whole view.
      const t = int(p.get("t"));
      s.t = t !== null && t >= 0 && t < T ? t : this.meta.query;
      s.focus = head(p.get("h")) || [this.meta.layers[0], 0];
      const hs = (p.get("heads") || "").split(/[ +]/).map(head).filter(Boolean);
      s.heads = hs.length ? hs : [s.focus];
      s.dir = p.get("dir") === "to" ? "to" : "from";
      s.view = VIEWS.includes(p.get("view")) ? p.get("view") : "weights";
      s.skip = p.get("skip") === "1";
      s.find = p.get("find") || "";
      s.big = p.get("big") === "1";
      s.theme = ["light", "dark"].includes(p.get("theme")) ? p.get("theme") : "auto";
    }

    writeFragment() {
      const s = this.state;
      const p = new URLSearchParams();
      p.set("t", s.t);
      p.set("h", s.focus.join("."));
      if (s.heads.length > 1 || s.heads[0].join(".") !== s.focus.join(".")) p.set("heads", s.heads.map((h) => h.join(".")).join(" "));
      if (s.dir !== "from") p.set("dir", s.dir);
      if (s.view !== "weights") p.set("view", s.view);
      if (s.skip) p.set("skip", "1");
      if (s.find) p.set("find", s.find);
      if (s.big) p.set("big", "1");
      if (s.theme !== "auto") p.set("theme", s.theme);
      const hash = "#" + p.toString();
      if (location.hash !== hash) history.replaceState(null, "", hash);
    }

    // --- one-time DOM ---

    buildStatic() {
      const m = this.meta;
      $("title").textContent = `attention of ${m.model}`;
      const gen = m.generated ? ` (${m.prompt_tokens} prompt + ${m.generated.tokens} generated)` : "";
      $("summary").textContent =
        `${this.T} tokens${gen} · ${m.n_layers} layers × ${m.n_heads} heads (${m.n_kv_heads} KV heads) · stored: ${m.stored}`;
      $("precision").textContent = `Precision: ${m.precision}.`;
    }

    buildStrip() {
      const strip = $("strip");
      const m = this.meta;
      const frag = document.createDocumentFragment();
      this.spans = [];
      for (let i = 0; i < this.T; i++) {
        if (m.generated && i === m.prompt_tokens) {
          const sep = document.createElement("span");
          sep.className = "sep";
          sep.textContent = "generated ▸";
          frag.appendChild(sep);
        }
        const el = document.createElement("span");
        el.className = i >= m.prompt_tokens ? "tok gen" : "tok";
        el.textContent = m.labels[i];
        el.dataset.i = i;
        frag.appendChild(el);
        this.spans.push(el);
      }
      strip.appendChild(frag);
    }

    bind() {
      const strip = $("strip");
      // Hovering previews a token as the query (bertviz's head view) until a click locks one; a
      // locked token stays, and hovering then reads values (the tooltips), until clicked again.
      strip.addEventListener("mouseover", (e) => {
        const i = e.target.dataset ? e.target.dataset.i : undefined;
        if (!this.locked && i !== undefined && +i !== this.preview) { this.preview = +i; this.renderToken(); }
      });
      strip.addEventListener("mouseleave", () => {
        if (this.preview !== null) { this.preview = null; this.renderToken(); }
      });
      strip.addEventListener("click", (e) => {
        const i = e.target.dataset ? e.target.dataset.i : undefined;
        if (i === undefined) return;
        if (this.locked && +i === this.state.t) { this.locked = false; this.renderToken(); } // unlock: hovering previews again
        else this.setToken(+i);
      });
      for (const [id, key] of [["view", "view"], ["dir", "dir"]]) {
        $(id).addEventListener("click", (e) => {
          const v = e.target.dataset ? e.target.dataset.v : undefined;
          if (v) this.set({ [key]: v });
        });
      }
      $("skip").addEventListener("change", (e) => this.set({ skip: e.target.checked }));
      $("layer-mean").addEventListener("click", () => this.layerMean());
      $("find").addEventListener("input", (e) => this.set({ find: e.target.value }));
      $("big").addEventListener("click", () => this.set({ big: !this.state.big }));
      $("theme").addEventListener("click", () => {
        const next = { auto: "light", light: "dark", dark: "auto" }[this.state.theme];
        this.set({ theme: next });
      });
      const grid = $("grid");
      grid.addEventListener("click", (e) => {
        const hit = this.gridHit(e);
        if (hit) this.clickHead(hit, e.shiftKey || e.ctrlKey || e.metaKey);
      });
      grid.addEventListener("dblclick", (e) => {
        const hit = this.gridHit(e);
        if (hit) this.set({ focus: hit, heads: [hit], big: true });
      });
      grid.addEventListener("mousemove", (e) => {
        const hit = this.gridHit(e);
        grid.title = hit ? `layer ${hit[0]} head ${hit[1]} (KV head ${Math.floor(hit[1] / this.att.group)}): click to focus, shift+click to add to the mean, double-click for the matrix` : "";
      });
      const mat = $("matrix");
      mat.addEventListener("mousemove", (e) => this.hoverMatrix(e));
      mat.addEventListener("mouseleave", () => this.renderReadout());
      mat.addEventListener("click", (e) => {
        const cell = this.matrixCell(e);
        if (cell) this.setToken(this.state.dir === "from" ? cell[0] : cell[1]);
      });
      $("ranking").addEventListener("click", (e) => {
        const b = e.target.closest("button");
        if (b) { const h = [+b.dataset.l, +b.dataset.h]; this.set({ focus: h, heads: [h] }); }
      });
      document.addEventListener("keydown", (e) => this.key(e));
      window.addEventListener("hashchange", () => {
        const big = this.state.big;
        this.readFragment();
        this.applyTheme();
        if (this.state.big !== big) this.layout();
        this.thumbs = null;
        this.matrixImage = null;
        this.renderAll();
      });
      window.addEventListener("resize", () => { this.layout(); this.renderAll(); });
      matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.set({}));
    }

    key(e) {
      const tag = e.target.tagName;
      if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") {
        if (e.key === "Escape") e.target.blur();
        return;
      }
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      const s = this.state;
      let done = true;
      if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
        const d = e.key === "ArrowLeft" ? -1 : 1;
        if (e.shiftKey) {
          const h = (s.focus[1] + d + this.H) % this.H;
          this.set({ focus: [s.focus[0], h], heads: [[s.focus[0], h]] });
        } else this.setToken(Math.max(0, Math.min(this.T - 1, s.t + d)));
      } else if (e.key === "ArrowUp" || e.key === "ArrowDown") {
        const layers = this.meta.layers;
        const n = layers.indexOf(s.focus[0]) + (e.key === "ArrowUp" ? -1 : 1);
        if (n >= 0 && n < layers.length) {
          const f = [layers[n], s.focus[1]];
          this.set({ focus: f, heads: [f] });
          this.scrollToHead(f);
        }
      } else if (e.key === "Home") this.setToken(0);
      else if (e.key === "End") this.setToken(this.T - 1);
      else if (e.key === "d") this.set({ dir: s.dir === "from" ? "to" : "from" });
      else if (e.key === "v") this.set({ view: VIEWS[(VIEWS.indexOf(s.view) + 1) % VIEWS.length] });
      else if (e.key === "s") this.set({ skip: !s.skip });
      else if (e.key === "a") this.layerMean();
      else if (e.key === "m") this.set({ big: !s.big });
      else if (e.key === "Escape") this.set({ big: false });
      else if (e.key === "/") $("find").focus();
      else done = false;
      if (done) e.preventDefault();
    }

    // --- changing the state ---

    setToken(t) {
      this.state.t = t;
      this.locked = true; // chosen by a click, a key or the matrix: hovering the strip no longer moves it
      this.preview = null;
      this.renderToken();
      this.writeFragment();
    }

    clickHead(h, add) {
      const s = this.state;
      if (!add) return this.set({ focus: h, heads: [h] });
      const key = h.join(".");
      const has = s.heads.some((x) => x.join(".") === key);
      const heads = has ? s.heads.filter((x) => x.join(".") !== key) : s.heads.concat([h]);
      this.set({ focus: h, heads: heads.length ? heads : [h] });
    }

    layerMean() {
      const L = this.state.focus[0];
      const heads = [];
      for (let h = 0; h < this.H; h++) heads.push([L, h]);
      this.set({ heads });
    }

    set(change) {
      const s = this.state;
      const before = { view: s.view, skip: s.skip, theme: s.theme, big: s.big, focus: s.focus.join(".") };
      Object.assign(s, change);
      this.applyTheme();
      if (s.view !== before.view || s.skip !== before.skip || s.theme !== before.theme) { this.thumbs = null; this.matrixImage = null; }
      if (s.focus.join(".") !== before.focus) this.matrixImage = null;
      if (s.big !== before.big) { this.matrixImage = null; this.layout(); }
      this.renderAll();
      this.writeFragment();
    }

    applyTheme() {
      const s = this.state;
      const dark = s.theme === "dark" || (s.theme === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
      const want = dark ? "dark" : "light";
      if (document.documentElement.dataset.theme !== want) {
        document.documentElement.dataset.theme = want;
        if (this.palette) { this.palette.read(); this.thumbs = null; this.matrixImage = null; }
      }
      $("theme").title = `colour scheme: ${s.theme} (click: auto → light → dark)`;
    }

    // --- layout of the canvases ---

    layout() {
      const big = this.state.big;
      document.body.classList.toggle("big", big);
      const main = $("main");
      const avail = main.clientHeight - (big ? 120 : 90); // room for the caption and the readout
      const side = big ? Math.min(main.clientWidth - 40, avail) : Math.min(avail, Math.max(260, Math.floor(window.innerWidth * 0.36)));
      this.matrixSide = Math.max(160, Math.floor(side));
      const dpr = window.devicePixelRatio || 1;
      const mat = $("matrix");
      mat.style.width = mat.style.height = `${this.matrixSide}px`;
      mat.width = mat.height = Math.round(this.matrixSide * dpr);
      $("matrix-panel").style.width = `${this.matrixSide + 2}px`; // its texts wrap instead of widening the column
      // Head grid: columns are query heads, a gap between KV groups; rows are the stored layers.
      const panel = $("grid-scroll");
      const groups = this.meta.n_kv_heads;
      this.gridPad = 4;
      this.groupGap = groups > 1 ? 10 : 0;
      this.labelW = 34;
      const width = Math.max(240, panel.clientWidth - 16);
      const fit = Math.floor((width - this.labelW - (groups - 1) * this.groupGap) / this.H) - this.gridPad;
      this.thumb = Math.max(26, Math.min(72, fit));
      this.cellH = this.thumb + 14 + this.gridPad;
      this.gridTop = 16;
      const w = this.labelW + this.H * (this.thumb + this.gridPad) + (groups - 1) * this.groupGap;
      const h = this.gridTop + this.meta.layers.length * this.cellH;
      const grid = $("grid");
      grid.style.width = `${w}px`;
      grid.style.height = `${h}px`;
      grid.width = Math.round(w * dpr);
      grid.height = Math.round(h * dpr);
      this.thumbs = null;
    }

    headX(h) {
      return this.labelW + h * (this.thumb + this.gridPad) + Math.floor(h / this.att.group) * this.groupGap;
    }

    headY(layer) {
      return this.gridTop + this.meta.layers.indexOf(layer) * this.cellH;
    }

    gridHit(e) {
      const r = $("grid").getBoundingClientRect();
      const x = e.clientX - r.left, y = e.clientY - r.top;
      const n = Math.floor((y - this.gridTop) / this.cellH);
      if (n < 0 || n >= this.meta.layers.length) return null;
      for (let h = 0; h < this.H; h++) {
        const x0 = this.headX(h);
        if (x >= x0 && x < x0 + this.thumb) return [this.meta.layers[n], h];
      }
      return null;
    }

    // The page box of a head's thumbnail (for tests and for scrolling to it).
    headBox(layer, head) {
      const r = $("grid").getBoundingClientRect();
      return { x: r.left + this.headX(head), y: r.top + this.headY(layer), width: this.thumb, height: this.thumb };
    }

    scrollToHead([layer]) {
      const panel = $("grid-scroll");
      const y = this.headY(layer);
      if (y < panel.scrollTop || y + this.cellH > panel.scrollTop + panel.clientHeight) panel.scrollTop = y - panel.clientHeight / 2;
    }

    // --- values of the current selection ---

    query() {
      return this.preview !== null ? this.preview : this.state.t;
    }

    // The strip: for every position, the mean over the selected heads of what the CLI prints.
    stripValues(t) {
      const s = this.state, att = this.att, T = this.T;
      const out = new Float64Array(T).fill(NaN);
      const blocks = s.heads.map(([L, h]) => att.block(L, h)).filter((b) => b >= 0);
      for (let p = 0; p < T; p++) {
        const [i, j] = s.dir === "from" ? [t, p] : [p, t];
        if (j > i) continue;
        let sum = 0, n = 0;
        for (const b of blocks) {
          const v = att.value(s.view, s.skip, b, i, j);
          if (Number.isFinite(v)) { sum += v; n++; }
        }
        if (n) out[p] = sum / n;
      }
      return out;
    }

    // Each head's raw share on the first token: the query row's (from) or the mean over the later rows (to).
    firstShare(b, t) {
      if (this.state.dir === "from") return this.att.first(b, t);
      let sum = 0, n = 0;
      for (let i = t; i < this.T; i++) {
        const f = this.att.first(b, i);
        if (Number.isFinite(f)) { sum += f; n++; }
      }
      return n ? sum / n : NaN;
    }

    // The share of a head's weight off the first token: the query row's (from) or the mean over the later rows (to).
    offFirst(b, t) {
      const att = this.att;
      const share = (i) => (att.Z[b * this.T + i] > 0 ? att.R[b * this.T + i] / att.Z[b * this.T + i] : 0);
      if (this.state.dir === "from") return share(t);
      let sum = 0;
      for (let i = t; i < this.T; i++) sum += share(i);
      return sum / (this.T - t);
    }

    // --- rendering ---

    renderAll() {
      for (const [id, v] of [["view", this.state.view], ["dir", this.state.dir]]) {
        for (const b of $(id).querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.v === v));
      }
      $("skip").checked = this.state.skip;
      $("big").setAttribute("aria-pressed", String(this.state.big));
      if ($("find").value !== this.state.find) $("find").value = this.state.find;
      this.renderToken();
    }

    // What depends on the selected token: the strip, the grid's labels, the details, the matrix's marks.
    renderToken() {
      this.values = this.stripValues(this.query());
      this.renderStrip();
      this.renderGrid();
      this.drawMatrix();
      this.renderDetails();
      this.renderRanking();
      this.renderReadout();
    }

    describeHeads() {
      const hs = this.state.heads;
      if (hs.length === 1) return `layer ${hs[0][0]} head ${hs[0][1]}`;
      const layers = [...new Set(hs.map((h) => h[0]))];
      if (layers.length === 1 && hs.length === this.H) return `mean of every head of layer ${layers[0]}`;
      return `mean of ${hs.length} heads (${hs.map((h) => h.join(".")).join(", ")})`;
    }

    renderStrip() {
      const s = this.state, t = this.query();
      const values = this.values;
      const level = scaler(values, s.view);
      const pal = this.palette;
      const name = VIEW_NAMES[s.view];
      const found = this.findPositions(t);
      const foundSet = new Set(found.ok ? found.positions : []);
      // What each span shows now; only what changed is written (on a long prompt most tokens keep
      // their colour from one click to the next, and every write costs the browser a style pass).
      if (!this.shownState) this.shownState = this.spans.map(() => ({ cls: "", bg: "", ink: "", tip: "" }));
      for (let p = 0; p < this.T; p++) {
        const v = values[p];
        const reach = s.dir === "from" ? p <= t : p >= t;
        let cls = p >= this.meta.prompt_tokens ? "tok gen" : "tok";
        let tip, bg = "", ink = "";
        if (p === t) cls += " q";
        if (foundSet.has(p)) cls += " found";
        if (!reach) {
          cls += " future";
          tip = s.dir === "from" ? "after the query: masked" : "before the key: cannot attend to it";
        } else if (s.skip && (s.dir === "from" ? p === 0 : t === 0)) {
          tip = "first token: left out (skip first)";
        } else if (!Number.isFinite(v)) {
          cls += " masked";
          tip = "masked";
        } else {
          const k = pal.index(level(v));
          bg = pal.css[k];
          ink = pal.ink[k];
          tip = `${name} ${fmt(v, s.view)}`;
        }
        const el = this.spans[p], was = this.shownState[p];
        if (was.cls !== cls) { el.className = cls; was.cls = cls; }
        if (was.bg !== bg) { el.style.background = bg; was.bg = bg; }
        if (was.ink !== ink) { el.style.color = ink; was.ink = ink; }
        if (was.tip !== tip) { el.title = `${p} ${this.meta.labels[p]} — ${tip}`; was.tip = tip; }
      }
      const dirText = s.dir === "from" ? `what token ${t} ${this.meta.labels[t]} attends to` : `how much each later token attends to token ${t} ${this.meta.labels[t]}`;
      const how = this.locked ? `token ${this.state.t} locked: hover a token for its value, click it again to unlock` : "hover a token to see it as the query, click to lock it";
      $("strip-caption").textContent = `${name}s: ${dirText} · ${this.describeHeads()}${s.skip ? " · first token left out, the rest renormalised" : ""} · ${how}`;
    }

    // Thumbnails of every stored head in the current view: one offscreen canvas each, drawn once.
    buildThumbs() {
      const n = Math.min(this.T, Math.round(this.thumb * (window.devicePixelRatio || 1)));
      this.thumbs = [];
      for (let b = 0; b < this.meta.layers.length * this.H; b++) this.thumbs.push(this.matrixCanvas(b, n));
    }

    // One head's T×T matrix as an n×n image: each pixel the largest level of the cells it covers;
    // masked cells (every covered cell masked) transparent, to show the hatch drawn beneath; the
    // left-out first column (skip first) in a colour of its own.
    matrixCanvas(b, n) {
      const att = this.att, T = this.T, s = this.state, pal = this.palette;
      const lv = new Float32Array(n * n).fill(-1); // -1: nothing visible yet; -2: left out
      const skip = s.skip, weights = s.view === "weights";
      const row = new Float64Array(T);
      const xs = new Int32Array(T);
      for (let j = 0; j < T; j++) xs[j] = Math.floor((j * n) / T);
      for (let i = 0; i < T; i++) {
        const yn = xs[i] * n;
        att.row(s.view, skip, b, i, row);
        let lo = Infinity, hi = -Infinity;
        if (!weights) {
          for (let j = 0; j <= i; j++) {
            const v = row[j];
            if (v < lo) lo = v; // NaN compares false: masked keys are skipped
            if (v > hi) hi = v;
          }
          if (s.view === "value-norms") lo = 0;
        }
        const scale = hi > lo ? 1 / (hi - lo) : 0;
        for (let j = 0; j <= i; j++) {
          const v = row[j];
          const k = yn + xs[j];
          let l;
          if (v === v) l = weights ? (v > 1 ? 1 : v) : scale ? (v - lo) * scale : 1;
          else if (skip && j === 0) l = -2;
          else continue;
          if (l > lv[k] || lv[k] === -1) lv[k] = l;
        }
      }
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = n;
      const ctx = canvas.getContext("2d");
      const img = ctx.createImageData(n, n);
      const d = img.data;
      for (let y = 0; y < n; y++) {
        for (let x = 0; x < n; x++) {
          const k = y * n + x;
          const l = lv[k];
          if (l === -1) continue; // masked: transparent
          const c = l >= 0 ? pal.rgb[pal.index(l)] : pal.leftout;
          d[4 * k] = c[0];
          d[4 * k + 1] = c[1];
          d[4 * k + 2] = c[2];
          d[4 * k + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
      return canvas;
    }

    renderGrid() {
      if (!this.thumbs) this.buildThumbs();
      const canvas = $("grid");
      const ctx = canvas.getContext("2d");
      const dpr = window.devicePixelRatio || 1;
      const pal = this.palette, s = this.state, t = this.query(), S = this.thumb;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = false;
      ctx.font = "10px system-ui, sans-serif";
      ctx.textBaseline = "top";
      ctx.fillStyle = pal.muted;
      for (let g = 0; g < this.meta.n_kv_heads; g++) ctx.fillText(`KV ${g}`, this.headX(g * this.att.group), 2);
      const hatch = pal.hatch(ctx, 0.6);
      const selected = new Set(s.heads.map((h) => h.join(".")));
      const focus = s.focus.join(".");
      this.meta.layers.forEach((L, n) => {
        const y = this.headY(L);
        ctx.fillStyle = pal.fg;
        ctx.textBaseline = "middle";
        ctx.fillText(`L${L}`, 2, y + S / 2);
        ctx.textBaseline = "top";
        for (let h = 0; h < this.H; h++) {
          const b = n * this.H + h;
          const x = this.headX(h);
          ctx.fillStyle = hatch;
          ctx.fillRect(x, y, S, S);
          ctx.drawImage(this.thumbs[b], x, y, S, S);
          // The selected token's row (from) or column (to), as a tick on the edge.
          const at = ((t + 0.5) / this.T) * S;
          ctx.fillStyle = pal.accent;
          if (s.dir === "from") ctx.fillRect(x - 3, y + at - 1, 3, 2);
          else ctx.fillRect(x + at - 1, y - 3, 2, 3);
          ctx.fillStyle = pal.muted;
          ctx.fillText(`h${h} ${short(this.firstShare(b, t))}`, x, y + S + 1);
          const key = `${L}.${h}`;
          if (selected.has(key) || key === focus) {
            ctx.strokeStyle = key === focus ? pal.accent : pal.select;
            ctx.lineWidth = 2;
            ctx.strokeRect(x - 1, y - 1, S + 2, S + 2);
          }
        }
      });
      $("grid-caption").textContent = `heads: ${this.meta.layers.length} layer${this.meta.layers.length > 1 ? "s" : ""} × ${this.H} (grouped by KV head); under each, its first-token share for token ${t}${s.dir === "to" ? " (mean over the later tokens)" : ""}`;
    }

    // The focused head's matrix (rebuilt when the head, view or skip changes), then the marks for the token.
    drawMatrix() {
      if (!this.matrixImage) {
        const b = this.att.block(this.state.focus[0], this.state.focus[1]);
        this.matrixImage = this.matrixCanvas(b, Math.min(this.T, $("matrix").width));
      }
      const canvas = $("matrix");
      const ctx = canvas.getContext("2d");
      const side = canvas.width;
      const pal = this.palette, s = this.state, t = this.query(), T = this.T;
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.fillStyle = pal.hatch(ctx, window.devicePixelRatio || 1);
      ctx.fillRect(0, 0, side, side);
      ctx.drawImage(this.matrixImage, 0, 0, side, side);
      const cell = side / T;
      ctx.strokeStyle = pal.accent;
      ctx.lineWidth = Math.max(1, Math.min(3, cell / 4)) * (window.devicePixelRatio || 1);
      if (s.dir === "from") ctx.strokeRect(0, t * cell, (t + 1) * cell, cell);
      else ctx.strokeRect(t * cell, t * cell, cell, (T - t) * cell);
      const [L, h] = s.focus;
      $("matrix-caption").textContent = `layer ${L} head ${h} (KV head ${Math.floor(h / this.att.group)}): ${VIEW_NAMES[s.view]}s, query rows × key columns; hatched: masked${s.view === "weights" ? "" : "; colour per row"}`;
    }

    matrixCell(e) {
      const r = $("matrix").getBoundingClientRect();
      const i = Math.floor(((e.clientY - r.top) / r.height) * this.T);
      const j = Math.floor(((e.clientX - r.left) / r.width) * this.T);
      return i >= 0 && j >= 0 && i < this.T && j < this.T ? [i, j] : null;
    }

    hoverMatrix(e) {
      const cell = this.matrixCell(e);
      if (!cell) return this.renderReadout();
      const [i, j] = cell;
      const att = this.att, s = this.state, lab = this.meta.labels;
      const b = att.block(s.focus[0], s.focus[1]);
      let text = `query ${i} ${lab[i]} → key ${j} ${lab[j]}\n`;
      if (j > i) text += "masked: the key comes after the query (causal mask)";
      else if (att.code(b, i, j) === att.MASKED) text += "masked: outside the layer's attention window";
      else {
        const parts = VIEWS.map((v) => `${VIEW_NAMES[v]} ${fmt(att.value(v, false, b, i, j), v)}`);
        if (s.skip && j > 0) parts.push(`renormalised without the first token ${fmt(att.value("weights", true, b, i, j), "weights")}`);
        text += parts.join(" · ");
      }
      $("readout").textContent = text;
    }

    renderReadout() {
      $("readout").textContent = "hover the matrix for a pair's values; click a row to select its token";
    }

    renderDetails() {
      const s = this.state, t = this.query(), att = this.att, m = this.meta;
      const values = this.values;
      const order = [];
      values.forEach((v, p) => { if (Number.isFinite(v)) order.push(p); });
      order.sort((a, b) => values[b] - values[a]);
      const bytes = m.bytes[t].match(/../g) || [];
      const rows = order.slice(0, 10).map((p) => {
        const w = s.view === "weights" ? Math.round(60 * Math.max(0, Math.min(1, values[p]))) : 0;
        return `<tr><td class="n">${p}</td><td class="t">${esc(m.labels[p])}</td><td class="n">${fmt(values[p], s.view)}</td><td>${w ? `<span class="bar" style="width:${w}px"></span>` : ""}</td></tr>`;
      });
      const shares = s.heads.map(([L, h]) => `<tr><td>L${L} h${h}</td><td class="n">${short(this.firstShare(att.block(L, h), t))}</td></tr>`);
      $("details").innerHTML =
        `<h2>token ${t}${t >= m.prompt_tokens ? " (generated)" : ""}</h2>` +
        `<p><code>${esc(m.labels[t])}</code> · id ${m.ids[t]} · bytes ${bytes.join(" ") || "–"}</p>` +
        `<h2>${s.dir === "from" ? "strongest sources" : "later tokens attending most"} (${esc(this.describeHeads())})</h2>` +
        `<table>${rows.join("")}</table>` +
        `<h2>first-token share${s.dir === "to" ? " (mean over the later tokens)" : ""}</h2><table>${shares.slice(0, 12).join("")}</table>` +
        (shares.length > 12 ? `<p class="muted">… ${shares.length - 12} more heads</p>` : "");
    }

    // --find in the page: matching tokens that the selected token can see (from) or that see it (to).
    findPositions(t) {
      const s = this.state;
      if (!s.find) return { ok: false, message: "" };
      if (!this.raws) this.raws = this.meta.bytes.map(hexBytes);
      const spans = matchSpans(this.meta.texts, this.raws, s.find);
      if (!spans.length) return { ok: false, message: `no token matches “${s.find}”` };
      const all = [...new Set(spans.flat())].sort((a, b) => a - b);
      let positions = all.filter((p) => (s.dir === "from" ? p <= t : p >= t));
      if (s.skip && s.dir === "from") positions = positions.filter((p) => p > 0);
      if (!positions.length) return { ok: false, message: `“${s.find}” matches only tokens ${all.join(", ")}, which token ${t} ${s.dir === "from" ? "cannot see" : "is not seen by"}` };
      return { ok: true, positions };
    }

    renderRanking() {
      const s = this.state, t = this.query(), att = this.att;
      const box = $("ranking");
      const found = this.findPositions(t);
      if (!found.ok) {
        box.innerHTML = found.message ? `<h2>rank heads</h2><p class="muted">${esc(found.message)}</p>` : "";
        return;
      }
      const ranked = [];
      for (const L of this.meta.layers) {
        for (let h = 0; h < this.H; h++) {
          const b = att.block(L, h);
          const picked = [];
          for (const p of found.positions) {
            const [i, j] = s.dir === "from" ? [t, p] : [p, t];
            const v = att.value(s.view, s.skip, b, i, j);
            if (Number.isFinite(v)) picked.push(v);
          }
          if (!picked.length) continue;
          const match = s.view === "scores" ? Math.max(...picked) : picked.reduce((a, x) => a + x, 0);
          ranked.push({ L, h, match, sinkOnly: s.skip && this.offFirst(b, t) < SINK_ONLY });
        }
      }
      // As `inspect --find --skip-first`: a head with almost nothing off the first token ranks after the
      // others, whatever its renormalised values say.
      ranked.sort((a, b) => a.sinkOnly - b.sinkOnly || b.match - a.match || a.L - b.L || a.h - b.h);
      const names = found.positions.map((p) => `${p}:${this.meta.labels[p]}`).join(" ");
      const top = ranked.slice(0, 10);
      box.innerHTML =
        `<h2>heads ranked by what token ${t} ${s.dir === "from" ? "gives to" : "receives from"} ${esc(names)}</h2>` +
        top.map((r, n) => `<button type="button" data-l="${r.L}" data-h="${r.h}">${n + 1}. L${r.L} h${r.h} · ${fmt(r.match, s.view)}${r.sinkOnly ? " *" : ""}</button>`).join("") +
        (top.some((r) => r.sinkOnly) ? `<p class="muted">* under 1% of the head's weight off the first token: ranked last</p>` : "");
    }
  }

  function esc(text) {
    return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  }

  async function start() {
    const meta = JSON.parse($("attn-meta").textContent);
    const t0 = performance.now();
    const buf = await inflate(fromBase64($("attn-data").textContent.trim()));
    const att = new Attention(meta, buf);
    const app = new Explorer(meta, att);
    app.loadMs = performance.now() - t0;
    window.attnExplorer = app; // for the browser tests and the console
    document.body.dataset.ready = "1";
  }

  start().catch((err) => {
    const box = $("error");
    box.hidden = false;
    box.textContent = `This page could not be drawn: ${err && err.message ? err.message : err}`;
    throw err;
  });
})();
