#!/usr/bin/env node
// The page's quota line and a refused create, in a real headless Chromium.
//
//   node tests/e2e/quota.mjs --url http://127.0.0.1:PORT --artifacts DIR
//
// Expects a server whose quota.max_sandboxes is 1 and whose user has no
// sandbox: the line reads "0 of 1 sandbox", one click on "New browser
// sandbox" makes it "1 of 1 sandbox", and a second click shows the server's
// 429 message, which names the limit. Exit status 0 on success, 1 on a failed
// check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: node tests/e2e/quota.mjs --url http://127.0.0.1:PORT --artifacts DIR';
const STEP_MS = 15_000;

const opts = { url: '', artifacts: '' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--url') opts.url = argv[++i] || '';
  else if (argv[i] === '--artifacts') opts.artifacts = argv[++i] || '';
  else {
    console.error(`e2e: unknown argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
}
if (!opts.url || !opts.artifacts) {
  console.error(`e2e: --url and --artifacts are required\n${USAGE}`);
  process.exit(2);
}
fs.mkdirSync(opts.artifacts, { recursive: true });

const log = (m) => console.log(`e2e quota: ${m}`);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-e2e-quota-'));
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
  await page.goto(opts.url, { waitUntil: 'domcontentloaded' });
  await textOf('#usage', '0 of 1 sandbox · 0 of 3 logins', 'at start');

  await page.click('#new-browser');
  await textOf('#usage', '1 of 1 sandbox', 'after one create');
  if (!(await page.locator('#usage.full').count())) throw new Error('the line is not marked full at the cap');

  await page.click('#new-browser');
  await textOf('#error', '(limit reached): you have 1 live sandbox,', 'the refusal');
  await textOf('#error', 'the limit (quota.max_sandboxes) is 1', 'the refusal names the limit');
  await page.screenshot({ path: path.join(opts.artifacts, 'quota-refused.png') });
} catch (err) {
  failed = true;
  console.error(`e2e quota: FAILED: ${err.message}`);
  if (page) await page.screenshot({ path: path.join(opts.artifacts, 'quota-failed.png') }).catch(() => {});
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
