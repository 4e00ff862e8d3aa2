// imagegen playground: submits async jobs, follows them (SSE, or polling), shows the images; edits
// an image with a painted mask, a strength or outpaint margins (sent as a form, as files).
// Everything the server sends is written with textContent or as attributes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imagegen.apiKey";
const GALLERY_STORE = "imagegen.gallery";
const NEEDS_KEY = "This server needs an API key: enter it in the API key field.";
let current = null; // {id, source, timer}
let lastSeed = null;

// The browser marks the page's own calls with its origin, which the server accepts as its own.
function headers(json = false) {
  const h = {};
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
  const message = (body.error && body.error.message) || body.errors || response.statusText; // native, or A1111's shape
  if (response.status === 429) {
    return `Rate limited: ${message} Try again in ${response.headers.get("Retry-After") || "a few"} s.`;
  }
  if (response.status === 401) return NEEDS_KEY;
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
let adapters = []; // what /loras lists
let controlnets = []; // what /controlnets lists
let chosen = []; // [{name, weight}] for the next request

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
  if (response.status === 401) {
    say(NEEDS_KEY, true);
    $("api_key").focus();
  } else if ($("message").textContent === NEEDS_KEY) {
    say("");
  }
  const listed = response.ok ? (await response.json()).models : [];
  models = Object.fromEntries(listed.map((m) => [m.id, m]));
  const ids = info.models ?? listed.map((m) => m.id);
  $("model").replaceChildren(...ids.map((m) => new Option(m, m)));
  const loras = await fetch("/loras", { headers: headers() });
  adapters = loras.ok ? (await loras.json()).loras : [];
  const controls = await fetch("/controlnets", { headers: headers() });
  const control = controls.ok ? await controls.json() : { controlnets: [], preprocessors: [] };
  controlnets = control.controlnets;
  const runnable = control.preprocessors.filter((p) => p.available);
  $("control_preprocessor").replaceChildren(...runnable.map((p) => new Option(`${p.name}: ${p.description}`, p.name)));
  const upscalers = await fetch("/upscalers", { headers: headers() });
  const names = upscalers.ok ? (await upscalers.json()).upscalers.map((u) => u.name) : ["Latent"];
  $("hires_upscaler").replaceChildren(...names.map((name) => new Option(name, name)));
  chooseModel();
  document.body.dataset.ready = "true"; // the form holds the server's defaults: what a user types now stays
}

// The adapters that fit the chosen model (by the family their header tells), and the chosen ones.
function showAdapters() {
  const model = models[$("model").value];
  const family = model && model.family ? model.family.replace(/-inpaint$/, "").replace(/^flux-.*/, "flux") : null;
  const fitting = adapters.filter((a) => !a.family || !family || a.family === family);
  const takes = !model || !model.adapters || model.adapters.includes("lora");
  $("loras_field").hidden = !takes || fitting.length === 0;
  const steering = controlnets.filter((c) => !family || c.family === family);
  const controlled = model && model.adapters && model.adapters.includes("controlnet");
  $("control_field").hidden = !controlled || steering.length === 0;
  $("control_model").replaceChildren(...steering.map((c) => new Option(c.name, c.name)));
  $("lora").replaceChildren(...fitting.map((a) => new Option(a.trigger_words.length ? `${a.name} (${a.trigger_words.join(", ")})` : a.name, a.name)));
  chosen = chosen.filter((c) => fitting.some((a) => a.name === c.name));
  $("lora_list").replaceChildren(...chosen.map((c, i) => {
    const item = document.createElement("li");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "remove";
    remove.addEventListener("click", () => { chosen.splice(i, 1); showAdapters(); });
    item.append(`${c.name} × ${c.weight} `, remove);
    return item;
  }));
}

