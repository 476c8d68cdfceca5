#!/usr/bin/env node
// Input-to-photon latency through the real viewer, in headless Chromium.
//
//   node tests/e2e/latency.mjs --url URL --id SANDBOX --path webrtc|vnc
//        [--presses N] [--gap-min MS] [--gap-max MS] [--busy-seconds S] [--token T]
//        [--raw FILE]   (the page's stamps, every press and flip, as JSON)
//        [--probe]      (also the like-for-like probe, below)
//
// The sandbox must show the flip page (full screen, black ↔ white on every
// key press; airlock-bench puts it there). The viewer is opened on the given
// path; each key press is stamped when the viewer page receives it (a capture
// listener on window), and each flip twice, on the page's clock:
//
// * ready: when the new picture is in the page, ready for the next display
//   refresh. WebRTC: the decoded frame's `presentationTime`, when it was handed
//   to the compositor (requestVideoFrameCallback's metadata). noVNC: right after
//   noVNC copied a frame update to its visible canvas (its display's flip()),
//   where the canvas is sampled. This is the figure reported first: it leaves
//   out only the wait for the display's refresh, which neither path causes and
//   which in real use is unrelated to the sandbox's own 60 Hz.
// * step: performance.now() inside the rendering-step callback that first sees
//   the new picture (requestVideoFrameCallback; an animation frame sampling the
//   canvas). The two are not alike: noVNC's animation frames come on the page's
//   16.67 ms frame grid, so its stamp adds the wait for the next refresh, while
//   WebRTC's requestVideoFrameCallback runs off that grid, some 6–16 ms after
//   the frame went to the compositor. Printed beside `ready` for comparison
//   with earlier figures. (The callbacks' own `now` argument is the frame's
//   begin time, which can precede the picture's arrival: it gave flips before
//   their presses.)
//
// * probe (with --probe): the same on both paths — on every animation frame
//   the page samples the pixel it shows (the <video> on WebRTC, noVNC's
//   <canvas>), stamped with performance.now() in that animation frame. What a
//   person sees, give or take the display's refresh, and the figure that
//   compares the paths like for like. (On noVNC it is the step stamp; on
//   WebRTC an animation loop also runs in the page then, which slows its
//   video: see docs/performance.md.)
//
// With --busy-seconds, the page is then switched to its busy screen (a full
// repaint every frame, numbered in blocks at the top left) and every animation
// frame reads the number from the video or canvas: frames delivered are the
// distinct numbers seen, frames produced the span of the numbers.
// Prints one JSON line:
//   { path, samples_ms (ready), step_ms, probe_ms, missed, negative, unpaired, disconnects, fallbacks,
//     busy: { seconds, delivered, produced } }.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const o = { url: '', id: '', path: '', presses: 200, gapMin: 150, gapMax: 400, busySeconds: 0, token: '', raw: '', probe: false };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const v = () => argv[++i];
  const a = argv[i];
  if (a === '--url') o.url = v();
  else if (a === '--id') o.id = v();
  else if (a === '--path') o.path = v();
  else if (a === '--presses') o.presses = Number(v());
  else if (a === '--gap-min') o.gapMin = Number(v());
  else if (a === '--gap-max') o.gapMax = Number(v());
  else if (a === '--busy-seconds') o.busySeconds = Number(v());
  else if (a === '--token') o.token = v();
  else if (a === '--raw') o.raw = v();
  else if (a === '--probe') o.probe = true;
  else {
    console.error(`latency: unknown argument ${a}`);
    process.exit(2);
  }
}
if (!o.url || !o.id || !['webrtc', 'vnc'].includes(o.path)) {
  console.error('usage: node tests/e2e/latency.mjs --url URL --id SANDBOX --path webrtc|vnc [--presses N] [--gap-min MS] [--gap-max MS]');
  process.exit(2);
}
const log = (m) => console.error(`latency [${o.path}] ${m}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const FLIP_TIMEOUT_MS = 3000;

// Runs in the viewer page: stamps presses and flips.
function installProbe(likeForLike) {
  const probe = { presses: [], flips: [], ready: [], received: [], frames: [], phases: [], paths: [] };
  window.__probe = probe;
  addEventListener('keydown', () => probe.presses.push(performance.now()), { capture: true });
  const sampler = document.createElement('canvas');
  sampler.width = 1;
  sampler.height = 1;
  const ctx = sampler.getContext('2d', { willReadFrequently: true });
  const bright = (source, w, h) => {
    // A small square a third of the way in: the flip page is one colour.
    ctx.drawImage(source, Math.floor(w / 3), Math.floor(h / 3), 8, 8, 0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return (d[0] + d[1] + d[2]) / 3;
  };
  // One flip detector per stamp: each keeps the colour it saw last and adds
  // the stamp to its list when the colour turns.
  const detector = (list) => {
    let white = null;
    return (b, at) => {
      const now = b > 128 ? true : b < 60 ? false : white;
      const turned = white !== null && now !== white;
      if (turned) list.push(at);
      white = now;
      return turned;
    };
  };
  const step = detector(probe.flips);
  const ready = detector(probe.ready);
  const v = window.airlockViewer;
  if (v.path === 'webrtc') {
    const video = v.webrtc.video;
    // receiveTime: when the frame's last packet arrived (same clock).
    const onFrame = (_now, meta) => {
      if (video.videoWidth) {
        const b = bright(video, video.videoWidth, video.videoHeight);
        ready(b, meta.presentationTime);
        if (step(b, performance.now())) probe.received.push(meta.receiveTime);
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  } else {
    const canvas = () => document.querySelector('#screen canvas');
    // noVNC's display draws each update on a back buffer and copies it to the
    // visible canvas in flip() (queued behind images still decoding, and then
    // called again from its queue): sampled right after each copy. A private
    // method of noVNC 1.7 (web/package-lock.json pins it).
    const display = v.rfb._display;
    const flip = display.flip.bind(display);
    const copied = () => {
      const c = canvas();
      if (c && c.width) ready(bright(c, c.width, c.height), performance.now());
    };
    copied(); // the colour shown now: the next turn is the first flip
    display.flip = (fromQueue) => {
      flip(fromQueue);
      copied();
    };
    const tick = () => {
      const c = canvas();
      if (c && c.width) step(bright(c, c.width, c.height), performance.now());
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }
  if (likeForLike) {
    // The like-for-like probe: one loop for either path.
    const frame = detector(probe.frames);
    const shown = () => (v.path === 'webrtc' ? v.webrtc.video : document.querySelector('#screen canvas'));
    const tick = () => {
      const src = shown();
      const w = src ? src.videoWidth || src.width : 0;
      const h = src ? src.videoHeight || src.height : 0;
      if (w) frame(bright(src, w, h), performance.now());
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }
  // The busy screen's frame number: 16 blocks of 32 px, one pixel read in each.
  const strip = document.createElement('canvas');
  strip.width = 16;
  strip.height = 1;
  const sg = strip.getContext('2d', { willReadFrequently: true });
  sg.imageSmoothingEnabled = false;
  const source = () => (v.path === 'webrtc' ? v.webrtc.video : document.querySelector('#screen canvas'));
  const number = (src) => {
    sg.drawImage(src, 0, 8, 512, 16, 0, 0, 16, 1);
    const d = sg.getImageData(0, 0, 16, 1).data;
    let n = 0;
    for (let b = 0; b < 16; b++) n = (n << 1) | (d[b * 4] + d[b * 4 + 1] + d[b * 4 + 2] > 384 ? 1 : 0);
    return n;
  };
  probe.startBusy = () => {
    const seen = new Set();
    let first = null;
    let last = null;
    let on = true;
    const tick = () => {
      if (!on) return;
      const src = source();
      if (src && (src.videoWidth || src.width)) {
        const n = number(src);
        if (!seen.has(n)) {
          seen.add(n);
          if (first === null) first = n;
          last = n;
        }
      }
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
    probe.stopBusy = () => {
      on = false;
      return { delivered: seen.size, produced: first === null ? 0 : ((last - first + 65536) % 65536) + 1 };
    };
  };
  let lastPhase = v.phase;
  let lastPath = v.path;
  setInterval(() => {
    if (v.phase !== lastPhase) probe.phases.push(v.phase);
    if (v.path !== lastPath) probe.paths.push(v.path);
    lastPhase = v.phase;
    lastPath = v.path;
  }, 100);
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'airlock-latency-'));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--allow-loopback-in-peer-connection', '--disable-background-timer-throttling'],
    viewport: { width: 1280, height: 800 },
  });
  if (o.token) await context.addInitScript((t) => localStorage.setItem('airlock.token', t), o.token);
  try {
    const page = await context.newPage();
    page.on('console', (m) => log(`[viewer ${m.type()}] ${m.text()}`));
    await page.goto(`${o.url}/view/${o.id}?path=${o.path}`);
    const deadline = Date.now() + 60_000;
    for (;;) {
      const s = await page.evaluate(() => ({
        state: document.body.dataset.viewerState,
        path: window.airlockViewer ? window.airlockViewer.path : '',
        status: window.airlockViewer ? window.airlockViewer.status : 'loading',
      }));
      if (s.state === 'connected' && s.path === o.path) break;
      if (Date.now() > deadline) throw new Error(`the viewer did not connect over ${o.path}: ${s.status}`);
      await sleep(200);
    }
    await sleep(1500);
    await page.evaluate(installProbe, o.probe);
    const target = o.path === 'webrtc' ? page.locator('video.webrtc-video') : page.locator('#screen canvas');
    await target.click();
    await sleep(500);

    // One press: how long until each stamp saw the flip ({ step, ready }), or
    // null when nothing flipped in time. `ready` is null when that detector
    // did not count the same flips as `step` (not paired, so not a sample).
    const press = async () => {
      const before = await page.evaluate(() => [window.__probe.presses.length, window.__probe.flips.length, window.__probe.frames.length]);
      await page.keyboard.press('a');
      const until = Date.now() + FLIP_TIMEOUT_MS;
      for (;;) {
        const r = await page.evaluate(
          ([[p, f, fr], probing]) => {
            const pr = window.__probe;
            if (pr.flips.length <= f || pr.presses.length <= p) return null;
            if (probing && pr.frames.length <= fr) return null;
            const at = pr.presses[p];
            const step = pr.flips[pr.flips.length - 1] - at;
            const ready = pr.ready.length === pr.flips.length ? pr.ready[pr.ready.length - 1] - at : null;
            // The probe's own first turn after the press (its loop and the
            // step's callback may not count the same turns).
            const frame = probing ? pr.frames[fr] - at : null;
            return { step, ready, frame };
          },
          [before, o.probe],
        );
        if (r !== null) return r;
        if (Date.now() > until) return null;
        await sleep(5);
      }
    };
    // The page in the sandbox must take the keys: a few presses to be sure.
    let warm = 0;
    for (let i = 0; i < 5; i++) if ((await press()) !== null) warm++;
    if (warm < 3) throw new Error(`key presses do not flip the page (${warm}/5 flipped): no focus?`);
    log(`warm-up flipped ${warm}/5; ${o.presses} presses, gaps ${o.gapMin}–${o.gapMax} ms`);

    const samples = [];
    const steps = [];
    const probes = [];
    let missed = 0;
    let negative = 0;
    let unpaired = 0;
    for (let i = 0; i < o.presses; i++) {
      await sleep(o.gapMin + Math.random() * (o.gapMax - o.gapMin));
      const r = await press();
      if (r === null) missed++;
      else if (r.step < 0 || (r.ready !== null && r.ready < 0)) {
        const pr = await page.evaluate(() => ({ presses: window.__probe.presses.slice(-3), flips: window.__probe.flips.slice(-4), ready: window.__probe.ready.slice(-4) }));
        log(`a flip before its press (${r.step.toFixed(1)} / ${r.ready}): ${JSON.stringify(pr)}`);
        negative++;
      } else {
        steps.push(Math.round(r.step * 10) / 10);
        if (r.frame !== null && r.frame >= 0) probes.push(Math.round(r.frame * 10) / 10);
        if (r.ready === null) unpaired++;
        else samples.push(Math.round(r.ready * 10) / 10);
      }
      if ((i + 1) % 50 === 0) log(`${i + 1}/${o.presses}`);
    }
    if (o.path === 'webrtc') {
      log(`receiver: ${JSON.stringify(await page.evaluate(receiverStats))}`);
      // Each flip split where the browser's receive stamp allows: press → last
      // packet in (network, control plane, guest), last packet → ready (jitter
      // buffer, decode), ready → the rendering step.
      const split = await page.evaluate(() => {
        const p = window.__probe;
        const n = Math.min(p.presses.length, p.flips.length, p.ready.length, p.received.length);
        const net = [];
        const decoded = [];
        const step = [];
        for (let i = 0; i < n; i++) {
          if (typeof p.received[i] !== 'number') continue;
          net.push(p.received[i] - p.presses[i]);
          decoded.push(p.ready[i] - p.received[i]);
          step.push(p.flips[i] - p.ready[i]);
        }
        const med = (a) => (a.length ? a.sort((x, y) => x - y)[Math.floor(a.length / 2)].toFixed(1) : '-');
        return `p50s: press → last packet in ${med(net)} ms, → ready ${med(decoded)} ms, → rendering step ${med(step)} ms (${net.length} flips)`;
      });
      log(split);
    }
    if (o.raw) fs.writeFileSync(o.raw, JSON.stringify(await page.evaluate(() => ({ ...window.__probe, timeOrigin: performance.timeOrigin }))));
    let busy = null;
    if (o.busySeconds > 0) {
      await page.keyboard.press('b');
      await sleep(2000);
      await page.evaluate(() => window.__probe.startBusy());
      await sleep(o.busySeconds * 1000);
      busy = { seconds: o.busySeconds, ...(await page.evaluate(() => window.__probe.stopBusy())) };
      await page.keyboard.press('b');
      log(`busy screen: ${busy.delivered} of ${busy.produced} frames in ${busy.seconds} s`);
    }
    const end = await page.evaluate(() => ({
      phases: window.__probe.phases,
      paths: window.__probe.paths,
    }));
    console.log(
      JSON.stringify({
        path: o.path,
        samples_ms: samples,
        step_ms: steps,
        probe_ms: probes,
        missed,
        unpaired,
        negative,
        disconnects: end.phases.filter((p) => p !== 'connected').length,
        fallbacks: end.paths.length,
        busy,
      }),
    );
  } finally {
    await context.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// The browser's own account of the video it received (what it waited for,
// what it lost), and which candidate pair carries it: in the page.
async function receiverStats() {
  const v = window.airlockViewer.webrtc;
  if (!v || !v.pc) return null;
  const out = {};
  const report = await v.pc.getStats();
  const per = (total, count) => (count ? Math.round((total / count) * 1e4) / 10 : null);
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') {
      Object.assign(out, {
        frames_decoded: s.framesDecoded,
        frames_dropped: s.framesDropped,
        packets_lost: s.packetsLost,
        packets_received: s.packetsReceived,
        nacks: s.nackCount,
        plis: s.pliCount,
        freezes: s.freezeCount,
        jitter_buffer_ms: per(s.jitterBufferDelay, s.jitterBufferEmittedCount),
        decode_ms: per(s.totalDecodeTime, s.framesDecoded),
        processing_ms: per(s.totalProcessingDelay, s.framesDecoded),
        assembly_ms: per(s.totalAssemblyTime, s.framesAssembledFromMultiplePackets),
      });
    }
    if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
      const local = report.get(s.localCandidateId);
      out.pair = local ? `${local.protocol} ${local.candidateType}` : '?';
      out.rtt_ms = typeof s.currentRoundTripTime === 'number' ? s.currentRoundTripTime * 1000 : null;
    }
  });
  return out;
}

main().catch((e) => {
  console.error(`latency: ${e.stack || e.message}`);
  process.exit(1);
});
