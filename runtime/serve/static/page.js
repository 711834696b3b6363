// persense's page: a reference from a click, a box or a mask, then every instance in the target images, drawn from
// the REST answers (COCO RLE masks) of this same server.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#469990", "#9a6324", "#800000", "#808000", "#000075", "#ffe119"];
const state = { refFile: null, refImage: null, points: [], labels: [], box: null, drag: null, referenceId: null,
  refMask: null };

// COCO's compressed RLE string -> run lengths (pycocotools' rleFrString).
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// A COCO RLE {size: [h, w], counts} -> Uint8Array h*w in row-major order (RLE runs are column-major).
function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let index = 0, value = 0;
  for (const run of rleCounts(rle.counts)) {
    if (value) for (let i = index; i < index + run; i++) mask[(i % h) * w + Math.floor(i / h)] = 1;
    index += run;
    value = 1 - value;
  }
  return mask;
}

function hexRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// Paint a mask: translucent fill, opaque outline (pixels with a 4-neighbour outside the mask).
function paintMask(ctx, mask, w, h, colour) {
  const image = ctx.getImageData(0, 0, w, h);
  const [r, g, b] = hexRgb(colour);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!mask[i]) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
      const alpha = edge ? 1 : 0.35;
      const o = 4 * i;
      image.data[o] = image.data[o] * (1 - alpha) + r * alpha;
      image.data[o + 1] = image.data[o + 1] * (1 - alpha) + g * alpha;
      image.data[o + 2] = image.data[o + 2] * (1 - alpha) + b * alpha;
    }
  }
  ctx.putImageData(image, 0, 0);
}

function setStatus(element, text, error = false) {
  element.textContent = text;
  element.classList.toggle("error", error);
}

async function call(url, form) {
  const response = await fetch(url, { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) throw new Error(`${response.status}: ${body.detail}`);
  return body;
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`${file.name}: the browser cannot show this image`));
    image.src = URL.createObjectURL(file);
  });
}

// Where a mouse event falls, in the reference image's integer pixels.
function imagePoint(event) {
  const canvas = $("ref-canvas");
  const rect = canvas.getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) * canvas.width / rect.width);
  const y = Math.floor((event.clientY - rect.top) * canvas.height / rect.height);
  return [Math.min(Math.max(x, 0), canvas.width - 1), Math.min(Math.max(y, 0), canvas.height - 1)];
}

function drawReference() {
  const canvas = $("ref-canvas");
  const ctx = canvas.getContext("2d");
  if (!state.refImage) return;
  ctx.drawImage(state.refImage, 0, 0);
  if (state.refMask) paintMask(ctx, state.refMask, canvas.width, canvas.height, "#1e90ff");
  const box = state.drag ? state.drag.box : state.box;
  if (box) {
    ctx.strokeStyle = "#ffd700";
    ctx.lineWidth = 2;
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
  state.points.forEach(([x, y], i) => {
    ctx.fillStyle = state.labels[i] ? "#00c853" : "#d50000";
    ctx.beginPath();
    ctx.arc(x + 0.5, y + 0.5, 5, 0, 2 * Math.PI);
    ctx.fill();
  });
}

async function encodeReference(maskFile = null) {
  const form = new FormData();
  form.append("image", state.refFile);
  if (maskFile) {
    form.append("mask", maskFile);
  } else {
    if (state.box) form.append("box", state.box.join(","));
    state.points.forEach((p, i) => { form.append("point", p.join(",")); form.append("label", state.labels[i]); });
  }
  const precision = $("precision").value;
  if (precision) form.append("precision", precision);
  setStatus($("ref-status"), "encoding the reference ...");
  $("run").disabled = true;
  try {
    const answer = await call("/v1/references", form);
    state.referenceId = answer.id;
    state.refMask = answer.mask ? decodeRle(answer.mask) : null;
    if (maskFile) {
      const maskImage = await loadImage(maskFile);
      const scratch = document.createElement("canvas");
      [scratch.width, scratch.height] = [maskImage.naturalWidth, maskImage.naturalHeight];
      const sctx = scratch.getContext("2d");
      sctx.drawImage(maskImage, 0, 0);
      const pixels = sctx.getImageData(0, 0, scratch.width, scratch.height).data;
      state.refMask = new Uint8Array(scratch.width * scratch.height).map((_, i) => (pixels[4 * i] > 0 ? 1 : 0));
    }
    setStatus($("ref-status"), `reference ready (${answer.source}, ${answer.encoding_ms.toFixed(0)} ms)`);
    $("ref-status").dataset.referenceId = answer.id;
    $("run").disabled = !$("targets-file").files.length;
  } catch (error) {
    state.referenceId = null;
    state.refMask = null;
    setStatus($("ref-status"), error.message, true);
  }
  drawReference();
}

function onPointerDown(event) {
  if (!state.refImage) return;
  const start = imagePoint(event);
  state.drag = { start, box: null };
}

function onPointerMove(event) {
  if (!state.drag) return;
  const [x, y] = imagePoint(event);
  const [x0, y0] = state.drag.start;
  if (Math.abs(x - x0) + Math.abs(y - y0) > 4) {
    state.drag.box = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x) + 1, Math.max(y0, y) + 1];
    drawReference();
  }
}

