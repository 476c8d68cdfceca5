//! Login capture: runs a provider's own login command under a PTY as the
//! sandbox user, answers its prompts, takes its login URL, opens that URL in
//! the desktop's Chromium, and watches for the credential files it writes.
//! Also writes delivered credentials into a workspace's home.
//!
//! ```text
//!  running ──URL seen──▶ awaiting_user ──files valid──▶ captured
//!     │                       │
//!     └───────────┬───────────┘ command exits without files / cannot start
//!                 ▼
//!               failed
//! ```
//!
//! URLs come first from what the CLI asks a browser to open: `BROWSER` and an
//! `xdg-open` early in `PATH` point at a hook that appends the URL to a file
//! the agent reads. That URL is exactly what a browser would get (claude-code,
//! for one, shows a shortened link on screen but opens the full one). The PTY
//! output, with terminal escapes stripped, is the fallback.

use crate::exec::RunAs;
use airlock_proto::login::{
    safe_relative, AgentLoginPhase, FileBlob, FileSet, LoginStart, LoginStatus, ProviderDef,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The hook a CLI runs to open a URL (in the image, `usr/local/libexec`).
pub const HOOK_DIR: &str = "/usr/local/libexec/airlock/login-bin";
/// Per-login scratch directories (the URL file).
const RUN_DIR: &str = "/run/airlock/login";
const PTY_ROWS: u16 = 50;
/// How much stripped output is kept for prompts and failure reasons.
const TAIL_BYTES: usize = 16 * 1024;
/// After the credentials are captured the CLI may still finish its own work
/// (fetching a profile, writing settings); then it is stopped.
const AFTER_CAPTURE_GRACE: Duration = Duration::from_secs(20);
/// How long a URL read off the screen waits for the browser hook's before it
/// is opened. A CLI may show a shortened link (Claude Code does) and hand the
/// browser the full one a moment later; the hook's is what the CLI itself opens.
const SCREEN_URL_GRACE: Duration = Duration::from_millis(1500);
/// Largest credential file taken or written.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no login {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoginError {
    let what = what.into();
    move |source| LoginError::Io { what, source }
}

/// What commands run with: the same identity and environment as `/exec`.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub run_as: RunAs,
    pub home: PathBuf,
    pub base_env: Vec<(String, String)>,
    pub gateway: String,
    pub hook_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Opens a URL in the desktop's browser.
    pub browser: Vec<String>,
}

impl LoginConfig {
    pub fn guest(
        run_as: RunAs,
        home: PathBuf,
        base_env: Vec<(String, String)>,
        gateway: String,
    ) -> Self {
        LoginConfig {
            run_as,
            home,
            base_env,
            gateway,
            hook_dir: PathBuf::from(HOOK_DIR),
            run_dir: PathBuf::from(RUN_DIR),
            browser: vec!["/usr/local/bin/airlock-chromium".into()],
        }
    }
}

#[derive(Debug)]
struct RunState {
    phase: AgentLoginPhase,
    url: Option<String>,
    awaiting_code: bool,
    error: Option<String>,
    /// Escape-stripped output, whitespace collapsed, the last [`TAIL_BYTES`].
    tail: String,
    /// Index in `tail` up to which prompts were already answered.
    answered_upto: usize,
    /// Which prompts were answered (each once).
    answered: Vec<bool>,
}

struct Run {
    def: ProviderDef,
    state: Mutex<RunState>,
    master: Mutex<std::fs::File>,
    pgid: i32,
    dir: PathBuf,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("provider", &self.def.name)
            .field("pgid", &self.pgid)
            .finish_non_exhaustive()
    }
}

impl Run {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[allow(unsafe_code)]
    fn kill(&self) {
        // SAFETY: kill(2) on a process group id; no memory is involved.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
    }

    fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut m = self.master.lock().unwrap_or_else(|p| p.into_inner());
        m.write_all(bytes)?;
        m.flush()
    }
}

/// Every login this agent runs, by login id.
#[derive(Debug)]
pub struct Logins {
    cfg: LoginConfig,
    runs: Mutex<HashMap<String, Arc<Run>>>,
}

