// The admin's "Nodes" panel: the cluster's node registry (GET /api/v1/nodes)
// with each node's state, lease, capacity and load, and Drain/Resume.
//
// It shows itself only when the API answers with at least one node: a
// non-admin gets 403 and a single host has no nodes, and both see nothing.

import { ApiError, api } from '/api.js';

const POLL_MS = 3000;
const $ = (id) => document.getElementById(id);
const panel = $('nodes-panel');
const rows = $('node-rows');
const notice = $('nodes-notice');
const busy = new Set(); // node names with a drain or resume under way
let timer = 0;

function cell(text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
}

function gib(bytes) {
  return `${(Number(bytes) / 2 ** 30).toFixed(1)} GiB`;
}

function lease(ms) {
  const s = Number(ms) / 1000;
  return s >= 0 ? `${s.toFixed(1)} s left` : `expired ${(-s).toFixed(1)} s ago`;
}

async function act(name, verb) {
  busy.add(name);
  notice.textContent = `${verb === 'drain' ? 'Draining' : 'Resuming'} node ${name}…`;
  try {
    await api('POST', `/nodes/${encodeURIComponent(name)}/${verb}`);
    notice.textContent =
      verb === 'drain'
        ? `Node ${name} takes no new sandboxes; what runs there keeps running.`
        : `Node ${name} takes new sandboxes again.`;
  } catch (err) {
    notice.textContent = `Could not ${verb} node ${name}: ${err.message}`;
  } finally {
    busy.delete(name);
    load();
  }
}

function render(nodes) {
  const trs = nodes.map((n) => {
    const tr = document.createElement('tr');
    tr.dataset.node = n.name;
    tr.dataset.state = n.state;
    const badge = document.createElement('span');
    badge.className = 'badge';
    badge.dataset.state = n.state;
    badge.textContent = n.state;
    const state = cell('', 'state');
    state.append(badge);
    const verb = n.draining ? 'resume' : 'drain';
    const button = document.createElement('button');
    button.type = 'button';
    button.className = `small ${verb}${verb === 'drain' ? ' danger' : ''}`;
    button.textContent = verb === 'drain' ? 'Drain' : 'Resume';
    button.disabled = busy.has(n.name);
    button.setAttribute('aria-label', `${button.textContent} node ${n.name}`);
    button.addEventListener('click', () => act(n.name, verb));
    const actions = cell('', 'actions');
    actions.append(button);
    tr.append(
      cell(n.name, 'mono'),
      cell(n.address, 'mono'),
      state,
      cell(lease(n.lease_left_ms), 'lease'),
      cell(String(n.cpus)),
      cell(`${gib(n.memory_free)} / ${gib(n.memory_total)}`),
      cell(gib(n.disk_free)),
      cell(String(n.load), 'load'),
      actions,
    );
    return tr;
  });
  rows.replaceChildren(...trs);
}

async function load() {
  clearTimeout(timer);
  try {
    const data = await api('GET', '/nodes');
    const nodes = Array.isArray(data && data.nodes) ? data.nodes : [];
    panel.hidden = nodes.length === 0;
    render(nodes);
  } catch (err) {
    // Not an admin (403), no token yet (401): no panel, and no error banner.
    panel.hidden = true;
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
      timer = setTimeout(load, POLL_MS * 10);
      return;
    }
  }
  timer = setTimeout(load, POLL_MS);
}

load();
