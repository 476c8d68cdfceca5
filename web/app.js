// The sandbox list page: polls the API, keeps the table in step with it
// without rebuilding rows (so focus and hover survive a poll), and shows the
// selected sandbox's desktop in an iframe of /view/{id} once it is ready.

import { ApiError, createSandbox, deleteSandbox, getToken, listSandboxes, setToken } from '/api.js';

const POLL_MS = 1000;
const STARTING = new Set(['provisioning', 'booting']);
const KIND_LABEL = { browser: 'browser sandbox', workspace: 'workspace' };

const $ = (id) => document.getElementById(id);
const ui = {
  rows: $('sandbox-rows'),
  error: $('error'),
  notice: $('notice'),
  newButtons: [$('new-browser'), $('new-workspace')],
  tokenForm: $('token-form'),
  tokenInput: $('token-input'),
  tokenCancel: $('token-cancel'),
  tokenClear: $('token-clear'),
  changeToken: $('change-token'),
  panel: $('viewer-panel'),
  viewerTitle: $('viewer-title'),
  viewerBadge: $('viewer-badge'),
  viewerBody: $('viewer-body'),
  viewerMessage: $('viewer-message'),
  viewerNewTab: $('viewer-newtab'),
  viewerClose: $('viewer-close'),
};

const sandboxes = new Map(); // id -> sandbox as the API last described it
const rowsById = new Map(); // id -> { tr, cells… }
const deleting = new Set();
const createdAt = new Map(); // id -> local time we created it (see applyList)
let loaded = false;
let selectedId = idFromHash();
let needToken = false;
let pollTimer = 0;
let pollSeq = 0;
let pollFailures = 0;
let errorSource = '';
let iframe = null;
let messageKey = '';

// ---------- small helpers ----------

function parseTime(value) {
  const t = value ? Date.parse(value) : NaN;
  return Number.isNaN(t) ? null : t;
}

function seconds(ms) {
  return Math.max(0, Math.round(ms / 1000));
}

function formatDuration(s) {
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });
const dateAndTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const fullTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'long' });

// Today's sandboxes show the time only; older ones the date too.
function formatCreated(value) {
  const t = parseTime(value);
  if (t === null) return '—';
  const d = new Date(t);
  return d.toDateString() === new Date().toDateString() ? timeOnly.format(d) : dateAndTime.format(d);
}

function elapsedSince(value) {
  const t = parseTime(value);
  return t === null ? null : seconds(Date.now() - t);
}

function kindLabel(kind) {
  return KIND_LABEL[kind] || kind || 'sandbox';
}

