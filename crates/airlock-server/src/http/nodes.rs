//! `/api/v1/nodes`: the cluster's node registry for admins, and draining
//! or resuming a node (the API's side of `airlock node ls|drain|resume`).

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::nodes::{self, NodeList, NodeState, NodeView};
use crate::app::App;
use crate::store::{now_ms, UserRow};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/nodes", get(list))
        .route("/nodes/{name}/drain", post(drain))
        .route("/nodes/{name}/resume", post(resume))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(list, drain, resume),
    components(schemas(NodeList, NodeView, NodeState))
)]
pub struct Doc;

fn admin(user: &UserRow) -> Result<(), ApiError> {
    if nodes::may_operate(user) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only an admin may see or drain nodes",
        ))
    }
}

/// The registered nodes; empty on a single host.
#[utoipa::path(get, path = "/api/v1/nodes",
    responses((status = 200, body = NodeList), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<NodeList>, ApiError> {
    admin(&user)?;
    Ok(Json(nodes::list(&app.store, now_ms()).await?))
}

/// Stop placing new sandboxes on a node; what runs there keeps running.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/drain",
    params(("name" = String, Path, description = "the node")),
    responses((status = 200, body = NodeView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn drain(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    admin(&user)?;
    Ok(Json(
        nodes::set_draining(&app.store, &name, true, now_ms()).await?,
    ))
}

/// Place new sandboxes on a drained node again.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/resume",
    params(("name" = String, Path, description = "the node")),
    responses((status = 200, body = NodeView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn resume(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    admin(&user)?;
    Ok(Json(
        nodes::set_draining(&app.store, &name, false, now_ms()).await?,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::app::lifecycle_tests::World;
    use crate::app::state::SandboxState;
    use crate::store::{now_ms, NodeRow, SandboxRow};
    use airlock_proto::metadata::SandboxKind;
    use serde_json::Value;

    fn node(name: &str, lease_expires_at: i64) -> NodeRow {
        NodeRow {
            name: name.into(),
            address: format!("127.0.0.1:{}", 7000 + name.len()),
            backend: "nspawn".into(),
            image_build_id: "build-1".into(),
            cpus: 4,
            memory_total: 16 << 30,
            memory_free: 12 << 30,
            disk_free: 100 << 30,
            running: 1,
            started_at: lease_expires_at - 60_000,
            heartbeat_at: lease_expires_at - 15_000,
            lease_expires_at,
            draining: false,
        }
    }

    /// A sandbox of the world's user, in `state`, placed on `node`.
    pub(crate) async fn placed_row(w: &World, id: &str, state: SandboxState, node: &str) {
        let now = now_ms();
        w.store
            .insert_sandbox(&SandboxRow {
                id: id.to_owned(),
                owner_id: w.user.id.clone(),
                kind: SandboxKind::Browser,
                state: SandboxState::Provisioning,
                failure_reason: None,
                image_build_id: "build-1".into(),
                lease_index: None,
                agent_token: "t".into(),
                vnc_password: "p".into(),
                display_width: 1280,
                display_height: 800,
                created_at: now,
                updated_at: now,
                ready_at: None,
                last_heartbeat_at: None,
                last_activity_at: now,
            })
            .await
            .expect("insert");
        // Placed while provisioning (as a replica does), then moved on.
        let on = w.store.place_sandbox(id, node).await.expect("place");
        assert_eq!(on.as_deref(), Some(node));
        use crate::app::state::{advance, Event};
        let fail = || Event::Fail {
            label: "test",
            reason: "test".into(),
        };
        let events = match state {
            SandboxState::Provisioning => vec![],
            SandboxState::Booting => vec![Event::Provisioned],
            SandboxState::Ready => vec![Event::Provisioned, Event::Ready],
            SandboxState::Pooled => vec![Event::Provisioned, Event::Pooled],
            SandboxState::Failed => vec![fail()],
            SandboxState::Stopping => vec![Event::StopRequested(None)],
            SandboxState::Stopped => vec![Event::StopRequested(None), Event::Released],
        };
        for e in &events {
            advance(&w.store, id, e).await.expect("advance");
        }
    }

    async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    /// The registry over the real HTTP stack and store: admins see it and
    /// drain and resume; a non-admin (the token-less local user, or a user
    /// with a token) gets 403 and changes nothing; an unknown node is 404;
    /// load is the store's count of live sandboxes per node.
    #[tokio::test]
    async fn admins_list_drain_and_resume_nodes_others_are_refused() {
        let w = World::new().await;
        let (base, server, http) = w.serve().await;
        let (_, root) = crate::app::auth::add_user(&w.store, "root", true)
            .await
            .expect("admin");
        let (_, mallory) = w.app.add_user("mallory").await.expect("user");
        let as_root = |r: reqwest::RequestBuilder| r.bearer_auth(&root);

        // A single host: nothing registered, an empty list.
        let (status, body) = send(as_root(http.get(format!("{base}/nodes")))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["nodes"], serde_json::json!([]));

        let now = now_ms();
        w.store
            .upsert_node(&node("alpha", now + 15_000))
            .await
            .expect("a");
        w.store
            .upsert_node(&node("beta", now - 1_000))
            .await
            .expect("b");
        // Two live sandboxes on alpha, one failed one (not load).
        for (id, state) in [
            ("s1", SandboxState::Ready),
            ("s2", SandboxState::Booting),
            ("s3", SandboxState::Failed),
        ] {
            placed_row(&w, id, state, "alpha").await;
        }

        let (status, body) = send(as_root(http.get(format!("{base}/nodes")))).await;
        assert_eq!(status, 200, "{body}");
        let list = body["nodes"].as_array().expect("nodes");
        assert_eq!(list.len(), 2, "{body}");
        assert_eq!(list[0]["name"], "alpha");
        assert_eq!(list[0]["state"], "up");
        assert_eq!(list[0]["load"], 2, "{body}");
        assert_eq!(list[0]["cpus"], 4);
        assert_eq!(list[0]["memory_free"], 12u64 << 30);
        assert!(list[0]["lease_left_ms"].as_i64().expect("left") > 0);
        assert_eq!(list[1]["name"], "beta");
        assert_eq!(list[1]["state"], "lost");
        assert_eq!(list[1]["load"], 0);
        assert!(list[1]["lease_left_ms"].as_i64().expect("left") < 0);

        // Non-admins: 403, no node name in the answer, nothing changed.
        for req in [
            http.get(format!("{base}/nodes")),
            http.post(format!("{base}/nodes/alpha/drain")),
            http.get(format!("{base}/nodes")).bearer_auth(&mallory),
            http.post(format!("{base}/nodes/alpha/drain"))
                .bearer_auth(&mallory),
            http.post(format!("{base}/nodes/alpha/resume"))
                .bearer_auth(&mallory),
            http.post(format!("{base}/nodes/nope/drain"))
                .bearer_auth(&mallory),
        ] {
            let (status, body) = send(req).await;
            assert_eq!(status, 403, "{body}");
            assert_eq!(body["error"]["code"], "forbidden");
            assert!(!body.to_string().contains("alpha"), "{body}");
        }
        assert!(!w.store.node("alpha").await.expect("q").expect("a").draining);

        // Drain, then resume.
        let (status, body) = send(as_root(http.post(format!("{base}/nodes/alpha/drain")))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "draining");
        assert_eq!(body["draining"], true);
        assert_eq!(body["load"], 2);
        assert!(w.store.node("alpha").await.expect("q").expect("a").draining);
        let (_, body) = send(as_root(http.get(format!("{base}/nodes")))).await;
        assert_eq!(body["nodes"][0]["state"], "draining");
        let (status, body) = send(as_root(http.post(format!("{base}/nodes/alpha/resume")))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "up");
        assert!(!w.store.node("alpha").await.expect("q").expect("a").draining);
        // A lost node stays lost when drained.
        let (_, body) = send(as_root(http.post(format!("{base}/nodes/beta/drain")))).await;
        assert_eq!(body["state"], "lost");
        assert_eq!(body["draining"], true);

        // Unknown nodes: 404 as JSON, nothing registered by it.
        for verb in ["drain", "resume"] {
            let (status, body) =
                send(as_root(http.post(format!("{base}/nodes/nope/{verb}")))).await;
            assert_eq!(status, 404, "{body}");
            assert_eq!(body["error"]["code"], "not_found");
        }
        assert!(w.store.node("nope").await.expect("q").is_none());
        server.abort();
    }

    /// A sandbox's answer names its node for its owner (get, list); an
    /// unplaced one says null; another user sees neither the sandbox nor
    /// its node.
    #[tokio::test]
    async fn a_sandbox_answer_names_its_node_for_its_owner_only() {
        let w = World::new().await;
        let (base, server, http) = w.serve().await;
        let (_, mallory) = w.app.add_user("mallory").await.expect("user");
        w.store
            .upsert_node(&node("gamma", now_ms() + 15_000))
            .await
            .expect("node");
        placed_row(&w, "placed", SandboxState::Ready, "gamma").await;
        let (status, body) = send(http.get(format!("{base}/sandboxes/placed"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["node"], "gamma");

        let (status, body) = send(
            http.post(format!("{base}/sandboxes"))
                .json(&serde_json::json!({"kind": "browser"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        assert!(body["node"].is_null(), "single host: {body}");
        let local = body["id"].as_str().expect("id").to_owned();

        let (_, body) = send(http.get(format!("{base}/sandboxes"))).await;
        let list = body["sandboxes"].as_array().expect("list");
        let node_of = |id: &str| {
            list.iter()
                .find(|s| s["id"] == id)
                .map(|s| s["node"].clone())
                .expect("listed")
        };
        assert_eq!(node_of("placed"), "gamma");
        assert!(node_of(&local).is_null());

        let (status, body) = send(
            http.get(format!("{base}/sandboxes/placed"))
                .bearer_auth(&mallory),
        )
        .await;
        assert_eq!(status, 404, "{body}");
        let (_, body) = send(http.get(format!("{base}/sandboxes")).bearer_auth(&mallory)).await;
        assert_eq!(body["sandboxes"], serde_json::json!([]), "{body}");
        assert!(!body.to_string().contains("gamma"));
        server.abort();
    }

    #[test]
    fn nodes_are_in_the_openapi_document() {
        let doc = serde_json::to_value(super::super::openapi()).expect("json");
        assert!(doc["paths"]["/api/v1/nodes"]["get"].is_object());
        assert!(doc["paths"]["/api/v1/nodes/{name}/drain"]["post"].is_object());
        assert!(doc["paths"]["/api/v1/nodes/{name}/resume"]["post"].is_object());
        let schemas = &doc["components"]["schemas"];
        for field in ["state", "lease_expires_at", "load", "memory_free", "cpus"] {
            assert!(
                schemas["NodeView"]["properties"][field].is_object(),
                "NodeView.{field}"
            );
        }
        assert!(schemas["Sandbox"]["properties"]["node"].is_object());
    }
}
