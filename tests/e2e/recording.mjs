#!/usr/bin/env node
// The viewer's Record button in a real headless Chromium.
//
//   node tests/e2e/recording.mjs --url http://127.0.0.1:PORT --id SANDBOX --artifacts DIR
//
// Expects a server with [recording] enabled and a ready sandbox of the
// token-less local user: the button shows, starts a recording (it turns to
// "Recording"), stops it after 3 s (the note says it was saved), and Play
// loads the newest recording into the panel's <video>, which knows its
// length. Exit status 0 on success, 1 on a failed check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: node tests/e2e/recording.mjs --url http://127.0.0.1:PORT --id SANDBOX --artifacts DIR';
const STEP_MS = 20_000;

const opts = { url: '', id: '', artifacts: '' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--url') opts.url = argv[++i] || '';
  else if (argv[i] === '--id') opts.id = argv[++i] || '';
  else if (argv[i] === '--artifacts') opts.artifacts = argv[++i] || '';
  else {
    console.error(`e2e: unknown argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
}
if (!opts.url || !opts.id || !opts.artifacts) {
  console.error(`e2e: --url, --id and --artifacts are required\n${USAGE}`);
  process.exit(2);
}
fs.mkdirSync(opts.artifacts, { recursive: true });

const log = (m) => console.log(`e2e recording: ${m}`);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-e2e-recording-'));
let context;
let page;
let failed = false;

async function textOf(selector, want, what) {
  try {
    await page.waitForFunction(
      ([sel, text]) => (document.querySelector(sel)?.textContent || '').includes(text),
      [selector, want],
      { timeout: STEP_MS },
    );
  } catch {
    const got = await page.locator(selector).textContent();
    throw new Error(`${what}: ${selector} reads ${JSON.stringify(got)}, not ${JSON.stringify(want)}`);
  }
  log(`${what}: ${JSON.stringify(await page.locator(selector).textContent())}`);
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    viewport: { width: 1400, height: 900 },
  });
  page = await context.newPage();
  await page.goto(`${opts.url}/view/${encodeURIComponent(opts.id)}`, { waitUntil: 'domcontentloaded' });
  await page.locator('#record-button').waitFor({ state: 'visible', timeout: STEP_MS });
  log('the Record button shows');
  await page.click('#record-button');
  await page.click('#record-toggle');
  await textOf('#record-button', 'Recording', 'started');
  await page.waitForTimeout(3000);
  await page.click('#record-toggle');
  await textOf('#recordings-note', 'Saved', 'stopped');
  await textOf('#record-button', 'Record', 'the button after');
  await page.locator('#recordings-list button').first().click();
  await page.waitForFunction(
    () => {
      const v = document.getElementById('recordings-video');
      return v && !v.hidden && v.readyState >= 1 && Number.isFinite(v.duration) && v.duration > 1.5;
    },
    null,
    { timeout: STEP_MS },
  );
  const size = await page.evaluate(() => {
    const v = document.getElementById('recordings-video');
    return { duration: v.duration, width: v.videoWidth, height: v.videoHeight };
  });
  log(`the recording plays: ${JSON.stringify(size)}`);
  if (!(size.width > 0 && size.height > 0)) throw new Error('the video has no picture size');
  await page.screenshot({ path: path.join(opts.artifacts, 'recording-played.png') });
} catch (err) {
  failed = true;
  console.error(`e2e recording: FAILED: ${err.message}`);
  if (page) await page.screenshot({ path: path.join(opts.artifacts, 'recording-failed.png') }).catch(() => {});
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
