// The web terminal: a shell on a PTY in the sandbox, over the process API
// (POST …/processes with a pty, then the …/processes/{pid}/io WebSocket),
// drawn by xterm.js (loaded by terminal.html as the global `Terminal`).
//
// Out of the socket: binary frames [1|2][bytes] go to the screen; a text
// frame {"type":"exit"} ends the session. Into it: keystrokes as binary
// frames, and {"type":"resize"} whenever the window changes size.
//
// The shell outlives its socket (the agent keeps it and a backlog of its
// output), so a dropped socket is not the end: the page attaches again by
// itself, with a fresh ticket, from the output offset it has drawn
// (`?offset=`), so nothing is drawn twice; it waits 0.5 s, then twice as
// long each time up to 10 s, and gives up when the process is gone.

import { api } from '/api.js';

const id = decodeURIComponent(location.pathname.split('/')[2] || '');
const $ = (x) => document.getElementById(x);
const status = (text, state) => {
  $('status').textContent = text;
  if (state) document.body.dataset.terminalState = state;
};
const sandboxPath = `/sandboxes/${encodeURIComponent(id)}`;

$('title').textContent = `Terminal: ${id}`;
$('desktop').href = `/view/${encodeURIComponent(id)}`;

const term = new window.Terminal({
  cursorBlink: true,
  fontFamily: 'ui-monospace, Menlo, Consolas, monospace',
  fontSize: 14,
  scrollback: 5000,
});
term.open($('term'));
window.airlockTerminal = term;

// The grid that fits the element, from one character's measured size.
function grid() {
  const probe = document.createElement('span');
  probe.style.cssText = 'position:absolute;visibility:hidden;white-space:pre;font:14px ui-monospace, Menlo, Consolas, monospace';
  probe.textContent = 'W'.repeat(50);
  document.body.append(probe);
  const w = probe.getBoundingClientRect().width / 50;
  const h = probe.getBoundingClientRect().height * 1.02;
  probe.remove();
  const box = $('term').getBoundingClientRect();
  return {
    cols: Math.max(20, Math.min(1000, Math.floor((box.width - 8) / w))),
    rows: Math.max(5, Math.min(1000, Math.floor((box.height - 8) / h))),
  };
}

let socket = null;
const encoder = new TextEncoder();

term.onData((data) => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
});

function fit() {
  const { cols, rows } = grid();
  if (cols !== term.cols || rows !== term.rows) term.resize(cols, rows);
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: 'resize', cols, rows }));
  }
}
let fitTimer = 0;
addEventListener('resize', () => {
  clearTimeout(fitTimer);
  fitTimer = setTimeout(fit, 100);
});

// The session: the process, and how much of its output is on the screen.
let session = null;
let retryTimer = 0;
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 10_000;

async function ioUrl(pid, offset) {
  // Browsers cannot set headers on a WebSocket: a single-use ticket instead.
  const { ticket } = await api('POST', `${sandboxPath}/tickets`);
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/api/v1${sandboxPath}/processes/${pid}/io?offset=${offset}&ticket=${encodeURIComponent(ticket)}`;
}

async function start() {
  clearTimeout(retryTimer);
  $('restart').hidden = true;
  status('Starting a shell…', 'connecting');
  const { cols, rows } = grid();
  term.resize(cols, rows);
  try {
    const proc = await api('POST', `${sandboxPath}/processes`, {
      argv: ['bash', '-l'],
      pty: { cols, rows },
    });
    session = { pid: proc.pid, offset: 0, retryMs: RETRY_FIRST_MS, reconnects: 0 };
    attach(session, await ioUrl(proc.pid, 0));
  } catch (e) {
    status(`Could not start a shell: ${e.message}`, 'failed');
    $('restart').hidden = false;
  }
}

function attach(s, url) {
  socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  socket.onopen = () => {
    s.retryMs = RETRY_FIRST_MS;
    status(`Connected (process ${s.pid}${s.reconnects ? `, reconnected ${s.reconnects}×` : ''})`, 'connected');
    // The window may have changed while the socket was down.
    fit();
    term.focus();
  };
  socket.onmessage = (ev) => {
    if (typeof ev.data !== 'string') {
      const bytes = new Uint8Array(ev.data).subarray(1);
      s.offset += bytes.length;
      term.write(bytes);
      return;
    }
    const event = JSON.parse(ev.data);
    if (event.type === 'exit') {
      const how = event.exit_code !== null ? `exit code ${event.exit_code}` : `signal ${event.signal}`;
      status(`The shell ended (${how})`, 'ended');
    } else if (event.type === 'skipped') {
      s.offset += event.bytes;
      term.write(`\r\n[${event.bytes} bytes of output were lost while disconnected]\r\n`);
    }
  };
  socket.onclose = (ev) => {
    socket = null;
    if (session !== s) return;
    if (document.body.dataset.terminalState === 'ended') {
      $('restart').hidden = false;
      return;
    }
    if (ev.code === 1008) {
      // The agent refused what we sent: trying again would not help.
      status(`Disconnected: ${ev.reason}`, 'failed');
      $('restart').hidden = false;
      return;
    }
    reconnect(s, ev.reason);
  };
}

function reconnect(s, why) {
  const wait = s.retryMs;
  s.retryMs = Math.min(s.retryMs * 2, RETRY_MAX_MS);
  status(`Disconnected${why ? ` (${why})` : ''}; reconnecting in ${(wait / 1000).toFixed(1)} s…`, 'reconnecting');
  $('restart').hidden = false;
  retryTimer = setTimeout(async () => {
    if (session !== s) return;
    try {
      // Still there? A process the agent forgot cannot be reattached.
      await api('GET', `${sandboxPath}/processes/${s.pid}`);
    } catch (e) {
      if (e.status === 404) {
        status('The shell is gone', 'failed');
        return;
      }
      reconnect(s, e.message);
      return;
    }
    try {
      s.reconnects += 1;
      attach(s, await ioUrl(s.pid, s.offset));
    } catch (e) {
      reconnect(s, e.message);
    }
  }, wait);
}

// The socket, for the end-to-end test to drop it.
window.airlockTerminalSocket = () => socket;

$('restart').addEventListener('click', () => {
  session = null;
  if (socket) socket.close();
  term.reset();
  start();
});

start();
