#!/usr/bin/env node
// End-to-end test of airlock's web UI in a real headless Chromium.
//
//   node tests/e2e/desktop.mjs --url http://127.0.0.1:PORT [--token T] --artifacts DIR
//
// Drives the UI as a person would: creates a browser sandbox with the button,
// waits for it to be ready, opens its desktop in the page's viewer, checks the
// canvas shows a real desktop, types a command into the terminal through the
// viewer, confirms its effect through the exec API, then deletes the sandbox
// with the UI's delete button. Screenshots of each step go to --artifacts.
// Exit status 0 on success, 1 on a failed check, 2 on bad usage.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: node tests/e2e/desktop.mjs --url http://127.0.0.1:PORT [--token T] --artifacts DIR';

const READY_TIMEOUT_MS = 120_000;
const CONNECT_TIMEOUT_MS = 60_000;
const DESKTOP_TIMEOUT_MS = 60_000;
const EXEC_TIMEOUT_MS = 15_000;
const DELETE_TIMEOUT_MS = 60_000;
const VIEWER_GIVE_UP_MS = 20_000;
const WATCHDOG_MS = 420_000;

// A blank or failed display is one colour; a desktop has many. The sandbox's
// desktop right after boot is mostly white (a white terminal beside
// Chromium's new-tab page, about 90 % of the pixels), so the share allowed to
// one colour leaves room above that.
const MIN_DISTINCT_COLOURS = 64;
const MAX_DOMINANT_SHARE = 0.95;

class CheckFailed extends Error {}

function parseArgs(argv) {
  const opts = { url: '', token: '', artifacts: '' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) usage(`${a} needs a value`);
      return v;
    };
    if (a === '--url') opts.url = value();
    else if (a === '--token') opts.token = value();
    else if (a === '--artifacts') opts.artifacts = value();
    else if (a === '--help' || a === '-h') {
      console.log(USAGE);
      process.exit(0);
    } else usage(`unknown argument ${a}`);
  }
  if (!opts.url) usage('--url is required');
  if (!opts.artifacts) usage('--artifacts is required');
  try {
    opts.url = new URL(opts.url).origin;
  } catch {
    usage(`--url ${opts.url} is not a URL`);
  }
  return opts;
}

function usage(message) {
  console.error(`e2e: ${message}\n${USAGE}`);
  process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));
const started = Date.now();

function log(message) {
  const t = ((Date.now() - started) / 1000).toFixed(1).padStart(6);
  console.log(`e2e [${t}s] ${message}`);
}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls `probe` until it returns a truthy value or the time is up.
async function waitFor(what, timeoutMs, probe, intervalMs = 500) {
  const until = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > until) throw new CheckFailed(`timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what}`);
    await sleep(intervalMs);
  }
}

fs.mkdirSync(opts.artifacts, { recursive: true });
const consoleLog = fs.createWriteStream(path.join(opts.artifacts, 'console.log'));
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-e2e-chromium-'));

let context;
let page;
let sandboxId = '';
let shotNo = 0;
const pageErrors = [];
const failedRequests = [];

async function screenshot(name) {
  if (!page) return;
  shotNo += 1;
  const file = path.join(opts.artifacts, `${String(shotNo).padStart(2, '0')}-${name}.png`);
  try {
    await page.screenshot({ path: file });
    log(`saved ${path.basename(file)}`);
  } catch (e) {
    log(`could not save ${path.basename(file)}: ${e.message}`);
  }
}

