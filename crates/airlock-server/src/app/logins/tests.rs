//! Orchestration tests of logins, without root: the real app, store (SQLite
//! in a temp dir) and vault, over the fake node and a fake guest whose agent
//! runs a scripted login (its screens, a sign-in URL, credential files,
//! delivery and exec). Nothing of the app, store or vault is faked.

use super::state::{Event, Failure, LoginState, SealedRecord, Stage};
use super::{aad, advance, AdvanceError, Timing};
use crate::app::admission::FakeProbe;
use crate::app::agent::fake::FakeGuest;
use crate::app::agent::{AgentError, Guest};
use crate::app::state::SandboxState;
use crate::app::{App, AppConfig, AppError, FakeForwarders, Seams};
use crate::node::fake::FakeNode;
use crate::store::{now_ms, LoginRow, Store, UserRow};
use crate::vault::Vault;
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::ImageRef;
use airlock_proto::agent::{ExecRequest, ExecResponse, Health};
use airlock_proto::login::{
    AgentLoginPhase, AgentStep, FileBlob, FileSet, LoginInput, LoginStart, LoginStatus,
};
use async_trait::async_trait;
use base64::Engine;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const PROVIDER: &str = "fake";
const CANARY: &str = "SECRET-CANARY-7f3a";

/// How the fake agent's login command behaves.
#[derive(Debug, Clone, Default)]
struct Plan {
    /// The agent refuses the start with this status and message.
    refuse_start: Option<(u16, String)>,
    /// The URL the command prints; none: it never prints one.
    url: Option<String>,
    /// The command exits with this, without credentials.
    exit: Option<String>,
    /// Fetching the credentials fails with this status.
    fail_fetch: Option<u16>,
    /// Delivery fails with this status.
    fail_deliver: Option<u16>,
    /// Login calls get no answer (the agent hangs or is gone).
    down: bool,
    /// The command shows its code prompt; the code typed signs it in.
    code: bool,
    /// The step the agent reports while the command runs without a URL
    /// (none: `url`).
    step: Option<AgentStep>,
    /// What the agent says it saw.
    seen: Option<String>,
}

#[derive(Debug, Default)]
struct World {
    plan: Plan,
    /// Login ids signed in by the "user".
    signed_in: Vec<String>,
    /// Logins the agent runs (a restarted agent forgets them).
    running: Vec<String>,
    starts: Vec<String>,
    fetches: Vec<String>,
    /// (workspace sandbox id, files) per delivery.
    deliveries: Vec<(String, FileSet)>,
    /// Codes typed, per login.
    typed: Vec<(String, String)>,
    /// Each write and removal of credential files, in order: ("deliver" or
    /// "remove", workspace sandbox id).
    home_writes: Vec<(&'static str, String)>,
}

/// The fake node's guests, whose agent also runs logins.
#[derive(Debug)]
struct LoginGuest {
    base: FakeGuest,
    world: Mutex<World>,
    /// Credential fetches wait while this is false.
    fetch_open: watch::Sender<bool>,
    /// Deliveries wait while this is false.
    deliver_open: watch::Sender<bool>,
    /// Bumped on every fetch and delivery, so a test can wait for one.
    seen: watch::Sender<u64>,
}

fn files_of(login_id: &str) -> FileSet {
    FileSet {
        files: vec![FileBlob {
            path: ".fake/credentials.json".into(),
            contents_b64: base64::engine::general_purpose::STANDARD
                .encode(format!("{{\"token\":\"{CANARY}-{login_id}\"}}")),
        }],
    }
}

impl LoginGuest {
    fn new(node: Arc<FakeNode>) -> Self {
        LoginGuest {
            base: FakeGuest::new(node),
            world: Mutex::default(),
            fetch_open: watch::channel(true).0,
            deliver_open: watch::channel(true).0,
            seen: watch::channel(0).0,
        }
    }

    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plan(&self, f: impl FnOnce(&mut Plan)) {
        f(&mut self.w().plan);
    }

    /// The user finishes signing in on the provider's page.
    fn sign_in(&self, login_id: &str) {
        self.w().signed_in.push(login_id.to_owned());
    }

    fn deliveries(&self) -> Vec<(String, FileSet)> {
        self.w().deliveries.clone()
    }

    /// The agent is reachable and takes the token: the sandbox it serves.
    async fn reach(&self, agent: SocketAddr, token: &str) -> Result<String, AgentError> {
        if self.w().plan.down {
            return Err(AgentError::Down(format!("{agent}: timed out")));
        }
        Ok(self.base.health(agent, token).await?.sandbox_id)
    }

    fn status(&self, login_id: &str) -> LoginStatus {
        let w = self.w();
        let mut s = LoginStatus {
            login_id: login_id.to_owned(),
            phase: AgentLoginPhase::Running,
            login_url: w.plan.url.clone(),
            awaiting_code: false,
            error: None,
            step: Some(w.plan.step.unwrap_or(AgentStep::Url)),
            seen: w.plan.seen.clone(),
        };
        if let Some(e) = &w.plan.exit {
            // As the agent says it: a failed login names its step only when
            // the agent gave up on the URL, not when the command ended.
            s.phase = AgentLoginPhase::Failed;
            s.error = Some(e.clone());
            s.step = w.plan.step;
        } else if w.signed_in.iter().any(|l| l == login_id) {
            s.phase = AgentLoginPhase::Captured;
        } else if s.login_url.is_some() {
            s.phase = AgentLoginPhase::AwaitingUser;
            s.awaiting_code = w.plan.code;
        }
        s
    }

    async fn wait(gate: &watch::Sender<bool>) {
        let mut rx = gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// Wait until `n` fetches and deliveries were asked for in all.
    async fn seen(&self, n: u64) {
        let mut rx = self.seen.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n)).await;
    }
}

#[async_trait]
impl Guest for LoginGuest {
    async fn health(&self, agent: SocketAddr, token: &str) -> Result<Health, AgentError> {
        self.base.health(agent, token).await
    }

