#!/usr/bin/env node
// End-to-end test of "Connect a CLI" in a real headless Chromium.
//
//   node tests/e2e/login.mjs --url http://127.0.0.1:PORT --provider NAME [--token T] --artifacts DIR
//
// Clicks the provider's Connect button, waits for the login's browser sandbox
// to show the provider's sign-in page in the embedded viewer, clicks the
// sign-in button on that page THROUGH the viewer (a mouse click on the noVNC
// canvas, where Chromium's page is), then requires the login to reach
// `completed`, the credential file in the workspace sandbox (read through the
// exec API), and the browser sandbox gone. Meant for the test-only provider,
// whose sign-in page is one big green button filling Chromium's page.
// Screenshots go to --artifacts as login-NN-step.png.
// Exit status 0 on success, 1 on a failed check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE =
  'usage: node tests/e2e/login.mjs --url http://127.0.0.1:PORT --provider NAME [--token T] [--credential-path P] --artifacts DIR';

const AWAITING_USER_TIMEOUT_MS = 180_000;
const CONNECT_TIMEOUT_MS = 60_000;
const PAGE_TIMEOUT_MS = 90_000;
const COMPLETE_TIMEOUT_MS = 180_000;
const GONE_TIMEOUT_MS = 60_000;
const WATCHDOG_MS = 540_000;

// The test provider's sign-in button (#1a7f37), allowing for lossy encodings.
const BUTTON_RGB = [0x1a, 0x7f, 0x37];
const COLOUR_SLACK = 24;

class CheckFailed extends Error {}

function parseArgs(argv) {
  const opts = { url: '', token: '', artifacts: '', provider: '', credentialPath: '.testcli/credentials.json' };
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
    else if (a === '--provider') opts.provider = value();
    else if (a === '--credential-path') opts.credentialPath = value();
    else if (a === '--help' || a === '-h') {
      console.log(USAGE);
      process.exit(0);
    } else usage(`unknown argument ${a}`);
  }
  if (!opts.url) usage('--url is required');
  if (!opts.artifacts) usage('--artifacts is required');
  if (!opts.provider) usage('--provider is required');
  try {
    opts.url = new URL(opts.url).origin;
  } catch {
    usage(`--url ${opts.url} is not a URL`);
  }
  return opts;
}

function usage(message) {
  console.error(`login-e2e: ${message}\n${USAGE}`);
  process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));
const started = Date.now();

function log(message) {
  const t = ((Date.now() - started) / 1000).toFixed(1).padStart(6);
  console.log(`login-e2e [${t}s] ${message}`);
}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, timeoutMs, probe, intervalMs = 500) {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const last = await probe();
    if (last) return last;
    if (Date.now() > until) throw new CheckFailed(`timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what}`);
    await sleep(intervalMs);
  }
}

fs.mkdirSync(opts.artifacts, { recursive: true });
const consoleLog = fs.createWriteStream(path.join(opts.artifacts, 'login-console.log'));
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-login-e2e-chromium-'));

let context;
let page;
let loginId = '';
let browserSandbox = '';
let shotNo = 0;
const pageErrors = [];

async function screenshot(name) {
  if (!page) return;
  shotNo += 1;
  const file = path.join(opts.artifacts, `login-${String(shotNo).padStart(2, '0')}-${name}.png`);
  try {
    await page.screenshot({ path: file, fullPage: true });
    log(`saved ${path.basename(file)}`);
  } catch (e) {
    log(`could not save ${path.basename(file)}: ${e.message}`);
  }
}

// The frame of the viewer embedded in the login panel.
async function loginFrame() {
  const handle = await page.$('#login-viewer iframe');
  return handle ? handle.contentFrame() : null;
}

