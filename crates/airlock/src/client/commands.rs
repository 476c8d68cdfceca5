//! The client commands, one function each.

use super::api::{fail, seg, Api, Failure};
use super::io::{attach, Input};
use super::{exit, AuditArgs, Conn, CredentialsCommand, LoginArgs, SandboxCommand};
use anyhow::Context;
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

/// Runs a command and exits the way [`exit`] documents.
async fn finish(result: anyhow::Result<i32>) -> anyhow::Result<()> {
    match result {
        Ok(0) => Ok(()),
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let code = e
                .downcast_ref::<Failure>()
                .map_or(exit::FAILURE, |f| f.code);
            eprintln!("error: {e:#}");
            std::process::exit(code)
        }
    }
}

pub async fn run_sandbox(conn: Conn, cmd: SandboxCommand) -> anyhow::Result<()> {
    finish(sandbox(conn, cmd).await).await
}

pub async fn run_login(conn: Conn, args: LoginArgs) -> anyhow::Result<()> {
    finish(login(conn, args).await).await
}

pub async fn run_credentials(conn: Conn, cmd: CredentialsCommand) -> anyhow::Result<()> {
    finish(credentials(conn, cmd).await).await
}

pub async fn run_audit(conn: Conn, args: AuditArgs) -> anyhow::Result<()> {
    finish(audit(conn, args).await).await
}

fn spinner(message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// `90s`, `30m`, `1h`, or plain seconds, as seconds.
fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().map_err(|_| {
        fail(
            exit::BAD_REQUEST,
            format!("--ttl {text:?}: expected e.g. 90s, 30m or 1h"),
        )
    })?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(fail(
                exit::BAD_REQUEST,
                format!("--ttl {text:?}: the unit is s, m or h"),
            ))
        }
    };
    Ok(n.saturating_mul(scale))
}

