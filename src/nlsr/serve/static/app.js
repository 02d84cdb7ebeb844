// nlsr serve: pick or drop an image, run a job, poll its progress, compare and download.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let file = null;
let job = null;

function show(id, visible) { $(id).hidden = !visible; }

function fail(message) {
  $("error").textContent = message;
  show("error", true);
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  select.appendChild(o);
}

function fillScales() {
  const model = info.models.find((m) => m.name === $("model").value);
  const keep = $("scale").value;
  $("scale").replaceChildren();
  for (const s of model.scales) option($("scale"), s, "x" + s);
  if (model.scales.includes(Number(keep))) $("scale").value = keep;
}

async function start() {
  if (!file) return;
  show("error", false);
  show("viewer", false);
  if (file.size > info.max_upload) {
    fail(`${file.name}: file too large (${file.size} bytes; the limit is ${info.max_upload} bytes, --max-upload)`);
    return;
  }
  const query = new URLSearchParams({
    model: $("model").value, scale: $("scale").value,
    precision: $("precision").value, name: file.name,
  });
  $("start").disabled = true;
  $("status").textContent = `Uploading ${file.name}...`;
  $("progress").removeAttribute("value");
  show("job", true);
  try {
    const answer = await fetch("/api/jobs?" + query, { method: "POST", body: file });
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error);
    job = body;
    poll();
  } catch (e) {
    show("job", false);
    fail(e.message);
    $("start").disabled = false;
  }
}

async function poll() {
  let status;
  try {
    const answer = await fetch(`/api/jobs/${job.id}`);
    status = await answer.json();
    if (!answer.ok) throw new Error(status.error);
  } catch (e) {
    fail(e.message);
    $("start").disabled = false;
    return;
  }
  const p = $("progress");
  p.max = Math.max(1, status.tiles_total);
  p.value = status.tiles_done;
  const what = `${status.name} (${status.input[0]}x${status.input[1]}) with ${status.model} x${status.scale}, ${status.precision}`;
  if (status.state === "queued") {
    $("status").textContent = `Waiting in the queue, position ${status.position}: ${what}`;
  } else if (status.state === "running") {
    $("status").textContent = `Running: tile ${status.tiles_done} of ${status.tiles_total} done, ${what}`;
  }
  if (status.state === "queued" || status.state === "running") {
    setTimeout(poll, 250);
    return;
  }
  $("start").disabled = false;
  if (status.state === "failed") {
    show("job", false);
    fail(status.message);
    return;
  }
  $("status").textContent = `Done in ${status.seconds.toFixed(1)} s: ${status.output[0]}x${status.output[1]}, ${what}`;
  showResult(status);
}

function showResult(status) {
  const base = `/api/jobs/${status.id}`;
  $("before").src = `${base}/input.png`;
  $("after").src = `${base}/result.png`;
  $("download").href = `${base}/result.png?download=1`;
  $("download").setAttribute("download", "");
  job = status;
  show("viewer", true);
  layout();
}

function layout() {
  if (!job || !job.output) return;
  const [w, h] = job.output;
  const zoom = $("zoom").value;
  const factor = zoom === "fit" ? Math.min(1, $("frame").clientWidth / w) : Number(zoom);
  const width = Math.round(w * factor);
  const height = Math.round(h * factor);
  const stage = $("stage");
  stage.style.width = width + "px";
  stage.style.height = height + "px";
  for (const img of [$("before"), $("after")]) {
    img.style.width = width + "px";
    img.style.height = height + "px";
  }
  slide();
}

function slide() {
  const percent = Number($("slider").value);
  $("clip").style.width = percent + "%";
  $("line").style.left = `calc(${percent}% - 1px)`;
}

function pick(chosen) {
  if (!chosen) return;
  file = chosen;
  $("start").disabled = false;
  start();
}

async function init() {
  try {
    const answer = await fetch("/api/info");
    info = await answer.json();
  } catch (e) {
    fail("the server does not answer: " + e.message);
    return;
  }
  for (const m of info.models) option($("model"), m.name, m.name);
  for (const p of info.precisions) option($("precision"), p, p);
  $("precision").value = info.precision;
  fillScales();
  $("limits").textContent = `Limits: ${(info.max_upload / 2 ** 20).toFixed(0)} MiB per file, ` +
    `${(info.max_pixels / 1e6).toFixed(1)} megapixels; large images run in ${info.tile}-pixel tiles.`;
  $("model").addEventListener("change", fillScales);
  $("file").addEventListener("change", () => pick($("file").files[0]));
  $("start").addEventListener("click", start);
  $("slider").addEventListener("input", slide);
  $("zoom").addEventListener("change", layout);
  window.addEventListener("resize", layout);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files[0]);
  });
  document.body.dataset.ready = "1";
}

init();
