"use strict";
// Shared helpers for the console pages. No inline script or style anywhere (the CSP forbids them).
const Console = {
  async json(path, options) {
    const response = await fetch(path, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || `${path}: HTTP ${response.status}`);
    return body;
  },
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  },
  who(entry) { return entry.name ? `${entry.name} (${entry.address})` : entry.address; },
  short(hex) { return `${hex.slice(0, 10)}…${hex.slice(-6)}`; },
  fail(error) {
    const box = document.getElementById("error");
    box.textContent = String(error.message || error);
    box.hidden = false;
  },
};
