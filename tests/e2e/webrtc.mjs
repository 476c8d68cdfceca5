#!/usr/bin/env node
// The viewer's paths in a real headless Chromium, against a ready sandbox.
//
//   node tests/e2e/webrtc.mjs --url http://127.0.0.1:PORT --id SANDBOX [--token T]
//        --expect webrtc|vnc [--viewers N] [--type TEXT] [--clipboard] [--resize WxH] [--hold-ms MS] --artifacts DIR
//
// Opens N viewer pages of the sandbox (the viewer chooses its path itself),
// waits until each is connected on the expected path and shows a desktop
// (many colours, not one), and for WebRTC that frames keep arriving. With
// --type, clicks into the terminal (left half of the desktop) of the first
// viewer and types TEXT followed by Enter. With --clipboard, a round trip of
// the first viewer's clipboard: text copied in the sandbox (airlock-agent
// clipboard set, through the exec API) shows in the viewer, and text sent from
// the viewer's Clipboard panel, and pasted with the browser's paste event,
// is on the sandbox's clipboard (airlock-agent clipboard get). With --resize,
// the first viewer's window takes that size and the remote display must
// follow (the picture the page shows and the display's own geometry). Then prints "viewers ready" and
// keeps the pages open for --hold-ms, so the caller can look at the server.
// Exit status 0 on success, 1 on a failed check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE =
  'usage: node tests/e2e/webrtc.mjs --url URL --id SANDBOX [--token T] --expect webrtc|vnc [--viewers N] [--type TEXT] [--clipboard] [--resize WxH] [--hold-ms MS] --artifacts DIR';
const CONNECT_TIMEOUT_MS = 45_000;
const DESKTOP_TIMEOUT_MS = 45_000;
const MIN_DISTINCT_COLOURS = 64;
const MAX_DOMINANT_SHARE = 0.97;

class CheckFailed extends Error {}

function parseArgs(argv) {
  const o = { url: '', id: '', token: '', expect: '', viewers: 1, type: '', clipboard: false, resize: '', holdMs: 0, artifacts: '' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => {
      const x = argv[++i];
      if (x === undefined) usage(`${a} needs a value`);
      return x;
    };
    if (a === '--url') o.url = v();
    else if (a === '--id') o.id = v();
    else if (a === '--token') o.token = v();
    else if (a === '--expect') o.expect = v();
    else if (a === '--viewers') o.viewers = Number(v());
    else if (a === '--type') o.type = v();
    else if (a === '--hold-ms') o.holdMs = Number(v());
    else if (a === '--clipboard') o.clipboard = true;
    else if (a === '--resize') o.resize = v();
    else if (a === '--artifacts') o.artifacts = v();
    else usage(`unknown argument ${a}`);
  }
  if (!o.url || !o.id || !o.artifacts) usage('--url, --id and --artifacts are required');
  if (o.expect !== 'webrtc' && o.expect !== 'vnc') usage('--expect is webrtc or vnc');
  if (!(o.viewers >= 1 && o.viewers <= 8)) usage('--viewers is 1 to 8');
  return o;
}

function usage(m) {
  console.error(`webrtc e2e: ${m}\n${USAGE}`);
  process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));
const started = Date.now();
const log = (m) => console.log(`webrtc-e2e [${((Date.now() - started) / 1000).toFixed(1).padStart(6)}s] ${m}`);
const check = (c, m) => {
  if (!c) throw new CheckFailed(m);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, ms, fn, every = 250) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > deadline) throw new CheckFailed(`timed out after ${ms / 1000} s waiting for ${what}`);
    await sleep(every);
  }
}

