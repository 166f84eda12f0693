"""The playground at `/`: one plain HTML page with its script (no build step). Pick the base model and
adapters, type a prompt, and the answers stream in side by side, each under its method, size and
fingerprint hash. Server text is only ever set as textContent."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>adapterkit playground</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .6em; }
  table { border-collapse: collapse; margin-bottom: 1em; }
  td, th { border-bottom: 1px solid #ddd; padding: .25em .8em; text-align: left; }
  code { font-size: .9em; }
  textarea { width: 100%; max-width: 60em; height: 5em; font: inherit; }
  .controls { margin: .6em 0 1em; display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
  .controls input[type=number] { width: 5em; }
  #answers { display: flex; gap: 1em; align-items: stretch; flex-wrap: wrap; }
  .answer { flex: 1 1 18em; border: 1px solid #bbb; border-radius: 6px; padding: .6em; min-height: 8em; }
  .answer h2 { font-size: 1em; margin: 0 0 .2em; }
  .meta { color: #666; font-size: .85em; margin-bottom: .5em; }
  .text { white-space: pre-wrap; font-family: ui-monospace, monospace; }
  .status { color: #666; font-size: .85em; margin-top: .5em; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>adapterkit playground</h1>
<div class="controls">
  <label>API key <input id="key" type="password" size="24" placeholder="(none)"></label>
  <button id="refresh" type="button">reload models</button>
  <span id="models-error" class="error"></span>
</div>
<table>
  <thead><tr><th></th><th>model</th><th>method</th><th>parameters</th><th>size</th><th>fingerprint</th></tr></thead>
  <tbody id="models"></tbody>
</table>
<textarea id="prompt" placeholder="Type a prompt"></textarea>
<div class="controls">
  <label>endpoint <select id="endpoint"><option value="completions">completions</option>
    <option value="chat">chat</option></select></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" value="64"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
  <button id="send" type="button">Send</button>
</div>
<div id="answers"></div>
<script>
"use strict";
const $ = (selector) => document.querySelector(selector);
const info = {};
$("#key").value = localStorage.getItem("adapterkit-key") || "";

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("#key").value.trim();
  localStorage.setItem("adapterkit-key", key);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

async function loadModels() {
  $("#models-error").textContent = "";
  const response = await fetch("/v1/adapters", {headers: headers()});
  const data = await response.json();
  if (!response.ok) { $("#models-error").textContent = data.error.message; return; }
  const body = $("#models");
  body.textContent = "";
  const rows = [{name: data.base.name, method: "base model", parameters: null, bytes: null,
                 fingerprint: data.base.fingerprint}, ...data.data.filter((a) => a.state === "ready")];
  for (const model of rows) {
    info[model.name] = model;
    const row = document.createElement("tr");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.className = "pick";
    box.value = model.name;
    cell(row, "").appendChild(box);
    cell(row, model.name);
    cell(row, model.method);
    cell(row, model.parameters === null ? "" : model.parameters.toLocaleString());
    cell(row, model.bytes === null ? "" : (model.bytes / 1024).toFixed(1) + " KiB");
    cell(row, "").appendChild(document.createElement("code")).textContent = model.fingerprint;
    body.appendChild(row);
  }
}

function panel(name) {
  const box = document.createElement("div");
  box.className = "answer";
  box.dataset.model = name;
  box.dataset.state = "waiting";
  box.dataset.chunks = "0";
  const model = info[name] || {};
  box.appendChild(document.createElement("h2")).textContent = name;
  const size = model.parameters ? ", " + model.parameters.toLocaleString() + " parameters" : "";
  box.appendChild(document.createElement("div")).className = "meta";
  box.querySelector(".meta").textContent = (model.method || "") + size + ", fingerprint " + (model.fingerprint || "?");
  box.appendChild(document.createElement("div")).className = "text";
  box.appendChild(document.createElement("div")).className = "status";
  $("#answers").appendChild(box);
  return box;
}

function finish(box, state, text) {
  box.dataset.state = state;
  const status = box.querySelector(".status");
  status.textContent = text;
  if (state === "error") status.className = "status error";
}

async function stream(name, prompt, box) {
  const chat = $("#endpoint").value === "chat";
  const request = {model: name, stream: true, max_tokens: Number($("#max-tokens").value),
                   temperature: Number($("#temperature").value)};
  if (chat) request.messages = [{role: "user", content: prompt}]; else request.prompt = prompt;
  const started = performance.now();
  const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
                               {method: "POST", headers: headers(), body: JSON.stringify(request)});
  if (!response.ok) { finish(box, "error", (await response.json()).error.message); return; }
  box.dataset.fingerprint = response.headers.get("x-adapterkit-fingerprint") || "";
  box.dataset.state = "streaming";
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const text = box.querySelector(".text");
  let buffer = "", chunks = 0, reason = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") continue;
        const data = JSON.parse(payload);
        if (data.error) { finish(box, "error", data.error.message); return; }
        const choice = data.choices[0];
        if (!choice) continue;
        const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (piece) { text.textContent += piece; chunks += 1; box.dataset.chunks = String(chunks); }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    }
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  finish(box, "done", "finished (" + reason + ") in " + seconds + " s, " + chunks + " chunks");
}

async function send() {
  const prompt = $("#prompt").value;
  const names = [...document.querySelectorAll("input.pick:checked")].map((box) => box.value);
  $("#answers").textContent = "";
  if (!names.length) { $("#models-error").textContent = "pick at least one model"; return; }
  await Promise.all(names.map((name) => stream(name, prompt, panel(name)).catch(
    (error) => finish(document.querySelector('.answer[data-model="' + CSS.escape(name) + '"]'), "error",
                      String(error)))));
}

$("#refresh").addEventListener("click", loadModels);
$("#send").addEventListener("click", send);
loadModels();
</script>
</body>
</html>
"""
