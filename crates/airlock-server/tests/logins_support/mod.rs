//! Shared by the login tests: a real OAuth 2.0 authorisation server
//! (authorisation code + PKCE S256) that also answers as the user's upstream
//! proxy, and a test-only provider whose login command is a small OAuth client.
//!
//! Why the server is the upstream proxy: a sandbox may reach nothing but its
//! gateway's forward proxy, which sends everything on to the user's upstream.
//! Naming this server as that upstream (`PUT /egress/users/local`) lets
//! Chromium and the test CLI in the sandbox reach `http://oauth.test/` the one
//! way a guest is allowed to go; the server sees proxy-form requests and
//! routes them by path. It listens on loopback only.
//!
//! The test provider is written to a directory given to the control plane as
//! `providers_dir`: it never ships in the image.

#![allow(dead_code)]

use axum::extract::{Form, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64U;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Polls a login (as the user of `token`) until it is in one of `want`;
/// panics when it ends otherwise or takes longer than `within`.
pub async fn wait_login(
    h: &crate::common::Harness,
    token: Option<&str>,
    id: &str,
    want: &[&str],
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = h
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/logins/{id}"),
                token,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let state = body["state"].as_str().unwrap_or("").to_owned();
        if want.contains(&state.as_str()) {
            return body;
        }
        assert!(
            !["failed", "expired", "cancelled"].contains(&state.as_str()),
            "login ended {state}: {body}"
        );
        assert!(
            Instant::now() < deadline,
            "login is {state} after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until a (browser) sandbox has stopped or failed.
pub async fn wait_gone(
    h: &crate::common::Harness,
    token: Option<&str>,
    id: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let (_, b) = h
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/sandboxes/{id}"),
                token,
                None,
            )
            .await;
        if ["stopped", "failed"].contains(&b["state"].as_str().unwrap_or("")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "browser sandbox {id} still there: {b}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The user approves at the OAuth server (the page Chromium shows): the
/// server's redirect, with the code in it.
pub async fn approve_at(oauth_port: u16, login_url: &str) -> String {
    let approve = format!(
        "http://127.0.0.1:{oauth_port}/approve?{}",
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query(login_url))
            .finish()
    );
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let resp = http.get(&approve).send().await.expect("approve");
    assert_eq!(resp.status().as_u16(), 303, "approve");
    resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned()
}

/// The query parameters of a URL.
pub fn query(url: &str) -> HashMap<String, String> {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    url::form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .collect()
}

pub const CLIENT_ID: &str = "airlock-test";

#[derive(Debug, Default)]
pub struct OAuth {
    /// code → (challenge, redirect_uri)
    pub codes: Mutex<HashMap<String, (String, String)>>,
    /// Authorisation requests seen, newest last (query strings).
    pub authorize_requests: Mutex<Vec<HashMap<String, String>>>,
    pub tokens_issued: Mutex<u32>,
    /// code → the access token issued for it (each code is used once).
    pub issued: Mutex<HashMap<String, String>>,
    /// Put into every access token (the canary).
    pub marker: String,
    /// Refresh tokens the server would still honour (each is used once: a
    /// refresh rotates it).
    pub refresh_tokens: Mutex<std::collections::HashSet<String>>,
    /// Access tokens `/userinfo` accepts.
    pub access_tokens: Mutex<std::collections::HashSet<String>>,
    /// Refresh grants honoured.
    pub refreshed: Mutex<u32>,
}

impl OAuth {
    /// A token pair as a sign-in would have issued it, `expires_in_s` from now.
    pub fn issue(&self, expires_in_s: i64) -> serde_json::Value {
        let access_token = format!(
            "at-{}-{}",
            self.marker,
            hex::encode(rand::random::<[u8; 8]>())
        );
        let refresh_token = format!("rt-{}", hex::encode(rand::random::<[u8; 8]>()));
        self.access_tokens
            .lock()
            .expect("lock")
            .insert(access_token.clone());
        self.refresh_tokens
            .lock()
            .expect("lock")
            .insert(refresh_token.clone());
        serde_json::json!({
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": expires_in_s,
        })
    }

    /// The user signed out everywhere: no token of theirs works any more.
    pub fn revoke_all(&self) {
        self.access_tokens.lock().expect("lock").clear();
        self.refresh_tokens.lock().expect("lock").clear();
    }
}

async fn authorize(
    State(s): State<Arc<OAuth>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    s.authorize_requests.lock().expect("lock").push(q.clone());
    let ok = q.get("response_type").map(String::as_str) == Some("code")
        && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
        && q.contains_key("code_challenge")
        && q.contains_key("redirect_uri");
    if !ok {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            "bad authorisation request",
        )
            .into_response();
    }
    let hidden: String = q
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=hidden name=\"{}\" value=\"{}\">",
                html(k),
                html(v)
            )
        })
        .collect();
    // The whole page is the button, so a click anywhere on Chromium's page
    // (through the viewer) signs in.
    Html(format!(
        "<!doctype html><title>Sign in to Test OAuth</title>\
         <style>html,body,form{{margin:0;height:100%}}button{{width:100%;height:100%;font-size:48px;background:#1a7f37;color:#fff;border:0}}</style>\
         <form method=get action=\"/approve\">{hidden}<button id=signin type=submit>Sign in</button></form>"
    ))
    .into_response()
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn approve(
    State(s): State<Arc<OAuth>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (Some(redirect), Some(challenge)) = (q.get("redirect_uri"), q.get("code_challenge")) else {
        return (axum::http::StatusCode::BAD_REQUEST, "missing fields").into_response();
    };
    let code = hex::encode(rand::random::<[u8; 12]>());
    s.codes
        .lock()
        .expect("lock")
        .insert(code.clone(), (challenge.clone(), redirect.clone()));
    let state = q.get("state").cloned().unwrap_or_default();
    Redirect::to(&format!("{redirect}?code={code}&state={state}")).into_response()
}

