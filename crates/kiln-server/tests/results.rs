//! A run's result through the API: metadata, the content streamed bit-exact and verified,
//! PNG and JSON forms, thumbnails, and every way it can go wrong.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use image::RgbImage;
use kiln::prelude::*;
use kiln::result::{ResultStorage, StorageConfig, StorageKey};
use kiln::settings::Settings;
use tower::ServiceExt;

/// Every pixel differs, so a wrong byte anywhere shows.
fn picture() -> RgbImage {
    RgbImage::from_fn(512, 384, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]))
}

#[task(persist, storage = "pictures", serializer = Png::default())]
async fn draw() -> anyhow::Result<RgbImage> {
    Ok(picture())
}

#[task(persist, storage = "pictures", serializer = RawPixels)]
async fn draw_raw() -> anyhow::Result<RgbImage> {
    Ok(picture())
}

#[task(persist, storage = "pictures")]
fn measure(width: u32) -> Vec<u32> {
    vec![width, width * 2]
}

#[task]
fn unpersisted() -> u32 {
    1
}

#[flow]
async fn pictures() -> anyhow::Result<u32> {
    let img = draw().await?;
    draw_raw().await?;
    unpersisted().await?;
    Ok(measure(img.width()).await?[1])
}

struct Fixture {
    _home: tempfile::TempDir,
    app: axum::Router,
    storage: ResultStorage,
    /// Task run ids by task name, and the flow run's id.
    runs: std::collections::HashMap<String, String>,
    flow: String,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Fixture {
        let home = tempfile::tempdir().unwrap();
        let engine = kiln::Engine::open(home.path()).unwrap();
        engine
            .ensure_storage("pictures", StorageConfig::Local { path: None })
            .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert_eq!(rt.block_on(engine.scope(pictures())).unwrap(), 1024);
        let store = engine.store().clone();
        let flow = rt.block_on(store.flow_runs(1)).unwrap().pop().unwrap();
        let runs = rt
            .block_on(store.task_runs(flow.id))
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.id.to_string()))
            .collect();
        let settings = Settings::load(home.path()).unwrap();
        let storage = ResultStorage::build("pictures", &settings.storage("pictures").unwrap(), home.path()).unwrap();
        let app = kiln_server::Server::new(store).with_results(settings).router();
        Fixture {
            _home: home,
            app,
            storage,
            runs,
            flow: flow.id.to_string(),
            rt,
        }
    }

    fn run(&self, task: &str) -> &str {
        &self.runs[task]
    }

    /// GET `path`: the status, the content type and the whole body (or the body's error).
    fn get(&self, path: &str) -> (StatusCode, String, Result<Vec<u8>, String>) {
        self.rt.block_on(async {
            let request = Request::get(path).body(Body::empty()).unwrap();
            let response = self.app.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let media = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .map_err(|e| e.to_string());
            (status, media, body)
        })
    }

    fn json(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let (status, _, body) = self.get(path);
        (status, serde_json::from_slice(&body.unwrap()).unwrap())
    }

    fn key(&self, task: &str) -> StorageKey {
        let (_, info) = self.json(&format!("/api/v1/runs/{}/result", self.run(task)));
        StorageKey::new(info["key"].as_str().unwrap().to_owned()).unwrap()
    }
}

