//! `spin-probe`: an HTTP component written against Spin's SDK 7 (WASI 0.3).
//! - `GET /var/NAME`: the Spin variable NAME.
//! - `PUT /kv/KEY` (body) / `GET /kv/KEY` / `DELETE /kv/KEY`: the default key-value store.
//! - `GET /keys`: the store's keys, one per line.
use spin_sdk::http::body::IncomingBodyExt as _;
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::key_value::Store;
use spin_sdk::{http_service, variables};

#[http_service]
async fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let answer = |status: u16, body: String| {
        http::Response::builder()
            .status(status)
            .body(body)
            .map_err(anyhow::Error::from)
    };
    if let Some(name) = path.strip_prefix("/var/") {
        return match variables::get(name).await {
            Ok(v) => answer(200, v),
            Err(e) => answer(404, format!("{e:?}")),
        };
    }
    let store = Store::open_default().await?;
    if path == "/keys" {
        let keys = store.get_keys().await.collect().await?;
        return answer(200, keys.join("\n"));
    }
    let Some(key) = path.strip_prefix("/kv/") else {
        return answer(404, "no such path".into());
    };
    match method {
        http::Method::PUT => {
            let body = req.into_body().bytes().await?;
            match store.set(key, &body).await {
                Ok(()) => answer(201, String::new()),
                Err(e) => answer(507, format!("{e:?}")),
            }
        }
        http::Method::DELETE => {
            store.delete(key).await?;
            answer(200, String::new())
        }
        _ => match store.get(key).await? {
            Some(v) => answer(200, String::from_utf8_lossy(&v).into_owned()),
            None => answer(404, String::new()),
        },
    }
}
