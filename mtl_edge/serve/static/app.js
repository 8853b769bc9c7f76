// The mtl-edge page: enroll classes from photos or the camera, manage them, classify.
// Plain JavaScript, no build step; it talks only to the server that sent it (/v1 API).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [], tokenForReads: false, stream: null, captures: [], live: null };

// ------------------------------------------------------------------ token and requests

function readToken() {
  // `mtl-edge serve` prints a URL ending in #token=...: keep it for this tab, hide it.
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem("mtl-edge-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("token").value = sessionStorage.getItem("mtl-edge-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("mtl-edge-token", $("token").value.trim());
    refresh();
  });
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const type = response.headers.get("content-type") || "";
  const data = type.includes("application/json") ? await response.json() : await response.blob();
  if (!response.ok) {
    const message = data && data.error ? data.error : response.status + " " + response.statusText;
    throw new Error(message);
  }
  return data;
}

function say(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind || "";
}

function guarded(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (err) {
      say(err.message, "error");
    }
  };
}

// ------------------------------------------------------------------------- classes

function placeholder(name) {
  const div = document.createElement("div");
  div.className = "placeholder";
  div.textContent = (name[0] || "?").toUpperCase();
  return div;
}

async function thumbnail(row) {
  if (!row.thumbnail) return placeholder(row.name);
  try {
    const blob = await api("GET", row.thumbnail);
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = row.name;
    img.src = URL.createObjectURL(blob);
    return img;
  } catch (err) {
    return placeholder(row.name);
  }
}

function button(text, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = cls;
  b.addEventListener("click", guarded(onClick));
  return b;
}

function startRename(li, row) {
  const nameSpan = li.querySelector(".name");
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = row.name;
  const save = button("Save", "rename-save", async () => {
    const name = input.value.trim();
    if (!name || name === row.name) return refresh();
    await api("PATCH", "/v1/classes/" + encodeURIComponent(row.name), { name });
    say(`renamed '${row.name}' to '${name}'`, "ok");
    await refresh();
  });
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") save.click(); });
  nameSpan.replaceChildren(input, save);
  input.focus();
}

async function renderClasses(data) {
  state.classes = data.classes;
  const list = $("class-list");
  const items = [];
  for (const row of data.classes) {
    const li = document.createElement("li");
    li.className = "class-row";
    li.dataset.name = row.name;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = row.name;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = row.count + (row.count === 1 ? " image" : " images");
    li.append(await thumbnail(row), name, count,
      button("Rename", "secondary rename", () => startRename(li, row)),
      button("Remove", "danger remove", async () => {
        if (!confirm(`Remove class '${row.name}' and its ${row.count} images?`)) return;
        await api("DELETE", "/v1/classes/" + encodeURIComponent(row.name));
        say(`removed '${row.name}'`, "ok");
        await refresh();
      }));
    items.push(li);
  }
  list.replaceChildren(...items);
  $("class-count").textContent = `(${data.classes.length})`;
  $("no-classes").hidden = data.classes.length > 0;
  $("class-names").replaceChildren(...data.classes.map((c) => new Option(c.name)));
  $("threshold").textContent = data.threshold === null ? "-" : data.threshold.toFixed(3);
  $("threshold-mode").textContent = data.threshold_mode ? `(${data.threshold_mode})` : "";
  updateEnrollLabel();
}

async function refresh() {
  await renderClasses(await api("GET", "/v1/classes"));
}

// -------------------------------------------------------------------------- enroll

function enrolled(name) {
  return state.classes.some((c) => c.name === name);
}

function updateEnrollLabel() {
  const name = $("enroll-name").value.trim();
  $("enroll-btn").textContent = enrolled(name) ? `Add photos to '${name}'` : "Enroll photos";
  $("enroll-captures-btn").textContent =
    `${enrolled(name) ? "Add" : "Enroll"} ${state.captures.length} frames`;
  $("enroll-captures-btn").disabled = state.captures.length === 0;
}

async function enroll(files) {
  const name = $("enroll-name").value.trim();
  if (!name) throw new Error("type a class name first");
  if (!files.length) throw new Error("choose one or more photos first");
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name || "frame.jpg");
  const append = enrolled(name);
  say(`enrolling ${files.length} images as '${name}'…`);
  const url = `/v1/classes/${encodeURIComponent(name)}/images${append ? "?append=true" : ""}`;
  const r = await api("POST", url, form);
  say(`enrolled '${r.class}': ${r.added} images (${r.count} in all, ${r.classes} classes)`, "ok");
  await refresh();
}

// -------------------------------------------------------------------------- camera

