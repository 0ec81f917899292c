"use strict";
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// The spend-down chart: remaining ε after each BudgetSpent event, from the full budget down.
function drawBudget(budget) {
  const W = 640, H = 200, L = 48, R = 12, T = 12, B = 28;
  const points = [{ remaining: budget.epsilon_budget, label: "start" }].concat(
    budget.spends.map((s, i) => ({ remaining: s.remaining, label: `#${i + 1}`, spend: s })));
  const x = (i) => L + (points.length === 1 ? 0 : (i * (W - L - R)) / (points.length - 1));
  const y = (v) => T + (H - T - B) * (1 - (budget.epsilon_budget ? v / budget.epsilon_budget : 0));
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-labelledby": "budget-chart-title", id: "budget-svg" });
  const title = svg("title", { id: "budget-chart-title" });
  title.textContent = `Privacy budget spend-down: ${budget.epsilon_remaining} of ${budget.epsilon_budget} ε left ` +
    `after ${budget.spends.length} spend(s)`;
  chart.append(title);
  chart.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#888" }));
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888" }));
  for (const v of [0, budget.epsilon_budget / 2, budget.epsilon_budget]) {
    const tick = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" });
    tick.textContent = Number(v.toFixed(3)).toString();
    chart.append(tick);
  }
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(i)},${y(p.remaining)}`).join(" ");
  chart.append(svg("path", { d: path, fill: "none", stroke: "#1d3557", "stroke-width": 2 }));
  points.forEach((p, i) => {
    const dot = svg("circle", { cx: x(i), cy: y(p.remaining), r: 4, fill: p.spend ? "#9b1c1c" : "#1d3557" });
    const tip = svg("title", {});
    tip.textContent = p.spend ? `spent ${p.spend.epsilon} ε (tx ${p.spend.tx}), ${p.remaining} left` :
      `budget ${p.remaining} ε`;
    dot.append(tip);
    chart.append(dot);
    const label = svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle" });
    label.textContent = p.label;
    chart.append(label);
  });
  document.getElementById("budget-chart").replaceChildren(chart);
}

function criteriaList(c) {
  const names = { threshold_met: "threshold met", inputs_consented: "every input's owner consented",
    budget_left: "budget left", not_revoked: "not revoked" };
  const list = Console.el("ul", { class: "criteria" });
  for (const [key, label] of Object.entries(names)) {
    list.append(Console.el("li", { class: c[key] ? "ok" : "bad" }, `${c[key] ? "✔" : "✘"} ${label}`));
  }
  return list;
}

async function load() {
  const [consortium, budget, recipes] = await Promise.all([
    Console.json("/api/consortium"), Console.json("/api/budget"), Console.json("/api/recipes")]);
  document.getElementById("app-id").textContent = consortium.app_id;
  document.getElementById("chain-id").textContent = consortium.chain_id;
  document.getElementById("threshold").textContent = `${consortium.threshold} of ${consortium.owners.length} owners`;
  document.querySelector("#owners tbody").replaceChildren(...consortium.owners.map((o) =>
    Console.el("tr", {}, Console.el("td", {}, o.name || "—"), Console.el("td", { class: "mono" }, o.address))));
  document.getElementById("budget-summary").textContent =
    `${budget.epsilon_remaining} of ${budget.epsilon_budget} ε left (${budget.epsilon_spent} spent in ` +
    `${budget.spends.length} release(s)).`;
  drawBudget(budget);
  document.querySelector("#spends tbody").replaceChildren(...budget.spends.map((s) => Console.el("tr", {},
    Console.el("td", {}, s.block), Console.el("td", { class: "mono" }, Console.short(s.compose_hash)),
    Console.el("td", {}, s.epsilon), Console.el("td", {}, s.remaining), Console.el("td", { class: "mono" }, s.tx))));
  document.querySelector("#recipes tbody").replaceChildren(...recipes.map((r) => {
    const state = r.state === "revoked" ? "revoked — final" : r.state === "allowed" ?
      `allowed (${r.approvals} of ${r.threshold})` : r.state === "approved" ?
      `approved ${r.approvals} of ${r.threshold} needed` : "proposed";
    return Console.el("tr", { "data-hash": r.compose_hash },
      Console.el("td", {}, Console.el("a", { href: `/recipe?h=${r.compose_hash}` }, r.name || "(unnamed)")),
      Console.el("td", { class: "mono" }, Console.short(r.compose_hash)),
      Console.el("td", {}, Console.el("span", { class: `badge state-${r.state}` }, state)),
      Console.el("td", {}, r.approvers.length ? r.approvers.map((a) => a.name || a.address).join(", ") : "nobody yet"),
      Console.el("td", {}, Console.el("span", { class: `badge verdict-${r.verdict}` }, r.verdict),
        criteriaList(r.criteria)));
  }));
}

document.addEventListener("DOMContentLoaded", () => load().catch(Console.fail));
