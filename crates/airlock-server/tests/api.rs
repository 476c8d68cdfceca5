//! Bad input and ownership at the HTTP boundary, against the real server: clear
//! errors, honest statuses, nothing half-made.

mod common;

use common::{unmet, viewer};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    if unmet().is_some() {
        return;
    }
    let h = common::start("10.232.10.0/24").await;
    let (status, body) = h
        .post("/api/v1/sandboxes", json!({"kind": "spaceship"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("browser"),
        "{body}"
    );

    let (status, body) = h
        .post(
            "/api/v1/sandboxes",
            json!({"kind": "browser", "size": "xl"}),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    let resp = h
        .http
        .post(h.url("/api/v1/sandboxes"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("req");
    assert_eq!(resp.status().as_u16(), 400);
    let resp = h
        .http
        .post(h.url("/api/v1/sandboxes"))
        .body("kind=browser")
        .send()
        .await
        .expect("req");
    assert_eq!(resp.status().as_u16(), 400);
    let big = json!({"argv": ["echo", "x".repeat(100_000)]});
    let (status, body) = h.post("/api/v1/sandboxes/whatever/exec", big).await;
    assert_eq!(status, 413, "{body}");

    let (status, body) = h.get("/api/v1/sandboxes/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = h.get("/api/v1/nothing-here").await;
    assert_eq!(status, 404);

    let (_, list) = h.get("/api/v1/sandboxes").await;
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "no sandbox was made: {list}"
    );
    let resp = h
        .http
        .get(h.url("/api/v1/sandboxes"))
        .bearer_auth("al_not_a_token")
        .send()
        .await
        .expect("req");
    assert_eq!(resp.status().as_u16(), 401);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_sandboxes_answer_404_and_not_ready_is_explained() {
    if unmet().is_some() {
        return;
    }
    let h = common::start("10.232.11.0/24").await;
    let app = h.running.as_ref().expect("running").app.clone();
    let (_, bob_token) = app.add_user("bob").await.expect("bob");

    let (status, body) = h
        .post("/api/v1/sandboxes", json!({"kind": "browser"}))
        .await;
    assert_eq!(status, 201);
    let id = body["id"].as_str().expect("id").to_owned();
    assert!(
        ["provisioning", "booting"].contains(&body["state"].as_str().unwrap_or("")),
        "{body}"
    );

    // Not ready yet: exec is a conflict, the viewer is closed with a reason.
    let (status, body) = h
        .post(
            &format!("/api/v1/sandboxes/{id}/exec"),
            json!({"argv": ["true"]}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (mut v, _) = viewer::connect(&h.base, &id, None).await.expect("upgrade");
    let (code, reason) = viewer::close_code(&mut v).await.expect("closed");
    assert_eq!(code, 4409, "{reason}");
    assert!(reason.contains("ready"), "{reason}");

    // Bob sees nothing of it.
    for (method, path) in [
        ("GET", format!("/api/v1/sandboxes/{id}")),
        ("DELETE", format!("/api/v1/sandboxes/{id}")),
    ] {
        let req = h
            .http
            .request(method.parse().expect("method"), h.url(&path))
            .bearer_auth(&bob_token);
        assert_eq!(
            req.send().await.expect("req").status().as_u16(),
            404,
            "{method} {path}"
        );
    }
    let foreign = viewer::connect(&h.base, &id, Some(&bob_token)).await;
    assert!(foreign.is_err(), "the upgrade is refused before it happens");
    let resp = h
        .http
        .get(h.url("/api/v1/sandboxes"))
        .bearer_auth(&bob_token)
        .send()
        .await
        .expect("req");
    let list: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(0));

    h.wait_state(&id, "ready", Duration::from_secs(120)).await;
    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_503_and_leaves_no_row() {
    if unmet().is_some() {
        return;
    }
    // A /30 holds exactly one sandbox.
    let h = common::start("10.232.12.0/30").await;
    let (status, first) = h
        .post("/api/v1/sandboxes", json!({"kind": "browser"}))
        .await;
    assert_eq!(status, 201);
    let (status, body) = h
        .post("/api/v1/sandboxes", json!({"kind": "browser"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_capacity");
    let (_, list) = h.get("/api/v1/sandboxes").await;
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(1));
    let id = first["id"].as_str().expect("id");
    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(id, "stopped", Duration::from_secs(120)).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_health_and_ui_are_served() {
    if unmet().is_some() {
        return;
    }
    let h = common::start("10.232.13.0/24").await;
    let (status, doc) = h.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/sandboxes",
        "/api/v1/sandboxes/{id}",
        "/api/v1/sandboxes/{id}/exec",
        "/api/v1/sandboxes/{id}/vnc",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let health = h.http.get(h.url("/healthz")).send().await.expect("req");
    assert_eq!(health.status().as_u16(), 200);
    let page = h.text("/").await;
    assert!(page.contains("airlock"), "the UI is served");
    let rfb = h
        .http
        .get(h.url("/novnc/core/rfb.js"))
        .send()
        .await
        .expect("req");
    assert_eq!(
        rfb.status().as_u16(),
        200,
        "noVNC is served from the pinned npm package"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_free_disk_is_507_and_leaves_no_row() {
    if unmet().is_some() {
        return;
    }
    // Ask for more free space than any disk has.
    let h = common::start_with("10.232.15.0/24", |cfg| cfg.min_free_disk_mb = 1 << 40).await;
    let (status, body) = h
        .post("/api/v1/sandboxes", json!({"kind": "browser"}))
        .await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("MiB free"),
        "{body}"
    );
    let (_, list) = h.get("/api/v1/sandboxes").await;
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(0));
    assert!(
        std::fs::read_dir(h.data_dir.join("sandboxes"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "nothing made on disk"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_host_memory_is_503_and_leaves_no_row() {
    if unmet().is_some() {
        return;
    }
    // Ask for more free memory than any host has.
    let h = common::start_with("10.232.14.0/24", |cfg| cfg.min_free_memory_mb = 1 << 30).await;
    let (status, body) = h
        .post("/api/v1/sandboxes", json!({"kind": "browser"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_capacity");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("memory"),
        "{body}"
    );
    let (_, list) = h.get("/api/v1/sandboxes").await;
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(0));
    h.shutdown().await;
}
