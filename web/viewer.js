// Full-window viewer of one sandbox's desktop. It tries the WebRTC path first
// (an H.264 video from the control plane, see webrtc.js); without a picture
// within 3 s, or when that path fails later, it switches to noVNC over the
// control plane's WebSocket relay by itself and says so in the badge.
// `?path=webrtc` or `?path=vnc` (or the stored preference 'airlock.viewer-path')
// forces one path.
//
// Each WebSocket URL carries a single-use ticket fetched just before it is
// opened (POST /api/v1/sandboxes/{id}/tickets), never the API token.
//
// We open the WebSocket ourselves and hand it to noVNC, because noVNC reports
// only "clean or not" when a connection ends, and the relay's close code is
// what tells us whether trying again makes sense (see docs/ui.md).

import RFB from '/novnc/core/rfb.js';
import { ApiError, getSandbox, getToken, setToken, shareSecret, streamUrl, vncUrl } from '/api.js';
import { ViewerFiles } from '/files.js';
import { ViewerShare } from '/share.js';
import { WebRtcView, isPasteShortcut } from '/webrtc.js';
import { getKeysym } from '/novnc/core/input/util.js';
import { VncStats } from '/vncstats.js';
import { ViewerClipboard } from '/clipboard.js';

// Close codes the relay uses. `final` ones stop the reconnect loop.
const CLOSE_CODES = {
  4401: { final: true, token: true, text: 'Not authorized: the API token is missing or was refused.' },
  4404: { final: true, text: 'There is no such sandbox, or it is not yours.' },
  4410: { final: true, text: 'The sandbox is gone or stopping.' },
  4409: { final: false, text: 'sandbox not ready yet' },
  4408: { final: false, text: 'viewer fell behind and was dropped' },
  4502: { final: false, text: 'sandbox display unreachable' },
  4503: { final: false, text: 'WebRTC is off on this server' },
  4504: { final: false, text: 'the media connection failed' },
  1011: { final: false, text: 'relay error' },
};

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const MAX_BACKOFF_MS = 10000;
// A connection that stayed up this long counts as a success: the next drop
// starts the backoff from the beginning again.
const STABLE_MS = 5000;
// How long after connecting (or a window resize) the remote display must have
// followed the window before we give up on resizing and scale instead.
const RESIZE_GRACE_MS = 2500;

const $ = (id) => document.getElementById(id);
const screen = $('screen');
const badge = $('status');
const badgeText = $('status-text');
const statusLive = $('status-live');
const overlay = $('overlay');
const overlayTitle = $('overlay-title');
const overlayText = $('overlay-text');
const overlayToken = $('overlay-token');
const overlayTokenInput = $('overlay-token-input');
const overlayRetry = $('overlay-retry');

const id = sandboxIdFromPath(location.pathname);
const clipboard = new ViewerClipboard();
// A share link's holder (no account): noVNC only, no owner controls; the
// server drops its input unless the owner granted it (relay/readonly.rs).
const SHARED = Boolean(shareSecret());
const files = SHARED || !id ? null : new ViewerFiles(id, screen);
const sharing = SHARED || !id ? null : new ViewerShare(id);
if (SHARED) {
  document.body.dataset.shared = 'true';
  $('clipboard-button').hidden = true;
  $('shared-badge').hidden = false;
  CLOSE_CODES[4401] = { final: true, text: 'This share link is not valid any more (revoked, expired, or mistyped).' };
  CLOSE_CODES[4410] = { final: true, text: 'The shared view ended.' };
}

// Which path to use: 'webrtc' or 'vnc' when forced, else null (WebRTC first).
const FORCED_PATH = forcedPath();
// How big the remote display is: 'fit' (the window, in CSS pixels: the
// desktop's text at its usual size), 'device' (the window in device pixels:
// sharp on a high-density screen, smaller text; WebRTC only) or a fixed
// {width, height}. `?size=fit|device|1280x800` or localStorage
// 'airlock.viewer-size'.
const SIZE_MODE = sizeMode();
// The guest's bounds (airlock_proto::stream::{MIN_DISPLAY, MAX_DISPLAY}).
const MIN_SIZE = [640, 480];
const MAX_SIZE = [3840, 2160];
// A window being dragged to a new size is followed once it rests this long.
const FIT_SETTLE_MS = 300;
let fitTimer = 0;
// A WebRTC viewer without a picture by then gives way to noVNC.
const WEBRTC_GRACE_MS = 3000;
// A shared view starts on noVNC (view-only in the page too) unless
// `?path=webrtc` asks otherwise; the server gates input on both.
let path = FORCED_PATH === 'vnc' || (SHARED && FORCED_PATH !== 'webrtc') ? 'vnc' : 'webrtc';
let fallbackWhy = '';
let view = null; // the WebRtcView while the WebRTC path is in use
let vncStats = null; // the VncStats while the noVNC path is in use

