#!/usr/bin/env node
// A viewer that stays open while the processes behind it restart.
//
//   node tests/e2e/reconnect.mjs --url http://127.0.0.1:PORT --sandbox ID --rounds N
//
// Opens the full-window viewer of the sandbox (noVNC path) in headless
// Chromium and waits until it shows the desktop. Then, N times: prints
// "connected N" on stdout, waits for the connection to drop (someone
// restarts a process behind it) and for the viewer to come back by itself,
// with no click, and checks it shows a painted desktop again. Exit status 0
// when every round came back, 1 otherwise, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const CONNECT_TIMEOUT_MS = 60_000;
/// A drop is awaited this long (the test restarts something meanwhile).
const DROP_TIMEOUT_MS = 120_000;
const BACK_TIMEOUT_MS = 90_000;

function parseArgs(argv) {
  const opts = { url: '', sandbox: '', rounds: 1 };
  for (let i = 0; i < argv.length; i++) {
    const v = () => argv[++i];
    if (argv[i] === '--url') opts.url = v();
    else if (argv[i] === '--sandbox') opts.sandbox = v();
    else if (argv[i] === '--rounds') opts.rounds = Number(v());
    else {
      console.error(`unknown argument ${argv[i]}`);
      process.exit(2);
    }
  }
  if (!opts.url || !opts.sandbox || !(opts.rounds >= 1)) {
    console.error('usage: node tests/e2e/reconnect.mjs --url URL --sandbox ID --rounds N');
    process.exit(2);
  }
  return opts;
}

const log = (m) => console.error(`[reconnect] ${m}`);

async function state(page) {
  return page.evaluate(() => ({
    state: document.body.dataset.viewerState,
    status: window.airlockViewer && window.airlockViewer.status,
  }));
}

async function until(what, ms, pred) {
  const end = Date.now() + ms;
  for (;;) {
    const got = await pred();
    if (got) return got;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/// Distinct colours of the canvas: a painted desktop has many.
async function colours(page) {
  return page.evaluate(() => {
    const c = document.querySelector('canvas');
    if (!c || !c.width) return 0;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length; i += 4 * 97) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    return seen.size;
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-reconnect-'));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    viewport: { width: 1300, height: 900 },
  });
  await context.addInitScript(() => {
    try {
      localStorage.setItem('airlock.viewer-path', 'vnc');
    } catch {
      // about:blank has no storage.
    }
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    await page.goto(`${opts.url}/view/${encodeURIComponent(opts.sandbox)}`, { waitUntil: 'load' });
    for (let round = 1; round <= opts.rounds; round++) {
      await until('the viewer to connect', round === 1 ? CONNECT_TIMEOUT_MS : BACK_TIMEOUT_MS, async () => {
        const s = await state(page);
        if (s.state === 'disconnected') throw new Error(`the viewer gave up: ${s.status}`);
        return s.state === 'connected';
      });
      await until('a painted desktop', 30_000, async () => (await colours(page)) > 20);
      console.log(`connected ${round}`);
      if (round === opts.rounds) break;
      await until('the connection to drop', DROP_TIMEOUT_MS, async () => (await state(page)).state !== 'connected');
      log(`round ${round}: dropped (${(await state(page)).status}); waiting for it to come back`);
    }
    console.log('ok');
  } finally {
    await context.close();
  }
}

main().catch((e) => {
  console.error(`[reconnect] FAILED: ${e.message}`);
  process.exit(1);
});
