// The noVNC path's figures, as the WebRTC path has them: frame updates a
// second, bitrate, and input-to-photon (latency.js), each picture taken as
// shown when noVNC copied an update to its visible canvas. Samples go to the
// server's metrics as text messages on the RFB socket, which the relay reads
// (RFB itself is binary; docs/webrtc.md).
//
// noVNC has no event for a drawn update, so its display's flip() is wrapped: a
// private method of noVNC 1.7 (web/package-lock.json pins it). Without it the
// badge shows the bitrate alone.
//
// A VncStats reports through onstats(stats), once a second:
//   { fps, kbps, inputMs }

import { InputLatency } from '/latency.js';

const STATS_EVERY_MS = 1000;

export class VncStats {
  /** `rfb`: the noVNC session; `socket`: its WebSocket; `screen`: the element
   *  holding noVNC's canvas. */
  constructor(rfb, socket, screen) {
    this.onstats = () => {};
    this.stats = { fps: 0, kbps: 0, inputMs: null };
    this.bytes = 0;
    this.updates = 0;
    this.lastAt = performance.now();
    this.listeners = [];
    const canvas = () => {
      const c = screen.querySelector('canvas');
      return c && c.width ? c : null;
    };
    this.latency = new InputLatency(canvas, (ms, median) => {
      this.stats.inputMs = median;
      if (socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: 'sample', input_to_photon_ms: ms }));
      }
    });
    const on = (target, type, fn, opts) => {
      target.addEventListener(type, fn, opts);
      this.listeners.push(() => target.removeEventListener(type, fn, opts));
    };
    on(socket, 'message', (ev) => {
      this.bytes += ev.data.byteLength || ev.data.length || 0;
    });
    // Every key noVNC sends goes through its (public) sendKey: the estimate's
    // thumbnail is taken once the key is out, so it never holds the key back.
    const sendKey = rfb.sendKey.bind(rfb);
    rfb.sendKey = (keysym, code, down) => {
      const at = performance.now();
      sendKey(keysym, code, down);
      if (down) this.latency.pressed(at);
    };
    const display = rfb._display;
    if (display && typeof display.flip === 'function') {
      const flip = display.flip.bind(display);
      // Called once at the end of each update, and again from noVNC's queue
      // when images were still decoding; only the latter copy is drawn then.
      display.flip = (fromQueue) => {
        flip(fromQueue);
        if (!fromQueue) this.updates++;
        const at = performance.now();
        queueMicrotask(() => this.latency.shown(at));
      };
    }
    this.timer = setInterval(() => this.collect(), STATS_EVERY_MS);
  }

  collect() {
    const now = performance.now();
    const secs = (now - this.lastAt) / 1000;
    if (secs <= 0) return;
    this.stats.fps = Math.round(this.updates / secs);
    this.stats.kbps = Math.round((this.bytes * 8) / 1000 / secs);
    this.updates = 0;
    this.bytes = 0;
    this.lastAt = now;
    this.onstats({ ...this.stats });
  }

  close() {
    clearInterval(this.timer);
    for (const off of this.listeners) off();
    this.listeners = [];
  }
}
