// Talking to the gateway's public API, relative to the page (so it works behind a path prefix).
// A key lives in memory, or in sessionStorage when the person asks; never in localStorage or a URL.
const BASE = new URL("../", document.baseURI);
const FORMATS = { png: [0x89, 0x50, 0x4e, 0x47], jpeg: [0xff, 0xd8, 0xff], webp: [0x52, 0x49, 0x46, 0x46] };

export class KeyBox {
  constructor(storageName, input, remember, forget) {
    this.name = storageName;
    this.input = input;
    this.remember = remember;
    const kept = sessionStorage.getItem(this.name);
    if (kept) { input.value = kept; remember.checked = true; }
    const keep = () => {
      if (remember.checked && input.value) sessionStorage.setItem(this.name, input.value);
      else sessionStorage.removeItem(this.name);
    };
    input.addEventListener("input", keep);
    remember.addEventListener("change", keep);
    forget.addEventListener("click", () => { input.value = ""; remember.checked = false; keep(); input.focus(); });
  }
  get value() { return this.input.value.trim(); }
}

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code || null;
  }
}

export function request(path, key, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (key) headers.authorization = `Bearer ${key}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  return fetch(new URL(path, BASE), { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                      signal, credentials: "omit" });
}

export async function json(path, key, options = {}) {
  const response = await request(path, key, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) throw new ApiError(response.status, data?.error);
  return { data, response };
}

// Server-sent events from a POST (EventSource cannot POST): yields {event, data} as they arrive.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { event, data: JSON.parse(data) };
    }
  }
}

// Only PNG, JPEG and WebP are shown, as blob: URLs of bytes whose signature says so.
export function imageBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const format = Object.keys(FORMATS).find((f) => FORMATS[f].every((b, i) => bytes[i] === b));
  if (!format) throw new Error("the answer is not a PNG, JPEG or WebP image");
  return new Blob([bytes], { type: `image/${format}` });
}

export const apiUrl = (path) => new URL(path, BASE).href;
