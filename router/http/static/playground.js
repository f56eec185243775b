// The playground: one prompt to one model or to several side by side, with live previews, a
// server-side quote before anything runs, an image to edit with a painted mask, and a gallery.
import { $, el, facts, usd } from "./dom.js";
import { ApiError, KeyBox, events, imageBlob, json, request } from "./api.js";
import { Gallery } from "./gallery.js";
import { MaskEditor, dataUri } from "./mask.js";

const TUNING = [["negative", "negative_prompt"], ["steps", "steps"], ["quality", "quality"]];
const key = new KeyBox("imagegate.key", $("api-key"), $("remember"), $("forget"));
const editor = new MaskEditor();
let models = [];
let lastSeed = null;
let running = [];
let quoteTimer = null;

const gallery = new Gallery({
  reuse(entry) { fill(entry.body); },
  reuseSeed(entry) { $("seed-mode").value = "fixed"; $("seed").value = entry.seed; requote(); },
  async edit(entry) { await editor.load(entry.blob); requote(); },
});

function card(id) { return models.find((m) => m.id === id); }

async function loadModels() {
  try {
    const { data } = await json("v1/models", key.value);
    models = data.data;
  } catch (error) {
    models = [];
    $("model-info").textContent = error instanceof ApiError && error.status === 401
      ? "Enter an API key to see the models." : `Could not list the models: ${error.message}`;
  }
  const select = $("model"), chosen = select.value;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id, text: label(m) })));
  if (chosen && card(chosen)) select.value = chosen;
  $("compare-models").replaceChildren(...models.map((m) =>
    el("label", { class: "inline" }, el("input", { type: "checkbox", value: m.id, onchange: requote }), label(m))));
  applyModel();
  refreshBalance();
}

function label(model) {
  const price = model.price_per_image
    ? `$${model.price_per_image.text_to_image?.standard ?? model.price_per_image.image_to_image?.standard}/image`
    : `$${model.price_per_mp}/MP`;
  return `${model.id} — ${model.capabilities.join(", ")} — ${price}${model.available ? "" : " — unavailable"}`;
}

function applyModel() {
  const model = card($("model").value);
  if (!model) return;
  $("model-info").textContent = model.available
    ? model.description || "" : "Unavailable now: every route is disabled or its circuit is open.";
  const sizes = model.sizes.length ? model.sizes : [model.default_size];
  $("sizes").replaceChildren(...sizes.map((s) => el("option", { value: s })));
  $("size").value = model.default_size;
  $("size-why").textContent = model.sizes.length ? `One of ${model.sizes.join(", ")}`
    : `WxH, sides ${model.limits.min_side}–${model.limits.max_side}, multiples of ${model.limits.multiple_of}`;
  $("n").max = model.limits.max_n;
  for (const [id, field] of TUNING) {
    const honoured = model.honours.includes(field);
    $(id).disabled = !honoured;
    const why = $(`${id}-why`);
    if (why) why.textContent = honoured ? "" : `Off: ${model.id}'s backends ignore it.`;
  }
  requote();
}

function seedFor() {
  const mode = $("seed-mode").value;
  if (mode === "fixed" && $("seed").value !== "") return Number($("seed").value);
  if (mode === "reuse" && lastSeed !== null) return lastSeed;
  return Math.floor(Math.random() * 2 ** 32);
}

function fill(body) {
  $("prompt").value = body.prompt ?? "";
  if (body.model && card(body.model)) $("model").value = body.model;
  applyModel();
  for (const [id, field] of [["negative", "negative_prompt"], ["steps", "steps"], ["quality", "quality"],
                              ["size", "size"], ["n", "n"], ["format", "output_format"]]) {
    if (body[field] !== undefined) $(id).value = body[field];
  }
  if (body.seed !== undefined) { $("seed-mode").value = "fixed"; $("seed").value = body.seed; }
  requote();
}

async function bodyFor(modelId, seed) {
  const model = card(modelId);
  const body = { model: modelId, prompt: $("prompt").value, n: Number($("n").value) || 1, seed,
                 output_format: $("format").value };
  if ($("size").value) body.size = $("size").value;
  for (const [id, field] of TUNING) {
    const value = $(id).value;
    if (value !== "" && model?.honours.includes(field)) body[field] = field === "steps" ? Number(value) : value;
  }
  let path = "v1/images/generations";
  if (editor.image) {
    path = "v1/images/edits";
    body.image = await dataUri(editor.image.blob);
    const mask = await editor.exportMask();
    if (mask) body.mask = await dataUri(mask);
  }
  return { path, body };
}

async function quoteOf(modelId, seed) {
  const { path, body } = await bodyFor(modelId, seed);
  const { data } = await json(path, key.value, { method: "POST", body: { ...body, dry_run: true } });
  return data.billing;
}

function selectedForCompare() {
  return [...$("compare-models").querySelectorAll("input:checked")].map((box) => box.value);
}

function requote() {
  clearTimeout(quoteTimer);
  quoteTimer = setTimeout(showQuote, 250);
}