    async fn exec(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &ExecRequest,
    ) -> Result<ExecResponse, AgentError> {
        self.base.exec(agent, token, req).await
    }

    async fn desktop_shown(&self, display: SocketAddr, password: &str) -> Result<(), String> {
        self.base.desktop_shown(display, password).await
    }

    async fn display_answers(&self, display: SocketAddr, password: &str) -> Result<(), String> {
        self.base.display_answers(display, password).await
    }

    async fn login_start(
        &self,
        agent: SocketAddr,
        token: &str,
        start: &LoginStart,
    ) -> Result<LoginStatus, AgentError> {
        self.reach(agent, token).await?;
        let id = start.login_id.clone();
        {
            let mut w = self.w();
            w.starts.push(id.clone());
            if let Some((status, message)) = w.plan.refuse_start.clone() {
                return Err(AgentError::Status { status, message });
            }
            if !w.running.contains(&id) {
                w.running.push(id.clone());
            }
        }
        Ok(self.status(&id))
    }

    async fn login_status(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
    ) -> Result<LoginStatus, AgentError> {
        self.reach(agent, token).await?;
        if !self.w().running.iter().any(|l| l == login_id) {
            return Err(AgentError::Status {
                status: 404,
                message: "no such login".into(),
            });
        }
        Ok(self.status(login_id))
    }

    async fn login_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
    ) -> Result<FileSet, AgentError> {
        self.reach(agent, token).await?;
        self.w().fetches.push(login_id.to_owned());
        self.seen.send_modify(|c| *c += 1);
        Self::wait(&self.fetch_open).await;
        if let Some(status) = self.w().plan.fail_fetch {
            return Err(AgentError::Status {
                status,
                message: "the credential file is not valid JSON".into(),
            });
        }
        Ok(files_of(login_id))
    }

    async fn login_input(
        &self,
        agent: SocketAddr,
        token: &str,
        login_id: &str,
        input: &LoginInput,
    ) -> Result<(), AgentError> {
        self.reach(agent, token).await?;
        let mut w = self.w();
        w.typed.push((login_id.to_owned(), input.text.clone()));
        if w.plan.code && input.text == "good-code" {
            w.signed_in.push(login_id.to_owned());
        }
        Ok(())
    }

    async fn deliver_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        files: &FileSet,
    ) -> Result<(), AgentError> {
        let sandbox = self.reach(agent, token).await?;
        self.seen.send_modify(|c| *c += 1);
        Self::wait(&self.deliver_open).await;
        if let Some(status) = self.w().plan.fail_deliver {
            return Err(AgentError::Status {
                status,
                message: "the home is read-only".into(),
            });
        }
        let mut w = self.w();
        w.deliveries.push((sandbox.clone(), files.clone()));
        w.home_writes.push(("deliver", sandbox));
        Ok(())
    }

    async fn remove_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        _paths: &[String],
    ) -> Result<(), AgentError> {
        let sandbox = self.reach(agent, token).await?;
        self.w().home_writes.push(("remove", sandbox));
        Ok(())
    }
}

/// One control plane over a data dir, the fake node and the fake guest;
/// [`Bed::restart`] plays a kill -9 and a new start over the same ones.
struct Bed {
    app: Arc<App>,
    node: Arc<FakeNode>,
    guest: Arc<LoginGuest>,
    store: Store,
    user: UserRow,
    cfg: AppConfig,
    /// The address pool, the same across a restart.
    pool: String,
    _dir: tempfile::TempDir,
}

fn timing() -> Timing {
    Timing {
        poll: Duration::from_millis(10),
        sandbox: Duration::from_secs(5),
        agent: Duration::from_millis(300),
        cli_start: Duration::from_millis(300),
        prompts: Duration::from_millis(500),
        url: Duration::from_millis(400),
        capture: Duration::from_millis(400),
        delivery: Duration::from_secs(5),
    }
}

/// Each bed its own /24 of 10.249.0.0/16, so parallel tests never share one.
fn pool() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 256;
    format!("10.249.{n}.0/24")
}

