//! `airlock-agent`, the program inside every airlock guest.
//!
//! - `prepare` (a oneshot unit at boot, as root): reads the metadata document and
//!   writes the VNC password file and the desktop units' environment.
//! - `serve` (a long-running unit): the agent HTTP API on the guest's address.
//! - `layout` (a unit of the desktop user): keeps the terminal and Chromium
//!   side by side when the display is resized.
//! - `capture` (started by `serve` as the desktop user, one per viewer): the
//!   display as H.264 on standard output, the viewer's input from standard input.

use airlock_agent::{chain, exec, layout, login, metadata, prepare, server, stream, users};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: airlock-agent prepare|serve|layout|capture\n\n\
  prepare   write /run/airlock/{vnc/passwd,session.env,profile.sh} from the metadata document\n\
  serve     answer the agent API on <guest address>:7000\n\
  layout    re-tile the desktop (terminal left, Chromium right) after every resize\n\
  capture   stream the display as H.264 for the agent's /v1/stream (see capture --help)\n\
  clipboard get|set: read or fill the display's clipboard (text)\n";

/// Baked into the image's top layer by the image builder.
const IMAGE_INFO_PATH: &str = "/etc/airlock/image.json";

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .without_time() // journald stamps every line
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["prepare"] => prepare_cmd(),
        ["serve"] => serve_cmd(),
        ["layout"] => layout::run(),
        ["capture", "--help" | "-h"] => {
            print!("{}", stream::capture::USAGE);
            Ok(())
        }
        ["capture", rest @ ..] => stream::capture::main(rest),
        ["clipboard", rest @ ..] => stream::clipboard::main(rest),
        ["--help"] | ["-h"] | ["help"] => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_metadata() -> Result<airlock_proto::metadata::Metadata, String> {
    let sources = match std::env::var_os("AIRLOCK_METADATA_FILE") {
        Some(p) => vec![metadata::MetadataSource::NspawnFile(p.into())],
        None => metadata::MetadataSource::default_order(),
    };
    metadata::load(&sources).map_err(|e| chain(&e))
}

fn sandbox_account() -> Result<users::Account, String> {
    users::lookup(
        users::SANDBOX_USER,
        Path::new("/etc/passwd"),
        Path::new("/etc/group"),
    )
    .map_err(|e| chain(&e))
}

fn prepare_cmd() -> Result<(), String> {
    let meta = load_metadata()?;
    let account = sandbox_account()?;
    prepare::run(&meta, &prepare::Paths::guest(), &account).map_err(|e| chain(&e))?;
    tracing::info!(sandbox = %meta.sandbox_id, "prepared session files");
    Ok(())
}

fn image_build_id(path: &Path) -> String {
    #[derive(serde::Deserialize)]
    struct ImageInfo {
        build_id: String,
    }
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ImageInfo>(&b).ok())
        .map(|i| i.build_id)
        .unwrap_or_else(|| "unknown".to_owned())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false)
}

fn serve_cmd() -> Result<(), String> {
    let meta = load_metadata()?;
    let account = sandbox_account()?;
    let ip: IpAddr = meta
        .network
        .address
        .parse()
        .map_err(|_| "bad guest address".to_owned())?;
    let addr = SocketAddr::new(ip, airlock_proto::AGENT_PORT);

    let mut base_env = vec![
        ("HOME".to_owned(), account.home.display().to_string()),
        ("USER".to_owned(), account.name.clone()),
        ("LOGNAME".to_owned(), account.name.clone()),
        ("SHELL".to_owned(), "/bin/bash".to_owned()),
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("DISPLAY".to_owned(), ":0".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ];
    base_env.extend(prepare::proxy_env(&meta));
    let run_as = if is_root() {
        exec::RunAs::User {
            uid: account.uid,
            gid: account.gid,
            groups: account.groups.clone(),
        }
    } else {
        tracing::warn!("not running as root: commands run as the agent's own user");
        exec::RunAs::Current
    };
    let logins = Arc::new(login::Logins::new(login::LoginConfig::guest(
        run_as.clone(),
        account.home.clone(),
        base_env.clone(),
        meta.network.gateway.clone(),
    )));
    let exe =
        std::env::current_exe().map_err(|e| format!("finding the agent's own executable: {e}"))?;
    let streams = Arc::new(stream::route::Streams::new(stream::route::CaptureCommand {
        argv: vec![exe.display().to_string(), "capture".to_owned()],
        run_as: run_as.clone(),
        env: base_env.clone(),
        cwd: account.home.clone(),
    }));
    let exec = exec::ExecConfig {
        run_as,
        home: account.home.clone(),
        base_env,
    };
    let processes = Arc::new(airlock_agent::process::Processes::new(exec.clone()));
    let state = Arc::new(server::AgentState {
        token: meta.agent_token.clone(),
        sandbox_id: meta.sandbox_id.clone(),
        image_build_id: image_build_id(Path::new(IMAGE_INFO_PATH)),
        started: Instant::now(),
        exec,
        logins,
        streams,
        processes,
        session: Default::default(),
    });
    drop(meta);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = bind_with_retry(addr, Duration::from_secs(30)).await?;
        tracing::info!(%addr, image = %state.image_build_id, "agent listening");
        server::serve(listener, state, shutdown_signal())
            .await
            .map_err(|e| format!("serving: {e}"))
    })
}

/// The guest's address may appear a moment after the agent starts (a VM
/// configuring its link): retry instead of failing the unit at once.
async fn bind_with_retry(
    addr: SocketAddr,
    patience: Duration,
) -> Result<tokio::net::TcpListener, String> {
    let until = Instant::now() + patience;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if Instant::now() < until && e.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("binding {addr}: {e}")),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_falls_back_to_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("image.json");
        assert_eq!(image_build_id(&p), "unknown");
        std::fs::write(&p, br#"{"build_id":"abcd"}"#).expect("write");
        assert_eq!(image_build_id(&p), "abcd");
        std::fs::write(&p, b"garbage").expect("write");
        assert_eq!(image_build_id(&p), "unknown");
    }
}
