//! A fake guest for unit tests: answers as the guests of a
//! [`FakeNode`](crate::node::fake::FakeNode) would, from the node's own
//! record of them (found by address), so a guest that is not running, or
//! whose agent or display was taken down by the test, does not answer.
//! Exec answers are scripted per program name.

use super::{AgentError, Download, Guest, IoFrame, ProcessIo};
use crate::node::fake::{DisplayState, FakeInstance, FakeNode};
use airlock_proto::agent::{ExecRequest, ExecResponse, Health, Session};
use airlock_proto::login::{FileBlob, FileSet};
use airlock_proto::process::{FileInfo, ProcessInfo, ProcessList, ProcessState, StartProcess};
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
    /// Processes started, as (sandbox id, process): each echoes its stdin.
    processes: Mutex<Vec<(String, ProcessInfo)>>,
    /// Files put, as (sandbox id, path) → bytes.
    files: Mutex<HashMap<(String, String), bytes::Bytes>>,
    /// While set, a delivery stops before writing until the gate opens.
    delivery_gate: Mutex<Option<DeliveryGate>>,
}

/// Deliveries held between reaching the guest and writing (see
/// [`FakeGuest::hold_deliveries`]).
#[derive(Debug, Clone)]
pub struct DeliveryGate {
    /// Notified as a delivery reaches the gate.
    pub reached: Arc<tokio::sync::Notify>,
    /// One permit lets one delivery write.
    pub open: Arc<tokio::sync::Semaphore>,
}

impl Default for DeliveryGate {
    fn default() -> Self {
        DeliveryGate {
            reached: Arc::default(),
            open: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
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
            processes: Mutex::default(),
            files: Mutex::default(),
            delivery_gate: Mutex::default(),
        }
    }

    /// Hold every delivery from now on after it reached the guest and
    /// before it writes, until the gate gives it a permit: a test puts
    /// another writer (a revocation) in between.
    pub fn hold_deliveries(&self) -> DeliveryGate {
        let gate = DeliveryGate::default();
        *self.delivery_gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate.clone());
        gate
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
        let gate = self
            .delivery_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(gate) = gate {
            gate.reached.notify_one();
            if let Ok(permit) = gate.open.acquire().await {
                permit.forget();
            }
        }
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

    async fn process_start(
        &self,
        agent: SocketAddr,
        token: &str,
        req: &StartProcess,
    ) -> Result<ProcessInfo, AgentError> {
        let guest = self.agent_at(agent, token)?;
        let mut procs = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        let info = ProcessInfo {
            pid: 100 + procs.len() as u32,
            argv: req.argv.clone(),
            state: ProcessState::Running,
            exit_code: None,
            signal: None,
            timed_out: false,
            pty: req.pty,
            started_at_ms: 0,
            ended_at_ms: None,
            output_bytes: 0,
        };
        procs.push((guest.req.id.clone(), info.clone()));
        Ok(info)
    }

    async fn process_list(
        &self,
        agent: SocketAddr,
        token: &str,
    ) -> Result<ProcessList, AgentError> {
        let guest = self.agent_at(agent, token)?;
        let procs = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ProcessList {
            processes: procs
                .iter()
                .filter(|(id, _)| *id == guest.req.id)
                .map(|(_, p)| p.clone())
                .collect(),
        })
    }

    async fn process_get(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
    ) -> Result<ProcessInfo, AgentError> {
        self.process_list(agent, token)
            .await?
            .processes
            .into_iter()
            .find(|p| p.pid == pid)
            .ok_or_else(|| AgentError::Status {
                status: 404,
                message: format!("no process {pid} here"),
            })
    }

    async fn process_kill(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
        signal: Option<&str>,
    ) -> Result<ProcessInfo, AgentError> {
        let guest = self.agent_at(agent, token)?;
        let _ = signal;
        let mut procs = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        let (_, p) = procs
            .iter_mut()
            .find(|(id, p)| *id == guest.req.id && p.pid == pid)
            .ok_or_else(|| AgentError::Status {
                status: 404,
                message: format!("no process {pid} here"),
            })?;
        p.state = ProcessState::Exited;
        p.signal = Some(9);
        Ok(p.clone())
    }

    /// Says `fake output`, echoes stdin frames as stdout, and exits 0 on `eof`.
    async fn process_io(
        &self,
        agent: SocketAddr,
        token: &str,
        pid: u32,
        offset: u64,
    ) -> Result<ProcessIo, AgentError> {
        self.process_get(agent, token, pid).await?;
        let _ = offset;
        let (to_guest, mut outbound) = tokio::sync::mpsc::channel(16);
        let (inbound, from_guest) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut hello = vec![airlock_proto::process::TAG_STDOUT];
            hello.extend_from_slice(b"fake output\n");
            if inbound.send(IoFrame::Binary(hello.into())).await.is_err() {
                return;
            }
            while let Some(frame) = outbound.recv().await {
                let reply = match frame {
                    IoFrame::Binary(b) => {
                        let mut out = vec![airlock_proto::process::TAG_STDOUT];
                        out.extend_from_slice(&b);
                        IoFrame::Binary(out.into())
                    }
                    IoFrame::Text(t) if t.contains("eof") => {
                        let _ = inbound
                            .send(IoFrame::Text(
                                r#"{"type":"exit","exit_code":0,"signal":null,"timed_out":false}"#
                                    .into(),
                            ))
                            .await;
                        let _ = inbound
                            .send(IoFrame::Close(1000, "the process ended".into()))
                            .await;
                        return;
                    }
                    _ => continue,
                };
                if inbound.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Ok(ProcessIo {
            to_guest,
            from_guest,
        })
    }

    async fn file_put(
        &self,
        agent: SocketAddr,
        token: &str,
        path: &str,
        body: axum::body::Body,
    ) -> Result<FileInfo, AgentError> {
        let guest = self.agent_at(agent, token)?;
        let data = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|e| AgentError::Down(format!("the upload broke off: {e}")))?;
        if path.contains("..") {
            return Err(AgentError::Status {
                status: 403,
                message: format!("{path}: '..' is not allowed in a path"),
            });
        }
        let size = data.len() as u64;
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((guest.req.id.clone(), path.to_owned()), data);
        Ok(FileInfo {
            path: format!("/home/user/{path}"),
            size,
        })
    }

    async fn file_get(
        &self,
        agent: SocketAddr,
        token: &str,
        path: &str,
    ) -> Result<Download, AgentError> {
        let guest = self.agent_at(agent, token)?;
        let data = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(guest.req.id.clone(), path.to_owned()))
            .cloned()
            .ok_or_else(|| AgentError::Status {
                status: 404,
                message: format!("{path}: no such file"),
            })?;
        Ok(Download {
            content_type: "application/octet-stream".into(),
            body: axum::body::Body::from(data),
        })
    }
}
