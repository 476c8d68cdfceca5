//! What the control plane asks of a guest: its agent's health and exec, and
//! whether its display is up. [`Guest`] is the seam (the real [`HttpGuest`]
//! speaks HTTP to the agent and RFB to the VNC server; [`fake::FakeGuest`]
//! answers from a [`crate::node::fake::FakeNode`]). The login calls join
//! the trait as methods of their own.

pub mod fake;

pub use crate::app::processes::{Download, IoFrame, ProcessIo};
use crate::relay::rfb;
use airlock_proto::agent::{ExecRequest, ExecResponse, Health, Session};
use airlock_proto::login::{FileSet, LoginInput, LoginStart, LoginStatus};
use airlock_proto::process::{FileInfo, ProcessInfo, ProcessList, StartProcess};
use async_trait::async_trait;
use std::net::SocketAddr;
use std::time::Duration;

/// The guest side of the control plane's work, one method per question.
#[async_trait]
pub trait Guest: Send + Sync + std::fmt::Debug + 'static {
    /// The agent's `/health`.
    async fn health(&self, agent: SocketAddr, token: &str) -> Result<Health, AgentError>;
    /// Run a command through the agent.
    async fn exec(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &ExecRequest,
    ) -> Result<ExecResponse, AgentError>;
    /// Readiness: the VNC server takes our secret and its first frame shows
    /// a desktop (not a blank screen). The error says what is missing.
    async fn desktop_shown(&self, display: SocketAddr, password: &str) -> Result<(), String>;
    /// Heartbeat: the VNC server still takes our secret (a killed Xvnc does not).
    async fn display_answers(&self, display: SocketAddr, password: &str) -> Result<(), String>;

    // ---- logins (app/logins): a guest that runs none says so ----

    /// Start a provider's login command; a repeated start with the same
    /// login id answers the running login.
    async fn login_start(
        &self,
        agent: SocketAddr,
        token: &str,
        start: &LoginStart,
    ) -> Result<LoginStatus, AgentError> {
        let _ = (agent, token, start);
        Err(no_logins())
    }
    /// Where a login stands (no secrets in the answer).
    async fn login_status(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
    ) -> Result<LoginStatus, AgentError> {
        let _ = (agent, token, login_id);
        Err(no_logins())
    }
    /// The credential files the login command wrote (secret).
    async fn login_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
    ) -> Result<FileSet, AgentError> {
        let _ = (agent, token, login_id);
        Err(no_logins())
    }
    /// Type a code the user pasted into the login command.
    async fn login_input(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
        input: &LoginInput,
    ) -> Result<(), AgentError> {
        let _ = (agent, token, login_id, input);
        Err(no_logins())
    }
    /// Write credential files into this (workspace) guest's home.
    async fn deliver_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        files: &FileSet,
    ) -> Result<(), AgentError> {
        let _ = (agent, token, files);
        Err(no_logins())
    }

    // ---- credentials in a workspace (app/credentials) ----

    /// Read files of the sandbox user's home (relative paths, checked by
    /// the provider definition); a file that is absent, not a regular file,
    /// or larger than [`MAX_HOME_FILE`] is left out of the answer.
    async fn read_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        paths: &[String],
    ) -> Result<FileSet, AgentError> {
        let _ = (agent, token, paths);
        Err(no_logins())
    }
    /// Remove files of the sandbox user's home; an absent one is no error.
    async fn remove_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        paths: &[String],
    ) -> Result<(), AgentError> {
        let _ = (agent, token, paths);
        Err(no_logins())
    }
    // ---- warm pools (app/pool): a claimed member learns its owner ----

    /// Hand a claimed pool member its session (`PUT /session`).
    async fn hand_session(
        &self,
        agent: SocketAddr,
        token: &str,
        session: &Session,
    ) -> Result<(), AgentError> {
        let _ = (agent, token, session);
        Err(no_sessions())
    }
    /// The session the agent holds (`GET /session`); `None` for a sandbox
    /// that was never claimed from a pool.
    async fn session(&self, agent: SocketAddr, token: &str) -> Result<Option<Session>, AgentError> {
        let _ = (agent, token);
        Err(no_sessions())
    }
    // ---- processes and files (app/processes): a guest without them says so ----

    /// Start a process (`POST /processes` of the agent).
    async fn process_start(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &StartProcess,
    ) -> Result<ProcessInfo, AgentError> {
        let _ = (agent, token, req);
        Err(no_processes())
    }
    /// The guest's processes, running and recently ended.
    async fn process_list(
        &self,
        agent: SocketAddr,
        token: &str,
    ) -> Result<ProcessList, AgentError> {
        let _ = (agent, token);
        Err(no_processes())
    }
    /// One process.
    async fn process_get(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
    ) -> Result<ProcessInfo, AgentError> {
        let _ = (agent, token, pid);
        Err(no_processes())
    }
    /// Signal a process's group (SIGKILL when `signal` is `None`).
    async fn process_kill(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
        signal: Option<&str>,
    ) -> Result<ProcessInfo, AgentError> {
        let _ = (agent, token, pid, signal);
        Err(no_processes())
    }
    /// Attach to a process's io from output byte `offset` on.
    async fn process_io(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
        offset: u64,
    ) -> Result<ProcessIo, AgentError> {
        let _ = (agent, token, pid, offset);
        Err(no_processes())
    }
    /// Write one file as the sandbox user, from a body read as it comes
    /// (an error from the body ends the upload).
    async fn file_put(
        &self,
        agent: SocketAddr,
        token: &str,
        path: &str,
        body: axum::body::Body,
    ) -> Result<FileInfo, AgentError> {
        let _ = (agent, token, path, body);
        Err(no_processes())
    }
    /// Read one file, or a directory as a tar stream.
    async fn file_get(
        &self,
        agent: SocketAddr,
        token: &str,
        path: &str,
    ) -> Result<Download, AgentError> {
        let _ = (agent, token, path);
        Err(no_processes())
    }
}

