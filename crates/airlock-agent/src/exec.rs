//! `POST /exec`: runs one command as the sandbox user, with a clean
//! environment, a deadline enforced on its whole process group, and output
//! capped per stream.

use crate::privdrop::Session;
use airlock_proto::agent::{
    ExecRequest, ExecResponse, DEFAULT_EXEC_TIMEOUT_S, MAX_EXEC_OUTPUT, MAX_EXEC_TIMEOUT_S,
};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

/// How long pipes may stay open after the command itself exited (a background
/// child holding them) before the agent answers with what it has.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Whose identity commands take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// The agent's own (tests, or an agent not running as root).
    Current,
    User {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
}

#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub run_as: RunAs,
    pub home: PathBuf,
    /// Environment every command starts from; the request's `env` is laid over it.
    pub base_env: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    BadRequest(String),
    #[error("starting the command")]
    Spawn(#[source] std::io::Error),
    #[error("waiting for the command")]
    Wait(#[source] std::io::Error),
}

/// Whether a request can be run at all, and its timeout.
pub fn check(req: &ExecRequest) -> Result<Duration, ExecError> {
    let bad = |m: &str| Err(ExecError::BadRequest(m.to_owned()));
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return bad("argv must name a program");
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return bad("argv must not contain NUL bytes");
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return bad("env names must be non-empty without '=' or NUL, values without NUL");
        }
    }
    match req.timeout_s {
        Some(0) => bad("timeout_s must be at least 1"),
        Some(s) => Ok(Duration::from_secs(s.min(MAX_EXEC_TIMEOUT_S))),
        None => Ok(Duration::from_secs(DEFAULT_EXEC_TIMEOUT_S)),
    }
}

#[derive(Debug, Default)]
struct Capture {
    data: Vec<u8>,
    truncated: bool,
}

/// Keeps reading past the cap (discarding) so the writer never blocks on a full pipe.
async fn drain<R: AsyncRead + Unpin>(mut reader: R, sink: Arc<Mutex<Capture>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut c = sink.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_EXEC_OUTPUT.saturating_sub(c.data.len());
        if n > room {
            c.truncated = true;
        }
        let keep = n.min(room);
        c.data.extend_from_slice(&buf[..keep]);
    }
}

fn take(c: &Arc<Mutex<Capture>>) -> (String, bool) {
    let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
    let data = std::mem::take(&mut c.data);
    (String::from_utf8_lossy(&data).into_owned(), c.truncated)
}

/// Kills the command's whole process group unless disarmed: on timeout, and when
/// the request is dropped half-way (the client went away).
pub(crate) struct GroupKiller {
    pub(crate) pgid: Option<i32>,
}