let rfb = null;
let rfbLive = false; // whether `rfb` still needs a disconnect()
let generation = 0;
let phase = 'connecting'; // connecting | connected | reconnecting | disconnected
let status = 'connecting';
let attempt = 0;
let connectedAt = 0;
let lastClose = null;
let retryTimer = 0;
let countdownTimer = 0;
let resizeTimer = 0;
let scaledFallback = false;

window.airlockViewer = {
  id,
  /** connecting | connected | disconnected (reconnect waits count as connecting) */
  get state() {
    return document.body.dataset.viewerState;
  },
  /** connecting | connected | reconnecting | disconnected */
  get phase() {
    return phase;
  },
  /** the badge's words */
  get status() {
    return status;
  },
  get rfb() {
    return rfb;
  },
  /** 'webrtc' or 'vnc': the path in use (or being tried) */
  get path() {
    return path;
  },
  /** why the viewer left WebRTC for noVNC, or '' */
  get fallbackReason() {
    return fallbackWhy;
  },
  /** the WebRTC view (its video, stats and input) while that path is in use */
  get webrtc() {
    return view;
  },
  /** the noVNC path's figures (stats, latency) while that path is in use */
  get vnc() {
    return vncStats;
  },
  /** { code, reason } of the last WebSocket close, or null */
  get lastClose() {
    return lastClose;
  },
  /** true on a share link's page */
  get shared() {
    return SHARED;
  },
  /** the owner's Files panel (web/files.js), null on a shared view */
  get files() {
    return files;
  },
  /** the owner's Share panel (web/share.js), null on a shared view */
  get sharing() {
    return sharing;
  },
  /** the clipboard: { remote, sent, error, send(text) } (web/clipboard.js) */
  get clipboard() {
    return clipboard;
  },
  /** 'fit', 'device' or { width, height }: what the display is asked to be */
  get sizeMode() {
    return SIZE_MODE;
  },
  /** true once the server refused to follow the window size and we scale instead */
  get scaled() {
    return scaledFallback;
  },
  reconnect() {
    attempt = 0;
    connect();
  },
};

function sizeMode() {
  const asked = new URLSearchParams(location.search).get('size') || localStorage.getItem('airlock.viewer-size') || 'fit';
  const m = /^(\d{3,4})x(\d{3,4})$/.exec(asked);
  if (m) return { width: Number(m[1]), height: Number(m[2]) };
  return asked === 'device' ? 'device' : 'fit';
}

/** The display size this window wants, within the guest's bounds, even. */
function wantedSize() {
  let w;
  let h;
  if (typeof SIZE_MODE === 'object') {
    ({ width: w, height: h } = SIZE_MODE);
  } else {
    const ratio = SIZE_MODE === 'device' ? window.devicePixelRatio || 1 : 1;
    w = Math.floor(screen.clientWidth * ratio);
    h = Math.floor(screen.clientHeight * ratio);
  }
  const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v)) & ~1;
  return { width: clamp(w, MIN_SIZE[0], MAX_SIZE[0]), height: clamp(h, MIN_SIZE[1], MAX_SIZE[1]) };
}

/** On WebRTC, ask the guest for the wanted size when the display differs. */
function fitWebRtc() {
  clearTimeout(fitTimer);
  const v = view;
  if (!v || path !== 'webrtc' || phase !== 'connected') return;
  const want = wantedSize();
  if (v.display.width === want.width && v.display.height === want.height) return;
  if (v.sendResize(want.width, want.height)) {
    console.info(`airlock viewer: asking for a ${want.width}x${want.height} display (was ${v.display.width}x${v.display.height})`);
  } else {
    // The input channel opens a moment after the first picture.
    fitTimer = setTimeout(fitWebRtc, 250);
  }
}

function forcedPath() {
  const asked = new URLSearchParams(location.search).get('path') || localStorage.getItem('airlock.viewer-path');
  return asked === 'webrtc' || asked === 'vnc' ? asked : null;
}

function connect() {
  if (path === 'webrtc') connectWebRtc();
  else connectVnc();
}

