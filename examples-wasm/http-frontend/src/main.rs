//! `http-frontend`: a wasi:http/proxy component that calls its backend over wasi:http
//! outgoing (`http://localhost:8081` by default, env `BACKEND_URL`) and returns what the
//! backend said.
use wstd::http::body::Body;
use wstd::http::{Client, Error, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(req: Request<Body>) -> Result<Response<Body>, Error> {
    let backend = std::env::var("BACKEND_URL").unwrap_or_else(|_| "http://localhost:8081".into());
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let url = format!("{}{path}", backend.trim_end_matches('/'));
    let outgoing = Request::get(url.as_str()).body(Body::empty())?;
    match Client::new().send(outgoing).await {
        Ok(resp) => {
            let status = resp.status();
            let mut body = resp.into_body();
            let text = body.str_contents().await?.to_string();
            Ok(Response::new(
                format!("frontend got {status} from backend: {text}").into(),
            ))
        }
        Err(e) => {
            let mut resp = Response::new(format!("frontend could not reach {url}: {e}\n").into());
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(resp)
        }
    }
}
