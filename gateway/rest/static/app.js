// Sends the chosen images as one multipart request and shows each result beside its image.
"use strict";

const state = { files: [] };
const $ = (id) => document.getElementById(id);

// A gateway started with --auth-token-file takes API calls with a bearer token only.
function auth() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The token the model list was last asked with: a change event comes again when the field
// loses focus (a click on Run), and the list was emptied under the run.
let listedWith = null;
// The status the model list last failed with, if it shows still.
let listError = null;

async function loadModels() {
  const headers = auth();
  if (headers.Authorization === listedWith) return;
  listedWith = headers.Authorization;
  const response = await fetch("/v1/models", { headers });
  const body = await response.json();
  if (!response.ok) {
    listError = `${body.error.code}: ${body.error.message}`;
    $("status").textContent = listError;
    return;
  }
  // Only the list's own error goes: a run started meanwhile (Run clicked as the token field
  // lost focus) may have answered first, and its "done" was wiped.
  if ($("status").textContent === listError) $("status").textContent = "";
  listError = null;
  $("model").replaceChildren();
  for (const model of body.models) {
    const option = new Option(model.name, model.name, model.is_default, model.is_default);
    $("model").add(option);
  }
}

function choose(files) {
  state.files = Array.from(files).filter((f) => f.size > 0);
  $("run").disabled = state.files.length === 0;
  $("status").textContent = `${state.files.length} image(s) chosen`;
}

// The gateway decodes pixels as stored (it ignores EXIF orientation), but the browser draws a
// JPEG turned by its Orientation tag: outlines go through the same turn.
async function jpegOrientation(file) {
  const view = new DataView(await file.slice(0, 131072).arrayBuffer());
  if (view.byteLength < 4 || view.getUint16(0) !== 0xffd8) return 1;
  let pos = 2;
  while (pos + 4 <= view.byteLength) {
    const marker = view.getUint16(pos);
    if ((marker & 0xff00) !== 0xff00 || marker === 0xffda) return 1;  // no more metadata
    const exif = pos + 10 <= view.byteLength && view.getUint32(pos + 4) === 0x45786966;
    if (marker === 0xffe1 && exif) return tiffOrientation(view, pos + 10);
    pos += 2 + view.getUint16(pos + 2);
  }
  return 1;
}

function tiffOrientation(view, tiff) {
  if (tiff + 8 > view.byteLength) return 1;
  const little = view.getUint16(tiff) === 0x4949;
  const ifd = tiff + view.getUint32(tiff + 4, little);
  if (ifd + 2 > view.byteLength) return 1;
  for (let i = 0, count = view.getUint16(ifd, little); i < count; i++) {
    const entry = ifd + 2 + i * 12;
    if (entry + 12 > view.byteLength) return 1;
    if (view.getUint16(entry, little) === 0x0112) {
      const value = view.getUint16(entry + 8, little);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}

// Stored (x, y) of a w x h image -> where the browser shows it, as [a, b, c, d, e, f]:
// x' = a x + c y + e, y' = b x + d y + f (the canvas transform's order).
function turn(orientation, w, h) {
  return [
    [1, 0, 0, 1, 0, 0],
    [1, 0, 0, 1, 0, 0], [-1, 0, 0, 1, w, 0], [-1, 0, 0, -1, w, h], [1, 0, 0, -1, 0, h],
    [0, 1, 1, 0, 0, 0], [0, 1, -1, 0, h, 0], [0, -1, -1, 0, h, w], [0, -1, 1, 0, 0, w],
  ][orientation];
}

async function drawImage(canvas, file, result) {
  const orientation = await jpegOrientation(file);
  const img = new Image();
  img.onload = () => {
    const scale = Math.min(1, 260 / img.naturalWidth);
    canvas.width = img.naturalWidth * scale;
    canvas.height = img.naturalHeight * scale;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    // The turn the browser applied, judged by the size it shows against the size as stored.
    const w = result.info ? result.info.width : img.naturalWidth;
    const h = result.info ? result.info.height : img.naturalHeight;
    const swapped = orientation >= 5;
    const applied = img.naturalWidth === (swapped ? h : w) && img.naturalHeight === (swapped ? w : h);
    const [a, b, c, d, e, f] = turn(applied ? orientation : 1, w, h);
    // qrcode results: outline each code's four corners.
    if (Array.isArray(result.output)) {
      for (const code of result.output) {
        if (!code || !Array.isArray(code.points)) continue;
        ctx.strokeStyle = "#00c853";
        ctx.lineWidth = 3;
        ctx.beginPath();
        code.points.forEach(([x, y], i) => {
          const px = (a * x + c * y + e) * scale, py = (b * x + d * y + f) * scale;
          if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
        });
        ctx.closePath();
        ctx.stroke();
      }
    }
    canvas.dataset.drawn = "1";
  };
  img.src = URL.createObjectURL(file);
}

function render(results) {
  const list = $("results");
  list.replaceChildren();
  results.forEach((result, i) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.index = String(i);
    const title = document.createElement("b");
    title.textContent = state.files[i].name;
    const canvas = document.createElement("canvas");
    const text = document.createElement("pre");
    if (result.error) {
      text.className = "error";
      text.textContent = `${result.error.code}: ${result.error.message}`;
    } else {
      const codes = Array.isArray(result.output) && result.output.every((c) => c && c.text !== undefined);
      text.textContent = codes && result.output.length
        ? result.output.map((c) => `QR: ${c.text}`).join("\n")
        : JSON.stringify(result.output);
      if (result.info) text.textContent += `\n${result.info.width}x${result.info.height} ${result.info.format}`;
    }
    card.append(title, canvas, text);
    list.append(card);
    drawImage(canvas, state.files[i], result);
  });
}

async function run() {
  const form = new FormData();
  state.files.forEach((file, i) => form.append(String(i), file, file.name));
  $("status").textContent = "running...";
  // No model listed yet (the list is still loading, or was refused): the default one.
  const model = $("model").value;
  const path = model ? `/v1/models/${encodeURIComponent(model)}/infer` : "/v1/infer";
  const response = await fetch(path, {
    method: "POST", body: form, headers: auth(),
  });
  const body = await response.json();
  if (!response.ok) {
    $("status").textContent = `${body.error.code}: ${body.error.message}`;
    return;
  }
  $("status").textContent = `done (request ${body.request_id})`;
  render(body.results);
}

$("files").addEventListener("change", (e) => choose(e.target.files));
$("run").addEventListener("click", run);
$("token").addEventListener("change", loadModels);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files);
});
loadModels();
