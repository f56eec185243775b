// The operator console: providers' health (refreshed every few seconds while the tab is visible),
// API keys (create, top up, revoke, limits) and usage per model, all through /admin/*.
import { $, el, usd } from "./dom.js";
import { KeyBox, json } from "./api.js";

const admin = new KeyBox("imagegate.admin", $("admin-key"), $("remember"), $("forget"));
const REFRESH_MS = 3000;
let timer = null;

function status(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", bad);
}

async function call(path, options = {}) {
  return (await json(path, admin.value, options)).data;
}

async function providers() {
  const { data } = await call("admin/providers");
  const rows = Object.entries(data).map(([name, p]) => {
    const circuit = p.enabled ? p.circuit : "disabled";
    return el("tr", { "data-provider": name },
      el("td", { text: name }), el("td", { text: p.type }),
      el("td", {}, el("span", { class: `circuit ${circuit}`, text: circuit.replace("_", "-") })),
      el("td", { text: p.in_flight ?? "" }), el("td", { text: p.queued ?? "" }),
      el("td", { text: p.latency_s ? `${Math.round(p.latency_s * 1000)} ms` : "–" }),
      el("td", { text: p.disabled_reason || p.last_error || "" }));
  });
  $("providers").tBodies[0].replaceChildren(...rows);
}

async function keys() {
  const { data } = await call("admin/keys");
  $("keys").tBodies[0].replaceChildren(...data.map((k) => {
    const amount = el("input", { "aria-label": `Credits to add to ${k.name}`, size: 6, placeholder: "USD" });
    const limits = [k.rpm ? `${k.rpm}/min` : "", k.concurrency ? `${k.concurrency} at once` : ""].filter(Boolean);
    return el("tr", { "data-key": k.id },
      el("td", { text: k.name }), el("td", { text: k.id }), el("td", { text: `${k.prefix}…` }),
      el("td", { text: k.revoked_at ? "revoked" : "active" }), el("td", { text: k.balance }),
      el("td", { text: k.models ? k.models.join(", ") : "all" }), el("td", { text: limits.join(", ") || "none" }),
      el("td", {}, amount, el("button", { type: "button", text: "Top up", disabled: k.balance_micros === null,
                                           onclick: () => topup(k, amount.value) })),
      el("td", {}, el("button", { type: "button", text: "Revoke", disabled: Boolean(k.revoked_at),
                                  onclick: () => revoke(k) })));
  }));
}

async function usage() {
  const { data } = await call("admin/usage");
  $("usage").tBodies[0].replaceChildren(...Object.entries(data).map(([model, u]) =>
    el("tr", {}, el("td", { text: model }), el("td", { text: u.images ?? 0 }),
       el("td", { text: (u.megapixels ?? 0).toFixed(3) }), el("td", { text: usd(u.cost_usd ?? 0) }))));
}

async function refresh() {
  if (!admin.value) { status("Enter the admin key."); return; }
  try {
    await Promise.all([providers(), keys(), usage()]);
    status(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    status(error.message, true);
  }
}

async function create(event) {
  event.preventDefault();
  const number = (id) => ($(id).value ? Number($(id).value) : undefined);
  const models = $("key-models").value.split(",").map((s) => s.trim()).filter(Boolean);
  const body = { name: $("key-name").value, credits: $("key-credits").value || undefined,
                 models: models.length ? models : undefined, rpm: number("key-rpm"),
                 concurrency: number("key-concurrency") };
  try {
    const made = await call("admin/keys", { method: "POST", body });
    $("secret-value").textContent = made.key;
    $("secret").hidden = false;
    $("new-key").reset();
    await keys();
  } catch (error) { status(error.message, true); }
}

async function topup(key, amount) {
  try {
    await call(`admin/keys/${encodeURIComponent(key.id)}/topup`, { method: "POST", body: { credits: amount } });
    await keys();
  } catch (error) { status(error.message, true); }
}

async function revoke(key) {
  if (!window.confirm(`Revoke the key "${key.name}"? Its requests will be refused from now on.`)) return;
  try {
    await call(`admin/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST", body: {} });
    await keys();
  } catch (error) { status(error.message, true); }
}

function schedule() {
  clearInterval(timer);
  timer = document.hidden ? null : setInterval(refresh, REFRESH_MS);
}

$("new-key").addEventListener("submit", create);
$("copy-secret").addEventListener("click", () => navigator.clipboard?.writeText($("secret-value").textContent));
$("admin-key").addEventListener("change", refresh);
document.addEventListener("visibilitychange", () => { schedule(); if (!document.hidden) refresh(); });
schedule();
refresh();
