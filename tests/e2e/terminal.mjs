#!/usr/bin/env node
// The web terminal in a real headless Chromium: /term/ID starts a shell on a
// PTY in the sandbox; typed keys reach it, its output is drawn, a dropped
// socket is reattached by the page itself without drawing anything twice,
// and a window resize reaches `stty size`.
//
//   node tests/e2e/terminal.mjs --url http://127.0.0.1:PORT --sandbox ID --token TOKEN --artifacts DIR
//
// Exit status 0 on success, 1 on a failed check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: node tests/e2e/terminal.mjs --url URL --sandbox ID --token TOKEN --artifacts DIR';
const STEP_MS = 20_000;

const opts = { url: '', sandbox: '', token: '', artifacts: '' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const key = argv[i].replace(/^--/, '');
  if (!(key in opts)) {
    console.error(`e2e: unknown argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
  opts[key] = argv[++i] || '';
}
if (!opts.url || !opts.sandbox || !opts.artifacts) {
  console.error(`e2e: --url, --sandbox and --artifacts are required\n${USAGE}`);
  process.exit(2);
}
fs.mkdirSync(opts.artifacts, { recursive: true });

const log = (m) => console.log(`e2e terminal: ${m}`);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-e2e-term-'));
let context;
let page;
let failed = false;

// The terminal's text, as xterm.js holds it.
const screen = () =>
  page.evaluate(() => {
    const b = window.airlockTerminal.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join('\n');
  });

async function shows(want, what) {
  try {
    await page.waitForFunction(
      (text) => {
        const b = window.airlockTerminal?.buffer.active;
        if (!b) return false;
        for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true).includes(text)) return true;
        return false;
      },
      want,
      { timeout: STEP_MS },
    );
  } catch {
    throw new Error(`${what}: the terminal does not show ${JSON.stringify(want)}; it shows:\n${await screen()}`);
  }
  log(`${what}: shows ${JSON.stringify(want)}`);
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    viewport: { width: 1000, height: 600 },
  });
  if (opts.token) {
    await context.addInitScript((t) => localStorage.setItem('airlock.token', t), opts.token);
  }
  page = await context.newPage();
  await page.goto(`${opts.url}/term/${encodeURIComponent(opts.sandbox)}`, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => document.body.dataset.terminalState === 'connected', null, { timeout: STEP_MS });
  log('connected');
  await page.click('#term');
  await page.keyboard.type('echo hello-$((6*7))\n');
  await shows('hello-42', 'typed command');
  // The socket drops: the page attaches again by itself, from where it was,
  // so what was drawn is not drawn twice, and the same shell goes on.
  const count = async (text) => (await screen()).split('\n').filter((l) => l.includes(text)).length;
  const before = await count('hello-42');
  await page.evaluate(() => window.airlockTerminalSocket().close());
  await page.waitForFunction(() => document.body.dataset.terminalState === 'reconnecting', null, { timeout: STEP_MS });
  log('the socket dropped');
  await page.waitForFunction(() => document.body.dataset.terminalState === 'connected', null, { timeout: STEP_MS });
  log(`reconnected: ${await page.textContent('#status')}`);
  await page.click('#term');
  await page.keyboard.type('echo again-$((2*3)) $$\n');
  await shows('again-6', 'typed after the reconnect');
  if ((await count('hello-42')) !== before) {
    throw new Error(`the backlog was drawn again after the reconnect:\n${await screen()}`);
  }
  await page.setViewportSize({ width: 700, height: 400 });
  await page.waitForTimeout(500);
  const { cols, rows } = await page.evaluate(() => ({ cols: window.airlockTerminal.cols, rows: window.airlockTerminal.rows }));
  await page.keyboard.type('stty size\n');
  await shows(`${rows} ${cols}`, 'resized');
  await page.keyboard.type('exit\n');
  await page.waitForFunction(() => document.body.dataset.terminalState === 'ended', null, { timeout: STEP_MS });
  log('the shell ended');
  await page.screenshot({ path: path.join(opts.artifacts, 'terminal.png') });
} catch (err) {
  failed = true;
  console.error(`e2e terminal: FAILED: ${err.message}`);
  if (page) await page.screenshot({ path: path.join(opts.artifacts, 'terminal-failed.png') }).catch(() => {});
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
