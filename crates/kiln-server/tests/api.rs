//! The API document and request bodies, in-process.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn app() -> (tempfile::TempDir, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let store = kiln::open_store(dir.path(), None).unwrap();
    (dir, kiln_server::Server::new(store).router())
}

async fn call(app: &axum::Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

fn post(path: &str, content_type: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", content_type)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let (_dir, app) = app();
    let (status, doc) = call(&app, Request::get("/api/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/api/health",
        "/api/v1/writes",
        "/api/v1/flow_runs",
        "/api/v1/flow_runs/{id}",
        "/api/v1/runs/{id}/states",
        "/api/v1/runs/{id}/result",
        "/api/v1/runs/{id}/result/content",
        "/api/v1/runs/{id}/result/thumbnail",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not in the document");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    // Ids are constrained to what the server parses.
    let id = &doc["components"]["schemas"]["FlowRun"]["properties"]["id"];
    assert_eq!(id["format"], "uuid");
    assert!(id["pattern"].as_str().unwrap().starts_with("^[0-9a-fA-F]{8}-"));
    // Health is open; everything else needs the bearer token by default.
    assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
    assert_eq!(doc["paths"]["/api/health"]["get"]["security"], serde_json::json!([{}]));
}

#[tokio::test]
async fn bodies_are_json_of_the_documented_shape() {
    let (_dir, app) = app();
    let (status, p) = call(&app, post("/api/v1/writes", "text/plain", "{\"writes\": []}")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("Content-Type: application/json"));
    let (status, p) = call(&app, post("/api/v1/writes", "application/json", "{\"writes\": [")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
    // JSON Schema counts 1.0 an integer, so the API takes it where an integer goes...
    let crash = r#"{"dead": [], "stale_before": 1000.0}"#;
    let (status, p) = call(&app, post("/api/v1/processes/crash_orphans", "application/json", crash)).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    // ...but not 1.5, nor a number beyond what a float holds exactly.
    for bad in ["1000.5", "-9223372036854775809"] {
        let body = format!(r#"{{"dead": [], "stale_before": {bad}}}"#);
        let (status, p) = call(&app, post("/api/v1/processes/crash_orphans", "application/json", &body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {p}");
        assert!(p["detail"].as_str().unwrap().contains("crash request"), "{p}");
    }
}

#[tokio::test]
async fn a_malformed_write_fails_alone() {
    let (_dir, app) = app();
    let good = uuid::Uuid::now_v7();
    let run = |id: uuid::Uuid, command: &str| {
        serde_json::json!({
            "write": "flow_run", "id": id, "name": "f", "parent_id": null, "parameters": {}, "tags": [],
            "created": 1, "initial_state": "Pending", "command": command, "retry_of": null, "process_id": null
        })
    };
    let batch = serde_json::json!({ "writes": [run(uuid::Uuid::now_v7(), "1e999"), run(good, "{\"argv\": []}")] });
    let (status, answer) = call(&app, post("/api/v1/writes", "application/json", &batch.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcomes"][0]["outcome"], "failed", "{answer}");
    assert!(
        answer["outcomes"][0]["message"]
            .as_str()
            .unwrap()
            .contains("command is not JSON text")
    );
    assert_eq!(answer["outcomes"][1]["outcome"], "applied", "{answer}");
    let (status, page) = call(&app, Request::get("/api/v1/flow_runs").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["runs"].as_array().unwrap().len(), 1);
    assert_eq!(page["runs"][0]["id"], good.to_string());
    // A filter no run can match (a NUL character) is an empty page, not an error.
    let (status, page) = call(
        &app,
        Request::get("/api/v1/flow_runs?flow=a%00b")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, page["runs"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0))
    );
}

use kiln::prelude::*;

#[task]
fn base() -> u32 {
    20
}

#[task]
fn plus_one(x: u32) -> u32 {
    x + 1
}

#[flow]
async fn inner() -> Result<u32, kiln::Error> {
    Ok(1)
}

#[flow]
async fn outer() -> Result<u32, kiln::Error> {
    let x = base().await?;
    Ok(plus_one(x).await? + inner().await?)
}

#[test]
fn a_flow_run_in_one_call_and_state_changes_through_the_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let engine = kiln::Engine::open(dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(engine.scope(outer())).unwrap(), 22);
    let app = kiln_server::Server::new(engine.store().clone()).router();
    let flows = rt.block_on(engine.store().flow_runs(10)).unwrap();
    let top = flows.iter().find(|f| f.name == "outer").unwrap();
    rt.block_on(async {
        let (status, detail) = call(
            &app,
            Request::get(format!("/api/v1/flow_runs/{}/detail", top.id))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{detail}");
        assert_eq!(detail["run"]["state"], "Completed");
        let states: Vec<&str> = detail["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["Pending", "Running", "Completed"]);
        assert_eq!(detail["task_runs"].as_array().unwrap().len(), 2);
        assert!(detail["edges"].is_array());
        assert_eq!(detail["subflows"][0]["name"], "inner");

        // A finished task run cannot run again.
        let task = detail["task_runs"][0]["id"].as_str().unwrap().to_owned();
        let body = r#"{"from": "Completed", "to": "Running"}"#;
        let (status, p) = call(
            &app,
            post(&format!("/api/v1/runs/{task}/state"), "application/json", body),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("do not allow Completed -> Running"),
            "{p}"
        );

        // A pending run recorded through the API, then started: once, even when asked twice.
        let id = uuid::Uuid::now_v7();
        let run = serde_json::json!({ "writes": [{
            "write": "flow_run", "id": id, "name": "remote", "parent_id": null, "parameters": {}, "tags": [],
            "created": 1, "initial_state": "Pending", "command": null, "retry_of": null, "process_id": null
        }]});
        let (status, _) = call(&app, post("/api/v1/writes", "application/json", &run.to_string())).await;
        assert_eq!(status, StatusCode::OK);
        let change =
            serde_json::json!({ "from": "Pending", "to": "Running", "message": "by hand", "id": uuid::Uuid::now_v7() });
        for _ in 0..2 {
            let (status, set) = call(
                &app,
                post(
                    &format!("/api/v1/runs/{id}/state"),
                    "application/json",
                    &change.to_string(),
                ),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{set}");
            assert_eq!(
                (set["kind"].as_str(), set["state"].as_str(), set["seq"].as_u64()),
                (Some("flow"), Some("Running"), Some(1))
            );
        }
        let other = r#"{"from": "Pending", "to": "Running"}"#;
        let (status, p) = call(
            &app,
            post(&format!("/api/v1/runs/{id}/state"), "application/json", other),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(p["detail"].as_str().unwrap().contains("is Running, not Pending"), "{p}");
        let (status, _) = call(
            &app,
            post(
                &format!("/api/v1/runs/{}/state", uuid::Uuid::now_v7()),
                "application/json",
                other,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // What happened, as Prometheus scrapes it.
        let response = app
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        for line in [
            r#"kiln_http_requests_total{method="POST",route="/api/v1/runs/{id}/state",status="200"} 2"#,
            r#"kiln_http_requests_total{method="POST",route="/api/v1/runs/{id}/state",status="409"} 2"#,
            r#"kiln_http_requests_total{method="GET",route="/api/v1/flow_runs/{id}/detail",status="200"} 1"#,
            r#"kiln_runs{kind="flow",state="Completed"} 2"#,
            r#"kiln_runs{kind="flow",state="Running"} 1"#,
            r#"kiln_runs{kind="task",state="Completed"} 2"#,
            "kiln_store_pending_writes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        assert!(text.contains("kiln_http_request_duration_seconds_bucket{le="), "{text}");
    });
}

#[tokio::test]
async fn deployment_runs_are_checked_created_and_cancelled() {
    let (_dir, app) = app();
    let deployment = serde_json::json!({
        "name": "nightly", "flow": "report", "pool": "cpu", "parameters": { "day": 1 },
        "parameter_schema": {
            "type": "object", "additionalProperties": false, "required": ["day", "region"],
            "properties": { "day": { "type": "integer", "minimum": 0 }, "region": { "type": "string" } }
        },
        "tags": ["t"], "max_attempts": 2, "updated": 1
    });
    let mut write = deployment.as_object().unwrap().clone();
    write.insert("write".into(), "put_deployment".into());
    let body = serde_json::json!({ "writes": [write] }).to_string();
    let (status, outcomes) = call(&app, post("/api/v1/writes", "application/json", &body)).await;
    assert_eq!(status, StatusCode::OK, "{outcomes}");
    assert_eq!(outcomes["outcomes"][0]["outcome"], "applied", "{outcomes}");
    let (status, listed) = call(&app, Request::get("/api/v1/deployments").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed[0]["name"], "nightly");

    let run = |body: &str| post("/api/v1/deployments/nightly/runs", "application/json", body);
    let (status, p) = call(&app, run(r#"{"parameters": {"region": 3}}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("parameter 'region'"), "{p}");
    let (status, p) = call(&app, run(r#"{"parameters": {}}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("parameter 'region' of flow 'report' is missing"),
        "{p}"
    );
    let (status, p) = call(&app, post("/api/v1/deployments/nope/runs", "application/json", "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{p}");
    let (status, created) = call(&app, run(r#"{"parameters": {"region": "eu"}, "tags": ["manual"]}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["state"], "Scheduled");
    let id = created["id"].as_str().unwrap().to_owned();
    let (_, flow) = call(
        &app,
        Request::get(format!("/api/v1/flow_runs/{id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(flow["parameters"], serde_json::json!({ "day": 1, "region": "eu" }));
    assert_eq!(flow["tags"], serde_json::json!(["t", "manual", "deployment:nightly"]));
    let (_, queue) = call(
        &app,
        Request::get("/api/v1/work/queue?pool=cpu").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(queue[0]["run_id"], id.as_str());

    // Not claimed yet: cancelled at once, and never handed out.
    let (status, cancelled) = call(&app, post(&format!("/api/v1/runs/{id}/cancel"), "application/json", "")).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "Cancelled");
}
