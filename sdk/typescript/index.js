// airlock's API from JavaScript (types in index.d.ts): sandboxes, processes
// that stream (pipes or a PTY), and files. The one dependency is `ws`, the
// WebSocket client Node 20 lacks.

import WebSocket from "ws";

/** Every API route this SDK calls, as [method, path]; a test checks each
 * against the server's OpenAPI document so the two cannot drift apart. */
export const ROUTES = [
  ["post", "/api/v1/sandboxes"],
  ["get", "/api/v1/sandboxes"],
  ["get", "/api/v1/sandboxes/{id}"],
  ["delete", "/api/v1/sandboxes/{id}"],
  ["post", "/api/v1/sandboxes/{id}/processes"],
  ["get", "/api/v1/sandboxes/{id}/processes"],
  ["get", "/api/v1/sandboxes/{id}/processes/{pid}"],
  ["delete", "/api/v1/sandboxes/{id}/processes/{pid}"],
  ["get", "/api/v1/sandboxes/{id}/processes/{pid}/io"],
  ["put", "/api/v1/sandboxes/{id}/files"],
  ["get", "/api/v1/sandboxes/{id}/files"],
];

const STDOUT = 1;
const STDERR = 2;

/** A refusal from the API: its HTTP status and `error.code`. */
export class AirlockError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "AirlockError";
    this.status = status;
    this.code = code;
  }
}

export class Airlock {
  /** `url` and `token` default to AIRLOCK_URL and AIRLOCK_TOKEN. */
  constructor({ url, token } = {}) {
    this.url = (url ?? process.env.AIRLOCK_URL ?? "http://127.0.0.1:4000").replace(/\/+$/, "");
    this.token = token ?? process.env.AIRLOCK_TOKEN ?? null;
    this.sandboxes = new Sandboxes(this);
  }

  /** A handle on sandbox `id` (no request is made). */
  sandbox(id) {
    return new Sandbox(this, id);
  }

  headers(extra = {}) {
    return this.token ? { authorization: `Bearer ${this.token}`, ...extra } : extra;
  }

  async request(method, path, { json, body, raw = false } = {}) {
    const init = { method, headers: this.headers() };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["content-type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
      init.headers["content-type"] = "application/octet-stream";
    }
    const resp = await fetch(this.url + path, init);
    if (!resp.ok) {
      let code = "error";
      let message = `${resp.status} ${resp.statusText}`;
      try {
        const e = (await resp.json()).error;
        code = e.code;
        message = e.message;
      } catch {
        // not JSON: the status says it
      }
      throw new AirlockError(resp.status, code, message);
    }
    return raw ? resp : resp.json();
  }
}

class Sandboxes {
  constructor(client) {
    this.client = client;
  }

  /** Creates a sandbox and, unless `wait` is false, waits until it is ready. */
  async create({ kind = "workspace", wait = true, timeoutMs = 300_000 } = {}) {
    const info = await this.client.request("POST", "/api/v1/sandboxes", { json: { kind } });
    const sandbox = new Sandbox(this.client, info.id, info);
    if (wait) await sandbox.waitReady({ timeoutMs });
    return sandbox;
  }

  async list() {
    return (await this.client.request("GET", "/api/v1/sandboxes")).sandboxes;
  }

  async get(id) {
    const info = await this.client.request("GET", `/api/v1/sandboxes/${encodeURIComponent(id)}`);
    return new Sandbox(this.client, id, info);
  }
}

export class Sandbox {
  constructor(client, id, info = null) {
    this.client = client;
    this.id = id;
    this.info = info;
    this.path = `/api/v1/sandboxes/${encodeURIComponent(id)}`;
    this.processes = new Processes(this);
    this.files = new Files(this);
  }

  async refresh() {
    this.info = await this.client.request("GET", this.path);
    return this.info;
  }