function viewerFrame() {
  return page.frames().find((f) => /\/view\//.test(f.url()));
}

async function saveCanvas(name) {
  const frame = viewerFrame();
  if (!frame) return;
  try {
    const dataUrl = await frame.evaluate(() => {
      const c = document.querySelector('#screen canvas');
      return c && c.width > 0 ? c.toDataURL('image/png') : '';
    });
    if (!dataUrl) return;
    shotNo += 1;
    const file = path.join(opts.artifacts, `${String(shotNo).padStart(2, '0')}-${name}.png`);
    fs.writeFileSync(file, Buffer.from(dataUrl.split(',')[1], 'base64'));
    log(`saved ${path.basename(file)} (the remote desktop as the viewer drew it)`);
  } catch (e) {
    log(`could not save the canvas: ${e.message}`);
  }
}

function apiHeaders() {
  const h = { 'Content-Type': 'application/json' };
  if (opts.token) h.Authorization = `Bearer ${opts.token}`;
  return h;
}

async function apiCall(method, apiPath, body) {
  const res = await context.request.fetch(`${opts.url}/api/v1${apiPath}`, {
    method,
    headers: apiHeaders(),
    data: body === undefined ? undefined : JSON.stringify(body),
    failOnStatusCode: false,
    timeout: 30_000,
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  return { status: res.status(), json, text };
}

function rowLocator(id) {
  return page.locator(`#sandbox-rows tr[data-id="${id}"]`);
}

async function rowState(id) {
  const row = rowLocator(id);
  if ((await row.count()) === 0) return null;
  return row.getAttribute('data-state');
}

// ---------- the steps ----------

async function openUi() {
  log(`launching ${process.env.CHROMIUM || '/usr/bin/chromium'} (headless)`);
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1400, height: 1000 },
  });
  if (opts.token) {
    await context.addInitScript((token) => {
      try {
        localStorage.setItem('airlock.token', token);
      } catch {
        // Not every frame has storage (about:blank); the UI's frames do.
      }
    }, opts.token);
  }
  // This test drives the noVNC canvas; the WebRTC path has its own test
  // (tests/e2e/webrtc.mjs).
  await context.addInitScript(() => {
    try {
      localStorage.setItem('airlock.viewer-path', 'vnc');
    } catch {
      // Frames without storage (about:blank) show no viewer.
    }
  });
  context.on('requestfailed', (r) => {
    const line = `${r.method()} ${r.url()}: ${(r.failure() && r.failure().errorText) || 'failed'}`;
    failedRequests.push(line);
    consoleLog.write(`[requestfailed] ${line}\n`);
  });
  page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => consoleLog.write(`[${m.type()}] ${m.text()}\n`));
  page.on('pageerror', (e) => {
    pageErrors.push(e.message);
    consoleLog.write(`[pageerror] ${e.message}\n`);
  });

  log(`opening ${opts.url}/`);
  const res = await page.goto(`${opts.url}/`, { waitUntil: 'load' });
  check(res && res.ok(), `GET / answered ${res ? res.status() : 'nothing'}`);
  await page.locator('#new-browser').waitFor({ state: 'visible', timeout: 15_000 });
  await waitFor('the sandbox list to load', 15_000, async () => {
    const tokenFormShown = await page.locator('#token-form').isVisible();
    if (tokenFormShown) {
      throw new CheckFailed(`the UI asks for an API token: ${await page.locator('#error').innerText()} (pass --token)`);
    }
    return page.evaluate(() => {
      const empty = document.querySelector('#sandbox-rows tr.empty');
      return !empty || !empty.textContent.startsWith('Loading');
    });
  });
  await screenshot('list');
}

async function createSandbox() {
  log('clicking "New browser sandbox"');
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === '/api/v1/sandboxes', {
      timeout: 30_000,
    }),
    page.getByRole('button', { name: 'New browser sandbox' }).click(),
  ]);
  const body = await response.json().catch(() => null);
  if (response.status() !== 201) {
    await sleep(300);
    const shown = await page.locator('#error').innerText().catch(() => '');
    throw new CheckFailed(`POST /api/v1/sandboxes answered ${response.status()}: ${JSON.stringify(body)}; the page says: ${shown || '(nothing)'}`);
  }
  check(body && typeof body.id === 'string', `POST /api/v1/sandboxes answered without an id: ${JSON.stringify(body)}`);
  check(body.kind === 'browser', `new sandbox has kind ${body.kind}, expected browser`);
  check(body.viewer_url === `/view/${body.id}`, `viewer_url is ${body.viewer_url}, expected /view/${body.id}`);
  sandboxId = body.id;
  log(`created sandbox ${sandboxId} (state ${body.state})`);
  await rowLocator(sandboxId).waitFor({ state: 'attached', timeout: 10_000 });
  await screenshot('created');
}

async function waitReady() {
  log(`waiting up to ${READY_TIMEOUT_MS / 1000} s for sandbox ${sandboxId} to be ready`);
  let last = '';
  await waitFor('the sandbox to be ready', READY_TIMEOUT_MS, async () => {
    const state = await rowState(sandboxId);
    if (state !== last) {
      log(`row state: ${state ?? '(row gone)'}`);
      last = state;
      if (state === 'booting') await screenshot('booting');
    }
    if (state === null) throw new CheckFailed('the sandbox row left the list before it was ready');
    if (state === 'failed' || state === 'stopped' || state === 'stopping') {
      const reason = await rowLocator(sandboxId).locator('td.details').innerText();
      throw new CheckFailed(`the sandbox became ${state} instead of ready: ${reason}`);
    }
    return state === 'ready';
  });
  await screenshot('ready');
}