impl Logins {
    pub fn new(cfg: LoginConfig) -> Self {
        Logins {
            cfg,
            runs: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Run>, LoginError> {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| LoginError::NotFound(id.to_owned()))
    }

    /// Start a login; starting one that already runs answers its status (the
    /// control plane may repeat itself after a restart).
    pub fn start(self: &Arc<Self>, req: LoginStart) -> Result<LoginStatus, LoginError> {
        req.provider.validate().map_err(LoginError::BadRequest)?;
        if req.login_id.is_empty()
            || req.login_id.len() > 64
            || !req
                .login_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(LoginError::BadRequest(
                "login_id: 1 to 64 letters, digits or '-'".into(),
            ));
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = runs.get(&req.login_id) {
            if run.def != req.provider {
                return Err(LoginError::Conflict(format!(
                    "login {} already runs another provider",
                    req.login_id
                )));
            }
            return Ok(status_of(&req.login_id, run));
        }
        let run = Arc::new(self.spawn(&req)?);
        runs.insert(req.login_id.clone(), run.clone());
        drop(runs);
        let me = self.clone();
        let id = req.login_id.clone();
        tokio::spawn(async move { me.watch(&id, run).await });
        Ok(self.status(&req.login_id).unwrap_or(LoginStatus {
            login_id: req.login_id,
            phase: AgentLoginPhase::Running,
            login_url: None,
            awaiting_code: false,
            error: None,
        }))
    }

    pub fn status(&self, id: &str) -> Result<LoginStatus, LoginError> {
        let run = self.get(id)?;
        Ok(status_of(id, &run))
    }

    /// The captured files; only once every one is present and valid.
    pub fn credentials(&self, id: &str) -> Result<FileSet, LoginError> {
        let run = self.get(id)?;
        if run.lock().phase != AgentLoginPhase::Captured {
            return Err(LoginError::Conflict(format!(
                "login {id} has not captured its credentials"
            )));
        }
        let mut files = Vec::new();
        for c in &run.def.credentials {
            let bytes = read_limited(&self.cfg.home, &c.path)?;
            files.push(FileBlob {
                path: c.path.clone(),
                contents_b64: B64.encode(&bytes),
            });
        }
        Ok(FileSet { files })
    }

    /// Types a code the user pasted, then Enter.
    pub fn input(&self, id: &str, text: &str) -> Result<(), LoginError> {
        if text.is_empty() || text.len() > 4096 || text.chars().any(|c| c.is_control()) {
            return Err(LoginError::BadRequest(
                "text: 1 to 4096 characters, no control characters".into(),
            ));
        }
        let run = self.get(id)?;
        if run.lock().phase == AgentLoginPhase::Failed {
            return Err(LoginError::Conflict(format!("login {id} has ended")));
        }
        // Sent as one write and Enter apart: TUIs treat a fast burst ending in
        // \r as a paste and keep the \r in the field.
        run.send(text.as_bytes())
            .map_err(io("typing into the PTY"))?;
        std::thread::sleep(Duration::from_millis(150));
        run.send(b"\r").map_err(io("typing into the PTY"))?;
        run.lock().awaiting_code = false;
        Ok(())
    }

    /// Stop a login and forget it; unknown ids are fine.
    pub fn cancel(&self, id: &str) {
        let run = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(run) = run {
            run.kill();
            let _ = std::fs::remove_dir_all(&run.dir);
        }
    }

    fn command_env(&self, def: &ProviderDef, urls: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.cfg.base_env.clone();
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        env.retain(|(k, _)| k != "PATH");
        let hook = self.cfg.hook_dir.join("xdg-open");
        env.extend([
            (
                "PATH".to_owned(),
                format!("{}:{path}", self.cfg.hook_dir.display()),
            ),
            ("BROWSER".to_owned(), hook.display().to_string()),
            ("AIRLOCK_LOGIN_URLS".to_owned(), urls.display().to_string()),
            ("TERM".to_owned(), "xterm-256color".to_owned()),
            ("COLORTERM".to_owned(), "truecolor".to_owned()),
            ("COLUMNS".to_owned(), def.cols.to_string()),
            ("LINES".to_owned(), PTY_ROWS.to_string()),
        ]);
        for (k, v) in &def.env {
            env.retain(|(e, _)| e != k);
            env.push((k.clone(), v.replace("{gateway}", &self.cfg.gateway)));
        }
        env
    }

    fn spawn(&self, req: &LoginStart) -> Result<Run, LoginError> {
        let def = &req.provider;
        let dir = self.cfg.run_dir.join(&req.login_id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let urls = dir.join("urls");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&urls)
            .map_err(io("creating the URL file"))?;
        if let RunAs::User { uid, gid, .. } = &self.cfg.run_as {
            for p in [&dir, &urls] {
                std::os::unix::fs::chown(p, Some(*uid), Some(*gid))
                    .map_err(io("handing the URL file to the sandbox user"))?;
            }
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restricting the login directory"))?;

        let (master, slave) = open_pty(def.cols, PTY_ROWS).map_err(io("opening a PTY"))?;
        let mut cmd = std::process::Command::new(&def.command[0]);
        cmd.args(&def.command[1..])
            .env_clear()
            .envs(self.command_env(def, &urls))
            .current_dir(if self.cfg.home.is_dir() {
                self.cfg.home.clone()
            } else {
                PathBuf::from("/")
            });
        let stdio = |fd: &OwnedFd| -> Result<std::process::Stdio, LoginError> {
            Ok(std::process::Stdio::from(
                fd.try_clone().map_err(io("duplicating the PTY"))?,
            ))
        };
        cmd.stdin(stdio(&slave)?)
            .stdout(stdio(&slave)?)
            .stderr(stdio(&slave)?);
        become_session_leader(&mut cmd, self.cfg.run_as.clone());
        let child = cmd.spawn().map_err(io(format!(
            "starting {} (the provider's login command)",
            def.command[0]
        )))?;
        drop(slave);
        let pgid = child.id() as i32;
        let master = std::fs::File::from(master);
        let reader = master.try_clone().map_err(io("duplicating the PTY"))?;
        let run = Run {
            def: def.clone(),
            state: Mutex::new(RunState {
                phase: AgentLoginPhase::Running,
                url: None,
                awaiting_code: false,
                error: None,
                tail: String::new(),
                answered_upto: 0,
                answered: vec![false; def.prompts.len()],
            }),
            master: Mutex::new(master),
            pgid,
            dir,
        };
        tracing::info!(login = %req.login_id, provider = %def.name, pid = pgid, "login command started");
        spawn_reader(reader, child, req.login_id.clone());
        Ok(run)
    }

    /// Follows one login until it is captured or failed.
    async fn watch(self: Arc<Self>, id: &str, run: Arc<Run>) {
        let mut opened = false;
        let mut captured_at: Option<tokio::time::Instant> = None;
        let mut exited_at: Option<tokio::time::Instant> = None;
        let mut reader_state = ReaderShared::lookup(id);
        let mut hooked_url = false;
        let mut screen_url_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !self
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
            {
                ReaderShared::forget(id);
                return; // cancelled
            }
            // New output: prompts, URLs in the text, the code prompt.
            if let Some(shared) = &reader_state {
                let (chunk, exited) = shared.take();
                if !chunk.is_empty() {
                    self.on_output(&run, &chunk);
                }
                if let Some(status) = exited {
                    exited_at.get_or_insert_with(tokio::time::Instant::now);
                    run.lock().error.get_or_insert(status);
                }
            } else {
                reader_state = ReaderShared::lookup(id);
            }
            // The hook's URLs win over whatever the screen showed.
            let hooked = std::fs::read_to_string(run.dir.join("urls")).unwrap_or_default();
            let from_hook = hooked
                .lines()
                .map(str::trim)
                .find(|u| matches_prefix(&run.def, u))
                .map(str::to_owned);
            {
                let mut st = run.lock();
                if let Some(u) = from_hook {
                    hooked_url = true;
                    if st.url.as_deref() != Some(u.as_str()) && !opened {
                        st.url = Some(u);
                    }
                }
            }
            let url = run.lock().url.clone();
            if url.is_some() {
                screen_url_since.get_or_insert_with(tokio::time::Instant::now);
            }
            let settled =
                hooked_url || screen_url_since.is_some_and(|at| at.elapsed() >= SCREEN_URL_GRACE);
            if let (Some(url), false, true) = (url, opened, settled) {
                opened = true;
                self.open_in_browser(&url);
                let mut st = run.lock();
                if st.phase == AgentLoginPhase::Running {
                    st.phase = AgentLoginPhase::AwaitingUser;
                }
                tracing::info!(login = %id, "login URL captured and opened");
            }
            // Credentials.
            if captured_at.is_none() && self.all_valid(&run.def) {
                captured_at = Some(tokio::time::Instant::now());
                let mut st = run.lock();
                st.phase = AgentLoginPhase::Captured;
                st.awaiting_code = false;
                st.error = None;
                tracing::info!(login = %id, "credentials captured");
            }
            if let Some(at) = captured_at {
                if exited_at.is_some() || at.elapsed() > AFTER_CAPTURE_GRACE {
                    run.kill();
                    ReaderShared::forget(id);
                    return;
                }
                continue;
            }
            // The command ended without credentials: give files written at the
            // very end a moment, then fail with its last words.
            if let Some(at) = exited_at {
                if at.elapsed() > Duration::from_secs(2) {
                    let mut st = run.lock();
                    let last = last_words(&st.tail);
                    let status = st.error.take().unwrap_or_else(|| "exited".into());
                    st.error = Some(format!(
                        "the login command {status} before signing in; its last output: {last}"
                    ));
                    st.phase = AgentLoginPhase::Failed;
                    tracing::warn!(login = %id, "login command ended without credentials");
                    ReaderShared::forget(id);
                    return;
                }
            }
        }
    }

    fn on_output(&self, run: &Run, chunk: &str) {
        let mut to_send = Vec::new();
        {
            let mut st = run.lock();
            st.tail.push_str(chunk);
            if st.tail.len() > TAIL_BYTES {
                let cut = st.tail.len() - TAIL_BYTES;
                let cut = (cut..st.tail.len())
                    .find(|i| st.tail.is_char_boundary(*i))
                    .unwrap_or(0);
                st.tail.drain(..cut);
                st.answered_upto = st.answered_upto.saturating_sub(cut);
            }
            let fresh_from = st.answered_upto.min(st.tail.len());
            let fresh = collapse(&st.tail[fresh_from..]);
            for (i, p) in run.def.prompts.iter().enumerate() {
                if !st.answered[i] && fresh.contains(&collapse(&p.expect)) {
                    st.answered[i] = true;
                    to_send.push(p.send.clone());
                }
            }
            if !to_send.is_empty() {
                st.answered_upto = st.tail.len();
            }
            if st.url.is_none() {
                if let Some(u) = find_url(&run.def, &st.tail) {
                    st.url = Some(u);
                }
            }
            // A CLI shows its code prompt right after the URL, often in the
            // same chunk, before the URL is opened and the phase moves on:
            // remember it, and report it once the login awaits the user.
            if let Some(cp) = &run.def.code_prompt {
                if matches!(
                    st.phase,
                    AgentLoginPhase::Running | AgentLoginPhase::AwaitingUser
                ) && collapse(chunk).contains(&collapse(cp))
                {
                    st.awaiting_code = true;
                }
            }
        }
        for s in to_send {
            // A TUI redraws before it reads keys: let it settle first.
            std::thread::sleep(Duration::from_millis(400));
            let _ = run.send(unescape(&s).as_bytes());
        }
    }

    fn open_in_browser(&self, url: &str) {
        let mut cmd = std::process::Command::new(&self.cfg.browser[0]);
        cmd.args(&self.cfg.browser[1..])
            .arg(url)
            .env_clear()
            .envs(self.cfg.base_env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if self.cfg.home.is_dir() {
            cmd.current_dir(&self.cfg.home);
        }
        become_session_leader_no_tty(&mut cmd, self.cfg.run_as.clone());
        match cmd.spawn() {
            // Reaped by a thread so it leaves no zombie.
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(e) => tracing::warn!(error = %e, "could not open the login URL in the browser"),
        }
    }

    fn all_valid(&self, def: &ProviderDef) -> bool {
        def.credentials
            .iter()
            .all(|c| match read_limited(&self.cfg.home, &c.path) {
                Ok(bytes) => valid(&bytes, &c.json_keys),
                Err(_) => false,
            })
    }

    /// Write delivered files under the home, each 0600 and owned by the
    /// sandbox user, atomically (temp file, then rename).
    pub fn deliver(&self, set: FileSet) -> Result<(), LoginError> {
        if set.files.is_empty() {
            return Err(LoginError::BadRequest("files: at least one".into()));
        }
        let mut decoded = Vec::new();
        for f in &set.files {
            if !safe_relative(&f.path) {
                return Err(LoginError::BadRequest(format!(
                    "path {:?} must be relative to home, without '..'",
                    f.path
                )));
            }
            let bytes = B64
                .decode(&f.contents_b64)
                .map_err(|_| LoginError::BadRequest(format!("{}: not base64", f.path)))?;
            if bytes.len() as u64 > MAX_FILE_BYTES {
                return Err(LoginError::BadRequest(format!("{}: too large", f.path)));
            }
            decoded.push((f.path.clone(), bytes));
        }
        for (rel, bytes) in decoded {
            self.write_home_file(&rel, &bytes)?;
        }
        Ok(())
    }

    /// Every step goes from a directory descriptor, never through a path
    /// the user could change half-way: the home belongs to the user, the
    /// agent is root, and a directory swapped for a symlink must not take a
    /// `chown` or a file outside the home.
    fn write_home_file(&self, rel: &str, bytes: &[u8]) -> Result<(), LoginError> {
        let owner = match &self.cfg.run_as {
            RunAs::User { uid, gid, .. } => Some((
                rustix::fs::Uid::from_raw(*uid),
                rustix::fs::Gid::from_raw(*gid),
            )),
            RunAs::Current => None,
        };
        let parts: Vec<&str> = rel.split('/').collect();
        let (name, dirs) = parts
            .split_last()
            .ok_or_else(|| LoginError::BadRequest(format!("path {rel:?} names no file")))?;
        let mut dir = open_home(&self.cfg.home)?;
        let mut walked = self.cfg.home.clone();
        for part in dirs {
            walked.push(part);
            let at = walked.display().to_string();
            dir = match open_beneath(&dir, part, OFlags::DIRECTORY | OFlags::RDONLY) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(0o700))
                        .map_err(|e| errno(format!("creating {at}"), e))?;
                    let fd = open_beneath(&dir, part, OFlags::DIRECTORY | OFlags::RDONLY)
                        .map_err(|e| not_a_dir(&at, e))?;
                    if let Some((uid, gid)) = owner {
                        rustix::fs::fchown(&fd, Some(uid), Some(gid))
                            .map_err(|e| errno(format!("handing {at} to the user"), e))?;
                    }
                    fd
                }
                Err(e) => return Err(not_a_dir(&at, e)),
            };
        }
        let target = walked.join(name).display().to_string();
        if let Ok(st) = rustix::fs::statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW) {
            let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
            if kind != rustix::fs::FileType::RegularFile {
                return Err(LoginError::Conflict(format!(
                    "{target} is not a regular file"
                )));
            }
        }
        let tmp = format!(".{name}.airlock-{}", std::process::id());
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        let fd = rustix::fs::openat2(
            &dir,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
        )
        .map_err(|e| errno(format!("creating a file beside {target}"), e))?;
        let mut out = std::fs::File::from(fd);
        out.write_all(bytes)
            .and_then(|()| out.sync_all())
            .map_err(io(format!("writing {target}")))?;
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(&out, Some(uid), Some(gid))
                .map_err(|e| errno("handing the credential file to the user".into(), e))?;
        }
        drop(out);
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, *name)
            .map_err(|e| errno(format!("replacing {target}"), e))?;
        Ok(())
    }
}