fn no_processes() -> AgentError {
    AgentError::Status {
        status: 501,
        message: "this guest runs no processes".into(),
    }
}

fn no_sessions() -> AgentError {
    AgentError::Status {
        status: 501,
        message: "this guest takes no sessions".into(),
    }
}

/// The largest credential file read back from a workspace.
pub const MAX_HOME_FILE: u64 = 256 * 1024;

/// Prints `<path>\t<base64>` for each argument that is a regular file (not
/// a link) of at most [`MAX_HOME_FILE`] bytes; run by the agent as the
/// sandbox user in its home, the paths given as arguments (never as text
/// of the script).
const READ_SCRIPT: &str = r#"for f in "$@"; do
  if [ -f "$f" ] && [ ! -L "$f" ] && [ "$(stat -c %s -- "$f")" -le "$AIRLOCK_MAX" ]; then
    printf '%s\t' "$f"; base64 -w0 -- "$f" || exit 3; printf '\n'
  fi
done"#;

/// The exec request that reads `paths` (see [`READ_SCRIPT`]).
pub fn read_files_request(paths: &[String]) -> ExecRequest {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        READ_SCRIPT.to_owned(),
        "sh".to_owned(),
    ];
    argv.extend(
        paths
            .iter()
            .filter(|p| airlock_proto::login::safe_relative(p) && !p.contains(['\t', '\n']))
            .cloned(),
    );
    ExecRequest {
        argv,
        env: [("AIRLOCK_MAX".to_owned(), MAX_HOME_FILE.to_string())].into(),
        timeout_s: Some(30),
    }
}

/// The files in what [`READ_SCRIPT`] printed.
pub fn parse_read_files(out: &ExecResponse) -> Result<FileSet, AgentError> {
    let bad = |why: &str| AgentError::Status {
        status: 502,
        message: format!("reading the files: {why}"),
    };
    if out.exit_code != Some(0) || out.truncated || out.timed_out {
        return Err(bad(&format!(
            "the reader exited {:?}{}",
            out.exit_code,
            if out.timed_out { " (timed out)" } else { "" }
        )));
    }
    let mut files = Vec::new();
    for line in out.stdout.lines().filter(|l| !l.is_empty()) {
        let (path, b64) = line
            .split_once('\t')
            .ok_or_else(|| bad("a line without a tab"))?;
        files.push(airlock_proto::login::FileBlob {
            path: path.to_owned(),
            contents_b64: b64.to_owned(),
        });
    }
    Ok(FileSet { files })
}

fn no_logins() -> AgentError {
    AgentError::Status {
        status: 501,
        message: "this guest runs no logins".into(),
    }
}

/// The real guest: HTTP to the agent, RFB to the display.
#[derive(Debug, Clone, Default)]
pub struct HttpGuest {
    pub client: AgentClient,
}

const DISPLAY_TIMEOUT: Duration = Duration::from_secs(5);

