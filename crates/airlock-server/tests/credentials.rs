//! Credentials kept in real workspaces (nspawn, the golden image, the real
//! agent), with the local OAuth test server as the provider: a record
//! delivered again when its file is missing; a CLI-like test client in the
//! workspace refreshing its token at the server (through the sandbox's
//! proxy), its new file captured back as a new version; the same record
//! delivered on request to a second, named workspace; the server refusing
//! the refresh token, which is `refresh_failed`, and the UI's "Sign in
//! again" starting a login in a real headless Chromium; revocation removing
//! the file from both workspaces; the audit trail, and the canary. The
//! checks run through the service's own round (`check_credentials_once`),
//! as the periodic task does.

mod common;
mod logins_support;

use airlock_server::app::credentials::record_aad;
use airlock_server::store::{now_ms, CredentialRow};
use logins_support::{start_oauth, OAuth};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const PROVIDER: &str = "testkeep";
const FILE: &str = ".testkeep/creds.json";

/// The test CLI as its user runs it in the workspace: with its token
/// expiring within 5 minutes, or refused by the server's `/userinfo`, it
/// refreshes at the server's token endpoint and rewrites its file (temp
/// file, rename), as the real CLIs do. A refused refresh empties its
/// refresh token (what the real CLIs leave behind) and exits 3.
const KEEP_CLI: &str = r#"
const http=require('http'),fs=require('fs'),path=require('path');
const proxy=new URL(process.env.HTTP_PROXY||process.env.http_proxy);
const file=path.join(process.env.HOME,'.testkeep','creds.json');
const creds=JSON.parse(fs.readFileSync(file,'utf8'));
function call(method,p,headers,body,cb){
  const r=http.request({host:proxy.hostname,port:proxy.port,method,path:'http://oauth.test'+p,headers:Object.assign({host:'oauth.test'},headers)},t=>{
    let d='';t.on('data',c=>d+=c);t.on('end',()=>cb(t.statusCode,d));});
  r.on('error',e=>{console.log('oauth.test unreachable: '+e.message);process.exit(5);});
  r.end(body||'');
}
function save(c){fs.writeFileSync(file+'.tmp',JSON.stringify(c),{mode:0o600});fs.renameSync(file+'.tmp',file);}
function refresh(){
  const body=new URLSearchParams({grant_type:'refresh_token',refresh_token:creds.refresh,client_id:'airlock-test'}).toString();
  call('POST','/token',{'content-type':'application/x-www-form-urlencoded','content-length':Buffer.byteLength(body)},body,(st,d)=>{
    if(st!==200){console.log('refresh refused: '+st);save(Object.assign({},creds,{refresh:''}));process.exit(3);}
    const t=JSON.parse(d);
    save({token:t.access_token,refresh:t.refresh_token||creds.refresh,expires_at:Date.now()+t.expires_in*1000});
    console.log('refreshed');process.exit(0);});
}
if(creds.expires_at-Date.now()<300000){refresh();}
else call('GET','/userinfo',{authorization:'Bearer '+creds.token},null,st=>{if(st===200){console.log('ok');process.exit(0);}refresh();});
"#;

