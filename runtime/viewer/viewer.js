// AttriMeter explanation viewer: a plain script over the server's JSON API (no build step, nothing downloaded).
// Every server string is put in the page with textContent, never as HTML: gallery keys are user input.
"use strict";

const OVERLAYS = 3;  // attention-map overlays fetched per hit (the top attributes)
const COLOUR_GROUPS = ["upper-body colour", "lower-body colour"];

const state = {
  attributes: [],      // [{name, title, group, meanings}]
  groups: new Map(),   // group -> [attribute names]
  weights: new Map(),  // group -> weight
  query: null,         // base64 of the query crop
  queryId: null,       // its gallery id when picked from the gallery (left out of the hits)
  result: null,        // the last /search result of the query
  weighted: false,     // whether it was ranked by attribute weights
  selected: 0,         // index of the hit shown in detail
  pending: null,       // the search in flight (a newer one supersedes it)
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(`${path}: ${data.error || response.status}`);
  return data;
}

function fmt(x, digits = 3) { return Number(x).toFixed(digits); }

function imageUrl(id) { return `/gallery/${id}/image`; }

function readAsBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// ------------------------------------------------------------------------------------------------ weights

function buildWeights() {
  const box = $("weights");
  box.replaceChildren();
  for (const [group, names] of state.groups) {
    state.weights.set(group, 1);
    const input = el("input", {type: "range", min: "0", max: "2", step: "0.25", value: "1",
                               id: `weight-${names[0]}`, "aria-label": `weight of ${group}`,
                               dataset: {group}});
    const output = el("output", {text: "1"});
    const row = el("div", {class: "weight", dataset: {group}}, [
      el("label", {for: input.id, text: group, title: names.join(", ")}), input, output]);
    input.addEventListener("input", () => setWeight(group, Number(input.value)));
    box.append(row);
  }
}

function setWeight(group, value) {
  state.weights.set(group, value);
  const row = document.querySelector(`.weight[data-group="${CSS.escape(group)}"]`);
  row.querySelector("input").value = String(value);
  row.querySelector("output").textContent = String(value);
  row.classList.toggle("off", value === 0);
  scheduleSearch();
}

function weightsBody() {
  const out = {};
  for (const [group, w] of state.weights) {
    if (w !== 1) for (const name of state.groups.get(group)) out[name] = w;
  }
  return Object.keys(out).length ? out : null;
}

// ------------------------------------------------------------------------------------------------ search

let timer = null;
function scheduleSearch() {
  clearTimeout(timer);
  timer = setTimeout(search, 150);  // sliders fire many events: re-rank once they settle
}

async function search() {
  if (!state.query) return;
  const k = Number($("k").value);
  const weights = weightsBody();
  const body = {images: [state.query], k: state.queryId === null ? k : k + 1, overlays: OVERLAYS};
  if (weights) body.weights = weights;
  const token = {};
  state.pending = token;
  document.body.classList.add("busy");
  try {
    const data = await api("/search", body);
    if (state.pending !== token) return;  // superseded by a newer search
    const result = data.results[0];
    result.matches = result.matches.filter((m) => m.id !== state.queryId).slice(0, k);
    state.result = result;
    state.weighted = weights !== null;
    state.selected = 0;
    $("ranking-note").textContent = weights ? "(ranked by the weighted score)" : "(ranked by d)";
    showError("");
    render();
  } catch (error) {
    if (state.pending === token) showError(error.message);
  } finally {
    if (state.pending === token) {
      state.pending = null;
      document.body.classList.remove("busy");
      document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
    }
  }
}

// ------------------------------------------------------------------------------------------------ rendering

function thumb(match) {
  if (match.path === null) return el("div", {class: "noimg", title: "no image stored"});
  return el("img", {src: imageUrl(match.id), alt: match.key});
}

function render() {
  const list = $("hits");
  list.replaceChildren();
  state.result.matches.forEach((match, i) => {
    const item = el("li", {class: "hit", dataset: {id: match.id, d: match.d, score: match.score}}, [
      thumb(match), el("div", {class: "rank", text: `#${i + 1}`}), el("div", {class: "d", text: `d = ${fmt(match.d)}`}),
    ]);
    if (state.weighted) item.append(el("div", {class: "d", text: `score ${fmt(match.score)}`}));
    item.append(el("div", {class: "key", text: match.key, title: match.key}));
    item.addEventListener("click", () => { state.selected = i; renderDetail(); });
    list.append(item);
  });
  renderDetail();
}

