// Building the page: every string from the server goes into textContent or a form value, never into HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

// el("li", {class: "row", dataset: {name}}, "text", child, ...): children are strings (text nodes) or nodes.
export function el(tag, attrs = {}, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

export function svg(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function fill(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export function show(node, visible = true) {
  node.hidden = !visible;
}

// A message line: `kind` is "error", "ok" or "" (plain).
export function say(node, text, kind = "") {
  node.textContent = text;
  node.className = `message ${kind}`.trim();
}

export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return String(parseFloat(Number(value).toPrecision(digits)));
}
