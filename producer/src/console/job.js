// The Job view: status, runs, timeline, progress with ETA, curves, confusion matrix, per-class table,
// promotion, worker, logs and the actions the token may take. It reloads when the stream says the job changed.
// The running attempt's log lines come live on a stream of the job's own (`/v1/stream?job=ID`,
// `log` events with their byte offset in the attempt's log, joined here once each).
"use strict";

Console.views.job = {
  id: null,
  loading: null,
  // The message this view's last failed load put on screen, taken away when a load succeeds.
  failed: null,

  show(id) {
    this.id = id;
    $("job-id").textContent = id;
    document.body.removeAttribute("data-loaded");
    this.load();
    Console.listeners.add(job => { if (job.job_id === this.id) this.load(); });
    this.follow(id);
  },

  // Follows the job's live log lines while the view is open.
  follow(id) {
    this.live = null;
    this.status = null;
    $("live-log").hidden = true;
    const s = new EventSource(`/v1/stream?job=${encodeURIComponent(id)}`);
    s.addEventListener("log", ev => this.addLive(JSON.parse(ev.data)));
    Console.leaving.push(() => s.close());
  },

  // Adds a `log` event's text: a new attempt starts again; text already shown is skipped (offsets are bytes).
  addLive(d) {
    const bytes = new TextEncoder().encode(d.text);
    // Another attempt, or the same attempt delivered again (to another worker, or to the same
    // one: a new making of its log): the text starts again. A late chunk of an older making is dropped.
    const making = d.making || 0;
    if (this.live && this.live.attempt === d.attempt && this.live.worker === d.worker && this.live.making > making) return;
    if (!this.live || this.live.attempt !== d.attempt || this.live.worker !== d.worker || this.live.making !== making) {
      this.live = { attempt: d.attempt, worker: d.worker, making, end: d.offset, text: d.offset ? "…\n" : "" };
    }
    const live = this.live;
    if (d.offset > live.end) live.text += "… (lines missed)\n";
    const skip = Math.max(0, live.end - d.offset);
    if (skip >= bytes.length) return;
    live.text += new TextDecoder().decode(bytes.slice(skip));
    live.end = d.offset + bytes.length;
    this.showLive();
  },

  // Shows the live lines until the attempt's saved log replaces them.
  showLive() {
    const live = this.live, box = $("live-log");
    if (!live || (TERMINAL.includes(this.status) && (this.saved || []).includes(live.attempt))) { box.hidden = true; return; }
    let pre = $("live-log-text");
    if (!pre) {
      pre = el("pre", { class: "logs", id: "live-log-text" });
      box.replaceChildren(el("div", { class: "muted", id: "live-log-title" }), pre);
    }
    $("live-log-title").textContent = `attempt ${live.attempt}, live from ${TERMINAL.includes(this.status) ? "its run" : "the worker"}`;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = live.text;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    box.hidden = false;
  },

  async load() {
    if (this.loading) { this.again = true; return; }
    this.loading = Console.api("GET", `/v1/jobs/${encodeURIComponent(this.id)}`);
    try {
      const job = await this.loading;
      // The job loaded: a message of an earlier load (a 404 before the job was recorded) is stale.
      if (this.failed && $("error").textContent === this.failed) $("error").textContent = "";
      this.failed = null;
      this.render(job);
    } catch (e) {
      this.failed = String(e.message || e);
      $("error").textContent = this.failed;
    }
    this.loading = null;
    if (this.again) { this.again = false; this.load(); }
  },

  render(job) {
    const st = $("status");
    st.textContent = job.status; st.className = "badge " + job.status;
    set("summary", `${job.job_type} for bot ${job.bot} · created ${when(job.created_at)}` + (job.finished_at ? ` · finished ${when(job.finished_at)}` : ""));
    const trig = job.trigger || {};
    set("trigger", el("div", {}, `${trig.kind || "?"}: ${trig.source || ""}`), el("div", {}, `attempts: ${job.attempts}` + (job.run ? ` · runs (replays): ${job.run}` : "")),
      job.error ? el("div", { class: "muted" }, `${job.error.kind}: ${job.error.message}`) : "");
    // Every part is set on each render, so that nothing of a job shown before stays on screen.
    if (job.worker) {
      const attrs = Object.entries(job.worker.attributes || {});
      set("worker", el("div", {}, el("code", {}, job.worker.id)), attrs.length ? table(["attribute", "value"], attrs) : "");
    } else set("worker", "–");
    set("progress", this.progress(job));
    set("promotion", this.promotion(job));
    set("curves", curves(job.events || []));
    const m = job.metrics;
    if (m) {
      const head = ["model", "device", "accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", "test_examples"].filter(k => m[k] != null);
      set("metrics", table(head, [head.map(k => m[k])]));
      set("per-class", perClass(m.per_class || {}));
    } else { set("metrics", "–"); set("per-class", "–"); }
    if (this.shownCm !== job.job_id) { $("cm-detail").textContent = ""; this.shownCm = job.job_id; }
    set("cm", renderMatrix(job.confusion_matrix));
    set("top-confusions", topConfusions(job.confusion_matrix));
    set("timeline", table(["time", "run", "status", "attempt", "worker", "detail"], (job.events || []).map(e => [
      when(e.at), e.run || 0, e.status, e.attempt, e.worker ? e.worker.id : "",
      e.error ? `${e.error.kind}: ${e.error.message}` : e.progress ? JSON.stringify(e.progress) : e.result ? JSON.stringify(e.result).slice(0, 160) : "",
    ]), { id: "timeline-table" }));
    set("job-actions", ...this.actions(job));
    this.logs(job);
    document.body.setAttribute("data-loaded", job.status);
  },

  progress(job) {
    const p = job.progress;
    if (!p || TERMINAL.includes(job.status)) return p ? table(["field", "value"], Object.entries(p)) : "–";
    const frac = p.epochs ? p.epoch / p.epochs : null;
    let eta = null;
    if (frac && job.started_at) {
      const spent = (Date.now() - new Date(job.started_at).getTime()) / 1000;
      eta = frac > 0 ? Math.max(0, spent / frac - spent) : null;
    }
    return el("div", {}, frac != null ? el("div", { class: "bar" }, el("div", { style: `width:${(100 * frac).toFixed(1)}%` })) : "",
      eta != null ? el("div", { id: "eta" }, `ETA ≈ ${Math.round(eta)} s`) : "", table(["field", "value"], Object.entries(p)));
  },

  promotion(job) {
    const promo = job.result && job.result.promotion;
    const prod = job.production ? el("div", {}, "production now: ", el("code", {}, job.production.job_id)) : "";
    if (!promo) return prod || "–";
    return el("div", {}, el("div", {}, promo.promoted ? "promoted to production" : promo.passed ? "passed the gate (not promoted)" : "rejected by the gate"),
      el("div", { class: "muted" }, (promo.reasons || []).join("; ")), prod);
  },

  // The buttons for what this token may do to this job now.
  actions(job) {
    const out = [];
    const id = encodeURIComponent(job.job_id);
    if (Console.can("submit") && !TERMINAL.includes(job.status)) {
      out.push(el("button", { id: "cancel-job", class: "danger" }, "Cancel"));
      out[out.length - 1].onclick = async () => {
        if (await Console.confirm(`Cancel job ${job.job_id}?`)) Console.act("cancel requested", () => Console.api("POST", `/v1/jobs/${id}/cancel`, { reason: "from the console" }));
      };
    }
    if (Console.can("submit") && ["failed", "dead", "cancelled"].includes(job.status)) {
      const b = el("button", { id: "retry-job" }, "Retry as a new job");
      b.onclick = async () => {
        const out2 = await Console.act("retry submitted", () => Console.api("POST", `/v1/jobs/${id}/retry`));
        if (out2) Console.go(`/jobs/${encodeURIComponent(out2.job_id)}`);
      };
      out.push(b);
    }
    const isProd = job.production && job.production.job_id === job.job_id;
    if (Console.can("admin") && job.status === "succeeded" && job.metrics && !isProd) {
      const b = el("button", { id: "promote-job" }, "Promote to production");
      b.onclick = async () => {
        if (await Console.confirm(`Make job ${job.job_id} the production model of ${job.bot}?`)) {
          await Console.act("promoted", () => Console.api("POST", `/v1/models/promote/${id}`));
          this.load();
        }
      };
      out.push(b);
    }
    return out;
  },

  async logs(job) {
    this.status = job.status;
    this.saved = job.logs || [];
    this.showLive();
    if (!job.logs || !job.logs.length) { set("logs", TERMINAL.includes(job.status) ? "no saved log" : "the attempt's log is saved when it ends"); return; }
    const attempt = job.logs[job.logs.length - 1];
    try {
      const text = await Console.api("GET", `/v1/jobs/${encodeURIComponent(job.job_id)}/logs?attempt=${attempt}`);
      set("logs", el("div", { class: "muted" }, `attempt ${attempt}`), el("pre", { class: "logs" }, String(text)));
    } catch (e) {
      set("logs", el("span", { class: "error" }, String(e.message || e)));
    }
  },
};

