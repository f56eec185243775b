// The gallery: every finished image, kept in IndexedDB across reloads, with its facts and actions.
import { $, el, facts, usd } from "./dom.js";
import { apiUrl } from "./api.js";

const DB = "imagegate", STORE = "images";

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function tx(mode, work) {
  const db = await open();
  return await new Promise((resolve, reject) => {
    const t = db.transaction(STORE, mode);
    const result = work(t.objectStore(STORE));
    t.oncomplete = () => resolve(result.result ?? result);
    t.onerror = () => reject(t.error);
  });
}

export function curlFor(entry) {
  const body = JSON.stringify(entry.body);
  return `curl ${apiUrl(entry.path)} -H 'authorization: Bearer $IMAGEGATE_KEY' ` +
         `-H 'content-type: application/json' -d '${body.replaceAll("'", "'\\''")}'`;
}

export function pythonFor(entry) {
  const { model, prompt, n, size, ...rest } = entry.body;
  return ["from openai import OpenAI", "",
          `client = OpenAI(base_url="${apiUrl("v1")}", api_key="...")`,
          `result = client.images.generate(model=${JSON.stringify(model)}, prompt=${JSON.stringify(prompt)}, ` +
          `n=${n ?? 1}, size=${JSON.stringify(size ?? "auto")}, extra_body=${JSON.stringify(rest)})`].join("\n");
}

export class Gallery {
  constructor(actions) {
    this.root = $("gallery");
    this.actions = actions; // { reuse(entry), reuseSeed(entry), edit(entry) }
    this.entries = [];
    this.urls = new Map();
    $("clear-gallery").addEventListener("click", () => this.clear());
    this.lightbox = $("lightbox");
    $("lightbox-close").addEventListener("click", () => this.lightbox.close());
    this.lightbox.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight") this.show(this.current + 1);
      if (e.key === "ArrowLeft") this.show(this.current - 1);
    });
  }

  async load() {
    this.entries = await tx("readonly", (s) => s.getAll());
    this.render();
  }

  async add(entry) {
    entry.id = await tx("readwrite", (s) => s.add(entry));
    this.entries.push(entry);
    this.render();
  }

  async remove(entry) {
    await tx("readwrite", (s) => s.delete(entry.id));
    this.entries = this.entries.filter((e) => e.id !== entry.id);
    this.render();
  }

  async clear() {
    await tx("readwrite", (s) => s.clear());
    this.entries = [];
    this.render();
  }

  url(entry) {
    if (!this.urls.has(entry.id)) this.urls.set(entry.id, URL.createObjectURL(entry.blob));
    return this.urls.get(entry.id);
  }

  render() {
    const cards = [...this.entries].reverse().map((entry) => this.card(entry));
    this.root.replaceChildren(...cards);
  }

  card(entry) {
    const copy = (text) => navigator.clipboard?.writeText(text);
    const img = el("img", { src: this.url(entry), alt: `${entry.prompt} (${entry.model})`,
                            onclick: () => this.show(this.entries.indexOf(entry)) });
    const download = el("a", { href: this.url(entry), download: `imagegate-${entry.seed ?? "image"}.${entry.format}`,
                               text: "Download" });
    return el("article", { class: "cell", "data-seed": entry.seed },
      img, el("p", { class: "prompt", text: entry.prompt }),
      facts([["model", entry.model], ["provider", entry.provider], ["seed", entry.seed], ["size", entry.size],
             ["cost", usd(entry.cost)], ["latency", entry.latency ? `${entry.latency} ms` : ""],
             ["request", entry.requestId]]),
      el("div", { class: "row" },
        el("button", { type: "button", text: "Reuse settings", onclick: () => this.actions.reuse(entry) }),
        el("button", { type: "button", text: "Reuse seed", onclick: () => this.actions.reuseSeed(entry) }),
        el("button", { type: "button", text: "Send to edit", onclick: () => this.actions.edit(entry) }),
        download,
        el("button", { type: "button", text: "Copy as curl", onclick: () => copy(curlFor(entry)) }),
        el("button", { type: "button", text: "Copy as openai-python", onclick: () => copy(pythonFor(entry)) }),
        el("button", { type: "button", text: "Delete", onclick: () => this.remove(entry) })));
  }

  show(index) {
    if (!this.entries.length) return;
    this.current = (index + this.entries.length) % this.entries.length;
    const entry = this.entries[this.current];
    $("lightbox-img").src = this.url(entry);
    $("lightbox-img").alt = entry.prompt;
    $("lightbox-caption").textContent = `${entry.prompt} — ${entry.model}, seed ${entry.seed}`;
    if (!this.lightbox.open) this.lightbox.showModal();
  }
}
