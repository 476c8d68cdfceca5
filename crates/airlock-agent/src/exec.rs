//! `POST /exec`: one command to its end, as a convenience over the process
//! table (`crate::process`): the command is started there like any process
//! (as the sandbox user, in a session of its own, with the timeout enforced
//! on its whole group), this request attaches to it as its only client, and
//! the answer carries what it wrote, capped per stream. Such a process is
//! private to its request: it is not listed, cannot be attached to by
//! anyone else, is killed if the request goes away, and is forgotten once it
//! ended. It does count towards the sandbox's running processes.

use crate::process::{Ended, Proc, ProcessError, Processes};
use airlock_proto::agent::{
    ExecRequest, ExecResponse, DEFAULT_EXEC_TIMEOUT_S, MAX_EXEC_OUTPUT, MAX_EXEC_TIMEOUT_S,
};
use airlock_proto::process::{StartProcess, TAG_STDERR};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    #[error("{0}")]
    TooMany(String),
    #[error("starting the command")]
    Spawn(#[source] ProcessError),
}

/// Whether a request can be run at all, and its timeout.
pub fn check(req: &ExecRequest) -> Result<Duration, ExecError> {
    let timeout = match req.timeout_s {
        Some(0) => return Err(ExecError::BadRequest("timeout_s must be at least 1".into())),
        Some(s) => s.min(MAX_EXEC_TIMEOUT_S),
        None => DEFAULT_EXEC_TIMEOUT_S,
    };
    as_process(req, timeout)
        .check()
        .map_err(ExecError::BadRequest)?;
    Ok(Duration::from_secs(timeout))
}

fn as_process(req: &ExecRequest, timeout_s: u64) -> StartProcess {
    StartProcess {
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: None,
        pty: None,
        stdin: false,
        timeout_s: Some(timeout_s),
    }
}

/// One stream's output as far as the answer keeps it.
#[derive(Debug, Default)]
struct Capture {
    data: Vec<u8>,
    truncated: bool,
}

impl Capture {
    /// Keeps what fits under the cap; the rest is read (the process never
    /// waits on us) and dropped.
    fn take(&mut self, bytes: &[u8]) {
        let room = MAX_EXEC_OUTPUT.saturating_sub(self.data.len());
        if bytes.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// The request's hold on its process: on drop (the answer was sent, or the
/// caller went away half-way) it detaches and kills a group still running.
struct Held {
    proc: Arc<Proc>,
    client: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.proc.leave(self.client);
        self.proc.signal(libc::SIGKILL);
    }
}

/// Runs `req` in `processes` and reports its outcome. Failures of the
/// command itself (not found, non-zero exit, timeout) are answers, not errors.
pub async fn run(processes: &Arc<Processes>, req: ExecRequest) -> Result<ExecResponse, ExecError> {
    let timeout = check(&req)?;
    let program = req.argv[0].clone();
    let proc = match processes.spawn(as_process(&req, timeout.as_secs()), true) {
        Ok(p) => p,
        Err(ProcessError::Spawn { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            // As a shell says it: scripts rely on 127 and 126.
            let (code, why) = match source.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found"),
                _ => (126, "permission denied"),
            };
            return Ok(ExecResponse {
                exit_code: Some(code),
                stdout: String::new(),
                stderr: format!("airlock-agent: {program}: {why}\n"),
                timed_out: false,
                truncated: false,
            });
        }
        Err(ProcessError::BadRequest(m)) => return Err(ExecError::BadRequest(m)),
        Err(ProcessError::TooMany(m)) => return Err(ExecError::TooMany(m)),
        Err(e) => return Err(ExecError::Spawn(e)),
    };
    // Watch before the first read, so no change between the two is missed.
    let mut changed = proc.subscribe();
    let held = Held {
        client: proc.join(0),
        proc,
    };
    let (mut stdout, mut stderr) = (Capture::default(), Capture::default());
    let mut offset = 0;
    let ended = loop {
        let since = held.proc.read_since(offset);
        offset = since.next;
        for (tag, data) in &since.chunks {
            match *tag {
                TAG_STDERR => stderr.take(data),
                _ => stdout.take(data),
            }
        }
        if since.skipped > 0 {
            // Cannot happen to the first client from byte 0; say so if it did.
            stdout.truncated = true;
        }
        held.proc.progress(held.client, offset);
        if let Some(ended) = since.ended {
            break ended;
        }
        if changed.changed().await.is_err() {
            break held.proc.ended().unwrap_or(Ended {
                exit_code: None,
                signal: None,
                timed_out: false,
                at_ms: 0,
            });
        }
    };
    Ok(ExecResponse {
        exit_code: if ended.timed_out {
            None
        } else {
            ended.exit_code
        },
        stdout: stdout.text(),
        stderr: stderr.text(),
        timed_out: ended.timed_out,
        truncated: stdout.truncated || stderr.truncated,
    })
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

    fn table() -> Arc<Processes> {
        Arc::new(Processes::new(cfg()))
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
        let r = run(
            &table(),
            req(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
        )
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
        let r = run(&table(), rq).await.expect("run");
        assert_eq!(r.stdout, "1 x unset\n");
    }

    #[tokio::test]
    async fn missing_program_is_exit_127_not_an_error() {
        let r = run(&table(), req(&["/nonexistent/prog"]))
            .await
            .expect("run");
        assert_eq!(r.exit_code, Some(127));
        assert!(r.stderr.contains("command not found"), "{}", r.stderr);
        let r = run(&table(), req(&["no-such-program-anywhere"]))
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
                run(&table(), rq).await,
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
        let r = run(&table(), rq).await.expect("run");
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
            &table(),
            req(&["sh", "-c", &format!("head -c {n} /dev/zero")]),
        )
        .await
        .expect("run");
        assert_eq!(r.exit_code, Some(0));
        assert!(r.truncated);
        assert_eq!(r.stdout.len(), MAX_EXEC_OUTPUT);
    }

    #[tokio::test]
    async fn the_process_is_private_and_dies_with_its_request() {
        let procs = table();
        let dir = tempfile::tempdir().expect("tmp");
        let pidfile = dir.path().join("pid");
        let mut rq = req(&["sh", "-c", "echo $$ > \"$F\"; exec sleep 30"]);
        rq.env.insert("F".into(), pidfile.display().to_string());
        let gone = tokio::time::timeout(Duration::from_millis(800), run(&procs, rq)).await;
        assert!(gone.is_err(), "sleep 30 cannot have ended");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .expect("pid written")
            .trim()
            .parse()
            .expect("pid");
        // Never listed nor attachable by anyone else.
        assert!(procs.list().is_empty());
        assert!(procs.get(pid).is_err());
        // The request went away: the group is killed and reaped.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < until, "{pid} still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn output_on_both_streams_is_kept_whole_while_it_comes_in_bursts() {
        // Larger than the backlog: the request is attached, so nothing is lost.
        let r = run(
            &table(),
            req(&[
                "sh",
                "-c",
                "head -c 900000 /dev/zero; head -c 700000 /dev/zero >&2; echo end",
            ]),
        )
        .await
        .expect("run");
        assert_eq!(r.exit_code, Some(0));
        assert!(!r.truncated);
        assert_eq!(r.stdout.len(), 900_004);
        assert_eq!(r.stderr.len(), 700_000);
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
        let r = run(
            &Arc::new(Processes::new(c)),
            req(&["sh", "-c", "id -u; id -g; id -G"]),
        )
        .await
        .expect("run");
        assert_eq!(r.stdout, "65534\n65534\n65534 29\n", "{r:?}");
    }
}
