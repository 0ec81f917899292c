"use strict";
const params = new URLSearchParams(window.location.search);
const composeHash = (params.get("h") || "").toLowerCase();
let hashMatches = false;
let typedData = null;

function hex(buffer) {
  return "0x" + Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

function wallet() {
  if (!window.ethereum) throw new Error("No wallet found: an EIP-1193 provider (window.ethereum) is needed to sign.");
  return window.ethereum;
}

async function account() {
  const accounts = await wallet().request({ method: "eth_requestAccounts" });
  if (!accounts || !accounts.length) throw new Error("the wallet gave no account");
  return accounts[0];
}

function renderRecipe(r) {
  document.getElementById("name").textContent = r.name || "(unnamed)";
  document.getElementById("state").textContent = r.state === "revoked" ? "revoked — final" : r.state;
  document.getElementById("onchain-hash").textContent = r.compose_hash;
  document.getElementById("approvals").textContent =
    `${r.approvals} of ${r.threshold} needed` + (r.approvals >= r.threshold ? " — threshold reached" : "") +
    (r.approvers.length ? `; by ${r.approvers.map(Console.who).join(", ")}` : "");
  const m = r.manifest;
  if (r.problem) {
    const p = document.getElementById("manifest-problem");
    p.textContent = r.problem;
    p.hidden = false;
  }
  if (m) {
    document.getElementById("m-study").textContent = m.study;
    document.getElementById("m-kind").textContent = m.analysis.kind;
    document.getElementById("m-params").textContent = JSON.stringify(m.analysis.params, null, 2);
    document.getElementById("m-output").textContent = m.output_type;
    document.getElementById("m-epsilon").textContent = m.epsilon;
    document.getElementById("m-delta").textContent = m.delta;
    document.querySelector("#inputs tbody").replaceChildren(...m.inputs.map((i) => Console.el("tr", {},
      Console.el("td", {}, i.name || "—"), Console.el("td", {}, i.owner_name || "—"),
      Console.el("td", { class: "mono" }, i.owner), Console.el("td", {}, i.approved ? "yes" : "not yet"))));
  }
  document.getElementById("m-images").textContent = r.images.length ? r.images.join("\n") : "(none found)";
  updateButtons(r);
}

function updateButtons(r) {
  const final = r.revoked;
  document.getElementById("approve").disabled = !hashMatches || final || !typedData;
  document.getElementById("revoke-confirm").disabled = final;
  document.getElementById("revoke").disabled = final || !document.getElementById("revoke-confirm").checked;
  if (final) document.getElementById("revoke-status").textContent = "This recipe is revoked. That is final.";
}

let current = null;
async function refresh() {
  current = await Console.json(`/api/recipes/${composeHash}`);
  renderRecipe(current);
  return current;
}

async function checkHash() {
  const response = await fetch(`/api/recipes/${composeHash}/app-compose.json`);
  if (!response.ok) throw new Error(`app-compose.json: HTTP ${response.status}`);
  const bytes = await response.arrayBuffer();
  document.getElementById("raw").textContent = new TextDecoder().decode(bytes);
  const local = hex(await crypto.subtle.digest("SHA-256", bytes));
  document.getElementById("local-hash").textContent = local;
  hashMatches = local === composeHash;
  const check = document.getElementById("hash-check");
  check.textContent = hashMatches ? "✔ matches the on-chain compose hash" : "✘ MISMATCH: the served bytes are not this recipe";
  check.className = hashMatches ? "ok" : "bad";
  document.getElementById("mismatch").hidden = hashMatches;
}

async function approve() {
  const status = document.getElementById("approve-status");
  const button = document.getElementById("approve");
  button.disabled = true;
  try {
    if (!hashMatches) throw new Error("hash mismatch: approval refused");
    const owner = await account();
    status.textContent = `Waiting for ${owner} to sign in the wallet…`;
    const signature = await wallet().request({ method: "eth_signTypedData_v4",
      params: [owner, JSON.stringify(typedData)] });
    status.textContent = "Signed. Relaying on-chain…";
    const result = await Console.json(`/api/recipes/${composeHash}/approvals`, { method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ owner, deadline: typedData.message.deadline, signature }) });
    status.textContent = `Approved by ${owner} in transaction ${result.tx} (block ${result.block}).` +
      (result.recipe.allowed ? " Threshold reached: the recipe is allowed." : "");
  } catch (error) {
    status.textContent = `Not approved: ${error.message || error}`;
  }
  await refresh().catch(Console.fail);
}

async function waitMined(tx) {
  for (let i = 0; i < 60; i++) {
    const r = await Console.json(`/api/tx/${tx}`);
    if (r.mined) return r;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  throw new Error(`transaction ${tx} not mined yet`);
}

async function revoke() {
  const status = document.getElementById("revoke-status");
  document.getElementById("revoke").disabled = true;
  try {
    const from = await account();
    const call = await Console.json(`/api/recipes/${composeHash}/revoke-call`);
    status.textContent = `Asking the wallet to send the revocation from ${from}…`;
    const tx = await wallet().request({ method: "eth_sendTransaction",
      params: [{ from, to: call.to, data: call.data, chainId: call.chainId }] });
    const mined = await waitMined(tx);
    status.textContent = mined.success ? `Revoked in transaction ${tx}. This is final.` :
      `The revocation transaction ${tx} failed (are you an owner? is it already revoked?).`;
  } catch (error) {
    status.textContent = `Not revoked: ${error.message || error}`;
  }
  await refresh().catch(Console.fail);
}

async function load() {
  if (!/^0x[0-9a-f]{64}$/.test(composeHash)) throw new Error("no compose hash given: open a recipe from the consortium page");
  const [r, typed] = await Promise.all([refresh(), Console.json(`/api/recipes/${composeHash}/typed-data`)]);
  typedData = typed;
  document.getElementById("typed-data").textContent = JSON.stringify(typed, null, 2);
  await checkHash();
  updateButtons(r);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("approve").addEventListener("click", approve);
  document.getElementById("revoke").addEventListener("click", revoke);
  document.getElementById("revoke-confirm").addEventListener("change", () => current && updateButtons(current));
  load().catch(Console.fail);
});
