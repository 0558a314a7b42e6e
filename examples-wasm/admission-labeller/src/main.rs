//! `admission-labeller`: a mutating admission webhook as a wasi:http/proxy component.
//! It reads an `admission.k8s.io/v1` AdmissionReview and allows the object, with a
//! JSONPatch that sets the label `LABEL_KEY=LABEL_VALUE` (from its environment;
//! `mutated-by=admission-labeller` without them). An object whose `metadata.labels` says
//! `reject: "true"` is refused instead, with a message, so that a test can see a denial.
//! The node terminates TLS for it (the pod's `baton.dev/tls-volume`).
use base64::Engine;
use serde_json::{json, Value};
use wstd::http::body::Body;
use wstd::http::{Error, Request, Response, StatusCode};

/// The largest review read; the API server sends far less.
const MAX_REVIEW: usize = 3 << 20;

#[wstd::http_server]
async fn main(req: Request<Body>) -> Result<Response<Body>, Error> {
    let mut body = req.into_body();
    // The API server says how long its review is; anything else is not read.
    if body.content_length().is_none_or(|n| n > MAX_REVIEW as u64) {
        return answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": "a review needs a content-length of at most 3 MiB"}),
        );
    }
    let bytes = body.contents().await?;
    let Ok(review) = serde_json::from_slice::<Value>(bytes) else {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "not an AdmissionReview"}),
        );
    };
    let request = &review["request"];
    let uid = request["uid"].clone();
    let labels = &request["object"]["metadata"]["labels"];
    let response = if labels["reject"] == "true" {
        json!({"uid": uid, "allowed": false,
               "status": {"code": 403, "message": "the object asked to be rejected"}})
    } else {
        let key = std::env::var("LABEL_KEY").unwrap_or_else(|_| "mutated-by".into());
        let value = std::env::var("LABEL_VALUE").unwrap_or_else(|_| "admission-labeller".into());
        let patch = if labels.is_object() {
            // `/` in a label key is `~1` in a JSON pointer.
            let escaped = key.replace('~', "~0").replace('/', "~1");
            json!([{"op": "add", "path": format!("/metadata/labels/{escaped}"), "value": value}])
        } else {
            json!([{"op": "add", "path": "/metadata/labels", "value": {key: value}}])
        };
        let patch = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
        json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch})
    };
    answer(
        StatusCode::OK,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

fn answer(status: StatusCode, v: Value) -> Result<Response<Body>, Error> {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))?)
}
