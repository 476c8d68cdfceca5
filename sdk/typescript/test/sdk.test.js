// Against a real airlock: AIRLOCK_URL, AIRLOCK_TOKEN and AIRLOCK_SANDBOX (a
// ready sandbox) are set by the Rust test that starts it
// (crates/airlock-server/tests/clients.rs).

import { test } from "node:test";
import assert from "node:assert/strict";
import { Airlock, AirlockError, ROUTES } from "../index.js";

const id = process.env.AIRLOCK_SANDBOX;
if (!id && process.env.CI) throw new Error("CI must run the SDK tests: AIRLOCK_SANDBOX is not set");
const skip = !id && "needs AIRLOCK_URL, AIRLOCK_TOKEN, AIRLOCK_SANDBOX";
const airlock = new Airlock();

test("every route the SDK calls is in the OpenAPI document", { skip }, async () => {
  const doc = await (await fetch(`${airlock.url}/api/v1/openapi.json`)).json();
  for (const [method, path] of ROUTES) {
    assert.ok(doc.paths[path]?.[method], `${method.toUpperCase()} ${path} is not in the OpenAPI document`);
  }
});

test("run streams output and answers the exit", { skip }, async () => {
  const sb = airlock.sandbox(id);
  const chunks = [];
  const r = await sb.processes.run(["sh", "-c", "echo one; echo two >&2; exit 3"], {
    onStdout: (b) => chunks.push(b.toString()),
  });
  assert.equal(r.exitCode, 3);
  assert.equal(r.stdout, "one\n");
  assert.equal(r.stderr, "two\n");
  assert.equal(chunks.join(""), "one\n");
  const echoed = await sb.processes.run(["cat"], { stdin: "through stdin" });
  assert.equal(echoed.stdout, "through stdin");
  assert.equal(echoed.exitCode, 0);
});

test("a PTY resizes", { skip }, async () => {
  const sb = airlock.sandbox(id);
  const p = await sb.processes.start(["sh", "-c", "read x; stty size"], { pty: { cols: 80, rows: 24 } });
  let out = "";
  const h = sb.processes.attach(p.pid, { onStdout: (b) => (out += b.toString()) });
  await h.opened;
  await h.resize(100, 30);
  await h.write("\r");
  const exit = await h.exited;
  assert.equal(exit.exitCode, 0);
  assert.match(out, /30 100/);
  const listed = await sb.processes.list();
  assert.ok(listed.some((x) => x.pid === p.pid && x.state === "exited"));
});

test("files round trip, and refusals are errors", { skip }, async () => {
  const sb = airlock.sandbox(id);
  const data = Buffer.alloc(1 << 20, 7);
  const w = await sb.files.write("sdk-ts.bin", data);
  assert.equal(w.size, data.length);
  assert.deepEqual(await sb.files.read("sdk-ts.bin"), data);
  await assert.rejects(sb.files.write("../escape", "x"), (e) => e instanceof AirlockError && e.status === 403);
  await assert.rejects(airlock.sandbox("no-such").processes.list(), (e) => e.status === 404);
});
