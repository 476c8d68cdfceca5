// Files between this computer and the sandbox, for the sandbox's owner only
// (a shared view gets none of this):
//   - drop a file onto the viewer: it goes to ~/Downloads in the sandbox
//     (made when missing; ~ when it cannot be), through PUT /files, with
//     progress;
//   - the Files panel lists ~/Downloads (where the sandbox's Chromium saves)
//     and offers each file to this browser, through GET /files.
// Both calls carry the API token in the Authorization header, never in a URL:
// a download is fetched into memory and handed over as a blob. The limits are
// the files API's own (64 MiB up); a bigger file is refused here before a
// byte is sent, and the server's own words are shown for anything it refuses.

import { ApiError, execInSandbox, getToken } from '/api.js';

export const MAX_UPLOAD_BYTES = 64 * 1024 * 1024;
const $ = (id) => document.getElementById(id);

function filesUrl(id, path) {
  return `/api/v1/sandboxes/${encodeURIComponent(id)}/files?path=${encodeURIComponent(path)}`;
}

function authHeaders() {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function errorOf(status, text) {
  try {
    const e = JSON.parse(text).error;
    if (e && e.message) return new ApiError(status, e.code || `http_${status}`, e.message);
  } catch {
    // not the API's JSON
  }
  return new ApiError(status, `http_${status}`, `The server answered ${status}.`);
}

/** PUT one file; `onprogress(sent, total)` as it goes. Resolves {path, size}. */
export function uploadFile(id, path, file, onprogress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('PUT', filesUrl(id, path));
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.upload.onprogress = (ev) => onprogress && onprogress(ev.loaded, ev.total || file.size);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch {
          resolve({ path, size: file.size });
        }
      } else {
        reject(errorOf(xhr.status, xhr.responseText));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, 'unreachable', 'The upload broke off: the server could not be reached.'));
    xhr.send(file);
  });
}

// A name the files API takes as one path segment in ~/Downloads.
function safeName(name) {
  const base = String(name).split(/[\\/]/).pop().replace(/[\u0000-\u001f]/g, '').trim();
  return base && base !== '.' && base !== '..' ? base : 'upload';
}

/** The files in ~/Downloads: [{ name, size, mtime }], newest first. */
export async function listDownloads(id) {
  const script = 'cd "$HOME/Downloads" 2>/dev/null || exit 0; '
    + 'find . -maxdepth 1 -type f ! -name ".*" ! -name "*.crdownload" -printf "%s\\t%T@\\t%f\\n"';
  const out = await execInSandbox(id, ['sh', '-c', script], 10);
  if (out.exit_code !== 0) throw new ApiError(0, 'list_failed', (out.stderr || 'could not list ~/Downloads').trim());
  return out.stdout.split('\n').filter(Boolean).map((line) => {
    const [size, mtime, ...rest] = line.split('\t');
    return { name: rest.join('\t'), size: Number(size), mtime: Number(mtime) };
  }).sort((a, b) => b.mtime - a.mtime);
}

/** Fetch a file of the sandbox and offer it to this browser as a download. */
export async function downloadFile(id, path, name) {
  let res;
  try {
    res = await fetch(filesUrl(id, path), { headers: authHeaders(), cache: 'no-store' });
  } catch {
    throw new ApiError(0, 'unreachable', 'The airlock server could not be reached.');
  }
  if (!res.ok) throw errorOf(res.status, await res.text());
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return blob.size;
}

