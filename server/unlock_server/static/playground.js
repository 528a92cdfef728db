// The playground: capabilities, side-by-side answers, a strength sweep, a capability view, admin writes.
// It uses the public API only (api.js), so it shows exactly what any client would get.

import { APIError, call, getKey, setKey, stream } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { $, el, fmt, say, show } from "./dom.js";

const TOP_LOGPROBS = 20; // vLLM's default cap on returned log-probabilities
const POSITIONS = ["last_prompt", "prompt", "generated", "all"]; // the tokens a capability edits (unlock.ops)
// maxStrength: the server's limit on |strength| (GET /v1/capabilities says it): beyond it a request is a 400
const state = { model: null, capabilities: [], maxStrength: Infinity, chosen: new Map() };

const errorText = (err) => (err instanceof APIError ? `${err.status}: ${err.message}` : String(err?.message ?? err));

// ---- key and loading
function askForKey(message = "") {
  show($("#key-panel"));
  show($("#app"), false);
  say($("#key-message"), message, message ? "error" : "");
  $("#api-key").value = getKey("api") ?? "";
  $("#api-key").focus();
}

async function load() {
  try {
    const models = (await call("/v1/models")).body.data;
    state.model = (models.find((m) => !m.parent) ?? models[0]).id;
    const listed = (await call("/v1/capabilities")).body;
    state.capabilities = listed.data;
    state.maxStrength = listed.max_strength;
  } catch (err) {
    return askForKey(err instanceof APIError && err.status < 500 ? err.message : errorText(err));
  }
  show($("#key-panel"), false);
  show($("#app"));
  $("#model-name").textContent = state.model;
  $("#admin-key").value = getKey("admin") ?? "";
  renderCapabilities();
}

async function refresh() {
  state.capabilities = (await call("/v1/capabilities")).body.data;
  renderCapabilities();
}

// ---- capability list
function layersText(layers) {
  const contiguous = layers.every((layer, i) => i === 0 || layer === layers[i - 1] + 1);
  return contiguous && layers.length > 2 ? `${layers[0]}–${layers.at(-1)}` : layers.join(", ");
}

function strengthSlider(cap, choice) {
  const span = Math.min(state.maxStrength, Math.max(1, Math.abs(cap.default_strength) * 4));
  const output = el("output", { class: "strength-value" }, fmt(choice.strength));
  const slider = el("input", {
    type: "range", class: "cap-strength", min: -span, max: span, step: span / 200,
    "aria-label": `strength of ${cap.name}`,
    oninput: () => {
      choice.strength = Number(slider.value);
      output.textContent = fmt(choice.strength);
    },
  });
  slider.value = String(choice.strength);
  return [slider, output];
}

// The tokens the capability edits: its own (from the artifact) unless the request overrides them.
function positionsSelect(cap, choice) {
  const own = cap.metadata?.positions;
  const select = el("select", {
    class: "cap-positions", "aria-label": `tokens ${cap.name} edits`,
    onchange: () => { choice.positions = select.value || null; },
  },
  el("option", { value: "" }, own ? `own: ${own}` : "own positions"),
  ...POSITIONS.map((p) => el("option", { value: p }, p)));
  select.value = choice.positions ?? "";
  return select;
}

function deleteButton(name) {
  const button = el("button", { type: "button", class: "danger small", dataset: { action: "delete" } }, "delete");
  button.addEventListener("click", async () => {
    if (button.dataset.armed !== "yes") { // two clicks: a slip of the mouse deletes nothing
      button.dataset.armed = "yes";
      button.textContent = "confirm delete";
      setTimeout(() => { button.dataset.armed = ""; button.textContent = "delete"; }, 4000);
      return;
    }
    try {
      await call(`/v1/capabilities/${encodeURIComponent(name)}`, { method: "DELETE", kind: "admin" });
      state.chosen.delete(name);
      say($("#admin-message"), `Deleted ${name}.`, "ok");
      await refresh();
    } catch (err) {
      say($("#admin-message"), errorText(err), "error");
    }
  });
  return button;
}

