//! What a login asks of a guest's agent, as a trait: the HTTP client
//! implements it for real guests, and unit tests put a fake agent behind it
//! (login screens, a sign-in URL, credential files, exec).

use crate::app::agent::{AgentClient, AgentError};
use airlock_proto::agent::{ExecRequest, ExecResponse};
use airlock_proto::login::{FileSet, LoginInput, LoginStart, LoginStatus};
use async_trait::async_trait;
use reqwest::Method;
use std::net::SocketAddr;

/// Where a guest's agent listens, and the token it takes.
#[derive(Clone)]
pub struct AgentAt {
    pub addr: SocketAddr,
    pub token: String,
}

impl std::fmt::Debug for AgentAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentAt")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[async_trait]
pub trait LoginAgent: std::fmt::Debug + Send + Sync {
    /// Start the provider's login command; a repeated start with the same
    /// login id answers the running login.
    async fn login_start(
        &self,
        at: &AgentAt,
        start: &LoginStart,
    ) -> Result<LoginStatus, AgentError>;
    async fn login_status(&self, at: &AgentAt, login_id: &str) -> Result<LoginStatus, AgentError>;
    /// The credential files the command wrote (secret).
    async fn login_credentials(&self, at: &AgentAt, login_id: &str) -> Result<FileSet, AgentError>;
    /// Type a code the user pasted.
    async fn login_input(
        &self,
        at: &AgentAt,
        login_id: &str,
        input: &LoginInput,
    ) -> Result<(), AgentError>;
    /// Write credential files into this (workspace) guest's home.
    async fn deliver_credentials(&self, at: &AgentAt, files: &FileSet) -> Result<(), AgentError>;
    async fn exec(&self, at: &AgentAt, req: &ExecRequest) -> Result<ExecResponse, AgentError>;
}

fn empty(what: &str) -> AgentError {
    AgentError::Status {
        status: 204,
        message: format!("no {what} in the answer"),
    }
}

#[async_trait]
impl LoginAgent for AgentClient {
    async fn login_start(
        &self,
        at: &AgentAt,
        start: &LoginStart,
    ) -> Result<LoginStatus, AgentError> {
        self.call(Method::POST, at.addr, &at.token, "/login", Some(start))
            .await?
            .ok_or_else(|| empty("login status"))
    }

    async fn login_status(&self, at: &AgentAt, login_id: &str) -> Result<LoginStatus, AgentError> {
        self.call::<(), _>(
            Method::GET,
            at.addr,
            &at.token,
            &format!("/login/{login_id}"),
            None,
        )
        .await?
        .ok_or_else(|| empty("login status"))
    }

    async fn login_credentials(&self, at: &AgentAt, login_id: &str) -> Result<FileSet, AgentError> {
        self.call::<(), _>(
            Method::GET,
            at.addr,
            &at.token,
            &format!("/login/{login_id}/credentials"),
            None,
        )
        .await?
        .ok_or_else(|| empty("credentials"))
    }

    async fn login_input(
        &self,
        at: &AgentAt,
        login_id: &str,
        input: &LoginInput,
    ) -> Result<(), AgentError> {
        self.call::<_, serde_json::Value>(
            Method::POST,
            at.addr,
            &at.token,
            &format!("/login/{login_id}/input"),
            Some(input),
        )
        .await
        .map(drop)
    }

    async fn deliver_credentials(&self, at: &AgentAt, files: &FileSet) -> Result<(), AgentError> {
        self.call::<_, serde_json::Value>(
            Method::POST,
            at.addr,
            &at.token,
            "/credentials/deliver",
            Some(files),
        )
        .await
        .map(drop)
    }

    async fn exec(&self, at: &AgentAt, req: &ExecRequest) -> Result<ExecResponse, AgentError> {
        AgentClient::exec(self, at.addr, &at.token, req).await
    }
}