function addAdapter() {
  const name = $("lora").value;
  if (!name) return;
  chosen = chosen.filter((c) => c.name !== name);
  chosen.push({ name, weight: Number($("lora_weight").value) });
  showAdapters();
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
  $("step_cache").replaceChildren(...model.step_cache.map((level) => new Option(level, level, false, level === model.defaults.step_cache)));
  showAdapters();
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
  if (chosen.length && !$("loras_field").hidden) body.loras = chosen;
  if ($("hires_on").checked) {
    body.hires = {
      scale: Number($("hires_scale").value),
      upscaler: $("hires_upscaler").value,
      strength: Number($("hires_strength").value),
    };
  }
  if ($("tiling").checked) body.tiling = true;
  if ($("step_cache").value) body.step_cache = $("step_cache").value;
  if ($("control_on").checked && !$("control_field").hidden) {
    body.control = [{
      model: $("control_model").value,
      image: $("control_canvas").toDataURL("image/png"),
      preprocessor: $("control_preprocessor").value,
      weight: Number($("control_weight").value),
      start: Number($("control_start").value),
      end: Number($("control_end").value),
    }];
  }
  return body;
}

// The control pad: white strokes on black (a map as it is), or an image loaded onto it.
let controlPoint = null;
function clearControl() {
  const canvas = $("control_canvas");
  const pen = canvas.getContext("2d");
  pen.fillStyle = "black";
  pen.fillRect(0, 0, canvas.width, canvas.height);
  $("control_map").hidden = true;
}

function drawControl(event) {
  const canvas = $("control_canvas");
  const box = canvas.getBoundingClientRect();
  const point = [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  const pen = canvas.getContext("2d");
  pen.strokeStyle = "white";
  pen.lineWidth = 8;
  pen.lineCap = "round";
  pen.beginPath();
  pen.moveTo(...(controlPoint || point));
  pen.lineTo(...point);
  pen.stroke();
  controlPoint = point;
}

async function loadControl(file) {
  const image = await createImageBitmap(file);
  const canvas = $("control_canvas");
  clearControl();
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  if ($("control_preprocessor").value === "none") $("control_preprocessor").value = "canny";
}

async function showControlMap() {
  const image = $("control_canvas").toDataURL("image/png").split(",")[1];
  const body = {
    controlnet_module: $("control_preprocessor").value,
    controlnet_input_images: [image],
    controlnet_processor_res: Math.min(Number($("width").value), Number($("height").value)),
  };
  const response = await fetch("/controlnet/detect", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!response.ok) return say(await explain(response), true);
  $("control_map").src = `data:image/png;base64,${(await response.json()).images[0]}`;
  $("control_map").hidden = false;
}

function figure(image, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = caption;
  img.width = image.width;
  img.height = image.height;
  const text = document.createElement("figcaption");
  const seed = image.seed != null ? `seed ${image.seed}, ` : "";
  text.textContent = `${caption} — ${seed}${image.width}×${image.height} `;
  const link = document.createElement("a");
  link.href = image.url;
  link.download = `imagegen-${image.seed}.png`;
  link.textContent = "download";
  const edit = document.createElement("button");
  edit.type = "button";
  edit.className = "edit";
  edit.textContent = "Edit this result";
  edit.addEventListener("click", () => editResult(image.url));
  const larger = document.createElement("button");
  larger.type = "button";
  larger.className = "upscale";
  larger.textContent = "Upscale ×2";
  larger.addEventListener("click", () => submit("/upscale", JSON.stringify({ image: image.url, scale: 2, async: true }), true));
  text.append(link, " ", edit, " ", larger);
  fig.append(img, text);
  return fig;
}

function show(job) {
  const p = job.parameters;
  const mode = p.mode && p.mode !== "txt2img" ? `${p.mode}: ` : "";
  const styles = (p.loras || []).map(({ name, weight }) => ` <${name}:${weight}>`).join("");
  const steering = (p.control || []).map(({ model, weight }) => `, ControlNet ${model} × ${weight}`).join("");
  const caption = p.mode === "upscale"
    ? `upscaled by ${p.upscaler}`
    : `${mode}${p.prompt}${styles} (${p.steps} steps, guidance ${p.guidance_scale}${steering})`;
  $("results").replaceChildren(...job.images.map((image) => figure(image, caption)));
  if (job.images[0].seed != null) lastSeed = job.images[0].seed;
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
    // polled (with a key): its latest preview, fetched with the key, once per step it shows
    if (current && !current.source && job.preview && job.preview.step !== current.previewStep) {
      current.previewStep = job.preview.step;
      fetch(job.preview.url, { headers: headers() })
        .then((r) => (r.ok ? r.blob() : null))
        .then((blob) => blob && showPreview(URL.createObjectURL(blob), job.preview.step));
    }
  }
}