fn write_provider(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("testkeep.toml"),
        format!(
            "name = \"{PROVIDER}\"\ndisplay_name = \"Test keep\"\ncommand = [\"true\"]\n\
             url_prefixes = [\"http://oauth.test/authorize?\"]\n\
             credentials = [{{ path = \"{FILE}\", json_keys = [\"token\"], expiry_key = \"expires_at\", \
             expiry_format = \"unix_ms\", refresh_key = \"refresh\" }}]\n\
             check = [\"test\", \"-s\", \"{FILE}\"]\n"
        ),
    )
    .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_in_real_workspaces_refreshed_at_the_oauth_server_and_revoked() {
    if common::unmet().is_some() {
        return;
    }
    let marker = format!("CANARY{}", hex::encode(rand::random::<[u8; 8]>()));
    let oauth = Arc::new(OAuth {
        marker: marker.clone(),
        ..Default::default()
    });
    let port = start_oauth(oauth.clone()).await;
    let providers = tempfile::tempdir().expect("tmp");
    write_provider(providers.path());
    let dir = providers.path().to_owned();
    let h = common::start_with("10.248.20.0/24", move |cfg| {
        cfg.providers_dir = Some(dir);
        // The OAuth server is the upstream, on loopback: let its name through.
        cfg.egress_allow = vec!["oauth.test".into()];
    })
    .await;
    let app = h.running.as_ref().expect("running").app.clone();
    let (status, _) = h.get("/api/v1/credentials").await;
    assert_eq!(status, 200);
    let resp = h
        .http
        .put(h.url("/api/v1/egress/users/local"))
        .bearer_auth(h.admin_token().await)
        .json(&json!({ "url": format!("http://t:t@127.0.0.1:{port}") }))
        .send()
        .await
        .expect("put upstream");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let user = app
        .store
        .user_by_name("local")
        .await
        .expect("q")
        .expect("local user");
    let ws = h.ready_sandbox("workspace").await;

    // A record as a login stores it from the server's tokens, expiring in
    // two minutes, already delivered once (to a home that no longer has it).
    let pair = oauth.issue(120);
    let first = json!({
        "token": pair["access_token"],
        "refresh": pair["refresh_token"],
        "expires_at": now_ms() + 120_000,
    });
    let files =
        json!({ "files": [{ "path": FILE, "contents_b64": base64_of(&first.to_string()) }] });
    let sealed = app.vault.read().await.seal(
        files.to_string().as_bytes(),
        &record_aad(&user.id, PROVIDER, "login1"),
    );
    let now = now_ms();
    app.store
        .replace_credential(&CredentialRow {
            owner_id: user.id.clone(),
            provider: PROVIDER.into(),
            login_id: "login1".into(),
            sealed: sealed.clone(),
            key_id: app.vault.read().await.current_key_id().to_owned(),
            created_at: now,
            updated_at: now,
            delivered_at: Some(now),
        })
        .await
        .expect("record");
    app.credentials_captured(&user.id, PROVIDER, "login1").await;

    // The check finds the file missing and delivers it through the agent.
    app.check_credentials_once().await;
    let out = h
        .exec(
            &ws,
            &["sh", "-c", &format!("stat -c '%a %U' {FILE}; cat {FILE}")],
        )
        .await;
    let text = out["stdout"].as_str().unwrap_or("");
    assert!(text.starts_with("600 airlock\n"), "{out}");
    assert!(text.contains(&marker), "{out}");
    let (_, creds) = h.get("/api/v1/credentials").await;
    assert_eq!(creds["credentials"][0]["status"], "expiring", "{creds}");
    assert_eq!(creds["credentials"][0]["version"], 1, "{creds}");

    // The CLI is used: its token expires within minutes, so it refreshes at
    // the OAuth server through the sandbox's proxy and rewrites its file.
    let out = h.exec(&ws, &["node", "-e", KEEP_CLI]).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert!(
        out["stdout"].as_str().unwrap_or("").contains("refreshed"),
        "{out}"
    );
    assert_eq!(*oauth.refreshed.lock().expect("lock"), 1);
    let old_refresh = pair["refresh_token"].as_str().expect("rt").to_owned();
    assert!(
        !oauth
            .refresh_tokens
            .lock()
            .expect("lock")
            .contains(&old_refresh),
        "the server rotated the refresh token"
    );
    app.check_credentials_once().await;
    app.check_credentials_once().await;
    let (_, creds) = h.get("/api/v1/credentials").await;
    let c = &creds["credentials"][0];
    assert_eq!(c["version"], 2, "{creds}");
    assert_eq!(c["status"], "healthy", "{creds}");
    assert_eq!(c["workspace_sandbox_id"], ws.as_str(), "{creds}");
    let record = app
        .store
        .credential(&user.id, PROVIDER)
        .await
        .expect("q")
        .expect("record");
    assert_ne!(record.sealed, sealed, "the old version is gone");
    let opened = app
        .vault
        .read()
        .await
        .open(&record.sealed, &record_aad(&user.id, PROVIDER, "login1"))
        .expect("opens");
    let files: serde_json::Value =
        serde_json::from_slice(secrecy::ExposeSecret::expose_secret(&opened)).expect("json");
    let held = base64_decode(files["files"][0]["contents_b64"].as_str().expect("b64"));
    let held: serde_json::Value = serde_json::from_str(&held).expect("json");
    let token = held["token"].as_str().expect("token").to_owned();
    assert_ne!(token, pair["access_token"].as_str().expect("at"));
    assert!(
        oauth.access_tokens.lock().expect("lock").contains(&token),
        "the vault holds the token the server issued at the refresh"
    );
    assert!(held["expires_at"].as_i64().expect("expiry") > now_ms() + 3_000_000);

    // A second workspace, by name; the same record delivered there on request.
    let (status, body) = h
        .post(
            "/api/v1/sandboxes",
            json!({ "kind": "workspace", "name": "proj" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let ws2 = body["id"].as_str().expect("id").to_owned();
    h.wait_state(&ws2, "ready", Duration::from_secs(120)).await;
    let said = cli(
        &h,
        &["credentials", "deliver", PROVIDER, "--workspace", "proj"],
    )
    .await;
    assert!(
        said.contains(&format!("delivered to workspace proj ({ws2})")),
        "{said}"
    );
    let (status, body) = h
        .post(
            &format!("/api/v1/credentials/{PROVIDER}/deliver"),
            json!({ "workspace": "nope" }),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let out = h.exec(&ws2, &["cat", FILE]).await;
    assert!(
        out["stdout"].as_str().unwrap_or("").contains(&token),
        "{out}"
    );
    let volumes = h.data_dir.join("volumes").join(&user.id);
    let kept: Vec<String> = std::fs::read_dir(volumes.join("workspaces/proj"))
        .expect("proj's home is kept under its name")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(kept.iter().any(|n| n.starts_with("home")), "{kept:?}");
    let (_, list) = h.get("/api/v1/workspaces").await;
    let names: Vec<&str> = list["workspaces"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["default", "proj"], "{list}");

    // Signed out everywhere at the provider: the next use of the CLI finds
    // its token refused and its refresh refused; it empties its refresh token.
    oauth.revoke_all();
    let out = h.exec(&ws, &["node", "-e", KEEP_CLI]).await;
    assert_eq!(out["exit_code"], 3, "{out}");
    app.check_credentials_once().await;
    let (_, creds) = h.get("/api/v1/credentials").await;
    let c = &creds["credentials"][0];
    assert_eq!(c["status"], "refresh_failed", "{creds}");
    assert_eq!(c["sign_in_again"], true, "{creds}");
    assert_eq!(c["workspace_sandbox_id"], ws.as_str(), "{creds}");
    assert_eq!(c["workspaces"], json!(["default", "proj"]), "{creds}");
    let said = cli(&h, &["credentials", "ls"]).await;
    assert!(said.contains("refresh_failed (sign in again)"), "{said}");
    assert!(said.contains("default,proj"), "{said}");

    // The UI offers "Sign in again", and the button starts a login.
    if common::browser_unmet().is_none() {
        let root = common::repo_root();
        let artifacts = root.join("target/e2e-credentials");
        let status = tokio::process::Command::new("node")
            .arg(root.join("tests/e2e/credentials.mjs"))
            .args(["--url", &h.base, "--provider", PROVIDER])
            .args(["--workspaces", "default,proj", "--artifacts"])
            .arg(&artifacts)
            .status()
            .await
            .expect("node runs");
        assert!(
            status.success(),
            "the browser check failed ({status}); screenshots are in {}",
            artifacts.display()
        );
        let (_, logins) = h.get("/api/v1/logins").await;
        let started: Vec<&serde_json::Value> = logins["logins"]
            .as_array()
            .expect("logins")
            .iter()
            .filter(|l| l["provider"] == PROVIDER)
            .collect();
        assert_eq!(started.len(), 1, "{logins}");
    }

    // Revoke: the file leaves both workspaces; the second is a no-op.
    for _ in 0..2 {
        let resp = h
            .http
            .delete(h.url(&format!("/api/v1/credentials/{PROVIDER}")))
            .send()
            .await
            .expect("delete");
        assert_eq!(resp.status(), 204);
    }
    for w in [&ws, &ws2] {
        let out = h.exec(w, &["test", "-e", FILE]).await;
        assert_eq!(out["exit_code"], 1, "the file is gone from {w}: {out}");
    }
    app.check_credentials_once().await;
    for w in [&ws, &ws2] {
        let out = h.exec(w, &["test", "-e", FILE]).await;
        assert_eq!(out["exit_code"], 1, "and not delivered again to {w}: {out}");
    }
    let (_, creds) = h.get("/api/v1/credentials").await;
    assert_eq!(creds["credentials"], json!([]), "{creds}");

    let (_, audit) = h.get("/api/v1/audit").await;
    let kinds: Vec<&str> = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .rev()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "captured",
            "delivered",
            "recaptured",
            "delivered",
            "refresh_failed",
            "revoked"
        ],
        "{audit}"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("airlock_credential_events_total{kind=\"recaptured\"} 1"),
        "{metrics}"
    );
    for text in [creds.to_string(), audit.to_string(), metrics] {
        assert!(!text.contains(&marker), "the canary in an answer: {text}");
    }
    for w in [&ws, &ws2] {
        let (status, _) = h.delete(&format!("/api/v1/sandboxes/{w}")).await;
        assert_eq!(status, 202);
    }
    for w in [&ws, &ws2] {
        h.wait_state(w, "stopped", Duration::from_secs(60)).await;
    }
    h.shutdown().await;
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn base64_decode(text: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64");
    String::from_utf8(bytes).expect("utf-8")
}

/// `airlock …` (the command-line client) against the harness; its stdout.
async fn cli(h: &common::Harness, args: &[&str]) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir")
        .join("airlock");
    let cfg = h.data_dir.join("client.json");
    std::fs::write(&cfg, json!({ "url": h.base }).to_string()).expect("client config");
    let out = tokio::process::Command::new(bin)
        .args(args)
        .env("AIRLOCK_CLIENT_CONFIG", &cfg)
        .env_remove("AIRLOCK_URL")
        .env_remove("AIRLOCK_TOKEN")
        .output()
        .await
        .expect("airlock runs (cargo build -p airlock)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "airlock {args:?}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
