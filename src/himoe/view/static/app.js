// himoe view: the page's logic, plain JavaScript, no build step and nothing fetched from
// outside the server.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function groupColour(group, groups) {
  const hue = Math.round((360 * (group - 1)) / Math.max(groups, 1));
  return `hsl(${hue}, 70%, 80%)`;
}

function heatColour(share, max) {
  const v = max > 0 ? share / max : 0;
  return `rgba(40, 90, 200, ${(0.08 + 0.85 * v).toFixed(3)})`;
}

function esc(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function shown(token) {
  return token.replace(/\n/g, "↵\n").replace(/ /g, "\u00a0");
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// --- tooltip ---
function showTip(html, event) {
  const tip = $("tip");
  tip.innerHTML = html;
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 420)}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

function hideTip() {
  $("tip").hidden = true;
}

function tokenTip(tokens, layers, t) {
  let rows = "";
  layers.forEach((perToken, i) => {
    const entry = perToken[t];
    const chosen = entry.choices.map((c, k) => {
      const p2 = entry.p2 ? `, p2 ${entry.p2[k].toFixed(3)}` : "";
      return `group ${c.group} expert ${c.expert} (weight ${c.weight.toFixed(3)}${p2})`;
    }).join("; ");
    const p1 = entry.p1 !== undefined ? ` p1 ${entry.p1.toFixed(3)}` : "";
    let alt = "";
    if (entry.runner_up_groups) {
      alt = "runners-up: " + entry.runner_up_groups.map((g) => `group ${g.group} (p1 ${g.p1.toFixed(3)})`).join(", ")
        + "; " + entry.runner_up_experts.map((e) => `expert ${e.expert} (p2 ${e.p2.toFixed(3)})`).join(", ");
    }
    rows += `<tr class="tip-layer" data-layer="${model.moe_layers[i] + 1}"><td><b>layer ${model.moe_layers[i] + 1}</b>${p1}</td><td class="chosen">${esc(chosen)}<br><span class="legend">${esc(alt)}</span></td></tr>`;
  });
  return `<div><b>${esc(JSON.stringify(tokens[t]))}</b> (token ${t + 1})</div><table>${rows}</table>`;
}

// --- routing a text ---
async function routeText() {
  const status = $("route-status");
  status.textContent = "routing…";
  status.className = "";
  const started = performance.now();
  try {
    const result = await getJSON("/api/route", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: $("text").value }),
    });
    renderRouted(result);
    status.textContent = `${result.tokens.length} tokens in ${Math.round(performance.now() - started)} ms`;
  } catch (err) {
    status.textContent = err.message;
    status.className = "error";
  }
}

function renderRouted(result) {
  const box = $("routed");
  box.innerHTML = "";
  result.layers.forEach((perToken, i) => {
    const row = document.createElement("div");
    row.className = "layer-row";
    row.dataset.layer = model.moe_layers[i] + 1;
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = `layer ${model.moe_layers[i] + 1}`;
    const line = document.createElement("div");
    line.className = "tokens";
    const parts = result.tokens.map((tok, t) => {
      const group = perToken[t].choices.length ? perToken[t].choices[0].group : 0;
      const experts = perToken[t].choices.map((c) => c.expert).join(",");
      return `<span class="tok" data-t="${t}" data-group="${group}" data-experts="${experts}" style="background:${groupColour(group, model.num_moes)}">${esc(shown(tok))}</span>`;
    });
    line.innerHTML = parts.join("");
    row.append(label, line);
    box.append(row);
  });
  box.onmousemove = (event) => {
    const span = event.target.closest(".tok");
    if (!span) return hideTip();
    showTip(tokenTip(result.tokens, result.layers, Number(span.dataset.t)), event);
  };
  box.onmouseleave = hideTip;
}