#[test]
fn a_png_result_downloads_bit_exact_with_its_metadata() {
    let f = Fixture::new();
    let run = f.run("draw");
    let (status, info) = f.json(&format!("/api/v1/runs/{run}/result"));
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["serializer"], "png");
    assert_eq!(info["media_type"], "image/png");
    assert_eq!(info["storage"], "pictures");
    assert_eq!(info["header"]["hash"], info["hash"]);
    assert_eq!(info["header"]["run_id"].as_str(), Some(run));
    assert!(info["header_error"].is_null());
    assert_eq!(
        info["links"]["png"],
        format!("/api/v1/runs/{run}/result/content?as=png")
    );
    assert!(info["links"]["json"].is_null());

    // The payload exactly as the storage holds it, and as the program encoded it.
    let (_, stored) = f.rt.block_on(f.storage.get_record(&f.key("draw"))).unwrap();
    for path in [
        format!("/api/v1/runs/{run}/result/content"),
        format!("/api/v1/runs/{run}/result/content?as=png"),
    ] {
        let (status, media, body) = f.get(&path);
        assert_eq!((status, media.as_str()), (StatusCode::OK, "image/png"), "{path}");
        let body = body.unwrap();
        assert_eq!(body, stored, "{path}: bit-exact");
        assert_eq!(image::load_from_memory(&body).unwrap().into_rgb8(), picture());
    }
    assert_eq!(info["size"], stored.len());

    let (status, media, body) = f.get(&format!("/api/v1/runs/{run}/result/thumbnail?size=64"));
    assert_eq!((status, media.as_str()), (StatusCode::OK, "image/png"));
    let thumb = image::load_from_memory(&body.unwrap()).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (64, 48), "aspect ratio kept");
}

#[test]
fn other_image_formats_and_serde_values_come_as_png_and_json() {
    let f = Fixture::new();
    let raw = f.run("draw_raw");
    let (status, media, body) = f.get(&format!("/api/v1/runs/{raw}/result/content?as=png"));
    assert_eq!((status, media.as_str()), (StatusCode::OK, "image/png"));
    assert_eq!(image::load_from_memory(&body.unwrap()).unwrap().into_rgb8(), picture());
    let (_, media, _) = f.get(&format!("/api/v1/runs/{raw}/result/content"));
    assert_eq!(media, "application/octet-stream", "raw pixels are no file format");

    let stats = f.run("measure");
    let (status, info) = f.json(&format!("/api/v1/runs/{stats}/result"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["serializer"], "msgpack");
    assert!(info["links"]["png"].is_null() && info["links"]["thumbnail"].is_null());
    let (status, media, body) = f.get(&format!("/api/v1/runs/{stats}/result/content?as=json"));
    assert_eq!((status, media.as_str()), (StatusCode::OK, "application/json"));
    let value: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(value, serde_json::json!([512, 1024]));
}

#[test]
fn bad_requests_are_4xx_problems_that_name_the_cause() {
    let f = Fixture::new();
    let stats = f.run("measure");
    let image = f.run("draw");
    let cases = [
        (
            "/api/v1/runs/not-an-id/result".to_owned(),
            StatusCode::NOT_FOUND,
            "is not a run id",
        ),
        (
            format!("/api/v1/runs/{}/result", uuid::Uuid::now_v7()),
            StatusCode::NOT_FOUND,
            "no flow run or task run",
        ),
        (
            format!("/api/v1/runs/{}/result", f.run("unpersisted")),
            StatusCode::NOT_FOUND,
            "has no persisted result",
        ),
        (
            format!("/api/v1/runs/{}/result", f.flow),
            StatusCode::NOT_FOUND,
            "has no persisted result",
        ),
        (
            format!("/api/v1/runs/{stats}/result/content?as=png"),
            StatusCode::BAD_REQUEST,
            "cannot be shown as png",
        ),
        (
            format!("/api/v1/runs/{image}/result/content?as=json"),
            StatusCode::BAD_REQUEST,
            "cannot be shown as json",
        ),
        (
            format!("/api/v1/runs/{image}/result/content?as=gif"),
            StatusCode::BAD_REQUEST,
            "unknown form as=gif",
        ),
        (
            format!("/api/v1/runs/{stats}/result/thumbnail"),
            StatusCode::BAD_REQUEST,
            "is not an image",
        ),
        (
            format!("/api/v1/runs/{image}/result/thumbnail?size=5"),
            StatusCode::BAD_REQUEST,
            "out of range",
        ),
        (
            format!("/api/v1/runs/{image}/result/thumbnail?size=big"),
            StatusCode::BAD_REQUEST,
            "size",
        ),
    ];
    for (path, status, words) in cases {
        let (got, media, body) = f.get(&path);
        let body = String::from_utf8(body.unwrap()).unwrap();
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(media, "application/problem+json", "{path}");
        assert!(body.contains(words), "{path}: {body}");
    }
}

#[test]
fn a_damaged_or_replaced_record_is_never_served_whole() {
    let f = Fixture::new();
    let run = f.run("draw");
    let key = f.key("draw");
    let original = f.rt.block_on(f.storage.get_bytes(&key)).unwrap();

    // One payload byte flipped: the stream ends in an error instead of its last chunk, and
    // conversions refuse with 409.
    let mut damaged = original.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    f.rt.block_on(f.storage.put_bytes(&key, damaged.into())).unwrap();
    let (status, _, body) = f.get(&format!("/api/v1/runs/{run}/result/content"));
    assert_eq!(
        status,
        StatusCode::OK,
        "the header was sound; the stream fails at the end"
    );
    let err = body.unwrap_err();
    assert!(err.contains("hash mismatch"), "{err}");
    let (status, _, body) = f.get(&format!("/api/v1/runs/{run}/result/thumbnail"));
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(String::from_utf8(body.unwrap()).unwrap().contains("hash mismatch"));

    // Cut short: the stream says so.
    f.rt.block_on(f.storage.put_bytes(&key, original.slice(..original.len() - 100)))
        .unwrap();
    let (_, _, body) = f.get(&format!("/api/v1/runs/{run}/result/content"));
    assert!(body.unwrap_err().contains("truncated"));

    // Another valid record at the same key: not the run's value.
    let other = f.key("draw_raw");
    let replacement = f.rt.block_on(f.storage.get_bytes(&other)).unwrap();
    f.rt.block_on(f.storage.put_bytes(&key, replacement)).unwrap();
    let (status, _, body) = f.get(&format!("/api/v1/runs/{run}/result/content"));
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(String::from_utf8(body.unwrap()).unwrap().contains("was replaced"));

    // Gone: 404 naming the storage and key; the metadata still answers, saying why.
    f.rt.block_on(f.storage.delete(&key)).unwrap();
    let (status, _, _) = f.get(&format!("/api/v1/runs/{run}/result/content"));
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, info) = f.json(&format!("/api/v1/runs/{run}/result"));
    assert_eq!(status, StatusCode::OK);
    assert!(info["header"].is_null());
    assert!(info["header_error"].as_str().unwrap().contains(key.as_str()), "{info}");
}

