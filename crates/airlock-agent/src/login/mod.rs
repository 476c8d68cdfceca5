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
//! Which URL is the sign-in URL is the provider's rule (`ProviderDef::url`),
//! never a matter of timing: it comes from where the rule says (the browser
//! hook, for a CLI that asks a browser to open it: `BROWSER` and an
//! `xdg-open` early in `PATH` point at a hook that appends the URL to a file
//! the agent reads; or the screen, for one that opens none) and holds what
//! the rule asks for (client id, redirect, PKCE challenge…). The first URL
//! that qualifies is the one; nothing replaces it. Anything else (the
//! shortened link claude-code draws, a URL missing its client id) is never
//! opened nor reported, only noted; if the rule's URL has not come
//! `hook_wait_s` seconds after the first such sighting, the login fails
//! with what was seen. The screen (read by a terminal emulator,
//! `login/screen.rs`) also gives the prompts and the code prompt.
//!
//! The parts: `pty` (the command's terminal), `screen` (what it shows),
//! `urls` (which URL counts), `credentials` (capture and delivery) and
//! `routes` (the HTTP endpoints); this file follows each run.

mod credentials;
pub(crate) mod pty;
pub mod routes;
pub mod screen;
pub mod urls;

pub use credentials::{valid, MAX_FILE_BYTES};
pub use screen::{Drawn, Screen};
pub use urls::{find_url, from_screen};

use crate::exec::RunAs;
use airlock_proto::login::{
    AgentLoginPhase, AgentStep, FileSet, LoginStart, LoginStatus, ProviderDef, UrlSource,
};
use pty::Pty;
use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The hook a CLI runs to open a URL (in the image, `usr/local/libexec`).
pub const HOOK_DIR: &str = "/usr/local/libexec/airlock/login-bin";
/// Per-login scratch directories (the URL file).
const RUN_DIR: &str = "/run/airlock/login";
const PTY_ROWS: u16 = 50;
/// After the credentials are captured the CLI may still finish its own work
/// (fetching a profile, writing settings); then it is stopped.
const AFTER_CAPTURE_GRACE: Duration = Duration::from_secs(20);
/// A prompt's answer the command showed no reaction to (no output at all)
/// within this is typed again, at most [`MAX_TYPED`] times in all: a TUI may
/// draw its prompt before it reads keys, and drop keys typed in between.
const RETYPE_AFTER: Duration = Duration::from_secs(3);
/// The same, for a command that kept drawing (a spinner, an animation)
/// while its prompt stayed up: under load gemini drops the key and keeps
/// redrawing, so output alone is no sign the answer was taken.
const RETYPE_BUSY_AFTER: Duration = Duration::from_secs(6);
/// Eight times at most: about 45 s of a busy CLI, inside the control plane's
/// deadline for the prompts (90 s). Every prompt answered today is Enter on
/// a default choice, which a repeat does not change.
const MAX_TYPED: u8 = 8;

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

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoginError {
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
    /// Which prompts were answered (each once).
    answered: Vec<bool>,
    /// The screen (collapsed) when a prompt was last answered: another is
    /// answered only on a screen drawn since.
    answered_on: Option<String>,
    /// A code was typed at the code prompt now shown: not awaited again
    /// until the prompt has gone and come back.
    code_typed: bool,
    /// The end of what the command showed, for a failure's reason.
    last_words: String,
    /// The screen last seen, collapsed.
    visible: String,
    /// The last prompt answered, until the command shows a reaction.
    typed: Option<Typed>,
    /// The command has drawn something.
    drawn: bool,
    /// What was seen that is no sign-in URL (for a failure's reason).
    seen: Option<String>,
    /// Failed because no URL qualified (not because the command ended).
    url_failed: bool,
}

/// An answer typed at a prompt.
#[derive(Debug, Clone, Copy)]
struct Typed {
    prompt: usize,
    at: tokio::time::Instant,
    /// The output counter when it was typed.
    fed: u64,
    times: u8,
}

struct Run {
    def: ProviderDef,
    state: Mutex<RunState>,
    pty: Pty,
    dir: PathBuf,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("provider", &self.def.name)
            .field("pgid", &self.pty.pgid)
            .finish_non_exhaustive()
    }
}