function capabilityRow(cap, admin) {
  const choice = state.chosen.get(cap.name) ?? { on: false, strength: cap.default_strength, positions: null };
  state.chosen.set(cap.name, choice);
  const ready = cap.status === "ready";
  const toggle = el("input", {
    type: "checkbox", class: "cap-toggle", disabled: !ready, "aria-label": `switch ${cap.name} on`,
    onchange: () => { choice.on = toggle.checked; },
  });
  toggle.checked = choice.on && ready;
  return el("li", { class: "capability", dataset: { name: cap.name } },
    el("div", { class: "row" },
      el("label", { class: "inline cap-name" }, toggle, el("span", { class: "name" }, cap.name)),
      el("button", { type: "button", class: "quiet small", onclick: () => showCapability(cap.name) }, "view"),
      admin ? deleteButton(cap.name) : null),
    el("p", { class: "cap-meta" },
      `${cap.mode} · layers ${layersText(cap.layers)} · default ${fmt(cap.default_strength)}`),
    ready ? el("div", { class: "row strength" }, ...strengthSlider(cap, choice), positionsSelect(cap, choice))
          : el("p", { class: "message error" }, `unavailable: ${cap.error ?? cap.status}`));
}

function renderCapabilities() {
  const admin = Boolean(getKey("admin"));
  $("#capability-list").replaceChildren(...state.capabilities.map((cap) => capabilityRow(cap, admin)));
  say($("#capabilities-message"), state.capabilities.length ? "" : "No capability is registered yet.");
  const select = $("#sweep-capability");
  const before = select.value;
  const ready = state.capabilities.filter((cap) => cap.status === "ready");
  select.replaceChildren(...ready.map((cap) => el("option", { value: cap.name }, cap.name)));
  if (ready.some((cap) => cap.name === before)) select.value = before;
}

// ---- prompt: unsteered and steered, streamed side by side
function request() {
  const chat = document.querySelector('input[name="route"]:checked').value === "chat";
  const text = $("#prompt").value;
  const body = {
    model: state.model,
    max_tokens: Number($("#max-tokens").value) || 64,
    temperature: Number($("#temperature").value) || 0,
  };
  return chat
    ? { chat, path: "/v1/chat/completions", body: { ...body, messages: [{ role: "user", content: text }] } }
    : { chat, path: "/v1/completions", body: { ...body, prompt: text } };
}

// One capability as the request's `capabilities` field takes it; positions only when overridden.
function term(name, strength) {
  const positions = state.chosen.get(name)?.positions;
  return positions ? { name, strength, positions } : { name, strength };
}

function selection() {
  return state.capabilities
    .filter((cap) => cap.status === "ready" && state.chosen.get(cap.name)?.on)
    .map((cap) => term(cap.name, state.chosen.get(cap.name).strength));
}

async function runPane(pane, path, body) {
  const text = $(".text", pane);
  const label = $(".label", pane);
  text.textContent = "";
  if (label) label.textContent = "";
  pane.dataset.state = "running";
  say($(".message", pane), "streaming…");
  try {
    const headers = await stream(path, body, (piece) => text.append(piece));
    if (label) label.textContent = headers.get("x-unlock-capabilities") ?? "";
    say($(".message", pane), "");
    pane.dataset.state = "done";
    return text.textContent;
  } catch (err) {
    say($(".message", pane), errorText(err), "error");
    pane.dataset.state = "error";
    return null;
  }
}

async function runPrompt(event) {
  event.preventDefault();
  const { path, body } = request();
  const chosen = selection();
  const answers = $("#answers");
  answers.dataset.state = "running";
  say($("#compare-message"), "");
  const steeredPane = $("#answer-steered");
  const [plain, steered] = await Promise.all([
    runPane($("#answer-plain"), path, body),
    chosen.length
      ? runPane(steeredPane, path, { ...body, capabilities: chosen })
      : (say($(".message", steeredPane), "Switch a capability on to see a steered answer.", "error"), null),
  ]);
  answers.dataset.state = "done";
  if (plain !== null && steered !== null) {
    say($("#compare-message"), plain === steered ? "The two answers are identical." : "The answers differ.");
  }
}

// ---- strength sweep
function parseStrengths(text) {
  const values = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!values.length || values.some((v) => !Number.isFinite(v) || Math.abs(v) > state.maxStrength)) {
    throw new Error(`strengths must be numbers within ±${state.maxStrength}, separated by commas`);
  }
  return values;
}