function renderDetail() {
  const matches = state.result.matches;
  const detail = $("detail");
  detail.hidden = matches.length === 0;
  document.querySelectorAll(".hit").forEach((node, i) => node.classList.toggle("selected", i === state.selected));
  if (!matches.length) return;
  const match = matches[state.selected];
  detail.dataset.id = String(match.id);
  $("detail-title").textContent =
    `Hit #${state.selected + 1} (${match.key}): d = ${fmt(match.d)} (decomposed: ${fmt(match.d_hat)})`;

  const overlays = $("overlays");
  overlays.replaceChildren();
  for (const o of match.overlays || []) {
    const title = state.attributes.find((a) => a.name === o.attribute)?.title || o.attribute;
    overlays.append(el("figure", {class: "pair"}, [
      el("img", {src: `data:image/png;base64,${o.query}`, alt: `query: ${title}`}),
      o.gallery ? el("img", {src: `data:image/png;base64,${o.gallery}`, alt: `hit: ${title}`})
                : el("div", {class: "noimg", title: "no image stored"}),
      el("figcaption", {text: title}),
    ]));
  }

  const bars = $("bars");
  bars.replaceChildren();
  const top = Math.max(...match.attributes.map((a) => a.contribution), 1e-12);
  for (const a of match.attributes) {
    const bar = el("div", {class: "bar", dataset: {name: a.name, contribution: a.contribution, share: a.share}});
    bar.style.width = `${(100 * a.contribution / top).toFixed(2)}%`;
    bars.append(el("div", {class: "bar-row"}, [
      el("span", {class: "name", text: a.title, title: a.name}),
      el("div", {class: "bar-track"}, [bar]),
      el("span", {class: "value", text: `${fmt(a.contribution)} · ${(100 * a.share).toFixed(1)}%`}),
    ]));
  }

  const differing = $("differing");
  differing.replaceChildren();
  for (const d of match.differing) {
    differing.append(el("li", {dataset: {name: d.name}}, [
      el("strong", {text: `${d.title}: `}), `${d.query} (query) vs ${d.gallery} (hit)`]));
  }
  if (!match.differing.length) differing.append(el("li", {text: "none"}));
}

// ------------------------------------------------------------------------------------------------ query

function setQuery(base64, galleryId) {
  state.query = base64;
  state.queryId = galleryId;
  const img = $("query-image");
  img.src = `data:image/png;base64,${base64}`;
  img.hidden = false;
  $("query-empty").hidden = true;
  document.querySelectorAll("#picker img").forEach((node) =>
    node.classList.toggle("chosen", Number(node.dataset.id) === galleryId));
  search();
}

async function pick(id) {
  try {
    const response = await fetch(imageUrl(id));
    if (!response.ok) throw new Error(`gallery entry ${id}: ${(await response.json()).error}`);
    setQuery(await readAsBase64(await response.blob()), id);
  } catch (error) {
    showError(error.message);
  }
}

async function init() {
  try {
    const [health, schema, entries] = await Promise.all([api("/health"), api("/attributes"),
                                                         api("/gallery/entries?limit=36")]);
    $("status").textContent = `model ${health.model} · ${health.backend} on ${health.device} · ` +
      `gallery of ${health.gallery} · ${health.status}`;
    state.attributes = schema.attributes;
    for (const a of schema.attributes) {
      if (!state.groups.has(a.group)) state.groups.set(a.group, []);
      state.groups.get(a.group).push(a.name);
    }
    buildWeights();
    const picker = $("picker");
    for (const entry of entries.entries.filter((e) => e.has_image).slice(0, 24)) {
      const img = el("img", {src: imageUrl(entry.id), alt: entry.key, title: entry.key, dataset: {id: entry.id}});
      img.addEventListener("click", () => pick(entry.id));
      picker.append(img);
    }
  } catch (error) {
    showError(`${error.message} (is the server running with --gallery?)`);
  }
  document.body.dataset.ready = "true";
}

$("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (file) setQuery(await readAsBase64(file), null);
});
$("k").addEventListener("change", search);
$("ignore-colours").addEventListener("click", () => {
  for (const group of COLOUR_GROUPS) if (state.weights.has(group)) setWeight(group, 0);
});
$("reset-weights").addEventListener("click", () => { for (const group of state.weights.keys()) setWeight(group, 1); });
init();
