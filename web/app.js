// The sandbox list page: polls the API, keeps the table in step with it
// without rebuilding rows (so focus and hover survive a poll), and shows the
// selected sandbox's desktop in an iframe of /view/{id} once it is ready.

import { ApiError, api, createSandbox, deleteSandbox, getToken, listSandboxes, setToken } from '/api.js';

const POLL_MS = 1000;
const STARTING = new Set(['provisioning', 'booting']);
const KIND_LABEL = { browser: 'browser sandbox', workspace: 'workspace' };

const $ = (id) => document.getElementById(id);
const ui = {
  rows: $('sandbox-rows'),
  error: $('error'),
  notice: $('notice'),
  usage: $('usage'),
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
  // A quota or rate limit (429): the server's message names the limit.
  if (err instanceof ApiError && err.status === 429) {
    showError(source, `${prefix} (limit reached): ${describe(err)}`);
    loadUsage();
    return;
  }
  showError(source, `${prefix}: ${describe(err)}`);
}

// ---------- usage (quotas) ----------

let usageTick = 0;

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

/** "2 of 8 sandboxes · 0 of 3 logins", from GET /usage; quiet when it fails. */
async function loadUsage() {
  try {
    const u = await api('GET', '/usage');
    const { limits, used } = u || {};
    if (!limits || !used) return;
    const parts = [
      [used.sandboxes, limits.max_sandboxes, 'sandbox', 'sandboxes'],
      [used.logins, limits.max_logins, 'login', 'logins'],
    ].map(([n, max, one, many]) => `${n} of ${plural(max, one, many)}`);
    if (used.creates_last_minute > 0) {
      parts.push(`${used.creates_last_minute} of ${limits.creates_per_minute} creates this minute`);
    }
    setText(ui.usage, parts.join(' · '));
    const full = used.sandboxes >= limits.max_sandboxes
      || used.logins >= limits.max_logins
      || used.creates_last_minute >= limits.creates_per_minute;
    ui.usage.classList.toggle('full', full);
  } catch {
    // The usage line is a convenience: the table and its errors say the rest.
  }
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
  dropLoginIframe();
  poll();
  connectPoll();
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
    // Sandboxes change state on their own (a boot fails, the reaper ends one).
    if (usageTick++ % 5 === 0) loadUsage();
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

// A workspace's name (GET /workspaces), by sandbox id; asked once per new workspace.
const workspaceNames = new Map();
const namesAsked = new Set();

async function loadWorkspaceNames() {
  const data = await api('GET', '/workspaces');
  for (const w of (data && Array.isArray(data.workspaces) ? data.workspaces : [])) {
    if (w.sandbox_id) workspaceNames.set(w.sandbox_id, w.name);
  }
  render();
}

function applyList(list, startedAt) {
  const seen = new Set();
  let unnamed = false;
  for (const sb of list) {
    if (!sb || typeof sb.id !== 'string') continue;
    seen.add(sb.id);
    sandboxes.set(sb.id, sb);
    if (sb.kind === 'workspace' && !namesAsked.has(sb.id)) {
      namesAsked.add(sb.id);
      unnamed = true;
    }
  }
  if (unnamed) loadWorkspaceNames().catch(() => {});
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
      const name = kind === 'workspace' ? ($('workspace-name')?.value || '').trim() : '';
      const sb = await createSandbox(kind, name || undefined);
      createdAt.set(sb.id, Date.now());
      sandboxes.set(sb.id, sb);
      clearError('action');
      setText(ui.notice, `Created ${kindLabel(kind)} ${sb.id}.`);
      select(sb.id);
      loadUsage();
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
    loadUsage();
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
    const wsName = sb.kind === 'workspace' ? workspaceNames.get(sb.id) : undefined;
    setText(row.kind, wsName ? `workspace · ${wsName}` : sb.kind || '');
    updateBadge(row.state, state);
    setText(row.createdTime, formatCreated(sb.created_at));
    if (sb.created_at && row.createdTime.dateTime !== sb.created_at) {
      row.createdTime.dateTime = sb.created_at;
      const t = parseTime(sb.created_at);
      if (t !== null) row.createdTime.title = fullTime.format(new Date(t));
    }
    const d = details(sb);
    setText(row.info, sb.node ? `${d.text} · node ${sb.node}` : d.text);
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
  // The sandbox's terminal (web/terminal.html), beside the desktop.
  let termLink = document.getElementById('viewer-terminal');
  if (!termLink) {
    termLink = node('a', { text: 'Terminal' });
    termLink.id = 'viewer-terminal';
    termLink.className = ui.viewerNewTab.className;
    termLink.target = '_blank';
    termLink.rel = 'noopener';
    ui.viewerNewTab.after(termLink);
  }
  termLink.href = `/term/${encodeURIComponent(id)}`;
  termLink.hidden = ui.viewerNewTab.hidden;

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


// ---------- connect a CLI (logins) ----------
//
// One button per provider; a login shows its state live (polled about once a
// second), the browser sandbox's desktop while the user signs in, a Cancel
// button, and a code field when the CLI waits for a pasted code. Below: the
// stored credentials (provider and date only) and the login totals.

const LOGIN_STEPS = ['starting', 'awaiting_user', 'captured', 'stored', 'delivered', 'completed'];
const LOGIN_ENDED = new Set(['completed', 'failed', 'expired', 'cancelled']);
const LOGIN_WORDS = {
  starting: 'Starting a browser sandbox and the sign-in command…',
  awaiting_user: 'Sign in on the page shown below.',
  captured: 'Signed in. Fetching the credentials…',
  stored: 'Credentials sealed in the vault. Delivering them to your workspace…',
  delivered: 'Delivered to your workspace. Checking the CLI and cleaning up…',
  completed: 'Connected: the CLI is signed in in your workspace.',
};
// While a login is `starting`, the step it is in (`step` in GET /logins/{id}).
const STARTING_WORDS = {
  sandbox: 'Starting a browser sandbox…',
  agent: 'Browser sandbox ready. Starting the sign-in command…',
  cli_start: 'The sign-in command is starting…',
  prompts: 'Answering the sign-in command’s questions…',
  url: 'Waiting for the sign-in command’s sign-in page…',
};
const STARTING_ORDER = ['sandbox', 'agent', 'cli_start', 'prompts', 'url'];
const STEP_LABEL = {
  starting: 'starting',
  awaiting_user: 'sign in',
  captured: 'captured',
  stored: 'stored',
  delivered: 'delivered',
  completed: 'completed',
};

const cx = {
  buttons: $('connect-buttons'),
  box: $('login'),
  title: $('login-title'),
  badge: $('login-badge'),
  words: $('login-words'),
  steps: $('login-steps'),
  cancel: $('login-cancel'),
  dismiss: $('login-dismiss'),
  codeForm: $('login-code'),
  codeInput: $('login-code-input'),
  viewer: $('login-viewer'),
  credentials: $('credentials'),
  stats: $('login-stats'),
};

const providerNames = new Map(); // name -> display name
let login = null; // the login on show, as the API last described it
let loginIframe = null;
let connectTimer = 0;
let connectSeq = 0;
let connectTick = 0;
let providersLoaded = false;
let startingLogin = false;
let cancelling = false;

const providerLabel = (name) => providerNames.get(name) || name;

function dropLoginIframe() {
  if (loginIframe) {
    loginIframe.remove();
    loginIframe = null;
  }
  cx.viewer.hidden = true;
}

async function loadProviders() {
  const data = await api('GET', '/providers');
  const list = Array.isArray(data && data.providers) ? data.providers : [];
  providerNames.clear();
  const buttons = list.map((p) => {
    providerNames.set(p.name, p.display_name || p.name);
    const b = node('button', { type: 'button', class: 'connect-button', 'data-provider': p.name }, `Connect ${p.display_name || p.name}`);
    b.addEventListener('click', () => startLogin(p.name));
    return b;
  });
  cx.buttons.replaceChildren(...(buttons.length ? buttons : [node('span', { class: 'hint', text: 'No providers are configured.' })]));
  providersLoaded = true;
}

// Each record with its health: "Claude ✓", "Codex — expires in 2 h", a
// "Sign in again" button when the status calls for a new login, and Revoke.
const HEALTH_WORDS = {
  expired: 'expired',
  refresh_failed: 'could not refresh',
  revoked: 'no longer signed in',
};

function untilWords(when) {
  const t = parseTime(when);
  if (t === null) return '';
  const mins = Math.round((t - Date.now()) / 60000);
  if (mins <= 0) return 'expired';
  if (mins < 90) return `expires in ${mins} min`;
  const hours = Math.round(mins / 60);
  if (hours < 48) return `expires in ${hours} h`;
  return `expires in ${Math.round(hours / 24)} days`;
}

function credentialItem(c) {
  const li = node('li', { 'data-provider': c.provider, 'data-status': c.status || '' });
  const name = node('strong', { text: providerLabel(c.provider) });
  let words;
  if (c.status === 'healthy' || (c.status === null && !c.expires_at)) words = ' ✓';
  else if (c.status === 'expiring') words = ` — ${untilWords(c.expires_at)}`;
  else words = ` — ${HEALTH_WORDS[c.status] || c.status || 'not checked yet'}`;
  const state = node('span', { class: 'credential-state', text: words });
  const tips = [];
  if (c.expires_at) tips.push(`expires ${fullTime.format(new Date(parseTime(c.expires_at)))}`);
  if (c.checked_at) tips.push(`checked ${fullTime.format(new Date(parseTime(c.checked_at)))}`);
  if (c.detail) tips.push(c.detail);
  tips.push(`version ${c.version}`);
  if (Array.isArray(c.workspaces) && c.workspaces.length) tips.push(`in workspace ${c.workspaces.join(', ')}`);
  state.title = tips.join('; ');
  li.append(name, state);
  if (Array.isArray(c.workspaces) && c.workspaces.length > 1) {
    li.append(node('span', { class: 'hint credential-workspaces', text: ` (in ${c.workspaces.join(', ')})` }));
  }
  if (c.sign_in_again) {
    const again = node('button', { type: 'button', class: 'small primary', 'data-action': 'sign-in-again' }, 'Sign in again');
    again.addEventListener('click', () => startLogin(c.provider));
    li.append(' ', again);
  }
  const deliver = node('button', { type: 'button', class: 'small', 'data-action': 'deliver' }, 'Deliver to…');
  deliver.title = 'Write these credentials into another of your workspaces (it must be running)';
  deliver.addEventListener('click', () => deliverCredentials(c.provider));
  li.append(' ', deliver);
  const revoke = node('button', { type: 'button', class: 'small', 'data-action': 'revoke' }, 'Revoke');
  revoke.addEventListener('click', () => revokeCredentials(c.provider));
  li.append(' ', revoke);
  return li;
}

async function loadCredentials() {
  const data = await api('GET', '/credentials');
  const list = Array.isArray(data && data.credentials) ? data.credentials : [];
  if (list.length === 0) {
    cx.credentials.replaceChildren(node('li', { class: 'hint', text: 'none yet' }));
  } else {
    cx.credentials.replaceChildren(...list.map(credentialItem));
  }
  await loadAudit();
}

// POST /credentials/{provider}/deliver: the same record into another
// workspace, named by the user.
async function deliverCredentials(provider) {
  const workspace = (window.prompt(`Deliver the ${providerLabel(provider)} credentials to which workspace?`, 'default') || '').trim();
  if (!workspace) return;
  try {
    const d = await api('POST', `/credentials/${encodeURIComponent(provider)}/deliver`, { workspace });
    clearError('login');
    setText(ui.notice, `${providerLabel(provider)} credentials delivered to workspace ${workspace} (${d.workspace_sandbox_id}).`);
  } catch (err) {
    handleError('login', `Could not deliver the ${providerLabel(provider)} credentials to ${workspace}`, err);
  }
  refreshSide();
}

async function revokeCredentials(provider) {
  if (!window.confirm(`Remove the ${providerLabel(provider)} credentials from the vault and every workspace?`)) return;
  try {
    await api('DELETE', `/credentials/${encodeURIComponent(provider)}`);
    clearError('login');
    setText(ui.notice, `${providerLabel(provider)} credentials revoked.`);
  } catch (err) {
    handleError('login', `Could not revoke the ${providerLabel(provider)} credentials`, err);
  }
  refreshSide();
}

// The caller's credential events (GET /audit), newest first.
const AUDIT_WORDS = {
  captured: 'captured by a login',
  delivered: 'delivered to the workspace',
  recaptured: 'refreshed by the CLI and captured back',
  expired: 'expired',
  refresh_failed: 'refresh failed',
  revoked: 'revoked',
};

async function loadAudit() {
  const box = $('audit');
  if (!box) return;
  const data = await api('GET', '/audit?limit=20');
  const events = Array.isArray(data && data.events) ? data.events : [];
  if (events.length === 0) {
    box.replaceChildren(node('li', { class: 'hint', text: 'none yet' }));
    return;
  }
  box.replaceChildren(
    ...events.map((e) => {
      const t = node('time', { datetime: e.at || '', text: formatCreated(e.at) });
      const tt = parseTime(e.at);
      if (tt !== null) t.title = fullTime.format(new Date(tt));
      const bits = [e.workspace_sandbox_id && `workspace ${e.workspace_sandbox_id}`, e.login_id && `login ${e.login_id}`, e.detail].filter(Boolean);
      return node('li', { 'data-kind': e.kind }, t, ' ', node('strong', { text: providerLabel(e.provider) }), ` ${AUDIT_WORDS[e.kind] || e.kind}`, bits.length ? ` (${bits.join(', ')})` : '');
    }),
  );
}

async function loadStats() {
  const data = await api('GET', '/login-stats');
  const entries = Object.entries((data && data.providers) || {}).filter(([, s]) => s && s.started > 0);
  if (entries.length === 0) {
    setText(cx.stats, 'Logins since the server started: none.');
    return;
  }
  const parts = entries.map(([name, s]) => {
    const failed = Object.entries(s.failed || {});
    const failedTotal = failed.reduce((n, [, v]) => n + v, 0);
    let text = `${providerLabel(name)} ${s.started} started, ${s.completed} completed, ${failedTotal} failed`;
    if (failedTotal) text += ` (${failed.map(([r, v]) => `${r} ${v}`).join(', ')})`;
    if (typeof s.mean_seconds_to_complete === 'number') text += `, ${Math.round(s.mean_seconds_to_complete)} s to complete on average`;
    return text;
  });
  setText(cx.stats, `Logins since the server started: ${parts.join('; ')}.`);
}

async function startLogin(provider) {
  startingLogin = true;
  renderLogin();
  try {
    const l = await api('POST', '/logins', { provider });
    clearError('login');
    showLogin(l);
    loadUsage();
    connectPoll();
  } catch (err) {
    handleError('login', `Could not start the ${providerLabel(provider)} login`, err);
  } finally {
    startingLogin = false;
    renderLogin();
  }
}

function showLogin(l) {
  const ended = login && login.id === l.id && LOGIN_ENDED.has(login.state);
  login = l;
  renderLogin();
  // The totals and the list change when a login ends.
  if (LOGIN_ENDED.has(l.state) && !ended) refreshSide();
}

function refreshSide() {
  loadCredentials().catch((err) => handleError('login', 'Could not load your connected CLIs', err));
  loadStats().catch((err) => handleError('login', 'Could not load the login totals', err));
}

cx.cancel.addEventListener('click', async () => {
  if (!login) return;
  cancelling = true;
  renderLogin();
  try {
    const l = await api('DELETE', `/logins/${encodeURIComponent(login.id)}`);
    clearError('login');
    if (l && l.id) showLogin(l);
  } catch (err) {
    handleError('login', 'Could not cancel the login', err);
  } finally {
    cancelling = false;
    renderLogin();
  }
});

cx.dismiss.addEventListener('click', () => {
  login = null;
  renderLogin();
});

cx.codeForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const code = cx.codeInput.value.trim();
  if (!login || !code) {
    cx.codeInput.focus();
    return;
  }
  try {
    await api('POST', `/logins/${encodeURIComponent(login.id)}/code`, { code });
    cx.codeInput.value = '';
    clearError('login');
    setText(ui.notice, 'Code sent to the CLI.');
  } catch (err) {
    handleError('login', 'Could not send the code', err);
  }
});