impl GroupKiller {
    #[allow(unsafe_code)]
    pub(crate) fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `req` and reports its outcome. Failures of the command itself (not
/// found, non-zero exit, timeout) are answers, not errors.
pub async fn run(cfg: &ExecConfig, req: ExecRequest) -> Result<ExecResponse, ExecError> {
    let timeout = check(&req)?;
    let program = &req.argv[0];
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(cfg.base_env.iter().map(|(k, v)| (k, v)))
        .envs(&req.env)
        .current_dir(if cfg.home.is_dir() {
            cfg.home.clone()
        } else {
            PathBuf::from("/")
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::privdrop::drop_to(cmd.as_std_mut(), &cfg.run_as, Session::Inherit);

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let (code, why) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found"),
                std::io::ErrorKind::PermissionDenied => (126, "permission denied"),
                _ => return Err(ExecError::Spawn(e)),
            };
            return Ok(ExecResponse {
                exit_code: Some(code),
                stdout: String::new(),
                stderr: format!("airlock-agent: {program}: {why}\n"),
                timed_out: false,
                truncated: false,
            });
        }
    };
    let mut killer = GroupKiller {
        pgid: child.id().map(|p| p as i32),
    };
    let out = Arc::new(Mutex::new(Capture::default()));
    let err = Arc::new(Mutex::new(Capture::default()));
    let mut readers = Vec::new();
    if let Some(s) = child.stdout.take() {
        readers.push(tokio::spawn(drain(s, out.clone())));
    }
    if let Some(s) = child.stderr.take() {
        readers.push(tokio::spawn(drain(s, err.clone())));
    }

    let deadline = Instant::now() + timeout;
    let (status, timed_out) = tokio::select! {
        status = child.wait() => (status.map_err(ExecError::Wait)?, false),
        _ = tokio::time::sleep_until(deadline) => {
            killer.kill();
            (child.wait().await.map_err(ExecError::Wait)?, true)
        }
    };
    if !timed_out {
        // The command finished on its own: whatever it left behind may keep running.
        killer.pgid = None;
    }
    let grace = Instant::now() + PIPE_GRACE;
    for r in &mut readers {
        if tokio::time::timeout_at(grace, &mut *r).await.is_err() {
            r.abort();
        }
    }
    let (stdout, t1) = take(&out);
    let (stderr, t2) = take(&err);
    Ok(ExecResponse {
        exit_code: if timed_out { None } else { status.code() },
        stdout,
        stderr,
        timed_out,
        truncated: t1 || t2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg() -> ExecConfig {
        ExecConfig {
            run_as: RunAs::Current,
            home: std::env::temp_dir(),
            base_env: vec![
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                ("FROM_BASE".into(), "1".into()),
            ],
        }
    }

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            timeout_s: None,
        }
    }

    #[tokio::test]
    async fn runs_and_captures_both_streams() {
        let r = run(&cfg(), req(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]))
            .await
            .expect("run");
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.stdout, "hi\n");
        assert_eq!(r.stderr, "oops\n");
        assert!(!r.timed_out && !r.truncated);
    }

    #[tokio::test]
    async fn environment_is_clean_and_request_env_wins() {
        let mut rq = req(&["sh", "-c", "echo $FROM_BASE $EXTRA ${CARGO:-unset}"]);
        rq.env.insert("EXTRA".into(), "x".into());
        let r = run(&cfg(), rq).await.expect("run");
        assert_eq!(r.stdout, "1 x unset\n");
    }

    #[tokio::test]
    async fn missing_program_is_exit_127_not_an_error() {
        let r = run(&cfg(), req(&["/nonexistent/prog"])).await.expect("run");
        assert_eq!(r.exit_code, Some(127));
        assert!(r.stderr.contains("command not found"), "{}", r.stderr);
        let r = run(&cfg(), req(&["no-such-program-anywhere"]))
            .await
            .expect("run");
        assert_eq!(r.exit_code, Some(127));
    }

    #[tokio::test]
    async fn bad_input_is_rejected() {
        for rq in [
            req(&[]),
            req(&[""]),
            req(&["a\0b"]),
            ExecRequest {
                timeout_s: Some(0),
                ..req(&["true"])
            },
            ExecRequest {
                env: [("A=B".to_string(), "c".to_string())].into(),
                ..req(&["true"])
            },
        ] {
            assert!(matches!(
                run(&cfg(), rq).await,
                Err(ExecError::BadRequest(_))
            ));
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let started = std::time::Instant::now();
        // The background sleep shares the group and holds stdout: both must die.
        let mut rq = req(&["sh", "-c", "sleep 30 & echo started; sleep 30"]);
        rq.timeout_s = Some(1);
        let r = run(&cfg(), rq).await.expect("run");
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.stdout, "started\n");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn output_is_capped_and_flagged() {
        let n = MAX_EXEC_OUTPUT + 4096;
        let r = run(
            &cfg(),
            req(&["sh", "-c", &format!("head -c {n} /dev/zero")]),
        )
        .await
        .expect("run");
        assert_eq!(r.exit_code, Some(0));
        assert!(r.truncated);
        assert_eq!(r.stdout.len(), MAX_EXEC_OUTPUT);
    }

    #[tokio::test]
    async fn switches_user_when_root() {
        if !matches!(std::fs::read_to_string("/proc/self/status"), Ok(s) if s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        {
            eprintln!("skipped: switching users needs root");
            return;
        }
        let c = ExecConfig {
            run_as: RunAs::User {
                uid: 65534,
                gid: 65534,
                groups: vec![65534, 29],
            },
            ..cfg()
        };
        let r = run(&c, req(&["sh", "-c", "id -u; id -g; id -G"]))
            .await
            .expect("run");
        assert_eq!(r.stdout, "65534\n65534\n65534 29\n", "{r:?}");
    }
}