  async waitReady({ timeoutMs = 300_000 } = {}) {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.refresh();
      if (info.state === "ready") return info;
      if (["failed", "stopping", "stopped"].includes(info.state)) {
        throw new AirlockError(409, "conflict", `sandbox ${this.id} is ${info.state}: ${info.failure_reason ?? ""}`);
      }
      if (Date.now() > until) throw new AirlockError(408, "timeout", `sandbox ${this.id} is still ${info.state}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }

  async delete() {
    return this.client.request("DELETE", this.path);
  }
}

class Processes {
  constructor(sandbox) {
    this.sandbox = sandbox;
    this.client = sandbox.client;
  }

  /** Starts a process; options: env, cwd, pty {cols, rows}, stdin, timeoutS. */
  async start(argv, { env = {}, cwd, pty, stdin = false, timeoutS } = {}) {
    return this.client.request("POST", `${this.sandbox.path}/processes`, {
      json: { argv, env, cwd: cwd ?? null, pty: pty ?? null, stdin, timeout_s: timeoutS ?? null },
    });
  }

  async list() {
    return (await this.client.request("GET", `${this.sandbox.path}/processes`)).processes;
  }

  async get(pid) {
    return this.client.request("GET", `${this.sandbox.path}/processes/${pid}`);
  }

  /** Signals the process group (KILL by default); answers how it stands. */
  async kill(pid, signal) {
    const q = signal ? `?signal=${encodeURIComponent(signal)}` : "";
    return this.client.request("DELETE", `${this.sandbox.path}/processes/${pid}${q}`);
  }

  /** Attaches to a running (or ended) process's io. */
  attach(pid, { offset = 0, onStdout, onStderr } = {}) {
    const url = `${this.client.url.replace(/^http/, "ws")}${this.sandbox.path}/processes/${pid}/io?offset=${offset}`;
    const ws = new WebSocket(url, { headers: this.client.headers() });
    return new ProcessHandle(pid, ws, onStdout, onStderr);
  }

  /** Runs `argv` to its end, streaming its output to the callbacks, and
   * answers {exitCode, signal, timedOut, stdout, stderr} (output as text). */
  async run(argv, { onStdout, onStderr, stdin, ...opts } = {}) {
    const info = await this.start(argv, { ...opts, stdin: stdin !== undefined });
    const out = [];
    const err = [];
    const handle = this.attach(info.pid, {
      onStdout: (b) => {
        out.push(b);
        onStdout?.(b);
      },
      onStderr: (b) => {
        err.push(b);
        onStderr?.(b);
      },
    });
    await handle.opened;
    if (stdin !== undefined) {
      await handle.write(stdin);
      await handle.eof();
    }
    const exit = await handle.exited;
    return {
      ...exit,
      stdout: Buffer.concat(out).toString("utf8"),
      stderr: Buffer.concat(err).toString("utf8"),
    };
  }
}

/** One attachment to a process: write stdin, resize, signal; `exited`
 * resolves with {exitCode, signal, timedOut} when the process ends. */
export class ProcessHandle {
  constructor(pid, ws, onStdout, onStderr) {
    this.pid = pid;
    this.ws = ws;
    this.opened = new Promise((resolve, reject) => {
      ws.once("open", resolve);
      ws.once("unexpected-response", (_req, res) =>
        reject(new AirlockError(res.statusCode, "refused", `the io socket was refused: ${res.statusCode}`)),
      );
      ws.once("error", reject);
    });
    this.exited = new Promise((resolve, reject) => {
      let exit = null;
      ws.on("message", (data, isBinary) => {
        if (isBinary) {
          const buf = Buffer.from(data);
          const chunk = buf.subarray(1);
          if (buf[0] === STDERR) onStderr?.(chunk);
          else if (buf[0] === STDOUT) onStdout?.(chunk);
          return;
        }
        const event = JSON.parse(data.toString());
        if (event.type === "exit") {
          exit = { exitCode: event.exit_code, signal: event.signal, timedOut: event.timed_out };
        }
      });
      ws.on("close", (code, reason) => {
        if (exit) resolve(exit);
        else reject(new AirlockError(502, "closed", `the io socket closed (${code} ${reason}) before the process ended`));
      });
      ws.on("error", reject);
    });
    // Attaching is the caller's; an unobserved failure must not crash Node.
    this.opened.catch(() => {});
    this.exited.catch(() => {});
  }

  send(data, binary) {
    return new Promise((resolve, reject) => this.ws.send(data, { binary }, (e) => (e ? reject(e) : resolve())));
  }

  /** Writes to stdin (or types into the PTY). */
  write(data) {
    return this.send(typeof data === "string" ? Buffer.from(data) : data, true);
  }

  resize(cols, rows) {
    return this.send(JSON.stringify({ type: "resize", cols, rows }), false);
  }

  signal(signal) {
    return this.send(JSON.stringify({ type: "signal", signal }), false);
  }

  eof() {
    return this.send(JSON.stringify({ type: "eof" }), false);
  }

  /** Detaches; the process goes on. */
  close() {
    this.ws.close();
  }
}

class Files {
  constructor(sandbox) {
    this.sandbox = sandbox;
    this.client = sandbox.client;
  }

  url(path) {
    return `${this.sandbox.path}/files?path=${encodeURIComponent(path)}`;
  }

  /** Writes a file (at most 64 MiB, else AirlockError 413) as the sandbox user; answers {path, size}. A path outside the home and /tmp is AirlockError 403. */
  async write(path, data) {
    return this.client.request("PUT", this.url(path), { body: typeof data === "string" ? Buffer.from(data) : data });
  }

  /** A file's bytes, or a directory as a tar archive (at most 1 GiB, else AirlockError 413). A path outside the home and /tmp is AirlockError 403. */
  async read(path) {
    const resp = await this.client.request("GET", this.url(path), { raw: true });
    return Buffer.from(await resp.arrayBuffer());
  }
}
