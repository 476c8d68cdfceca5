// The web terminal: a shell on a PTY in the sandbox, over the process API
// (POST …/processes with a pty, then the …/processes/{pid}/io WebSocket),
// drawn by xterm.js (loaded by terminal.html as the global `Terminal`).
//
// Out of the socket: binary frames [1|2][bytes] go to the screen; a text
// frame {"type":"exit"} ends the session. Into it: keystrokes as binary
// frames, and {"type":"resize"} whenever the window changes size.

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

async function start() {
  $('restart').hidden = true;
  status('Starting a shell…', 'connecting');
  const { cols, rows } = grid();
  term.resize(cols, rows);
  try {
    const proc = await api('POST', `${sandboxPath}/processes`, {
      argv: ['bash', '-l'],
      pty: { cols, rows },
    });
    // Browsers cannot set headers on a WebSocket: a single-use ticket instead.
    const { ticket } = await api('POST', `${sandboxPath}/tickets`);
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/api/v1${sandboxPath}/processes/${proc.pid}/io?ticket=${encodeURIComponent(ticket)}`;
    attach(url, proc.pid);
  } catch (e) {
    status(`Could not start a shell: ${e.message}`, 'failed');
    $('restart').hidden = false;
  }
}

function attach(url, pid) {
  socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  socket.onopen = () => {
    status(`Connected (process ${pid})`, 'connected');
    term.focus();
  };
  socket.onmessage = (ev) => {
    if (typeof ev.data !== 'string') {
      term.write(new Uint8Array(ev.data).subarray(1));
      return;
    }
    const event = JSON.parse(ev.data);
    if (event.type === 'exit') {
      const how = event.exit_code !== null ? `exit code ${event.exit_code}` : `signal ${event.signal}`;
      status(`The shell ended (${how})`, 'ended');
    }
  };
  socket.onclose = (ev) => {
    if (document.body.dataset.terminalState !== 'ended') {
      status(`Disconnected${ev.reason ? `: ${ev.reason}` : ''}`, 'failed');
    }
    $('restart').hidden = false;
    socket = null;
  };
}

$('restart').addEventListener('click', () => {
  term.reset();
  start();
});

start();
