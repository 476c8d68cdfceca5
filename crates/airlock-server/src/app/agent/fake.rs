//! A fake guest for unit tests: answers as the guests of a
//! [`FakeNode`](crate::node::fake::FakeNode) would, from the node's own
//! record of them (found by address), so a guest that is not running, or
//! whose agent or display was taken down by the test, does not answer.
//! Exec answers are scripted per program name.

use super::{AgentError, Guest};
use crate::node::fake::{DisplayState, FakeInstance, FakeNode};
use airlock_proto::login::{FileBlob, FileSet};
use airlock_proto::agent::{ExecRequest, ExecResponse, Health, Session};
use async_trait::async_trait;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct FakeGuest {
    node: Arc<FakeNode>,
    /// Program name → its answer; a program not listed exits 0 with its argv
    /// echoed on stdout.
    scripts: Mutex<HashMap<String, ExecResponse>>,
    /// Every exec, as (sandbox id, argv).
    execs: Mutex<Vec<(String, Vec<String>)>>,
    /// Each sandbox's home: path → contents (base64), as delivered or put.
    homes: Mutex<HashMap<String, std::collections::BTreeMap<String, String>>>,
    /// Sessions handed to pool members, by sandbox id.
    sessions: Mutex<HashMap<String, Session>>,
    /// `hand_session` fails with this (a claim that breaks half-way).
    session_failure: Mutex<Option<String>>,
}

impl FakeGuest {
    pub fn new(node: Arc<FakeNode>) -> Self {
        FakeGuest {
            node,
            scripts: Mutex::default(),
            execs: Mutex::default(),
            homes: Mutex::default(),
            sessions: Mutex::default(),
            session_failure: Mutex::default(),
        }
    }

    /// Write a file into a sandbox's home (what a CLI there would do);
    /// `None` removes it.
    pub fn put_home_file(&self, sandbox_id: &str, path: &str, contents_b64: Option<&str>) {
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        let home = homes.entry(sandbox_id.to_owned()).or_default();
        match contents_b64 {
            Some(c) => home.insert(path.to_owned(), c.to_owned()),
            None => home.remove(path),
        };
    }

    /// A file of a sandbox's home (base64), if there.
    pub fn home_file(&self, sandbox_id: &str, path: &str) -> Option<String> {
        let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        homes.get(sandbox_id).and_then(|h| h.get(path)).cloned()
    }

    /// Handing a session fails with `why` from now on (None: works again).
    pub fn fail_sessions(&self, why: Option<&str>) {
        *self
            .session_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = why.map(str::to_owned);
    }

    /// The session sandbox `id`'s agent holds, if any.
    pub fn session_of(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get(id).cloned()
    }

    /// `program` answers `answer` from now on.
    pub fn script(&self, program: &str, answer: ExecResponse) {
        self.scripts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(program.to_owned(), answer);
    }

    pub fn execs(&self) -> Vec<(String, Vec<String>)> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The running guest at `addr` whose agent is up and takes `token`.
    fn agent_at(&self, addr: SocketAddr, token: &str) -> Result<FakeInstance, AgentError> {
        let guest = self
            .node
            .guest_at(addr.ip())
            .filter(|g| g.running && g.agent_up)
            .ok_or_else(|| AgentError::Down(format!("connection to {addr} refused")))?;
        if guest.req.metadata.agent_token != token {
            return Err(AgentError::Status {
                status: 401,
                message: "wrong token".into(),
            });
        }
        Ok(guest)
    }

    fn display_at(&self, addr: SocketAddr, password: &str) -> Result<FakeInstance, String> {
        let guest = self
            .node
            .guest_at(addr.ip())
            .filter(|g| g.running && g.display != DisplayState::Down)
            .ok_or_else(|| "VNC: VNC connection failed: connection refused".to_owned())?;
        if guest.req.metadata.vnc_password != password {
            return Err("VNC authentication failed: wrong password".into());
        }
        Ok(guest)
    }
}

#[async_trait]
impl Guest for FakeGuest {
    async fn health(&self, agent: SocketAddr, token: &str) -> Result<Health, AgentError> {
        let guest = self.agent_at(agent, token)?;
        Ok(Health {
            status: "ok".into(),
            sandbox_id: guest.req.metadata.sandbox_id.clone(),
            image_build_id: guest.req.image.build_id.clone(),
            uptime_s: 1,
        })
    }

    async fn exec(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &ExecRequest,
    ) -> Result<ExecResponse, AgentError> {
        let guest = self.agent_at(agent, token)?;
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((guest.req.id.clone(), req.argv.clone()));
        let program = req.argv.first().cloned().unwrap_or_default();
        let scripted = self
            .scripts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&program)
            .cloned();
        Ok(scripted.unwrap_or_else(|| ExecResponse {
            exit_code: Some(0),
            stdout: req.argv.join(" "),
            stderr: String::new(),
            timed_out: false,
            truncated: false,
        }))
    }

    async fn desktop_shown(&self, display: SocketAddr, password: &str) -> Result<(), String> {
        match self.display_at(display, password)?.display {
            DisplayState::Up => Ok(()),
            _ => Err("the display is still blank (1 colours)".into()),
        }
    }

    async fn display_answers(&self, display: SocketAddr, password: &str) -> Result<(), String> {
        self.display_at(display, password).map(|_| ())
    }

    async fn deliver_credentials(
        &self,
        agent: SocketAddr,
        token: &str,
        files: &FileSet,
    ) -> Result<(), AgentError> {
        let guest = self.agent_at(agent, token)?;
        for f in &files.files {
            self.put_home_file(&guest.req.id, &f.path, Some(&f.contents_b64));
        }
        Ok(())
    }

    async fn read_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        paths: &[String],
    ) -> Result<FileSet, AgentError> {
        let guest = self.agent_at(agent, token)?;
        let files = paths
            .iter()
            .filter_map(|p| {
                self.home_file(&guest.req.id, p).map(|c| FileBlob {
                    path: p.clone(),
                    contents_b64: c,
                })
            })
            .collect();
        Ok(FileSet { files })
    }

    async fn remove_home_files(
        &self,
        agent: SocketAddr,
        token: &str,
        paths: &[String],
    ) -> Result<(), AgentError> {
        let guest = self.agent_at(agent, token)?;
        for p in paths {
            self.put_home_file(&guest.req.id, p, None);
        }
        Ok(())
    }

    async fn hand_session(
        &self,
        agent: SocketAddr,
        token: &str,
        session: &Session,
    ) -> Result<(), AgentError> {
        let guest = self.agent_at(agent, token)?;
        if let Some(why) = self
            .session_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(AgentError::Down(why));
        }
        let id = guest.req.metadata.sandbox_id.clone();
        if session.sandbox_id != id {
            return Err(AgentError::Status {
                status: 400,
                message: "the session is for another sandbox".into(),
            });
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // As the agent does: one owner, ever.
        match sessions.get(&id) {
            Some(held) if held.user_id != session.user_id => Err(AgentError::Status {
                status: 409,
                message: "this sandbox already belongs to another user".into(),
            }),
            _ => {
                sessions.insert(id, session.clone());
                Ok(())
            }
        }
    }

    async fn session(&self, agent: SocketAddr, token: &str) -> Result<Option<Session>, AgentError> {
        let guest = self.agent_at(agent, token)?;
        Ok(self.session_of(&guest.req.metadata.sandbox_id))
    }
}
