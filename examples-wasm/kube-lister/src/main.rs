//! `kube-lister`: an in-cluster API client as a wasi:http/proxy component. On each
//! request it reads its pod's ServiceAccount token and namespace from the projected
//! volume (`/var/run/secrets/kubernetes.io/serviceaccount`), lists the pods of its
//! namespace at `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, as client-go's
//! in-cluster config does, and answers with the API's status and the pod names it saw.
use wstd::http::body::Body;
use wstd::http::{Client, Error, Request, Response};

const DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[wstd::http_server]
async fn main(_req: Request<Body>) -> Result<Response<Body>, Error> {
    let read =
        |f: &str| std::fs::read_to_string(format!("{DIR}/{f}")).map(|s| s.trim().to_string());
    let (token, ns) = match (read("token"), read("namespace")) {
        (Ok(t), Ok(n)) => (t, n),
        (t, n) => {
            return Ok(Response::new(
                format!(
                    "no service account files: token {:?}, namespace {:?}\n",
                    t.err(),
                    n.err()
                )
                .into(),
            ))
        }
    };
    let host = std::env::var("KUBERNETES_SERVICE_HOST").unwrap_or_default();
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_default();
    let url = format!("https://{host}:{port}/api/v1/namespaces/{ns}/pods");
    let outgoing = Request::get(url.as_str())
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "application/json")
        .body(Body::empty())?;
    let answer = match Client::new().send(outgoing).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let text = body.str_contents().await?.to_string();
            // The names, without a JSON parser: in each object's metadata, the first
            // `"name":"..."` (the keys before it, such as labels and managedFields, hold
            // none; the list's own metadata has no name and is cut off by the next item's).
            let names: Vec<&str> = text
                .split("\"metadata\":{")
                .skip(1)
                .filter_map(|m| m.split_once("\"name\":\"")?.1.split('"').next())
                .collect();
            format!("status {status} pods [{}]\n", names.join(" "))
        }
        Err(e) => format!("could not reach {url}: {e}\n"),
    };
    Ok(Response::new(answer.into()))
}