function renderLogin() {
  document.body.dataset.loginState = login ? login.state : '';
  for (const b of cx.buttons.querySelectorAll('button')) {
    b.disabled = startingLogin || Boolean(login && !LOGIN_ENDED.has(login.state));
  }
  if (!login) {
    cx.box.hidden = true;
    dropLoginIframe();
    return;
  }
  const l = login;
  const ended = LOGIN_ENDED.has(l.state);
  cx.box.hidden = false;
  cx.box.dataset.loginId = l.id;
  cx.box.dataset.state = l.state;
  setText(cx.title, `${providerLabel(l.provider)} login`);
  updateBadge(cx.badge, l.state);
  let words = LOGIN_WORDS[l.state] || l.state;
  if (l.state === 'failed') words = `Failed: ${l.error || 'the server gave no reason'}`;
  else if (l.state === 'expired') words = `Expired: ${l.error || 'not signed in in time'}`;
  else if (l.state === 'cancelled') words = `Cancelled${l.error ? `: ${l.error}` : '.'}`;
  else if (l.awaiting_code) words = 'Sign in below, then paste the code the page shows.';
  else if (l.state === 'starting' && STARTING_WORDS[l.step]) {
    const n = STARTING_ORDER.indexOf(l.step) + 1;
    words = `${STARTING_WORDS[l.step]} (step ${n} of ${STARTING_ORDER.length})`;
  }
  cx.box.dataset.step = l.state === 'starting' && l.step ? l.step : '';
  setText(cx.words, words);
  cx.words.classList.toggle('reason', ['failed', 'expired'].includes(l.state));

  const at = LOGIN_STEPS.indexOf(l.state);
  const lastReached = at >= 0 ? at : -1;
  const key = `${l.id}:${l.state}`;
  if (cx.steps.dataset.key !== key) {
    cx.steps.dataset.key = key;
    cx.steps.replaceChildren(
      ...LOGIN_STEPS.map((s, i) => {
        let cls = 'todo';
        if (i < lastReached || (i === lastReached && s === 'completed')) cls = 'done';
        else if (i === lastReached) cls = 'current';
        const li = node('li', { class: cls, 'data-step': s, text: STEP_LABEL[s] });
        if (cls === 'current') li.setAttribute('aria-current', 'step');
        return li;
      }),
    );
    cx.steps.hidden = ended && l.state !== 'completed';
  }

  cx.cancel.hidden = ended;
  cx.cancel.disabled = cancelling;
  setText(cx.cancel, cancelling ? 'Cancelling…' : 'Cancel');
  cx.dismiss.hidden = !ended;
  cx.codeForm.hidden = ended || !l.awaiting_code;

  // The desktop of the login's browser sandbox while the user signs in. It is
  // embedded once the sign-in page is up (`awaiting_user`): while a sandbox
  // starts, the host's network changes under the browser, which can abort the
  // viewer's own module loads.
  const sb = l.browser_sandbox_id;
  const live = !ended && sb && ['awaiting_user', 'captured'].includes(l.state);
  if (live) {
    const src = l.viewer_url || `/view/${encodeURIComponent(sb)}`;
    if (!loginIframe || loginIframe.dataset.id !== sb) {
      dropLoginIframe();
      loginIframe = node('iframe', {
        src,
        title: `Sign in to ${providerLabel(l.provider)}: desktop of sandbox ${sb}`,
        'data-id': sb,
        allow: 'clipboard-read; clipboard-write',
      });
      loginIframe.dataset.since = String(Date.now());
      cx.viewer.append(loginIframe);
    } else {
      reloadStuckViewer(loginIframe);
    }
    cx.viewer.hidden = false;
  } else {
    dropLoginIframe();
  }
}

