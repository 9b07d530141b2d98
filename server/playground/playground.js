// steerserve playground: plain JavaScript over the server's own API (relative URLs, so it works behind a path
// prefix too). Every API error is shown where it happened, with the server's message; the API key travels only
// in the Authorization header (kept in this tab's sessionStorage), never in a URL.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const KEY_STORAGE = "steerserve.apiKey";

const state = {
  model: null,          // the served model id
  layers: 0,            // its decoder layers
  vectors: [],          // the store's vectors (GET /v1/steering/vectors)
  answers: { plain: "", steered: "" },
  prompt: "",           // the prompt the answers are for
  steeringUsed: null,   // the steering of the last generation
  controller: null,     // aborts the running generation
};

// -- the API ----------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, { type = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
    this.retryAfter = retryAfter;
  }

  static async from(response) {
    let message = `${response.status} ${response.statusText}`;
    let type = null;
    let param = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        type = body.error.type || null;
        param = body.error.param || null;
      }
    } catch (_) { /* not JSON: keep the status line */ }
    return new ApiError(response.status, message, { type, param, retryAfter: response.headers.get("Retry-After") });
  }

  describe() {
    let text = this.status ? `${this.status}${this.type ? " " + this.type : ""}: ${this.message}` : this.message;
    if (this.param) text += `\n(field: ${this.param})`;
    if (this.status === 401) text += "\nThis server needs an API key: type it in the field at the top.";
    if (this.status === 403) text += "\nThis key's role does not allow it.";
    if (this.status === 501) text += "\nThis server does not run it (e.g. the vLLM backend with analysis off); generation still works.";
    if (this.status === 503 && this.retryAfter) text += `\nRetry in ${this.retryAfter} s (the server said Retry-After).`;
    return text;
  }
}

function headers(json) {
  const h = { Accept: "application/json" };
  if (json) h["Content-Type"] = "application/json";
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, { method, headers: headers(body !== undefined),
                                    body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, `the server cannot be reached (${e.message})`);
  }
  if (!response.ok) {
    const err = await ApiError.from(response);
    if (err.status === 401) keyNeeded(true);
    throw err;
  }
  if (response.status === 204) return null;
  return response.json();
}

// -- showing things ---------------------------------------------------------------------------------------------

function showError(box, err) {
  if (!box) return;
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err instanceof ApiError ? err.describe() : String(err.message || err);
  box.hidden = false;
}
const cardError = (card) => $(`#${card} > .error`);

function keyNeeded(needed) {
  $("#api-key").classList.toggle("needed", needed);
  $("#key-status").textContent = needed ? "this server needs a key" : "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const visible = (t) => (/^ +$/.test(t) ? t.replace(/ /g, "␣") : t.replace(/\n/g, "↵").replace(/\t/g, "⇥"));
const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));

// -- tooltip ----------------------------------------------------------------------------------------------------

function showTooltip(target, content) {
  const tip = $("#tooltip");
  tip.replaceChildren(content);
  tip.hidden = false;
  const r = target.getBoundingClientRect();
  const w = tip.offsetWidth;
  tip.style.left = `${Math.max(4, Math.min(window.innerWidth - w - 4, r.left))}px`;
  tip.style.top = `${r.bottom + 6 + tip.offsetHeight > window.innerHeight ? r.top - tip.offsetHeight - 6 : r.bottom + 6}px`;
}
function hideTooltip() { $("#tooltip").hidden = true; }

function logprobTable(tokens) {
  const table = el("table");
  for (const t of tokens) {
    table.append(el("tr", { class: "chosen" }, el("td", {}, JSON.stringify(t.token)), el("td", {}, fmt(t.logprob)),
                    el("td", {}, `p=${fmt(Math.exp(t.logprob))}`)));
    for (const alt of t.top_logprobs || []) {
      if (alt.token === t.token) continue;
      table.append(el("tr", {}, el("td", {}, "  " + JSON.stringify(alt.token)), el("td", {}, fmt(alt.logprob)),
                      el("td", {}, `p=${fmt(Math.exp(alt.logprob))}`)));
    }
  }
  return el("div", {}, el("div", { class: "muted" }, "logprob of the token, and the alternatives:"), table);
}

