//! Liveness, readiness and startup probes against a pod's address: `httpGet` and
//! `tcpSocket`. (`exec` and `grpc` have no meaning for a Wasm component and fail with a
//! message saying so.)

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// A probe's schedule and its run of results.
#[derive(Debug, Clone)]
pub struct Prober {
    pub kind: Kind,
    probe: Probe,
    next: Instant,
    successes: i32,
    failures: i32,
    /// The verdict once thresholds are met: None until the first verdict.
    pub passing: Option<bool>,
    pub last_message: String,
}

fn port_of(p: &IntOrString, c: &Container) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

impl Prober {
    pub fn new(kind: Kind, probe: Probe, started: Instant) -> Self {
        let delay = probe.initial_delay_seconds.unwrap_or(0).max(0) as u64;
        Self {
            kind,
            probe,
            next: started + Duration::from_secs(delay),
            successes: 0,
            failures: 0,
            passing: None,
            last_message: String::new(),
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    pub fn next_at(&self) -> Instant {
        self.next
    }

    /// Runs the probe once; returns the verdict if it changed.
    pub async fn run(&mut self, ip: IpAddr, c: &Container) -> Option<bool> {
        let period = self.probe.period_seconds.unwrap_or(10).max(1) as u64;
        self.next = Instant::now() + Duration::from_secs(period);
        let timeout = Duration::from_secs(self.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let result = tokio::time::timeout(timeout, check(&self.probe, ip, c))
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {}s", timeout.as_secs())));
        let before = self.passing;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                let need = self.probe.success_threshold.unwrap_or(1).max(1);
                if self.successes >= need {
                    self.passing = Some(true);
                }
            }
            Err(msg) => {
                self.successes = 0;
                self.failures += 1;
                self.last_message = msg;
                let need = self.probe.failure_threshold.unwrap_or(3).max(1);
                if self.failures >= need {
                    self.passing = Some(false);
                }
            }
        }
        (self.passing != before).then_some(self.passing).flatten()
    }

    /// After a failed liveness probe restarts the container, counting starts over.
    pub fn reset(&mut self, started: Instant) {
        *self = Prober::new(self.kind, self.probe.clone(), started);
    }
}

async fn check(p: &Probe, ip: IpAddr, c: &Container) -> Result<(), String> {
    if let Some(h) = &p.http_get {
        let port = port_of(&h.port, c).ok_or("probe names no known port")?;
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let mut s = tokio::net::TcpStream::connect(SocketAddr::new(ip, port))
            .await
            .map_err(|e| format!("Get \"http://{ip}:{port}{path}\": {e}"))?;
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: {ip}:{port}\r\nuser-agent: kube-probe/1.33\r\nconnection: close\r\n");
        for hdr in h.http_headers.iter().flatten() {
            req.push_str(&format!("{}: {}\r\n", hdr.name, hdr.value));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n]);
        let code: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad HTTP response: {line:?}"))?;
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if let Some(t) = &p.tcp_socket {
        let port = port_of(&t.port, c).ok_or("probe names no known port")?;
        return tokio::net::TcpStream::connect(SocketAddr::new(ip, port))
            .await
            .map(|_| ())
            .map_err(|e| format!("dial tcp {ip}:{port}: {e}"));
    }
    Err("only httpGet and tcpSocket probes are supported for Wasm components".into())
}

/// The probers a container asks for.
pub fn for_container(c: &Container, started: Instant) -> Vec<Prober> {
    [
        (Kind::Startup, &c.startup_probe),
        (Kind::Liveness, &c.liveness_probe),
        (Kind::Readiness, &c.readiness_probe),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.clone().map(|p| Prober::new(k, p, started)))
    .collect()
}