/// A result reference whose key would leave its storage (written by a buggy or hostile
/// client) is refused: nothing outside the storage root is ever read.
#[test]
fn a_result_key_that_leaves_its_storage_is_refused() {
    let f = Fixture::new();
    let id = uuid::Uuid::now_v7();
    let reference = serde_json::json!({
        "storage": "pictures", "key": "../../kiln.db", "serializer": "png", "size": 10, "hash": "blake3:00"
    });
    let writes = serde_json::json!({ "writes": [
        { "write": "task_run", "id": id, "flow_run_id": null, "name": "sneaky", "task_key": "x", "inputs": {},
          "tags": [], "created": 1, "initial_state": "Pending", "call_key": null, "process_id": null },
        { "write": "state", "kind": "task", "run_id": id, "from": "Pending", "to": "Running", "message": null,
          "attempt": 1, "timestamp": 2, "result": null },
        { "write": "state", "kind": "task", "run_id": id, "from": "Running", "to": "Completed", "message": null,
          "attempt": 1, "timestamp": 3, "result": reference.to_string() },
    ]});
    let request = Request::post("/api/v1/writes")
        .header("content-type", "application/json")
        .body(Body::from(writes.to_string()))
        .unwrap();
    let response = f.rt.block_on(f.app.clone().oneshot(request)).unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for path in ["content", "content?as=png", "thumbnail"] {
        let (status, media, body) = f.get(&format!("/api/v1/runs/{id}/result/{path}"));
        let body = String::from_utf8(body.unwrap()).unwrap();
        assert_eq!(
            (status, media.as_str()),
            (StatusCode::CONFLICT, "application/problem+json"),
            "{path}: {body}"
        );
        assert!(body.contains("not a valid storage key"), "{path}: {body}");
    }
}