function closeViews() {
  clipboard.attach(null);
  if (rfb && rfbLive) rfb.disconnect();
  rfb = null;
  rfbLive = false;
  if (view) view.close();
  view = null;
  if (vncStats) vncStats.close();
  vncStats = null;
}

/** The badge of a connected path: its name, then the session's figures. */
function connectedBadge(name, s) {
  const parts = [name];
  if (s.fps) parts.push(`${s.fps} fps`);
  if (s.kbps) parts.push(s.kbps >= 1000 ? `${(s.kbps / 1000).toFixed(1)} Mbit/s` : `${s.kbps} kbit/s`);
  if (typeof s.rttMs === 'number') parts.push(`rtt ${s.rttMs} ms`);
  if (typeof s.inputMs === 'number') parts.push(`input ≈${Math.round(s.inputMs)} ms`);
  return `connected · ${parts.join(' · ')}`;
}

function webrtcBadge(s) {
  return connectedBadge('WebRTC', s);
}

function vncBadge(s) {
  return connectedBadge(fallbackWhy ? `noVNC (WebRTC: ${fallbackWhy})` : 'noVNC', s);
}

function connectWebRtc() {
  clearTimers();
  overlay.hidden = true;
  const gen = ++generation;
  closeViews();
  if (!id) {
    stop('This address names no sandbox.');
    return;
  }
  setPhase('connecting', attempt > 0 ? `connecting over WebRTC (attempt ${attempt + 1})` : 'connecting over WebRTC');
  // A fresh ticket for each start: tickets are single-use.
  const v = new WebRtcView(screen, () => streamUrl(id));
  view = v;
  const grace = setTimeout(() => v.fail(`no picture within ${WEBRTC_GRACE_MS / 1000} s`), WEBRTC_GRACE_MS);
  v.onplaying = () => {
    clearTimeout(grace);
    if (gen !== generation) return;
    connectedAt = Date.now();
    setPhase('connected', webrtcBadge(v.stats));
    clipboard.attach((text) => v.sendClipboard(text));
    v.video.focus();
    fitWebRtc();
  };
  v.onstats = (s) => {
    if (gen === generation && phase === 'connected') setPhase('connected', webrtcBadge(s));
  };
  v.onclipboard = (text) => clipboard.fromSandbox(text);
  v.onclipboarderror = (message) => clipboard.say(message, true);
  v.onpaste = (text) => clipboard.send(text);
  v.onfailed = (reason, code) => {
    clearTimeout(grace);
    if (gen !== generation) return;
    if (view === v) view = null;
    const known = CLOSE_CODES[code];
    if (known && known.final) {
      generation++;
      stop(known.text + (reason ? ` (${reason})` : ''), { token: known.token });
      return;
    }
    if (FORCED_PATH === 'webrtc') {
      socketClosed(gen, code || 1006, reason);
      return;
    }
    console.info(`airlock viewer: WebRTC gave way to noVNC: ${reason}`);
    fallbackWhy = reason;
    path = 'vnc';
    attempt = 0;
    connectVnc();
  };
  v.start();
}

function sandboxIdFromPath(path) {
  const m = /^\/view\/([^/]+)\/?$/.exec(path);
  return m ? decodeURIComponent(m[1]) : '';
}

function setPhase(next, text) {
  if (next !== phase || next === 'disconnected') {
    statusLive.textContent = next === 'reconnecting' ? 'connection lost, reconnecting' : text;
  }
  phase = next;
  status = text;
  badge.dataset.phase = next;
  badge.dataset.path = path;
  if (badgeText.textContent !== text) badgeText.textContent = text;
  document.body.dataset.viewerState = next === 'reconnecting' ? 'connecting' : next;
  document.body.dataset.viewerPhase = next;
}

function clearTimers() {
  clearTimeout(retryTimer);
  clearInterval(countdownTimer);
  clearTimeout(resizeTimer);
}