function onPointerUp(event) {
  if (!state.drag) return;
  const drag = state.drag;
  state.drag = null;
  if (drag.box) {
    state.box = drag.box;
  } else {
    state.points.push(drag.start);
    state.labels.push(event.shiftKey ? 0 : 1);
  }
  encodeReference();
}

function showResult(file, image, answer) {
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".name").textContent = file.name;
  node.querySelector(".count").textContent = `${answer.count} instance${answer.count === 1 ? "" : "s"}`;
  node.dataset.count = answer.count;
  const canvas = node.querySelector("canvas");
  [canvas.width, canvas.height] = [answer.size[1], answer.size[0]];
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0);
  answer.instances.forEach((instance, i) => {
    paintMask(ctx, decodeRle(instance.mask), canvas.width, canvas.height, COLOURS[i % COLOURS.length]);
  });
  ctx.font = "bold 13px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  answer.instances.forEach((instance, i) => {
    const [x, y] = instance.point;
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#000";
    ctx.strokeText(String(i + 1), x, y);
    ctx.fillStyle = "#fff";
    ctx.fillText(String(i + 1), x, y);
  });
  const stem = file.name.replace(/\.[^.]*$/, "");
  const { union_png: union, label_map_png: labels, ...json } = answer;
  const links = { json: [URL.createObjectURL(new Blob([JSON.stringify(json, null, 2)], { type: "application/json" })), `${stem}.json`],
    labels: [`data:image/png;base64,${labels}`, `${stem}_instances.png`], union: [`data:image/png;base64,${union}`, `${stem}_mask.png`] };
  for (const [cls, [href, name]] of Object.entries(links)) {
    const link = node.querySelector(`a.${cls}`);
    link.href = href;
    link.download = name;
  }
  const rows = node.querySelector(".timings tbody");
  for (const [stage, ms] of Object.entries(answer.timings_ms)) {
    const row = rows.insertRow();
    row.insertCell().textContent = stage;
    row.insertCell().textContent = ms.toFixed(1);
  }
  answer.warnings.forEach((warning) => {
    const item = document.createElement("li");
    item.textContent = warning;
    node.querySelector(".warnings").appendChild(item);
  });
  $("results").appendChild(node);
}

async function run() {
  const files = Array.from($("targets-file").files);
  $("results").replaceChildren();
  $("run").disabled = true;
  for (const [i, file] of files.entries()) {
    setStatus($("run-status"), `segmenting ${file.name} (${i + 1} of ${files.length}) ...`);
    const form = new FormData();
    form.append("image", file);
    form.append("reference", state.referenceId);
    form.append("method", $("method").value);
    form.append("images", "true");
    try {
      const [answer, image] = await Promise.all([call("/v1/segment", form), loadImage(file)]);
      showResult(file, image, answer);
    } catch (error) {
      setStatus($("run-status"), `${file.name}: ${error.message}`, true);
      $("run").disabled = false;
      return;
    }
  }
  setStatus($("run-status"), `done: ${files.length} image${files.length === 1 ? "" : "s"}`);
  $("run-status").dataset.done = "true";
  $("run").disabled = false;
}

async function start() {
  const info = await (await fetch("/v1/info")).json();
  $("engine-info").textContent = `${info.model_type} on ${info.backend}, counter ${info.counter}`;
  for (const [select, values, chosen] of [["method", info.methods, "persense"], ["precision", info.precisions, info.precision]]) {
    for (const value of values) $(select).add(new Option(value, value, false, value === chosen));
  }
  $("ref-file").addEventListener("change", async () => {
    const file = $("ref-file").files[0];
    if (!file) return;
    Object.assign(state, { refFile: file, points: [], labels: [], box: null, referenceId: null, refMask: null });
    try {
      state.refImage = await loadImage(file);
    } catch (error) {
      setStatus($("ref-status"), error.message, true);
      return;
    }
    const canvas = $("ref-canvas");
    [canvas.width, canvas.height] = [state.refImage.naturalWidth, state.refImage.naturalHeight];
    drawReference();
    setStatus($("ref-status"), "click the object or drag a box around it");
    delete $("ref-status").dataset.referenceId;
  });
  $("mask-file").addEventListener("change", () => {
    const file = $("mask-file").files[0];
    if (!file || !state.refFile) return;
    Object.assign(state, { points: [], labels: [], box: null });
    encodeReference(file);
  });
  $("clear-prompt").addEventListener("click", () => {
    Object.assign(state, { points: [], labels: [], box: null, referenceId: null, refMask: null });
    $("run").disabled = true;
    drawReference();
  });
  $("precision").addEventListener("change", () => { if (state.refFile && (state.box || state.points.length)) encodeReference(); });
  $("targets-file").addEventListener("change", () => { $("run").disabled = !(state.referenceId && $("targets-file").files.length); });
  const canvas = $("ref-canvas");
  canvas.addEventListener("mousedown", onPointerDown);
  canvas.addEventListener("mousemove", onPointerMove);
  window.addEventListener("mouseup", onPointerUp);
  $("run").addEventListener("click", run);
}

start();