function idFromHash() {
  const h = decodeURIComponent(location.hash.replace(/^#/, ''));
  return h.startsWith('sandbox=') ? h.slice('sandbox='.length) : '';
}

function node(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

function setText(e, text) {
  if (e.textContent !== text) e.textContent = text;
}

// ---------- errors and notices ----------

function showError(source, text) {
  errorSource = source;
  setText(ui.error, text);
}

function clearError(source) {
  if (!source || errorSource === source) {
    errorSource = '';
    setText(ui.error, '');
  }
}

function describe(err) {
  if (err instanceof ApiError) return err.message;
  return String((err && err.message) || err);
}

function handleError(source, prefix, err) {
  if (err instanceof ApiError && err.unauthorized) {
    askForToken(getToken() ? 'The stored API token was refused. Enter a valid one.' : 'This server needs an API token.');
    return;
  }
  showError(source, `${prefix}: ${describe(err)}`);
}

// ---------- token form ----------

function askForToken(message) {
  needToken = true;
  clearTimeout(pollTimer);
  showError('auth', message);
  ui.tokenForm.hidden = false;
  ui.tokenInput.value = '';
  ui.tokenInput.focus();
  render();
}

ui.tokenForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const token = ui.tokenInput.value.trim();
  if (!token) {
    ui.tokenInput.focus();
    return;
  }
  setToken(token);
  closeTokenForm();
});

ui.tokenClear.addEventListener('click', () => {
  setToken('');
  closeTokenForm();
});

ui.tokenCancel.addEventListener('click', () => {
  ui.tokenForm.hidden = true;
});

ui.changeToken.addEventListener('click', () => {
  ui.tokenForm.hidden = false;
  ui.tokenInput.value = '';
  ui.tokenInput.focus();
});

function closeTokenForm() {
  ui.tokenForm.hidden = true;
  needToken = false;
  clearError('auth');
  // A viewer open with the old token would keep being refused: start it again.
  dropIframe();
  poll();
}

// ---------- polling ----------

async function poll() {
  clearTimeout(pollTimer);
  const seq = ++pollSeq;
  const startedAt = Date.now();
  try {
    const list = await listSandboxes();
    if (seq !== pollSeq) return; // a newer poll is under way
    pollFailures = 0;
    applyList(list, startedAt);
    clearError('poll');
  } catch (err) {
    if (seq !== pollSeq) return;
    // One lost request (a network change aborts requests in flight) is not
    // worth a red banner; two in a row are.
    pollFailures += 1;
    const transient = err instanceof ApiError && err.status === 0 && pollFailures < 2;
    if (!transient) handleError('poll', 'Could not load your sandboxes', err);
  } finally {
    if (seq === pollSeq && !needToken) pollTimer = setTimeout(poll, POLL_MS);
  }
}

function applyList(list, startedAt) {
  const seen = new Set();
  for (const sb of list) {
    if (!sb || typeof sb.id !== 'string') continue;
    seen.add(sb.id);
    sandboxes.set(sb.id, sb);
  }
  for (const id of [...sandboxes.keys()]) {
    // A sandbox created while this poll was in flight is not in its answer yet.
    if (!seen.has(id) && !((createdAt.get(id) || 0) >= startedAt)) {
      sandboxes.delete(id);
      createdAt.delete(id);
    }
  }
  loaded = true;
  render();
}

// ---------- actions ----------

for (const button of ui.newButtons) {
  button.addEventListener('click', async () => {
    const kind = button.dataset.kind;
    for (const b of ui.newButtons) b.disabled = true;
    setText(ui.notice, `Creating a ${kindLabel(kind)}…`);
    try {
      const sb = await createSandbox(kind);
      createdAt.set(sb.id, Date.now());
      sandboxes.set(sb.id, sb);
      clearError('action');
      setText(ui.notice, `Created ${kindLabel(kind)} ${sb.id}.`);
      select(sb.id);
    } catch (err) {
      setText(ui.notice, '');
      handleError('action', `Could not create a ${kindLabel(kind)}`, err);
    } finally {
      for (const b of ui.newButtons) b.disabled = false;
    }
  });
}

async function remove(id) {
  deleting.add(id);
  render();
  try {
    const answer = await deleteSandbox(id);
    const sb = sandboxes.get(id);
    if (answer && answer.id === id) sandboxes.set(id, answer);
    else if (sb && sb.state !== 'stopped') sandboxes.set(id, { ...sb, state: 'stopping' });
    clearError('action');
    setText(ui.notice, `Deleting sandbox ${id}.`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      sandboxes.delete(id);
    } else {
      handleError('action', `Could not delete sandbox ${id}`, err);
    }
  } finally {
    deleting.delete(id);
    render();
    poll();
  }
}

function select(id) {
  selectedId = id;
  const url = new URL(location.href);
  url.hash = id ? `sandbox=${encodeURIComponent(id)}` : '';
  history.replaceState(null, '', id ? url.href : url.pathname + url.search);
  render();
}

window.addEventListener('hashchange', () => {
  selectedId = idFromHash();
  render();
});

ui.viewerClose.addEventListener('click', () => select(''));

// ---------- rendering ----------

function badge(state) {
  const b = node('span', { class: 'badge', 'data-state': state || 'unknown' });
  if (STARTING.has(state) || state === 'stopping') b.append(node('span', { class: 'spinner', 'aria-hidden': 'true' }));
  b.append(state || 'unknown');
  return b;
}

function updateBadge(holder, state) {
  const current = holder.firstElementChild;
  if (current && current.dataset.state === (state || 'unknown')) return;
  holder.replaceChildren(badge(state));
}

function details(sb) {
  if (STARTING.has(sb.state)) {
    const s = elapsedSince(sb.created_at);
    return { text: s === null ? 'starting…' : `starting for ${formatDuration(s)}`, failed: false };
  }
  if (sb.state === 'failed') return { text: sb.failure_reason || 'failed; the server gave no reason', failed: true };
  if (sb.state === 'ready') {
    const c = parseTime(sb.created_at);
    const r = parseTime(sb.ready_at);
    return { text: c !== null && r !== null ? `ready in ${formatDuration(seconds(r - c))}` : 'ready', failed: false };
  }
  if (sb.state === 'stopping') return { text: 'stopping…', failed: false };
  if (sb.failure_reason) return { text: sb.failure_reason, failed: true };
  return { text: '—', failed: false };
}

function makeRow(id) {
  const tr = node('tr', { 'data-id': id });
  const idCell = node('td', { class: 'mono' });
  const kind = node('td');
  const state = node('td', { class: 'state' });
  const created = node('td');
  const createdTime = node('time');
  created.append(createdTime);
  const info = node('td', { class: 'details' });
  const open = node('button', { type: 'button', class: 'small open' }, 'Open viewer');
  const del = node('button', { type: 'button', class: 'small danger delete' }, 'Delete');
  open.addEventListener('click', () => select(id));
  del.addEventListener('click', () => remove(id));
  const actions = node('td', { class: 'actions' }, open, del);
  tr.append(idCell, kind, state, created, info, actions);
  return { tr, idCell, kind, state, createdTime, info, open, del };
}

function renderRows() {
  const list = [...sandboxes.values()].sort(
    (a, b) => (parseTime(b.created_at) || 0) - (parseTime(a.created_at) || 0) || a.id.localeCompare(b.id),
  );

  for (const [id, row] of rowsById) {
    if (!sandboxes.has(id)) {
      row.tr.remove();
      rowsById.delete(id);
    }
  }

  if (list.length === 0) {
    let text = 'Loading…';
    if (loaded) text = 'No sandboxes yet. Start one with the buttons above.';
    else if (needToken) text = 'Enter an API token to see your sandboxes.';
    const empty = ui.rows.querySelector('tr.empty');
    if (empty) setText(empty.firstElementChild, text);
    else ui.rows.replaceChildren(node('tr', { class: 'empty' }, node('td', { colspan: '6', text })));
    return;
  }
  const empty = ui.rows.querySelector('tr.empty');
  if (empty) empty.remove();

  let previous = null;
  for (const sb of list) {
    let row = rowsById.get(sb.id);
    if (!row) {
      row = makeRow(sb.id);
      rowsById.set(sb.id, row);
    }
    // Keep the DOM order equal to the sorted order, moving rows only if needed.
    const wanted = previous ? previous.nextSibling : ui.rows.firstChild;
    if (wanted !== row.tr) ui.rows.insertBefore(row.tr, wanted);
    previous = row.tr;

    const state = sb.state || 'unknown';
    row.tr.dataset.state = state;
    row.tr.classList.toggle('selected', sb.id === selectedId);
    row.tr.classList.toggle('gone', state === 'stopped');
    setText(row.idCell, sb.id);
    setText(row.kind, sb.kind || '');
    updateBadge(row.state, state);
    setText(row.createdTime, formatCreated(sb.created_at));
    if (sb.created_at && row.createdTime.dateTime !== sb.created_at) {
      row.createdTime.dateTime = sb.created_at;
      const t = parseTime(sb.created_at);
      if (t !== null) row.createdTime.title = fullTime.format(new Date(t));
    }
    const d = details(sb);
    setText(row.info, d.text);
    row.info.classList.toggle('reason', d.failed);
    if (sb.id === selectedId) row.tr.setAttribute('aria-current', 'true');
    else row.tr.removeAttribute('aria-current');
    row.open.setAttribute('aria-label', `Open viewer of sandbox ${sb.id}`);
    row.del.setAttribute('aria-label', `Delete sandbox ${sb.id}`);
    const busy = deleting.has(sb.id);
    row.del.disabled = busy || state === 'stopping' || state === 'stopped';
    setText(row.del, busy ? 'Deleting…' : 'Delete');
  }
}

function dropIframe() {
  if (iframe) {
    iframe.remove();
    iframe = null;
  }
}

function showMessage(key, build) {
  ui.viewerMessage.hidden = false;
  if (messageKey !== key) {
    messageKey = key;
    ui.viewerMessage.replaceChildren(...build());
  }
}

function renderViewer() {
  if (!selectedId) {
    ui.panel.hidden = true;
    dropIframe();
    messageKey = '';
    return;
  }
  ui.panel.hidden = false;
  const id = selectedId;
  const sb = sandboxes.get(id);
  setText(ui.viewerTitle, sb ? `${kindLabel(sb.kind)} ${id}` : `Sandbox ${id}`);
  const viewerUrl = (sb && sb.viewer_url) || `/view/${encodeURIComponent(id)}`;
  ui.viewerNewTab.href = viewerUrl;
  ui.viewerNewTab.hidden = !sb || sb.state !== 'ready';

  if (!sb) {
    dropIframe();
    ui.viewerBadge.replaceChildren();
    showMessage(loaded ? 'gone' : 'loading', () => [
      node('p', { text: loaded ? 'This sandbox is not in your list (deleted, or not yours).' : 'Loading…' }),
    ]);
    return;
  }

  updateBadge(ui.viewerBadge, sb.state);

  if (sb.state === 'ready') {
    if (!iframe || iframe.dataset.id !== id) {
      dropIframe();
      iframe = node('iframe', {
        src: viewerUrl,
        title: `Desktop of sandbox ${id}`,
        'data-id': id,
        allow: 'clipboard-read; clipboard-write; fullscreen',
      });
      ui.viewerBody.append(iframe);
    }
    ui.viewerMessage.hidden = true;
    messageKey = '';
    return;
  }

  dropIframe();
  if (STARTING.has(sb.state)) {
    showMessage(`starting:${id}`, () => [
      node('span', { class: 'spinner large', 'aria-hidden': 'true' }),
      node('p', { class: 'phase' }),
      node('p', { class: 'elapsed', 'aria-hidden': 'true' }),
    ]);
    const s = elapsedSince(sb.created_at);
    setText(ui.viewerMessage.querySelector('.phase'), `Starting the ${kindLabel(sb.kind)}: ${sb.state}…`);
    setText(ui.viewerMessage.querySelector('.elapsed'), s === null ? '' : `${s} s elapsed`);
  } else if (sb.state === 'stopping') {
    showMessage(`stopping:${id}`, () => [
      node('span', { class: 'spinner large', 'aria-hidden': 'true' }),
      node('p', { text: 'The sandbox is stopping.' }),
    ]);
  } else if (sb.state === 'failed') {
    showMessage(`failed:${id}:${sb.failure_reason || ''}`, () => [
      node('p', { text: 'This sandbox failed.' }),
      node('p', { class: 'reason', text: sb.failure_reason || 'The server gave no reason.' }),
    ]);
  } else {
    showMessage(`other:${id}:${sb.state}`, () => [
      node('p', { text: sb.state === 'stopped' ? 'This sandbox has stopped.' : `This sandbox is ${sb.state}.` }),
    ]);
  }
}

function render() {
  renderRows();
  renderViewer();
}

// Elapsed times move even when nothing else changes.
setInterval(() => {
  if (loaded) render();
}, 1000);

render();
poll();