// -- server and vectors -----------------------------------------------------------------------------------------

async function loadServer() {
  try {
    const models = await api("GET", "v1/models");
    const m = models.data[0];
    state.model = m.id;
    state.layers = m.num_layers || 0;
    $("#server-info").textContent = `${m.id} · ${m.num_layers} layers · hidden ${m.hidden_size}`;
    keyNeeded(false);
    showError($("#global-error"), null);
    return true;
  } catch (e) {
    $("#server-info").textContent = "not connected";
    showError($("#global-error"), e);
    return false;
  }
}

async function loadMethods() {
  try {
    const builders = await api("GET", "v1/steering/methods");
    fillSelect($("#build-method"), builders.data.map((b) => b.name), "caa");
  } catch (e) { showError(cardError("build"), e); }
  try {
    const methods = await api("GET", "v1/attributions/methods");
    fillSelect($("#explain-method"), methods.data.map((m) => m.name), "integrated_gradients");
  } catch (e) { showError(cardError("explain"), e); }
}

function fillSelect(select, names, preferred) {
  const keep = select.value;
  select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  select.value = names.includes(keep) ? keep : names.includes(preferred) ? preferred : names[0] || "";
}

async function loadVectors(select) {
  const box = cardError("steering");
  try {
    const listing = await api("GET", "v1/steering/vectors");
    state.vectors = listing.data;
    showError(box, null);
  } catch (e) {
    showError(box, e);
    return;
  }
  const ticked = new Set($$("#vector-table tbody tr").filter((tr) => $(".use", tr).checked).map((tr) => tr.dataset.name));
  if (select) ticked.add(select);
  const old = new Map($$("#vector-table tbody tr").map((tr) => [tr.dataset.name, tr]));
  const rows = state.vectors.map((v) => old.get(v.name) || vectorRow(v));
  $("#vector-table tbody").replaceChildren(...rows);
  for (const tr of rows) $(".use", tr).checked = ticked.has(tr.dataset.name);
  $("#no-vectors").hidden = state.vectors.length > 0;
  $("#vector-table").hidden = state.vectors.length === 0;
  fillSelect($("#sweep-vector"), state.vectors.map((v) => v.name), select);
}

function vectorRow(v) {
  const setting = v.metadata && v.metadata.setting;
  const positions = el("select", { class: "positions" },
    ...["", "all", "prompt", "generated", "explicit"].map((p) => el("option", { value: p }, p || "default")));
  const explicit = el("input", { class: "explicit", placeholder: "0,3,7", hidden: true, spellcheck: "false" });
  positions.addEventListener("change", () => { explicit.hidden = positions.value !== "explicit"; });
  const normalize = el("select", { class: "normalize" },
    ...[["", "default"], ["true", "on"], ["false", "off"]].map(([v, t]) => el("option", { value: v }, t)));
  const tr = el("tr", { dataset: { name: v.name } },
    el("td", {}, el("input", { type: "checkbox", class: "use", title: `apply ${v.name}` })),
    el("td", { class: "name", title: `layers ${v.layers.join(",")}${setting ? " · has a stored setting" : ""}` }, v.name),
    el("td", {}, el("input", { type: "number", class: "scale", step: "0.5", placeholder: setting ? "stored" : "1" })),
    el("td", {}, el("input", { class: "layers", placeholder: "all", spellcheck: "false" })),
    el("td", {}, positions, " ", explicit),
    el("td", {}, normalize));
  return tr;
}

function parseInts(text, what) {
  const out = [];
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const m = part.match(/^(\d+)\s*-\s*(\d+)$/);
    if (m) {
      for (let i = Number(m[1]); i <= Number(m[2]); i++) out.push(i);
    } else if (/^\d+$/.test(part)) {
      out.push(Number(part));
    } else {
      throw new Error(`${what}: "${part}" is not a number or a range like 2-5`);
    }
  }
  return out;
}

