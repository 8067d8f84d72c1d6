// ditkit serve: the page. Plain JS, no build step; the server checks every value and its messages are
// shown as they are (the page does no validation of its own, so the two never disagree).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  runs: [], runsKey: "", model: null, job: null, source: null, tab: "play", maskDirty: false, image: null,
  firstFrame: null,  // the uploaded first frame of a video run, as a data URL
  modelTicket: 0,  // the latest model asked for: an answer for an earlier choice is dropped
};

// ------------------------------------------------------------------------------------------ helpers
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error("the server cannot be reached: is `ditkit serve` still running?");
  }
  const data = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function fitPixels(img) {
  // small samples enlarged by a whole factor (sharp pixels), within about 512 x 384
  const scale = Math.max(1, Math.floor(Math.min(512 / img.naturalWidth, 384 / img.naturalHeight)));
  img.style.width = `${img.naturalWidth * scale}px`;
}

function option(select, value, label) {
  select.append(el("option", { value, text: label }));
}

// ------------------------------------------------------------------------------------------ runs and models
function currentRun() {
  return state.runs.find((r) => r.id === $("run").value);
}

async function loadRuns(keepSelection = true) {
  const data = await api("/api/runs");
  const key = JSON.stringify(data.runs);
  if (key === state.runsKey) { refreshCurves(); return; }  // same runs, checkpoints and pictures
  state.runsKey = key;
  const before = $("run").value;
  state.runs = data.runs;
  $("run").replaceChildren();
  for (const run of data.runs) option($("run"), run.id, run.id);
  if (keepSelection && data.runs.some((r) => r.id === before)) $("run").value = before;
  fillCheckpoints();
  renderRuns();
}

function fillCheckpoints(choose) {
  const run = currentRun();
  const select = $("checkpoint");
  const before = choose || select.value;
  select.replaceChildren();
  if (!run) return;
  const ckpts = [...run.checkpoints].reverse();  // newest first
  ckpts.forEach((c, i) => option(select, c.name, (c.step === null ? c.name : `step ${c.step}`) + (i === 0 ? " (newest)" : "")));
  if (ckpts.some((c) => c.name === before)) select.value = before;
}

async function loadModel() {
  const run = currentRun();
  if (!run || !run.checkpoints.length) {
    $("model-info").textContent = run ? "this run has no checkpoint yet" : "no runs found";
    state.model = null;
    return;
  }
  $("model-info").textContent = "loading the model…";
  showError("");  // a message about the run before is no longer about this one
  const ticket = ++state.modelTicket;
  state.model = null;  // nothing is sent for a model still loading
  const q = new URLSearchParams({ run: run.id, checkpoint: $("checkpoint").value, ema: $("ema").checked });
  try {
    const m = await api("/api/model?" + q);
    if (ticket !== state.modelTicket) return;
    state.model = m;
    const [h, w] = m.image_size;
    $("model-info").textContent = `${m.kind} run, ${h}×${w}×${m.channels}` +
      (m.conditional ? `, ${m.num_classes} ${m.kind === "text" ? "captions" : "classes"}` : ", unconditional");
    applyModel(m);
  } catch (err) {
    if (ticket !== state.modelTicket) return;
    $("model-info").textContent = "";
    showError(err.message);
  }
}