/// The home directory itself, refused if it is a symlink.
fn open_home(home: &Path) -> Result<OwnedFd, LoginError> {
    rustix::fs::open(
        home,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno(format!("opening {}", home.display()), e))
}

/// `rel` under `dir`, through no symlink and never above `dir`.
fn open_beneath(dir: &OwnedFd, rel: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
}

fn errno(what: String, e: Errno) -> LoginError {
    LoginError::Io {
        what,
        source: e.into(),
    }
}

fn not_a_dir(at: &str, e: Errno) -> LoginError {
    match e {
        Errno::LOOP | Errno::NOTDIR | Errno::XDEV => LoginError::Conflict(format!(
            "{at} is not a directory (a symlink is not followed)"
        )),
        e => errno(format!("opening {at}"), e),
    }
}

fn status_of(id: &str, run: &Run) -> LoginStatus {
    let st = run.lock();
    LoginStatus {
        login_id: id.to_owned(),
        phase: st.phase,
        login_url: st.url.clone(),
        awaiting_code: st.awaiting_code && st.phase == AgentLoginPhase::AwaitingUser,
        error: st
            .error
            .clone()
            .filter(|_| st.phase == AgentLoginPhase::Failed),
    }
}

/// A credential file the CLI wrote under the home: opened through no symlink
/// (a link to `/etc/shadow` must not be captured by a root agent), not a
/// FIFO or device (non-blocking open, then checked), at most [`MAX_FILE_BYTES`].
fn read_limited(home: &Path, rel: &str) -> Result<Vec<u8>, LoginError> {
    let path = home.join(rel);
    let shown = path.display().to_string();
    let dir = open_home(home)?;
    let fd = open_beneath(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
    )
    .map_err(|e| errno(format!("reading {shown}"), e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| errno(format!("reading {shown}"), e))?;
    let regular =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
    if !regular || st.st_size < 0 || st.st_size as u64 > MAX_FILE_BYTES {
        return Err(LoginError::Conflict(format!(
            "{shown} is not a credential file"
        )));
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)
        .map_err(io(format!("reading {shown}")))?;
    Ok(buf)
}

/// A credential file counts when it is non-empty and, if keys are named, JSON
/// with every one of them present and not null.
pub fn valid(bytes: &[u8], keys: &[String]) -> bool {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return false;
    }
    if keys.is_empty() {
        return true;
    }
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return false;
    };
    keys.iter().all(|k| {
        let mut cur = &doc;
        for part in k.split('.') {
            match cur.get(part) {
                Some(v) => cur = v,
                None => return false,
            }
        }
        !cur.is_null()
    })
}

