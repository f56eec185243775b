// Building DOM nodes from data: every string becomes a text node or an attribute value, never
// markup (the page's CSP requires Trusted Types, so an HTML sink would throw anyway).
export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function facts(pairs) {
  const list = el("dl", { class: "meta" });
  for (const [term, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    list.append(el("dt", { text: term }), el("dd", { text: value }));
  }
  return list;
}

export const usd = (value) => (value === undefined || value === null ? "" : `$${Number(value).toFixed(6)}`);
