//! The recordings API over the real app and the fakes: off by default, the
//! login rule, ownership, and a recorder whose guest link fails ends by itself.

use crate::app::lifecycle_tests::World;
use crate::app::logins::state::LoginState;
use crate::app::state::SandboxState;
use crate::store::LoginRow;
use airlock_proto::metadata::SandboxKind;
use serde_json::Value;
use std::time::{Duration, Instant};

async fn ready(w: &World, kind: SandboxKind) -> String {
    let id = w
        .app
        .create_sandbox(&w.user, kind)
        .await
        .expect("create")
        .id;
    w.settle(&id, SandboxState::Ready).await;
    id
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn recording_is_refused_when_off() {
    let w = World::new().await;
    let (base, _server, http) = w.serve().await;
    let id = ready(&w, SandboxKind::Browser).await;
    let (status, body) = send(http.post(format!("{base}/sandboxes/{id}/recordings"))).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("enabled"),
        "{body}"
    );
    let (status, body) = send(http.get(format!("{base}/sandboxes/{id}/recordings"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enabled"], false);
    assert_eq!(w.app.streams.viewers(&id), None, "nothing joined the hub");
}

#[tokio::test]
async fn logins_ownership_and_a_recorder_whose_guest_is_gone() {
    let w = World::with(|cfg| cfg.recording.enabled = true).await;
    let (base, _server, http) = w.serve().await;
    let id = ready(&w, SandboxKind::Browser).await;

    // Someone else's sandbox, or none, is 404 for every call.
    let (_, token) = w.app.add_user("mallory").await.expect("user");
    for (method, path) in [
        (
            reqwest::Method::POST,
            format!("{base}/sandboxes/{id}/recordings"),
        ),
        (
            reqwest::Method::GET,
            format!("{base}/sandboxes/{id}/recordings"),
        ),
        (
            reqwest::Method::GET,
            format!("{base}/sandboxes/{id}/recordings/rec-1"),
        ),
        (
            reqwest::Method::DELETE,
            format!("{base}/sandboxes/{id}/recordings/current"),
        ),
    ] {
        let (status, body) = send(http.request(method.clone(), &path).bearer_auth(&token)).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let (status, _) = send(http.get(format!("{base}/sandboxes/nope/recordings/rec-1"))).await;
    assert_eq!(status, 404);
    let (status, _) = send(http.get(format!("{base}/sandboxes/{id}/recordings/..%2Fx"))).await;
    assert_eq!(status, 404);

    // A login's browser sandbox is not recorded.
    let login = ready(&w, SandboxKind::Browser).await;
    let now = crate::store::now_ms();
    w.store
        .insert_login(&LoginRow {
            id: "login-1".into(),
            owner_id: w.user.id.clone(),
            provider: "claude".into(),
            state: LoginState::AwaitingUser,
            reason: None,
            login_url: None,
            awaiting_code: false,
            browser_sandbox_id: Some(login.clone()),
            workspace_sandbox_id: None,
            created_at: now,
            updated_at: now,
            expires_at: now + 60_000,
            finished_at: None,
        })
        .await
        .expect("login");
    let (status, body) = send(http.post(format!("{base}/sandboxes/{login}/recordings"))).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("login"),
        "{body}"
    );

    // The fake guest has no encoder: the recording starts, then ends by
    // itself with the reason, and nothing is left under way.
    let (status, body) = send(http.post(format!("{base}/sandboxes/{id}/recordings"))).await;
    assert_eq!(status, 201, "{body}");
    let rid = body["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let (_, list) = send(http.get(format!("{base}/sandboxes/{id}/recordings"))).await;
        if list["current"].is_null() || Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(list["current"].is_null(), "{list}");
    assert_eq!(list["recordings"][0]["id"], rid.as_str(), "{list}");
    let ended = list["recordings"][0]["ended"].as_str().unwrap_or("");
    assert!(ended.contains("video link"), "{list}");
    let (status, body) =
        send(http.delete(format!("{base}/sandboxes/{id}/recordings/current"))).await;
    assert_eq!(status, 409, "{body}");
}
