"""The web page of ``coda-db serve``: one HTML document, no external resources."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>coda-db: stateful neural database</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}
 section{border:1px solid #ccc;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
 textarea{width:100%;min-height:8rem} .status{color:#555} .error{color:#b00}
 .qa{background:#f6f6f6;padding:.4rem .6rem;margin:.5rem 0;border-radius:4px}
 .qa .q{font-weight:600} .qa .doc{color:#555;font-weight:400} .qa .a{white-space:pre-wrap}
 label{margin-right:.6rem} input[type=number]{width:5rem}
</style></head><body>
<h1>Stateful neural database</h1>
<p>Model: <code id="model-name"></code>. A document is read once into a fixed-size state;
saved states are asked questions without re-reading the document, and a question never
changes the state.</p>
<section id="step-ingest"><h2>1. Ingest</h2>
 <textarea id="doc-text" placeholder="Paste a document"></textarea>
 <p>or upload a text file: <input type="file" id="doc-file" accept=".txt,.md,text/*"></p>
 <button id="ingest-btn">Read the document</button> <span id="ingest-status" class="status"></span>
</section>
<section id="step-library"><h2>2. Library</h2>
 <p><label>Label <input id="save-label"></label>
 <label><input type="checkbox" id="save-replace"> replace</label>
 <button id="save-btn">Save the state</button> <span id="save-status" class="status"></span></p>
 <p><select id="entries"></select> <button id="load-btn">Load</button>
 <a id="download-link" href="#">Download</a> <span id="load-status" class="status"></span></p>
 <p>Upload a saved state (.tar): <input type="file" id="upload-file" accept=".tar">
 <button id="upload-btn">Upload</button> <span id="upload-status" class="status"></span></p>
</section>
<section id="step-ask"><h2>3. Ask</h2>
 <p><input id="question" size="60" placeholder="Your question">
 <button id="ask-btn">Ask</button></p>
 <p><label>max tokens <input type="number" id="max-new-tokens" min="1"></label>
 <label>temperature <input type="number" id="temperature" step="0.1" min="0"></label>
 <label>top-k <input type="number" id="top-k" min="0"></label>
 <label>top-p <input type="number" id="top-p" step="0.05" min="0" max="1"></label></p>
 <span id="ask-status" class="status"></span>
 <div id="qa-log"></div>
</section>
<script>
const $ = id => document.getElementById(id);
let current = null;  // the document questions go to: its source or label
const mb = b => b == null ? '? MB' : `${(b / 1e6).toFixed(1)} MB`;
function show(id, text, bad) { const e = $(id); e.textContent = text;
  e.className = bad ? 'status error' : 'status'; }
async function call(url, opts) {
  const r = await fetch(url, opts); const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText); return body; }
function post(url, data) { return call(url, {method: 'POST', body: JSON.stringify(data),
  headers: {'Content-Type': 'application/json'}}); }
async function refresh(selected) {
  const info = await call('/api/entries'); $('model-name').textContent = info.model;
  const sel = $('entries'); sel.innerHTML = '';
  for (const e of info.entries) { const o = document.createElement('option');
    o.value = e.label; o.disabled = e.status !== 'ok';
    o.textContent = e.status === 'ok'
      ? `${e.label} (${e.tokens} tokens, state ${mb(e.state_bytes)}, ${e.source})`
                                      : `${e.label} [${e.status}]`;
    sel.appendChild(o); }
  if (selected) sel.value = selected;
  updateDownload(); }
function updateDownload() { const l = $('entries').value;
  $('download-link').href = l ? '/api/download?label=' + encodeURIComponent(l) : '#'; }
$('entries').onchange = updateDownload;
$('ingest-btn').onclick = async () => {
  const file = $('doc-file').files[0]; const text = $('doc-text').value;
  show('ingest-status', 'reading...');
  try { const r = await call('/api/ingest', {method: 'POST', body: file || text,
          headers: {'X-Source': encodeURIComponent(file ? file.name : 'pasted text')}});
        current = r.source;
        show('ingest-status', `read ${r.tokens} tokens of ${r.source} in ` +
             `${r.seconds.toFixed(1)} s: state ${mb(r.state_bytes)}`);
  } catch (e) { show('ingest-status', e.message, true); } };
$('save-btn').onclick = async () => {
  try { const r = await post('/api/save', {label: $('save-label').value,
          replace: $('save-replace').checked});
        show('save-status', `saved ${r.label}`); await refresh(r.label);
  } catch (e) { show('save-status', e.message, true); } };
$('load-btn').onclick = async () => {
  try { const r = await post('/api/load', {label: $('entries').value});
        current = r.label;
        show('load-status', `loaded ${r.label} (${r.tokens} tokens, state ${mb(r.state_bytes)})`);
  } catch (e) { show('load-status', e.message, true); } };
$('upload-btn').onclick = async () => {
  const file = $('upload-file').files[0];
  if (!file) { show('upload-status', 'choose a .tar file first', true); return; }
  try { const r = await call('/api/upload', {method: 'POST', body: file});
        show('upload-status', `added ${r.label}`); await refresh(r.label);
  } catch (e) { show('upload-status', e.message, true); } };
// Every question stays on the page with its answer, newest first.
function addExchange(question) {
  const box = document.createElement('div'); box.className = 'qa';
  const q = document.createElement('div'); q.className = 'q'; q.textContent = question;
  const doc = document.createElement('span'); doc.className = 'doc';
  doc.textContent = current ? ` (${current})` : ''; q.appendChild(doc);
  const a = document.createElement('div'); a.className = 'a';
  box.append(q, a); $('qa-log').prepend(box); return a; }
$('ask-btn').onclick = async () => {
  const num = id => $(id).value === '' ? null : Number($(id).value);
  const question = $('question').value; show('ask-status', 'thinking...');
  const r = await fetch('/api/ask', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({question, max_new_tokens: num('max-new-tokens'),
      temperature: num('temperature'), top_k: num('top-k'), top_p: num('top-p')})});
  if (!r.ok) { show('ask-status', (await r.json()).error, true); return; }
  const answer = addExchange(question);
  const reader = r.body.getReader(); const dec = new TextDecoder();
  for (;;) { const {value, done} = await reader.read(); if (done) break;
    answer.textContent += dec.decode(value, {stream: true}); }
  show('ask-status', 'done'); };
refresh();
</script></body></html>
"""