#[async_trait]
impl Guest for HttpGuest {
    async fn health(&self, agent: SocketAddr, token: &str) -> Result<Health, AgentError> {
        self.client.health(agent, token).await
    }

    async fn exec(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &ExecRequest,
    ) -> Result<ExecResponse, AgentError> {
        self.client.exec(agent, token, req).await
    }

    async fn desktop_shown(&self, display: SocketAddr, password: &str) -> Result<(), String> {
        let frame = tokio::time::timeout(DISPLAY_TIMEOUT, async {
            let mut tcp = tokio::net::TcpStream::connect(display).await?;
            rfb::client_handshake(&mut tcp, password).await?;
            rfb::read_frame(&mut rfb::IoWire(tcp)).await
        })
        .await
        .map_err(|_| "the VNC server did not send a frame in time".to_owned())?
        .map_err(|e| format!("VNC: {e}"))?;
        if !frame.looks_like_desktop() {
            return Err(format!(
                "the display is still blank ({} colours)",
                frame.distinct_colours
            ));
        }
        Ok(())
    }

    async fn login_start(
        &self,
        agent: SocketAddr,
        token: &str,
        start: &LoginStart,
    ) -> Result<LoginStatus, AgentError> {
        self.client
            .call(reqwest::Method::POST, agent, token, "/login", Some(start))
            .await?
            .ok_or_else(|| empty("login status"))
    }

    async fn login_status(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
    ) -> Result<LoginStatus, AgentError> {
        let path = format!("/login/{login_id}");
        self.client
            .call::<(), _>(reqwest::Method::GET, agent, token, &path, None)
            .await?
            .ok_or_else(|| empty("login status"))
    }

