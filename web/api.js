// Talks to the control plane's JSON API under /api/v1.
//
// Every call sends the stored bearer token, if any, and turns a non-2xx answer
// into an ApiError carrying the server's own {"error":{"code","message"}} words,
// so the pages can show them as they are.

export const TOKEN_KEY = 'airlock.token';

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || '';
  } catch {
    // Storage can be disabled (privacy settings); then we simply have no token.
    return '';
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Nothing to do: without storage the token lives only as long as the page.
  }
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }

  get unauthorized() {
    return this.status === 401;
  }
}

export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }

  let res;
  try {
    res = await fetch(`/api/v1${path}`, init);
  } catch {
    throw new ApiError(0, 'unreachable', 'The airlock server could not be reached.');
  }

  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }

  if (!res.ok) {
    const err = data && typeof data === 'object' ? data.error : null;
    const code = (err && err.code) || `http_${res.status}`;
    const message = (err && err.message) || describeStatus(res.status, res.statusText);
    throw new ApiError(res.status, code, message);
  }
  return data;
}

function describeStatus(status, statusText) {
  if (status === 401) return 'A valid API token is needed.';
  if (status === 403) return 'This token may not do that.';
  if (status === 404) return 'Not found.';
  if (status === 503) return 'The server has no capacity right now.';
  return `The server answered ${status}${statusText ? ` ${statusText}` : ''}.`;
}

const sandboxPath = (id) => `/sandboxes/${encodeURIComponent(id)}`;

export async function listSandboxes() {
  const data = await api('GET', '/sandboxes');
  return Array.isArray(data && data.sandboxes) ? data.sandboxes : [];
}

export const getSandbox = (id) => api('GET', sandboxPath(id));
// A workspace may carry a name (its home is kept under it across rebuilds).
export const createSandbox = (kind, name) =>
  api('POST', '/sandboxes', name ? { kind, name } : { kind });
export const deleteSandbox = (id) => api('DELETE', sandboxPath(id));
export const execInSandbox = (id, argv, timeoutS = 10) =>
  api('POST', `${sandboxPath(id)}/exec`, { argv, timeout_s: timeoutS });

/** A single-use ticket for one viewer WebSocket of this sandbox (good for 60 s). */
export const createTicket = (id) => api('POST', `${sandboxPath(id)}/tickets`);

// The WebSocket URL of a sandbox's display, with a fresh ticket. Browsers
// cannot set headers on a WebSocket, and the long-lived API token must never
// sit in a URL (logs, history), so each connect and reconnect asks for a
// short-lived, single-use ticket first. Throws the API's error (401: a token is
// needed; 404: no such sandbox, or not yours).
async function socketUrl(id, what) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const base = `${scheme}//${location.host}/api/v1${sandboxPath(id)}/${what}`;
  const share = shareSecret();
  if (share) return `${base}?share=${encodeURIComponent(share)}`;
  const { ticket } = await createTicket(id);
  return `${base}?ticket=${encodeURIComponent(ticket)}`;
}

/**
 * The secret of a share link (`/view/{id}#share=vs_…`), or ''. It sits in the
 * fragment, which browsers never send, and goes only on the viewer sockets.
 */
export function shareSecret() {
  return new URLSearchParams(location.hash.slice(1)).get('share') || '';
}

/** The noVNC path: RFB over the relay's WebSocket (a promise of its URL). */
export function vncUrl(id) {
  return socketUrl(id, 'vnc');
}

/** The WebRTC path's signalling WebSocket (a promise of its URL). */
export function streamUrl(id) {
  return socketUrl(id, 'stream');
}