function applyModel(m) {
  const text = m.kind === "text";
  $("prompt-row").hidden = !text;
  $("class-row").hidden = text || !m.conditional;
  $("frames-row").hidden = m.kind !== "video";
  $("lora-row").hidden = !m.adapter;
  $("first-frame-row").hidden = !m.first_frame;
  $("first-frame-form").textContent = m.first_frame === "trained"
    ? "kept exactly: this run was trained with frame conditioning (context_share)"
    : m.first_frame ? "kept exactly, the other frames inpainted (training-free: this run was not trained with " +
      "frame conditioning, context_share, on one-frame tubelets)" : "";
  fillAdapters(m.adapter_choices || [], $("run").value);
  const classes = $("classes");
  const before = classes.value;
  classes.replaceChildren();
  option(classes, "all", "all classes (up to 10)");
  for (let k = 0; k < m.num_classes; k++) {
    const name = m.class_names[k];
    option(classes, String(k), name !== undefined && name !== String(k) ? `${k}: ${name}` : String(k));
  }
  if ([...classes.options].some((o) => o.value === before)) classes.value = before;
  if (text && !$("prompts").value && m.class_names.length) $("prompts").value = m.class_names[0];
  const sampler = $("sampler");
  sampler.replaceChildren();
  for (const s of m.samplers) option(sampler, s, s);
  const d = m.defaults || {};
  if (d.sampler) sampler.value = d.sampler;
  $("steps").placeholder = d.steps ?? "";
  $("cfg").placeholder = d.cfg ?? "";
  $("cfg").disabled = !m.conditional;
  if (!$("steps").value && d.steps) $("steps").value = d.steps;
  if (!$("cfg").value && d.cfg !== undefined && d.cfg !== null) $("cfg").value = d.cfg;
  if (state.image) drawImage(state.image);
}

function fillAdapters(choices, run) {
  // the served adapter runs on the loaded adapter run's base: a tick and a weight each (kept while the
  // same run is reloaded, e.g. another checkpoint; another run starts with none ticked)
  const list = $("adapter-list");
  const before = list.dataset.run === run ? chosenAdapters() : {};
  list.dataset.run = run;
  list.replaceChildren();
  $("adapters-row").hidden = !choices.length;
  for (const c of choices) {
    const tick = el("input", { type: "checkbox", "data-run": c.run, "aria-label": `use adapter ${c.run}` });
    const weight = el("input", { type: "text", inputmode: "decimal", class: "weight", value: "1",
      "aria-label": `weight of adapter ${c.run}` });
    if (c.run in before) { tick.checked = true; weight.value = before[c.run]; }
    if (c.why) { tick.disabled = weight.disabled = true; }
    const row = el("label", { class: "adapter", title: c.why || `compose ${c.run} at this weight` },
      tick, el("span", { class: "name", text: c.run }), weight);
    list.append(row);
    if (c.why) list.append(el("p", { class: "muted", text: c.why }));
  }
}

function chosenAdapters() {
  const out = {};
  for (const tick of document.querySelectorAll("#adapter-list input[type=checkbox]")) {
    if (tick.checked && !tick.disabled) out[tick.dataset.run] = tick.closest("label").querySelector(".weight").value;
  }
  return out;
}

// ------------------------------------------------------------------------------------------ sampling
function settings() {
  const m = state.model || {};
  const body = {
    run: $("run").value, checkpoint: $("checkpoint").value, ema: $("ema").checked,
    n: $("n").value, sampler: $("sampler").value, steps: $("steps").value, cfg: m.conditional ? $("cfg").value : "",
    seed: $("seed").value,
  };
  const lo = $("cfg-lo").value.trim(), hi = $("cfg-hi").value.trim();
  if (lo || hi) body.cfg_interval = [lo || "0", hi || "1"];
  if (m.kind === "text") {
    body.prompts = $("prompts").value;
    state.prompts = body.prompts.split("\n").map((p) => p.trim()).filter((p) => p);
  }
  else if (m.conditional) body.classes = $("classes").value;
  if (m.kind === "video") body.frames = $("frames").value;
  if (m.first_frame && state.firstFrame) body.first_frame = state.firstFrame;
  if (m.adapter) {
    body.lora_scale = $("lora-scale").value;
    body.adapters = chosenAdapters();
  }
  return body;
}

async function submit(kind) {
  showError("");
  if (!state.model) { showError("no model loaded: choose a run with a checkpoint"); return; }
  const body = settings();
  if (kind === "edit") {
    if (!state.image) { showError("upload an image to edit"); return; }
    body.image = state.image.src;
    if (state.maskDirty) body.mask = maskDataURL();
    body.strength = $("strength").value;
    if (body.classes === "all") delete body.classes;
  }
  busy(true);
  $("status").textContent = "sending…";
  try {
    const job = await api("/api/" + kind, body);
    follow(job.job);
  } catch (err) {
    busy(false);
    $("status").textContent = "";
    showError(err.message);
  }
}

