// The mlprep serve page: no build step, no asset from elsewhere. Every value from the data is inserted as text
// (textContent), never as HTML: ids and names come from users' files.
"use strict";

const state = { token: sessionStorage.getItem("mlprep-token") || "", status: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function headers(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = new Error(body?.detail || `${response.status} ${response.statusText}`);
    error.code = body?.error;
    error.status = response.status;
    throw error;
  }
  return body;
}

// images through fetch, so that a token is sent with them too
async function image(url, attrs = {}) {
  const node = el("img", { alt: attrs.alt || "", ...attrs });
  try {
    const response = await fetch(url, { headers: headers() });
    if (response.ok) node.src = URL.createObjectURL(await response.blob());
  } catch (err) { node.alt = `not loaded: ${err.message}`; }
  return node;
}

function show(target, ...nodes) {
  const box = typeof target === "string" ? document.getElementById(target) : target;
  box.replaceChildren(...nodes);
}

function failure(err) {
  return el("p", { class: "error" }, err.code ? `${err.code}: ${err.message}` : err.message);
}

function modelLine(name, about) {
  const parts = [];
  const model = about?.model;
  if (model && model.name) {
    parts.push(`model: ${model.family} ${model.name}, weights ${model.pretrained || "none"}`);
    if (model.checkpoint_sha256) parts.push(`(sha256 ${model.checkpoint_sha256.slice(0, 12)})`);
  } else if (model && model.backend) {
    parts.push(`model: ${model.backend}${model.source ? " from " + model.source : ""}`);
  }
  for (const [key, value] of Object.entries(about || {})) {
    if (["model", "random_weights"].includes(key) || typeof value === "object") continue;
    parts.push(`${key}: ${value}`);
  }
  const nodes = [parts.join("  ·  ")];
  if (about?.random_weights) {
    nodes.push(el("span", { class: "warning" }, "  RANDOM weights: these results carry no meaning"));
  }
  for (const node of document.querySelectorAll(`[data-model="${name}"]`)) node.replaceChildren(...nodes.map(
    (n) => (n instanceof Node ? n : document.createTextNode(n))));
}

// ---------------------------------------------------------------- tabs

function openTab(name) {
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  history.replaceState(null, "", `#${name}`);
  const loader = loaders[name];
  if (loader && !loader.done) { loader.done = true; loader(); }
}

async function start() {
  document.getElementById("token").value = state.token;
  document.getElementById("token").addEventListener("change", (e) => {
    state.token = e.target.value;
    sessionStorage.setItem("mlprep-token", state.token);
    start();
  });
  let status;
  try {
    status = await api("/api/status");
  } catch (err) {
    document.getElementById("token-box").hidden = err.status !== 401;
    show("loading", err.status === 401 ? "This server needs a token: enter it above." : `Cannot reach the API: ${err.message}`);
    return;
  }
  state.status = status;
  document.getElementById("token-box").hidden = !status.token_required;
  document.getElementById("loading").hidden = true;
  const tabs = [];
  const missing = [];
  const titles = { sku_index: "SKUs", speaker_embed: "Speakers", kline_factor: "K-line", probe_qa: "Probe / QA",
    video_frames: "Clips" };
  for (const [name, info] of Object.entries(status.pipelines)) {
    if (info.loaded) {
      tabs.push(el("button", { role: "tab", "data-tab": name, onclick: () => openTab(name) }, titles[name] || name));
      modelLine(name, info.about);
    } else {
      missing.push(el("li", {}, `${name}: ${info.detail || info.error || "not loaded"}`));
    }
  }
  show("tabs", ...tabs);
  document.getElementById("missing").hidden = missing.length === 0;
  show("missing-list", ...missing);
  const wanted = location.hash.slice(1);
  const first = tabs.find((t) => t.dataset.tab === wanted) || tabs[0];
  if (first) openTab(first.dataset.tab);
}

