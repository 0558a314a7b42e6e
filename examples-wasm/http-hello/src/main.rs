//! `http-hello`: a wasi:http/proxy component. Answers every request with a greeting (env
//! `GREETING`), the serving pod's name (env `POD_NAME`) and the request path.
use wstd::http::body::Body;
use wstd::http::{Error, Request, Response};

#[wstd::http_server]
async fn main(req: Request<Body>) -> Result<Response<Body>, Error> {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".into());
    let pod = std::env::var("POD_NAME").unwrap_or_else(|_| "http-hello".into());
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    Ok(Response::new(
        format!("{greeting} from {pod} path={path}\n").into(),
    ))
}
