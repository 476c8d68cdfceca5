#!/usr/bin/env node
// A stand-in for the control plane, for working on web/ without the Rust
// server: it serves web/ with the same routes, keeps sandboxes in memory, and
// gives each "sandbox" a real local TigerVNC display (Xvnc) with openbox, an
// xterm on the left half and Chromium on the right half, relayed over the same
// WebSocket path with the same close codes.
//
// It is a development aid only. The end-to-end test proper runs desktop.mjs
// against the real `airlock up`; nothing here stands in for that in CI.
//
//   node tests/e2e/devserver.mjs [--port 4080] [--token T] [--no-display] [--no-resize]
//                                [--refuse-upgrades]
//
// It binds to 127.0.0.1 only. `exec` runs the command on this host (there is
// no guest), with the sandbox's display in its environment.

import { spawn, execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';

const here = path.dirname(fileURLToPath(import.meta.url));
const webRoot = path.resolve(here, '../../web');
const novncRoot = path.join(webRoot, 'node_modules/@novnc/novnc');

const args = parseArgs(process.argv.slice(2));
const port = Number(args.port ?? 4080);
const token = args.token || '';
const withDisplay = !args['no-display'];

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    const key = a.slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) out[key] = true;
    else out[key] = argv[++i];
  }
  return out;
}

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.json': 'application/json',
  '.png': 'image/png',
};

const sandboxes = new Map();
let nextDisplay = 60;

function now() {
  return new Date().toISOString();
}

function publicView(sb) {
  const { procs, display, rfbPort, ...rest } = sb;
  return rest;
}

function sendJson(res, status, body) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
  res.end(text);
}

function sendError(res, status, code, message) {
  sendJson(res, status, { error: { code, message } });
}

function authorized(req, url) {
  if (!token) return true;
  const h = req.headers.authorization || '';
  return h === `Bearer ${token}` || url.searchParams.get('token') === token;
}

async function readJson(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : {};
}

function serveFile(res, file) {
  fs.readFile(file, (err, data) => {
    if (err) {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] || 'application/octet-stream' });
    res.end(data);
  });
}

function safeJoin(root, rel) {
  const p = path.resolve(root, `.${path.posix.normalize(`/${rel}`)}`);
  return p.startsWith(root + path.sep) ? p : null;
}

// ---------- fake lifecycle with a real display ----------

function waitForPort(p, timeoutMs) {
  const until = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const s = net.connect(p, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve();
      });
      s.once('error', () => {
        s.destroy();
        if (Date.now() > until) reject(new Error(`display port ${p} did not open`));
        else setTimeout(attempt, 200);
      });
    };
    attempt();
  });
}

async function boot(sb) {
  sb.state = 'booting';
  sb.updated_at = now();
  if (!withDisplay) {
    setTimeout(() => markReady(sb), 1500);
    return;
  }
  const d = nextDisplay++;
  sb.display = `:${d}`;
  sb.rfbPort = 5900 + d;
  const env = { ...process.env, DISPLAY: sb.display };
  const spawnLogged = (cmd, argv) => {
    const p = spawn(cmd, argv, { env, stdio: 'ignore', detached: false });
    p.on('error', (e) => console.error(`devserver: ${cmd}: ${e.message}`));
    sb.procs.push(p);
    return p;
  };
  spawnLogged('Xvnc', [
    sb.display, '-geometry', '1280x800', '-depth', '24', '-SecurityTypes', 'None',
    '-rfbport', String(sb.rfbPort), '-localhost', '-AlwaysShared', '-desktop', `sandbox ${sb.id.slice(0, 8)}`,
    // --no-resize plays a server that refuses SetDesktopSize (the viewer must scale).
    ...(args['no-resize'] ? ['-AcceptSetDesktopSize=0'] : []),
  ]);
  try {
    await waitForPort(sb.rfbPort, 10000);
  } catch (e) {
    return fail(sb, e.message);
  }
  spawnLogged('xsetroot', ['-solid', '#3a4a5c']);
  // The image runs openbox; without a window manager X keeps the focus on
  // whichever window took it last, and clicks do not move it.
  if (fs.existsSync('/usr/bin/openbox')) spawnLogged('openbox', []);
  else console.error('devserver: openbox is not installed; clicking a window will not focus it');
  spawnLogged('xterm', ['-geometry', '80x45+0+0', '-fa', 'Monospace', '-fs', '11']);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'devserver-chromium-'));
  sb.profile = profile;
  spawnLogged('/usr/bin/chromium', [
    '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', `--user-data-dir=${profile}`,
    '--window-position=640,0', '--window-size=640,800',
    'data:text/html,<body style="margin:0;height:100vh;background:linear-gradient(135deg,%23f06,%23fc0,%230c6,%2306f)"><h1 style="font:48px sans-serif;color:white;padding:1em">airlock dev desktop</h1>',
  ]);
  setTimeout(() => markReady(sb), 2500);
}