async fn token(State(s): State<Arc<OAuth>>, Form(f): Form<HashMap<String, String>>) -> Response {
    let bad = |m: &str| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "invalid_grant", "error_description": m})),
        )
            .into_response()
    };
    if f.get("grant_type").map(String::as_str) == Some("refresh_token")
        && f.get("client_id").map(String::as_str) == Some(CLIENT_ID)
    {
        let given = f.get("refresh_token").cloned().unwrap_or_default();
        if !s.refresh_tokens.lock().expect("lock").remove(&given) {
            return bad("unknown, used or revoked refresh token");
        }
        *s.refreshed.lock().expect("lock") += 1;
        return Json(s.issue(3600)).into_response();
    }
    if f.get("grant_type").map(String::as_str) != Some("authorization_code")
        || f.get("client_id").map(String::as_str) != Some(CLIENT_ID)
    {
        return bad("grant_type or client_id");
    }
    let Some(code) = f.get("code") else {
        return bad("code");
    };
    let Some((challenge, redirect)) = s.codes.lock().expect("lock").remove(code) else {
        return bad("unknown or used code");
    };
    if f.get("redirect_uri") != Some(&redirect) {
        return bad("redirect_uri differs");
    }
    let verifier = f.get("code_verifier").cloned().unwrap_or_default();
    if B64U.encode(Sha256::digest(verifier.as_bytes())) != challenge {
        return bad("PKCE verifier does not match the challenge");
    }
    *s.tokens_issued.lock().expect("lock") += 1;
    let pair = s.issue(3600);
    let access_token = pair["access_token"].as_str().unwrap_or_default().to_owned();
    s.issued
        .lock()
        .expect("lock")
        .insert(code.clone(), access_token);
    Json(pair).into_response()
}

/// What a CLI calls with its access token: 200 while the token is good.
async fn userinfo(State(s): State<Arc<OAuth>>, headers: axum::http::HeaderMap) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if s.access_tokens.lock().expect("lock").contains(token) {
        Json(serde_json::json!({"sub": "test-user"})).into_response()
    } else {
        (axum::http::StatusCode::UNAUTHORIZED, "invalid token").into_response()
    }
}

/// The page a "paste the code" redirect lands on (claude's manual route):
/// it shows `code#state` for the user to copy into the CLI.
async fn show_code(Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(code), Some(state)) = (q.get("code"), q.get("state")) else {
        return (axum::http::StatusCode::BAD_REQUEST, "missing code").into_response();
    };
    Html(format!(
        "<!doctype html><title>Your code</title><p>Paste this code into the CLI:</p>\
         <pre id=code>{}#{}</pre>",
        html(code),
        html(state)
    ))
    .into_response()
}