impl Run {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
            step: Some(AgentStep::CliStart),
            seen: None,
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
        credentials::capture(&self.cfg.home, &run.def)
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
        run.pty
            .send(text.as_bytes())
            .map_err(io("typing into the PTY"))?;
        std::thread::sleep(Duration::from_millis(150));
        run.pty.send(b"\r").map_err(io("typing into the PTY"))?;
        let mut st = run.lock();
        st.awaiting_code = false;
        st.code_typed = true;
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
            run.pty.kill();
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

        let mut cmd = std::process::Command::new(&def.command[0]);
        cmd.args(&def.command[1..])
            .env_clear()
            .envs(self.command_env(def, &urls))
            .current_dir(if self.cfg.home.is_dir() {
                self.cfg.home.clone()
            } else {
                PathBuf::from("/")
            });
        let pty = Pty::spawn(cmd, def.cols, PTY_ROWS, self.cfg.run_as.clone()).map_err(io(
            format!("starting {} (the provider's login command)", def.command[0]),
        ))?;
        let pgid = pty.pgid;
        let run = Run {
            def: def.clone(),
            state: Mutex::new(RunState {
                phase: AgentLoginPhase::Running,
                url: None,
                awaiting_code: false,
                error: None,
                answered: vec![false; def.prompts.len()],
                answered_on: None,
                code_typed: false,
                last_words: String::new(),
                visible: String::new(),
                typed: None,
                drawn: false,
                seen: None,
                url_failed: false,
            }),
            pty,
            dir,
        };
        tracing::info!(login = %req.login_id, provider = %def.name, pid = pgid, "login command started");
        Ok(run)
    }

    /// Follows one login until it is captured or failed.
    async fn watch(self: Arc<Self>, id: &str, run: Arc<Run>) {
        let rule = &run.def.url;
        let mut opened = false;
        let mut captured_at: Option<tokio::time::Instant> = None;
        let mut exited_at: Option<tokio::time::Instant> = None;
        // Since when something that is no sign-in URL was seen.
        let mut sighted_at: Option<tokio::time::Instant> = None;
        // Lines of the hook's file already judged.
        let mut hooked_lines = 0;
        let mut seen = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !self
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
            {
                return; // cancelled
            }
            let mut found: Option<String> = None;
            let mut sightings: Vec<String> = Vec::new();
            // A new screen: prompts, the code prompt, a URL drawn.
            let (drawn, exited) = run.pty.output.take(&mut seen);
            if let Some(drawn) = drawn {
                run.lock().drawn = true;
                self.on_screen(&run, &drawn).await;
                if !opened {
                    let url = urls::from_screen(&run.def, &drawn);
                    match (rule.from, url) {
                        (UrlSource::Screen, Some(u)) => match urls::refuses(&run.def, &u) {
                            None => found = Some(u),
                            Some(why) => sightings.push(format!("a link on screen with {why}")),
                        },
                        _ => {
                            if let Some((shown, short)) = urls::sighting(&run.def, &drawn.text) {
                                let what = if short {
                                    "only a shortened link"
                                } else {
                                    "a link"
                                };
                                sightings.push(format!("{what} on screen ({shown})"));
                            }
                        }
                    }
                }
            }
            self.retype(&run);
            if let Some(status) = exited {
                exited_at.get_or_insert_with(tokio::time::Instant::now);
                run.lock().error.get_or_insert(status);
            }
            // What the CLI handed the browser: the first URL that qualifies.
            let hooked = std::fs::read_to_string(run.dir.join("urls")).unwrap_or_default();
            for line in hooked.lines().skip(hooked_lines) {
                hooked_lines += 1;
                let u = line.trim();
                if opened || found.is_some() || u.is_empty() {
                    continue;
                }
                if !urls::matches_prefix(&run.def, u) {
                    // Another page the CLI opens (help, docs): not a sign-in.
                    tracing::info!(login = %id, "the browser hook was handed a URL of no sign-in");
                    continue;
                }
                match (rule.from, urls::refuses(&run.def, u)) {
                    (UrlSource::BrowserHook, None) => found = Some(u.to_owned()),
                    (_, Some(why)) => {
                        tracing::warn!(login = %id, why, "a URL handed to the browser hook was refused");
                        sightings.push(format!("a URL handed to its browser hook with {why}"));
                    }
                    (UrlSource::Screen, None) => {}
                }
            }
            if let Some(url) = found.filter(|_| !opened) {
                self.open_in_browser(&url);
                let mut st = run.lock();
                st.url = Some(url);
                st.seen = None;
                if st.phase == AgentLoginPhase::Running {
                    st.phase = AgentLoginPhase::AwaitingUser;
                }
                tracing::info!(login = %id, from = rule.from.as_str(), "login URL captured and opened");
                opened = true;
            }
            if !opened && !sightings.is_empty() {
                sighted_at.get_or_insert_with(tokio::time::Instant::now);
                let mut st = run.lock();
                let note = sightings.join("; ");
                if st.seen.as_deref() != Some(note.as_str()) {
                    // The first sighting of each kind is kept: a shortened
                    // link later scrolled away still counts.
                    st.seen = Some(match st.seen.take() {
                        Some(old) if !old.contains(&note) => format!("{old}; {note}"),
                        Some(old) => old,
                        None => note,
                    });
                }
            }
            if let (false, Some(at)) = (opened, sighted_at) {
                let wait = Duration::from_secs(u64::from(rule.hook_wait_s));
                if at.elapsed() >= wait && captured_at.is_none() && exited_at.is_none() {
                    let mut st = run.lock();
                    let seen = st.seen.clone().unwrap_or_default();
                    let never = match rule.from {
                        UrlSource::BrowserHook => format!(
                            "its browser hook was never handed a URL that qualifies within {} s",
                            rule.hook_wait_s
                        ),
                        UrlSource::Screen => {
                            format!("no link on screen qualified within {} s", rule.hook_wait_s)
                        }
                    };
                    st.error = Some(format!("{} showed {seen}; {never}", run.def.command[0]));
                    st.phase = AgentLoginPhase::Failed;
                    st.url_failed = true;
                    tracing::warn!(login = %id, "no sign-in URL qualified in time");
                    run.pty.kill();
                    return;
                }
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
                    run.pty.kill();
                    return;
                }
                continue;
            }
            // The command ended without credentials: give files written at the
            // very end a moment, then fail with its last words.
            if let Some(at) = exited_at {
                if at.elapsed() > Duration::from_secs(2) {
                    let mut st = run.lock();
                    let status = st.error.take().unwrap_or_else(|| "exited".into());
                    st.error = Some(format!(
                        "the login command {status} before signing in; its last output: {}",
                        st.last_words
                    ));
                    st.phase = AgentLoginPhase::Failed;
                    tracing::warn!(login = %id, "login command ended without credentials");
                    return;
                }
            }
        }
    }

    /// Answers the prompts the screen shows (each once, and only on a screen
    /// drawn after the last answer), and notes whether the code prompt is up.
    async fn on_screen(&self, run: &Run, drawn: &Drawn) {
        let visible = screen::collapse(drawn.visible());
        let mut to_send = Vec::new();
        {
            let mut st = run.lock();
            st.last_words = screen::last_words(&drawn.text);
            st.visible.clone_from(&visible);
            if st.answered_on.as_deref() != Some(visible.as_str()) {
                for (i, p) in run.def.prompts.iter().enumerate() {
                    if !st.answered[i] && visible.contains(&screen::collapse(&p.expect)) {
                        st.answered[i] = true;
                        to_send.push((i, p.send.clone()));
                    }
                }
                if !to_send.is_empty() {
                    st.answered_on = Some(visible.clone());
                }
            }
            // A CLI shows its code prompt right after the URL, often before
            // the URL is opened and the phase moves on: remember it, and
            // report it once the login awaits the user.
            if let Some(cp) = &run.def.code_prompt {
                let shown = visible.contains(&screen::collapse(cp));
                if !shown {
                    st.code_typed = false;
                }
                st.awaiting_code = shown
                    && !st.code_typed
                    && matches!(
                        st.phase,
                        AgentLoginPhase::Running | AgentLoginPhase::AwaitingUser
                    );
            }
        }
        for (i, s) in to_send {
            // A TUI redraws before it reads keys: let it settle first.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let _ = run.pty.send(unescape(&s).as_bytes());
            run.lock().typed = Some(Typed {
                prompt: i,
                at: tokio::time::Instant::now(),
                fed: run.pty.output.fed(),
                times: 1,
            });
        }
    }

    /// Types the last answer again if its prompt is still on the screen
    /// [`RETYPE_AFTER`] later with nothing shown since, or
    /// [`RETYPE_BUSY_AFTER`] later whatever was drawn meanwhile.
    fn retype(&self, run: &Run) {
        let mut st = run.lock();
        let Some(t) = st.typed else {
            return;
        };
        let prompt = &run.def.prompts[t.prompt];
        if t.times >= MAX_TYPED || !st.visible.contains(&screen::collapse(&prompt.expect)) {
            st.typed = None;
            return;
        }
        let quiet = run.pty.output.fed() == t.fed;
        if t.at.elapsed()
            < if quiet {
                RETYPE_AFTER
            } else {
                RETYPE_BUSY_AFTER
            }
        {
            return;
        }
        let _ = run.pty.send(unescape(&prompt.send).as_bytes());
        tracing::info!(
            prompt = t.prompt,
            "a prompt's answer drew no reaction: typed again"
        );
        st.typed = Some(Typed {
            at: tokio::time::Instant::now(),
            fed: run.pty.output.fed(),
            times: t.times + 1,
            ..t
        });
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
        crate::privdrop::drop_to(&mut cmd, &self.cfg.run_as, crate::privdrop::Session::New);
        match cmd.spawn() {
            // Reaped by a thread so it leaves no zombie.
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(e) => tracing::warn!(error = %e, "could not open the login URL in the browser"),
        }
    }

    fn all_valid(&self, def: &ProviderDef) -> bool {
        credentials::all_valid(&self.cfg.home, def)
    }

    /// Write delivered files under the home, each 0600 and owned by the
    /// sandbox user, atomically (temp file, then rename).
    pub fn deliver(&self, set: FileSet) -> Result<(), LoginError> {
        credentials::deliver(&self.cfg.home, &self.cfg.run_as, set)
    }
}