async function saveCanvas(name) {
  const frame = await loginFrame();
  if (!frame) return;
  try {
    const dataUrl = await frame.evaluate(() => {
      const c = document.querySelector('#screen canvas');
      return c && c.width > 0 ? c.toDataURL('image/png') : '';
    });
    if (!dataUrl) return;
    shotNo += 1;
    const file = path.join(opts.artifacts, `login-${String(shotNo).padStart(2, '0')}-${name}.png`);
    fs.writeFileSync(file, Buffer.from(dataUrl.split(',')[1], 'base64'));
    log(`saved ${path.basename(file)} (the remote desktop as the viewer drew it)`);
  } catch (e) {
    log(`could not save the canvas: ${e.message}`);
  }
}

async function apiCall(method, apiPath, body) {
  const headers = { 'Content-Type': 'application/json' };
  if (opts.token) headers.Authorization = `Bearer ${opts.token}`;
  const res = await context.request.fetch(`${opts.url}/api/v1${apiPath}`, {
    method,
    headers,
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

async function uiLoginState() {
  return page.evaluate(() => {
    const box = document.getElementById('login');
    return {
      state: (box && !box.hidden && box.dataset.state) || '',
      words: (document.getElementById('login-words') || {}).textContent || '',
    };
  });
}

// Waits for the login panel to show one of `want`; an end other than those
// fails at once with the words the panel shows.
async function waitLoginState(want, timeoutMs) {
  let last = '';
  return waitFor(`the login to be ${want.join(' or ')}`, timeoutMs, async () => {
    const s = await uiLoginState();
    if (s.state !== last) {
      log(`login panel: ${s.state || '(hidden)'}: ${s.words}`);
      last = s.state;
      await screenshot(`state-${s.state || 'none'}`);
    }
    if (want.includes(s.state)) return s;
    if (['completed', 'failed', 'expired', 'cancelled'].includes(s.state)) {
      throw new CheckFailed(`the login ended ${s.state}: ${s.words}`);
    }
    return false;
  });
}

// ---------- the steps ----------

async function openUi() {
  const exe = process.env.CHROMIUM || '/usr/bin/chromium';
  log(`launching ${exe} (headless)`);
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: exe,
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
        // Frames without storage (about:blank) do not need it.
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
  page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => consoleLog.write(`[${m.type()}] ${m.text()}\n`));
  page.on('pageerror', (e) => {
    pageErrors.push(e.message);
    consoleLog.write(`[pageerror] ${e.message}\n`);
  });

  log(`opening ${opts.url}/`);
  const res = await page.goto(`${opts.url}/`, { waitUntil: 'load' });
  check(res && res.ok(), `GET / answered ${res ? res.status() : 'nothing'}`);
  const button = page.locator(`#connect-buttons button[data-provider="${opts.provider}"]`);
  await button.waitFor({ state: 'visible', timeout: 15_000 }).catch(async () => {
    const shown = await page.locator('#connect-buttons').innerText().catch(() => '');
    throw new CheckFailed(`no Connect button for ${opts.provider}; the panel shows: ${shown}`);
  });
  await screenshot('page');
}

async function connect() {
  const button = page.locator(`#connect-buttons button[data-provider="${opts.provider}"]`);
  log(`clicking "${await button.innerText()}"`);
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === '/api/v1/logins', {
      timeout: 30_000,
    }),
    button.click(),
  ]);
  const body = await response.json().catch(() => null);
  check(response.status() === 201, `POST /api/v1/logins answered ${response.status()}: ${JSON.stringify(body)}`);
  check(body && typeof body.id === 'string', `the login has no id: ${JSON.stringify(body)}`);
  check(typeof body.browser_sandbox_id === 'string', `the login names no browser sandbox: ${JSON.stringify(body)}`);
  loginId = body.id;
  browserSandbox = body.browser_sandbox_id;
  log(`login ${loginId} (${body.state}), browser sandbox ${browserSandbox}`);
  await waitLoginState(['awaiting_user'], AWAITING_USER_TIMEOUT_MS);
}