fn sandbox_path(id: &str) -> String {
    format!("/api/v1/sandboxes/{}", seg(id))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

async fn sandbox(conn: Conn, cmd: SandboxCommand) -> anyhow::Result<i32> {
    let api = Api::new(&conn)?;
    match cmd {
        SandboxCommand::Create {
            kind,
            name,
            no_wait,
            wait_s,
        } => {
            let mut req = json!({ "kind": kind });
            if let Some(name) = name {
                req["name"] = json!(name);
            }
            let body = api
                .json(Method::POST, "/api/v1/sandboxes", Some(req))
                .await?;
            let id = s(&body["id"]);
            if !no_wait {
                wait_ready(&api, &id, Duration::from_secs(wait_s)).await?;
            }
            println!("{id}");
            Ok(0)
        }
        SandboxCommand::Ls { json } => {
            let body = api.get("/api/v1/sandboxes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(0);
            }
            let list = body["sandboxes"].as_array().cloned().unwrap_or_default();
            // In a cluster, the node each runs on (a single host has none,
            // and its table stays as it was).
            let nodes = list.iter().any(|sb| sb["node"].is_string());
            if nodes {
                println!(
                    "{:<28} {:<10} {:<12} {:<30} NODE",
                    "ID", "KIND", "STATE", "CREATED"
                );
            } else {
                println!("{:<28} {:<10} {:<12} CREATED", "ID", "KIND", "STATE");
            }
            for sb in &list {
                let (id, kind, state) = (s(&sb["id"]), s(&sb["kind"]), s(&sb["state"]));
                let created = s(&sb["created_at"]);
                if nodes {
                    let node = sb["node"].as_str().unwrap_or("-");
                    println!("{id:<28} {kind:<10} {state:<12} {created:<30} {node}");
                } else {
                    println!("{id:<28} {kind:<10} {state:<12} {created}");
                }
            }
            Ok(0)
        }
        SandboxCommand::Workspaces { json } => {
            let body = api.get("/api/v1/workspaces").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:<14} {:<12} CREDENTIALS",
                "NAME", "SANDBOX", "STATE"
            );
            for w in body["workspaces"].as_array().into_iter().flatten() {
                let providers: Vec<String> = w["providers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "{:<16} {:<14} {:<12} {}",
                    s(&w["name"]),
                    s(&w["sandbox_id"]),
                    s(&w["state"]),
                    providers.join(",")
                );
            }
            Ok(0)
        }
        SandboxCommand::Share { id, ttl, input } => {
            let ttl_s = parse_ttl(&ttl)?;
            let body = api
                .json(
                    Method::POST,
                    &format!("{}/shares", sandbox_path(&id)),
                    Some(json!({"ttl_s": ttl_s, "input": input})),
                )
                .await?;
            let url = api.base.join(&s(&body["url"])).map_err(|e| {
                fail(
                    exit::FAILURE,
                    format!("the server's link is not a path: {e}"),
                )
            })?;
            eprintln!(
                "share {} ({}), until {}",
                s(&body["id"]),
                if input { "may type" } else { "read-only" },
                s(&body["expires_at"])
            );
            println!("{url}");
            Ok(0)
        }
        SandboxCommand::Shares { id, json } => {
            let body = api.get(&format!("{}/shares", sandbox_path(&id))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(0);
            }
            println!("{:<22} {:<10} EXPIRES", "SHARE", "INPUT");
            for sh in body["shares"].as_array().into_iter().flatten() {
                let input = if sh["input"] == json!(true) {
                    "yes"
                } else {
                    "no"
                };
                println!(
                    "{:<22} {:<10} {}",
                    s(&sh["id"]),
                    input,
                    s(&sh["expires_at"])
                );
            }
            Ok(0)
        }
        SandboxCommand::ShareInput { id, share, input } => {
            let path = format!("{}/shares/{}", sandbox_path(&id), seg(&share));
            let body = api
                .json(Method::PATCH, &path, Some(json!({"input": input == "on"})))
                .await?;
            println!(
                "{share}: input {}",
                if body["input"] == json!(true) {
                    "on"
                } else {
                    "off"
                }
            );
            Ok(0)
        }
        SandboxCommand::Unshare { id, share } => {
            let path = format!("{}/shares/{}", sandbox_path(&id), seg(&share));
            api.json(Method::DELETE, &path, None).await?;
            println!("{share}: revoked");
            Ok(0)
        }
        SandboxCommand::Rm { id } => {
            let body = api.json(Method::DELETE, &sandbox_path(&id), None).await?;
            println!("{id}: {}", s(&body["state"]));
            Ok(0)
        }
        SandboxCommand::Exec {
            id,
            interactive,
            env,
            cwd,
            timeout_s,
            argv,
        } => {
            let mut envs = serde_json::Map::new();
            for e in env {
                let (k, v) = e.split_once('=').ok_or_else(|| {
                    fail(
                        exit::BAD_REQUEST,
                        format!("--env {e:?}: expected NAME=VALUE"),
                    )
                })?;
                envs.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            let body = json!({"argv": argv, "env": envs, "cwd": cwd, "stdin": interactive, "timeout_s": timeout_s});
            let pid = start(&api, &id, body).await?;
            let input = if interactive {
                Input::Stdin
            } else {
                Input::None
            };
            Ok(attach(&api, &id, pid, input, true)
                .await?
                .unwrap_or(exit::FAILURE))
        }
        SandboxCommand::Shell { id, argv } => {
            let argv = if argv.is_empty() {
                vec!["bash".to_owned(), "-l".to_owned()]
            } else {
                argv
            };
            let (cols, rows) = super::io::terminal_size().unwrap_or((80, 24));
            let body = json!({"argv": argv, "pty": {"cols": cols, "rows": rows}});
            let pid = start(&api, &id, body).await?;
            let code = attach(&api, &id, pid, Input::Terminal, true).await?;
            Ok(code.unwrap_or(exit::FAILURE))
        }
        SandboxCommand::Cp { from, to } => copy(&api, &from, &to).await,
        SandboxCommand::Record { id, cmd } => super::record::run(&api, &id, cmd).await,
        SandboxCommand::Logs { id, pid, follow } => {
            let pid = match pid {
                Some(p) => p,
                None => newest(&api, &id).await?,
            };
            let code = attach(&api, &id, pid, Input::None, follow).await?;
            Ok(if follow { code.unwrap_or(0) } else { 0 })
        }
        SandboxCommand::Ps { id } => {
            let body = api.get(&format!("{}/processes", sandbox_path(&id))).await?;
            println!(
                "{:>8} {:<8} {:>5} {:>10} COMMAND",
                "PID", "STATE", "EXIT", "OUTPUT"
            );
            for p in body["processes"].as_array().into_iter().flatten() {
                let exit = match (p["exit_code"].as_i64(), p["signal"].as_i64()) {
                    (Some(c), _) => c.to_string(),
                    (None, Some(sig)) => format!("sig{sig}"),
                    _ => "-".into(),
                };
                let argv: Vec<String> = p["argv"].as_array().into_iter().flatten().map(s).collect();
                println!(
                    "{:>8} {:<8} {:>5} {:>10} {}",
                    s(&p["pid"]),
                    s(&p["state"]),
                    exit,
                    s(&p["output_bytes"]),
                    argv.join(" ")
                );
            }
            Ok(0)
        }
        SandboxCommand::Kill { id, pid, signal } => {
            let mut path = format!("{}/processes/{pid}", sandbox_path(&id));
            if let Some(sig) = signal {
                path.push_str(&format!("?signal={}", seg(&sig)));
            }
            let body = api.json(Method::DELETE, &path, None).await?;
            println!("{pid}: {}", s(&body["state"]));
            Ok(0)
        }
    }
}