function busy(on) {
  $("generate").disabled = on;
  $("edit-btn").disabled = on;
  $("cancel").disabled = !on;
  $("progress").hidden = !on;
}

function follow(id) {
  state.job = id;
  $("results").replaceChildren();
  showNotes([]);
  $("preview-box").hidden = true;
  const source = new EventSource(`/api/jobs/${id}/events`);
  state.source = source;
  source.onmessage = (event) => {
    const s = JSON.parse(event.data);
    update(s);
    if (["done", "error", "cancelled"].includes(s.status)) { source.close(); busy(false); }
  };
  source.onerror = () => {
    source.close();
    busy(false);
    showError("lost the connection to the server while sampling");
  };
}

function update(s) {
  const bar = $("progress");
  if (s.status === "queued") {
    $("status").textContent = `queued: ${s.position} request(s) ahead`;
  } else if (s.status === "running") {
    $("status").textContent = s.total ? `sampling: step ${s.step} of ${s.total}` : "sampling…";
    bar.max = Math.max(1, s.total); bar.value = s.step;
    if (s.previews > 0) {
      $("preview").src = `/api/jobs/${s.id}/preview?n=${s.previews}`;
      $("preview-box").hidden = false;
    }
  } else if (s.status === "cancelled") {
    $("status").textContent = "cancelled";
  } else if (s.status === "error") {
    $("status").textContent = "failed";
    showError(s.error);
  } else if (s.status === "done") {
    showResult(s);
  }
}

function showNotes(notes) {
  $("notes").replaceChildren(...notes.map((n) => el("li", { text: `note: ${n}` })));
  $("notes").hidden = !notes.length;
}

function showResult(s) {
  $("preview-box").hidden = true;
  showNotes(s.notes || []);
  const st = s.settings || {};
  const facts = ["sampler", "steps", "cfg", "strength", "frame_conditioning", "adapters"].filter((k) => st[k] !== undefined && st[k] !== null)
    .map((k) => `${k.replace("_", " ")} ${st[k]}`).join(", ");
  const what = typeof st.what === "string" ? `${st.what} ` : "";  // edits: inpainted, edited, ...-controlled
  $("status").textContent = `${s.images.length} ${what}sample(s)` + (facts ? ` — ${facts}` : "");
  const ext = s.media === "image/gif" ? "gif" : "png";
  const grid = el("img", { src: s.grid, class: "grid pix", alt: "all samples in a grid", id: "result-grid" });
  grid.addEventListener("load", () => fitPixels(grid));
  const samples = el("div", { class: "samples" });
  // text runs: labels index the prompts sent; class runs: the class names
  const names = (state.model && state.model.kind === "text" ? state.prompts : state.model && state.model.class_names) || [];
  s.images.forEach((url, i) => {
    const label = s.labels[i];
    const known = state.model && state.model.conditional && label !== undefined && label < names.length;
    const caption = known ? (names[label] !== undefined ? String(names[label]) : `class ${label}`) : `#${i + 1}`;
    samples.append(el("div", { class: "sample" },
      el("img", { src: url, class: "pix result", alt: `sample ${i + 1}` }),
      el("span", { text: caption.length > 24 ? caption.slice(0, 24) + "…" : caption, title: caption }),
      el("a", { href: url, download: `sample-${s.id}-${i + 1}.${ext}`, text: "download" })));
  });
  const link = el("div", {}, el("a", { href: s.grid, download: `samples-${s.id}.${ext}`, text: "download grid" }));
  // one column (one class or prompt): the row of samples below says it all
  $("results").replaceChildren(...(s.ncol > 1 ? [grid] : []), link, samples);
}

async function cancel() {
  if (!state.job) return;
  try { await api(`/api/jobs/${state.job}/cancel`, {}); } catch (err) { showError(err.message); }
}

// ------------------------------------------------------------------------------------------ editing
function drawImage(img) {
  const canvas = $("edit-image");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);  // shown at the size it is sampled: square, resized
}