fn status_of(id: &str, run: &Run) -> LoginStatus {
    let st = run.lock();
    let step = match st.phase {
        AgentLoginPhase::Running if !st.drawn => Some(AgentStep::CliStart),
        AgentLoginPhase::Running if st.answered.iter().any(|a| !a) => Some(AgentStep::Prompts),
        AgentLoginPhase::Running => Some(AgentStep::Url),
        AgentLoginPhase::Failed if st.url_failed => Some(AgentStep::Url),
        _ => None,
    };
    let seen = match st.phase {
        AgentLoginPhase::Running if st.seen.is_some() => st.seen.clone(),
        AgentLoginPhase::Running if step == Some(AgentStep::Prompts) => Some(format!(
            "{} of {} prompts answered; the screen shows: {}",
            st.answered.iter().filter(|a| **a).count(),
            st.answered.len(),
            screen_text(&st.visible)
        )),
        AgentLoginPhase::Running if st.drawn => {
            Some(format!("the screen shows: {}", screen_text(&st.visible)))
        }
        _ => None,
    };
    LoginStatus {
        step,
        seen,
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

/// The end of what a TUI shows, for a reason: its frames (box drawing and
/// block characters) left out, whitespace collapsed, at most 300 characters.
fn screen_text(visible: &str) -> String {
    let text: String = visible
        .chars()
        .map(|c| {
            if ('\u{2500}'..='\u{259f}').contains(&c) {
                ' '
            } else {
                c
            }
        })
        .collect();
    let text = screen::collapse(&text);
    let n = text.chars().count();
    let tail: String = text.chars().skip(n.saturating_sub(300)).collect();
    if tail.is_empty() {
        "(nothing)".into()
    } else {
        tail
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

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_proto::login::{CredentialFile, Prompt};
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    fn def() -> ProviderDef {
        ProviderDef {
            name: "t".into(),
            display_name: "T".into(),
            command: vec!["sh".into()],
            env: Default::default(),
            url_prefixes: vec!["https://auth.example/authorize?".into()],
            url: Default::default(),
            prompts: vec![Prompt {
                expect: "trust  this".into(),
                send: "\\r".into(),
            }],
            code_prompt: None,
            credentials: vec![CredentialFile {
                path: ".t/creds.json".into(),
                json_keys: vec!["tokens.access".into()],
                ..Default::default()
            }],
            check: None,
            cols: 200,
        }
    }

    #[test]
    fn a_reason_shows_the_words_not_the_frame() {
        let framed = "╭──────╮ │ Do you trust this folder? │ │ ● 1. Trust │ ╰──────╯";
        assert_eq!(screen_text(framed), "Do you trust this folder? ● 1. Trust");
        assert_eq!(screen_text("───╯"), "(nothing)");
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

    /// A TUI that drops the key typed at its prompt and keeps drawing a
    /// spinner under it (gemini on a loaded host): the prompt still up, the
    /// answer is typed again though output came.
    #[tokio::test]
    async fn an_answer_dropped_while_the_cli_keeps_drawing_is_typed_again() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let logins = Arc::new(Logins::new(test_cfg(home.path(), run.path())));
        let mut d = def();
        d.command = vec![
            "bash".into(),
            "-c".into(),
            "stty -echo; printf 'Do you trust  this folder?\\n'; \
             (while :; do printf '\\r|'; sleep 0.3; printf '\\r-'; sleep 0.3; done) & s=$!; \
             sleep 2; while read -r -t 0.2 x; do :; done; read -r a; kill $s; printf '\\ntrusted\\n'; mkdir -p .t; \
             printf '{\"tokens\":{\"access\":\"x\"}}' > .t/tmp && mv .t/tmp .t/creds.json; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "r2".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "r2", 150, |s| s.phase == AgentLoginPhase::Captured).await;
        assert_eq!(last.phase, AgentLoginPhase::Captured, "{last:?}");
        logins.cancel("r2");
    }

    /// Every status of login `id` for `secs` seconds, 50 ms apart.
    async fn watch_statuses(logins: &Logins, id: &str, secs: u64) -> Vec<LoginStatus> {
        let mut all = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < until {
            all.push(logins.status(id).expect("status"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        all
    }

    /// A browser that notes each URL it is asked to open in `opened`.
    fn recording_browser(cfg: &mut LoginConfig, opened: &Path) {
        cfg.browser = vec![
            "sh".into(),
            "-c".into(),
            format!("printf '%s\\n' \"$1\" >> '{}'", opened.display()),
            "browser".into(),
        ];
    }

    /// What the browser was asked to open, once it holds `n` URLs (the
    /// browser runs apart from the agent) or after 2 s.
    async fn opened_urls(opened: &Path, n: usize) -> Vec<String> {
        let read = || -> Vec<String> {
            std::fs::read_to_string(opened)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        };
        for _ in 0..40 {
            if read().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        read()
    }

    /// The rule of a provider like claude: client id, redirect, PKCE.
    fn strict(d: &mut ProviderDef, wait_s: u32) {
        d.url.params = vec![
            "client_id".into(),
            "redirect_uri".into(),
            "code_challenge".into(),
        ];
        d.url.hook_wait_s = wait_s;
    }

    /// claude-code's race, as recorded, under load: it draws a shortened
    /// sign-in link (no client id, no redirect, cut with an ellipsis) and
    /// its code prompt, in colour and with cursor moves, and hands the
    /// browser the full URL only 5 s later. The short link is never
    /// reported nor opened; the hook's URL is, whenever it comes.
    #[tokio::test]
    async fn claude_short_link_is_never_the_url() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        write_browser_hook(home.path());
        let opened = home.path().join("opened");
        let mut cfg = test_cfg(home.path(), run.path());
        recording_browser(&mut cfg, &opened);
        let logins = Arc::new(Logins::new(cfg));
        let mut d = def();
        d.prompts.clear();
        d.code_prompt = Some("Paste code here".into());
        strict(&mut d, 20);
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "printf '\\033[2K\\033[1G\\033[38;5;174m\\342\\225\\255\\342\\224\\200\\033[39m\\r\\n'; \
             printf '\\033[2K\\033[1GBrowser didn'\"'\"'t open? Use the url below to sign in:\\r\\n\\r\\n'; \
             printf '\\033[2K\\033[1G\\033[38;5;246mhttps://auth.example/authorize?z-\\342\\200\\246\\033[39m\\r\\n\\r\\n'; \
             printf '\\033[2K\\033[1GPaste code here if prompted > '; sleep 5; \
             $BROWSER 'https://auth.example/authorize?code=true&client_id=c&redirect_uri=r&code_challenge=x&state=s'; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "c1".into(),
                provider: d,
            })
            .expect("start");
        let all = watch_statuses(&logins, "c1", 7).await;
        let full =
            "https://auth.example/authorize?code=true&client_id=c&redirect_uri=r&code_challenge=x&state=s";
        for s in &all {
            assert!(
                s.login_url.is_none() || s.login_url.as_deref() == Some(full),
                "{s:?}"
            );
        }
        // While it waited, it said what it saw.
        assert!(
            all.iter().any(|s| s.step == Some(AgentStep::Url)
                && s.seen
                    .as_deref()
                    .is_some_and(|w| w.contains("shortened link"))),
            "{all:?}"
        );
        let last = all.last().expect("statuses");
        assert_eq!(last.phase, AgentLoginPhase::AwaitingUser, "{last:?}");
        assert_eq!(last.login_url.as_deref(), Some(full));
        assert!(last.awaiting_code, "{last:?}");
        assert_eq!(opened_urls(&opened, 1).await, vec![full.to_owned()]);
        logins.cancel("c1");
    }

    /// A CLI that shows its shortened link and never calls the browser
    /// hook: the login fails once the rule's wait is over, saying what it
    /// saw, and nothing was opened.
    #[tokio::test]
    async fn no_hook_call_fails_with_what_was_seen() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        write_browser_hook(home.path());
        let opened = home.path().join("opened");
        let mut cfg = test_cfg(home.path(), run.path());
        recording_browser(&mut cfg, &opened);
        let logins = Arc::new(Logins::new(cfg));
        let mut d = def();
        d.prompts.clear();
        strict(&mut d, 2);
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "printf 'Sign in: https://auth.example/authorize?z-ab\\342\\200\\246\\r\\n'; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "n1".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "n1", 60, |s| s.phase == AgentLoginPhase::Failed).await;
        assert_eq!(last.phase, AgentLoginPhase::Failed, "{last:?}");
        assert_eq!(last.login_url, None);
        assert_eq!(last.step, Some(AgentStep::Url));
        let err = last.error.unwrap_or_default();
        assert!(
            err.contains(
                "sh showed only a shortened link on screen (https://auth.example/authorize?z-ab…)"
            ) && err.contains("its browser hook was never handed a URL that qualifies within 2 s"),
            "{err}"
        );
        assert_eq!(opened_urls(&opened, 1).await, Vec::<String>::new());
    }

    /// A URL handed to the hook without the client id the rule asks for is
    /// refused (never reported nor opened); the right one after it is taken.
    #[tokio::test]
    async fn a_url_without_its_client_id_is_refused() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        write_browser_hook(home.path());
        let opened = home.path().join("opened");
        let mut cfg = test_cfg(home.path(), run.path());
        recording_browser(&mut cfg, &opened);
        let logins = Arc::new(Logins::new(cfg));
        let mut d = def();
        d.prompts.clear();
        strict(&mut d, 3);
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "$BROWSER 'https://auth.example/authorize?redirect_uri=r&code_challenge=x'; sleep 1.5; \
             $BROWSER 'https://auth.example/authorize?client_id=c&redirect_uri=r&code_challenge=x'; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "u1".into(),
                provider: d.clone(),
            })
            .expect("start");
        let all = watch_statuses(&logins, "u1", 3).await;
        let good = "https://auth.example/authorize?client_id=c&redirect_uri=r&code_challenge=x";
        for s in &all {
            assert!(
                s.login_url.is_none() || s.login_url.as_deref() == Some(good),
                "{s:?}"
            );
        }
        assert!(
            all.iter().any(|s| s
                .seen
                .as_deref()
                .is_some_and(|w| w.contains("no client_id"))),
            "{all:?}"
        );
        assert_eq!(all.last().and_then(|s| s.login_url.as_deref()), Some(good));
        assert_eq!(opened_urls(&opened, 1).await, vec![good.to_owned()]);
        logins.cancel("u1");

        // Only the bad one: the login fails, naming what was missing.
        d.command = vec![
            "sh".into(),
            "-c".into(),
            "$BROWSER 'https://auth.example/authorize?redirect_uri=r&code_challenge=x'; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "u2".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "u2", 80, |s| s.phase == AgentLoginPhase::Failed).await;
        assert_eq!(last.phase, AgentLoginPhase::Failed, "{last:?}");
        assert_eq!(last.login_url, None);
        let err = last.error.unwrap_or_default();
        assert!(
            err.contains("a URL handed to its browser hook with no client_id"),
            "{err}"
        );
    }

    /// A provider whose URL comes from the screen (a CLI that opens no
    /// browser): a URL the TUI draws in pieces (colour, cursor moves,
    /// wrapped over three rows of a narrow terminal) is read off the screen
    /// whole and opened.
    #[tokio::test]
    async fn a_wrapped_url_on_screen_is_the_fallback() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let opened = home.path().join("opened");
        let mut cfg = test_cfg(home.path(), run.path());
        recording_browser(&mut cfg, &opened);
        let logins = Arc::new(Logins::new(cfg));
        let mut d = def();
        d.prompts.clear();
        d.url.from = UrlSource::Screen;
        d.cols = 80;
        let url = format!(
            "https://auth.example/authorize?state={}",
            "0123456789".repeat(15)
        );
        d.command = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "printf 'Loading...\\r\\033[2K\\033[1mSign in:\\033[0m\\033[2C\\033[4m'; \
                 printf '%s' '{}'; sleep 0.3; printf '%s\\033[24m\\r\\n' '{}'; sleep 30",
                &url[..100],
                &url[100..]
            ),
        ];
        logins
            .start(LoginStart {
                login_id: "c3".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "c3", 40, |s| s.login_url.is_some()).await;
        assert_eq!(last.login_url.as_deref(), Some(url.as_str()), "{last:?}");
        assert_eq!(last.phase, AgentLoginPhase::AwaitingUser);
        assert_eq!(opened_urls(&opened, 1).await, vec![url]);
        logins.cancel("c3");
    }

    /// Once a code is typed, the prompt still on screen (with the code the
    /// terminal echoed) is not awaited again; when the CLI draws it anew
    /// after an error, it is.
    #[tokio::test]
    async fn a_typed_code_is_not_asked_for_again_until_the_prompt_returns() {
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
            "$BROWSER 'https://auth.example/authorize?x=1'; \
             printf 'Paste code here > '; read c; sleep 1; \
             printf '\\033[2J\\033[HInvalid code. Press Enter to retry'; read c; \
             printf '\\033[2J\\033[HPaste code here > '; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "c4".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "c4", 50, |s| s.awaiting_code).await;
        assert!(last.awaiting_code, "{last:?}");
        logins.input("c4", "wrong").expect("input");
        for s in watch_statuses(&logins, "c4", 1).await {
            assert!(!s.awaiting_code, "{s:?}");
        }
        let last = poll(&logins, "c4", 20, |s| !s.awaiting_code).await;
        assert!(!last.awaiting_code, "{last:?}");
        logins.input("c4", "retry").expect("input");
        let last = poll(&logins, "c4", 30, |s| s.awaiting_code).await;
        assert!(last.awaiting_code, "the prompt came back: {last:?}");
        logins.cancel("c4");
    }

    /// A TUI that drops the key typed at its prompt (it drew the prompt
    /// before it read keys, as gemini does while it restarts): the answer
    /// is typed again once the screen shows no reaction.
    #[tokio::test]
    async fn an_answer_dropped_by_the_cli_is_typed_again() {
        let home = tempfile::tempdir().expect("tmp");
        let run = tempfile::tempdir().expect("tmp");
        let logins = Arc::new(Logins::new(test_cfg(home.path(), run.path())));
        let mut d = def();
        d.command = vec![
            "bash".into(),
            "-c".into(),
            "stty -echo; printf 'Do you trust  this folder?'; sleep 1.5; \
             while read -r -t 0.2 x; do :; done; read -r a; printf '\\ntrusted\\n'; mkdir -p .t; \
             printf '{\"tokens\":{\"access\":\"x\"}}' > .t/tmp && mv .t/tmp .t/creds.json; sleep 30"
                .into(),
        ];
        logins
            .start(LoginStart {
                login_id: "r1".into(),
                provider: d,
            })
            .expect("start");
        let last = poll(&logins, "r1", 120, |s| s.phase == AgentLoginPhase::Captured).await;
        assert_eq!(last.phase, AgentLoginPhase::Captured, "{last:?}");
        logins.cancel("r1");
    }
}
