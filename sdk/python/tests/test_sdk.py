"""Against a real airlock: AIRLOCK_URL, AIRLOCK_TOKEN and AIRLOCK_SANDBOX (a
ready sandbox) are set by the Rust test that starts it
(crates/airlock-server/tests/clients.rs)."""

import json
import os
import sys
import unittest
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from airlock_sdk import ROUTES, Airlock, AirlockError  # noqa: E402

SANDBOX = os.environ.get("AIRLOCK_SANDBOX")
if not SANDBOX and os.environ.get("CI"):
    raise RuntimeError("CI must run the SDK tests: AIRLOCK_SANDBOX is not set")


@unittest.skipUnless(SANDBOX, "needs AIRLOCK_URL, AIRLOCK_TOKEN, AIRLOCK_SANDBOX")
class SdkTest(unittest.TestCase):
    def setUp(self):
        self.airlock = Airlock()
        self.sb = self.airlock.sandbox(SANDBOX)

    def test_routes_are_in_the_openapi_document(self):
        with urllib.request.urlopen(self.airlock.url + "/api/v1/openapi.json") as r:
            doc = json.load(r)
        for method, path in ROUTES:
            self.assertIn(method, doc["paths"].get(path, {}), f"{method.upper()} {path} is not in the OpenAPI document")

    def test_run_streams_and_answers_the_exit(self):
        seen = []
        r = self.sb.processes.run(["sh", "-c", "echo one; echo two >&2; exit 3"], on_stdout=seen.append)
        self.assertEqual(r.exit_code, 3)
        self.assertEqual(r.stdout, "one\n")
        self.assertEqual(r.stderr, "two\n")
        self.assertEqual(b"".join(seen), b"one\n")
        echoed = self.sb.processes.run(["cat"], stdin="through stdin")
        self.assertEqual((echoed.exit_code, echoed.stdout), (0, "through stdin"))

    def test_a_pty_resizes_and_stops_on_ctrl_c(self):
        p = self.sb.processes.start(["sh", "-c", "read x; stty size; exec sleep 60"], pty=(80, 24))
        out = []
        h = self.sb.processes.attach(p["pid"], on_stdout=out.append)
        h.resize(120, 40)
        h.write("\r")
        while b"40 120" not in b"".join(out):
            kind, payload = h.ws.recv()
            if kind == "binary":
                out.append(payload[1:])
        h.write("\x03")
        exit = h.wait()
        self.assertEqual(exit["signal"], 2)

    def test_files_round_trip_and_refusals(self):
        data = os.urandom(1 << 20)
        self.assertEqual(self.sb.files.write("sdk-py.bin", data)["size"], len(data))
        self.assertEqual(self.sb.files.read("sdk-py.bin"), data)
        with self.assertRaises(AirlockError) as e:
            self.sb.files.write("/etc/escape", b"x")
        self.assertEqual(e.exception.status, 403)
        with self.assertRaises(AirlockError) as e:
            self.airlock.sandbox("no-such").processes.list()
        self.assertEqual(e.exception.status, 404)


if __name__ == "__main__":
    unittest.main()