function human(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

export class ViewerFiles {
  constructor(id, dropTarget) {
    this.id = id;
    this.button = $('files-button');
    this.panel = $('files-panel');
    this.list = $('files-list');
    this.note = $('files-note');
    this.refreshButton = $('files-refresh');
    // What the last upload did: { name, path, size } or { name, error }.
    this.last = null;
    this.uploading = 0;
    this.button.hidden = false;
    this.button.addEventListener('click', () => this.toggle());
    this.refreshButton.addEventListener('click', () => this.refresh());
    this.panel.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') this.toggle(false);
    });
    const over = (ev) => {
      if (!ev.dataTransfer || ![...ev.dataTransfer.types].includes('Files')) return;
      ev.preventDefault();
      ev.dataTransfer.dropEffect = 'copy';
      document.body.dataset.dropping = 'true';
    };
    dropTarget.addEventListener('dragenter', over, true);
    dropTarget.addEventListener('dragover', over, true);
    dropTarget.addEventListener('dragleave', () => delete document.body.dataset.dropping, true);
    dropTarget.addEventListener('drop', (ev) => {
      delete document.body.dataset.dropping;
      if (!ev.dataTransfer || !ev.dataTransfer.files.length) return;
      ev.preventDefault();
      ev.stopPropagation();
      this.uploadAll([...ev.dataTransfer.files]);
    }, true);
  }

  toggle(open = this.panel.hidden) {
    this.panel.hidden = !open;
    this.button.setAttribute('aria-expanded', String(open));
    if (open) this.refresh();
  }

  say(text, error = false) {
    this.note.textContent = text;
    this.note.dataset.error = String(error);
  }

  async uploadAll(files) {
    this.toggle(true);
    for (const file of files) await this.upload(file);
    this.refresh();
  }

  /** Upload one file to ~/Downloads (or ~ when that does not exist). */
  async upload(file) {
    const name = safeName(file.name);
    if (file.size > MAX_UPLOAD_BYTES) {
      this.last = { name, error: `${name} is ${human(file.size)}; at most ${human(MAX_UPLOAD_BYTES)} may be uploaded` };
      this.say(this.last.error, true);
      return this.last;
    }
    this.uploading++;
    const progress = (sent, total) => {
      const pct = total ? Math.floor((sent / total) * 100) : 0;
      this.say(`Uploading ${name}: ${pct}% of ${human(total)}`);
    };
    try {
      let done;
      try {
        done = await uploadFile(this.id, `Downloads/${name}`, file, progress);
      } catch (err) {
        // No ~/Downloads yet (the sandbox's Chromium makes it on its first
        // download): make it, or, when that fails, the home it is.
        if (!(err instanceof ApiError && err.status === 404)) throw err;
        const made = await execInSandbox(this.id, ['sh', '-c', 'mkdir -p -- "$HOME/Downloads"'], 10).catch(() => null);
        done = await uploadFile(this.id, made && made.exit_code === 0 ? `Downloads/${name}` : name, file, progress);
      }
      this.last = { name, path: done.path, size: done.size };
      this.say(`Uploaded ${name} to ${done.path} (${human(done.size)}).`);
    } catch (err) {
      this.last = { name, error: err.message };
      this.say(`Could not upload ${name}: ${err.message}`, true);
    } finally {
      this.uploading--;
    }
    return this.last;
  }

  async refresh() {
    let files;
    try {
      files = await listDownloads(this.id);
    } catch (err) {
      this.say(`Could not list ~/Downloads: ${err.message}`, true);
      return;
    }
    this.list.replaceChildren(...files.map((f) => {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'link';
      b.textContent = f.name;
      b.title = `Download ${f.name} to this computer`;
      b.addEventListener('click', async () => {
        this.say(`Downloading ${f.name}…`);
        try {
          const size = await downloadFile(this.id, `Downloads/${f.name}`, f.name);
          this.say(`Downloaded ${f.name} (${human(size)}).`);
        } catch (err) {
          this.say(`Could not download ${f.name}: ${err.message}`, true);
        }
      });
      const size = document.createElement('span');
      size.className = 'size';
      size.textContent = human(f.size);
      li.append(b, ' ', size);
      return li;
    }));
    if (!files.length && !this.uploading) this.say('Nothing in ~/Downloads yet. Drop a file onto the desktop to upload it there.');
  }
}