// The image forming, in the place its result will take.
function showPreview(src, step) {
  const img = document.createElement("img");
  img.src = src;
  img.id = "preview";
  img.alt = `The image forming, at step ${step}`;
  const shown = document.createElement("figure");
  shown.className = "forming";
  const caption = document.createElement("figcaption");
  caption.textContent = `forming — step ${step}`;
  shown.append(img, caption);
  $("results").replaceChildren(shown);
}

function finish(job) {
  stopFollowing();
  if ($("preview")) $("results").replaceChildren(); // the image forming is gone with its job
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
  source.addEventListener("preview", (e) => {
    const preview = JSON.parse(e.data);
    showPreview(preview.image, preview.step);
  });
  source.addEventListener("done", (e) => finish(JSON.parse(e.data)));
  source.onerror = () => { source.close(); current.source = null; poll(job.id); };
}

// ----- editing: the image, the mask painted over it, and the form they are sent in -----

let editing = null; // {blob, url} of the image to edit
let strengthTouched = false; // a mask or margins set the strength to 1 until the user moves it

function showSource(blob) {
  const img = $("source");
  img.onload = () => {
    $("mask").width = img.naturalWidth;
    $("mask").height = img.naturalHeight;
    $("input_pane").hidden = false;
    $("edit_tools").hidden = false;
  };
  img.onerror = () => say("This browser cannot show that file; the server will judge it when you press Generate.", true);
  if (editing) URL.revokeObjectURL(editing.url);
  editing = { blob, url: URL.createObjectURL(blob) };
  img.src = editing.url;
}

async function editResult(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) return say(await explain(response), true);
  showSource(await response.blob());
  say("Editing that result: paint over what to repaint, or set a strength or margins, then Generate.");
  $("prompt").focus();
}

function removeImage() {
  if (editing) URL.revokeObjectURL(editing.url);
  editing = null;
  $("image_file").value = "";
  $("input_pane").hidden = true;
  $("edit_tools").hidden = true;
}

function maskPixels() {
  const canvas = $("mask");
  return canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
}

function maskPainted() {
  const data = maskPixels().data;
  for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
  return false;
}

function fullStrength() {
  if (strengthTouched) return;
  $("strength").value = "1";
  $("strength_value").textContent = "1";
}

let lastPoint = null;

function paint(event) {
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  const point = [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  const pen = canvas.getContext("2d");
  pen.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
  pen.strokeStyle = "rgb(255, 0, 200)";
  pen.lineWidth = Number($("brush").value);
  pen.lineCap = "round";
  pen.beginPath();
  pen.moveTo(...(lastPoint || point));
  pen.lineTo(point[0] + 0.01, point[1]);
  pen.stroke();
  lastPoint = point;
  if (!$("erase").checked) fullStrength();
}

function invertMask() {
  const pixels = maskPixels();
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    data[i] = 255; data[i + 1] = 0; data[i + 2] = 200;
    data[i + 3] = data[i + 3] >= 128 ? 0 : 255;
  }
  $("mask").getContext("2d").putImageData(pixels, 0, 0);
}

