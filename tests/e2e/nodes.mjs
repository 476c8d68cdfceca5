#!/usr/bin/env node
// The admin's Nodes panel, in a real headless Chromium.
//
//   node tests/e2e/nodes.mjs --url http://127.0.0.1:PORT --token ADMIN_TOKEN --artifacts DIR
//
// Expects a server whose registry holds node "alpha" (up) and "beta" (lost),
// and a failed sandbox of the admin's placed on "beta". Without a token (the
// loopback user, not an admin) the panel stays hidden. With the admin's token
// it lists both nodes with their states, Drain turns alpha "draining" and
// Resume turns it "up" again (each read back from the API), and the
// sandbox's row names its node. Exit status 0 on success, 1 on a failed
// check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const USAGE = 'usage: node tests/e2e/nodes.mjs --url http://127.0.0.1:PORT --token TOKEN --artifacts DIR';
const STEP_MS = 15_000;

const opts = { url: '', token: '', artifacts: '' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--url') opts.url = argv[++i] || '';
  else if (argv[i] === '--token') opts.token = argv[++i] || '';
  else if (argv[i] === '--artifacts') opts.artifacts = argv[++i] || '';
  else {
    console.error(`e2e: unknown argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
}
if (!opts.url || !opts.token || !opts.artifacts) {
  console.error(`e2e: --url, --token and --artifacts are required\n${USAGE}`);
  process.exit(2);
}
fs.mkdirSync(opts.artifacts, { recursive: true });

const log = (m) => console.log(`e2e nodes: ${m}`);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-e2e-nodes-'));
let context;
let page;
let failed = false;

async function until(what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: STEP_MS });
  } catch {
    throw new Error(`${what}: not seen within ${STEP_MS} ms`);
  }
  log(what);
}

const nodeState = ([name, state]) =>
  document.querySelector(`#node-rows tr[data-node="${name}"]`)?.dataset.state === state;

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    viewport: { width: 1400, height: 900 },
  });
  page = await context.newPage();

  // Not an admin: the API says 403, and the panel stays hidden.
  const refused = page.waitForResponse((r) => r.url().endsWith('/api/v1/nodes'));
  await page.goto(opts.url, { waitUntil: 'domcontentloaded' });
  const answer = await refused;
  if (answer.status() !== 403) throw new Error(`a non-admin got ${answer.status()} for the nodes`);
  await page.waitForTimeout(300);
  if (await page.locator('#nodes-panel').isVisible()) throw new Error('a non-admin sees the Nodes panel');
  log('a non-admin sees no Nodes panel');

  // The admin.
  await page.evaluate((t) => localStorage.setItem('airlock.token', t), opts.token);
  await page.reload({ waitUntil: 'domcontentloaded' });
  await until('the panel lists alpha up', nodeState, ['alpha', 'up']);
  await until('and beta lost', nodeState, ['beta', 'lost']);
  if (!(await page.locator('#nodes-panel').isVisible())) throw new Error('the Nodes panel is hidden');
  const lease = await page.locator('#node-rows tr[data-node="beta"] td.lease').textContent();
  if (!lease.includes('expired')) throw new Error(`beta's lease reads ${JSON.stringify(lease)}`);
  await until(
    "the sandbox's row names its node",
    () => [...document.querySelectorAll('#sandbox-rows td.details')].some((td) => td.textContent.includes('node beta')),
  );
  await page.screenshot({ path: path.join(opts.artifacts, 'nodes.png') });

  await page.click('#node-rows tr[data-node="alpha"] button.drain');
  await until('Drain makes alpha draining', nodeState, ['alpha', 'draining']);
  await page.screenshot({ path: path.join(opts.artifacts, 'nodes-draining.png') });
  await page.click('#node-rows tr[data-node="alpha"] button.resume');
  await until('Resume makes alpha up again', nodeState, ['alpha', 'up']);
} catch (err) {
  failed = true;
  console.error(`e2e nodes: FAILED: ${err.message}`);
  if (page) await page.screenshot({ path: path.join(opts.artifacts, 'nodes-failed.png') }).catch(() => {});
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
