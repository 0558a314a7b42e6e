//! `spin2-probe`: an HTTP component written against Spin's SDK 5 (WASI 0.2).
//! - `GET /var/NAME`: the Spin variable NAME.
//! - `PUT /kv/KEY` (body) / `GET /kv/KEY`: the default key-value store.
//! - `GET /keys`: the store's keys, one per line.
use spin_sdk::http::{IntoResponse, Method, Request, Response};
use spin_sdk::key_value::Store;
use spin_sdk::{http_component, variables};

#[http_component]
fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    let path = req.path().to_string();
    if let Some(name) = path.strip_prefix("/var/") {
        return Ok(match variables::get(name) {
            Ok(v) => Response::new(200, v),
            Err(e) => Response::new(404, format!("{e:?}")),
        });
    }
    let store = Store::open_default()?;
    if path == "/keys" {
        return Ok(Response::new(200, store.get_keys()?.join("\n")));
    }
    let Some(key) = path.strip_prefix("/kv/") else {
        return Ok(Response::new(404, "no such path"));
    };
    Ok(match req.method() {
        Method::Put => match store.set(key, req.body()) {
            Ok(()) => Response::new(201, ()),
            Err(e) => Response::new(507, format!("{e:?}")),
        },
        _ => match store.get(key)? {
            Some(v) => Response::new(200, v),
            None => Response::new(404, ()),
        },
    })
}