// --- generation, streamed ---
let stream = null;
function generate(whenDone) {
  if (stream) stream.close();
  const out = $("generated");
  out.innerHTML = "";
  const layerIndex = Number($("gen-layer").value || 0);
  const params = new URLSearchParams({
    prompt: $("prompt").value, max_new_tokens: $("max-new").value,
    temperature: $("temperature").value, top_k: $("top-k").value,
  });
  const status = $("gen-status");
  status.textContent = "generating…";
  status.className = "";
  stream = new EventSource(`/api/generate?${params}`);
  let count = 0;
  stream.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.done) {
      status.textContent = `${count} tokens`;
      stream.close();
      if (typeof whenDone === "function") whenDone();
      return;
    }
    count += 1;
    const span = document.createElement("span");
    span.className = "tok";
    const choice = (event.layers[layerIndex] || [])[0];
    span.dataset.group = choice ? choice.group : 0;
    span.style.background = choice ? groupColour(choice.group, model.num_moes) : "transparent";
    span.title = event.layers.map((l, i) => `layer ${model.moe_layers[i] + 1}: ` + l.map((c) => `group ${c.group} expert ${c.expert}`).join(", ")).join("\n");
    span.textContent = shown(event.token);
    out.append(span);
    status.textContent = `${count} tokens…`;
  };
  stream.onerror = () => {
    if (stream.readyState !== EventSource.CLOSED) {
      status.textContent = "the stream stopped";
      status.className = "error";
    }
    stream.close();
    if (typeof whenDone === "function") whenDone();
  };
}

// --- the experts and the run's curves ---
function heatTable(title, rows, columns, cell) {
  let html = `<table class="heat"><caption>${esc(title)}</caption><tr><th></th>${columns.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>`;
  rows.forEach((row) => {
    html += `<tr><th>${esc(row.name)}</th>${row.values.map((v, j) => cell(v, j, row)).join("")}</tr>`;
  });
  return html + "</table>";
}

async function loadExperts() {
  const status = $("experts-status");
  status.textContent = "measuring the load on the validation sample…";
  try {
    const data = await getJSON("/api/experts");
    status.textContent = `Share of the routed assignments of the validation sample of ${data.corpus} (val loss ${data.val_loss.toFixed(4)}); ✕ marks a dead expert; hover a cell for the tokens it reads most.`;
    const box = $("experts");
    box.innerHTML = "";
    data.layers.forEach((layer) => {
      const max = Math.max(...layer.share.flat());
      const rows = layer.share.map((values, g) => ({ name: `group ${g + 1}`, values: values.slice(0, layer.sizes[g]), g }));
      const columns = Array.from({ length: Math.max(...layer.sizes) }, (_, j) => `${j + 1}`);
      const html = heatTable(`layer ${layer.layer}`, rows, columns, (v, j, row) => {
        const top = (layer.top_tokens[row.g * model.num_experts + j] || []).map(([t, s]) => `${JSON.stringify(t)} ${(100 * s).toFixed(0)}%`).join(", ");
        const dead = v === 0;
        return `<td class="share${dead ? " dead" : ""}" data-layer="${layer.layer}" data-group="${row.g + 1}" data-expert="${j + 1}" data-share="${v}" title="reads most: ${esc(top)}" style="background:${heatColour(v, max)}">${dead ? "✕" : (100 * v).toFixed(1) + "%"}</td>`;
      });
      box.insertAdjacentHTML("beforeend", html);
    });
  } catch (err) {
    status.textContent = err.message;
    status.className = "error";
  }
}

function curve(title, points) {
  const w = 320, h = 160, pad = 28;
  const good = points.filter((p) => p[1] !== null && p[1] !== undefined);
  if (good.length === 0) return "";
  const xs = good.map((p) => p[0]), ys = good.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + ((x - x0) / Math.max(x1 - x0, 1)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / Math.max(y1 - y0, 1e-9)) * (h - 2 * pad);
  const path = good.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
  return `<svg class="curve" width="${w}" height="${h}"><text x="${pad}" y="14" font-size="12">${esc(title)}</text>`
    + `<polyline fill="none" stroke="#2456c8" stroke-width="1.5" points="${path}"/>`
    + `<text x="${pad}" y="${h - 8}" font-size="10">step ${x0}</text><text x="${w - pad - 60}" y="${h - 8}" font-size="10">step ${x1}</text>`
    + `<text x="2" y="${pad}" font-size="10">${y1.toFixed(3)}</text><text x="2" y="${h - pad}" font-size="10">${y0.toFixed(3)}</text></svg>`;
}