/// Starts the server on a loopback port; returns its port.
pub async fn start_oauth(state: Arc<OAuth>) -> u16 {
    let app = Router::new()
        .route("/authorize", get(authorize))
        .route("/approve", get(approve))
        .route("/token", post(token))
        .route("/userinfo", get(userinfo))
        .route("/code", get(show_code))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// The login command of the test provider: a real OAuth client. It serves a
/// callback on 127.0.0.1, asks a browser ($BROWSER) to open the authorise
/// URL with a PKCE challenge, exchanges the code at the token endpoint
/// through the sandbox's proxy, and writes ~/.testcli/credentials.json
/// (temp file, then rename).
pub const TEST_CLI: &str = r#"
const http=require('http'),crypto=require('crypto'),fs=require('fs'),path=require('path');
const proxy=new URL(process.env.HTTP_PROXY||process.env.http_proxy);
const b64u=b=>b.toString('base64url');
const verifier=b64u(crypto.randomBytes(32));
const challenge=b64u(crypto.createHash('sha256').update(verifier).digest());
const state=b64u(crypto.randomBytes(16));
let redirect;
const srv=http.createServer((req,res)=>{
  const u=new URL(req.url,'http://127.0.0.1');
  if(u.pathname!=='/callback'){res.writeHead(404);res.end();return;}
  if(u.searchParams.get('state')!==state){res.writeHead(400);res.end('bad state');return;}
  const body=new URLSearchParams({grant_type:'authorization_code',code:u.searchParams.get('code'),redirect_uri:redirect,client_id:'airlock-test',code_verifier:verifier}).toString();
  const r=http.request({host:proxy.hostname,port:proxy.port,method:'POST',path:'http://oauth.test/token',headers:{host:'oauth.test','content-type':'application/x-www-form-urlencoded','content-length':Buffer.byteLength(body)}},t=>{
    let d='';t.on('data',c=>d+=c);t.on('end',()=>{
      if(t.statusCode!==200){console.log('token exchange failed: '+t.statusCode);process.exit(4);}
      const dir=path.join(process.env.HOME,'.testcli');fs.mkdirSync(dir,{recursive:true,mode:0o700});
      fs.writeFileSync(path.join(dir,'.tmp'),d,{mode:0o600});fs.renameSync(path.join(dir,'.tmp'),path.join(dir,'credentials.json'));
      res.setHeader('content-type','text/html');res.end('<h1>Signed in. You can close this tab.</h1>');console.log('signed in');setTimeout(()=>process.exit(0),500);});});
  r.on('error',e=>{console.log('token exchange failed: '+e.message);process.exit(5);});
  r.end(body);
});
srv.listen(0,'127.0.0.1',()=>{
  redirect='http://127.0.0.1:'+srv.address().port+'/callback';
  const url='http://oauth.test/authorize?'+new URLSearchParams({response_type:'code',client_id:'airlock-test',redirect_uri:redirect,code_challenge:challenge,code_challenge_method:'S256',state});
  console.log('Open this URL to sign in:');console.log(url);
  require('child_process').spawn(process.env.BROWSER,[url],{stdio:'ignore'});
});
"#;

/// Writes the test-only providers into `dir`.
pub fn write_test_providers(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let oauth = toml::toml! {
        name = "testoauth"
        display_name = "Test OAuth"
        url_prefixes = ["http://oauth.test/authorize?"]
        credentials = [{ path = ".testcli/credentials.json", json_keys = ["access_token"] }]
        check = ["test", "-s", ".testcli/credentials.json"]
    };
    let mut oauth = oauth;
    oauth.insert(
        "command".into(),
        toml::Value::Array(vec!["node".into(), "-e".into(), TEST_CLI.into()]),
    );
    std::fs::write(
        dir.join("testoauth.toml"),
        toml::to_string(&oauth).expect("toml"),
    )
    .expect("write");
    std::fs::write(
        dir.join("testfail.toml"),
        "name = \"testfail\"\ndisplay_name = \"Test fail\"\n\
         command = [\"sh\", \"-c\", \"echo 'cannot reach oauth.test: connection refused'; exit 3\"]\n\
         url_prefixes = [\"http://oauth.test/authorize?\"]\n\
         credentials = [{ path = \".testcli/none.json\" }]\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("testidle.toml"),
        "name = \"testidle\"\ndisplay_name = \"Test idle\"\n\
         command = [\"sh\", \"-c\", \"echo 'http://oauth.test/authorize?client_id=idle'; sleep 600\"]\n\
         url_prefixes = [\"http://oauth.test/authorize?\"]\n\
         credentials = [{ path = \".testcli/none.json\" }]\n\
         [url]\nfrom = \"screen\"\nparams = [\"client_id\"]\n",
    )
    .expect("write");
}

/// The login command of the paste-code test provider: an OAuth client on
/// claude's manual route. Its redirect is the OAuth server's own page that
/// shows `code#state`; it asks a browser to open the authorise URL, then waits
/// at "Paste code here if prompted" for that line on its terminal, exchanges
/// the code through the sandbox's proxy and writes
/// ~/.testcli/credentials.json (temp file, then rename).
pub const PASTE_CLI: &str = r#"
const http=require('http'),crypto=require('crypto'),fs=require('fs'),path=require('path'),readline=require('readline');
const proxy=new URL(process.env.HTTP_PROXY||process.env.http_proxy);
const b64u=b=>b.toString('base64url');
const verifier=b64u(crypto.randomBytes(32));
const challenge=b64u(crypto.createHash('sha256').update(verifier).digest());
const state=b64u(crypto.randomBytes(16));
const redirect='http://oauth.test/code';
const url='http://oauth.test/authorize?'+new URLSearchParams({response_type:'code',client_id:'airlock-test',redirect_uri:redirect,code_challenge:challenge,code_challenge_method:'S256',state});
console.log('Browser didn\'t open? Use the url below to sign in:');console.log(url);
require('child_process').spawn(process.env.BROWSER,[url],{stdio:'ignore'});
const rl=readline.createInterface({input:process.stdin,output:process.stdout});
rl.question('Paste code here if prompted > ',line=>{
  rl.close();
  const [code,got]=line.trim().split('#');
  if(!code||got!==state){console.log('invalid code');process.exit(6);}
  const body=new URLSearchParams({grant_type:'authorization_code',code,redirect_uri:redirect,client_id:'airlock-test',code_verifier:verifier}).toString();
  const r=http.request({host:proxy.hostname,port:proxy.port,method:'POST',path:'http://oauth.test/token',headers:{host:'oauth.test','content-type':'application/x-www-form-urlencoded','content-length':Buffer.byteLength(body)}},t=>{
    let d='';t.on('data',c=>d+=c);t.on('end',()=>{
      if(t.statusCode!==200){console.log('token exchange failed: '+t.statusCode);process.exit(4);}
      const dir=path.join(process.env.HOME,'.testcli');fs.mkdirSync(dir,{recursive:true,mode:0o700});
      fs.writeFileSync(path.join(dir,'.tmp'),d,{mode:0o600});fs.renameSync(path.join(dir,'.tmp'),path.join(dir,'credentials.json'));
      console.log('signed in');setTimeout(()=>process.exit(0),500);});});
  r.on('error',e=>{console.log('token exchange failed: '+e.message);process.exit(5);});
  r.end(body);
});
"#;

/// Writes the paste-code test provider (`testpaste`) into `dir`.
pub fn write_paste_provider(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut def = toml::toml! {
        name = "testpaste"
        display_name = "Test paste code"
        url_prefixes = ["http://oauth.test/authorize?"]
        code_prompt = "Paste code here"
        credentials = [{ path = ".testcli/credentials.json", json_keys = ["access_token"] }]
        check = ["test", "-s", ".testcli/credentials.json"]
    };
    def.insert(
        "command".into(),
        toml::Value::Array(vec!["node".into(), "-e".into(), PASTE_CLI.into()]),
    );
    std::fs::write(
        dir.join("testpaste.toml"),
        toml::to_string(&def).expect("toml"),
    )
    .expect("write");
}

/// Everything this test process logs through `tracing` (and `log`) at debug
/// level, from the first call on: the control plane runs in the test's
/// process, so this is its log. One buffer per process (nextest runs each
/// test in its own).
pub fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    use tracing_subscriber::util::SubscriberInitExt;
    static BUF: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish()
            .try_init()
            .expect("no other subscriber is installed in this test binary");
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
