// Sends the chosen images as one multipart request and shows each result beside its image.
"use strict";

const state = { files: [] };
const $ = (id) => document.getElementById(id);

async function loadModels() {
  const body = await (await fetch("/v1/models")).json();
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

function drawImage(canvas, url, result) {
  const img = new Image();
  img.onload = () => {
    const scale = Math.min(1, 260 / img.naturalWidth);
    canvas.width = img.naturalWidth * scale;
    canvas.height = img.naturalHeight * scale;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    // qrcode results: outline each code's four corners.
    if (Array.isArray(result.output)) {
      for (const code of result.output) {
        if (!code || !Array.isArray(code.points)) continue;
        ctx.strokeStyle = "#00c853";
        ctx.lineWidth = 3;
        ctx.beginPath();
        code.points.forEach(([x, y], i) => {
          const px = x * scale, py = y * scale;
          if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
        });
        ctx.closePath();
        ctx.stroke();
      }
    }
    canvas.dataset.drawn = "1";
  };
  img.src = url;
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
    drawImage(canvas, URL.createObjectURL(state.files[i]), result);
  });
}

async function run() {
  const form = new FormData();
  state.files.forEach((file, i) => form.append(String(i), file, file.name));
  $("status").textContent = "running...";
  const model = encodeURIComponent($("model").value);
  const response = await fetch(`/v1/models/${model}/infer`, { method: "POST", body: form });
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
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files);
});
loadModels();
