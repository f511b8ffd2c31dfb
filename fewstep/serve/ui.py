"""The web page at `/`: a small hand-made page over the same /sdapi/v1 routes any client uses (no Gradio,
nothing fetched from the internet: the page is this one string of HTML, CSS and script).

Prompt, negative prompt, model, sampler, schedule, steps, CFG scale, size, seed, batch; image to image from
a picture, with a mask painted in the page; a progress bar with the live preview and an interrupt button;
a gallery with each image's parameters, a button to reuse its seed and one to edit it further.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fewstep</title><link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px system-ui, sans-serif; margin: 1em; display: grid; grid-template-columns: 26em 1fr; gap: 1.5em; }
label { display: block; margin: .35em 0 .1em; color: #444; }
textarea, input, select { width: 100%; box-sizing: border-box; font: inherit; }
.row { display: grid; grid-template-columns: 1fr 1fr; gap: .5em; }
button { font: inherit; padding: .4em 1em; margin: .5em .3em 0 0; }
#bar { height: .5em; background: #ddd; margin: .5em 0; } #bar div { height: 100%; width: 0; background: #36c; }
#paint { position: relative; width: 100%; } #paint canvas { width: 100%; image-rendering: pixelated; }
#mask { position: absolute; left: 0; top: 0; opacity: .5; cursor: crosshair; touch-action: none; }
.card { display: inline-block; vertical-align: top; margin: 0 1em 1em 0; max-width: 22em; }
.card img, #preview { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
pre { white-space: pre-wrap; font-size: 12px; background: #f4f4f4; padding: .4em; } #error { color: #b00; }
</style></head><body>
<form id="form">
<label>Prompt</label><textarea id="prompt" rows="3">a large red circle on the left</textarea>
<label>Negative prompt</label><textarea id="negative_prompt" rows="1"></textarea>
<label>Model</label><select id="model"></select>
<div class="row"><div><label>Sampler</label>
<select id="sampler_name"><option value="">the model's</option></select></div>
<div><label>Schedule type</label><select id="scheduler"></select></div></div>
<div class="row"><div><label>Steps</label><input id="steps" type="number" min="1" placeholder="the model's"></div>
<div><label>CFG scale</label><input id="cfg_scale" type="number" step="0.5" placeholder="the model's"></div></div>
<div class="row"><div><label>Width</label>
<input id="width" type="number" step="8" min="8" placeholder="the model's"></div>
<div><label>Height</label><input id="height" type="number" step="8" min="8" placeholder="the model's"></div></div>
<div class="row"><div><label>Seed (-1: random)</label><input id="seed" type="number" value="-1"></div>
<div><label>Batch size</label><input id="batch_size" type="number" min="1" value="1"></div></div>
<label>Image to image: a source picture (paint a mask on it to repaint only there)</label>
<input id="file" type="file" accept="image/*">
<div id="paint" hidden><canvas id="source" width="0" height="0"></canvas>
<canvas id="mask" width="0" height="0"></canvas></div>
<div class="row"><div><label>Denoising strength</label><input id="denoising_strength" type="number" min="0" max="1"
step="0.05" value="0.6"></div>
<div><label>Brush</label><input id="brush" type="range" min="2" max="64" value="16"></div></div>
<button type="button" id="clear">Clear mask</button><button type="button" id="drop">No source</button><br>
<button id="go">Generate</button><button type="button" id="stop">Interrupt</button>
</form>
<main><div id="bar"><div></div></div><div id="status"></div><div id="error"></div>
<img id="preview" alt="" hidden><div id="gallery"></div></main>
<script>
const $ = (id) => document.getElementById(id);
const api = (path, body) => fetch("/sdapi/v1/" + path, body === undefined ? {} :
  {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)})
  .then(async (r) => { const j = await r.json(); if (!r.ok) throw new Error(j.detail || r.status); return j; });
let painted = false, hasSource = false;

async function setup() {
  const [models, options, samplers, schedulers] = await Promise.all(
    ["sd-models", "options", "samplers", "schedulers"].map((p) => api(p)));
  for (const m of models) $("model").add(new Option(m.title, m.title, false, m.title === options.sd_model_checkpoint));
  for (const s of samplers) $("sampler_name").add(new Option(s.name, s.name));
  for (const s of schedulers) $("scheduler").add(new Option(s.label, s.name));
}

function body() {
  const b = {prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, seed: +$("seed").value,
             batch_size: +$("batch_size").value, scheduler: $("scheduler").value};
  for (const k of ["steps", "cfg_scale", "width", "height"]) if ($(k).value !== "") b[k] = +$(k).value;
  if ($("sampler_name").value) b.sampler_name = $("sampler_name").value;
  if (hasSource) {
    b.init_images = [$("source").toDataURL("image/png")];
    b.denoising_strength = +$("denoising_strength").value;
    if (painted) b.mask = maskImage();
  }
  return b;
}

function maskImage() {  // white where painted, black elsewhere
  const c = document.createElement("canvas"), m = $("mask");
  c.width = m.width; c.height = m.height;
  const g = c.getContext("2d");
  g.fillStyle = "black"; g.fillRect(0, 0, c.width, c.height); g.drawImage(m, 0, 0);
  return c.toDataURL("image/png");
}

async function watch(running) {
  while (running.on) {
    await new Promise((r) => setTimeout(r, 400));
    const p = await api("progress").catch(() => null);
    if (!p || !running.on) continue;
    $("bar").firstChild.style.width = (100 * p.progress).toFixed(1) + "%";
    $("status").textContent = p.textinfo || "";
    if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
  }
}

function show(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((b64, i) => {
    const card = document.createElement("div"), img = new Image(), pre = document.createElement("pre");
    card.className = "card"; img.src = "data:image/png;base64," + b64; pre.textContent = info.infotexts[i];
    const seed = document.createElement("button"), edit = document.createElement("button");
    seed.type = edit.type = "button"; seed.textContent = "Reuse seed " + info.all_seeds[i]; edit.textContent = "Edit";
    seed.onclick = () => { $("seed").value = info.all_seeds[i]; };
    edit.onclick = () => loadSource(img.src);
    card.append(img, pre, seed, edit);
    $("gallery").prepend(card);
  });
  if (info.interrupted) $("status").textContent = "interrupted";
  if (info.ignored.length) $("status").textContent += " (ignored: " + info.ignored.join(", ") + ")";
}

function loadSource(src) {
  const img = new Image();
  img.onload = () => {
    for (const c of [$("source"), $("mask")]) { c.width = img.width; c.height = img.height; }
    $("source").getContext("2d").drawImage(img, 0, 0);
    hasSource = true; painted = false; $("paint").hidden = false;
  };
  img.src = src;
}

$("form").onsubmit = async (e) => {
  e.preventDefault();
  const running = {on: true};
  $("go").disabled = true; $("error").textContent = ""; watch(running);
  try { show(await api(hasSource ? "img2img" : "txt2img", body())); }
  catch (err) { $("error").textContent = err.message; }
  finally { running.on = false; $("go").disabled = false; $("preview").hidden = true;
            $("bar").firstChild.style.width = "0"; }
};
$("stop").onclick = () => api("interrupt", {});
$("model").onchange = async () => {
  $("status").textContent = "loading " + $("model").value + " ...";
  try { await api("options", {sd_model_checkpoint: $("model").value}); $("status").textContent = ""; }
  catch (err) { $("error").textContent = err.message; }
};
$("file").onchange = () => { const f = $("file").files[0]; if (f) loadSource(URL.createObjectURL(f)); };
$("clear").onclick = () => {
  const m = $("mask"); m.getContext("2d").clearRect(0, 0, m.width, m.height); painted = false;
};
$("drop").onclick = () => { hasSource = false; painted = false; $("paint").hidden = true; };
$("mask").onpointermove = (e) => {
  if (!e.buttons) return;
  const m = $("mask"), r = m.getBoundingClientRect(), g = m.getContext("2d");
  g.fillStyle = "white"; g.beginPath();
  g.arc((e.clientX - r.left) * m.width / r.width, (e.clientY - r.top) * m.height / r.height, +$("brush").value / 2,
        0, 2 * Math.PI);
  g.fill(); painted = true;
};
setup().catch((err) => { $("error").textContent = err.message; });
</script></body></html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    """The web page (behind --api-auth like every other path: the browser asks for the password)."""
    return PAGE