function readFile(input, then) {
  const file = input.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => then(img);
    img.onerror = () => showError(`${file.name} could not be read as an image`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearMask() {
  const c = $("edit-mask");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  state.maskDirty = false;
}

const MASK_COLOUR = [255, 64, 64];  // how the painted part shows over the image

function maskDataURL() {
  // what the server reads: white (regenerate) where painted, black (keep) elsewhere
  const c = $("edit-mask");
  const out = document.createElement("canvas");
  out.width = c.width; out.height = c.height;
  const data = c.getContext("2d").getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const v = data.data[i + 3] >= 128 ? 255 : 0;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = v;
    data.data[i + 3] = 255;
  }
  out.getContext("2d").putImageData(data, 0, 0);
  return out.toDataURL("image/png");
}

function setupMaskPainting() {
  const c = $("edit-mask");
  const ctx = c.getContext("2d");
  let last = null;
  const at = (e) => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
  };
  const paint = (e) => {
    if (!last) return;
    const [x, y] = at(e);
    ctx.strokeStyle = `rgb(${MASK_COLOUR.join(",")})`;
    ctx.lineWidth = $("brush").value;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(x, y);
    ctx.stroke();
    last = [x, y];
    state.maskDirty = true;
  };
  c.addEventListener("pointerdown", (e) => { last = at(e); c.setPointerCapture(e.pointerId); paint(e); });
  c.addEventListener("pointermove", paint);
  c.addEventListener("pointerup", () => { last = null; });
}