// A viewer page whose scripts failed to load (a network change aborts
// requests in flight) never starts, and says nothing: load it again.
function reloadStuckViewer(frame) {
  if (Date.now() - Number(frame.dataset.since || 0) < 10_000) return;
  let started = true;
  try {
    started = Boolean(frame.contentWindow && frame.contentWindow.airlockViewer);
  } catch {
    started = true; // not ours to look into
  }
  if (started) return;
  console.warn(`the login viewer ${frame.src} did not start; loading it again`);
  frame.dataset.since = String(Date.now());
  frame.src = frame.getAttribute('src');
}

async function connectPoll() {
  clearTimeout(connectTimer);
  const seq = ++connectSeq;
  try {
    if (!providersLoaded) {
      await loadProviders();
      // Come back to a login still under way (a reload while signing in).
      const data = await api('GET', '/logins');
      const list = Array.isArray(data && data.logins) ? data.logins : [];
      const active = list
        .filter((l) => !LOGIN_ENDED.has(l.state))
        .sort((a, b) => (parseTime(b.created_at) || 0) - (parseTime(a.created_at) || 0))[0];
      if (active && !login) login = active;
      refreshSide();
    }
    if (seq !== connectSeq) return;
    if (login && !LOGIN_ENDED.has(login.state)) {
      const l = await api('GET', `/logins/${encodeURIComponent(login.id)}`);
      if (seq !== connectSeq) return;
      if (login && l && l.id === login.id) showLogin(l);
    } else if (connectTick % 10 === 0) {
      refreshSide();
    }
    connectTick += 1;
    clearError('connect');
    renderLogin();
  } catch (err) {
    if (seq !== connectSeq) return;
    if (!(err instanceof ApiError && err.status === 0)) handleError('connect', 'Could not load the login', err);
  } finally {
    if (seq === connectSeq && !needToken) connectTimer = setTimeout(connectPoll, POLL_MS);
  }
}

render();
poll();
connectPoll();

// Which path viewers use (read by the viewer page at load; see docs/ui.md).
{
  const select = $('viewer-path');
  select.value = localStorage.getItem('airlock.viewer-path') || '';
  select.addEventListener('change', () => {
    if (select.value) localStorage.setItem('airlock.viewer-path', select.value);
    else localStorage.removeItem('airlock.viewer-path');
    // Open viewers reconnect on the chosen path.
    for (const frame of document.querySelectorAll('iframe[src^="/view/"]')) frame.src = frame.getAttribute('src');
  });
}