// Loss and validation accuracy per epoch, from the progress events, as two small SVG line charts.
function curves(events) {
  const pts = new Map();
  for (const e of events) if (e.progress && e.progress.epoch != null) pts.set(`${e.run || 0}:${e.progress.epoch}`, e.progress);
  const ps = [...pts.values()];
  if (!ps.length) return document.createTextNode("no epochs reported");
  const chart = (key, color) => {
    const vs = ps.filter(p => typeof p[key] === "number");
    if (!vs.length) return "";
    const NS = "http://www.w3.org/2000/svg", w = 280, h = 120, pad = 24;
    const xs = vs.map(p => p.epoch), ys = vs.map(p => p[key]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    const sx = x => pad + ((x - x0) / ((x1 - x0) || 1)) * (w - 2 * pad), sy = y => h - pad - ((y - y0) / ((y1 - y0) || 1)) * (h - 2 * pad);
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("class", `curve curve-${key}`);
    const add = (tag, attrs, text) => { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text != null) e.textContent = text; svg.append(e); };
    add("polyline", { points: vs.map(p => `${sx(p.epoch)},${sy(p[key])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 });
    vs.forEach(p => add("circle", { cx: sx(p.epoch), cy: sy(p[key]), r: 3, fill: color, "data-epoch": p.epoch }));
    add("text", { x: 4, y: 12, "font-size": 11 }, `${key} (${fmt(ys[ys.length - 1])} at epoch ${xs[xs.length - 1]})`);
    return svg;
  };
  return el("div", { class: "grid" }, chart("loss", "#cf222e"), chart("val_accuracy", "#1a7f37"));
}

function perClass(pc) {
  const rows = Object.entries(pc).map(([l, c]) => [l, c.precision, c.recall, c.f1, c.support]);
  if (!rows.length) return document.createTextNode("–");
  const heads = ["label", "precision", "recall", "f1", "support"];
  const t = table(heads, rows, { id: "per-class-table" });
  t.querySelectorAll("th").forEach((th, i) => {
    th.classList.add("sortable");
    th.onclick = () => {
      const desc = th.dataset.sort !== "desc";
      rows.sort((a, b) => (a[i] < b[i] ? -1 : a[i] > b[i] ? 1 : 0) * (desc ? -1 : 1));
      const again = perClass(Object.fromEntries(rows.map(r => [r[0], { precision: r[1], recall: r[2], f1: r[3], support: r[4] }])));
      again.querySelectorAll("th")[i].dataset.sort = desc ? "desc" : "asc";
      t.replaceWith(again);
    };
  });
  return t;
}

function topConfusions(cm) {
  if (!cm || !Array.isArray(cm.matrix)) return "–";
  const pairs = [];
  cm.matrix.forEach((row, i) => row.forEach((v, j) => { if (i !== j && v > 0) pairs.push([cm.labels[i], cm.labels[j], v]); }));
  pairs.sort((a, b) => b[2] - a[2]);
  return pairs.length ? table(["true label", "predicted", "count"], pairs.slice(0, 10)) : "none";
}

function renderMatrix(cm) {
  if (!cm || !Array.isArray(cm.labels) || !Array.isArray(cm.matrix)) return document.createTextNode("no confusion matrix (not a training job, or not finished)");
  const n = cm.labels.length, cell = n > 40 ? 8 : n > 15 ? 16 : 28, pad = 140;
  const max = Math.max(1, ...cm.matrix.flat());
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", pad + n * cell + 10);
  svg.setAttribute("height", pad + n * cell + 10);
  svg.setAttribute("id", "cm-svg");
  const add = (tag, attrs, text) => { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text != null) e.textContent = text; svg.append(e); return e; };
  cm.labels.forEach((l, i) => {
    add("text", { x: pad - 4, y: pad + i * cell + cell * 0.7, "text-anchor": "end", "font-size": Math.min(11, cell - 2) }, l);
    add("text", { x: 0, y: 0, transform: `translate(${pad + i * cell + cell * 0.7},${pad - 4}) rotate(-60)`, "font-size": Math.min(11, cell - 2) }, l);
  });
  cm.matrix.forEach((row, i) => row.forEach((v, j) => {
    const a = v / max;
    const color = i === j ? `rgba(26,127,55,${0.08 + 0.92 * a})` : `rgba(207,34,46,${v ? 0.15 + 0.85 * a : 0.03})`;
    const r = add("rect", { x: pad + j * cell, y: pad + i * cell, width: cell - 1, height: cell - 1, fill: color, class: "cell", "data-row": cm.labels[i], "data-col": cm.labels[j], "data-count": v });
    r.append(Object.assign(document.createElementNS(NS, "title"), { textContent: `${cm.labels[i]} → ${cm.labels[j]}: ${v}` }));
    r.addEventListener("click", () => {
      const ex = cm.examples && cm.examples[cm.labels[i]] && cm.examples[cm.labels[i]][cm.labels[j]];
      $("cm-detail").textContent = `${cm.labels[i]} predicted as ${cm.labels[j]}: ${v}` + (ex ? ` — ${ex.join(" · ")}` : " (the test utterances are not stored for this job)");
    });
    if (cell >= 16 && v) add("text", { x: pad + j * cell + cell / 2, y: pad + i * cell + cell * 0.65, "text-anchor": "middle", "font-size": cell >= 28 ? 11 : 8, fill: a > 0.5 ? "#fff" : "#1d2330", "pointer-events": "none" }, v);
  }));
  add("text", { x: 4, y: 14, "font-size": 11, fill: "#6a7385" }, "rows: true label, columns: predicted");
  return svg;
}