async function startCamera() {
  if (state.stream) return state.stream;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives no camera here (a camera needs https or localhost)");
  }
  state.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  const video = $("video");
  video.srcObject = state.stream;
  video.hidden = false;
  await video.play();
  $("capture-btn").disabled = false;
  $("camera-btn").textContent = "Camera on";
  $("camera-btn").disabled = true;
  return state.stream;
}

function grabFrame() {
  const video = $("video");
  const canvas = $("grab");
  canvas.width = video.videoWidth || 320;
  canvas.height = video.videoHeight || 240;
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
}

async function capture() {
  const blob = await grabFrame();
  const file = new File([blob], `frame-${state.captures.length + 1}.jpg`, { type: "image/jpeg" });
  state.captures.push(file);
  const img = document.createElement("img");
  img.src = URL.createObjectURL(blob);
  $("captures").append(img);
  updateEnrollLabel();
}

// ------------------------------------------------------------------------- predict

function showPrediction(p) {
  const verdict = $("verdict");
  verdict.textContent = p.known ? p.label : "unknown";
  verdict.className = "verdict " + (p.known ? "known" : "unknown");
  verdict.title = p.known ? "" : `best guess '${p.top_k[0].label}' is under the threshold`;
  const bars = p.top_k.map((t) => {
    const li = document.createElement("li");
    const label = document.createElement("div");
    label.className = "label";
    const n = document.createElement("span");
    n.className = "bar-name";
    n.textContent = t.label;
    const v = document.createElement("span");
    v.textContent = (100 * t.probability).toFixed(1) + " %";
    label.append(n, v);
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * t.probability).toFixed(1) + "%";
    track.append(fill);
    li.append(label, track);
    return li;
  });
  $("bars").replaceChildren(...bars);
}

async function classify(file) {
  const form = new FormData();
  form.append("files", file, file.name || "frame.jpg");
  const k = Math.max(1, parseInt($("top-k").value, 10) || 1);
  const r = await api("POST", `/v1/predict?top_k=${k}`, form);
  const preview = $("predict-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  showPrediction(r.predictions[0]);
}

async function toggleLive() {
  if (state.live) {
    clearTimeout(state.live);
    state.live = null;
    $("live-btn").textContent = "Live camera";
    return;
  }
  await startCamera();
  $("live-btn").textContent = "Stop live";
  const tick = async () => {
    try {
      const blob = await grabFrame();
      await classify(new File([blob], "camera.jpg", { type: "image/jpeg" }));
    } catch (err) {
      say(err.message, "error");
    }
    if (state.live) state.live = setTimeout(tick, 500);
  };
  state.live = setTimeout(tick, 0);
}

// --------------------------------------------------------------------------- setup

async function setThreshold(value) {
  const r = await api("PUT", "/v1/threshold", { value });
  say(`threshold ${r.threshold.toFixed(3)} (${r.threshold_mode})`, "ok");
  await refresh();
}

async function init() {
  readToken();
  $("enroll-name").addEventListener("input", updateEnrollLabel);
  $("enroll-btn").addEventListener("click", guarded(async () => {
    await enroll([...$("enroll-files").files]);
    $("enroll-files").value = "";
  }));
  $("camera-btn").addEventListener("click", guarded(startCamera));
  $("capture-btn").addEventListener("click", guarded(capture));
  $("enroll-captures-btn").addEventListener("click", guarded(async () => {
    await enroll(state.captures);
    state.captures = [];
    $("captures").replaceChildren();
    updateEnrollLabel();
  }));
  $("predict-file").addEventListener("change", guarded(async () => {
    const file = $("predict-file").files[0];
    if (file) await classify(file);
  }));
  $("live-btn").addEventListener("click", guarded(toggleLive));
  $("threshold-set").addEventListener("click", guarded(() => {
    const value = parseFloat($("threshold-input").value);
    if (Number.isNaN(value)) throw new Error("type a threshold between 0 and 1");
    return setThreshold(value);
  }));
  $("threshold-auto").addEventListener("click", guarded(() => setThreshold(null)));
  try {
    const [bundle, health] = await Promise.all([api("GET", "/v1/bundle"), api("GET", "/v1/health")]);
    state.tokenForReads = health.token_for_reads;
    $("model").textContent =
      `${bundle.backbone} · ${bundle.precision} on ${bundle.provider} · ` +
      `batching ${health.batching.enabled ? "on" : "off"}`;
    await refresh();
  } catch (err) {
    say(err.message, "error");
  }
}

document.addEventListener("DOMContentLoaded", init);
