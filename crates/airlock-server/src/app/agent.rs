//! The control plane's client for a guest's `airlock-agent`.

use airlock_proto::agent::{ExecRequest, ExecResponse, Health};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the sandbox's agent is unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("the sandbox's agent answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the sandbox's agent sent an answer that could not be read")]
    Decode(#[source] reqwest::Error),
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
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

async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, AgentError> {
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
