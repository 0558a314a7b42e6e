//! kube `Client`s from kubeconfigs held in memory, as `baton up` hands them to the
//! components it runs in one process. Every client sends its caller's trace context
//! ([`crate::trace`]).
//!
//! A node's client is [`multiplexed`]: its watches and requests share one HTTP/2
//! connection, as the kubelet's do, instead of kube-rs's HTTP/1.1 connection per request
//! in flight (every watch holds one). At 5,000 nodes that is the difference between
//! 5,000 connections to the API server and the 12,000 that filled its share of a
//! 20,000-file limit. Other clients stay on HTTP/1.1, since kube-rs's exec, attach and
//! port-forward upgrade their connection, which HTTP/2 cannot.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error("cannot build a client")]
    Client(#[source] kube::Error),
    #[error("cannot write the kubeconfig")]
    Write(#[source] serde_yaml::Error),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// The client configuration of kubeconfig YAML's current context.
async fn config_of(yaml: &str) -> Result<kube::Config, ClientError> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(ClientError::Kubeconfig)?;
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(ClientError::Kubeconfig)
}

/// A client from kubeconfig YAML.
pub async fn from_yaml(yaml: &str) -> Result<Client, ClientError> {
    traced(config_of(yaml).await?)
}

/// A [`multiplexed`] client from kubeconfig YAML.
pub async fn multiplexed_from_yaml(yaml: &str) -> Result<Client, ClientError> {
    multiplexed(config_of(yaml).await?)
}

/// A [`multiplexed`] client from kubeconfig YAML whose current user is replaced by a
/// client certificate and key (PEM): how a node agent, let in by whatever credentials it
/// was given, goes on as itself.
pub async fn with_client_certificate(
    yaml: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Client, ClientError> {
    multiplexed_from_yaml(&kubeconfig_with_client_certificate(
        yaml, cert_pem, key_pem,
    )?)
    .await
}

/// A client that speaks HTTP/2 to a server that offers it (ALPN), all its requests and
/// watches as streams of one connection, and HTTP/1.1 to one that does not. The
/// connection is pinged every 30 s, idle or not, so that a server gone silent (a
/// partition, a dead host) fails it within 50 s and the watches on it start over
/// elsewhere, where a read timeout would also cut a quiet watch.
pub fn multiplexed(config: kube::Config) -> Result<Client, ClientError> {
    use kube::client::ConfigExt;
    let tls = config.rustls_client_config().map_err(ClientError::Client)?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let mut https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|_| ClientError::ServerName(name.clone()))?;
        https = https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let https = https.enable_all_versions().wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .http2_keep_alive_timeout(std::time::Duration::from_secs(20))
        .http2_keep_alive_while_idle(true)
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(ClientError::Client)?)
        .layer(config.extra_headers_layer().map_err(ClientError::Client)?)
        .layer(crate::trace::layer::<kube::client::Body>())
        .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        .service(client);
    Ok(Client::new(service, config.default_namespace))
}

/// A client whose requests never leave the process: each is handed to `service` (an API
/// server's routes in this process) as it would arrive off a connection, with the
/// kubeconfig `yaml`'s credentials in its headers, so that it is authenticated,
/// authorised, queued by priority and fairness, counted and timed as any other request.
/// What it saves is the transport: no TLS on either side, no TCP, no HTTP framing. The
/// controller manager and the scheduler that `baton up` and `baton server` run beside
/// their API server send half of a busy cluster's requests, and read every change of
/// the kinds they watch.
pub async fn in_process<S, B>(yaml: &str, service: S) -> Result<Client, ClientError>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use kube::client::ConfigExt;
    let config = config_of(yaml).await?;
    // No base URI: a request keeps the path and query kube-rs gives it, which is all an
    // HTTP/1.1 server sees of its target.
    let service = tower::ServiceBuilder::new()
        .option_layer(config.auth_layer().map_err(ClientError::Client)?)
        .layer(config.extra_headers_layer().map_err(ClientError::Client)?)
        .layer(crate::trace::layer::<kube::client::Body>())
        .map_future(|answer| async move {
            match tokio::time::timeout(IN_PROCESS_ANSWER, answer).await {
                Ok(answered) => answered,
                Err(_) => Err("the API server did not answer in time".into()),
            }
        })
        .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
        .service(service);
    Ok(Client::new(service, config.default_namespace))
}

