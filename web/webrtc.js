// The viewer's fast path: the desktop as a WebRTC video from the control
// plane, input back over data channels (each message on a reliable one and
// on one without retransmissions, numbered; the first copy wins). The server is
// ICE-lite and puts all of its candidates in the answer, so there is no
// trickle: one offer, one answer (see docs/webrtc.md).
//
// A WebRtcView reports through callbacks:
//   onplaying()            the first frame is on screen
//   onfailed(reason, code) the path is gone (the viewer falls back to noVNC)
//   onstats(stats)         once a second: { fps, kbps, rttMs, inputMs, frames, width, height }
//   onclipboard(text)      text copied in the sandbox
//   onclipboarderror(msg)  the server refused the text sent for the clipboard
//   onpaste(text)          Ctrl+V / Shift+Insert in the video with this text:
//                          returns whether it went (sendClipboard), before the key
//
// Input-to-photon is estimated while in use (latency.js), each picture taken as
// shown when the decoded frame was handed to the compositor. Samples go to the
// server's metrics; the badge shows their median.

import { getKeysym } from '/novnc/core/input/util.js';
import { InputLatency } from '/latency.js';

const STATS_EVERY_MS = 1000;
// Clipboard text goes in parts of at most this many characters (4 bytes of
// UTF-8 each at most: 16 KiB, the server's bound for one part).
const CLIPBOARD_PART_CHARS = 4096;
// How long a paste shortcut waits for the browser's paste event before the
// key goes without it.
const PASTE_WAIT_MS = 150;
// Between an input's fast copy and its reliable one.
const COPY_GAP_MS = 4;

// The close code a failed ticket request stands for: the viewer treats a
// refused ticket like the relay's own refusal.
function ticketCloseCode(err) {
  if (err && err.status === 401) return 4401;
  if (err && (err.status === 403 || err.status === 404)) return 4404;
  return undefined;
}

/** Ctrl+V, Ctrl+Shift+V or Shift+Insert: the keys that paste in the guest. */
export function isPasteShortcut(ev) {
  const v = ev.key === 'v' || ev.key === 'V';
  return (ev.ctrlKey && !ev.altKey && !ev.metaKey && v) || (ev.shiftKey && !ev.ctrlKey && ev.key === 'Insert');
}

export class WebRtcView {
  // `url`: the signalling socket's URL, or a function giving a promise of
  // it (a fresh single-use ticket for each start).
  constructor(container, url) {
    this.container = container;
    this.url = url;
    this.onplaying = () => {};
    this.onfailed = () => {};
    this.onstats = () => {};
    this.onclipboard = () => {};
    this.onclipboarderror = () => {};
    this.onpaste = () => false;
    this.closed = false;
    this.playing = false;
    this.display = { width: 0, height: 0 };
    this.stats = { fps: 0, kbps: 0, rttMs: null, inputMs: null, frames: 0, width: 0, height: 0 };
    this.latency = new InputLatency(
      () => (this.video.videoWidth ? this.video : null),
      (ms, median) => {
        this.stats.inputMs = median;
        this.sample(ms);
      },
    );
    this.buttons = 0;
    this.lastBytes = 0;
    this.lastStatsAt = 0;
    this.listeners = [];

    const video = document.createElement('video');
    video.className = 'webrtc-video';
    video.autoplay = true;
    video.muted = true;
    video.playsInline = true;
    video.tabIndex = 0;
    video.disablePictureInPicture = true;
    video.setAttribute('aria-label', 'Remote desktop (WebRTC)');
    this.video = video;
  }

  async start() {
    let url;
    try {
      url = typeof this.url === 'function' ? await this.url() : this.url;
    } catch (err) {
      this.fail(`no viewer ticket: ${err.message}`, ticketCloseCode(err));
      return;
    }
    if (this.closed) return;
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (err) {
      this.fail(`the browser refused the signalling socket: ${err.message}`);
      return;
    }
    this.socket = socket;
    const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle' });
    this.pc = pc;
    const transceiver = pc.addTransceiver('video', { direction: 'recvonly' });
    // Show each frame as soon as it is decoded: no jitter buffer to speak of.
    const receiver = transceiver.receiver;
    if ('playoutDelayHint' in receiver) receiver.playoutDelayHint = 0;
    if ('jitterBufferTarget' in receiver) receiver.jitterBufferTarget = 0;
    // Every input goes twice, numbered: on a reliable, ordered channel, and on
    // one that never retransmits, so a lost packet does not cost the SCTP
    // retransmission timeout; the server applies the first copy of each, in order.
    this.channel = pc.createDataChannel('input', { ordered: true });
    this.fastChannel = pc.createDataChannel('input-fast', { ordered: false, maxRetransmits: 0 });
    this.inputSeq = 0;

    pc.addEventListener('track', (ev) => {
      this.video.srcObject = ev.streams[0] || new MediaStream([ev.track]);
    });
    pc.addEventListener('connectionstatechange', () => {
      if (pc.connectionState === 'failed') this.fail('the media connection failed');
      if (pc.connectionState === 'disconnected') this.fail('the media connection was lost');
    });
    socket.addEventListener('open', async () => {
      try {
        const offer = await pc.createOffer();
        await pc.setLocalDescription(offer);
        socket.send(JSON.stringify({ type: 'offer', sdp: pc.localDescription.sdp }));
      } catch (err) {
        this.fail(`could not make an offer: ${err.message}`);
      }
    });
    socket.addEventListener('message', (ev) => this.signal(ev.data));
    socket.addEventListener('close', (ev) => {
      this.fail(ev.reason || `signalling closed (${ev.code})`, ev.code);
    });

    this.video.addEventListener('loadeddata', () => {
      if (this.closed || this.playing) return;
      this.playing = true;
      this.onplaying();
    });
    this.container.appendChild(this.video);
    this.bindInput();
    this.watchLatency();
    this.statsTimer = setInterval(() => this.collectStats(), STATS_EVERY_MS);
  }