async function waitViewer() {
  log(`waiting up to ${CONNECT_TIMEOUT_MS / 1000} s for the login's viewer to connect`);
  const iframe = page.locator('#login-viewer iframe');
  await iframe.waitFor({ state: 'attached', timeout: 10_000 });
  const src = await iframe.getAttribute('src');
  check(src === `/view/${browserSandbox}`, `the login viewer shows ${src}, expected /view/${browserSandbox}`);
  let last = '';
  await waitFor('the login viewer to connect', CONNECT_TIMEOUT_MS, async () => {
    const frame = await loginFrame();
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

// The colour of the canvas around (x, y), in canvas pixels: the average of a
// small square, so one stray pixel does not decide.
async function colourAt(frame, fx, fy) {
  return frame.evaluate(
    ({ fx, fy }) => {
      const c = document.querySelector('#screen canvas');
      if (!c || c.width === 0) return null;
      const x = Math.round(c.width * fx);
      const y = Math.round(c.height * fy);
      const d = c.getContext('2d').getImageData(x - 4, y - 4, 9, 9).data;
      const sum = [0, 0, 0];
      for (let i = 0; i < d.length; i += 4) for (let k = 0; k < 3; k++) sum[k] += d[i + k];
      const n = d.length / 4;
      return { rgb: sum.map((v) => Math.round(v / n)), width: c.width, height: c.height };
    },
    { fx, fy },
  );
}

const isButton = (rgb) => rgb && rgb.every((v, k) => Math.abs(v - BUTTON_RGB[k]) <= COLOUR_SLACK);

// Chromium fills the right half of the desktop; the middle of that half.
const CLICK_AT = { fx: 0.75, fy: 0.5 };

async function waitSignInPage() {
  log(`waiting up to ${PAGE_TIMEOUT_MS / 1000} s for the sign-in page in the sandbox's Chromium (its green button under the click point)`);
  let last = null;
  try {
    await waitFor('the sign-in button on the remote desktop', PAGE_TIMEOUT_MS, async () => {
      const frame = await loginFrame();
      if (!frame) return false;
      last = await colourAt(frame, CLICK_AT.fx, CLICK_AT.fy).catch(() => null);
      return last && isButton(last.rgb);
    }, 1000);
  } finally {
    if (last) log(`canvas ${last.width}x${last.height}, colour at the click point: rgb(${last.rgb.join(', ')})`);
    await saveCanvas('canvas-sign-in-page');
  }
  await screenshot('sign-in-page');
}

async function clickSignIn() {
  const frame = await loginFrame();
  const canvas = frame.locator('#screen canvas');
  const box = await canvas.boundingBox();
  check(box && box.width > 0 && box.height > 0, 'the viewer canvas has no size');
  const attempts = 3;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    const x = Math.round(box.width * CLICK_AT.fx);
    const y = Math.round(box.height * CLICK_AT.fy);
    log(`clicking "Sign in" through the viewer at (${x}, ${y}) of the canvas, attempt ${attempt}`);
    await canvas.click({ position: { x, y } });
    await sleep(1500);
    await saveCanvas(`canvas-after-click-${attempt}`);
    // Once the click took, the login leaves awaiting_user soon after.
    const moved = await waitFor('the login to move on from awaiting_user', 20_000, async () => {
      const s = await uiLoginState();
      return s.state !== 'awaiting_user' ? s : false;
    }).catch((e) => {
      if (e instanceof CheckFailed) return null;
      throw e;
    });
    if (moved) {
      log(`after the click the login is ${moved.state}`);
      return;
    }
    const c = await colourAt(frame, CLICK_AT.fx, CLICK_AT.fy).catch(() => null);
    log(`still awaiting_user; colour at the click point: ${c ? `rgb(${c.rgb.join(', ')})` : 'unknown'}`);
  }
  throw new CheckFailed(`the click through the viewer did not sign in after ${attempts} attempts`);
}

async function waitCompleted() {
  await waitLoginState(['completed'], COMPLETE_TIMEOUT_MS);
  const r = await apiCall('GET', `/logins/${loginId}`);
  check(r.status === 200 && r.json, `GET /logins/${loginId} answered ${r.status}: ${r.text.slice(0, 300)}`);
  check(r.json.state === 'completed', `the API says the login is ${r.json.state}`);
  check(r.json.error === null || r.json.error === undefined, `a completed login carries an error: ${r.json.error}`);
  const iframes = await page.locator('#login-viewer iframe').count();
  check(iframes === 0, 'the login viewer is still embedded after the login completed');
  return r.json;
}

async function checkWorkspace(l) {
  const ws = l.workspace_sandbox_id;
  check(typeof ws === 'string' && ws, `the completed login names no workspace: ${JSON.stringify(l)}`);
  const p = opts.credentialPath;
  log(`reading ${p} in workspace ${ws} through POST /exec`);
  const script = `stat -c '%a %U' '${p}' && node -e 'const j=JSON.parse(require("fs").readFileSync(process.argv[1],"utf8"));process.stdout.write(typeof j.access_token==="string"&&j.access_token.length>0?"has-access-token":"no-access-token")' '${p}'`;
  const r = await apiCall('POST', `/sandboxes/${ws}/exec`, { argv: ['sh', '-c', script], timeout_s: 20 });
  check(r.status === 200 && r.json, `exec in the workspace answered ${r.status}: ${r.text.slice(0, 300)}`);
  const out = r.json.stdout || '';
  check(r.json.exit_code === 0, `reading the credential file failed (exit ${r.json.exit_code}): ${out} ${r.json.stderr || ''}`);
  check(out.startsWith('600 airlock\n'), `the credential file is not 0600 and the user's: ${JSON.stringify(out)}`);
  check(out.endsWith('has-access-token'), `the credential file holds no access token: ${JSON.stringify(out)}`);
  log(`the workspace holds ${p} (mode 600, owner airlock) with an access token`);
}

async function checkBrowserGone() {
  log(`waiting up to ${GONE_TIMEOUT_MS / 1000} s for browser sandbox ${browserSandbox} to be gone`);
  let last = '';
  await waitFor('the browser sandbox to be destroyed', GONE_TIMEOUT_MS, async () => {
    const r = await apiCall('GET', `/sandboxes/${browserSandbox}`);
    const state = r.status === 404 ? '(404)' : (r.json && r.json.state) || `(${r.status})`;
    if (state !== last) {
      log(`browser sandbox: ${state}`);
      last = state;
    }
    return r.status === 404 || state === 'stopped';
  });
}

async function checkSide() {
  await waitFor('the Connected list to name the provider', 15_000, async () =>
    page.locator(`#credentials li[data-provider="${opts.provider}"]`).count(),
  );
  const stats = await waitFor('the login totals to count the completed login', 15_000, async () => {
    const text = await page.locator('#login-stats').innerText();
    return /1 completed/.test(text) ? text : false;
  });
  log(`the page shows: Connected: ${await page.locator('#credentials').innerText()} | ${stats}`);
  await screenshot('completed');
}

async function cleanUp() {
  if (!loginId || !context) return;
  log(`cleaning up: cancelling login ${loginId} through the API`);
  try {
    const r = await apiCall('DELETE', `/logins/${loginId}`);
    log(`DELETE answered ${r.status}`);
  } catch (e) {
    log(`could not cancel login ${loginId}: ${e.message}`);
  }
}

async function main() {
  const watchdog = setTimeout(() => {
    console.error(`login-e2e: FAILED: the whole run took longer than ${WATCHDOG_MS / 1000} s`);
    process.exit(1);
  }, WATCHDOG_MS);
  let code = 0;
  try {
    await openUi();
    await connect();
    await waitViewer();
    await waitSignInPage();
    await clickSignIn();
    const l = await waitCompleted();
    await checkWorkspace(l);
    await checkBrowserGone();
    await checkSide();
    check(pageErrors.length === 0, `uncaught errors in the page: ${pageErrors.join(' | ')}`);
    loginId = '';
    log(`PASSED; artifacts in ${opts.artifacts}`);
  } catch (e) {
    code = 1;
    console.error(`login-e2e: FAILED: ${e instanceof CheckFailed ? e.message : e.stack || e}`);
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