/// How long an in-process request waits for its answer to begin (a watch's streams on
/// after that), as kube-rs's connections time a read out: a request stuck in a server
/// that cannot reach its store fails, and the loop that sent it tries again.
const IN_PROCESS_ANSWER: std::time::Duration = std::time::Duration::from_secs(295);

/// Kubeconfig YAML whose current user is replaced by a client certificate and key (PEM).
pub fn kubeconfig_with_client_certificate(
    yaml: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<String, ClientError> {
    use base64::Engine;
    let mut kc = Kubeconfig::from_yaml(yaml).map_err(ClientError::Kubeconfig)?;
    let current = kc.current_context.clone().unwrap_or_default();
    let user = kc
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone())
        .unwrap_or_default();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let auth = kube::config::AuthInfo {
        client_certificate_data: Some(b64(cert_pem)),
        client_key_data: Some(b64(key_pem).into()),
        ..Default::default()
    };
    match kc.auth_infos.iter_mut().find(|a| a.name == user) {
        Some(named) => named.auth_info = Some(auth),
        None => kc.auth_infos.push(kube::config::NamedAuthInfo {
            name: user,
            auth_info: Some(auth),
        }),
    }
    serde_yaml::to_string(&kc).map_err(ClientError::Write)
}

/// A client that sends the calling span's `traceparent` with each request.
pub fn traced(config: kube::Config) -> Result<Client, ClientError> {
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(ClientError::Client)?
        .with_layer(&crate::trace::layer::<kube::client::Body>())
        .build())
}

/// The CA certificates (PEM) a kubeconfig trusts for its current cluster's API server:
/// what a node hands its pods so that their components can verify the API server too.
pub async fn cluster_ca_pem(yaml: &str) -> Result<Vec<Vec<u8>>, ClientError> {
    use base64::Engine;
    let config = config_of(yaml).await?;
    Ok(config
        .root_cert
        .unwrap_or_default()
        .iter()
        .map(|der| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
            pem.into_bytes()
        })
        .collect())
}

/// `s` as a URL query value or path segment: everything but RFC 3986's unreserved
/// characters percent-encoded.
pub fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;

    const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]
users: [{name: u, user: {token: t0k}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: team}}]
current-context: x
";

    type Answer = http::Response<http_body_util::Full<bytes::Bytes>>;

    #[tokio::test]
    async fn an_in_process_request_carries_its_credentials_and_path() {
        let server = tower::service_fn(|req: http::Request<kube::client::Body>| async move {
            let bearer = req.headers().get(http::header::AUTHORIZATION).cloned();
            assert_eq!(bearer.unwrap(), "Bearer t0k");
            assert_eq!(req.uri(), "/api/v1/namespaces/team/configmaps/settings");
            let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "settings", "namespace": "team"}, "data": {"a": "1"}});
            Ok::<_, std::convert::Infallible>(Answer::new(cm.to_string().into()))
        });
        let client = in_process(KUBECONFIG, server).await.unwrap();
        let cm = Api::<ConfigMap>::default_namespaced(client)
            .get("settings")
            .await
            .unwrap();
        assert_eq!(cm.data.unwrap()["a"], "1");
    }

    #[tokio::test(start_paused = true)]
    async fn an_in_process_request_without_an_answer_fails_in_time() {
        let server = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
            std::future::pending::<Result<Answer, std::convert::Infallible>>().await
        });
        let client = in_process(KUBECONFIG, server).await.unwrap();
        let started = tokio::time::Instant::now();
        let got = Api::<ConfigMap>::default_namespaced(client)
            .get("settings")
            .await;
        assert!(got.is_err());
        let waited = started.elapsed();
        assert!(
            waited >= IN_PROCESS_ANSWER && waited < IN_PROCESS_ANSWER * 2,
            "{waited:?}"
        );
    }
}