  async signal(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg.type === 'answer') {
      try {
        await this.pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
      } catch (err) {
        this.fail(`the server's answer was refused: ${err.message}`);
      }
    } else if (msg.type === 'info') {
      this.display = { width: msg.width, height: msg.height };
    } else if (msg.type === 'stats') {
      if (typeof msg.rtt_ms === 'number') this.stats.rttMs = msg.rtt_ms;
    } else if (msg.type === 'cursor') {
      this.showCursor(msg);
    } else if (msg.type === 'clipboard') {
      this.onclipboard(msg.text);
    } else if (msg.type === 'clipboard_error') {
      this.onclipboarderror(msg.message);
    }
  }

  /** The guest's pointer picture as this page's pointer over the video (the
   *  video carries none, so the pointer moves without the stream's latency). */
  showCursor(c) {
    if (!c.width || !c.height) {
      this.video.style.cursor = 'none';
      return;
    }
    let bytes;
    try {
      bytes = Uint8ClampedArray.from(atob(c.rgba), (ch) => ch.charCodeAt(0));
    } catch {
      return;
    }
    if (bytes.length !== c.width * c.height * 4) return;
    const canvas = document.createElement('canvas');
    canvas.width = c.width;
    canvas.height = c.height;
    canvas.getContext('2d').putImageData(new ImageData(bytes, c.width, c.height), 0, 0);
    this.video.style.cursor = `url(${canvas.toDataURL()}) ${c.xhot} ${c.yhot}, default`;
  }

  /** Report one measured input-to-photon sample to the server's metrics. */
  sample(ms) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ type: 'sample', input_to_photon_ms: ms }));
    }
  }

  send(control) {
    if (!this.inputReady) return;
    this.inputSeq += 1;
    const msg = JSON.stringify({ seq: this.inputSeq, input: control });
    if (this.fastChannel.readyState === 'open') this.fastChannel.send(msg);
    // The reliable copy a moment later, so the two do not share a packet (and
    // its fate). Equal timeouts run in order: the reliable channel's order is
    // the order of the calls.
    setTimeout(() => {
      if (this.channel.readyState === 'open') this.channel.send(msg);
    }, COPY_GAP_MS);
  }

  /** Text for the sandbox's clipboard: numbered parts on the reliable channel
   *  only (a part is too large to be worth a second copy), in order with the
   *  keys, so a Ctrl+V sent after it pastes it. */
  sendClipboard(text) {
    if (!this.inputReady) return false;
    const chars = [...text];
    let at = 0;
    do {
      const part = chars.slice(at, at + CLIPBOARD_PART_CHARS).join('');
      at += CLIPBOARD_PART_CHARS;
      this.inputSeq += 1;
      const msg = JSON.stringify({ seq: this.inputSeq, clipboard: { text: part, more: at < chars.length } });
      // Behind any fast-and-reliable input sent just before: same delay.
      setTimeout(() => {
        if (this.channel.readyState === 'open') this.channel.send(msg);
      }, COPY_GAP_MS);
    } while (at < chars.length);
    return true;
  }

  /** Ask the guest to make its display this size (display pixels). */
  sendResize(width, height) {
    if (!this.inputReady) return false;
    this.send({ type: 'resize', width, height });
    return true;
  }

  get inputReady() {
    return !!this.channel && this.channel.readyState === 'open';
  }

  // Display pixel under a pointer event (the video is letterboxed by CSS).
  toDisplay(ev) {
    const r = this.video.getBoundingClientRect();
    const w = this.display.width || this.video.videoWidth;
    const h = this.display.height || this.video.videoHeight;
    if (!w || !h || !r.width || !r.height) return null;
    const scale = Math.min(r.width / w, r.height / h);
    const offX = (r.width - w * scale) / 2;
    const offY = (r.height - h * scale) / 2;
    const x = Math.round((ev.clientX - r.left - offX) / scale);
    const y = Math.round((ev.clientY - r.top - offY) / scale);
    return { x: Math.max(0, Math.min(w - 1, x)), y: Math.max(0, Math.min(h - 1, y)) };
  }

  bindInput() {
    const v = this.video;
    const on = (target, type, fn, opts) => {
      target.addEventListener(type, fn, opts);
      this.listeners.push(() => target.removeEventListener(type, fn, opts));
    };
    // RFB's mask: bit 0 left, 1 middle, 2 right; DOM buttons: 1 left, 2 right, 4 middle.
    const mask = (b) => (b & 1) | ((b & 4) >> 1) | ((b & 2) << 1);
    const pointer = (ev) => {
      const p = this.toDisplay(ev);
      if (!p) return;
      this.buttons = mask(ev.buttons);
      this.send({ type: 'pointer', x: p.x, y: p.y, buttons: this.buttons });
    };
    on(v, 'pointermove', pointer);
    on(v, 'pointerdown', (ev) => {
      v.focus();
      v.setPointerCapture(ev.pointerId);
      pointer(ev);
      ev.preventDefault();
    });
    on(v, 'pointerup', (ev) => {
      pointer(ev);
      ev.preventDefault();
    });
    on(v, 'contextmenu', (ev) => ev.preventDefault());
    let wheelRest = 0;
    on(v, 'wheel', (ev) => {
      ev.preventDefault();
      wheelRest += ev.deltaMode === 0 ? ev.deltaY / 50 : ev.deltaY;
      const notches = Math.trunc(wheelRest);
      if (notches !== 0) {
        wheelRest -= notches;
        this.send({ type: 'wheel', dx: 0, dy: Math.max(-100, Math.min(100, notches)) });
      }
    }, { passive: false });
    // A paste shortcut is held until the browser's paste event (which only
    // comes when the key's default action is left alone) has sent this
    // computer's clipboard; keys that follow wait behind it.
    let held = null; // { keys: [[keysym, down]], timer }
    const flush = () => {
      if (!held) return;
      clearTimeout(held.timer);
      const keys = held.keys;
      held = null;
      for (const [keysym, down] of keys) this.send({ type: 'key', keysym, down });
    };
    const key = (down) => (ev) => {
      const keysym = getKeysym(ev);
      if (!keysym) return;
      if (down && !held && isPasteShortcut(ev)) {
        held = { keys: [[keysym, down]], timer: setTimeout(flush, PASTE_WAIT_MS) };
        return;
      }
      ev.preventDefault();
      if (held) {
        held.keys.push([keysym, down]);
        return;
      }
      const at = performance.now();
      this.send({ type: 'key', keysym, down });
      // After the send: the estimate's thumbnail must not hold the key back.
      if (down) this.latency.pressed(at);
    };
    on(v, 'keydown', key(true));
    on(v, 'keyup', key(false));
    on(v, 'paste', (ev) => {
      ev.preventDefault();
      const text = ev.clipboardData && ev.clipboardData.getData('text/plain');
      if (text) this.onpaste(text);
      flush();
    });
  }

  watchLatency() {
    const v = this.video;
    if (!('requestVideoFrameCallback' in v)) return;
    const onFrame = (_now, meta) => {
      if (this.closed) return;
      // When the decoded frame was handed to the compositor, as the latency
      // bench stamps its `ready` figure (docs/performance.md). The callback's
      // `now` is the frame's begin time, which can come before the frame did.
      this.latency.shown(meta.presentationTime);
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
  }

  async collectStats() {
    if (!this.pc || this.closed) return;
    let report;
    try {
      report = await this.pc.getStats();
    } catch {
      return;
    }
    const now = performance.now();
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        if (this.lastStatsAt) {
          const secs = (now - this.lastStatsAt) / 1000;
          this.stats.kbps = Math.round(((s.bytesReceived - this.lastBytes) * 8) / 1000 / secs);
        }
        this.lastBytes = s.bytesReceived;
        this.stats.fps = Math.round(s.framesPerSecond || 0);
        this.stats.frames = s.framesDecoded || 0;
        this.stats.width = s.frameWidth || 0;
        this.stats.height = s.frameHeight || 0;
      }
      if (s.type === 'candidate-pair' && s.nominated && typeof s.currentRoundTripTime === 'number') {
        this.stats.rttMs = Math.round(s.currentRoundTripTime * 1000 * 10) / 10;
      }
    });
    this.lastStatsAt = now;
    this.onstats({ ...this.stats });
  }

  fail(reason, code) {
    if (this.closed) return;
    this.close();
    this.onfailed(reason, code);
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.statsTimer);
    for (const off of this.listeners) off();
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
    if (this.pc) this.pc.close();
    this.video.remove();
  }
}
