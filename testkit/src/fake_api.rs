//! An in-memory stand-in for the API server, for unit tests of API clients.
//!
//! A controller or a node agent changes the world through a [`kube::Client`]. Its unit
//! tests give it a client whose requests never leave the process: [`FakeApi`] records
//! each request and answers it as kube-apiserver would (a created object back, a Status
//! for a delete, an empty list), or with an error the test asked for. The test then
//! checks the writes that were made.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use kube::Client;
use serde_json::{json, Value};

/// One request the reconciler sent.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// (method, path suffix, status code): requests that fail.
    failures: Vec<(String, String, u16)>,
    /// (path, items): what a list of that path returns.
    lists: Vec<(String, Vec<Value>)>,
    /// (path, object): what a read of that path returns.
    objects: Vec<(String, Value)>,
}

/// The fake API server; clones share what it recorded.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    pub fn client(&self) -> Client {
        let state = self.state.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let state = state.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await?.to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let call = Call {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body,
                };
                let (code, answer) = answer(&mut state.lock().unwrap(), call);
                let resp = http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        answer.to_string(),
                    )))
                    .unwrap();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(resp)
            }
        });
        Client::new(svc, "default")
    }

    /// Every request so far, events included.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The writes so far as "METHOD path", leaving out events, which tests look at
    /// through [`FakeApi::events`].
    pub fn writes(&self) -> Vec<String> {
        self.write_calls()
            .into_iter()
            .map(|c| format!("{} {}", c.method, c.path))
            .collect()
    }

    /// The writes so far with their bodies, leaving out reads (lists, discovery) and
    /// events.
    pub fn write_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method != "GET" && !c.path.contains("/events"))
            .collect()
    }

    /// The events created so far, as "type reason" (a repeat of one is a PATCH of its
    /// count, not listed here).
    pub fn events(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path.contains("/events"))
            .map(|c| {
                format!(
                    "{} {}",
                    c.body["type"].as_str().unwrap_or(""),
                    c.body["reason"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// Makes requests of `method` to a path ending in `suffix` fail with `code`.
    pub fn fail(&self, method: &str, suffix: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((method.into(), suffix.into(), code));
    }

    /// Makes every request succeed again (undoes [`FakeApi::fail`]).
    pub fn heal(&self) {
        self.state.lock().unwrap().failures.clear();
    }

    /// What a list of `path` returns.
    pub fn list(&self, path: &str, items: Vec<Value>) {
        self.state.lock().unwrap().lists.push((path.into(), items));
    }

    /// What a read of `path` (one object's) returns.
    pub fn object(&self, path: &str, object: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .push((path.into(), object));
    }

    pub fn clear(&self) {
        self.state.lock().unwrap().calls.clear();
    }
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi").finish_non_exhaustive()
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": if code < 300 { "Success" } else { "Failure" },
           "reason": reason, "message": message, "code": code})
}

fn answer(state: &mut State, call: Call) -> (u16, Value) {
    state.calls.push(call.clone());
    if let Some((_, _, code)) = state
        .failures
        .iter()
        .find(|(m, s, _)| *m == call.method && call.path.ends_with(s.as_str()))
    {
        // The reason clients branch on (kube's `get_opt` reads NotFound from it).
        let reason = match code {
            404 => "NotFound",
            409 => "Conflict",
            403 => "Forbidden",
            _ => "InternalError",
        };
        return (*code, status(*code, reason, "injected by the test"));
    }
    let name = call.path.rsplit('/').next().unwrap_or_default().to_string();
    match call.method.as_str() {
        "GET" if state.objects.iter().any(|(p, _)| *p == call.path) => {
            let found = state.objects.iter().rev().find(|(p, _)| *p == call.path);
            (200, found.map(|(_, o)| o.clone()).unwrap_or_default())
        }
        "GET" => match state.lists.iter().find(|(p, _)| *p == call.path) {
            Some((_, items)) => (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
            ),
            // Nothing was put there: an empty list.
            None => (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
            ),
        },
        "DELETE" => (200, status(200, "", "")),
        "POST" => {
            let mut obj = call.body;
            obj["metadata"]["uid"] = json!(format!("uid-{}", state.calls.len()));
            obj["metadata"]["resourceVersion"] = json!("1");
            (201, obj)
        }
        // PATCH and PUT: the object as written, under the name in the path (a status
        // subresource's path ends in "status").
        _ => {
            let mut obj = call.body;
            if obj["metadata"]["name"].is_null() {
                let segs: Vec<&str> = call.path.split('/').collect();
                let n = if name == "status" || name == "finalize" {
                    segs[segs.len() - 2]
                } else {
                    name.as_str()
                };
                obj["metadata"]["name"] = json!(n);
            }
            (200, obj)
        }
    }
}