async fn start(api: &Api, id: &str, body: Value) -> anyhow::Result<u32> {
    let info = api
        .json(
            Method::POST,
            &format!("{}/processes", sandbox_path(id)),
            Some(body),
        )
        .await?;
    info["pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| fail(exit::FAILURE, format!("no pid in the answer: {info}")))
}

async fn newest(api: &Api, id: &str) -> anyhow::Result<u32> {
    let body = api.get(&format!("{}/processes", sandbox_path(id))).await?;
    body["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .max_by_key(|p| p["started_at_ms"].as_u64().unwrap_or(0))
        .and_then(|p| p["pid"].as_u64())
        .map(|p| p as u32)
        .ok_or_else(|| fail(exit::NOT_FOUND, format!("sandbox {id} has no processes")))
}

async fn wait_ready(api: &Api, id: &str, within: Duration) -> anyhow::Result<()> {
    let bar = spinner(&format!("{id}: provisioning"));
    let deadline = Instant::now() + within;
    loop {
        let body = api.get(&sandbox_path(id)).await?;
        let state = s(&body["state"]);
        bar.set_message(format!("{id}: {state}"));
        match state.as_str() {
            "ready" => {
                bar.finish_and_clear();
                return Ok(());
            }
            "failed" | "stopped" | "stopping" => {
                bar.finish_and_clear();
                return Err(fail(
                    exit::FAILURE,
                    format!("sandbox {id} is {state}: {}", s(&body["failure_reason"])),
                ));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            return Err(fail(
                exit::TIMEOUT,
                format!("sandbox {id} is still {state} after {within:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `ID:PATH` → (ID, PATH), when `arg` names a sandbox path rather than a local one.
fn remote(arg: &str) -> Option<(&str, &str)> {
    if std::path::Path::new(arg).exists() {
        return None;
    }
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && !path.is_empty()).then_some((id, path))
}

/// A local file as a request body read as it is sent (never held whole);
/// one over the API's 64 MiB is refused here, before anything is sent.
async fn upload(from: &str) -> anyhow::Result<reqwest::Body> {
    use tokio::io::AsyncReadExt;
    let max = airlock_proto::process::MAX_FILE_BYTES;
    let mut file = tokio::fs::File::open(from)
        .await
        .with_context(|| format!("reading {from}"))?;
    let size = file
        .metadata()
        .await
        .with_context(|| format!("reading {from}"))?
        .len();
    if size > max as u64 {
        return Err(fail(
            exit::BAD_REQUEST,
            format!(
                "{from}: {size} bytes; a file may be at most {} MiB",
                max >> 20
            ),
        ));
    }
    let (tx, body) = airlock_server::app::processes::UploadBody::channel(4);
    tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            let chunk = match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(buf)
                }
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(reqwest::Body::wrap(body))
}

async fn copy(api: &Api, from: &str, to: &str) -> anyhow::Result<i32> {
    let files = |id: &str, path: &str| format!("{}/files?path={}", sandbox_path(id), seg(path));
    match (remote(from), remote(to)) {
        (None, Some((id, path))) => {
            let body = upload(from).await?;
            let req = api.request(Method::PUT, &files(id, path)).body(body);
            let body: Value = api.send(req).await?.json().await.unwrap_or(Value::Null);
            eprintln!(
                "{from} → {id}:{} ({} bytes)",
                s(&body["path"]),
                s(&body["size"])
            );
            Ok(0)
        }
        (Some((id, path)), None) => {
            let mut resp = api.send(api.request(Method::GET, &files(id, path))).await?;
            let is_tar = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() == b"application/x-tar");
            let mut out: Box<dyn Write> = if to == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::fs::File::create(to).with_context(|| format!("creating {to}"))?)
            };
            let mut n = 0usize;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| fail(exit::UNAVAILABLE, format!("downloading: {e}")))?
            {
                out.write_all(&chunk)?;
                n += chunk.len();
            }
            out.flush()?;
            if to != "-" {
                let what = if is_tar {
                    "a tar of the directory"
                } else {
                    "the file"
                };
                eprintln!("{id}:{path} → {to} ({what}, {n} bytes)");
            }
            Ok(0)
        }
        _ => Err(fail(
            exit::BAD_REQUEST,
            "cp needs one local path and one SANDBOX:PATH (e.g. cp notes.txt sb-1:notes.txt)",
        )),
    }
}

async fn login(conn: Conn, args: LoginArgs) -> anyhow::Result<i32> {
    let api = Api::new(&conn)?;
    let login = api
        .json(
            Method::POST,
            "/api/v1/logins",
            Some(match &args.workspace {
                Some(w) => json!({ "provider": args.provider, "workspace": w }),
                None => json!({ "provider": args.provider }),
            }),
        )
        .await?;
    let id = s(&login["id"]);
    let path = format!("/api/v1/logins/{}", seg(&id));
    let deadline = Instant::now() + Duration::from_secs(args.wait_s);
    let bar = spinner(&format!("login {id}: starting"));
    let mut shown_url = false;
    let mut asked_code = false;
    loop {
        let body = api.get(&path).await?;
        let state = s(&body["state"]);
        if !shown_url {
            if let Some(url) = body["viewer_url"].as_str() {
                bar.suspend(|| {
                    println!("Sign in to {} here: {}", args.provider, api.url(url));
                });
                shown_url = true;
            }
        }
        if body["awaiting_code"] == true && !asked_code {
            asked_code = true;
            let code = bar.suspend(|| {
                eprint!("Paste the code the provider showed you: ");
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map(|_| line.trim().to_owned())
            })?;
            api.json(
                Method::POST,
                &format!("{path}/code"),
                Some(json!({ "code": code })),
            )
            .await?;
        }
        bar.set_message(format!("login {id}: {state}"));
        match state.as_str() {
            "delivered" | "completed" => {
                bar.finish_and_clear();
                println!(
                    "Signed in: your workspace {} holds the {} credentials.",
                    s(&body["workspace_sandbox_id"]),
                    args.provider
                );
                return Ok(0);
            }
            "failed" | "expired" | "cancelled" => {
                bar.finish_and_clear();
                return Err(fail(
                    exit::FAILURE,
                    format!("the login {state}: {}", s(&body["error"])),
                ));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            return Err(fail(
                exit::TIMEOUT,
                format!(
                    "the login is still {state} after {}s (it goes on; see /api/v1/logins/{id})",
                    args.wait_s
                ),
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn credentials(conn: Conn, cmd: CredentialsCommand) -> anyhow::Result<i32> {
    let api = Api::new(&conn)?;
    match cmd {
        CredentialsCommand::Ls { json } => {
            let body = api.get("/api/v1/credentials").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(0);
            }
            println!(
                "{:<10} {:<15} {:<26} {:<26} WORKSPACES",
                "PROVIDER", "STATUS", "UPDATED", "EXPIRES"
            );
            for c in body["credentials"].as_array().into_iter().flatten() {
                let mut status = s(&c["status"]);
                if c["sign_in_again"] == true {
                    status.push_str(" (sign in again)");
                }
                let workspaces: Vec<String> = c["workspaces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "{:<10} {:<15} {:<26} {:<26} {}",
                    s(&c["provider"]),
                    status,
                    s(&c["updated_at"]),
                    s(&c["expires_at"]),
                    workspaces.join(",")
                );
            }
            Ok(0)
        }
        CredentialsCommand::Deliver {
            provider,
            workspace,
        } => {
            let body = api
                .json(
                    Method::POST,
                    &format!("/api/v1/credentials/{}/deliver", seg(&provider)),
                    Some(json!({ "workspace": workspace })),
                )
                .await?;
            println!(
                "{provider}: delivered to workspace {workspace} ({})",
                s(&body["workspace_sandbox_id"])
            );
            Ok(0)
        }
        CredentialsCommand::Rm { provider } => {
            api.json(
                Method::DELETE,
                &format!("/api/v1/credentials/{}", seg(&provider)),
                None,
            )
            .await?;
            println!("{provider}: removed");
            Ok(0)
        }
    }
}

async fn audit(conn: Conn, args: AuditArgs) -> anyhow::Result<i32> {
    let api = Api::new(&conn)?;
    let body = api.get("/api/v1/audit").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(0);
    }
    // One line per event, whatever fields the server sends.
    let events = body
        .as_object()
        .and_then(|o| o.values().find_map(Value::as_array))
        .cloned()
        .or_else(|| body.as_array().cloned())
        .unwrap_or_default();
    for e in events {
        let line: Vec<String> = e
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect();
        println!("{}", line.join(" "));
    }
    Ok(0)
}

#[cfg(test)]
mod share_tests {
    use super::parse_ttl;

    #[test]
    fn a_ttl_reads_seconds_minutes_and_hours() {
        assert_eq!(parse_ttl("90").expect("s"), 90);
        assert_eq!(parse_ttl("90s").expect("s"), 90);
        assert_eq!(parse_ttl("30m").expect("m"), 1800);
        assert_eq!(parse_ttl("24h").expect("h"), 86400);
        for bad in ["", "h", "1d", "-5m", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
