// The viewer's Record button and the list of this sandbox's recordings
// (docs/recording.md). Shown only to the sandbox's owner on a server where
// recording is on: the list call fails for anyone else (a shared view has no
// API token). A recording plays in a <video> from a Blob fetched with the
// API token, which a <video src> could not send.

import { ApiError, api, getToken } from '/api.js';

const $ = (id) => document.getElementById(id);
const button = $('record-button');
const panel = $('recordings-panel');
const list = $('recordings-list');
const note = $('recordings-note');
const video = $('recordings-video');
const toggle = $('record-toggle');

const m = /^\/view\/([^/]+)\/?$/.exec(location.pathname);
const id = m ? decodeURIComponent(m[1]) : '';
const base = `/sandboxes/${encodeURIComponent(id)}/recordings`;
const POLL_MS = 3000;
let current = null;
let blobUrl = '';

function say(text, error = false) {
  note.textContent = text;
  note.dataset.error = String(error);
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

function megabytes(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MB`;
}

async function play(rid) {
  say('Loading…');
  const headers = {};
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const res = await fetch(`/api/v1${base}/${encodeURIComponent(rid)}`, { headers, cache: 'no-store' });
    if (!res.ok) throw new Error(`the server answered ${res.status}`);
    const blob = await res.blob();
    if (blobUrl) URL.revokeObjectURL(blobUrl);
    blobUrl = URL.createObjectURL(blob);
    video.src = blobUrl;
    video.hidden = false;
    say('');
    await video.play().catch(() => {});
  } catch (e) {
    say(`Could not load the recording: ${e.message}`, true);
  }
}

function render(data) {
  current = data.current || null;
  button.textContent = current ? '● Recording' : 'Record';
  button.dataset.recording = String(Boolean(current));
  toggle.textContent = current ? 'Stop recording' : 'Start recording';
  list.replaceChildren();
  for (const r of [...data.recordings].reverse()) {
    const li = document.createElement('li');
    const when = new Date(r.started_at).toLocaleString();
    const text = document.createElement('span');
    text.textContent = r.active
      ? `${when} · recording · ${seconds(r.duration_ms)}`
      : `${when} · ${seconds(r.duration_ms)} · ${megabytes(r.bytes)}`;
    li.append(text);
    if (!r.active) {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = 'Play';
      b.addEventListener('click', () => play(r.id));
      li.append(' ', b);
    }
    list.append(li);
  }
  if (!data.recordings.length) say('No recordings of this sandbox yet.');
}

async function refresh() {
  try {
    const data = await api('GET', base);
    if (!data.enabled && !data.recordings.length) return false;
    button.hidden = false;
    toggle.disabled = !data.enabled;
    render(data);
    return true;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    return false;
  }
}

toggle.addEventListener('click', async () => {
  toggle.disabled = true;
  try {
    if (current) {
      const r = await api('DELETE', `${base}/current`);
      say(`Saved: ${seconds(r.duration_ms)}, ${megabytes(r.bytes)}.`);
    } else {
      await api('POST', base);
      say('Recording. Everything on the screen is kept until you stop.');
    }
  } catch (e) {
    say(e.message, true);
  }
  toggle.disabled = false;
  await refresh();
});

button.addEventListener('click', () => {
  const open = panel.hidden;
  panel.hidden = !open;
  button.setAttribute('aria-expanded', String(open));
  if (open) refresh();
});

if (id) {
  refresh().then((shown) => {
    if (shown) setInterval(() => { if (current || !panel.hidden) refresh(); }, POLL_MS);
  });
}