// While the test looks at the viewer, the sandbox must stay ready; if it does
// not, say so with the reason the list shows instead of timing out later.
async function requireRowReady() {
  const state = await rowState(sandboxId);
  if (state === 'ready') return;
  const reason = state === null ? '' : await rowLocator(sandboxId).locator('td.details').innerText().catch(() => '');
  throw new CheckFailed(`the sandbox left ready: it is ${state ?? 'gone from the list'}${reason ? ` (${reason})` : ''}`);
}

async function openViewer() {
  log('clicking "Open viewer" on the row');
  await rowLocator(sandboxId).getByRole('button', { name: /Open viewer/ }).click();
  const iframe = page.locator('#viewer-body iframe');
  await iframe.waitFor({ state: 'attached', timeout: 10_000 });
  check((await iframe.getAttribute('src')) === `/view/${sandboxId}`, 'the viewer iframe does not show /view/{id}');
  await waitFor('the viewer frame', 10_000, async () => Boolean(viewerFrame()));

  log(`waiting up to ${CONNECT_TIMEOUT_MS / 1000} s for the viewer to connect`);
  let last = '';
  await waitFor('the viewer to connect', CONNECT_TIMEOUT_MS, async () => {
    await requireRowReady();
    const frame = viewerFrame();
    if (!frame) return false;
    const s = await frame
      .evaluate(() => ({ state: document.body.dataset.viewerState, status: window.airlockViewer && window.airlockViewer.status }))
      .catch(() => null);
    if (!s) return false;
    if (s.status !== last) {
      log(`viewer: ${s.status}`);
      last = s.status;
    }
    if (s.state === 'disconnected') throw new CheckFailed(`the viewer gave up: ${s.status}`);
    return s.state === 'connected';
  });
  await screenshot('viewer-connected');
}

async function checkDesktop() {
  log(`waiting up to ${DESKTOP_TIMEOUT_MS / 1000} s for the canvas to show a desktop`);
  let last = null;
  try {
    await waitFor('a desktop on the canvas', DESKTOP_TIMEOUT_MS, async () => {
      await requireRowReady();
      const frame = viewerFrame();
      last = await frame.evaluate(() => {
        const c = document.querySelector('#screen canvas');
        if (!c || c.width === 0 || c.height === 0) return { width: 0, height: 0, distinct: 0, dominant: 1 };
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const counts = new Map();
        for (let i = 0; i < data.length; i += 4) {
          const rgb = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
          counts.set(rgb, (counts.get(rgb) || 0) + 1);
        }
        let top = 0;
        for (const n of counts.values()) top = Math.max(top, n);
        return { width: c.width, height: c.height, distinct: counts.size, dominant: top / (data.length / 4) };
      });
      return last.distinct >= MIN_DISTINCT_COLOURS && last.dominant <= MAX_DOMINANT_SHARE;
    }, 1000);
  } finally {
    if (last) {
      log(`canvas ${last.width}x${last.height}: ${last.distinct} distinct colours, most common covers ${(last.dominant * 100).toFixed(1)}%`);
    }
    await saveCanvas('canvas-desktop');
  }
  const scaled = await viewerFrame().evaluate(() => window.airlockViewer.scaled);
  log(scaled ? 'the server did not follow the window size; the viewer scales' : 'the remote display follows the window size');
}

async function typeIntoTerminal() {
  const mark = `e2e-${randomBytes(6).toString('hex')}`;
  const frame = viewerFrame();
  const canvas = frame.locator('#screen canvas');
  const box = await canvas.boundingBox();
  check(box && box.width > 0 && box.height > 0, 'the viewer canvas has no size');

  const attempts = 2;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    // The terminal fills the left half of the desktop.
    log(`clicking into the terminal (left half of the desktop), attempt ${attempt}`);
    await canvas.click({ position: { x: Math.round(box.width * 0.25), y: Math.round(box.height * 0.5) } });
    await sleep(500);
    const focused = await frame.evaluate(() => document.activeElement && document.activeElement.tagName);
    check(focused === 'CANVAS', `clicking the canvas did not focus it (focus is on ${focused})`);

    log(`typing: echo ${mark} > /tmp/e2e-mark`);
    await page.keyboard.type(`echo ${mark} > /tmp/e2e-mark`, { delay: 25 });
    await page.keyboard.press('Enter');
    await sleep(500);
    await screenshot('typed');
    await saveCanvas('canvas-typed');

    log('reading /tmp/e2e-mark back through POST /exec');
    let last = '';
    try {
      await waitFor('the typed command to take effect', EXEC_TIMEOUT_MS, async () => {
        await requireRowReady();
        const r = await apiCall('POST', `/sandboxes/${sandboxId}/exec`, { argv: ['cat', '/tmp/e2e-mark'], timeout_s: 10 });
        last = `${r.status} ${r.text.slice(0, 300)}`;
        if (r.status !== 200) return false;
        return r.json && typeof r.json.stdout === 'string' && r.json.stdout.trim() === mark;
      }, 1000);
      log(`exec saw ${mark}: the keystrokes reached the terminal`);
      return;
    } catch (e) {
      if (!(e instanceof CheckFailed) || attempt === attempts) {
        throw new CheckFailed(`${e.message}; last exec answer: ${last}`);
      }
      log(`not there yet (last exec answer: ${last}); trying once more`);
    }
  }
}