impl Bed {
    async fn new() -> Bed {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut AppConfig)) -> Bed {
        let dir = tempfile::tempdir().expect("tmp");
        let providers = dir.path().join("providers");
        std::fs::create_dir_all(&providers).expect("providers dir");
        std::fs::write(
            providers.join("fake.toml"),
            format!(
                "name = \"{PROVIDER}\"\ndisplay_name = \"Fake\"\ncommand = [\"fake-cli\", \"login\"]\n\
                 url_prefixes = [\"https://fake.test/\"]\ncredentials = [{{ path = \".fake/credentials.json\" }}]\n\
                 check = [\"fake-cli\", \"whoami\"]\n"
            ),
        )
        .expect("provider");
        std::fs::write(
            providers.join("fakecode.toml"),
            "name = \"fakecode\"\ndisplay_name = \"Fake with a code\"\ncommand = [\"fake-cli\", \"login\"]\n\
             url_prefixes = [\"https://fake.test/\"]\ncredentials = [{ path = \".fake/credentials.json\" }]\n\
             code_prompt = \"Paste code here\"\n",
        )
        .expect("provider");
        let mut cfg = AppConfig::new(dir.path().to_owned());
        cfg.providers_dir = Some(providers);
        cfg.boot_timeout = Duration::from_secs(5);
        adjust(&mut cfg);
        let url = format!("sqlite://{}", dir.path().join("airlock.db").display());
        let store = Store::open(&url).await.expect("store");
        let user = store.insert_user("u1", "alice", None).await.expect("user");
        let node = Arc::new(FakeNode::new());
        let guest = Arc::new(LoginGuest::new(node.clone()));
        guest.plan(|p| p.url = Some("https://fake.test/authorize?x=1".into()));
        let pool = pool();
        let app = Self::app(&cfg, &pool, &store, &node, &guest);
        Bed {
            pool,
            app,
            node,
            guest,
            store,
            user,
            cfg,
            _dir: dir,
        }
    }

    fn app(
        cfg: &AppConfig,
        pool: &str,
        store: &Store,
        node: &Arc<FakeNode>,
        guest: &Arc<LoginGuest>,
    ) -> Arc<App> {
        let seams = Seams {
            node: node.clone(),
            guest: guest.clone(),
            forwarders: Arc::new(FakeForwarders::default()),
            probe: Arc::new(FakeProbe::new(Some(64 << 30), Some(1 << 40))),
        };
        let image = ImageRef {
            build_id: "build-1".into(),
            layers: vec![],
        };
        let vault = Vault::load(&cfg.data_dir).expect("vault");
        let pool = AddressPool::parse(pool).expect("pool");
        let app = App::with_seams(cfg.clone(), store.clone(), seams, image, pool, vault);
        app.logins.set_timing(timing());
        app
    }

    /// The control plane dies (every task ends at once, as in a kill -9)
    /// and a new one starts over the same data dir, node and guests.
    async fn restart(&mut self) {
        self.app.stop_background();
        self.app = Self::app(&self.cfg, &self.pool, &self.store, &self.node, &self.guest);
        self.app.recover().await.expect("recover");
    }

    async fn start(&self) -> LoginRow {
        self.app
            .start_login(&self.user, PROVIDER)
            .await
            .expect("start")
    }

    async fn row(&self, id: &str) -> LoginRow {
        self.store.login(id).await.expect("q").expect("row")
    }

    /// Wait until the login is in `want`; panics after 10 s with the row.
    async fn until(&self, id: &str, want: LoginState) -> LoginRow {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let row = self.row(id).await;
            if row.state == want {
                return row;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "login is {} ({:?}), not {want}",
                row.state,
                row.reason
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The browser sandbox is gone: its row ended and the node holds nothing of it.
    async fn browser_gone(&self, row: &LoginRow) {
        let sid = row
            .browser_sandbox_id
            .as_deref()
            .expect("a browser sandbox");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let sb = self.store.sandbox(sid).await.expect("q").expect("row");
            if !sb.state.is_live() && self.node.instance(sid).is_none() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "browser sandbox {sid} is {} on a node holding {:?}",
                sb.state,
                self.node.ids()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn failed_count(&self, label: &str) -> u64 {
        self.app
            .login_stats(&self.user)
            .get(PROVIDER)
            .and_then(|s| s.failed.get(label).copied())
            .unwrap_or(0)
    }

    fn completed_count(&self) -> u64 {
        self.app
            .login_stats(&self.user)
            .get(PROVIDER)
            .map_or(0, |s| s.completed)
    }

    /// The record stored for the user opens to what the agent captured.
    async fn stored_opens_to(&self, login_id: &str) {
        let cred = self
            .store
            .credential(&self.user.id, PROVIDER)
            .await
            .expect("q")
            .expect("a stored record");
        assert_eq!(cred.login_id, login_id);
        assert!(!cred.sealed.contains(CANARY), "sealed, not plain");
        let plain = self
            .app
            .vault
            .read()
            .await
            .open(&cred.sealed, &aad(&self.user.id, PROVIDER, login_id))
            .expect("opens");
        let files: FileSet =
            serde_json::from_slice(secrecy::ExposeSecret::expose_secret(&plain)).expect("files");
        assert_eq!(files, files_of(login_id));
    }
}

// ---- the happy path ----

#[tokio::test]
async fn a_login_goes_through_every_state_and_delivers_once() {
    let bed = Bed::new().await;
    let login = bed.start().await;
    assert_eq!(login.state, LoginState::Starting);
    let waiting = bed.until(&login.id, LoginState::AwaitingUser).await;
    assert_eq!(
        waiting.login_url.as_deref(),
        Some("https://fake.test/authorize?x=1")
    );
    let sid = waiting.browser_sandbox_id.clone().expect("browser");
    assert_eq!(
        bed.store
            .sandbox(&sid)
            .await
            .expect("q")
            .expect("row")
            .state,
        SandboxState::Ready
    );
    bed.guest.sign_in(&login.id);
    let done = bed.until(&login.id, LoginState::Completed).await;
    assert!(done.reason.is_none(), "{:?}", done.reason);
    assert!(done.finished_at.is_some());
    bed.browser_gone(&done).await;
    bed.stored_opens_to(&login.id).await;
    let cred = bed
        .store
        .credential(&bed.user.id, PROVIDER)
        .await
        .expect("q")
        .expect("record");
    assert!(cred.delivered_at.is_some(), "marked with `delivered`");
    let deliveries = bed.guest.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(Some(&deliveries[0].0), done.workspace_sandbox_id.as_ref());
    assert_eq!(deliveries[0].1, files_of(&login.id));
    // The check ran in the workspace.
    assert!(bed
        .guest
        .base
        .execs()
        .iter()
        .any(|(sb, argv)| Some(sb) == done.workspace_sandbox_id.as_ref()
            && argv == &["fake-cli", "whoami"]));
    assert_eq!(bed.completed_count(), 1);
}

// ---- the machine through the store: every transition, every refusal ----

fn every_event() -> Vec<Event> {
    vec![
        Event::UrlCaptured { url: "u".into() },
        Event::Captured { url: None },
        Event::Stored(SealedRecord {
            sealed: "v1:k:x:y".into(),
            key_id: "k".into(),
        }),
        Event::Delivered {
            workspace: "w".into(),
        },
        Event::Finished,
        Event::Fail(Failure::new(Stage::Agent, "x")),
        Event::Expire { reason: "x".into() },
        Event::Cancel { reason: "x".into() },
        Event::OwnerRemoved { reason: "x".into() },
    ]
}

fn bare_login(id: &str, owner: &str, state: LoginState) -> LoginRow {
    LoginRow {
        id: id.into(),
        owner_id: owner.into(),
        provider: PROVIDER.into(),
        state,
        reason: None,
        login_url: None,
        awaiting_code: true,
        browser_sandbox_id: None,
        workspace_sandbox_id: None,
        created_at: now_ms(),
        updated_at: now_ms(),
        expires_at: now_ms() + 60_000,
        finished_at: None,
    }
}

/// A fresh database on the PostgreSQL test server, or `None` (said why)
/// when none is configured (CI sets `AIRLOCK_TEST_POSTGRES_URL`).
async fn postgres() -> Option<Store> {
    let Ok(base) = std::env::var("AIRLOCK_TEST_POSTGRES_URL") else {
        eprintln!("skipping the PostgreSQL half: AIRLOCK_TEST_POSTGRES_URL is not set");
        return None;
    };
    sqlx::any::install_default_drivers();
    let name = format!("airlock_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    let admin = sqlx::AnyPool::connect(&base)
        .await
        .expect("connect to the PostgreSQL test server");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    let (prefix, _) = base.rsplit_once('/').expect("URL has a database path");
    let store = Store::open(&format!("{prefix}/{name}"))
        .await
        .expect("open postgres");
    store.insert_user("u1", "alice", None).await.expect("user");
    Some(store)
}

/// Every (state, event) through `advance` on a real store: an allowed one
/// writes the machine's next state and its columns; a refused one writes
/// nothing at all.
async fn advance_matrix(store: &Store, owner: &str) {
    let mut n = 0;
    let (mut allowed, mut refused) = (0, 0);
    for from in LoginState::ALL {
        for event in every_event() {
            n += 1;
            let id = format!("l{n}");
            store
                .insert_login(&bare_login(&id, owner, from))
                .await
                .expect("insert");
            let before = store.login(&id).await.expect("q").expect("row");
            match (
                super::state::transition(from, &event),
                advance(store, &id, &event).await,
            ) {
                (Ok((to, effects)), Ok(done)) => {
                    allowed += 1;
                    assert_eq!(done.from, from);
                    assert_eq!(done.row.state, to, "{from} + {}", event.name());
                    assert_eq!(done.effects, effects);
                    assert_eq!(done.row.finished_at.is_some(), to.is_final());
                    assert!(
                        !done.row.awaiting_code,
                        "a new state clears the code prompt"
                    );
                    assert_eq!(done.row.reason, event.reason());
                    match &event {
                        Event::UrlCaptured { url } => {
                            assert_eq!(done.row.login_url.as_ref(), Some(url))
                        }
                        Event::Stored(_) => {
                            let cred = store
                                .credential(owner, PROVIDER)
                                .await
                                .expect("q")
                                .expect("written with the state");
                            assert_eq!(cred.login_id, id);
                            assert_eq!(cred.sealed, "v1:k:x:y");
                            assert!(cred.delivered_at.is_none());
                        }
                        Event::Delivered { workspace } => {
                            assert_eq!(done.row.workspace_sandbox_id.as_ref(), Some(workspace))
                        }
                        _ => {}
                    }
                }
                (Err(want), Err(AdvanceError::Refused(got))) => {
                    refused += 1;
                    assert_eq!(got, want);
                    let after = store.login(&id).await.expect("q").expect("row");
                    assert_eq!(after, before, "a refusal writes nothing");
                }
                (want, got) => panic!(
                    "{from} + {}: machine {want:?}, advance {got:?}",
                    event.name()
                ),
            }
        }
    }
    assert_eq!((allowed, refused), (21, 60));
    assert!(matches!(
        advance(store, "nope", &Event::Finished).await,
        Err(AdvanceError::NotFound(_))
    ));
    // `Delivered` marks the record of that very login, with the state.
    store
        .insert_login(&bare_login("d1", owner, LoginState::Captured))
        .await
        .expect("insert");
    for e in [
        Event::Stored(SealedRecord {
            sealed: "v1:k:d:y".into(),
            key_id: "k".into(),
        }),
        Event::Delivered {
            workspace: "w".into(),
        },
    ] {
        advance(store, "d1", &e).await.expect("advance");
    }
    let cred = store
        .credential(owner, PROVIDER)
        .await
        .expect("q")
        .expect("record");
    assert_eq!(cred.login_id, "d1");
    assert!(cred.delivered_at.is_some());
}

#[tokio::test]
async fn advance_writes_what_the_machine_decides_on_sqlite() {
    let bed = Bed::new().await;
    advance_matrix(&bed.store, &bed.user.id).await;
}

#[tokio::test]
async fn advance_writes_what_the_machine_decides_on_postgres() {
    if let Some(store) = postgres().await {
        advance_matrix(&store, "u1").await;
    }
}

/// Two writers race from the same state: one wins, and the other's event
/// is judged again against the state the winner left (here: refused).
#[tokio::test]
async fn a_lost_race_is_decided_again_by_the_machine() {
    let bed = Bed::new().await;
    for round in 0..20 {
        let id = format!("r{round}");
        bed.store
            .insert_login(&bare_login(&id, &bed.user.id, LoginState::Captured))
            .await
            .expect("insert");
        let cancel = Event::Cancel {
            reason: "user".into(),
        };
        let stored = Event::Stored(SealedRecord {
            sealed: format!("v1:k:{round}:y"),
            key_id: "k".into(),
        });
        let (a, b) = tokio::join!(
            advance(&bed.store, &id, &cancel),
            advance(&bed.store, &id, &stored),
        );
        let row = bed.row(&id).await;
        let cred = bed
            .store
            .credential(&bed.user.id, PROVIDER)
            .await
            .expect("q");
        match (a, b) {
            (Ok(_), Err(AdvanceError::Refused(r))) => {
                assert_eq!(r.from, LoginState::Cancelled);
                assert_eq!(row.state, LoginState::Cancelled);
                assert!(
                    cred.is_none_or(|c| c.login_id != id),
                    "no record for a cancelled login"
                );
            }
            (Err(AdvanceError::Refused(r)), Ok(_)) => {
                assert_eq!(r.from, LoginState::Stored);
                assert_eq!(row.state, LoginState::Stored);
                assert_eq!(cred.expect("record").login_id, id);
            }
            other => panic!("both or neither won: {other:?}"),
        }
    }
}

// ---- a failure at each step ----

/// What the login ended as, after `break_it` broke one step.
async fn fails_at(
    break_it: impl FnOnce(&Bed),
    sign_in: bool,
    label: &str,
    reason_starts: &str,
) -> (Bed, LoginRow) {
    let bed = Bed::new().await;
    break_it(&bed);
    let login = bed.start().await;
    if sign_in {
        bed.until(&login.id, LoginState::AwaitingUser).await;
        bed.guest.sign_in(&login.id);
    }
    let row = bed.until(&login.id, LoginState::Failed).await;
    let reason = row.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(reason_starts),
        "{label}: reason {reason:?} does not start with {reason_starts:?}"
    );
    assert!(!reason.contains(CANARY), "no secret in a reason");
    bed.browser_gone(&row).await;
    assert_eq!(bed.failed_count(label), 1, "counted as {label}");
    (bed, row)
}

#[tokio::test]
async fn the_browser_sandbox_fails_to_boot() {
    let (_, row) = fails_at(
        |bed| {
            bed.node.fail_always(
                crate::node::fake::Step::Start,
                crate::node::NodeError::Failed("nspawn exited 1".into()),
            )
        },
        false,
        "sandbox",
        // `failed`, or already on its way out when the login looked.
        "browser sandbox: it is ",
    )
    .await;
    let reason = row.reason.unwrap_or_default();
    assert!(reason.contains("nspawn exited 1"), "{reason}");
}

#[tokio::test]
async fn no_browser_sandbox_can_be_made() {
    let bed = Bed::new().await;
    // Beyond the quota: refused before anything is written.
    bed.node.fail_always(
        crate::node::fake::Step::Create,
        crate::node::NodeError::Failed("no room".into()),
    );
    let login = bed.start().await;
    let row = bed.until(&login.id, LoginState::Failed).await;
    assert!(
        row.reason
            .as_deref()
            .unwrap_or("")
            .starts_with("browser sandbox:"),
        "{:?}",
        row.reason
    );
    bed.browser_gone(&row).await;
}

#[tokio::test]
async fn the_agent_does_not_answer() {
    fails_at(
        |bed| bed.guest.plan(|p| p.down = true),
        false,
        "agent",
        "agent: no answer for 300ms",
    )
    .await;
}

#[tokio::test]
async fn the_agent_cannot_start_the_cli() {
    fails_at(
        |bed| {
            bed.guest
                .plan(|p| p.refuse_start = Some((400, "unknown provider".into())))
        },
        false,
        "cli_start",
        "starting the login command: the sandbox's agent answered 400: unknown provider",
    )
    .await;
    fails_at(
        |bed| {
            bed.guest
                .plan(|p| p.refuse_start = Some((503, "busy".into())))
        },
        false,
        "cli_start",
        "starting the login command: refused for 300ms: 503 busy",
    )
    .await;
}

#[tokio::test]
async fn the_cli_exits() {
    fails_at(
        |bed| {
            bed.guest
                .plan(|p| p.exit = Some("exit status 3: cannot reach fake.test".into()))
        },
        false,
        "cli_exited",
        "login command: exit status 3: cannot reach fake.test",
    )
    .await;
}

#[tokio::test]
async fn the_url_never_comes() {
    let (_, row) = fails_at(
        |bed| {
            bed.guest.plan(|p| {
                p.url = None;
                p.seen = Some("only a shortened link on screen (https://fake.test/z-…)".into());
            })
        },
        false,
        "url",
        "sign-in URL: it handed over no URL that passes the provider's rule within 400ms",
    )
    .await;
    let reason = row.reason.unwrap_or_default();
    assert!(
        reason.ends_with("seen: only a shortened link on screen (https://fake.test/z-…)"),
        "{reason}"
    );
}

/// The agent gave up on the URL itself (what the command showed did not
/// pass the rule within the provider's wait): the URL step failed, not
/// the command.
#[tokio::test]
async fn the_agent_refuses_every_url() {
    fails_at(
        |bed| {
            bed.guest.plan(|p| {
                p.url = None;
                p.step = Some(AgentStep::Url);
                p.exit = Some("fake-cli showed only a shortened link on screen; its browser hook was never handed a URL that qualifies within 20 s".into());
            })
        },
        false,
        "url",
        "sign-in URL: fake-cli showed only a shortened link on screen; its browser hook was never",
    )
    .await;
}

/// A command that draws nothing, and one stuck at its prompts: each fails
/// in its own step, under its own deadline, saying what was on screen.
#[tokio::test]
async fn the_cli_draws_nothing_or_sticks_at_a_prompt() {
    fails_at(
        |bed| {
            bed.guest.plan(|p| {
                p.url = None;
                p.step = Some(AgentStep::CliStart);
            })
        },
        false,
        "cli_start",
        "starting the login command: it drew nothing within 300ms",
    )
    .await;
    fails_at(
        |bed| {
            bed.guest.plan(|p| {
                p.url = None;
                p.step = Some(AgentStep::Prompts);
                p.seen = Some("its screen ends: Pick a theme".into());
            })
        },
        false,
        "prompts",
        "the login command's prompts: not every prompt was answered within 500ms; seen: its screen ends: Pick a theme",
    )
    .await;
}

/// While `starting`, the login says which step it is in, and each step
/// entered is noted in order; its task's end forgets them.
#[tokio::test]
async fn a_starting_login_shows_its_step() {
    let bed = Bed::new().await;
    bed.app.logins.set_timing(Timing {
        prompts: Duration::from_secs(30),
        ..timing()
    });
    bed.guest.plan(|p| {
        p.url = None;
        p.step = Some(AgentStep::Prompts);
    });
    let login = bed.start().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bed.app.logins.progress.current(&login.id) != Some(super::progress::LoginStep::Prompts) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            bed.app.logins.progress.marks(&login.id)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let steps: Vec<_> = bed
        .app
        .logins
        .progress
        .marks(&login.id)
        .iter()
        .map(|m| m.step.as_str())
        .collect();
    assert_eq!(steps, ["sandbox", "agent", "prompts"]);
    bed.guest.plan(|p| {
        p.step = None;
        p.url = Some("https://fake.test/auth".into());
    });
    bed.until(&login.id, LoginState::AwaitingUser).await;
    let steps: Vec<_> = bed
        .app
        .logins
        .progress
        .marks(&login.id)
        .iter()
        .map(|m| m.step.as_str())
        .collect();
    assert_eq!(
        steps,
        ["sandbox", "agent", "prompts"],
        "the URL came while at the prompts"
    );
    bed.app
        .cancel_login(&bed.user, &login.id)
        .await
        .expect("cancel");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bed.app.logins.progress.marks(&login.id).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "progress kept after the end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_credentials_cannot_be_fetched() {
    let (bed, row) = fails_at(
        |bed| bed.guest.plan(|p| p.fail_fetch = Some(500)),
        true,
        "capture",
        "capturing the credentials: fetching them",
    )
    .await;
    assert!(bed
        .store
        .credential(&bed.user.id, PROVIDER)
        .await
        .expect("q")
        .is_none_or(|c| c.login_id != row.id));
}

#[tokio::test]
async fn delivery_fails_and_the_record_stays() {
    let (bed, row) = fails_at(
        |bed| bed.guest.plan(|p| p.fail_deliver = Some(500)),
        true,
        "delivery",
        "delivery: writing into the workspace",
    )
    .await;
    // Stored before delivery: not lost, and not marked delivered.
    bed.stored_opens_to(&row.id).await;
    let cred = bed
        .store
        .credential(&bed.user.id, PROVIDER)
        .await
        .expect("q")
        .expect("record");
    assert!(cred.delivered_at.is_none());
}

#[tokio::test]
async fn the_workspace_check_says_not_signed_in() {
    fails_at(
        |bed| {
            bed.guest.base.script(
                "fake-cli",
                ExecResponse {
                    exit_code: Some(1),
                    stdout: "not logged in".into(),
                    stderr: String::new(),
                    timed_out: false,
                    truncated: false,
                },
            )
        },
        true,
        "delivery",
        "delivery: `fake-cli whoami` in the workspace does not report itself signed in",
    )
    .await;
}

#[tokio::test]
async fn the_agent_restarted_and_forgot_the_login() {
    let bed = Bed::new().await;
    let login = bed.start().await;
    bed.until(&login.id, LoginState::AwaitingUser).await;
    bed.guest.w().running.clear();
    let row = bed.until(&login.id, LoginState::Failed).await;
    assert_eq!(
        row.reason.as_deref(),
        Some("agent: it no longer runs this login (it restarted)")
    );
    bed.browser_gone(&row).await;
}

// ---- cancel, expiry ----

#[tokio::test]
async fn cancel_during_capture_stores_nothing() {
    let bed = Bed::new().await;
    bed.guest.fetch_open.send_replace(false);
    let login = bed.start().await;
    bed.until(&login.id, LoginState::AwaitingUser).await;
    bed.guest.sign_in(&login.id);
    bed.until(&login.id, LoginState::Captured).await;
    bed.guest.seen(1).await;
    let row = bed
        .app
        .cancel_login(&bed.user, &login.id)
        .await
        .expect("cancel");
    assert_eq!(row.state, LoginState::Cancelled);
    assert_eq!(row.reason.as_deref(), Some("cancelled by the user"));
    // The fetch answers after the cancel: its `Stored` is refused.
    bed.guest.fetch_open.send_replace(true);
    bed.browser_gone(&row).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bed.row(&login.id).await.state, LoginState::Cancelled);
    assert!(bed
        .store
        .credential(&bed.user.id, PROVIDER)
        .await
        .expect("q")
        .is_none());
    assert!(bed.guest.deliveries().is_empty());
    assert_eq!(bed.failed_count("cancelled"), 1);
    // Cancelling again answers the same; a stored login cannot be cancelled.
    let again = bed
        .app
        .cancel_login(&bed.user, &login.id)
        .await
        .expect("again");
    assert_eq!(again.state, LoginState::Cancelled);
    bed.store
        .insert_login(&bare_login("st", &bed.user.id, LoginState::Stored))
        .await
        .expect("insert");
    match bed.app.cancel_login(&bed.user, "st").await {
        Err(AppError::Conflict(m)) => assert!(m.contains("already stored"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_login_not_signed_in_in_time_expires() {
    let bed = Bed::with(|cfg| cfg.login_timeout = Duration::from_millis(600)).await;
    let login = bed.start().await;
    bed.until(&login.id, LoginState::AwaitingUser).await;
    let row = bed.until(&login.id, LoginState::Expired).await;
    assert_eq!(row.reason.as_deref(), Some("not signed in within 0 s"));
    bed.browser_gone(&row).await;
    assert_eq!(bed.failed_count("expired"), 1);
    // Signing in now changes nothing.
    bed.guest.sign_in(&login.id);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bed.row(&login.id).await.state, LoginState::Expired);
}

#[tokio::test]
async fn the_reaper_expires_logins_nobody_drives() {
    let bed = Bed::new().await;
    let mut row = bare_login("old", &bed.user.id, LoginState::AwaitingUser);
    row.expires_at = now_ms() - 1;
    bed.store.insert_login(&row).await.expect("insert");
    bed.app.reap_logins().await;
    assert_eq!(bed.row("old").await.state, LoginState::Expired);
}

#[tokio::test]
async fn removing_the_user_ends_its_logins_through_the_machine() {
    let bed = Bed::new().await;
    bed.store
        .insert_login(&bare_login("s1", &bed.user.id, LoginState::Stored))
        .await
        .expect("insert");
    bed.store
        .insert_login(&bare_login("c1", &bed.user.id, LoginState::Completed))
        .await
        .expect("insert");
    crate::app::auth::remove_user(&bed.store, &bed.cfg.data_dir, "alice")
        .await
        .expect("remove");
    // Removed at once (no sandbox held anything): the rows went with it.
    assert!(bed.store.login("s1").await.expect("q").is_none());
    // With a sandbox still holding resources the login ends and stays listed.
    let bed = Bed::new().await;
    let login = bed.start().await;
    bed.until(&login.id, LoginState::AwaitingUser).await;
    bed.store
        .insert_login(&bare_login("s2", &bed.user.id, LoginState::Stored))
        .await
        .expect("insert");
    crate::app::auth::remove_user(&bed.store, &bed.cfg.data_dir, "alice")
        .await
        .expect("remove");
    for id in [login.id.as_str(), "s2"] {
        let row = bed.row(id).await;
        assert_eq!(row.state, LoginState::Cancelled, "{id}");
        assert_eq!(row.reason.as_deref(), Some("its user was removed"));
    }
}

// ---- a restart at each state ----

/// The control plane dies right after writing `at` (its effect not run)
/// and starts again: the login completes, its record is the one captured,
/// and it is delivered exactly once in all.
async fn restart_at(at: LoginState) {
    let mut bed = Bed::new().await;
    if at == LoginState::Starting {
        bed.guest.plan(|p| p.url = None);
    }
    let login = bed.start().await;
    let mut delivered_before = 0;
    match at {
        LoginState::Starting => {
            // The command runs; its URL has not come yet.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while bed.guest.w().starts.is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "never started");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        _ => {
            bed.until(&login.id, LoginState::AwaitingUser).await;
        }
    }
    bed.app.stop_background();
    // What the dead control plane had written, one event at a time.
    let mut path = vec![];
    if matches!(
        at,
        LoginState::Captured | LoginState::Stored | LoginState::Delivered
    ) {
        path.push(Event::Captured { url: None });
    }
    if matches!(at, LoginState::Stored | LoginState::Delivered) {
        let plain = serde_json::to_vec(&files_of(&login.id)).expect("json");
        let vault = bed.app.vault.read().await;
        path.push(Event::Stored(SealedRecord {
            sealed: vault.seal(&plain, &aad(&bed.user.id, PROVIDER, &login.id)),
            key_id: vault.current_key_id().to_owned(),
        }));
    }
    if at == LoginState::Delivered {
        // Delivered by the dead control plane itself.
        bed.guest
            .w()
            .deliveries
            .push(("before".into(), files_of(&login.id)));
        delivered_before = 1;
        path.push(Event::Delivered {
            workspace: "before".into(),
        });
    }
    for e in &path {
        advance(&bed.store, &login.id, e).await.expect("advance");
    }
    assert_eq!(bed.row(&login.id).await.state, at);
    bed.guest
        .plan(|p| p.url = Some("https://fake.test/authorize?x=2".into()));
    bed.restart().await;
    if at.is_waiting() {
        bed.until(&login.id, LoginState::AwaitingUser).await;
    }
    bed.guest.sign_in(&login.id);
    let done = bed.until(&login.id, LoginState::Completed).await;
    bed.browser_gone(&done).await;
    bed.stored_opens_to(&login.id).await;
    assert_eq!(
        bed.guest.deliveries().len(),
        1,
        "{at}: delivered once in all ({delivered_before} before the restart)"
    );
    assert_eq!(bed.completed_count(), 1, "{at}");
}

#[tokio::test]
async fn restart_while_starting() {
    restart_at(LoginState::Starting).await;
}

#[tokio::test]
async fn restart_while_awaiting_the_user() {
    restart_at(LoginState::AwaitingUser).await;
}

#[tokio::test]
async fn restart_after_capture() {
    restart_at(LoginState::Captured).await;
}

#[tokio::test]
async fn restart_after_storing() {
    restart_at(LoginState::Stored).await;
}

#[tokio::test]
async fn restart_after_delivery() {
    restart_at(LoginState::Delivered).await;
}

/// A login that ended while the control plane was down still gets its
/// browser sandbox destroyed by the next start.
#[tokio::test]
async fn restart_after_an_end_destroys_the_browser_sandbox() {
    let mut bed = Bed::new().await;
    let login = bed.start().await;
    let row = bed.until(&login.id, LoginState::AwaitingUser).await;
    bed.app.stop_background();
    advance(
        &bed.store,
        &login.id,
        &Event::Fail(Failure::new(Stage::Agent, "the control plane died")),
    )
    .await
    .expect("fail");
    assert!(bed
        .node
        .instance(row.browser_sandbox_id.as_deref().expect("sb"))
        .is_some());
    bed.restart().await;
    bed.browser_gone(&row).await;
}

/// Two cancels at once: both answer `cancelled`, one wrote it, it is
/// counted once, and the browser sandbox goes.
#[tokio::test]
async fn two_cancels_at_once() {
    let bed = Bed::new().await;
    let login = bed.start().await;
    bed.until(&login.id, LoginState::AwaitingUser).await;
    let (a, b) = tokio::join!(
        bed.app.cancel_login(&bed.user, &login.id),
        bed.app.cancel_login(&bed.user, &login.id),
    );
    assert_eq!(a.expect("a").state, LoginState::Cancelled);
    assert_eq!(b.expect("b").state, LoginState::Cancelled);
    let row = bed.row(&login.id).await;
    bed.browser_gone(&row).await;
    assert_eq!(bed.failed_count("cancelled"), 1);
}

/// A code goes only to a login that waits for one, of a provider that reads
/// one; the refusals change nothing.
#[tokio::test]
async fn a_code_is_refused_where_no_code_is_read() {
    let bed = Bed::new().await;
    let login = bed.start().await;
    match bed.app.submit_code(&bed.user, &login.id, "abc").await {
        Err(AppError::Conflict(m)) => assert!(m.contains("not awaiting_user"), "{m}"),
        other => panic!("{other:?}"),
    }
    bed.until(&login.id, LoginState::AwaitingUser).await;
    match bed.app.submit_code(&bed.user, &login.id, "abc").await {
        Err(AppError::Conflict(m)) => assert!(m.contains("takes no code"), "{m}"),
        other => panic!("{other:?}"),
    }
    let other = bed
        .store
        .insert_user("u2", "bob", None)
        .await
        .expect("user");
    assert!(matches!(
        bed.app.submit_code(&other, &login.id, "abc").await,
        Err(AppError::NotFound(_))
    ));
    assert_eq!(bed.row(&login.id).await.state, LoginState::AwaitingUser);
}

/// The paste-code route: the prompt shows as `awaiting_code`, the code typed
/// reaches the command, and the login completes.
#[tokio::test]
async fn a_pasted_code_completes_the_login() {
    let bed = Bed::new().await;
    bed.guest.plan(|p| p.code = true);
    let login = bed
        .app
        .start_login(&bed.user, "fakecode")
        .await
        .expect("start");
    bed.until(&login.id, LoginState::AwaitingUser).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bed.row(&login.id).await.awaiting_code {
        assert!(tokio::time::Instant::now() < deadline, "no code prompt");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        bed.app.submit_code(&bed.user, &login.id, "bad\ncode").await,
        Err(AppError::BadInput(_))
    ));
    bed.app
        .submit_code(&bed.user, &login.id, "  good-code ")
        .await
        .expect("typed");
    assert_eq!(
        bed.guest.w().typed,
        vec![(login.id.clone(), "good-code".to_owned())]
    );
    let done = bed.until(&login.id, LoginState::Completed).await;
    assert!(!done.awaiting_code);
    bed.browser_gone(&done).await;
    assert_eq!(bed.guest.deliveries().len(), 1);
}

// ---- several workspaces ----

/// A login names the workspace it delivers to: made under that name (with
/// its own home), while a login naming none goes to `default`.
#[tokio::test]
async fn a_login_delivers_to_the_workspace_it_names() {
    let bed = Bed::new().await;
    let bad = bed
        .app
        .start_login_to(&bed.user, PROVIDER, Some("../x"))
        .await;
    assert!(
        matches!(bad, Err(crate::app::AppError::BadInput(_))),
        "{bad:?}"
    );
    assert!(bed
        .store
        .logins_of(&bed.user.id)
        .await
        .expect("q")
        .is_empty());
    let login = bed
        .app
        .start_login_to(&bed.user, PROVIDER, Some("proj"))
        .await
        .expect("start");
    bed.until(&login.id, LoginState::AwaitingUser).await;
    bed.guest.sign_in(&login.id);
    let done = bed.until(&login.id, LoginState::Completed).await;
    let ws = done.workspace_sandbox_id.expect("a workspace");
    assert_eq!(bed.app.workspace_name_of(&ws).await.expect("name"), "proj");
    let home = bed
        .node
        .instance(&ws)
        .expect("on the node")
        .req
        .home_volume
        .expect("a home");
    assert!(home.ends_with(format!("{}/workspaces/proj/home", bed.user.id)));
    assert_eq!(
        bed.guest.deliveries().last().map(|d| d.0.clone()),
        Some(ws.clone())
    );
    // The next login names none: the default workspace, another sandbox.
    let second = bed.start().await;
    bed.until(&second.id, LoginState::AwaitingUser).await;
    bed.guest.sign_in(&second.id);
    let done = bed.until(&second.id, LoginState::Completed).await;
    let ws2 = done.workspace_sandbox_id.expect("a workspace");
    assert_ne!(ws2, ws);
    assert_eq!(
        bed.app.workspace_name_of(&ws2).await.expect("name"),
        "default"
    );
    let placed: Vec<String> = bed
        .store
        .placements_of(&bed.user.id)
        .await
        .expect("q")
        .into_iter()
        .map(|p| p.workspace)
        .collect();
    assert_eq!(placed, ["default", "proj"]);
}

/// A login's delivery racing a revocation in another control plane (its own
/// per-user lock, the same database): the delivery has read the record and
/// waits to write while the other process revokes and sweeps; when the
/// write lands, the revocation generation has moved, so the login takes
/// the files back out and fails instead of leaving revoked files behind.
#[tokio::test]
async fn a_login_delivery_racing_a_revocation_takes_its_files_back() {
    let bed = Bed::new().await;
    bed.guest.deliver_open.send_replace(false);
    let login = bed.start().await;
    bed.until(&login.id, LoginState::AwaitingUser).await;
    bed.guest.sign_in(&login.id);
    // One fetch, then the delivery reached the guest and waits there.
    bed.guest.seen(2).await;
    assert_eq!(bed.row(&login.id).await.state, LoginState::Stored);
    let other = Bed::app(&bed.cfg, &bed.pool, &bed.store, &bed.node, &bed.guest);
    assert!(other
        .revoke_credentials(&bed.user, PROVIDER)
        .await
        .expect("revoke"));
    bed.guest.deliver_open.send_replace(true);
    let done = bed.until(&login.id, LoginState::Failed).await;
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.contains("revoked while they were delivered"),
        "{reason}"
    );
    let writes = bed.guest.w().home_writes.clone();
    let (last, ws) = writes.last().cloned().expect("writes");
    assert_eq!(last, "remove", "the revoked files stay: {writes:?}");
    assert!(
        writes.iter().any(|(k, w)| *k == "deliver" && *w == ws),
        "{writes:?}"
    );
    assert!(bed
        .store
        .credential(&bed.user.id, PROVIDER)
        .await
        .expect("q")
        .is_none());
}