// ------------------------------------------------------------------------------------------ run browser
function lossCurve(columns) {
  const W = 420, H = 180, P = 36;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "curve");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const steps = columns.step || [], loss = columns.loss || [];
  const text = (x, y, s, anchor = "start") => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
    t.textContent = s;
    svg.append(t);
  };
  if (steps.length < 2) { text(W / 2, H / 2, "no loss values yet", "middle"); return svg; }
  const lo = Math.min(...loss), hi = Math.max(...loss), s0 = steps[0], s1 = steps[steps.length - 1];
  const x = (s) => P + (W - P - 8) * (s - s0) / Math.max(1e-9, s1 - s0);
  const y = (v) => 8 + (H - P - 8) * (1 - (v - lo) / Math.max(1e-12, hi - lo));
  const line = (values, cls) => {
    const path = document.createElementNS(svg.namespaceURI, "polyline");
    path.setAttribute("class", cls);
    path.setAttribute("points", values.map((v, i) => `${x(steps[i]).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    svg.append(path);
  };
  line(loss, "raw");
  const smooth = [];  // exponential moving average over about a tenth of the points
  const w = Math.min(0.95, Math.max(0, 1 - 10 / loss.length));
  loss.forEach((v, i) => smooth.push(i ? w * smooth[i - 1] + (1 - w) * v : v));
  line(smooth, "smooth");
  text(2, 14, hi.toPrecision(3));
  text(2, H - P, lo.toPrecision(3));
  text(P, H - 8, `step ${s0}`);
  text(W - 8, H - 8, `step ${s1}  loss ${loss[loss.length - 1].toPrecision(3)}`, "end");
  return svg;
}

function fileURL(run, path) {
  return "/api/file?" + new URLSearchParams({ run, path, t: Date.now() });
}

function renderRuns() {
  const list = $("run-list");
  list.replaceChildren();
  if (!state.runs.length) list.append(el("p", { class: "muted", text: "No runs found (yet)." }));
  for (const run of state.runs) {
    const ckpts = el("ul", { class: "ckpts" });
    for (const c of [...run.checkpoints].reverse()) {
      const use = el("button", { type: "button", text: "Sample from this" });
      use.addEventListener("click", async () => {
        $("run").value = run.id;
        fillCheckpoints(c.name);
        switchTab("play");
        await loadModel();
      });
      ckpts.append(el("li", {}, el("span", { text: c.step === null ? c.name : `step ${c.step}` }), use));
    }
    if (!run.checkpoints.length) ckpts.append(el("li", { class: "muted", text: "no checkpoint yet" }));
    const curve = el("div", { class: "curve-box", "data-run": run.id });
    const pictures = el("div", { class: "pictures" });
    for (const p of run.pictures) {
      pictures.append(el("figure", {}, el("img", { src: fileURL(run.id, p), alt: p, "data-path": p }),
        el("figcaption", { class: "muted", text: p })));
    }
    const config = el("details", {}, el("summary", { text: "config" }),
      el("pre", { text: JSON.stringify({ ...run.data, train_config: run.train_config, model: run.model }, null, 2) }));
    list.append(el("div", { class: "run" }, el("h3", { text: run.id }),
      el("div", { class: "row" }, el("div", {}, el("strong", { text: "checkpoints" }), ckpts, config),
        el("div", {}, el("strong", { text: "loss" }), curve), pictures)));
  }
  refreshCurves();
}

async function refreshCurves() {
  for (const box of document.querySelectorAll(".curve-box")) {
    try {
      const data = await api("/api/metrics?" + new URLSearchParams({ run: box.dataset.run }));
      box.replaceChildren(lossCurve(data.columns));
    } catch (err) {
      box.replaceChildren(el("span", { class: "muted", text: err.message }));
    }
  }
  for (const img of document.querySelectorAll(".pictures img")) {
    const run = img.closest(".run").querySelector(".curve-box").dataset.run;
    img.src = fileURL(run, img.dataset.path);
  }
}

// ------------------------------------------------------------------------------------------ tabs, start
function switchTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === tab);
  $("settings").hidden = tab === "runs";
  $("output").hidden = tab === "runs";
  $("runs-view").hidden = tab !== "runs";
  $("edit-controls").hidden = tab !== "edit";
  $("generate").hidden = tab !== "play";
  $("edit-btn").hidden = tab !== "edit";
  if (tab === "runs") loadRuns().catch((err) => showError(err.message));
}

window.addEventListener("DOMContentLoaded", async () => {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => switchTab(b.dataset.tab));
  $("run").addEventListener("change", () => { fillCheckpoints(); loadModel(); });
  $("checkpoint").addEventListener("change", loadModel);
  $("ema").addEventListener("change", loadModel);
  $("generate").addEventListener("click", () => submit("generate"));
  $("edit-btn").addEventListener("click", () => submit("edit"));
  $("cancel").addEventListener("click", cancel);
  $("clear-mask").addEventListener("click", clearMask);
  $("first-frame-file").addEventListener("change", () => readFile($("first-frame-file"), (img) => {
    state.firstFrame = img.src;
    $("first-frame-preview").src = img.src;
    $("first-frame-box").hidden = false;
  }));
  $("clear-first-frame").addEventListener("click", () => {
    state.firstFrame = null;
    $("first-frame-file").value = "";
    $("first-frame-box").hidden = true;
  });
  $("image-file").addEventListener("change", () => readFile($("image-file"), (img) => { state.image = img; drawImage(img); }));
  $("mask-file").addEventListener("change", () => readFile($("mask-file"), (img) => {
    clearMask();
    // an uploaded mask: its light pixels are painted, its dark ones left transparent (keep)
    const c = $("edit-mask"), ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0, c.width, c.height);
    const data = ctx.getImageData(0, 0, c.width, c.height);
    for (let i = 0; i < data.data.length; i += 4) {
      const light = (data.data[i] + data.data[i + 1] + data.data[i + 2]) / 3 >= 128 && data.data[i + 3] >= 128;
      data.data.set(light ? [...MASK_COLOUR, 255] : [0, 0, 0, 0], i);
    }
    ctx.putImageData(data, 0, 0);
    state.maskDirty = true;
  }));
  setupMaskPainting();
  $("preview").addEventListener("load", () => fitPixels($("preview")));
  setInterval(() => {  // live while a run trains: new checkpoints and grids, the loss curve re-read
    if (state.tab === "runs") loadRuns().catch((err) => showError(err.message));
  }, 5000);
  try {
    await loadRuns(false);
    await loadModel();
  } catch (err) {
    showError(err.message);
  }
});