fn matches_prefix(def: &ProviderDef, url: &str) -> bool {
    def.url_prefixes.iter().any(|p| url.starts_with(p.as_str()))
        && url.len() <= 8192
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The first URL in stripped output that starts with one of the prefixes.
pub fn find_url(def: &ProviderDef, text: &str) -> Option<String> {
    def.url_prefixes.iter().find_map(|p| {
        let start = text.find(p.as_str())?;
        let url: String = text[start..]
            .chars()
            .take_while(|c| !c.is_whitespace() && !c.is_control())
            .collect();
        // Only a URL followed by something is complete: output may arrive in pieces.
        let complete = text.len() > start + url.len();
        complete.then_some(url)
    })
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn last_words(tail: &str) -> String {
    let text = collapse(tail);
    let n = text.chars().count();
    let s: String = text.chars().skip(n.saturating_sub(300)).collect();
    if s.is_empty() {
        "(none)".into()
    } else {
        s
    }
}

/// `\r`, `\n`, `\t`, `\e`, `\\` in a prompt answer.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('e') => out.push('\x1b'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

/// Terminal output to plain text: CSI, OSC, DCS and other escapes removed;
/// cursor moves that stand for blanks (claude-code draws spaces with
/// `CSI n C` / `CSI n G`) become one space; other C0 controls dropped except
/// line breaks and tabs. Kept across chunks in `pending`.
#[derive(Debug, Default)]
pub struct Stripper {
    state: EscState,
    utf8: Vec<u8>,
    csi: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EscState {
    #[default]
    Text,
    Esc,
    Csi,
    /// OSC, DCS, SOS, PM, APC: until BEL or ST.
    String,
    StringEsc,
}

impl Stripper {
    pub fn feed(&mut self, bytes: &[u8]) -> String {
        let mut out = Vec::new();
        for &b in bytes {
            match self.state {
                EscState::Text => match b {
                    0x1b => self.state = EscState::Esc,
                    b'\n' | b'\r' | b'\t' => out.push(b),
                    0..=0x1f | 0x7f => {}
                    _ => out.push(b),
                },
                EscState::Esc => {
                    self.state = match b {
                        b'[' => {
                            self.csi.clear();
                            EscState::Csi
                        }
                        b']' | b'P' | b'X' | b'^' | b'_' => EscState::String,
                        _ => EscState::Text,
                    }
                }
                EscState::Csi => {
                    if (0x40..=0x7e).contains(&b) {
                        if b == b'C' || b == b'G' || b == b'H' || b == b'f' {
                            out.push(b' ');
                        }
                        self.state = EscState::Text;
                    } else if self.csi.len() < 64 {
                        self.csi.push(b);
                    }
                }
                EscState::String => match b {
                    0x07 => self.state = EscState::Text,
                    0x1b => self.state = EscState::StringEsc,
                    _ => {}
                },
                EscState::StringEsc => {
                    self.state = if b == b'\\' {
                        EscState::Text
                    } else {
                        EscState::String
                    }
                }
            }
        }
        // Keep an incomplete UTF-8 sequence for the next chunk.
        self.utf8.extend_from_slice(&out);
        let valid_upto = match std::str::from_utf8(&self.utf8) {
            Ok(_) => self.utf8.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.utf8.len(),
        };
        let rest = self.utf8.split_off(valid_upto);
        let text = String::from_utf8_lossy(&self.utf8).into_owned();
        self.utf8 = rest;
        text
    }
}

/// Output of a running login, handed from its blocking reader thread to the watcher.
#[derive(Debug, Default)]
struct ReaderShared {
    chunk: Mutex<(String, Option<String>)>,
}

static READERS: Mutex<Option<HashMap<String, Arc<ReaderShared>>>> = Mutex::new(None);

impl ReaderShared {
    fn register(id: &str) -> Arc<ReaderShared> {
        let shared = Arc::new(ReaderShared::default());
        READERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(id.to_owned(), shared.clone());
        shared
    }

    fn lookup(id: &str) -> Option<Arc<ReaderShared>> {
        READERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|m| m.get(id).cloned())
    }

    fn forget(id: &str) {
        if let Some(m) = READERS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            m.remove(id);
        }
    }

    fn take(&self) -> (String, Option<String>) {
        let mut c = self.chunk.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut c.0), c.1.clone())
    }
}

