// imagegen playground: submits async jobs, follows them (SSE, or polling), shows the images.
// Everything the server sends is written with textContent or as attributes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imagegen.apiKey";
const GALLERY_STORE = "imagegen.gallery";
let current = null; // {id, source, timer}
let lastSeed = null;

// X-Requested-With marks the page's own calls: the server refuses a state-changing request that
// carries neither a credential, a JSON body nor this header (what a cross-site form would send).
function headers(json = false) {
  const h = { "X-Requested-With": "imagegen-playground" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

async function explain(response) {
  let body = {};
  try { body = await response.json(); } catch { /* not JSON */ }
  const message = (body.error && body.error.message) || response.statusText;
  if (response.status === 429) {
    return `Rate limited: ${message} Try again in ${response.headers.get("Retry-After") || "a few"} s.`;
  }
  if (response.status === 401) return "This server needs an API key: enter it above.";
  if (response.status === 503) return `Busy: ${message}`;
  return message;
}

function fillSizes(max, preferred, select) {
  select.replaceChildren();
  for (let size = 64; size <= max; size *= 2) {
    const option = new Option(`${size}`, `${size}`, false, size === preferred);
    select.add(option);
  }
}

let models = {}; // id -> what /models says: family, the fields it takes, defaults, limits

async function loadConfig() {
  const info = await (await fetch("/", { headers: headers() })).json();
  const limits = info.limits;
  fillSizes(limits.max_width, limits.default_width, $("width"));
  fillSizes(limits.max_height, limits.default_height, $("height"));
  $("steps").max = limits.max_steps;
  $("steps").value = limits.default_steps;
  $("num_images").max = limits.max_images_per_request;
  // In production `/` names no models (an id can be a server path); key holders read them from /models.
  const response = await fetch("/models", { headers: headers() });
  const listed = response.ok ? (await response.json()).models : [];
  models = Object.fromEntries(listed.map((m) => [m.id, m]));
  const ids = info.models ?? listed.map((m) => m.id);
  $("model").replaceChildren(...ids.map((m) => new Option(m, m)));
  chooseModel();
}

// Shows only the fields the chosen model takes, with its defaults and limits.
function chooseModel() {
  const model = models[$("model").value];
  if (!model || !model.fields) return;
  $("negative_prompt_field").hidden = model.fields.negative_prompt === "none";
  $("guidance_scale_field").hidden = model.fields.guidance_scale === "none";
  $("prompt_2_field").hidden = model.fields.prompt_2 === "none";
  fillSizes(model.limits.max_width, model.defaults.width, $("width"));
  fillSizes(model.limits.max_height, model.defaults.height, $("height"));
  $("steps").max = model.limits.max_steps;
  $("steps").value = model.defaults.steps;
  $("guidance_scale").value = model.defaults.guidance_scale;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    width: Number($("width").value),
    height: Number($("height").value),
    steps: Number($("steps").value),
    num_images: Number($("num_images").value),
    model: $("model").value || undefined,
    async: true,
  };
  // a field the chosen model does not take is hidden, and left out
  if (!$("guidance_scale_field").hidden) body.guidance_scale = Number($("guidance_scale").value);
  if (!$("negative_prompt_field").hidden && $("negative_prompt").value.trim()) body.negative_prompt = $("negative_prompt").value;
  if (!$("prompt_2_field").hidden && $("prompt_2").value.trim()) body.prompt_2 = $("prompt_2").value;
  if (!$("seed_random").checked && $("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function figure(image, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = caption;
  img.width = image.width;
  img.height = image.height;
  const text = document.createElement("figcaption");
  text.textContent = `${caption} — seed ${image.seed}, ${image.width}×${image.height} `;
  const link = document.createElement("a");
  link.href = image.url;
  link.download = `imagegen-${image.seed}.png`;
  link.textContent = "download";
  text.append(link);
  fig.append(img, text);
  return fig;
}

function show(job) {
  const p = job.parameters;
  const caption = `${p.prompt} (${p.steps} steps, guidance ${p.guidance_scale})`;
  $("results").replaceChildren(...job.images.map((image) => figure(image, caption)));
  lastSeed = job.images[0].seed;
  const gallery = JSON.parse(localStorage.getItem(GALLERY_STORE) || "[]");
  gallery.unshift({ caption, images: job.images });
  localStorage.setItem(GALLERY_STORE, JSON.stringify(gallery.slice(0, 12)));
  renderGallery();
}

function renderGallery() {
  const gallery = JSON.parse(localStorage.getItem(GALLERY_STORE) || "[]");
  $("gallery").replaceChildren(...gallery.flatMap((entry) => entry.images.map((i) => figure(i, entry.caption))));
}

function update(job) {
  if (job.status === "queued") {
    say(`Queued — position ${job.position ?? "?"}.`);
  } else if (job.status === "running") {
    $("progress").hidden = false;
    $("progress").value = job.progress || 0;
    say(`Generating — step ${job.step || 0} of ${job.total_steps}` +
        (job.eta_seconds != null ? `, about ${Math.ceil(job.eta_seconds)} s left.` : "."));
  }
}

function finish(job) {
  stopFollowing();
  $("progress").hidden = true;
  $("cancel").disabled = true;
  $("generate").disabled = false;
  if (job.status === "succeeded") {
    say(`Done in ${job.timings.total_seconds.toFixed(2)} s.`);
    show(job);
  } else if (job.status === "cancelled") {
    say("Cancelled.");
  } else {
    say(`Failed: ${(job.error && job.error.message) || "unknown error"}`, true);
  }
}

function stopFollowing() {
  if (!current) return;
  if (current.source) current.source.close();
  if (current.timer) clearTimeout(current.timer);
}

function poll(id) {
  fetch(`/jobs/${id}`, { headers: headers() })
    .then((r) => r.json())
    .then((job) => {
      if (["succeeded", "failed", "cancelled"].includes(job.status)) finish(job);
      else { update(job); current.timer = setTimeout(() => poll(id), 400); }
    })
    .catch(() => { current.timer = setTimeout(() => poll(id), 1000); });
}

function follow(job) {
  current = { id: job.id };
  update(job);
  // EventSource cannot send an API key header: with a key, poll instead.
  if (!window.EventSource || $("api_key").value.trim()) return poll(job.id);
  const source = new EventSource(`/jobs/${job.id}/events`);
  current.source = source;
  source.addEventListener("progress", (e) => update(JSON.parse(e.data)));
  source.addEventListener("done", (e) => finish(JSON.parse(e.data)));
  source.onerror = () => { source.close(); current.source = null; poll(job.id); };
}

async function generate(event) {
  event.preventDefault();
  if (!$("prompt").value.trim()) { say("Enter a prompt first.", true); $("prompt").focus(); return; }
  $("generate").disabled = true;
  $("results").replaceChildren();
  say("Submitting…");
  const response = await fetch("/generate", { method: "POST", headers: headers(true), body: JSON.stringify(requestBody()) });
  if (response.status !== 202 && response.status !== 200) {
    say(await explain(response), true);
    $("generate").disabled = false;
    return;
  }
  const job = await response.json();
  if (job.status === "succeeded") return finish(job); // served from the result cache
  $("cancel").disabled = false;
  follow(job);
}

async function cancel() {
  if (!current) return;
  const response = await fetch(`/jobs/${current.id}`, { method: "DELETE", headers: headers() });
  if (!response.ok) say(await explain(response), true);
}

document.addEventListener("DOMContentLoaded", () => {
  $("api_key").value = localStorage.getItem(KEY_STORE) || "";
  $("api_key").addEventListener("change", () => localStorage.setItem(KEY_STORE, $("api_key").value.trim()));
  $("seed_random").addEventListener("change", () => { $("seed").disabled = $("seed_random").checked; });
  $("reuse").addEventListener("click", () => {
    if (lastSeed == null) return say("No seed yet: generate an image first.");
    $("seed_random").checked = false;
    $("seed").disabled = false;
    $("seed").value = lastSeed;
  });
  $("form").addEventListener("submit", generate);
  $("model").addEventListener("change", chooseModel);
  $("cancel").addEventListener("click", cancel);
  renderGallery();
  loadConfig().catch(() => say("Could not read the server's limits.", true));
});