// The answer's text and first token: {token, logprob, top: Map(token -> logprob)} (tokens as "token_id:N").
function answerOf(choice, chat) {
  if (chat) {
    const first = choice.logprobs?.content?.[0];
    const top = new Map((first?.top_logprobs ?? []).map((t) => [t.token, t.logprob]));
    return { text: choice.message?.content ?? "", first: first && { token: first.token, logprob: first.logprob, top } };
  }
  const lp = choice.logprobs;
  const top = new Map(Object.entries(lp?.top_logprobs?.[0] ?? {}));
  const first = lp?.tokens?.length ? { token: lp.tokens[0], logprob: lp.token_logprobs[0], top } : null;
  return { text: choice.text ?? "", first };
}

// How much less likely the unsteered first token became: log p_unsteered(t0) - log p_steered(t0).
function shift(base, steered) {
  if (!base?.first || !steered?.first) return { value: null, bound: false };
  const t0 = base.first.token;
  const known = steered.first.token === t0 ? steered.first.logprob : steered.first.top.get(t0);
  if (known !== undefined) return { value: base.first.logprob - known, bound: false };
  const floor = Math.min(...steered.first.top.values()); // t0 left the top list: its log p is below this
  return { value: base.first.logprob - floor, bound: true };
}

async function runSweep(event) {
  event.preventDefault();
  const panel = $("#sweep-panel");
  const name = $("#sweep-capability").value;
  let strengths;
  try {
    if (!name) throw new Error("register a capability first");
    strengths = parseStrengths($("#sweep-strengths").value);
  } catch (err) {
    return say($("#sweep-message"), err.message, "error");
  }
  const { chat, path, body } = request();
  const logprobs = chat ? { logprobs: true, top_logprobs: TOP_LOGPROBS } : { logprobs: TOP_LOGPROBS };
  const base = { ...body, ...logprobs, return_tokens_as_token_ids: true };
  panel.dataset.state = "running";
  say($("#sweep-message"), `running ${strengths.length + 1} requests together…`);
  const bodies = [base, ...strengths.map((strength) => ({ ...base, capabilities: [term(name, strength)] }))];
  const settled = await Promise.allSettled(bodies.map((json) => call(path, { method: "POST", json })));
  const answers = settled.map((r) => (r.status === "fulfilled" ? answerOf(r.value.body.choices[0], chat) : null));
  const rows = strengths.map((strength, i) => {
    const answer = answers[i + 1];
    const error = settled[i + 1].status === "rejected" ? errorText(settled[i + 1].reason) : null;
    return { strength, answer, error, length: answer ? answer.text.length : null, ...shift(answers[0], answer) };
  });
  renderSweep(name, rows, settled[0].status === "rejected" ? errorText(settled[0].reason) : null);
  panel.dataset.state = "done";
}

function renderSweep(name, rows, baseError) {
  const failed = rows.filter((r) => r.error).length;
  say($("#sweep-message"), baseError ? `unsteered reference failed: ${baseError}`
    : failed ? `${failed} of ${rows.length} requests failed` : `${name} at ${rows.length} strengths`,
    baseError || failed ? "error" : "ok");
  const figure = (measure, chart) => el("figure", { dataset: { measure } }, chart);
  $("#sweep-charts").replaceChildren(
    figure("length", lineChart(rows.map((r) => ({ x: r.strength, y: r.length })),
      { title: "answer length", xLabel: `strength of ${name}`, yLabel: "characters" })),
    figure("logprob-shift", lineChart(rows.map((r) => ({ x: r.strength, y: r.value, bound: r.bound,
      note: r.bound ? "lower bound" : "" })),
      { title: "first-token log-prob shift", xLabel: `strength of ${name}`, yLabel: "Δ log p" })),
  );
  const table = $("#sweep-table");
  $("tbody", table).replaceChildren(...rows.map((r) => el("tr", {},
    el("td", {}, fmt(r.strength)),
    el("td", {}, r.length === null ? "–" : String(r.length)),
    el("td", {}, r.value === null ? "–" : `${r.bound ? "≥ " : ""}${fmt(r.value)}`),
    el("td", { class: r.error ? "error" : "answer-cell" }, r.error ?? r.answer.text))));
  show(table);
}

