//! The egress rules hold for a microVM too: a browser sandbox under the QEMU
//! driver (TCG where KVM does not run guests) reaches the outside only
//! through its gateway's forward proxy, which adds the user's upstream
//! credentials; direct TCP (to the control plane's own port on the gateway)
//! and UDP are dropped and counted, and the upstream password is nowhere in
//! the guest. The full matrix (squid, origin, two users, Chromium) runs under
//! nspawn in `egress.rs`; this checks the VM path through the same rules.
//!
//! The upstream is a small HTTP proxy stand-in on loopback that answers every
//! proxy-form request itself and records what it saw.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::Router;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Seen(Mutex<Vec<(String, String)>>);

async fn answer(State(seen): State<Arc<Seen>>, uri: Uri, headers: HeaderMap) -> &'static str {
    let auth = headers
        .get("proxy-authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    seen.0.lock().expect("lock").push((uri.to_string(), auth));
    "hello via the upstream\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_sandbox_leaves_only_through_the_users_upstream() {
    if common::unmet().is_some() || common::qemu_unmet().is_some() {
        return;
    }
    let seen = Arc::new(Seen::default());
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = upstream.local_addr().expect("addr").port();
    let app = Router::new().fallback(answer).with_state(seen.clone());
    tokio::spawn(async move {
        let _ = axum::serve(upstream, app).await;
    });

    let password = format!("vmCANARY{}", hex::encode(rand::random::<[u8; 6]>()));
    let h = common::start_with("10.232.22.0/24", |cfg| {
        cfg.driver = airlock_server::config::DriverKind::Qemu;
        cfg.boot_timeout_s = 300;
    })
    .await;
    let _ = h.get("/api/v1/sandboxes").await; // makes the local user
    let admin = h.admin_token().await;
    let (status, body) = h
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/users/local",
            Some(&admin),
            Some(json!({ "url": format!("http://vmuser:{password}@127.0.0.1:{port}") })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = h.ready_sandbox("browser").await;
    let sh = |script: &str| {
        let script = script.to_owned();
        let h = &h;
        let id = id.clone();
        async move {
            let (status, out) = h
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/sandboxes/{id}/exec"),
                    None,
                    Some(json!({ "argv": ["bash", "-lc", script], "timeout_s": 60 })),
                )
                .await;
            assert_eq!(status, 200, "{out}");
            out
        }
    };

    // Through the proxy variables every login shell has: the upstream sees
    // the request with this user's credentials.
    let out = sh("curl -sS -m 30 http://198.51.100.7/from-the-vm").await;
    assert_eq!(out["stdout"], "hello via the upstream\n", "{out}");
    let expected_auth = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("vmuser:{password}")
        )
    );
    let requests = seen.0.lock().expect("lock").clone();
    assert!(
        requests
            .iter()
            .any(|(uri, auth)| uri == "http://198.51.100.7/from-the-vm" && *auth == expected_auth),
        "{requests:?}"
    );

    // Direct attempts: the control plane's API port on the gateway (TCP) and
    // UDP to it; both dropped, and counted.
    let (_, sandbox) = h.get(&format!("/api/v1/sandboxes/{id}")).await;
    let gateway = h.base.trim_start_matches("http://").to_owned();
    let api_port = gateway.rsplit(':').next().unwrap_or("0").to_owned();
    let (_, eg) = h.get(&format!("/api/v1/sandboxes/{id}/egress")).await;
    let proxy = eg["proxy"].as_str().unwrap_or("").to_owned();
    let gw = proxy
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap_or("")
        .to_owned();
    assert!(
        !gw.is_empty(),
        "egress names the gateway proxy: {eg} {sandbox}"
    );
    let out = sh(&format!(
        "curl -sS --noproxy '*' -m 4 http://{gw}:{api_port}/healthz; echo tcp=$?; \
         for i in 1 2 3; do echo x > /dev/udp/{gw}/53; done; echo udp-sent"
    ))
    .await;
    let text = out["stdout"].as_str().unwrap_or("");
    assert!(text.contains("tcp=28") || text.contains("tcp=7"), "{out}");
    let mut blocked = Value::Null;
    for _ in 0..20 {
        let (_, eg) = h.get(&format!("/api/v1/sandboxes/{id}/egress")).await;
        blocked = eg["blocked"].clone();
        if blocked["tcp"].as_u64().unwrap_or(0) > 0 && blocked["udp"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(blocked["tcp"].as_u64().unwrap_or(0) > 0, "{blocked}");
    assert!(blocked["udp"].as_u64().unwrap_or(0) > 0, "{blocked}");

    // The upstream password is not in the guest: environment, processes,
    // configuration and runtime files.
    // The pattern is joined inside the shell and read from a file, so no
    // command line of this check holds it whole.
    let (p1, p2) = password.split_at(password.len() / 2);
    let out = sh(&format!(
        "p1='{p1}'; p2='{p2}'; printf '%s%s\\n' \"$p1\" \"$p2\" > /dev/shm/pat; \
         (cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; \
          grep -rsh -F -f /dev/shm/pat /etc /run /home /tmp /var/tmp) | grep -c -F -f /dev/shm/pat; \
         rm -f /dev/shm/pat; true"
    ))
    .await;
    assert_eq!(
        out["stdout"], "0\n",
        "the upstream password in the guest: {out}"
    );

    let (status, _) = h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(status, 202);
    h.wait_state(&id, "stopped", Duration::from_secs(60)).await;
    assert_eq!(common::leftovers(&h.data_dir, &id), Vec::<String>::new());
    h.shutdown().await;
}
