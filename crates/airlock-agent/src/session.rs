//! `PUT /session` and `GET /session`: the owner of a sandbox handed out from
//! a warm pool. The guest booted before anyone claimed it, so its metadata
//! document names no user; the control plane hands the session over the
//! authenticated API right after the claim. One owner, ever: a second,
//! different session is refused (409), a repeat of the same one is answered
//! as it was (the control plane may retry).

use crate::server::{error, AgentState};
use airlock_proto::agent::{Session, MAX_SESSION_FIELD};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::{Arc, Mutex};

/// The session this guest holds, once claimed.
#[derive(Debug, Default)]
pub struct Held(Mutex<Option<Session>>);

impl Held {
    pub fn get(&self) -> Option<Session> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub fn routes() -> Router<Arc<AgentState>> {
    Router::new().route("/session", get(show).put(hand))
}

async fn show(State(state): State<Arc<AgentState>>) -> Result<Json<Session>, Response> {
    state.session.get().map(Json).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "no session: this sandbox was not handed out from a pool",
        )
    })
}

/// What is wrong with a session for this sandbox, if anything.
fn check(session: &Session, sandbox_id: &str) -> Result<(), String> {
    if session.sandbox_id != sandbox_id {
        return Err("the session is for another sandbox".into());
    }
    for (name, value) in [
        ("user_id", &session.user_id),
        ("user_name", &session.user_name),
    ] {
        if value.is_empty() || value.len() > MAX_SESSION_FIELD {
            return Err(format!(
                "{name} must have 1 to {MAX_SESSION_FIELD} characters"
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(format!("{name} must not contain control characters"));
        }
    }
    Ok(())
}

async fn hand(
    State(state): State<Arc<AgentState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Session>, Response> {
    let body = body.map_err(|r| error(r.status(), r.body_text()))?;
    let session: Session = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid session: {e}")))?;
    check(&session, &state.sandbox_id).map_err(|m| error(StatusCode::BAD_REQUEST, m))?;
    let mut held = state.session.0.lock().unwrap_or_else(|p| p.into_inner());
    match &*held {
        Some(h) if h.user_id != session.user_id => Err(error(
            StatusCode::CONFLICT,
            "this sandbox already belongs to another user",
        )),
        Some(h) => Ok(Json(h.clone())),
        None => {
            tracing::info!(user = %session.user_name, "handed to its user");
            *held = Some(session.clone());
            Ok(Json(session))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str) -> Session {
        Session {
            sandbox_id: "sb-1".into(),
            user_id: user.into(),
            user_name: format!("name-{user}"),
            claimed_at_ms: 1,
        }
    }

    #[test]
    fn bad_sessions_name_their_field() {
        assert!(check(&session("u1"), "sb-1").is_ok());
        assert!(check(&session("u1"), "sb-2")
            .expect_err("other sandbox")
            .contains("another sandbox"));
        let mut s = session("u1");
        s.user_name = "a\nb".into();
        assert!(check(&s, "sb-1")
            .expect_err("control")
            .starts_with("user_name"));
        s = session("");
        assert!(check(&s, "sb-1").expect_err("empty").starts_with("user_id"));
        s = session(&"x".repeat(MAX_SESSION_FIELD + 1));
        assert!(check(&s, "sb-1").is_err());
    }
}