/// Reads the PTY until the command's side closes, then reaps the command.
fn spawn_reader(mut master: std::fs::File, mut child: std::process::Child, id: String) {
    let shared = ReaderShared::register(&id);
    std::thread::spawn(move || {
        let mut strip = Stripper::default();
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break, // EIO once every holder of the slave closed it
                Ok(n) => {
                    let text = strip.feed(&buf[..n]);
                    let mut c = shared.chunk.lock().unwrap_or_else(|p| p.into_inner());
                    c.0.push_str(&text);
                }
            }
        }
        let status = match child.wait() {
            Ok(s) => match s.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed".to_owned(),
            },
            Err(_) => "ended".to_owned(),
        };
        shared.chunk.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(status);
    });
}

#[allow(unsafe_code)]
fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the ints we pass; the name
    // buffer is null (allowed) and the termios pointer is null (defaults).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // The master must not leak into the command.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(m.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok((m, s))
}

/// New session with the PTY (its stdin) as controlling terminal, then the
/// sandbox user's identity, in that order.
#[allow(unsafe_code)]
fn become_session_leader(cmd: &mut std::process::Command, run_as: RunAs) {
    use std::os::unix::process::CommandExt;
    let ids = match run_as {
        RunAs::User { uid, gid, groups } => Some((uid, gid, groups)),
        RunAs::Current => None,
    };
    // SAFETY: only async-signal-safe calls on data moved in before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn become_session_leader_no_tty(cmd: &mut std::process::Command, run_as: RunAs) {
    use std::os::unix::process::CommandExt;
    let ids = match run_as {
        RunAs::User { uid, gid, groups } => Some((uid, gid, groups)),
        RunAs::Current => None,
    };
    // SAFETY: only async-signal-safe calls on data moved in before fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::login::{CredentialFile, Prompt};

    #[test]
    fn strips_escapes_and_keeps_urls() {
        let raw = b"\x1b[2GPaste\x1b[8Gcode\r\n\x1b]8;id=x;https://a.example/o?x=1\x07\x1b[38;5;246mhttps://a.example/o?x=1\x1b[39m\x1b]8;;\x07\r\n";
        let mut s = Stripper::default();
        let text = s.feed(raw);
        assert!(text.contains("Paste code"), "{text:?}");
        assert!(text.contains("https://a.example/o?x=1\r\n"), "{text:?}");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn utf8_split_across_chunks() {
        let mut s = Stripper::default();
        let bytes = "╭─╮".as_bytes();
        let a = s.feed(&bytes[..2]);
        let b = s.feed(&bytes[2..]);
        assert_eq!(format!("{a}{b}"), "╭─╮");
    }

    fn def() -> ProviderDef {
        ProviderDef {
            name: "t".into(),
            display_name: "T".into(),
            command: vec!["sh".into()],
            env: Default::default(),
            url_prefixes: vec!["https://auth.example/authorize?".into()],
            prompts: vec![Prompt {
                expect: "trust  this".into(),
                send: "\\r".into(),
            }],
            code_prompt: None,
            credentials: vec![CredentialFile {
                path: ".t/creds.json".into(),
                json_keys: vec!["tokens.access".into()],
            }],
            check: None,
            cols: 200,
        }
    }

    #[test]
    fn urls_only_when_complete() {
        let d = def();
        assert_eq!(
            find_url(&d, "go to https://auth.example/authorize?a=b"),
            None
        );
        assert_eq!(
            find_url(&d, "go to https://auth.example/authorize?a=b\r\n").as_deref(),
            Some("https://auth.example/authorize?a=b")
        );
        assert_eq!(find_url(&d, "https://evil.example/authorize?a\n"), None);
    }

    #[test]
    fn validity_of_credential_files() {
        let keys = vec!["tokens.access".to_owned()];
        assert!(valid(br#"{"tokens":{"access":"x"}}"#, &keys));
        assert!(!valid(br#"{"tokens":{"access":null}}"#, &keys));
        assert!(!valid(br#"{"tokens":{}}"#, &keys));
        assert!(!valid(b"{\"tokens\":", &keys));
        assert!(!valid(b"  ", &[]));
        assert!(valid(b"token", &[]));
    }

    #[test]
    fn answers_are_unescaped() {
        assert_eq!(unescape("y\\r"), "y\r");
        assert_eq!(unescape("\\e[B\\r"), "\x1b[B\r");
    }

    fn test_cfg(home: &Path, run: &Path) -> LoginConfig {
        LoginConfig {
            run_as: RunAs::Current,
            home: home.to_owned(),
            base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            gateway: "10.0.0.1".into(),
            hook_dir: home.join("hook"),
            run_dir: run.to_owned(),
            browser: vec!["true".into()],
        }
    }

    /// The browser hook the agent puts on a login's PATH, as the image has
    /// it: it appends each URL it is asked to open to $AIRLOCK_LOGIN_URLS.
    fn write_browser_hook(home: &Path) {
        let hook = home.join("hook");
        std::fs::create_dir_all(&hook).expect("mkdir");
        let hook_script = hook.join("xdg-open");
        std::fs::write(
            &hook_script,
            "#!/bin/sh\nprintf '%s\\n' \"$1\" >> \"$AIRLOCK_LOGIN_URLS\"\n",
        )
        .expect("write");
        std::fs::set_permissions(&hook_script, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }

    /// The login's status once `done` says so, or the last one after `polls`
    /// looks 100 ms apart.
    async fn poll(
        logins: &Logins,
        id: &str,
        polls: u32,
        done: impl Fn(&LoginStatus) -> bool,
    ) -> LoginStatus {
        let mut last = logins.status(id).expect("status");
        for _ in 0..polls {
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = logins.status(id).expect("status");
            if done(&last) {
                break;
            }
        }
        last
    }

    /// A fake CLI (a shell script) under a real PTY: a prompt answered, a URL
    /// taken from the browser hook, the credential file captured.
    #[tokio::test]
    async fn runs_a_cli_under_a_pty() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        write_browser_hook(home.path());
        let logins = Arc::new(Logins::new(test_cfg(home.path(), run.path())));
        let mut d = def();
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "[ -t 0 ] || exit 9; printf 'Do you trust  this folder?\\n'; read a; \
             $BROWSER \"https://auth.example/authorize?code_challenge=abc&gw={gw}\"; \
             echo 'waiting'; sleep 1; mkdir -p .t; \
             printf '{\"tokens\":{\"access\":\"s3cret\"}}' > .t/tmp && mv .t/tmp .t/creds.json; sleep 30"
                .replace("{gw}", "$GW"),
        ];
        d.env.insert("GW".into(), "{gateway}".into());
        let st = logins
            .start(LoginStart {
                login_id: "l1".into(),
                provider: d,
            })
            .expect("start");
        assert_eq!(st.phase, AgentLoginPhase::Running);
        let last = poll(&logins, "l1", 100, |s| {
            s.phase == AgentLoginPhase::Captured || s.phase == AgentLoginPhase::Failed
        })
        .await;
        assert_eq!(last.phase, AgentLoginPhase::Captured, "{last:?}");
        assert_eq!(
            last.login_url.as_deref(),
            Some("https://auth.example/authorize?code_challenge=abc&gw=10.0.0.1")
        );
        let files = logins.credentials("l1").expect("files");
        assert_eq!(files.files.len(), 1);
        assert_eq!(
            B64.decode(&files.files[0].contents_b64).expect("b64"),
            br#"{"tokens":{"access":"s3cret"}}"#
        );
        logins.cancel("l1");
        assert!(logins.status("l1").is_err());
    }

    /// A CLI that shows a shortened link first and hands the browser its full
    /// URL a moment later (as Claude Code does): the hook's URL is the one
    /// reported and opened.
    #[tokio::test]
    async fn the_browser_hook_wins_over_a_link_shown_first() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        write_browser_hook(home.path());
        let logins = Arc::new(Logins::new(test_cfg(home.path(), run.path())));
        let mut d = def();
        d.prompts.clear();
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "printf 'Visit https://auth.example/authorize?short\\n'; sleep 0.6; \
             $BROWSER 'https://auth.example/authorize?code_challenge=full'; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "l3".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "l3", 50, |s| {
            s.phase == AgentLoginPhase::AwaitingUser
        })
        .await;
        assert_eq!(last.phase, AgentLoginPhase::AwaitingUser, "{last:?}");
        assert_eq!(
            last.login_url.as_deref(),
            Some("https://auth.example/authorize?code_challenge=full")
        );
        logins.cancel("l3");
    }

    #[tokio::test]
    async fn early_exit_fails_with_the_last_output() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let logins = Arc::new(Logins::new(test_cfg(home.path(), run.path())));
        let mut d = def();
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "echo 'error: cannot reach the sign-in server'; exit 3".into(),
        ];
        logins
            .start(LoginStart {
                login_id: "l2".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "l2", 60, |s| s.phase == AgentLoginPhase::Failed).await;
        assert_eq!(last.phase, AgentLoginPhase::Failed);
        let err = last.error.unwrap_or_default();
        assert!(err.contains("status 3"), "{err}");
        assert!(err.contains("cannot reach the sign-in server"), "{err}");
    }

    #[test]
    fn delivery_writes_0600_files_and_refuses_escapes() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let logins = Logins::new(test_cfg(home.path(), run.path()));
        let set = |path: &str| FileSet {
            files: vec![FileBlob {
                path: path.into(),
                contents_b64: B64.encode(b"{}"),
            }],
        };
        logins.deliver(set(".codex/auth.json")).expect("deliver");
        let p = home.path().join(".codex/auth.json");
        assert_eq!(std::fs::read(&p).expect("read"), b"{}");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Replacing works.
        logins.deliver(set(".codex/auth.json")).expect("again");
        for bad in ["../x", "/etc/passwd", "a/../../b"] {
            assert!(matches!(
                logins.deliver(set(bad)),
                Err(LoginError::BadRequest(_))
            ));
        }
        std::os::unix::fs::symlink("/tmp", home.path().join("link")).expect("symlink");
        assert!(logins.deliver(set("link/x")).is_err());
    }

    fn one_file(path: &str) -> FileSet {
        FileSet {
            files: vec![FileBlob {
                path: path.into(),
                contents_b64: B64.encode(b"{\"token\":\"t\"}"),
            }],
        }
    }

    /// Everything under `dir` (itself included) with its owner.
    fn owners(dir: &Path) -> Vec<(PathBuf, u32)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = vec![(
            dir.to_owned(),
            std::fs::symlink_metadata(dir).expect("meta").uid(),
        )];
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(owners(&p));
            } else {
                out.push((
                    p.clone(),
                    std::fs::symlink_metadata(&p).expect("meta").uid(),
                ));
            }
        }
        out
    }

    /// The workspace user when we are root (as the agent is), else ourselves.
    fn workspace_user() -> RunAs {
        if rustix::process::geteuid().is_root() {
            RunAs::User {
                uid: 1000,
                gid: 1000,
                groups: Vec::new(),
            }
        } else {
            RunAs::Current
        }
    }

    /// The user swaps a directory of its home for a symlink to a directory
    /// outside (here a stand-in for `/etc`) while credentials are delivered:
    /// nothing is created in it and nothing in it changes owner.
    #[test]
    fn delivery_never_follows_a_swapped_directory() {
        let root = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let home = root.path().join("home");
        let outside = root.path().join("etc");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::create_dir_all(outside.join("keep")).expect("outside");
        let before = owners(&outside);
        let mut cfg = test_cfg(&home, run.path());
        cfg.run_as = workspace_user();
        let logins = Arc::new(Logins::new(cfg));

        // Standing still: a symlink where a directory should be is refused.
        std::os::unix::fs::symlink(&outside, home.join(".claude")).expect("symlink");
        let err = logins
            .deliver(one_file(".claude/.credentials.json"))
            .expect_err("through a symlink");
        assert!(matches!(err, LoginError::Conflict(_)), "{err:?}");
        assert!(
            logins.deliver(one_file(".claude")).is_err(),
            "onto a symlink"
        );

        // Racing: `.config` is a real directory one moment, a link the next
        // (swapped atomically, as any program of the user's can).
        std::fs::create_dir(home.join(".config")).expect("real");
        std::os::unix::fs::symlink(&outside, home.join("link")).expect("link");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (home, stop) = (home.clone(), stop.clone());
            std::thread::spawn(move || {
                let dir = open_home(&home).expect("home");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = rustix::fs::renameat_with(
                        &dir,
                        ".config",
                        &dir,
                        "link",
                        rustix::fs::RenameFlags::EXCHANGE,
                    );
                }
            })
        };
        let mut delivered = 0;
        for _ in 0..2000 {
            if logins
                .deliver(one_file(".config/gcloud/sub/creds.json"))
                .is_ok()
            {
                delivered += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().expect("swapper");
        assert_eq!(
            owners(&outside),
            before,
            "the directory outside the home changed ({delivered} deliveries went through)"
        );
    }

    /// Capture reads what the CLI wrote, but no link out of its directory
    /// (a root agent would hand over any file), and no FIFO (it would block).
    #[test]
    fn capture_follows_no_link() {
        let root = tempfile::tempdir().expect("tmp");
        let home = root.path().join("home");
        std::fs::create_dir_all(home.join(".codex")).expect("dirs");
        std::fs::create_dir_all(home.join(".gemini")).expect("dirs");
        std::fs::write(root.path().join("shadow"), b"{\"secret\":1}").expect("secret");
        std::fs::write(home.join(".codex/auth.json"), b"{}").expect("file");
        assert_eq!(
            read_limited(&home, ".codex/auth.json").expect("read"),
            b"{}"
        );
        std::os::unix::fs::symlink(root.path().join("shadow"), home.join(".codex/link.json"))
            .expect("symlink");
        assert!(read_limited(&home, ".codex/link.json").is_err());
        std::os::unix::fs::symlink(root.path(), home.join(".claude")).expect("symlink");
        assert!(read_limited(&home, ".claude/shadow").is_err());
        assert!(read_limited(&home, "../shadow").is_err());
        let fifo = home.join(".gemini/oauth_creds.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("fifo");
        assert!(read_limited(&home, ".gemini/oauth_creds.json").is_err());
    }

    /// A CLI on the paste-code route prints its URL, asks a browser to open
    /// it and shows its code prompt at once (claude does): the login says it
    /// awaits a code, and the code typed reaches the CLI.
    #[tokio::test]
    async fn code_prompt_right_after_the_url() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        write_browser_hook(home.path());
        let logins = Arc::new(Logins::new(test_cfg(home.path(), run.path())));
        let mut d = def();
        d.prompts.clear();
        d.code_prompt = Some("Paste code here".into());
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "u='https://auth.example/authorize?x=1'; echo \"$u\"; $BROWSER \"$u\"; \
             printf 'Paste code here if prompted > '; read c; mkdir -p .t; \
             printf '{\"tokens\":{\"access\":\"%s\"}}' \"$c\" > .t/tmp && mv .t/tmp .t/creds.json; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "l3".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "l3", 50, |s| s.awaiting_code).await;
        assert_eq!(last.phase, AgentLoginPhase::AwaitingUser, "{last:?}");
        assert!(last.awaiting_code, "{last:?}");
        logins.input("l3", "abc").expect("input");
        let last = poll(&logins, "l3", 50, |s| s.phase == AgentLoginPhase::Captured).await;
        assert_eq!(last.phase, AgentLoginPhase::Captured, "{last:?}");
        assert!(!last.awaiting_code, "{last:?}");
        logins.cancel("l3");
    }
}

