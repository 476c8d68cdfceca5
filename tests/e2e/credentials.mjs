#!/usr/bin/env node
// "Sign in again" in a real headless Chromium.
//
//   node tests/e2e/credentials.mjs --url http://127.0.0.1:PORT --provider NAME [--workspaces A,B] --artifacts DIR
//
// Expects a server where the user's credentials for NAME are
// `refresh_failed`: the page lists them with "could not refresh" and a
// "Sign in again" button; a click on it starts a login for NAME (seen in
// GET /api/v1/logins). Exit status 0 on success, 1 on a failed check, 2 on
// bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: node tests/e2e/credentials.mjs --url http://127.0.0.1:PORT --provider NAME [--workspaces A,B] --artifacts DIR';
const STEP_MS = 20_000;

const opts = { url: '', provider: '', workspaces: '', artifacts: '' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--url') opts.url = argv[++i] || '';
  else if (argv[i] === '--provider') opts.provider = argv[++i] || '';
  else if (argv[i] === '--workspaces') opts.workspaces = argv[++i] || '';
  else if (argv[i] === '--artifacts') opts.artifacts = argv[++i] || '';
  else {
    console.error(`e2e: unknown argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
}
if (!opts.url || !opts.provider || !opts.artifacts) {
  console.error(`e2e: --url, --provider and --artifacts are required\n${USAGE}`);
  process.exit(2);
}
fs.mkdirSync(opts.artifacts, { recursive: true });

const log = (m) => console.log(`e2e credentials: ${m}`);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-e2e-credentials-'));
let context;
let page;
let failed = false;

async function logins() {
  const r = await fetch(`${opts.url}/api/v1/logins`);
  if (!r.ok) throw new Error(`GET /logins answered ${r.status}`);
  const body = await r.json();
  return (body.logins || []).filter((l) => l.provider === opts.provider);
}

try {
  const before = (await logins()).length;
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    viewport: { width: 1400, height: 900 },
  });
  page = await context.newPage();
  await page.goto(opts.url, { waitUntil: 'domcontentloaded' });
  const item = page.locator(`li[data-provider="${opts.provider}"][data-status="refresh_failed"]`);
  await item.waitFor({ timeout: STEP_MS });
  const words = await item.locator('.credential-state').textContent();
  if (!words.includes('could not refresh')) throw new Error(`the record reads ${JSON.stringify(words)}`);
  log(`listed: ${JSON.stringify((await item.textContent()).trim())}`);
  if (opts.workspaces) {
    const want = `(in ${opts.workspaces.split(',').join(', ')})`;
    const text = await item.textContent();
    if (!text.includes(want)) throw new Error(`the record does not say ${want}: ${JSON.stringify(text)}`);
    if ((await item.locator('button[data-action="deliver"]').count()) !== 1) throw new Error('no "Deliver to…" button');
    // The sandbox table names each workspace.
    for (const name of opts.workspaces.split(',')) {
      await page
        .waitForFunction((n) => document.body.innerText.includes(`workspace · ${n}`), name, { timeout: STEP_MS })
        .catch(() => {
          throw new Error(`the sandbox table does not name workspace ${name}`);
        });
    }
  }
  const again = item.locator('button[data-action="sign-in-again"]');
  if ((await again.textContent()).trim() !== 'Sign in again') throw new Error('no "Sign in again" button');
  await page.screenshot({ path: path.join(opts.artifacts, 'sign-in-again.png') });
  await again.click();
  const deadline = Date.now() + STEP_MS;
  let now = before;
  while (now <= before && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 250));
    now = (await logins()).length;
  }
  if (now <= before) throw new Error(`the click started no login for ${opts.provider}`);
  log(`the click started a login for ${opts.provider}`);
  await page.screenshot({ path: path.join(opts.artifacts, 'login-started.png') });
} catch (err) {
  failed = true;
  console.error(`e2e credentials: FAILED: ${err.message}`);
  if (page) await page.screenshot({ path: path.join(opts.artifacts, 'credentials-failed.png') }).catch(() => {});
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