async function connectVnc() {
  clearTimers();
  overlay.hidden = true;
  const gen = ++generation;
  closeViews();
  if (!id) {
    stop('This address names no sandbox.');
    return;
  }

  setPhase('connecting', attempt > 0 ? `connecting over noVNC (attempt ${attempt + 1})` : 'connecting over noVNC');

  // Each connect and reconnect takes a fresh single-use ticket; a refused one
  // counts like the relay's own refusal (4401: a token is needed, 4404: not
  // yours), anything else like a dropped connection.
  let url;
  try {
    url = await vncUrl(id);
  } catch (err) {
    if (gen !== generation) return;
    const code = err instanceof ApiError && err.status === 401 ? 4401
      : err instanceof ApiError && (err.status === 403 || err.status === 404) ? 4404
      : 1006;
    socketClosed(gen, code, `no viewer ticket: ${err.message}`);
    return;
  }
  if (gen !== generation) return;

  let socket;
  try {
    socket = new WebSocket(url);
  } catch (err) {
    stop(`The browser refused to open the connection: ${err.message}`);
    return;
  }
  // Registered before noVNC attaches its own handlers, so we see the close
  // code first.
  socket.addEventListener('close', (ev) => {
    if (gen === generation) socketClosed(gen, ev.code, ev.reason);
  });

  let session;
  try {
    session = new RFB(screen, socket, { shared: true });
  } catch (err) {
    socket.close();
    stop(`The viewer could not start: ${err.message}`);
    return;
  }
  rfb = session;
  rfbLive = true;
  const figures = new VncStats(session, socket, screen);
  vncStats = figures;
  figures.onstats = (s) => {
    if (gen === generation && phase === 'connected') setPhase('connected', vncBadge(s));
  };
  session.addEventListener('disconnect', () => {
    if (rfb === session) rfbLive = false;
  });
  // A fixed size is not asked of the display on this path (noVNC asks only
  // for the window's size); the picture is scaled into the window instead.
  const fixed = typeof SIZE_MODE === 'object';
  session.scaleViewport = fixed;
  session.resizeSession = !fixed;
  session.focusOnClick = true;
  session.background = '#282828';
  // A shared view sends no input (the relay would drop it anyway).
  if (SHARED) {
    session.viewOnly = true;
    session.resizeSession = false;
    session.scaleViewport = true;
  }
  scaledFallback = false;

  // RFB's cut text both ways; the relay passes it, Xvnc keeps it on the
  // display's selections (its -MaxCutText is the same 1 MiB bound).
  session.addEventListener('clipboard', (ev) => {
    if (gen === generation && ev.detail && !SHARED) clipboard.fromSandbox(ev.detail.text);
  });

  session.addEventListener('connect', () => {
    if (gen !== generation) return;
    connectedAt = Date.now();
    if (!SHARED) clipboard.attach((text) => session.clipboardPasteFrom(text));
    setPhase('connected', vncBadge(figures.stats));
    if (!SHARED) checkResizeLater();
  });

  session.addEventListener('disconnect', () => {
    if (gen !== generation) return;
    // The socket's close event decides what happens next. If noVNC gave up on
    // its own (a protocol error), the socket closes right after; make sure a
    // stuck close handshake cannot leave us waiting forever.
    setTimeout(() => {
      if (gen === generation && socket.readyState !== WebSocket.CLOSED) socketClosed(gen, 1006, 'viewer error');
    }, 3000);
  });

  // The relay offers security type None and authenticates to the guest itself,
  // so a password prompt means something is misconfigured: never ask the user.
  session.addEventListener('credentialsrequired', () => {
    if (gen !== generation) return;
    generation++;
    if (rfbLive) session.disconnect();
    stop('The display asked for a password. The relay should never do that; the server needs fixing.');
  });

  session.addEventListener('securityfailure', (ev) => {
    if (gen !== generation) return;
    generation++;
    const reason = (ev.detail && ev.detail.reason) || 'no reason given';
    stop(`The display refused the connection: ${reason}.`);
  });

  session.addEventListener('desktopname', (ev) => {
    const name = ev.detail && ev.detail.name;
    if (name) document.title = `${name} · airlock`;
  });
}

async function socketClosed(gen, code, reason) {
  generation++;
  gen = generation;
  clearTimeout(resizeTimer);
  if (connectedAt && Date.now() - connectedAt >= STABLE_MS) attempt = 0;
  connectedAt = 0;
  lastClose = { code, reason };

  const known = CLOSE_CODES[code];
  if (known && known.final) {
    stop(known.text + (reason ? ` (${reason})` : ''), { token: known.token });
    return;
  }

  setPhase('reconnecting', 'reconnecting');
  // The browser shows a refused WebSocket handshake only as code 1006, so ask
  // the API whether there is still something to connect to before retrying.
  const verdict = await checkSandbox();
  if (gen !== generation) return;
  if (verdict.final) {
    stop(verdict.text, { token: verdict.token });
    return;
  }
  const why = verdict.text || (known && known.text) || reason || `connection closed (${code})`;
  scheduleRetry(why);
}