async function showQuote() {
  const quote = $("quote");
  if (!$("prompt").value.trim() || !$("model").value) { quote.textContent = ""; return; }
  try {
    const seed = 1;
    const one = await quoteOf($("model").value, seed);
    let text = `Quote: ${usd(one.cost)}`;
    const compared = selectedForCompare();
    if (compared.length >= 2) {
      const costs = await Promise.all(compared.map((m) => quoteOf(m, seed).then((b) => b.cost).catch(() => NaN)));
      text += ` · compare total: ${usd(costs.filter((c) => !Number.isNaN(c)).reduce((a, b) => a + b, 0))}`;
    }
    quote.textContent = text;
    quote.dataset.cost = String(one.cost);
    quote.classList.remove("error");
  } catch (error) {
    quote.textContent = `Not runnable: ${error.message}`;
    quote.classList.add("error");
  }
}

async function refreshBalance() {
  if (!key.value) { $("balance").textContent = ""; return; }
  try {
    const { data } = await json("v1/usage", key.value);
    $("balance").textContent = `Balance: ${data.balance} USD`;
  } catch { $("balance").textContent = ""; }
}

function cellFor(modelId) {
  const cell = el("article", { class: "cell", "data-model": modelId, "data-state": "running", "data-previews": "0" },
                  el("h3", { text: modelId }), el("p", { class: "muted status", text: "Running…" }));
  $("results").prepend(cell);
  return cell;
}

function finishCell(cell, images, facts_) {
  cell.dataset.state = "done";
  cell.querySelector(".status").textContent = "";
  cell.querySelector("img.preview")?.remove();
  for (const image of images) cell.append(el("img", { src: URL.createObjectURL(image.blob), alt: image.prompt }));
  cell.append(facts(facts_));
}

function failCell(cell, message, state = "failed") {
  cell.dataset.state = state;
  cell.classList.add("failed");
  const status = cell.querySelector(".status");
  status.textContent = message;
  status.classList.add("error");
}

async function runOne(modelId, seed, controller) {
  const cell = cellFor(modelId);
  const started = performance.now();
  const { path, body } = await bodyFor(modelId, seed);
  const stream = $("stream").checked;
  if (stream) Object.assign(body, { stream: true, partial_images: 2 });
  try {
    const response = await request(path, key.value, { method: "POST", body, signal: controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new ApiError(response.status, error?.error);
    }
    const found = [];
    let served = { model: response.headers.get("x-imagegate-model"), provider: response.headers.get("x-imagegate-provider"),
                   cost: Number(response.headers.get("x-imagegate-cost")),
                   fallback: response.headers.get("x-imagegate-fallback") === "true" };
    if (stream) {
      for await (const { event, data } of events(response)) {
        if (event.endsWith(".partial_image")) {
          cell.dataset.previews = String(Number(cell.dataset.previews) + 1);
          const preview = cell.querySelector("img.preview") || cell.appendChild(el("img", { class: "preview", alt: `preview of ${body.prompt}` }));
          preview.src = URL.createObjectURL(imageBlob(data.b64_json));
        } else if (event.endsWith(".completed")) {
          found.push({ b64: data.b64_json, seed: data.seed, size: data.size, format: data.output_format });
          served = { ...served, ...data.imagegate };
        } else if (event === "error") {
          throw new ApiError(502, data.error);
        }
      }
    } else {
      const data = await response.json();
      for (const item of data.data) found.push({ b64: item.b64_json, seed: item.seed, size: data.size, format: data.output_format });
    }
    const latency = Math.round(performance.now() - started);
    const images = found.map((f) => ({ ...f, blob: imageBlob(f.b64), prompt: body.prompt }));
    finishCell(cell, images, [["provider", served.provider], ["fallback", served.fallback ? "yes" : "no"],
                              ["seed", images.map((i) => i.seed).join(", ")], ["cost", usd(served.cost)],
                              ["latency", `${latency} ms`]]);
    cell.dataset.cost = String(served.cost);
    cell.dataset.provider = served.provider || "";
    lastSeed = images[0]?.seed ?? lastSeed;
    for (const image of images) {
      await gallery.add({ blob: image.blob, format: image.format, prompt: body.prompt, model: modelId,
                          provider: served.provider, seed: image.seed, size: image.size, cost: served.cost, latency,
                          requestId: response.headers.get("x-request-id"), path: "v1/images/generations",
                          body: { ...body, image: undefined, mask: undefined, stream: undefined, partial_images: undefined } });
    }
  } catch (error) {
    if (controller.signal.aborted) failCell(cell, "Cancelled.", "cancelled");
    else failCell(cell, error.message);
  }
}

async function run(modelIds) {
  if (!$("prompt").value.trim()) { $("quote").textContent = "Write a prompt first."; return; }
  const seed = seedFor();
  $("cancel").disabled = false;
  running = modelIds.map(() => new AbortController());
  await Promise.all(modelIds.map((m, i) => runOne(m, seed, running[i])));
  running = [];
  $("cancel").disabled = true;
  refreshBalance();
}

function cancel() {
  for (const controller of running) controller.abort();
}

$("generate").addEventListener("click", () => run([$("model").value]));
$("compare").addEventListener("click", () => {
  const chosen = selectedForCompare();
  if (chosen.length < 2 || chosen.length > 6) { $("quote").textContent = "Tick 2 to 6 models to compare."; return; }
  run(chosen);
});
$("cancel").addEventListener("click", cancel);
$("model").addEventListener("change", applyModel);
for (const id of ["prompt", "negative", "size", "n", "steps", "quality", "format", "seed", "seed-mode"]) {
  $(id).addEventListener("input", requote);
}
$("api-key").addEventListener("change", loadModels);
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); $("generate").click(); }
  if (e.key === "Escape") cancel();
});

gallery.load();
loadModels();