function markReady(sb) {
  if (sb.state !== 'booting') return;
  sb.state = 'ready';
  sb.ready_at = now();
  sb.updated_at = sb.ready_at;
  sb.last_heartbeat_at = sb.ready_at;
}

function fail(sb, reason) {
  sb.state = 'failed';
  sb.failure_reason = reason;
  sb.updated_at = now();
  teardown(sb);
}

function teardown(sb) {
  for (const p of sb.procs) {
    if (p.exitCode === null) p.kill('SIGTERM');
  }
  const procs = sb.procs;
  sb.procs = [];
  const profile = sb.profile;
  sb.profile = '';
  if (!profile) return Promise.resolve();
  // Chromium writes to its profile until it has exited.
  return Promise.all(procs.map((p) => (p.exitCode === null && p.signalCode === null ? new Promise((r) => p.once('exit', r)) : null)))
    .then(() => fs.rmSync(profile, { recursive: true, force: true, maxRetries: 5 }))
    .catch((e) => console.error(`devserver: could not remove ${profile}: ${e.message}`));
}

function create(kind) {
  const t = now();
  const sb = {
    id: randomUUID(),
    kind,
    state: 'provisioning',
    owner: 'local',
    created_at: t,
    updated_at: t,
    ready_at: null,
    last_heartbeat_at: null,
    failure_reason: null,
    viewer_url: '',
    procs: [],
  };
  sb.viewer_url = `/view/${sb.id}`;
  sandboxes.set(sb.id, sb);
  setTimeout(() => boot(sb), 1000);
  return sb;
}

function destroy(sb) {
  sb.state = 'stopping';
  sb.updated_at = now();
  for (const ws of sb.viewers || []) ws.close(4410, 'sandbox stopping');
  setTimeout(() => {
    teardown(sb);
    sb.state = 'stopped';
    sb.updated_at = now();
    // Stopped sandboxes leave the list a little later, as a real one may.
    setTimeout(() => sandboxes.delete(sb.id), 5000);
  }, 1000);
}

// ---------- HTTP ----------

async function handleApi(req, res, url) {
  if (!authorized(req, url)) return sendError(res, 401, 'unauthorized', 'A valid API token is needed.');
  const parts = url.pathname.replace(/^\/api\/v1\//, '').split('/').filter(Boolean);
  if (parts[0] !== 'sandboxes') return sendError(res, 404, 'not_found', `No route for ${url.pathname}.`);

  if (parts.length === 1) {
    if (req.method === 'GET') return sendJson(res, 200, { sandboxes: [...sandboxes.values()].map(publicView) });
    if (req.method === 'POST') {
      let body;
      try {
        body = await readJson(req);
      } catch {
        return sendError(res, 400, 'bad_request', 'The body is not JSON.');
      }
      if (body.kind !== 'browser' && body.kind !== 'workspace') {
        return sendError(res, 400, 'bad_request', 'kind must be "browser" or "workspace".');
      }
      return sendJson(res, 201, publicView(create(body.kind)));
    }
    return sendError(res, 405, 'method_not_allowed', 'Use GET or POST.');
  }

  const sb = sandboxes.get(parts[1]);
  if (!sb) return sendError(res, 404, 'not_found', `No sandbox ${parts[1]}.`);
  if (parts.length === 2) {
    if (req.method === 'GET') return sendJson(res, 200, publicView(sb));
    if (req.method === 'DELETE') {
      if (sb.state !== 'stopping' && sb.state !== 'stopped') destroy(sb);
      return sendJson(res, 202, publicView(sb));
    }
  }
  if (parts.length === 3 && parts[2] === 'exec' && req.method === 'POST') {
    if (sb.state !== 'ready') return sendError(res, 409, 'not_ready', `The sandbox is ${sb.state}.`);
    const body = await readJson(req);
    const argv = body.argv;
    if (!Array.isArray(argv) || argv.length === 0) return sendError(res, 400, 'bad_request', 'argv must be a non-empty array.');
    const timeout = Math.max(1, Math.min(60, Number(body.timeout_s) || 10)) * 1000;
    execFile(argv[0], argv.slice(1), { timeout, env: { ...process.env, DISPLAY: sb.display || '' } }, (err, stdout, stderr) => {
      sendJson(res, 200, {
        exit_code: err ? (typeof err.code === 'number' ? err.code : -1) : 0,
        stdout,
        stderr,
        timed_out: Boolean(err && err.killed),
        truncated: false,
      });
    });
    return;
  }
  return sendError(res, 404, 'not_found', `No route for ${req.method} ${url.pathname}.`);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname.startsWith('/api/v1/')) {
    handleApi(req, res, url).catch((e) => sendError(res, 500, 'internal', e.message));
    return;
  }
  if (url.pathname === '/') return serveFile(res, path.join(webRoot, 'index.html'));
  if (/^\/view\/[^/]+$/.test(url.pathname)) return serveFile(res, path.join(webRoot, 'viewer.html'));
  if (url.pathname.startsWith('/novnc/')) {
    const f = safeJoin(novncRoot, url.pathname.slice('/novnc/'.length));
    return f ? serveFile(res, f) : sendError(res, 404, 'not_found', 'Not found.');
  }
  const f = safeJoin(webRoot, url.pathname);
  if (!f || f.includes(`${path.sep}node_modules${path.sep}`)) return sendError(res, 404, 'not_found', 'Not found.');
  return serveFile(res, f);
});