// The mask as the server reads it: white where painted, black elsewhere.
function maskBlob() {
  const pixels = maskPixels();
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const value = data[i + 3] >= 128 ? 255 : 0;
    data[i] = data[i + 1] = data[i + 2] = value;
    data[i + 3] = 255;
  }
  const out = document.createElement("canvas");
  out.width = pixels.width;
  out.height = pixels.height;
  out.getContext("2d").putImageData(pixels, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function editForm() {
  const body = requestBody();
  delete body.width; // the image's size
  delete body.height;
  delete body.hires; // an edit is made at its image's size
  if (!body.prompt.trim()) delete body.prompt; // an image alone: a variation
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) {
    if (value !== undefined) form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  form.append("image", editing.blob, "image");
  form.append("strength", $("strength").value);
  const sides = ["left", "right", "top", "bottom"];
  const margins = Object.fromEntries(sides.map((side) => [side, Number($(`outpaint_${side}`).value) || 0]));
  const outpainting = sides.some((side) => margins[side] > 0);
  if (outpainting && maskPainted()) throw new Error("Paint a mask or set outpaint margins, not both.");
  if (outpainting) form.append("outpaint", JSON.stringify(margins));
  else if (maskPainted()) form.append("mask", await maskBlob(), "mask.png");
  return form;
}

async function generate(event) {
  event.preventDefault();
  if (!$("prompt").value.trim() && !editing) { say("Enter a prompt first.", true); $("prompt").focus(); return; }
  let body;
  try {
    body = editing ? await editForm() : JSON.stringify(requestBody());
  } catch (error) {
    return say(error.message, true);
  }
  return submit("/generate", body, !editing);
}

// Queues a job (a generation, an edit's form, an upscale) and follows it to its images.
async function submit(path, body, json) {
  $("generate").disabled = true;
  $("results").replaceChildren();
  say("Submitting…");
  const response = await fetch(path, { method: "POST", headers: headers(json), body });
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
  $("api_key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api_key").value.trim());
    loadConfig().catch(() => say("Could not read the server's limits.", true)); // the models and adapters a key may see
  });
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
  $("image_file").addEventListener("change", () => { if ($("image_file").files[0]) showSource($("image_file").files[0]); });
  document.querySelector("main").addEventListener("dragover", (event) => event.preventDefault());
  document.querySelector("main").addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files[0]) showSource(event.dataTransfer.files[0]);
  });
  const mask = $("mask");
  mask.addEventListener("pointerdown", (event) => { mask.setPointerCapture(event.pointerId); lastPoint = null; paint(event); });
  mask.addEventListener("pointermove", (event) => { if (mask.hasPointerCapture(event.pointerId)) paint(event); });
  mask.addEventListener("pointerup", () => { lastPoint = null; });
  $("brush").addEventListener("input", () => { $("brush_value").textContent = $("brush").value; });
  $("strength").addEventListener("input", () => { strengthTouched = true; $("strength_value").textContent = $("strength").value; });
  $("hires_strength").addEventListener("input", () => { $("hires_strength_value").textContent = $("hires_strength").value; });
  $("upscale_image").addEventListener("click", () => {
    const form = new FormData();
    form.append("image", editing.blob, "image");
    form.append("scale", "2");
    form.append("async", "true");
    submit("/upscale", form, false);
  });
  for (const side of ["left", "right", "top", "bottom"]) $(`outpaint_${side}`).addEventListener("input", fullStrength);
  $("invert_mask").addEventListener("click", () => { invertMask(); fullStrength(); });
  $("clear_mask").addEventListener("click", () => $("mask").getContext("2d").clearRect(0, 0, mask.width, mask.height));
  $("remove_image").addEventListener("click", removeImage);
  $("add_lora").addEventListener("click", addAdapter);
  const pad = $("control_canvas");
  clearControl();
  pad.addEventListener("pointerdown", (event) => { pad.setPointerCapture(event.pointerId); controlPoint = null; drawControl(event); });
  pad.addEventListener("pointermove", (event) => { if (pad.hasPointerCapture(event.pointerId)) drawControl(event); });
  pad.addEventListener("pointerup", () => { controlPoint = null; $("control_on").checked = true; });
  $("control_file").addEventListener("change", () => {
    if ($("control_file").files[0]) loadControl($("control_file").files[0]).then(() => { $("control_on").checked = true; });
  });
  $("control_clear").addEventListener("click", clearControl);
  $("control_detect").addEventListener("click", () => showControlMap().catch((error) => say(error.message, true)));
  $("control_weight").addEventListener("input", () => { $("control_weight_value").textContent = $("control_weight").value; });
  renderGallery();
  loadConfig().catch(() => say("Could not read the server's limits.", true));
});