// Colour statistics of what the viewer shows: the video's current frame (drawn
// into a canvas) on the WebRTC path, noVNC's canvas otherwise.
function pictureStats() {
  const v = window.airlockViewer;
  let source = null;
  let w = 0;
  let h = 0;
  if (v.path === 'webrtc' && v.webrtc) {
    source = v.webrtc.video;
    w = source.videoWidth;
    h = source.videoHeight;
  } else {
    source = document.querySelector('#screen canvas');
    w = source ? source.width : 0;
    h = source ? source.height : 0;
  }
  if (!source || !w || !h) return { width: 0, height: 0, distinct: 0, dominant: 1 };
  const c = document.createElement('canvas');
  c.width = w;
  c.height = h;
  const ctx = c.getContext('2d');
  ctx.drawImage(source, 0, 0);
  const data = ctx.getImageData(0, 0, w, h).data;
  const counts = new Map();
  for (let i = 0; i < data.length; i += 16) {
    const rgb = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    counts.set(rgb, (counts.get(rgb) || 0) + 1);
  }
  let top = 0;
  for (const n of counts.values()) top = Math.max(top, n);
  return { width: w, height: h, distinct: counts.size, dominant: top / (data.length / 16), png: c.toDataURL('image/png') };
}

async function openViewer(context, n) {
  const page = await context.newPage();
  page.on('console', (m) => log(`viewer ${n} [${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log(`viewer ${n} page error: ${e.message}`));
  await page.goto(`${opts.url}/view/${opts.id}`);
  let last = '';
  await waitFor(`viewer ${n} to connect`, CONNECT_TIMEOUT_MS, async () => {
    const s = await page.evaluate(() => ({
      state: document.body.dataset.viewerState,
      status: window.airlockViewer ? window.airlockViewer.status : 'loading',
      path: window.airlockViewer ? window.airlockViewer.path : '',
    }));
    if (s.status !== last) {
      log(`viewer ${n}: ${s.status}`);
      last = s.status;
    }
    if (s.state === 'disconnected') throw new CheckFailed(`viewer ${n} gave up: ${s.status}`);
    return s.state === 'connected';
  });
  const p = await page.evaluate(() => window.airlockViewer.path);
  check(p === opts.expect, `viewer ${n} connected over ${p}, expected ${opts.expect} (${last})`);
  if (opts.expect === 'vnc') {
    const why = await page.evaluate(() => window.airlockViewer.fallbackReason);
    log(`viewer ${n} fell back to noVNC because: ${why || '(forced)'}`);
  }
  let stats = null;
  try {
    await waitFor(`a desktop in viewer ${n}`, DESKTOP_TIMEOUT_MS, async () => {
      stats = await page.evaluate(pictureStats);
      return stats.distinct >= MIN_DISTINCT_COLOURS && stats.dominant <= MAX_DOMINANT_SHARE;
    }, 1000);
  } finally {
    if (stats) {
      log(`viewer ${n} shows ${stats.width}x${stats.height}: ${stats.distinct} colours, the most common covers ${(stats.dominant * 100).toFixed(1)}%`);
      if (stats.png) fs.writeFileSync(path.join(opts.artifacts, `viewer-${n}-${opts.expect}.png`), Buffer.from(stats.png.split(',')[1], 'base64'));
    }
  }
  if (opts.expect === 'webrtc') {
    const frames = async () => page.evaluate(() => window.airlockViewer.webrtc.video.getVideoPlaybackQuality().totalVideoFrames);
    const before = await frames();
    await waitFor(`frames to keep arriving in viewer ${n}`, 10_000, async () => (await frames()) > before + 5);
    // The guest's pointer picture is this page's pointer over the video.
    const pointer = () => page.evaluate(() => window.airlockViewer.webrtc.video.style.cursor);
    await waitFor(`the guest's pointer picture in viewer ${n}`, 10_000, async () => (await pointer()).startsWith('url("data:image/png'));
    const badge = await page.evaluate(() => window.airlockViewer.status);
    log(`viewer ${n} frames keep arriving; badge: ${badge}`);
  }
  return page;
}

async function typeInto(page) {
  // Background tabs get few video frame callbacks; a person types into the
  // tab in front.
  await page.bringToFront();
  if (opts.expect === 'webrtc') {
    await waitFor('the input data channel to open', 10_000, () => page.evaluate(() => window.airlockViewer.webrtc.inputReady));
  }
  const target = opts.expect === 'webrtc' ? page.locator('video.webrtc-video') : page.locator('#screen canvas');
  const box = await target.boundingBox();
  check(box && box.width > 0, 'the picture has no size');
  await target.click({ position: { x: Math.round(box.width * 0.25), y: Math.round(box.height * 0.5) } });
  await sleep(500);
  log(`typing ${JSON.stringify(opts.type)} into the terminal`);
  await page.keyboard.type(opts.type, { delay: 30 });
  await page.keyboard.press('Enter');
  await sleep(1000);
  // Either path estimates input-to-photon while in use and shows it in the badge.
  const { samples: l, presses, unseen, frames } = await page.evaluate(() => {
    const v = window.airlockViewer;
    const est = (v.path === 'webrtc' ? v.webrtc : v.vnc).latency;
    return { samples: est.samples, presses: est.presses, unseen: est.unseen, frames: est.frames };
  });
  log(`input-to-photon estimated by the viewer while typing: ${l.length} samples of ${presses} presses measured (${unseen} showed no change, ${frames} frames compared): ${JSON.stringify(l.slice(0, 10))} ms`);
  check(l.length > 0, 'typing changed the picture, but the viewer measured no input-to-photon sample');
  // fps and bitrate show while the picture changes; the estimate stays.
  const figures = /^connected · .* · input ≈\d+ ms$/;
  await waitFor("the session's figures in the badge", 5_000, async () => figures.test(await page.evaluate(() => window.airlockViewer.status)));
  log(`badge: ${await page.evaluate(() => window.airlockViewer.status)}`);
  const after = await page.evaluate(pictureStats);
  if (after.png) fs.writeFileSync(path.join(opts.artifacts, `after-typing-${opts.expect}.png`), Buffer.from(after.png.split(',')[1], 'base64'));
}

// One command in the sandbox through the API (as the desktop user).
async function exec(argv, timeoutS = 30) {
  const headers = { 'content-type': 'application/json' };
  if (opts.token) headers.authorization = `Bearer ${opts.token}`;
  const res = await fetch(`${opts.url}/api/v1/sandboxes/${opts.id}/exec`, {
    method: 'POST',
    headers,
    body: JSON.stringify({ argv, env: { DISPLAY: ':0' }, timeout_s: timeoutS }),
  });
  const body = await res.json();
  check(res.ok, `exec ${argv.join(' ')}: ${res.status} ${JSON.stringify(body)}`);
  return body;
}

const AGENT = '/usr/local/bin/airlock-agent';

async function sandboxClipboard() {
  const out = await exec([AGENT, 'clipboard', 'get'], 10);
  return out.exit_code === 0 ? out.stdout : `(exit ${out.exit_code}: ${out.stderr.trim()})`;
}

async function clipboardRoundTrip(page) {
  const tag = Math.random().toString(36).slice(2, 10);
  // Out of the sandbox: a program there copies (and holds the selection
  // until the viewer's text takes it over, below).
  const copied = `copied in the sandbox ${tag} ü€`;
  const holder = exec(['sh', '-c', `printf %s "$1" | ${AGENT} clipboard set --hold 60`, 'sh', copied], 70);
  await waitFor('the text copied in the sandbox to reach the viewer', 15_000,
    async () => (await page.evaluate(() => window.airlockViewer.clipboard.remote)) === copied);
  const panelText = await page.evaluate(() => document.getElementById('clipboard-text').value);
  check(panelText === copied, `the Clipboard panel shows ${JSON.stringify(panelText)}`);
  log('text copied in the sandbox arrived in the viewer and its Clipboard panel');

  // Into the sandbox, by the panel: a password-like text with a new line.
  const sent = `pässwörd-${tag}\nsecond line`;
  await page.click('#clipboard-button');
  await page.fill('#clipboard-text', sent);
  await page.click('#clipboard-send');
  let seen = '';
  await waitFor("the panel's text on the sandbox's clipboard", 15_000, async () => (seen = await sandboxClipboard()) === sent);
  const held = await holder;
  check(held.exit_code === 0, `the program that held the sandbox's clipboard did not end when it lost it: ${JSON.stringify(held)}`);
  log(`text sent from the Clipboard panel is on the sandbox's clipboard (${seen.length} characters)`);
  await page.click('#clipboard-button');

  // Into the sandbox, by a paste in the picture (the browser's paste event,
  // as Ctrl+V raises it), 40,000 characters: sent in parts, put together.
  const pasted = `${tag}-` + 'x'.repeat(40_000);
  const target = opts.expect === 'webrtc' ? 'video.webrtc-video' : '#screen canvas';
  await page.evaluate(({ target, text }) => {
    const el = document.querySelector(target);
    el.focus();
    const dt = new DataTransfer();
    dt.setData('text/plain', text);
    if (window.airlockViewer.path === 'vnc') {
      // noVNC's path holds the key until the paste event; without a real key
      // press, send the way the panel does.
      window.airlockViewer.clipboard.send(text);
      return;
    }
    el.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
  }, { target, text: pasted });
  await waitFor('the pasted text on the sandbox\'s clipboard', 15_000, async () => (seen = await sandboxClipboard()) === pasted);
  log(`pasted text is on the sandbox's clipboard (${seen.length} characters)`);

  // Over the bound: refused in the viewer with a message, nothing sent.
  const err = await page.evaluate(() => {
    const c = window.airlockViewer.clipboard;
    const went = c.send('y'.repeat(1024 * 1024 + 1));
    return { went, error: c.error };
  });
  check(!err.went && /at most 1 MiB/.test(err.error), `an oversized text was not refused: ${JSON.stringify(err)}`);
  check((await sandboxClipboard()) === pasted, "an oversized text changed the sandbox's clipboard");
  log(`an oversized text is refused: ${err.error}`);
}

async function followsResize(page) {
  const m = /^(\d+)x(\d+)$/.exec(opts.resize);
  check(m, `--resize takes WxH, not ${opts.resize}`);
  const [width, height] = [Number(m[1]), Number(m[2])];
  await page.setViewportSize({ width, height });
  let shown = null;
  await waitFor(`the remote display to follow a ${width}x${height} window`, 20_000, async () => {
    shown = await page.evaluate(pictureStats);
    return shown.width === width && shown.height === height;
  }, 500).catch((e) => {
    throw new CheckFailed(`${e.message}; the page shows ${shown && shown.width}x${shown && shown.height}`);
  });
  // The display's own word: the stream's description (WebRTC) or the RFB
  // framebuffer (noVNC).
  const display = await page.evaluate(() => {
    const v = window.airlockViewer;
    if (v.path === 'webrtc') return v.webrtc.display;
    return { width: v.rfb._fbWidth, height: v.rfb._fbHeight };
  });
  check(display.width === width && display.height === height, `the display is ${JSON.stringify(display)}`);
  check(shown.distinct >= MIN_DISTINCT_COLOURS, `after the resize the picture has ${shown.distinct} colours`);
  if (shown.png) fs.writeFileSync(path.join(opts.artifacts, `resized-${opts.expect}.png`), Buffer.from(shown.png.split(',')[1], 'base64'));
  log(`the remote display follows the window: ${width}x${height}, ${shown.distinct} colours`);
}

async function main() {
  fs.mkdirSync(opts.artifacts, { recursive: true });
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-webrtc-e2e-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      // The control plane listens on loopback in tests; Chromium gathers no
      // loopback candidates without this.
      '--allow-loopback-in-peer-connection',
    ],
    viewport: { width: 1280, height: 800 },
  });
  if (opts.token) {
    await context.addInitScript((t) => {
      try {
        localStorage.setItem('airlock.token', t);
      } catch {
        // frames without storage
      }
    }, opts.token);
  }
  try {
    const pages = [];
    for (let n = 1; n <= opts.viewers; n++) pages.push(await openViewer(context, n));
    if (opts.type) await typeInto(pages[0]);
    if (opts.clipboard) await clipboardRoundTrip(pages[0]);
    if (opts.resize) await followsResize(pages[0]);
    console.log('viewers ready');
    if (opts.holdMs > 0) await sleep(opts.holdMs);
    // Every viewer is still on its path after the hold.
    for (const [i, page] of pages.entries()) {
      const s = await page.evaluate(() => ({ state: document.body.dataset.viewerState, path: window.airlockViewer.path }));
      check(s.state === 'connected' && s.path === opts.expect, `viewer ${i + 1} ended up ${s.state} over ${s.path}`);
    }
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().then(
  () => {
    log('all checks passed');
    process.exit(0);
  },
  (e) => {
    console.error(`webrtc e2e: ${e instanceof CheckFailed ? 'check failed' : 'error'}: ${e.stack || e.message}`);
    process.exit(1);
  },
);