function steeringSpec() {
  const vectors = [];
  for (const tr of $$("#vector-table tbody tr")) {
    if (!$(".use", tr).checked) continue;
    const entry = { name: tr.dataset.name };
    const scale = $(".scale", tr).value.trim();
    if (scale !== "") entry.scale = Number(scale);
    const layers = $(".layers", tr).value.trim();
    if (layers) entry.layers = parseInts(layers, `${entry.name} layers`);
    const positions = $(".positions", tr).value;
    if (positions === "explicit") entry.positions = parseInts($(".explicit", tr).value, `${entry.name} positions`);
    else if (positions) entry.positions = positions;
    const normalize = $(".normalize", tr).value;
    if (normalize) entry.normalize = normalize === "true";
    vectors.push(entry);
  }
  return vectors.length ? { vectors } : null;
}

// -- generation: two streams side by side -----------------------------------------------------------------------

async function streamChat(body, side, signal) {
  const answer = $(".answer", side);
  const status = $(".status", side);
  let response;
  try {
    response = await fetch("v1/chat/completions", { method: "POST", headers: headers(true), signal,
                                                     body: JSON.stringify({ ...body, stream: true }) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server cannot be reached (${e.message})`);
  }
  if (!response.ok) {
    const err = await ApiError.from(response);
    if (err.status === 401) keyNeeded(true);
    throw err;
  }
  status.textContent = "streaming…";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let text = "";
  let pending = [];  // tokens whose text arrives with a later chunk (split UTF-8)
  let count = 0;
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") {
          status.textContent = `done · ${count} tokens${finish ? " · " + finish : ""}`;
          return text;
        }
        const msg = JSON.parse(data);
        if (msg.error) throw new ApiError(0, `the generation failed while streaming: ${msg.error.message}`,
                                          { type: msg.error.type, param: msg.error.param });
        const choice = msg.choices && msg.choices[0];
        if (!choice) continue;
        const tokens = (choice.logprobs && choice.logprobs.content) || [];
        pending = pending.concat(tokens);
        count += tokens.length;
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          const span = el("span", { class: "tok" }, piece);
          const mine = pending;
          pending = [];
          if (mine.length) {
            if (Math.min(...mine.map((t) => t.logprob)) < Math.log(0.05)) span.classList.add("unlikely");
            span.addEventListener("mouseenter", () => showTooltip(span, logprobTable(mine)));
            span.addEventListener("mouseleave", hideTooltip);
          }
          answer.append(span);
          text += piece;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  throw new ApiError(0, "the stream ended without [DONE]");
}

async function generate() {
  const sides = { plain: $("#side-plain"), steered: $("#side-steered") };
  for (const side of Object.values(sides)) {
    $(".answer", side).replaceChildren();
    $(".status", side).textContent = "";
    showError($(".error", side), null);
  }
  let steering;
  try {
    steering = steeringSpec();
  } catch (e) {
    showError($(".error", sides.steered), e);
    return;
  }
  const prompt = $("#prompt").value;
  const body = { model: state.model, messages: [{ role: "user", content: prompt }],
                 max_tokens: Number($("#max-tokens").value) || 32, temperature: Number($("#temperature").value),
                 logprobs: true, top_logprobs: 5 };
  const seed = $("#seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  state.controller = new AbortController();
  $("#run").disabled = true;
  $("#stop").disabled = false;
  $("#explain-run").disabled = true;
  state.answers = { plain: "", steered: "" };
  const run = async (which, extra) => {
    try {
      state.answers[which] = await streamChat({ ...body, ...extra }, sides[which], state.controller.signal);
    } catch (e) {
      $(".status", sides[which]).textContent = e.name === "AbortError" ? "stopped" : "failed";
      if (e.name !== "AbortError") showError($(".error", sides[which]), e);
    }
  };
  const jobs = [run("plain", {})];
  if (steering) {
    jobs.push(run("steered", { steering }));
  } else {
    showError($(".error", sides.steered), new Error("Tick a vector in Steering to see a steered answer."));
  }
  await Promise.all(jobs);
  state.prompt = prompt;
  state.steeringUsed = steering;
  $("#run").disabled = false;
  $("#stop").disabled = true;
  $("#explain-run").disabled = !(state.answers.plain || state.answers.steered);
}

// -- explain: attribution over the prompt -----------------------------------------------------------------------

async function explain() {
  const box = cardError("explain");
  showError(box, null);
  const heat = $("#heatmap");
  heat.replaceChildren();
  $("#explain-legend").hidden = true;
  $("#explain-info").textContent = "";
  const target = $("#explain-target").value;
  const body = { messages: [{ role: "user", content: state.prompt }], method: $("#explain-method").value, top_k: 5 };
  if (target === "contrast") {
    if (!state.answers.steered || !state.answers.plain) {
      showError(box, new Error("The contrast needs both answers: generate with a vector ticked."));
      return;
    }
    body.contrast = { preferred: state.answers.steered, dispreferred: state.answers.plain };
  } else {
    const answer = state.answers[target];
    if (!answer) {
      showError(box, new Error(`There is no ${target === "plain" ? "unsteered" : "steered"} answer yet.`));
      return;
    }
    body.target = answer;
  }
  if ($("#explain-steered").checked && state.steeringUsed) body.steering = state.steeringUsed;
  $("#explain-run").disabled = true;
  $("#explain-info").textContent = "running…";
  try {
    const out = await api("POST", "v1/attributions", body);
    drawHeatmap(out);
  } catch (e) {
    $("#explain-info").textContent = "";
    showError(box, e);
  } finally {
    $("#explain-run").disabled = false;
  }
}

function drawHeatmap(out) {
  const heat = $("#heatmap");
  const tokens = out.input_tokens;
  const max = Math.max(1e-12, ...tokens.filter((t) => !t.special).map((t) => Math.abs(t.score)));
  const cells = tokens.map((t) => {
    const a = Math.min(1, Math.abs(t.score) / max);
    const cell = el("span", { class: "cell" + (t.special ? " special" : ""), dataset: { position: t.position } },
                    visible(t.text));
    cell.style.background = `rgba(var(${t.score >= 0 ? "--pos" : "--neg"}), ${(0.85 * a).toFixed(3)})`;
    if (a > 0.6) cell.style.color = "#fff";
    const info = el("div", {}, el("div", {}, `${JSON.stringify(t.text)} · position ${t.position}`),
                    el("div", {}, `score ${fmt(t.score, 4)}${t.special ? " · special token" : ""}`));
    cell.addEventListener("mouseenter", () => showTooltip(cell, info));
    cell.addEventListener("mouseleave", hideTooltip);
    return cell;
  });
  heat.replaceChildren(...cells);
  $("#explain-legend").hidden = false;
  const top = (out.top_positive || []).map((t) => JSON.stringify(t.text)).join(" ");
  const what = out.target_type === "contrastive" ? "the steered answer rather than the unsteered one" : "the answer";
  $("#explain-info").textContent = `${out.method} · ${tokens.length} prompt tokens · towards ${what} most: ${top || "–"} · ` +
    `${fmt(out.cost && out.cost.seconds, 2)} s`;
}

// -- jobs: build and sweep --------------------------------------------------------------------------------------

function parsePairs(text) {
  const examples = [];
  text.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (!line) return;
    let ex;
    if (line.startsWith("{")) {
      try { ex = JSON.parse(line); } catch (e) { throw new Error(`pairs, line ${i + 1}: not JSON (${e.message})`); }
    } else {
      const parts = line.includes("\t") ? line.split("\t") : line.split(" | ");
      if (parts.length !== 3) throw new Error(`pairs, line ${i + 1}: need prompt | preferred | dispreferred`);
      ex = { prompt: parts[0].trim(), preferred: parts[1].trim(), dispreferred: parts[2].trim() };
    }
    examples.push({ prompt: ex.prompt, preferred: ex.preferred, dispreferred: ex.dispreferred });
  });
  if (!examples.length) throw new Error("paste at least one pair");
  return examples;
}

function setProgress(prefix, fraction, text) {
  const value = Math.max(0, Math.min(1, fraction || 0));
  $(`#${prefix}-progress`).value = value;
  $(`#${prefix}-percent`).textContent = `${Math.round(value * 100)}%`;
  if (text !== undefined) $(`#${prefix}-status`).textContent = text;
}

async function follow(job, prefix) {
  for (;;) {
    const stage = job.stage ? ` · ${job.stage}` : "";
    const eta = job.eta_seconds ? ` · about ${Math.ceil(job.eta_seconds)} s left` : "";
    setProgress(prefix, job.status === "succeeded" ? 1 : job.progress, `${job.status}${stage}${eta}`);
    if (["succeeded", "failed", "cancelled"].includes(job.status)) return job;
    await new Promise((resolve) => setTimeout(resolve, 250));
    job = await api("GET", `v1/jobs/${encodeURIComponent(job.id)}`);
  }
}

async function build() {
  const box = cardError("build");
  showError(box, null);
  setProgress("build", 0, "");
  $("#build-run").disabled = true;
  try {
    const name = $("#build-name").value.trim();
    const job = await api("POST", "v1/steering/vectors/build", {
      name, method: $("#build-method").value, examples: parsePairs($("#pairs").value),
      overwrite: $("#build-overwrite").checked });
    const done = await follow(job, "build");
    if (done.status !== "succeeded") {
      throw new Error(`the build ${done.status}: ${done.error ? done.error.message : "no reason given"}`);
    }
    await loadVectors(name);
    $("#build-status").textContent = `succeeded · "${name}" is ticked in Steering and usable now`;
  } catch (e) {
    showError(box, e);
  } finally {
    $("#build-run").disabled = false;
  }
}

async function sweep() {
  const box = cardError("sweep");
  showError(box, null);
  setProgress("sweep", 0, "");
  $("#plot-accuracy").replaceChildren();
  $("#plot-margin").replaceChildren();
  $("#plots").hidden = true;
  $("#sweep-info").textContent = "";
  $("#sweep-run").disabled = true;
  try {
    const name = $("#sweep-vector").value;
    if (!name) throw new Error("no vector to sweep: build one first");
    const spec = { scales: $("#sweep-scales").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number),
                   relative: $("#sweep-relative").checked };
    if (spec.scales.some((s) => Number.isNaN(s))) throw new Error("scales: numbers separated by commas");
    const layers = $("#sweep-layers").value.trim();
    if (layers) spec.layers = parseInts(layers, "layers");
    const job = await api("POST", `v1/steering/vectors/${encodeURIComponent(name)}/sweep`,
                          { examples: parsePairs($("#pairs").value), sweep: spec });
    const done = await follow(job, "sweep");
    if (done.status !== "succeeded") {
      throw new Error(`the sweep ${done.status}: ${done.error ? done.error.message : "no reason given"}`);
    }
    drawSweep(done.result);
  } catch (e) {
    showError(box, e);
  } finally {
    $("#sweep-run").disabled = false;
  }
}

function drawSweep(result) {
  const rows = result.table.filter((r) => r.layers.length === 1);
  const layers = [...new Set(rows.map((r) => r.layers[0]))].sort((a, b) => a - b);
  const scales = [...new Set(rows.map((r) => r.scale))].sort((a, b) => a - b);
  const at = (metric) => (l, s) => {
    const r = rows.find((x) => x.layers[0] === l && x.scale === s);
    return r ? r[metric] : null;
  };
  const best = result.best && result.best.layers.length === 1 ? [result.best.layers[0], result.best.scale] : null;
  heatmapSvg($("#plot-accuracy"), layers, scales, at("accuracy"), { lo: 0, hi: 1, base: result.baseline.accuracy, best,
    digits: 2 });
  const margins = rows.map((r) => r.margin).concat([result.baseline.margin]);
  const span = Math.max(1e-9, ...margins.map((m) => Math.abs(m - result.baseline.margin)));
  heatmapSvg($("#plot-margin"), layers, scales, at("margin"), { lo: result.baseline.margin - span,
    hi: result.baseline.margin + span, base: result.baseline.margin, best, digits: 2 });
  $("#plots").hidden = false;
  const b = result.best;
  $("#sweep-info").textContent = `${result.examples} examples · unsteered: accuracy ${fmt(result.baseline.accuracy, 2)}, ` +
    `margin ${fmt(result.baseline.margin, 2)}` + (b ? ` · best (${result.metric}): layers ${b.layers.join(",")} at ` +
    `scale ${b.scale} → accuracy ${fmt(b.accuracy, 2)}, margin ${fmt(b.margin, 2)}` : "");
}

function intensity(value, lo, hi, base) {
  const t = value >= base ? (value - base) / Math.max(1e-12, hi - base) : (base - value) / Math.max(1e-12, base - lo);
  return Math.min(1, Math.abs(t));
}

function diverging(value, lo, hi, base) {
  // white at the unsteered baseline, red above it, blue below
  const a = intensity(value, lo, hi, base);
  const t = value >= base ? a : -a;
  const [r, g, b] = t >= 0 ? [214, 52, 42] : [40, 92, 204];
  const mix = (c) => Math.round(255 + (c - 255) * a);
  return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
}

function heatmapSvg(host, layers, scales, value, { lo, hi, base, best, digits }) {
  const cw = 56, ch = 24, left = 54, top = 8, bottom = 36;
  const width = left + cw * scales.length + 8;
  const height = top + ch * layers.length + bottom;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                            "aria-label": `${host.id}: layers by scales` });
  layers.forEach((l, i) => {
    root.append(svg("text", { x: left - 6, y: top + ch * i + ch / 2 + 4, "text-anchor": "end" }, `layer ${l}`));
    scales.forEach((s, j) => {
      const v = value(l, s);
      const x = left + cw * j, y = top + ch * i;
      const rect = svg("rect", { x, y, width: cw - 2, height: ch - 2, rx: 3, class: "sweep-cell",
                                 fill: v === null ? "#eee" : diverging(v, lo, hi, base),
                                 "data-layer": l, "data-scale": s, "data-value": v === null ? "" : v });
      if (best && best[0] === l && best[1] === s) {
        rect.setAttribute("stroke", "#1d2330");
        rect.setAttribute("stroke-width", "2");
      }
      rect.append(svg("title", {}, `layer ${l}, scale ${s}: ${fmt(v, 4)}`));
      const strong = v !== null && intensity(v, lo, hi, base) > 0.55;
      root.append(rect, svg("text", { x: x + (cw - 2) / 2, y: y + ch / 2 + 3, "text-anchor": "middle",
                                      fill: strong ? "#fff" : "#1d2330" }, fmt(v, digits)));
    });
  });
  scales.forEach((s, j) => {
    root.append(svg("text", { x: left + cw * j + (cw - 2) / 2, y: top + ch * layers.length + 14, "text-anchor": "middle" }, String(s)));
  });
  root.append(svg("text", { x: left + (cw * scales.length) / 2, y: height - 4, "text-anchor": "middle", fill: "#677084" }, "scale"));
  host.replaceChildren(root);
}

// -- start ------------------------------------------------------------------------------------------------------

async function start() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", async () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    if (await loadServer()) { await loadVectors(); await loadMethods(); }
  });
  $("#refresh-vectors").addEventListener("click", () => loadVectors());
  $("#run").addEventListener("click", generate);
  $("#stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("#explain-run").addEventListener("click", explain);
  $("#build-run").addEventListener("click", build);
  $("#sweep-run").addEventListener("click", sweep);
  if (await loadServer()) {
    await loadVectors();
    await loadMethods();
  }
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
