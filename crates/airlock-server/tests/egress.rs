//! Egress end to end, with real parts only: the real control plane and nspawn
//! sandboxes, a real squid (Debian's package) with basic authentication on
//! loopback as the users' upstream, and a real origin (HTTP, HTTPS and a UDP
//! "resolver") in a network namespace this test makes. Nothing else is
//! contacted. Addresses: sandboxes 10.233.1.0/24, origin 10.233.200.0/24.

mod common;

use common::{leftovers, unmet};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ORIGIN: &str = "10.233.200.2";
/// Squid leaves from this address for the first account port, from
/// `EXIT_B` for the second: two ports, two exit IPs, as with a provider.
const EXIT_A: &str = "10.233.200.1";
const EXIT_B: &str = "10.233.200.3";
const ACCOUNT_USER: &str = "acct";
const ACCOUNT_PASS: &str = "acct-pass-7f3a";

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The origin's network namespace and servers; removed on drop.
struct Origin {
    netns: String,
    veth: String,
    server: Child,
    dir: PathBuf,
}

const ORIGIN_PY: &str = r#"
import http.server, socketserver, ssl, sys, threading, socket
d = sys.argv[1]
log = open(d + "/origin.log", "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log.write("%s %s %s %s\n" % (self.client_address[0], self.command, self.path, self.headers.get("User-Agent", "-").replace(" ", "_")))
        body = (self.client_address[0] if self.path == "/ip" else ("{}" if self.path.startswith("/-/ping") else "hello from origin")).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
plain = S(("0.0.0.0", 80), H)
tls = S(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(d + "/cert.pem", d + "/key.pem")
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 53))
def resolver():
    while True:
        data, peer = udp.recvfrom(2048)
        open(d + "/udp.log", "a").write("%s %d\n" % (peer[0], len(data)))
for t in (plain.serve_forever, tls.serve_forever, resolver):
    threading.Thread(target=t, daemon=True).start()
open(d + "/ready", "w").write("1")
threading.Event().wait()
"#;