function renderCurves() {
  const c = model.curves;
  let html = curve("validation loss", c.map((e) => [e.step, e.val_loss]));
  model.moe_layers.forEach((layer, i) => {
    html += curve(`layer ${layer + 1} load CV`, c.map((e) => [e.step, e.load_cv[i]]));
    html += curve(`layer ${layer + 1} MaxVio`, c.map((e) => [e.step, e.maxvio[i]]));
  });
  $("curves").innerHTML = html || "<p>no evaluations in metrics.jsonl</p>";
}

function renderAnalysis() {
  const a = model.analysis;
  if (!a) return;
  $("analysis-section").hidden = false;
  let html = "";
  a.layers.forEach((layer) => {
    const groups = a.domains.map((d) => ({ name: d, values: layer.group_share[d] }));
    const maxG = Math.max(...groups.flatMap((r) => r.values));
    html += heatTable(`layer ${layer.layer}: domain x group (NMI ${layer.nmi_group === null ? "-" : layer.nmi_group.toFixed(2)})`,
      groups, groups[0].values.map((_, g) => `${g + 1}`), (v) => `<td style="background:${heatColour(v, maxG)}">${(100 * v).toFixed(0)}%</td>`);
    const experts = a.domains.map((d) => ({ name: d, values: layer.expert_share[d] }));
    const maxE = Math.max(...experts.flatMap((r) => r.values));
    html += heatTable(`layer ${layer.layer}: domain x expert (NMI ${layer.nmi_expert === null ? "-" : layer.nmi_expert.toFixed(2)})`,
      experts, experts[0].values.map((_, e) => `${Math.floor(e / model.num_experts) + 1}.${(e % model.num_experts) + 1}`),
      (v) => `<td style="background:${heatColour(v, maxE)}">${(100 * v).toFixed(0)}</td>`);
  });
  $("analysis").innerHTML = html;
}

async function start() {
  model = await getJSON("/api/model");
  $("summary").textContent = `${model.model_dir}: step ${model.step}, ${model.router} router, ${model.n_layer} layers, ${model.num_moes} groups x ${model.num_experts} experts, ${model.tokenizer} tokenizer`;
  $("gen-layer").innerHTML = model.moe_layers.map((l, i) => `<option value="${i}">${l + 1}</option>`).join("");
  $("route").onclick = routeText;
  $("generate").onclick = () => generate();
  $("load-experts").onclick = loadExperts;
  renderCurves();
  renderAnalysis();
  await fromLink(new URLSearchParams(window.location.search));
  document.body.dataset.ready = "1";
}

// A link can carry the state to show: ?text=...&token=N routes the text and opens the
// details of token N; &experts=1 measures the loads; &prompt=...&generate=N generates.
async function fromLink(params) {
  if (params.has("text")) {
    $("text").value = params.get("text");
    await routeText();
    const t = Number(params.get("token"));
    const span = document.querySelector(`#routed .tok[data-t="${t}"]`);
    if (params.has("token") && span) {
      const box = span.getBoundingClientRect();
      span.dispatchEvent(new MouseEvent("mousemove", { bubbles: true, clientX: box.left + 1, clientY: box.top + 1 }));
    }
  }
  if (params.get("experts") === "1") await loadExperts();
  if (params.has("generate")) {
    if (params.has("prompt")) $("prompt").value = params.get("prompt");
    $("max-new").value = params.get("generate");
    await new Promise((resolve) => generate(resolve));
  }
}

start().catch((err) => {
  $("summary").textContent = err.message;
  $("summary").className = "error";
});