async function deleteThroughUi() {
  log('clicking "Delete" on the row');
  const id = sandboxId;
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'DELETE' && new URL(r.url()).pathname === `/api/v1/sandboxes/${id}`, {
      timeout: 30_000,
    }),
    rowLocator(id).getByRole('button', { name: /Delete/ }).click(),
  ]);
  check(response.status() === 202, `DELETE answered ${response.status()}: ${await response.text().catch(() => '')}`);
  await screenshot('deleting');
  let last = '';
  await waitFor('the sandbox to stop or leave the list', DELETE_TIMEOUT_MS, async () => {
    const state = await rowState(id);
    if (state !== last) {
      log(`row state: ${state ?? '(row gone)'}`);
      last = state;
    }
    return state === null || state === 'stopped';
  });
  sandboxId = '';
  await screenshot('deleted');
  return id;
}

// Opens the full-window viewer of `id` in a page of its own and requires it
// to stop trying (not to reconnect forever) with words that say why.
async function expectViewerGivesUp(id, what, pattern) {
  log(`opening /view/${id} (${what}); it must give up with a reason`);
  const viewer = await context.newPage();
  viewer.on('console', (m) => consoleLog.write(`[${m.type()} /view/${id}] ${m.text()}\n`));
  viewer.on('pageerror', (e) => {
    pageErrors.push(e.message);
    consoleLog.write(`[pageerror /view/${id}] ${e.message}\n`);
  });
  try {
    await viewer.goto(`${opts.url}/view/${encodeURIComponent(id)}`, { waitUntil: 'load' });
    let status = '';
    await waitFor(`the viewer of ${what} to give up`, VIEWER_GIVE_UP_MS, async () => {
      const s = await viewer
        .evaluate(() => ({ state: document.body.dataset.viewerState, status: window.airlockViewer && window.airlockViewer.status }))
        .catch(() => null);
      status = (s && s.status) || '';
      return s && s.state === 'disconnected';
    });
    log(`viewer: ${status}`);
    check(pattern.test(status), `the viewer of ${what} gave up, but its words do not say why: "${status}"`);
    shotNo += 1;
    await viewer.screenshot({ path: path.join(opts.artifacts, `${String(shotNo).padStart(2, '0')}-viewer-${what.replace(/\W+/g, '-')}.png`) });
  } finally {
    await viewer.close();
  }
}

async function cleanUp() {
  if (!sandboxId || !context) return;
  log(`cleaning up: deleting sandbox ${sandboxId} through the API`);
  try {
    const r = await apiCall('DELETE', `/sandboxes/${sandboxId}`);
    log(`DELETE answered ${r.status}`);
  } catch (e) {
    log(`could not delete sandbox ${sandboxId}: ${e.message}`);
  }
}

async function main() {
  const watchdog = setTimeout(() => {
    console.error(`e2e: FAILED: the whole run took longer than ${WATCHDOG_MS / 1000} s`);
    process.exit(1);
  }, WATCHDOG_MS);
  let code = 0;
  try {
    await openUi();
    await expectViewerGivesUp(`e2e-missing-${randomBytes(4).toString('hex')}`, 'a sandbox that does not exist', /no such sandbox/i);
    await createSandbox();
    await waitReady();
    await openViewer();
    await checkDesktop();
    await typeIntoTerminal();
    const deleted = await deleteThroughUi();
    await expectViewerGivesUp(deleted, 'the deleted sandbox', /gone|stopp|no such sandbox/i);
    check(pageErrors.length === 0, `uncaught errors in the page: ${pageErrors.join(' | ')}`);
    log(`PASSED; artifacts in ${opts.artifacts}`);
  } catch (e) {
    code = 1;
    console.error(`e2e: FAILED: ${e instanceof CheckFailed ? e.message : e.stack || e}`);
    if (failedRequests.length > 0) {
      console.error(`e2e: requests that failed at the network level:\n  ${failedRequests.slice(-10).join('\n  ')}`);
    }
    await screenshot('failure');
    await saveCanvas('canvas-failure');
    await cleanUp();
  } finally {
    clearTimeout(watchdog);
    if (context) await context.close().catch(() => {});
    consoleLog.end();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  process.exit(code);
}

main();