// ---- capability view
function provenance(cap, rows) {
  const m = cap.metadata ?? {};
  const errors = rows.map((r) => r.alignment_error).filter((e) => e !== null);
  const meanError = errors.length ? errors.reduce((a, b) => a + b, 0) / errors.length : null;
  const t = cap.target ?? {};
  return [
    ["status", cap.status === "ready" ? "ready" : `${cap.status}: ${cap.error ?? ""}`],
    ["mode", `${cap.mode}, default strength ${fmt(cap.default_strength)}`],
    ["target", `${t.name} (${t.architecture}, ${t.num_layers} layers, hidden ${t.hidden_size})`],
    ["source models", m.source_locked
      ? `locked ${m.source_locked}; unlocked ${m.source_unlocked ?? "the same model, other template"}`
      : "not recorded"],
    ["templates", m.locked_template ? `${m.locked_template} → ${m.unlocked_template}` : "–"],
    ["N", m.n ? `${m.n} examples${m.n_holdout ? ` (${m.n_holdout} held out)` : ""}` : "–"],
    ["aggregation", m.aggregation ?? "–"],
    ["rank", m.rank ?? (m.alignment === "identity" ? "none: the target is the source (its own directions)" : "–")],
    ["held-out alignment error", meanError === null ? "not measured"
      : `${fmt(meanError)} mean over ${errors.length} layers (${m.error_kind ?? "holdout"})`],
    ["sha256", cap.sha256],
    ["unlock version", m.unlock_version ?? "–"],
  ];
}

async function showCapability(name) {
  const view = $("#capability-view");
  let cap;
  try {
    cap = (await call(`/v1/capabilities/${encodeURIComponent(name)}`)).body;
  } catch (err) {
    return say($("#capabilities-message"), errorText(err), "error");
  }
  const rows = cap.per_layer ?? [];
  $("#view-name").textContent = cap.name;
  $("#norm-chart").replaceChildren(el("figure", { dataset: { measure: "norm" } }, barChart(
    rows.map((r) => ({ label: String(r.layer), value: r.norm,
      note: r.alignment_error === null ? "" : `held-out error ${fmt(r.alignment_error)}` })),
    { title: "direction norm per steered layer", xLabel: "layer", yLabel: "|r|" })));
  $("#provenance").replaceChildren(...provenance(cap, rows).flatMap(([term, value]) =>
    [el("dt", {}, term), el("dd", {}, String(value))]));
  $("#layer-table tbody").replaceChildren(...rows.map((r) => el("tr", {},
    el("td", {}, String(r.layer)), el("td", {}, r.source_layer ?? "–"),
    el("td", {}, fmt(r.norm, 4)), el("td", {}, fmt(r.alignment_error, 4)))));
  show(view);
  view.dataset.name = cap.name;
  view.scrollIntoView({ block: "nearest" });
}

// ---- admin
async function upload(event) {
  event.preventDefault();
  const message = $("#admin-message");
  const file = $("#upload-file").files[0];
  if (!file) return say(message, "Choose a .safetensors file first.", "error");
  const params = new URLSearchParams();
  if ($("#upload-name").value.trim()) params.set("name", $("#upload-name").value.trim());
  if ($("#upload-replace").checked) params.set("replace", "true");
  const query = params.toString();
  setKey("admin", $("#admin-key").value);
  say(message, `uploading ${file.name}…`);
  try {
    const { body } = await call(`/v1/capabilities${query ? `?${query}` : ""}`, {
      method: "POST", body: await file.arrayBuffer(), kind: "admin", contentType: "application/octet-stream",
    });
    say(message, `Uploaded ${body.name} (sha256 ${body.sha256.slice(0, 12)}…).`, "ok");
    await refresh();
  } catch (err) {
    say(message, errorText(err), "error");
  }
}

function setAdminKey() {
  setKey("admin", $("#admin-key").value);
  renderCapabilities();
}

// ---- wiring
document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey("api", $("#api-key").value);
    load();
  });
  $("#change-key").addEventListener("click", () => askForKey());
  $("#prompt-form").addEventListener("submit", runPrompt);
  $("#prompt").addEventListener("keydown", (event) => { // Ctrl+Enter (Cmd+Enter) runs the prompt
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#prompt-form").requestSubmit();
  });
  $("#sweep-form").addEventListener("submit", runSweep);
  $("#admin-form").addEventListener("submit", upload);
  $("#admin-key").addEventListener("change", setAdminKey);
  if (getKey("api") === null) askForKey();
  else load();
});
