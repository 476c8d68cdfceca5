#!/usr/bin/env node
// A share link and the owner's files, in a real headless Chromium.
//
//   node tests/e2e/share.mjs --url http://127.0.0.1:PORT --sandbox ID --mark M --artifacts DIR
//
// 1. The owner opens the viewer (noVNC path), makes a read-only link with
//    the Share panel.
// 2. A second browser context (no token, nothing stored) opens the link,
//    sees the desktop, and shows no owner controls. It clicks into the
//    terminal and types `echo M > /tmp/share-mark` twice: once as the page
//    is, and once with noVNC's view-only switch turned off in the page, so
//    the keys really go out on the socket and only the server can stop them;
//    then again on the WebRTC path (its input data channel).
// 3. The owner types `echo M > /tmp/owner-mark`; it must appear (the typing
//    path works), and /tmp/share-mark must not.
// 4. The owner drops a file onto the viewer: it lands in ~/Downloads; the
//    Files panel lists it and offers it back as a download with the same bytes.
// 5. The owner revokes the link: the shared view closes with a reason.
// Exit 0 on success, 1 on a failed check, 2 on bad usage.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

function parseArgs(argv) {
  const opts = { url: '', sandbox: '', mark: '', artifacts: '' };
  for (let i = 0; i < argv.length; i++) {
    const v = () => argv[++i];
    if (argv[i] === '--url') opts.url = v();
    else if (argv[i] === '--sandbox') opts.sandbox = v();
    else if (argv[i] === '--mark') opts.mark = v();
    else if (argv[i] === '--artifacts') opts.artifacts = v();
    else {
      console.error(`unknown argument ${argv[i]}`);
      process.exit(2);
    }
  }
  if (!opts.url || !opts.sandbox || !/^[a-z0-9]+$/.test(opts.mark) || !opts.artifacts) {
    console.error('usage: node tests/e2e/share.mjs --url URL --sandbox ID --mark [a-z0-9]+ --artifacts DIR');
    process.exit(2);
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const log = (m) => console.error(`[share] ${m}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
class CheckFailed extends Error {}
const check = (ok, why) => {
  if (!ok) throw new CheckFailed(why);
};

async function until(what, ms, pred) {
  const end = Date.now() + ms;
  for (;;) {
    const got = await pred();
    if (got) return got;
    if (Date.now() > end) throw new CheckFailed(`timed out waiting for ${what}`);
    await sleep(150);
  }
}

async function exec(argv) {
  const res = await fetch(`${opts.url}/api/v1/sandboxes/${opts.sandbox}/exec`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ argv, timeout_s: 10 }),
  });
  if (!res.ok) throw new CheckFailed(`exec answered ${res.status}: ${await res.text()}`);
  return res.json();
}

async function viewerState(page) {
  return page.evaluate(() => ({
    state: document.body.dataset.viewerState,
    status: window.airlockViewer && window.airlockViewer.status,
  }));
}

async function connected(page, who) {
  await until(`the ${who} viewer to connect`, 60_000, async () => {
    const s = await viewerState(page);
    if (s.state === 'disconnected') throw new CheckFailed(`the ${who} viewer gave up: ${s.status}`);
    return s.state === 'connected';
  });
  await until(`a painted desktop in the ${who} viewer`, 30_000, () =>
    page.evaluate(() => {
      const c = document.querySelector('#screen canvas');
      if (!c || !c.width) return false;
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const seen = new Set();
      for (let i = 0; i < d.length; i += 4 * 97) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      return seen.size > 20;
    }));
}

/// Click into the terminal (the left half of the desktop) and type a line.
async function typeLine(page, line) {
  const canvas = page.locator('#screen canvas').first();
  const box = await canvas.boundingBox();
  check(box, 'no canvas to click');
  await canvas.click({ position: { x: Math.round(box.width * 0.25), y: Math.round(box.height * 0.5) } });
  await sleep(300);
  await page.keyboard.type(line, { delay: 25 });
  await page.keyboard.press('Enter');
}

async function launch(dir) {
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    acceptDownloads: true,
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
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => log(`[${m.type()}] ${m.text()}`));
  return { context, page };
}

async function main() {
  fs.mkdirSync(opts.artifacts, { recursive: true });
  const dirs = ['owner', 'guest'].map((who) => fs.mkdtempSync(path.join(os.tmpdir(), `airlock-share-${who}-`)));
  const owner = await launch(dirs[0]);
  const guest = await launch(dirs[1]);
  const shot = (p, name) => p.screenshot({ path: path.join(opts.artifacts, `${name}.png`) }).catch(() => {});
  try {
    const { page } = owner;
    await page.goto(`${opts.url}/view/${encodeURIComponent(opts.sandbox)}`, { waitUntil: 'load' });
    await connected(page, 'owner');
    log('the owner sees the desktop; making a read-only link');
    await page.locator('#share-button').click();
    await page.locator('#share-create').click();
    const link = await until('the share link', 10_000, async () => {
      const v = await page.locator('#share-url').inputValue();
      return v.includes('#share=vs_') ? v : '';
    });
    const shareId = await until('the share in the list', 10_000, () => page.locator('#share-list li').first().getAttribute('data-share').catch(() => ''));
    await page.locator('#share-button').click();
    await shot(page, 'owner-shared');

    log('the guest opens the link');
    await guest.page.goto(link, { waitUntil: 'load' });
    await connected(guest.page, 'shared');
    const ui = await guest.page.evaluate(() => ({
      shared: window.airlockViewer.shared,
      files: window.airlockViewer.files,
      owner: ['clipboard-button', 'files-button', 'share-button'].filter((b) => !document.getElementById(b).hidden),
      badge: !document.getElementById('shared-badge').hidden,
    }));
    check(ui.shared && ui.files === null && ui.owner.length === 0 && ui.badge, `the shared page shows owner controls: ${JSON.stringify(ui)}`);
    await shot(guest.page, 'guest-view');

    log('the guest types (the page as it is)');
    await typeLine(guest.page, `echo ${opts.mark} > /tmp/share-mark`);
    log('the guest types with the page\'s view-only switch off: the keys go out on the socket');
    await guest.page.evaluate(() => {
      window.airlockViewer.rfb.viewOnly = false;
    });
    await typeLine(guest.page, `echo ${opts.mark} > /tmp/share-mark`);
    await sleep(1000);
    const still = await viewerState(guest.page);
    check(still.state === 'connected', `the shared view dropped after typing: ${still.status}`);

    log('the guest opens the link on the WebRTC path and types there too');
    const rtc = await guest.context.newPage();
    const rtcLink = new URL(link);
    rtcLink.search = '?path=webrtc';
    await rtc.goto(rtcLink.href, { waitUntil: 'load' });
    await until('the shared WebRTC view to play', 60_000, async () => {
      const s = await rtc.evaluate(() => window.airlockViewer && { state: document.body.dataset.viewerState, path: window.airlockViewer.path, status: window.airlockViewer.status });
      if (!s) return false;
      if (s.state === 'disconnected' || s.path !== 'webrtc') throw new CheckFailed(`the shared WebRTC view failed: ${JSON.stringify(s)}`);
      return s.state === 'connected';
    });
    const video = rtc.locator('video.webrtc-video');
    const vbox = await video.boundingBox();
    check(vbox, 'no video to click');
    await video.click({ position: { x: Math.round(vbox.width * 0.25), y: Math.round(vbox.height * 0.5) } });
    await sleep(300);
    await rtc.keyboard.type(`echo ${opts.mark} > /tmp/share-mark`, { delay: 25 });
    await rtc.keyboard.press('Enter');
    await sleep(1000);
    await shot(rtc, 'guest-webrtc');
    await rtc.close();

    log('the owner types: the same path must work for the owner');
    await typeLine(page, `echo ${opts.mark} > /tmp/owner-mark`);
    await until('/tmp/owner-mark to hold the mark', 20_000, async () => (await exec(['cat', '/tmp/owner-mark'])).stdout.includes(opts.mark));
    const shared = await exec(['sh', '-c', 'cat /tmp/share-mark 2>&1; ls /tmp']);
    check(!shared.stdout.includes(opts.mark) || shared.stdout.includes('No such file'), `the guest's typing reached the sandbox: ${JSON.stringify(shared)}`);
    check(/No such file/.test(shared.stdout), `/tmp/share-mark exists: ${JSON.stringify(shared)}`);
    log('the guest\'s keys did not reach the sandbox; the owner\'s did');

    log('the owner drops a file onto the viewer');
    const name = `dropped-${opts.mark}.txt`;
    const content = `dropped by the e2e test ${opts.mark}\n`;
    const result = await page.evaluate(async ({ name, content }) => {
      const dt = new DataTransfer();
      dt.items.add(new File([content], name, { type: 'text/plain' }));
      const screen = document.getElementById('screen');
      screen.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
      screen.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
      const files = window.airlockViewer.files;
      for (let i = 0; i < 200 && !(files.last && files.last.name === name); i++) await new Promise((r) => setTimeout(r, 100));
      return files.last;
    }, { name, content });
    check(result && result.path && !result.error, `the drop did not upload: ${JSON.stringify(result)}`);
    log(`uploaded to ${result.path}`);
    const ls = await exec(['sh', '-c', 'ls "$HOME/Downloads" "$HOME"']);
    check(ls.stdout.includes(name), `ls does not show ${name}: ${JSON.stringify(ls)}`);
    await shot(page, 'owner-dropped');

    log('the Files panel offers it back');
    const row = page.locator('#files-list li button', { hasText: name });
    await row.waitFor({ state: 'visible', timeout: 15_000 });
    const [download] = await Promise.all([page.waitForEvent('download', { timeout: 15_000 }), row.click()]);
    const saved = await download.path();
    const got = fs.readFileSync(saved, 'utf8');
    check(got === content, `the download holds ${JSON.stringify(got)}`);
    check(download.suggestedFilename() === name, `the download is named ${download.suggestedFilename()}`);
    check(!download.url().includes('token'), 'a token in the download URL');

    log(`the owner revokes ${shareId}`);
    await page.locator('#share-button').click();
    await page.locator(`#share-list li[data-share="${shareId}"] button`, { hasText: 'Revoke' }).click();
    const ended = await until('the shared view to close', 15_000, async () => {
      const s = await viewerState(guest.page);
      return s.state === 'disconnected' ? s : null;
    });
    check(/share|ended|revoked/i.test(ended.status), `the shared view closed without saying why: ${ended.status}`);
    await shot(guest.page, 'guest-revoked');
    const again = await fetch(`${opts.url}/api/v1/sandboxes/${opts.sandbox}/shares`).then((r) => r.json());
    check(!again.shares.some((s) => s.id === shareId), 'the revoked share is still listed');
    console.log('ok');
  } finally {
    await guest.context.close();
    await owner.context.close();
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`[share] FAILED: ${e.message}`);
  process.exit(1);
});