impl Origin {
    fn start(dir: &Path) -> Origin {
        let tag = std::process::id() % 100_000;
        let netns = format!("egress-origin-{tag}");
        let veth = format!("egto{tag}");
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {netns} && ip link add {veth} type veth peer name eth0 netns {netns} \
             && sysctl -qw net.ipv6.conf.{veth}.disable_ipv6=1 \
             && ip netns exec {netns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
             && ip addr add {EXIT_A}/24 dev {veth} && ip addr add {EXIT_B}/24 dev {veth} \
             && ip link set {veth} up && ip -n {netns} link set lo up \
             && ip -n {netns} addr add {ORIGIN}/24 dev eth0 && ip -n {netns} link set eth0 up"
        ));
        // Count every packet that reaches the origin, whatever its way in.
        sh(&format!(
            "ip netns exec {netns} nft 'add table ip count; \
             add chain ip count in {{ type filter hook input priority 0; }}; \
             add rule ip count in meta l4proto {{ tcp, udp, icmp }} counter'"
        ));
        sh(&format!(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN={ORIGIN} \
             -keyout {0}/key.pem -out {0}/cert.pem 2>/dev/null",
            dir.display()
        ));
        std::fs::write(dir.join("origin.py"), ORIGIN_PY).expect("write origin");
        let server = Command::new("ip")
            .args(["netns", "exec", &netns, "python3"])
            .arg(dir.join("origin.py"))
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("origin.err")).expect("err file"))
            .spawn()
            .expect("origin server");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !dir.join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "origin did not start: {}",
                std::fs::read_to_string(dir.join("origin.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Origin {
            netns,
            veth,
            server,
            dir: dir.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("origin.log")).unwrap_or_default()
    }

    fn udp_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("udp.log")).unwrap_or_default()
    }

    /// Packets (TCP, UDP, ICMP) that reached the origin's namespace so far.
    fn packets_in(&self) -> u64 {
        let out = sh(&format!(
            "ip netns exec {} nft list chain ip count in",
            self.netns
        ));
        out.split("packets ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("counter")
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Squid on loopback with basic auth: the two account ports (leaving from
/// two addresses) and the users in `passwd`.
struct Squid {
    child: Child,
    dir: PathBuf,
}

impl Squid {
    fn start(dir: &Path, ports: (u16, u16), users: &[(&str, &str)]) -> Squid {
        let dir = dir.join("squid");
        std::fs::create_dir_all(&dir).expect("squid dir");
        let mut passwd = String::new();
        for (user, pass) in users {
            let hash = sh(&format!("openssl passwd -apr1 '{pass}'"));
            passwd.push_str(&format!("{user}:{}\n", hash.trim()));
        }
        std::fs::write(dir.join("passwd"), passwd).expect("passwd");
        let d = dir.display();
        let conf = format!(
            "http_port 127.0.0.1:{p1} name=p1\n\
             http_port 127.0.0.1:{p2} name=p2\n\
             pid_filename none\n\
             cache deny all\n\
             logformat airlock %>lp %un %rm %ru %>Hs\n\
             access_log stdio:{d}/access.log airlock\n\
             cache_log {d}/cache.log\n\
             coredump_dir {d}\n\
             auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n\
             auth_param basic realm airlock-test\n\
             acl authed proxy_auth REQUIRED\n\
             http_access deny !authed\n\
             http_access allow authed\n\
             http_access deny all\n\
             acl on_p1 myportname p1\n\
             acl on_p2 myportname p2\n\
             tcp_outgoing_address {EXIT_A} on_p1\n\
             tcp_outgoing_address {EXIT_B} on_p2\n\
             shutdown_lifetime 1 seconds\n\
             dns_nameservers 127.0.0.1\n",
            p1 = ports.0,
            p2 = ports.1,
        );
        std::fs::write(dir.join("squid.conf"), conf).expect("conf");
        sh(&format!("chmod -R a+rwX {d}"));
        let child = Command::new("squid")
            .args(["-N", "-f"])
            .arg(dir.join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr"))
            .spawn()
            .expect("squid (apt-get install squid)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", ports.1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "squid did not start: {}",
                std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Squid { child, dir }
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two consecutive free loopback ports.
fn port_pair() -> (u16, u16) {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = a.local_addr().expect("addr").port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return (p, p + 1);
        }
    }
    panic!("no two consecutive free ports");
}

async fn exec_as(
    h: &common::Harness,
    token: Option<&str>,
    id: &str,
    script: &str,
    env: Value,
) -> Value {
    let (status, body) = h
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            token,
            Some(json!({ "argv": ["bash", "-lc", script], "env": env, "timeout_s": 60 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn egress_of(h: &common::Harness, token: Option<&str>, id: &str) -> Value {
    let (status, body) = h
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/sandboxes/{id}/egress"),
            token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every process's command line and environment on the host (sandboxes'
/// processes included), for a search.
fn all_process_text() -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
        {
            for f in ["cmdline", "environ"] {
                if let Ok(b) = std::fs::read(entry.path().join(f)) {
                    out.extend(b);
                }
            }
        }
    }
    out
}

/// Files under `dir` whose bytes contain `needle`, skipping overlay mounts.
/// Whether `path` holds `needle`, reading only the parts of the file that
/// hold data: a sandbox's writable layer and home are sparse filesystem
/// images of gigabytes, nearly all holes.
fn file_contains(path: &Path, needle: &str) -> bool {
    use rustix::fs::{seek, SeekFrom};
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let needle = needle.as_bytes();
    if needle.is_empty() {
        return true;
    }
    let mut pos = 0u64;
    // The data extent starting at or after `pos`, until the next hole.
    while let Ok(start) = seek(&file, SeekFrom::Data(pos)) {
        let Ok(end) = seek(&file, SeekFrom::Hole(start)) else {
            return false;
        };
        if seek(&file, SeekFrom::Start(start)).is_err() {
            return false;
        }
        let mut left = end - start;
        let mut window: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        while left > 0 {
            let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let Ok(n) = file.read(&mut chunk[..want]) else {
                return false;
            };
            if n == 0 {
                break;
            }
            left -= n as u64;
            // Keep the tail of the last chunk so a needle across two is found.
            let keep = window.len().min(needle.len().saturating_sub(1));
            window.drain(..window.len() - keep);
            window.extend_from_slice(&chunk[..n]);
            if window.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        pos = end;
    }
    false
}

fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if e.file_name() != "merged" && e.file_name() != "work" {
                    stack.push(path);
                }
            } else if ft.is_file() && file_contains(&path, needle) {
                hits.push(path);
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_leaves_through_the_users_upstream() {
    if unmet().is_some() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("airlock-egress-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    // Squid drops to its own user: it must reach its directory.
    sh(&format!("chmod 755 {}", tmp.path().display()));
    let canary = format!("canary{}", hex_id());
    let origin = Origin::start(tmp.path());
    let (p1, p2) = port_pair();
    let mut squid = Squid::start(
        tmp.path(),
        (p1, p2),
        &[(ACCOUNT_USER, ACCOUNT_PASS), ("canaryuser", &canary)],
    );
    let h = common::start("10.233.1.0/24").await;
    let app = h.running.as_ref().expect("running").app.clone();
    let mut seen = String::new();

    // The admin sets the provider account; the token-less local user may not.
    let admin = h.admin_token().await;
    let (status, _) = h
        .call(reqwest::Method::GET, "/api/v1/egress/account", None, None)
        .await;
    assert_eq!(status, 403, "local is no admin");
    let (status, body) = h
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/account",
            Some(&admin),
            Some(
                json!({ "host": "127.0.0.1", "username": ACCOUNT_USER, "password": ACCOUNT_PASS,
                     "port_min": p1, "port_max": p2 }),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["masked"],
        format!("http://acct:***@127.0.0.1:{{{p1}-{p2}}}")
    );
    let (status, body) = h
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/settings",
            Some(&admin),
            Some(json!({ "echo_url": format!("http://{ORIGIN}/ip"), "upstream_timeout_s": 3 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, bob_token) = app.add_user("bob").await.expect("bob");
    let bob = Some(bob_token.as_str());
    // Bob is not the admin.
    let (status, _) = h
        .call(reqwest::Method::GET, "/api/v1/egress/account", bob, None)
        .await;
    assert_eq!(status, 403);

    // Two users' sandboxes at the same time.
    let (s, a) = h
        .call(
            reqwest::Method::POST,
            "/api/v1/sandboxes",
            None,
            Some(json!({"kind": "browser"})),
        )
        .await;
    assert_eq!(s, 201, "{a}");
    let (s, b) = h
        .call(
            reqwest::Method::POST,
            "/api/v1/sandboxes",
            bob,
            Some(json!({"kind": "browser"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (a, b) = (
        a["id"].as_str().expect("id").to_owned(),
        b["id"].as_str().expect("id").to_owned(),
    );
    h.wait_state(&a, "ready", Duration::from_secs(150)).await;
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let (_, body) = h
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/sandboxes/{b}"),
                bob,
                None,
            )
            .await;
        match body["state"].as_str() {
            Some("ready") => break,
            Some("failed") => panic!("bob's sandbox failed: {body}"),
            _ => assert!(Instant::now() < deadline, "bob's sandbox not ready: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // curl (HTTP, and HTTPS through CONNECT) reaches the origin, from
    // each user's own port and exit address.
    let out = exec_as(
        &h,
        None,
        &a,
        &format!(
            "curl -sS -m 20 http://{ORIGIN}/a-http && curl -sS -k -m 20 https://{ORIGIN}/a-https"
        ),
        json!({}),
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert!(
        out["stdout"]
            .as_str()
            .unwrap_or("")
            .starts_with("hello from origin\nhello from origin\n"),
        "{out}"
    );
    // npm (the image's own) honours the same proxy variables; the origin
    // answers its registry ping.
    let out = exec_as(
        &h,
        None,
        &a,
        &format!("npm ping --registry http://{ORIGIN}/ --fetch-timeout 20000 2>&1"),
        json!({}),
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let out = exec_as(
        &h,
        bob,
        &b,
        &format!("curl -sS -m 20 http://{ORIGIN}/b-http"),
        json!({}),
    )
    .await;
    assert_eq!(out["stdout"], "hello from origin\n", "{out}");
    let log = squid.access_log();
    assert!(
        log.contains(&format!("{p1} acct GET http://{ORIGIN}/a-http 200")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{p1} acct CONNECT {ORIGIN}:443 200")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{p2} acct GET http://{ORIGIN}/b-http 200")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{p1} acct GET http://{ORIGIN}/-/ping")),
        "npm's request through this user's upstream: {log}"
    );
    let olog = origin.log();
    assert!(olog.contains(&format!("{EXIT_A} GET /-/ping")), "{olog}");
    assert!(olog.contains(&format!("{EXIT_A} GET /a-http")), "{olog}");
    assert!(olog.contains(&format!("{EXIT_A} GET /a-https")), "{olog}");
    assert!(olog.contains(&format!("{EXIT_B} GET /b-http")), "{olog}");

    // The egress check: masked upstream, bytes, exit IP per user.
    let ea = egress_of(&h, None, &a).await;
    seen.push_str(&ea.to_string());
    assert_eq!(
        ea["upstream"],
        format!("http://acct:***@127.0.0.1:{p1}"),
        "{ea}"
    );
    assert_eq!(ea["source"], "account");
    assert_eq!(ea["exit_ip"], EXIT_A, "{ea}");
    assert_eq!(ea["status"], "ok", "{ea}");
    assert!(ea["bytes_out"].as_u64().unwrap_or(0) > 100, "{ea}");
    assert!(ea["bytes_in"].as_u64().unwrap_or(0) > 100, "{ea}");
    let eb = egress_of(&h, bob, &b).await;
    seen.push_str(&eb.to_string());
    assert_eq!(eb["exit_ip"], EXIT_B, "{eb}");
    assert_eq!(
        eb["upstream"],
        format!("http://acct:***@127.0.0.1:{p2}"),
        "{eb}"
    );
    // /metrics counts over all sandboxes and names none of them.
    let metrics = h.metrics().await;
    let total: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("airlock_egress_bytes_out_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(total > 100, "{metrics}");
    assert!(!metrics.contains(&a), "a sandbox id in /metrics: {metrics}");

    // Chromium on the desktop goes through the proxy too.
    let out = exec_as(&h, None, &a, "pgrep -a chromium | head -1", json!({})).await;
    let cmdline = out["stdout"].as_str().unwrap_or("");
    assert!(
        cmdline.contains(&format!(
            "--proxy-server={}",
            ea["proxy"].as_str().unwrap_or("?")
        )),
        "{cmdline}"
    );
    assert!(
        cmdline.contains("--force-webrtc-ip-handling-policy=disable_non_proxied_udp"),
        "{cmdline}"
    );
    exec_as(
        &h,
        None,
        &a,
        &format!("DISPLAY=:0 /usr/local/bin/airlock-chromium http://{ORIGIN}/from-chromium"),
        json!({}),
    )
    .await;
    wait_for(
        "Chromium's request at the origin",
        Duration::from_secs(40),
        || {
            origin
                .log()
                .contains(&format!("{EXIT_A} GET /from-chromium"))
        },
    )
    .await;
    assert!(origin.log().contains("Chrome"), "{}", origin.log());

    // Direct attempts all fail, and are counted.
    let before = egress_of(&h, None, &a).await["blocked"].clone();
    let api_port = h.running.as_ref().expect("running").addr.port();
    let gateway = ea["proxy"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap_or("")
        .to_owned();
    let out = exec_as(
        &h,
        None,
        &a,
        &format!(
            "curl -sS --noproxy '*' -m 3 http://{ORIGIN}/direct; echo tcp=$?; \
             curl -sS --noproxy '*' -m 3 http://{gateway}:{api_port}/healthz; echo api=$?; \
             for i in 1 2 3; do echo hello > /dev/udp/{ORIGIN}/53; done; echo udp=$?; \
             (command -v ping >/dev/null && ping -c 1 -W 1 {ORIGIN}) ; true"
        ),
        json!({}),
    )
    .await;
    let text = out["stdout"].as_str().unwrap_or("");
    assert!(!text.contains("tcp=0") && !text.contains("api=0"), "{out}");
    let after = egress_of(&h, None, &a).await["blocked"].clone();
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    assert!(
        n(&after, "tcp") >= n(&before, "tcp") + 2,
        "{before} → {after}"
    );
    assert!(
        n(&after, "udp") >= n(&before, "udp") + 3,
        "{before} → {after}"
    );
    assert!(!origin.log().contains("/direct"), "{}", origin.log());

    // Through the forwarder itself, this host and the sandbox network are
    // refused before the upstream hears of them: the control plane on
    // 127.0.0.1, and on the sandbox's gateway.
    let proxy = ea["proxy"].as_str().unwrap_or("").to_owned();
    let out = exec_as(
        &h,
        None,
        &a,
        &format!(
            "curl -sS -m 10 --noproxy '' -x {proxy} -w ' status=%{{http_code}}\\n' http://127.0.0.1:{api_port}/healthz; \
             curl -sS -m 10 --noproxy '' -x {proxy} -w ' status=%{{http_code}}\\n' http://{gateway}:{api_port}/healthz"
        ),
        json!({}),
    )
    .await;
    let text = out["stdout"].as_str().unwrap_or("");
    assert_eq!(text.matches("status=403").count(), 2, "{out}");
    assert!(text.contains("is a loopback address"), "{out}");
    assert!(
        text.contains("is an address in the sandbox network"),
        "{out}"
    );
    assert_eq!(origin.udp_log(), "", "UDP reached the origin");

    // Wrong upstream password: clear status, quick error, nothing out.
    let (status, body) = h
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/users/bob",
            Some(&admin),
            Some(json!({ "url": format!("http://{ACCOUNT_USER}:wrong-password@127.0.0.1:{p2}") })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    seen.push_str(&body.to_string());
    let packets = origin.packets_in();
    let started = Instant::now();
    let out = exec_as(&h, bob, &b, &format!("curl -sS -m 20 -w '%{{http_code}}' http://{ORIGIN}/wrong; curl -sS -k -m 20 https://{ORIGIN}/wrong-tls; echo rc=$?"), json!({})).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let text =
        out["stdout"].as_str().unwrap_or("").to_owned() + out["stderr"].as_str().unwrap_or("");
    assert!(text.contains("407") && text.contains("502"), "{out}");
    assert!(!text.contains("rc=0"), "{out}");
    let eb = egress_of(&h, bob, &b).await;
    seen.push_str(&eb.to_string());
    assert_eq!(eb["status"], "failing", "{eb}");
    assert_eq!(eb["source"], "explicit", "{eb}");
    assert!(
        eb["last_error"].as_str().unwrap_or("").contains("407"),
        "{eb}"
    );
    assert!(eb["exit_ip"].is_null(), "{eb}");
    assert_eq!(
        origin.packets_in(),
        packets,
        "packets reached the origin with a wrong password"
    );

    // An upstream that accepts and never answers: a quick 504, not a hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("silent");
    let silent_port = silent.local_addr().expect("addr").port();
    app.set_user_egress("bob", &format!("http://x:y@127.0.0.1:{silent_port}").into())
        .await
        .expect("set silent");
    let started = Instant::now();
    let out = exec_as(
        &h,
        bob,
        &b,
        &format!("curl -sS -m 30 -w '%{{http_code}}' http://{ORIGIN}/silent"),
        json!({}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        out["stdout"].as_str().unwrap_or("").ends_with("504"),
        "{out}"
    );
    drop(silent);

    // Canary: a unique upstream password is used, and appears nowhere.
    let (status, body) = h
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/users/local",
            Some(&admin),
            Some(json!({ "url": format!("http://canaryuser:{canary}@127.0.0.1:{p1}") })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    seen.push_str(&body.to_string());
    let out = exec_as(
        &h,
        None,
        &a,
        &format!("curl -sS -m 20 http://{ORIGIN}/canary"),
        json!({}),
    )
    .await;
    assert_eq!(out["stdout"], "hello from origin\n", "{out}");
    assert!(squid
        .access_log()
        .contains(&format!("{p1} canaryuser GET http://{ORIGIN}/canary 200")));
    let ea = egress_of(&h, None, &a).await;
    seen.push_str(&ea.to_string());
    let (_, user_view) = h
        .call(
            reqwest::Method::GET,
            "/api/v1/egress/users/local",
            Some(&admin),
            None,
        )
        .await;
    seen.push_str(&user_view.to_string());
    let inside = exec_as(
        &h,
        None,
        &a,
        &format!("env; ps -eo args; grep -rl '{canary}' /etc /home /run /tmp /var /opt /usr/local 2>/dev/null; true"),
        json!({}),
    )
    .await;
    let inside_text = inside["stdout"]
        .as_str()
        .unwrap_or("")
        .replace(&format!("grep -rl {canary}"), "");
    // The grep's own command line names the canary; nothing else may.
    let hits: Vec<&str> = inside_text
        .lines()
        .filter(|l| l.contains(&canary) && !l.contains("grep"))
        .collect();
    assert!(hits.is_empty(), "canary inside the sandbox: {hits:?}");
    assert!(!seen.contains(&canary), "canary in an API response");
    let files = files_containing(&h.data_dir, &canary);
    assert!(files.is_empty(), "canary in plaintext on disk: {files:?}");
    let procs = all_process_text();
    assert!(
        !common::contains(&procs, &canary),
        "canary in a process's command line or environment"
    );

    // The upstream goes away and comes back. While it is down a request
    // fails at once with 502 and the check says `failing`; once it is back
    // the same sandbox goes out again and the check says `ok`, with nothing
    // restarted or reconfigured.
    drop(squid);
    let started = Instant::now();
    let out = exec_as(
        &h,
        None,
        &a,
        &format!("curl -sS -m 20 -w ' status=%{{http_code}}' http://{ORIGIN}/down"),
        json!({}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "with the upstream down a request took {:?}",
        started.elapsed()
    );
    assert!(
        out["stdout"].as_str().unwrap_or("").ends_with("status=502"),
        "{out}"
    );
    let down = egress_of(&h, None, &a).await;
    seen.push_str(&down.to_string());
    assert_eq!(down["status"], "failing", "{down}");
    assert!(
        !down["last_error"].as_str().unwrap_or("").is_empty(),
        "{down}"
    );
    squid = Squid::start(
        tmp.path(),
        (p1, p2),
        &[(ACCOUNT_USER, ACCOUNT_PASS), ("canaryuser", &canary)],
    );
    let out = exec_as(
        &h,
        None,
        &a,
        &format!("curl -sS -m 20 http://{ORIGIN}/back"),
        json!({}),
    )
    .await;
    assert_eq!(out["stdout"], "hello from origin\n", "{out}");
    let back = egress_of(&h, None, &a).await;
    seen.push_str(&back.to_string());
    assert_eq!(back["status"], "ok", "{back}");
    assert!(!seen.contains(&canary), "canary in an API response");
    drop(squid);

    // Teardown removes the rules with the sandboxes.
    for (id, token) in [(&a, None), (&b, bob)] {
        let (s, _) = h
            .call(
                reqwest::Method::DELETE,
                &format!("/api/v1/sandboxes/{id}"),
                token,
                None,
            )
            .await;
        assert_eq!(s, 202);
    }
    h.wait_state(&a, "stopped", Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !leftovers(&h.data_dir, &b).is_empty() {
        assert!(
            Instant::now() < deadline,
            "bob's sandbox left {:?}",
            leftovers(&h.data_dir, &b)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rules = sh("nft list table inet airlock");
    for id in [&a, &b] {
        assert!(
            !rules.contains(&format!("al{}", &id[..12])),
            "rules left for {id}: {rules}"
        );
    }
    assert_eq!(leftovers(&h.data_dir, &a), Vec::<String>::new());
    h.shutdown().await;
}

fn hex_id() -> String {
    format!("{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    let mut buf = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    u64::from_le_bytes(buf)
}