/// The agent's login endpoints (merged into the authenticated router).
pub mod http {
    use super::{LoginError, Logins};
    use crate::server::AgentState;
    use airlock_proto::agent::AgentError;
    use airlock_proto::login::{FileSet, LoginInput, LoginStart, LoginStatus};
    use axum::body::Bytes;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use std::sync::Arc;

    fn fail(e: LoginError) -> Response {
        let status = match &e {
            LoginError::BadRequest(_) => StatusCode::BAD_REQUEST,
            LoginError::NotFound(_) => StatusCode::NOT_FOUND,
            LoginError::Conflict(_) => StatusCode::CONFLICT,
            LoginError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %crate::chain(&e), "login request failed");
        }
        (
            status,
            Json(AgentError {
                error: crate::chain(&e),
            }),
        )
            .into_response()
    }

    #[allow(clippy::result_large_err)] // an axum Response, as the handlers return
    fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, Response> {
        serde_json::from_slice(bytes).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                Json(AgentError {
                    error: format!("invalid request: {e}"),
                }),
            )
                .into_response()
        })
    }

    fn logins(state: &AgentState) -> &Arc<Logins> {
        &state.logins
    }

    async fn start(
        State(state): State<Arc<AgentState>>,
        bytes: Bytes,
    ) -> Result<Json<LoginStatus>, Response> {
        let req: LoginStart = body(&bytes)?;
        logins(&state).start(req).map(Json).map_err(fail)
    }

    async fn status(
        State(state): State<Arc<AgentState>>,
        Path(id): Path<String>,
    ) -> Result<Json<LoginStatus>, Response> {
        logins(&state).status(&id).map(Json).map_err(fail)
    }

    async fn cancel(State(state): State<Arc<AgentState>>, Path(id): Path<String>) -> StatusCode {
        logins(&state).cancel(&id);
        StatusCode::NO_CONTENT
    }

    async fn credentials(
        State(state): State<Arc<AgentState>>,
        Path(id): Path<String>,
    ) -> Result<Json<FileSet>, Response> {
        let files = logins(&state).credentials(&id).map_err(fail)?;
        tracing::info!(login = %id, files = files.files.len(), "credentials handed over");
        Ok(Json(files))
    }

    async fn input(
        State(state): State<Arc<AgentState>>,
        Path(id): Path<String>,
        bytes: Bytes,
    ) -> Result<StatusCode, Response> {
        let req: LoginInput = body(&bytes)?;
        let l = logins(&state).clone();
        tokio::task::spawn_blocking(move || l.input(&id, &req.text))
            .await
            .map_err(|_| fail(LoginError::Conflict("typing was interrupted".into())))?
            .map_err(fail)?;
        Ok(StatusCode::NO_CONTENT)
    }

    async fn deliver(
        State(state): State<Arc<AgentState>>,
        bytes: Bytes,
    ) -> Result<StatusCode, Response> {
        let set: FileSet = body(&bytes)?;
        let n = set.files.len();
        logins(&state).deliver(set).map_err(fail)?;
        tracing::info!(files = n, "credentials delivered");
        Ok(StatusCode::NO_CONTENT)
    }

    pub fn routes() -> Router<Arc<AgentState>> {
        Router::new()
            .route("/login", post(start))
            .route("/login/{id}", get(status).delete(cancel))
            .route("/login/{id}/credentials", get(credentials))
            .route("/login/{id}/input", post(input))
            .route("/credentials/deliver", post(deliver))
    }
}
