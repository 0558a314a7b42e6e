//! `p3-http-hello`: http-hello built for WASI 0.3 (`wasi:http/handler@0.3.0`). Answers
//! every request with a greeting (env `GREETING`), the serving pod's name (env
//! `POD_NAME`), the request path and `wasi=0.3`, the body written after the response
//! head, as 0.3's streams allow.
use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_future, wit_stream};

struct Hello;

wasip3::http::service::export!(Hello);

fn env(name: &str, default: &str) -> String {
    wasip3::cli::environment::get_environment()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| default.to_string())
}

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_else(|| "/".into());
        let body = format!(
            "{} from {} path={path} wasi=0.3\n",
            env("GREETING", "hello"),
            env("POD_NAME", "p3-http-hello")
        )
        .into_bytes();
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .map_err(|_| ErrorCode::InternalError(None))?;
        let (mut tx, rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(rx), trailers_rx);
        drop(trailers_tx);
        // Streams are rendezvous: the host reads the body once it has the response, so
        // the body is written by a task that outlives this call.
        wasip3::spawn(async move {
            let _unwritten = tx.write_all(body).await;
        });
        Ok(response)
    }
}