// ---------- the VNC relay ----------

const wss = new WebSocketServer({
  noServer: true,
  handleProtocols: (protocols) => (protocols.has('binary') ? 'binary' : false),
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  const m = /^\/api\/v1\/sandboxes\/([^/]+)\/vnc$/.exec(url.pathname);
  if (!m) {
    socket.destroy();
    return;
  }
  // --refuse-upgrades plays a server that answers an unknown sandbox or a bad
  // token with an HTTP status instead of a close code: the page then sees only
  // 1006 and must ask the API why.
  if (args['refuse-upgrades']) {
    const status = !authorized(req, url) ? '401 Unauthorized' : !sandboxes.has(decodeURIComponent(m[1])) ? '404 Not Found' : '';
    if (status) {
      socket.end(`HTTP/1.1 ${status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      return;
    }
  }
  // Accept first, then close with a code: a refused handshake reaches the
  // page only as 1006, which says nothing.
  wss.handleUpgrade(req, socket, head, (ws) => relay(ws, req, url, decodeURIComponent(m[1])));
});

function relay(ws, req, url, id) {
  if (!authorized(req, url)) return ws.close(4401, 'unauthorized');
  const sb = sandboxes.get(id);
  if (!sb) return ws.close(4404, 'no such sandbox');
  if (sb.state === 'stopping' || sb.state === 'stopped' || sb.state === 'failed') return ws.close(4410, `sandbox ${sb.state}`);
  if (sb.state !== 'ready') return ws.close(4409, `sandbox ${sb.state}`);
  if (!sb.rfbPort) return ws.close(4502, 'no display in --no-display mode');
  const tcp = net.connect(sb.rfbPort, '127.0.0.1');
  sb.viewers = sb.viewers || new Set();
  sb.viewers.add(ws);
  const pending = [];
  let open = false;
  tcp.on('connect', () => {
    open = true;
    for (const b of pending) tcp.write(b);
  });
  tcp.on('data', (d) => ws.send(d));
  tcp.on('error', () => ws.close(4502, 'display unreachable'));
  tcp.on('close', () => ws.readyState === ws.OPEN && ws.close(4502, 'display closed'));
  ws.on('message', (d) => (open ? tcp.write(d) : pending.push(d)));
  ws.on('close', () => {
    sb.viewers.delete(ws);
    tcp.destroy();
  });
}

server.listen(port, '127.0.0.1', () => {
  const { port: bound } = server.address();
  console.log(`devserver listening on http://127.0.0.1:${bound}${token ? ' (token required)' : ''}`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    const done = [...sandboxes.values()].map(teardown);
    const timeout = new Promise((r) => setTimeout(r, 5000));
    Promise.race([Promise.all(done), timeout]).then(() => process.exit(0));
  });
}