    async fn login_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
    ) -> Result<FileSet, AgentError> {
        let path = format!("/login/{login_id}/credentials");
        self.client
            .call::<(), _>(reqwest::Method::GET, agent, token, &path, None)
            .await?
            .ok_or_else(|| empty("credentials"))
    }

    async fn login_input(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
        input: &LoginInput,
    ) -> Result<(), AgentError> {
        let path = format!("/login/{login_id}/input");
        self.client
            .call::<_, serde_json::Value>(reqwest::Method::POST, agent, token, &path, Some(input))
            .await
            .map(drop)
    }

    async fn deliver_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        files: &FileSet,
    ) -> Result<(), AgentError> {
        self.client
            .call::<_, serde_json::Value>(
                reqwest::Method::POST,
                agent,
                token,
                "/credentials/deliver",
                Some(files),
            )
            .await
            .map(drop)
    }

    async fn read_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        paths: &[String],
    ) -> Result<FileSet, AgentError> {
        let out = self
            .client
            .exec(agent, token, &read_files_request(paths))
            .await?;
        parse_read_files(&out)
    }

    async fn remove_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        paths: &[String],
    ) -> Result<(), AgentError> {
        let mut argv = vec!["rm".to_owned(), "-f".to_owned(), "--".to_owned()];
        argv.extend(
            paths
                .iter()
                .filter(|p| airlock_proto::login::safe_relative(p))
                .cloned(),
        );
        let req = ExecRequest {
            argv,
            env: Default::default(),
            timeout_s: Some(30),
        };
        let out = self.client.exec(agent, token, &req).await?;
        if out.exit_code != Some(0) {
            return Err(AgentError::Status {
                status: 502,
                message: format!(
                    "removing the files: rm exited {:?}: {}",
                    out.exit_code,
                    out.stderr.chars().take(300).collect::<String>()
                ),
            });
        }
        Ok(())
    }

    async fn hand_session(
        &self,
        agent: SocketAddr,
        token: &str,
        session: &Session,
    ) -> Result<(), AgentError> {
        self.client
            .call::<_, serde_json::Value>(
                reqwest::Method::PUT,
                agent,
                token,
                "/session",
                Some(session),
            )
            .await
            .map(drop)
    }

    async fn session(&self, agent: SocketAddr, token: &str) -> Result<Option<Session>, AgentError> {
        match self
            .client
            .call::<(), Session>(reqwest::Method::GET, agent, token, "/session", None)
            .await
        {
            Ok(s) => Ok(s),
            Err(AgentError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn process_start(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &StartProcess,
    ) -> Result<ProcessInfo, AgentError> {
        self.client
            .call(reqwest::Method::POST, agent, token, "/processes", Some(req))
            .await?
            .ok_or_else(|| empty("process"))
    }

    async fn process_list(
        &self,
        agent: SocketAddr,
        token: &str,
    ) -> Result<ProcessList, AgentError> {
        self.client
            .call::<(), _>(reqwest::Method::GET, agent, token, "/processes", None)
            .await?
            .ok_or_else(|| empty("process list"))
    }

    async fn process_get(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
    ) -> Result<ProcessInfo, AgentError> {
        let path = format!("/processes/{pid}");
        self.client
            .call::<(), _>(reqwest::Method::GET, agent, token, &path, None)
            .await?
            .ok_or_else(|| empty("process"))
    }

    async fn process_kill(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
        signal: Option<&str>,
    ) -> Result<ProcessInfo, AgentError> {
        let path = match signal {
            Some(s) => format!(
                "/processes/{pid}?signal={}",
                crate::app::processes::query_escape(s)
            ),
            None => format!("/processes/{pid}"),
        };
        self.client
            .call::<(), _>(reqwest::Method::DELETE, agent, token, &path, None)
            .await?
            .ok_or_else(|| empty("process"))
    }

    async fn process_io(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
        offset: u64,
    ) -> Result<ProcessIo, AgentError> {
        crate::app::processes::connect_io(agent, token, pid, offset).await
    }

    async fn file_put(
        &self,
        agent: SocketAddr,
        token: &str,
        path: &str,
        body: axum::body::Body,
    ) -> Result<FileInfo, AgentError> {
        crate::app::processes::put_file(&self.client, agent, token, path, body).await
    }

    async fn file_get(
        &self,
        agent: SocketAddr,
        token: &str,
        path: &str,
    ) -> Result<Download, AgentError> {
        crate::app::processes::get_file(&self.client, agent, token, path).await
    }

    async fn display_answers(&self, display: SocketAddr, password: &str) -> Result<(), String> {
        tokio::time::timeout(DISPLAY_TIMEOUT, async {
            let mut tcp = tokio::net::TcpStream::connect(display).await?;
            rfb::client_handshake(&mut tcp, password).await
        })
        .await
        .map_err(|_| "the VNC server did not answer in time".to_owned())?
        .map_err(|e| format!("VNC: {e}"))
    }
}

/// An answer without the body it should have had.
fn empty(what: &str) -> AgentError {
    AgentError::Status {
        status: 204,
        message: format!("no {what} in the answer"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the sandbox's agent is unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("the sandbox's agent answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the sandbox's agent sent an answer that could not be read")]
    Decode(#[source] reqwest::Error),
    /// Nothing answered (a fake guest that is down, a closed port).
    #[error("the sandbox's agent is unreachable: {0}")]
    Down(String),
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    pub(crate) http: reqwest::Client,
}

impl Default for AgentClient {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentClient {
    pub fn new() -> Self {
        // Guests are on private links: never send this traffic through a proxy
        // taken from the environment.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        AgentClient { http }
    }

    pub async fn health(&self, addr: SocketAddr, token: &str) -> Result<Health, AgentError> {
        let resp = self
            .http
            .get(format!("http://{addr}/health"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .map_err(AgentError::Unreachable)?;
        decode(resp).await
    }

    pub async fn exec(
        &self,
        addr: SocketAddr,
        token: &str,
        req: &ExecRequest,
    ) -> Result<ExecResponse, AgentError> {
        let limit = req
            .timeout_s
            .unwrap_or(airlock_proto::agent::DEFAULT_EXEC_TIMEOUT_S);
        let resp = self
            .http
            .post(format!("http://{addr}/exec"))
            .bearer_auth(token)
            .json(req)
            .timeout(Duration::from_secs(limit + 10))
            .send()
            .await
            .map_err(AgentError::Unreachable)?;
        decode(resp).await
    }
}

impl AgentClient {
    /// A JSON request to one of the agent's other endpoints (logins, delivery);
    /// `None` for answers without a body.
    pub async fn call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        addr: SocketAddr,
        token: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, AgentError> {
        let mut req = self
            .http
            .request(method, format!("http://{addr}{path}"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(20));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(AgentError::Unreachable)?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        decode(resp).await.map(Some)
    }
}

pub(crate) async fn decode<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, AgentError> {
    let status = resp.status();
    if status.is_success() {
        return resp.json().await.map_err(AgentError::Decode);
    }
    let message = match resp.json::<airlock_proto::agent::AgentError>().await {
        Ok(e) => e.error,
        Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    Err(AgentError::Status {
        status: status.as_u16(),
        message,
    })
}