function dropZone(zoneId, inputId, onFiles) {
  const zone = document.getElementById(zoneId);
  const input = document.getElementById(inputId);
  input.addEventListener("change", () => input.files.length && onFiles([...input.files]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
}

// ---------------------------------------------------------------- SKU search

async function searchSkus(files) {
  const form = new FormData();
  for (const file of files) form.append("images", file);
  const k = document.getElementById("sku-k").value || 5;
  show("sku-results", el("p", {}, "searching ..."));
  try {
    const answer = await api(`/api/sku/search?k=${encodeURIComponent(k)}`, { method: "POST", body: form });
    const blocks = [];
    for (const result of answer.results) {
      const file = files[result.query];
      const own = el("img", { alt: file.name, src: URL.createObjectURL(file) });
      if (result.error) {
        blocks.push(el("div", { class: "query" }, own, el("p", { class: "error" },
          `${file.name}: ${result.error.code}: ${result.error.detail}`)));
        continue;
      }
      const cards = [];
      for (const hit of result.hits) {
        const photos = await Promise.all(hit.photos.slice(0, 2).map((url) => image(url, { alt: hit.name })));
        cards.push(el("div", { class: "card", "data-sku": hit.sku_id },
          el("h4", {}, `${hit.rank}. ${hit.name}`),
          el("div", { class: "meta" }, `${hit.sku_id} · ${hit.category} · score ${hit.score.toFixed(3)}` +
            (hit.ranked_by === "geometry" ? ` · verified: ${hit.inliers} matching points` : "")),
          photos));
      }
      blocks.push(el("div", { class: "query" }, own, el("div", { class: "cards" }, cards)));
    }
    show("sku-results", ...blocks);
  } catch (err) { show("sku-results", failure(err)); }
}

// ---------------------------------------------------------------- speakers

async function identify(files) {
  const form = new FormData();
  form.append("audio", files[0]);
  show("speaker-results", el("p", {}, "listening ..."));
  try {
    const answer = await api("/api/speaker/identify?k=5", { method: "POST", body: form });
    const rows = answer.speakers.map((s) => el("tr", { "data-speaker": s.speaker },
      el("td", {}, s.rank), el("td", {}, s.speaker), el("td", {}, s.score.toFixed(3)),
      el("td", {}, answer.threshold === null ? "-" : s.score >= answer.threshold ? "same speaker" : "")));
    show("speaker-results", el("p", {}, `${files[0].name}:`),
      el("table", {}, el("tr", {}, el("th", {}, "rank"), el("th", {}, "speaker"), el("th", {}, "cosine"),
        el("th", {}, `at threshold ${answer.threshold?.toFixed(3) ?? "-"}`)), rows),
      el("p", { class: "meta" }, "\"same speaker\": the recording's cosine score to that speaker's embedding is at " +
        "or above the threshold. Threshold " + answer.threshold_source +
        ". Set it with speaker_embed.eval.threshold or mlprep serve --speaker-threshold."));
  } catch (err) { show("speaker-results", failure(err)); }
}

async function loadSpeakers() {
  dropZone("speaker-drop", "speaker-file", identify);
  try {
    const { speakers } = await api("/api/speaker/speakers");
    show("verify-speaker", ...speakers.map((s) => el("option", { value: s.speaker }, s.speaker)));
  } catch (err) { show("verify-result", failure(err)); }
  document.getElementById("verify-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = document.getElementById("verify-file").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("audio", file);
    form.append("speaker", document.getElementById("verify-speaker").value);
    try {
      const v = await api("/api/speaker/verify", { method: "POST", body: form });
      show("verify-result", el("p", {}, `score ${v.score.toFixed(3)} against ${v.against}: `,
        el("strong", {}, v.same_speaker === null ? "no decision" : v.same_speaker ? "same speaker" : "another speaker"),
        ` (threshold ${v.threshold?.toFixed(3) ?? "-"}: ${v.threshold_source})`));
    } catch (err) { show("verify-result", failure(err)); }
  });
}

// ---------------------------------------------------------------- K-line

function lineChart(closes, title, subtitle, colour) {
  const width = 260, height = 120, pad = 6;
  const lo = Math.min(...closes), hi = Math.max(...closes);
  const span = hi - lo || 1;
  const points = closes.map((c, i) => `${pad + (i * (width - 2 * pad)) / Math.max(1, closes.length - 1)},` +
    `${height - pad - ((c - lo) * (height - 2 * pad)) / span}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "kline-chart");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", colour);
  line.setAttribute("stroke-width", "2");
  svg.append(line);
  return el("div", { class: "chart" }, el("strong", {}, title), el("div", {}, subtitle), svg);
}

async function loadKline() {
  const select = document.getElementById("kline-asset");
  const dateInput = document.getElementById("kline-date");
  try {
    const { assets } = await api("/api/kline/assets");
    show(select, ...assets.map((a) => el("option", { value: a.asset, "data-last": a.last, "data-first": a.first },
      `${a.asset} (${a.first} to ${a.last})`)));
    const pickDate = () => { const o = select.selectedOptions[0]; if (o) dateInput.value = o.dataset.last; };
    select.addEventListener("change", pickDate);
    pickDate();
  } catch (err) { show("kline-result", failure(err)); }
  document.getElementById("kline-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    show("kline-result", el("p", {}, "searching ..."));
    try {
      const r = await api(`/api/kline/similar?asset=${encodeURIComponent(select.value)}&date=${encodeURIComponent(dateInput.value)}`);
      const charts = [lineChart(r.closes, `${r.asset} to ${r.date}`, "the query window", "#26364f")];
      for (const m of r.matches) {
        charts.push(lineChart(m.closes, `${m.asset} to ${m.end_date}`,
          `similarity ${m.similarity.toFixed(3)} · then ${(100 * m.forward_return).toFixed(2)}%`,
          m.forward_return > 0 ? "#2e8b57" : "#b03a2e"));
      }
      show("kline-result",
        el("p", {}, `win rate ${r.win_rate === null ? "-" : r.win_rate.toFixed(2)} over ${r.n_matches} matches known on ` +
          `${r.date} (mean forward return ${r.mean_forward_return === null ? "-" : (100 * r.mean_forward_return).toFixed(2) + "%"}` +
          ` over ${r.horizon} bars)`),
        el("p", { class: "meta" }, r.note), el("div", { class: "charts" }, charts));
    } catch (err) { show("kline-result", failure(err)); }
  });
}

// ---------------------------------------------------------------- probe / QA

const probePage = { offset: 0, limit: 10 };

async function showCases() {
  const key = document.getElementById("probe-key").value;
  try {
    const page = await api(`/api/probe/cases?offset=${probePage.offset}&limit=${probePage.limit}` +
      (key ? `&key=${encodeURIComponent(key)}` : ""));
    const blocks = [];
    for (const c of page.cases) {
      const pairs = c.qa.map((q) => el("li", {}, el("strong", {}, q.question), " ", q.answer,
        el("span", { class: "meta" }, ` (${q.qa_id} · ${q.model} · prompt ${q.prompt_hash ?? "-"} · ` +
          `${q.source ? q.source.file + " row " + q.source.row : ""})`)));
      blocks.push(el("div", { class: "case" }, await image(c.image, { alt: c.item_id }),
        el("div", {}, el("h4", {}, `${c.label} taken for ${c.prediction} (score ${c.score.toFixed(2)})`),
          el("div", { class: "meta" }, `${c.item_id}${c.id ? " · id " + c.id : ""} · factor ${c.factor ?? "-"} (${c.factor_status})`),
          el("p", {}, c.explanation ?? ""), el("ul", {}, pairs))));
    }
    show("probe-cases", ...(blocks.length ? blocks : [el("p", {}, "No failure cases.")]));
    pager("probe-pager", page, probePage, showCases);
  } catch (err) { show("probe-cases", failure(err)); }
}

function pager(id, page, cursor, reload) {
  const buttons = [];
  if (cursor.offset > 0) buttons.push(el("button", { onclick: () => { cursor.offset = Math.max(0, cursor.offset - cursor.limit); reload(); } }, "previous"));
  buttons.push(el("span", {}, ` ${Math.min(page.total, cursor.offset + 1)}-${Math.min(page.total, cursor.offset + cursor.limit)} of ${page.total} `));
  if (cursor.offset + cursor.limit < page.total) buttons.push(el("button", { onclick: () => { cursor.offset += cursor.limit; reload(); } }, "next"));
  show(id, ...buttons);
}

async function loadProbe() {
  const select = document.getElementById("probe-key");
  try {
    const { keys } = await api("/api/probe/keys");
    for (const k of keys) select.append(el("option", { value: k.key }, `${k.key} (${k.cases})`));
  } catch (err) { show("probe-cases", failure(err)); }
  select.addEventListener("change", () => { probePage.offset = 0; showCases(); });
  showCases();
}

// ---------------------------------------------------------------- clips

const clipPage = { offset: 0, limit: 20 };

async function showClip(n) {
  try {
    const clip = await api(`/api/clips/${n}`);
    const frames = await Promise.all(clip.frames.map((url, i) => image(url, { alt: `frame ${i}` })));
    show("clip-view", el("h3", {}, clip.clip_id), el("p", {}, clip.text),
      el("p", { class: "meta" }, `${clip.split} · ${clip.n_frames} frames${clip.note ? " · " + clip.note : ""}`),
      el("div", { class: "frames" }, frames));
  } catch (err) { show("clip-view", failure(err)); }
}

async function loadClips() {
  try {
    const page = await api(`/api/clips?offset=${clipPage.offset}&limit=${clipPage.limit}`);
    show("clip-list", el("ul", {}, page.clips.map((c) =>
      el("li", {}, el("span", { class: "clip", onclick: () => showClip(c.clip) }, c.clip_id), ` (${c.split}): ${c.text}`))));
    pager("clip-pager", page, clipPage, loadClips);
    if (page.failed) {
      const failed = await api(`/api/clips/failed?limit=200`);
      show("clip-failed", el("details", {}, el("summary", {}, `${failed.total} clip(s) failed`),
        el("ul", {}, failed.failed.map((f) => el("li", { "data-code": f.reason_code },
          el("strong", {}, f.clip_id || f.file), ` (${f.file}): ${f.reason_code}: ${f.reason}`)))));
    } else show("clip-failed");
    if (page.clips.length && !document.getElementById("clip-view").childElementCount) showClip(page.clips[0].clip);
  } catch (err) { show("clip-list", failure(err)); }
}

const loaders = {
  sku_index: () => dropZone("sku-drop", "sku-file", searchSkus),
  speaker_embed: loadSpeakers,
  kline_factor: loadKline,
  probe_qa: loadProbe,
  video_frames: loadClips,
};

start();