async function checkSandbox() {
  // A share's holder has no token to ask the API with: keep retrying.
  if (SHARED) return { final: false, text: '' };
  try {
    const sb = await getSandbox(id);
    if (sb.state === 'stopping' || sb.state === 'stopped') {
      return { final: true, text: `The sandbox is ${sb.state}.` };
    }
    if (sb.state === 'failed') {
      return { final: true, text: `The sandbox failed: ${sb.failure_reason || 'the server gave no reason'}.` };
    }
    return { final: false, text: sb.state === 'ready' ? '' : `sandbox ${sb.state}` };
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      return { final: true, token: true, text: CLOSE_CODES[4401].text };
    }
    if (err instanceof ApiError && (err.status === 403 || err.status === 404)) {
      return { final: true, text: `${CLOSE_CODES[4404].text} (${err.message})` };
    }
    return { final: false, text: '' };
  }
}

function scheduleRetry(why) {
  const base = attempt < BACKOFF_MS.length ? BACKOFF_MS[attempt] : MAX_BACKOFF_MS;
  const delay = Math.round(base * (0.8 + Math.random() * 0.4));
  attempt += 1;
  const due = Date.now() + delay;
  const tick = () => {
    const left = Math.max(1, Math.ceil((due - Date.now()) / 1000));
    setPhase('reconnecting', `reconnecting in ${left} s (${why})`);
  };
  tick();
  countdownTimer = setInterval(tick, 250);
  retryTimer = setTimeout(connect, delay);
}

function stop(text, { token = false } = {}) {
  clearTimers();
  generation++;
  if (vncStats) vncStats.close();
  vncStats = null;
  setPhase('disconnected', `disconnected: ${text}`);
  overlayTitle.textContent = 'Disconnected';
  overlayText.textContent = text;
  overlayToken.hidden = !token;
  if (token) overlayTokenInput.value = getToken();
  overlay.hidden = false;
  (token ? overlayTokenInput : overlayRetry).focus();
}

function retryFromOverlay() {
  if (!overlayToken.hidden) setToken(overlayTokenInput.value.trim());
  attempt = 0;
  connect();
}

overlayRetry.addEventListener('click', retryFromOverlay);
overlayToken.addEventListener('submit', (ev) => {
  ev.preventDefault();
  retryFromOverlay();
});

// resizeSession asks the server to make its display match the window. A
// server that cannot (or will not) leaves the sizes apart; then scale the
// picture to the window instead, which always works.
function checkResizeLater() {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (!rfb || path !== 'vnc' || phase !== 'connected' || rfb.scaleViewport) return;
    const canvas = screen.querySelector('canvas');
    if (!canvas) return;
    const w = screen.clientWidth;
    const h = screen.clientHeight;
    if (canvas.width !== w || canvas.height !== h) {
      scaledFallback = true;
      rfb.scaleViewport = true;
      console.info(`airlock viewer: display stayed ${canvas.width}x${canvas.height} for a ${w}x${h} window; scaling instead`);
    }
  }, RESIZE_GRACE_MS);
}

window.addEventListener('resize', checkResizeLater);
window.addEventListener('resize', () => {
  clearTimeout(fitTimer);
  fitTimer = setTimeout(fitWebRtc, FIT_SETTLE_MS);
});

// Ctrl+V (or Shift+Insert) on the noVNC path: noVNC would send the key at
// once and cancel the browser's paste event; instead the key waits for that
// event, which sends this computer's clipboard (ClientCutText) first. The
// modifier is already down in the guest; only the V (or Insert) is held, and
// its release never reaches noVNC, which ignores a release it saw no press of.
let vncPaste = null; // { keysym, code, timer }
function vncPasteKey() {
  if (!vncPaste) return;
  const { keysym, code, timer } = vncPaste;
  vncPaste = null;
  clearTimeout(timer);
  if (rfb && rfbLive) {
    rfb.sendKey(keysym, code, true);
    rfb.sendKey(keysym, code, false);
  }
}
window.addEventListener('keydown', (ev) => {
  if (path !== 'vnc' || !rfb || !screen.contains(document.activeElement)) return;
  if (!isPasteShortcut(ev)) return;
  ev.stopPropagation(); // noVNC never sees it; the default (paste) stays
  if (!vncPaste) vncPaste = { keysym: getKeysym(ev), code: ev.code, timer: setTimeout(vncPasteKey, 150) };
}, true);
window.addEventListener('paste', (ev) => {
  if (!vncPaste) return;
  ev.preventDefault();
  const text = ev.clipboardData && ev.clipboardData.getData('text/plain');
  if (text) clipboard.send(text);
  vncPasteKey();
}, true);

connect();
