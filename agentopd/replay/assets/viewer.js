// agentopd replay: the HTML viewer. Reads the JSON in <script id="data">; when served
// (`agentopd replay RUN --serve`) it fetches list pages and episodes from the same origin.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("data").textContent);
  const CLIP = DATA.clip;
  const $ = (sel) => document.querySelector(sel);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  // Controls (C0 but newline and tab, DEL, C1) and bidi controls in run data are shown as
  // markers, so what is displayed is what the model wrote: ␛, ⟨U+202E⟩.
  const CTL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  const mark = (c) => {
    const n = c.charCodeAt(0);
    if (n < 0x20) return String.fromCharCode(0x2400 + n);
    if (n === 0x7f) return "\u2421";
    return "\u27e8U+" + n.toString(16).toUpperCase().padStart(4, "0") + "\u27e9";
  };
  const show = (s) => esc(s).replace(CTL, (c) => `<span class="ctl">${mark(c)}</span>`);
  const fmt = (x, d = 3) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));
  const vocab = DATA.vocab || {};
  const tokText = (id) => (id in vocab ? vocab[id] : "<" + id + ">");
  let episodes = DATA.episodes || {}; // id -> episode (static mode: all of this page)
  let rows = DATA.rows || []; // list rows (single run) or pairs (diff)
  let selected = null;
  let served = { page: 0, pages: 1, matching: 0, total: 0 }; // the current page, when served

  function shade(d) {
    if (d === null || d === undefined) return "";
    const a = Math.min(Math.abs(d) / CLIP, 1);
    return d >= 0
      ? `rgb(255,${Math.round(235 - 135 * a)},${Math.round(235 - 135 * a)})`
      : `rgb(${Math.round(235 - 135 * a)},${Math.round(235 - 95 * a)},255)`;
  }

  // ------------------------------------------------------------------ filters
  function fillSelect(sel, values, label) {
    sel.innerHTML = `<option value="">${label}: all</option>` + values.map((v) => `<option value="${esc(v)}">${show(label)}: ${show(v)}</option>`).join("");
  }
  function rowOf(r) { return DATA.diff ? (r.a || r.b) : r; }
  function setupFilters() {
    const f = DATA.facets;
    fillSelect($("#f-step"), f.steps, "step");
    fillSelect($("#f-env"), f.envs, "env");
    fillSelect($("#f-stop"), f.stops, "stop");
    fillSelect($("#f-err"), f.errors, "tool error");
    const out = $("#f-out");
    out.innerHTML = DATA.diff
      ? '<option value="">outcome: all</option><option value="both">solved by both</option><option value="a">solved by A only</option><option value="b">solved by B only</option><option value="neither">solved by neither</option>'
      : '<option value="">outcome: all</option><option value="solved">solved</option><option value="failed">failed</option>';
    const again = () => { served.page = 0; refresh(); };
    for (const id of ["#f-step", "#f-env", "#f-stop", "#f-err", "#f-out"]) $(id).addEventListener("change", again);
    $("#f-text").addEventListener("input", again);
  }
  function query() {
    return { step: $("#f-step").value, env: $("#f-env").value, stop: $("#f-stop").value, err: $("#f-err").value, out: $("#f-out").value, text: $("#f-text").value.trim().toLowerCase() };
  }
  function queryString(q) {
    const parts = [];
    if (q.step) parts.push("step=" + q.step);
    if (q.env) parts.push("env=" + q.env);
    if (q.stop) parts.push("stop=" + q.stop);
    if (q.err) parts.push("error=" + q.err);
    if (q.out) parts.push(q.out);
    if (q.text) parts.push(q.text);
    return parts.join(" ");
  }
  function episodeText(ep) {
    if (!ep) return "";
    if (ep._text === undefined) {
      const parts = ep.prompt.map((m) => m[1]);
      for (const t of ep.turns) {
        parts.push(t.text, t.parse_error || "");
        for (const c of t.calls) parts.push(c[0] || "", c[1] || "", c[2] || "");
      }
      ep._text = parts.join("\n").toLowerCase();
    }
    return ep._text;
  }
  function matches(r, q) {
    const probe = DATA.diff ? [r.a, r.b].filter(Boolean) : [r];
    const one = (x) =>
      (!q.step || String(x.step) === q.step) && (!q.env || x.env === q.env) && (!q.stop || x.stop_reason === q.stop) &&
      (!q.err || (q.err === "any" ? Object.values(x.tool_errors).some((v) => v > 0) : (x.tool_errors[q.err] || 0) > 0));
    if (!probe.some(one)) return false;
    if (q.out) {
      if (DATA.diff) {
        const a = !!(r.a && r.a.success), b = !!(r.b && r.b.success);
        const v = a && b ? "both" : a ? "a" : b ? "b" : "neither";
        if (v !== q.out) return false;
      } else if ((q.out === "solved") !== r.success) return false;
    }
    if (q.text) {
      const eps = DATA.diff ? [r.a && episodes[r.a.id + "@a"], r.b && episodes[r.b.id + "@b"]] : [episodes[r.id]];
      if (!eps.some((e) => episodeText(e).includes(q.text))) return false;
    }
    return true;
  }

  // ------------------------------------------------------------------ list
  async function refresh() {
    const q = query();
    let shown;
    if (DATA.served) {
      const res = await fetch(`api/page?n=${served.page}&q=${encodeURIComponent(queryString(q))}`);
      const body = await res.json();
      if (body.error) { $("#count").textContent = body.error; return; }
      served = body;
      shown = body.rows;
      rows = body.rows;
    } else {
      shown = rows.filter((r) => matches(r, q));
    }
    renderList(shown);
    if (shown.length && (!selected || !shown.some((r) => key(r) === selected))) select(shown[0]);
    if (!shown.length) $("#view").innerHTML = '<div class="empty">no episode matches the filter</div>';
  }
  function key(r) { return DATA.diff ? r.key : r.id; }
  function renderList(shown) {
    const total = DATA.served ? served.total : rows.length;
    const matching = DATA.served ? served.matching : shown.length;
    let pager = "";
    if (DATA.served) pager = ` <span id="pager">page ${served.page + 1}/${served.pages}<button id="prev">‹</button><button id="next">›</button></span>`;
    $("#count").innerHTML = `${matching} of ${total} ${DATA.diff ? "tasks" : "episodes"} ${DATA.pageNote ? "· " + show(DATA.pageNote) : ""}${pager}`;
    if (DATA.served) {
      $("#prev").onclick = () => { if (served.page > 0) { served.page--; refresh(); } };
      $("#next").onclick = () => { if (served.page + 1 < served.pages) { served.page++; refresh(); } };
    }
    const head = DATA.diff
      ? "<tr><th>task</th><th>seed</th><th>A</th><th>B</th><th>diverged at</th></tr>"
      : "<tr><th>id</th><th>step</th><th>env</th><th>task</th><th>reward</th><th>solved</th><th>turns</th><th>stop</th><th>errors</th><th>KL</th></tr>";
    const body = shown.map((r) => {
      if (DATA.diff) {
        const cell = (x) => (x ? (x.success ? '<span class="ok">solved</span>' : '<span class="bad">failed</span>') : "—");
        const d = r.diverge ? `turn ${r.diverge.turn}` : (r.a && r.b ? "identical" : "");
        const x = rowOf(r);
        return `<tr class="row" data-key="${esc(r.key)}"><td>${show(x.task_id)}</td><td>${show(x.seed)}</td><td>${cell(r.a)}</td><td>${cell(r.b)}</td><td>${d}</td></tr>`;
      }
      const errs = Object.values(r.tool_errors).reduce((a, b) => a + b, 0);
      return `<tr class="row" data-key="${esc(r.id)}"><td>${show(r.id)}</td><td>${r.step}</td><td>${show(r.env)}</td><td>${show(r.task_id)}</td><td>${r.reward}</td><td class="${r.success ? "ok" : "bad"}">${r.success ? "yes" : "no"}</td><td>${r.turns}</td><td>${show(r.stop_reason)}</td><td>${errs || ""}</td><td>${fmt(r.teacher_kl, 2)}</td></tr>`;
    });
    $("#list").innerHTML = `<table><thead>${head}</thead><tbody>${body.join("")}</tbody></table>`;
    for (const tr of document.querySelectorAll("#list tr.row")) {
      tr.addEventListener("click", () => select(shown.find((r) => key(r) === tr.dataset.key)));
    }
    markSelected();
  }
  function markSelected() {
    for (const tr of document.querySelectorAll("#list tr.row")) tr.classList.toggle("sel", tr.dataset.key === selected);
  }

  // ------------------------------------------------------------------ episode
  async function fetchEpisode(id) {
    if (!episodes[id]) {
      const res = await fetch(`api/episode?id=${encodeURIComponent(id)}`);
      const body = await res.json();
      Object.assign(vocab, body.vocab || {});
      episodes[id] = body.episode;
    }
    return episodes[id];
  }
  async function select(r) {
    if (!r) return;
    selected = key(r);
    markSelected();
    if (DATA.diff) {
      const a = r.a ? episodes[r.a.id + "@a"] : null, b = r.b ? episodes[r.b.id + "@b"] : null;
      $("#view").innerHTML = `<div class="cols"><div>${column(a, "A: " + DATA.names[0], r.diverge, "a")}</div><div>${column(b, "B: " + DATA.names[1], r.diverge, "b")}</div></div>`;
    } else {
      const ep = DATA.served ? await fetchEpisode(r.id) : episodes[r.id];
      $("#view").innerHTML = column(ep, null, null, "");
    }
    wire();
  }
  function column(ep, title, diverge, side) {
    if (!ep) return `<div class="empty">${show(title || "")}: no episode for this task</div>`;
    const verdict = ep.success ? '<span class="ok">SOLVED</span>' : '<span class="bad">FAILED</span>';
    const errs = Object.entries(ep.tool_errors).filter((e) => e[1] > 0).map((e) => `${e[0]}×${e[1]}`).join(", ") || "none";
    let h = `<div class="ep-head">${title ? `<b>${show(title)}</b><br>` : ""}<b>episode ${show(ep.id)}</b> ${verdict}
      <div class="tags"><span>step ${ep.step}</span><span>env ${show(ep.env)}</span><span>task ${show(ep.task_id)}</span><span>seed ${show(ep.seed)}</span><span>reward ${ep.reward}</span><span>stop ${show(ep.stop_reason)}</span><span>teacher KL ${fmt(ep.kl)}</span><span>tool errors: ${show(errs)}</span></div></div>`;
    h += `<div class="legend">${show(DATA.legend)}</div>`;
    h += `<div class="strip" title="teacher KL per turn (mean log p − log q)">` + ep.turns.map((t, i) =>
      `<div class="cell" data-turn="${side}${i}" style="background:${shade(t.kl) || "#f0f2f5"}">t${t.index}<br>${fmt(t.kl, 2)}</div>`).join("") + "</div>";
    for (const [role, content] of ep.prompt) h += `<div class="msg"><span class="role">[${show(role)}]</span>${show(content)}</div>`;
    ep.turns.forEach((t, i) => {
      const isDiv = diverge && diverge.turn === i;
      h += `<div class="turn${isDiv ? " diverged" : ""}" id="turn-${side}${i}"><h3>turn ${t.index} · KL ${fmt(t.kl)} · reward ${t.reward}${t.replayed ? " · replayed (mask 0)" : ""}${isDiv ? '<span class="note">the runs diverge here</span>' : ""}</h3><div class="tokens">`;
      t.toks.forEach((k, j) => {
        const [id, mask, , , , ] = k;
        const d = mask && k[2] !== null && k[3] !== null ? k[2] - k[3] : null;
        const cls = "tok " + (mask ? "m1" : "m0") + (isDiv && j >= diverge.token ? " div" : "");
        const bg = mask ? shade(d) : "";
        h += `<span class="${cls}" data-ep="${esc(ep.id)}${side ? "@" + side : ""}" data-t="${i}" data-k="${j}"${bg ? ` style="background:${bg}"` : ""}>${show(tokText(id))}</span>`;
      });
      h += "</div>";
      if (t.calls.length || t.parse_error) {
        h += '<div class="calls">';
        for (const [name, args, result, err] of t.calls) {
          h += `<div class="call"><div class="lbl">tool call</div><pre>${name === null ? "(no call)" : show(name + "(" + args + ")")}</pre></div>`;
          h += `<div class="result${err ? " err" : ""}"><div class="lbl">result</div><pre>${result === null ? "(no result)" : show(result)}</pre></div>`;
        }
        if (t.parse_error && !t.calls.some((c) => c[3])) h += `<div class="call err"><div class="lbl">parse error</div></div><div class="result err"><pre>${show(t.parse_error)}</pre></div>`;
        h += "</div>";
      }
      h += "</div>";
    });
    return h;
  }

  // ------------------------------------------------------------------ hover
  const tip = () => $("#tip");
  function tipHtml(ep, k) {
    const [id, mask, logp, logq, ent, top] = k;
    const d = logp !== null && logq !== null ? logp - logq : null;
    let h = `<div><b>${show(JSON.stringify(tokText(id)))}</b> id ${id} · mask ${mask}${mask ? " (trained on)" : ""}</div>`;
    h += `<div>log p ${fmt(logp)} · log q ${fmt(logq)} · log p − log q <b>${fmt(d)}</b></div>`;
    if (ent !== null) h += `<div>teacher entropy ${fmt(ent)}</div>`;
    if (top && top.length) {
      h += '<div class="tk-title">teacher top-k</div><table class="topk">';
      for (let i = 0; i < top.length; i += 2) {
        const p = top[i + 1];
        h += `<tr class="${top[i] === id ? "sampled" : ""}"><td>${i / 2 + 1}</td><td>${show(JSON.stringify(tokText(top[i])))}</td><td>${p.toFixed(3)}</td><td><span class="bar" style="width:${Math.round(p * 80)}px"></span></td></tr>`;
      }
      h += "</table>";
    } else if (mask) h += "<div>teacher top-k: not scored</div>";
    return h;
  }
  function wire() {
    for (const el of document.querySelectorAll("#view .tok")) {
      el.addEventListener("mouseover", (ev) => {
        const ep = episodes[el.dataset.ep];
        const k = ep.turns[+el.dataset.t].toks[+el.dataset.k];
        const t = tip();
        t.innerHTML = tipHtml(ep, k);
        t.style.display = "block";
        const r = el.getBoundingClientRect();
        t.style.left = Math.min(r.left, window.innerWidth - 370) + "px";
        t.style.top = (r.bottom + 6 + 260 > window.innerHeight ? Math.max(0, r.top - 266) : r.bottom + 6) + "px";
        el.classList.add("hot");
      });
      el.addEventListener("mouseout", () => { tip().style.display = "none"; el.classList.remove("hot"); });
    }
    for (const c of document.querySelectorAll("#view .strip .cell")) {
      c.addEventListener("click", () => { const t = document.getElementById("turn-" + c.dataset.turn); if (t) t.scrollIntoView({ block: "start" }); });
    }
  }

  // ------------------------------------------------------------------ start
  setupFilters();
  if (DATA.diff) {
    for (const p of rows) {
      if (p.a) episodes[p.a.id + "@a"] = DATA.eps_a[p.a.id];
      if (p.b) episodes[p.b.id + "@b"] = DATA.eps_b[p.b.id];
    }
  }
  refresh();
  window.agentopdReplay = { select: (k) => select(rows.find((r) => key(r) === k)), rows: () => rows };
})();
