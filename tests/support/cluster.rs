#![allow(dead_code)] // shared by several test crates, each using a part
//! A cluster of real `baton server` processes on 127.0.0.1, each with its own data dir,
//! for tests that kill, pause and restart members.
//!
//! Members speak mutual TLS: the test makes the store CA and puts a copy in each
//! member's `pki` directory before it starts (as an operator who copies the CA would),
//! and its clients present a store client certificate.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_store::{Status, StoreCa, StoreClient, StoreTls};

pub struct Member {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    child: Option<Child>,
    /// The member's socket, bound by the test on port 0 so that its address is known
    /// before any member starts, and passed to its first run. A restart binds the same
    /// address again, as a restarted server does.
    listener: Option<std::net::TcpListener>,
}

impl Member {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// What the member logged to stderr, across all its runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    /// The test's identity toward the members: a store client's certificate.
    pub tls: StoreTls,
    tuning: Vec<String>,
    _tmp: tempfile::TempDir,
}

/// Waits for `cond` to return Some, polling; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    baton_testkit::wait_until_async(timeout, what, cond)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Cluster {
    /// `n` members, none started yet, each with its address and data dir.
    fn members(n: usize, tuning: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let ca = StoreCa::generate().expect("a store CA");
        let members = (1..=n as u64)
            .map(|id| {
                let listener =
                    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
                let dir = tmp.path().join(format!("member-{id}"));
                ca.write_to(&dir.join("pki")).expect("copy the store CA");
                Member {
                    id,
                    addr: listener.local_addr().unwrap().to_string(),
                    dir,
                    child: None,
                    listener: Some(listener),
                }
            })
            .collect();
        Cluster {
            members,
            tls: ca.client("test").expect("a store client certificate"),
            tuning: tuning.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp,
        }
    }

    /// The first member bootstraps; the others join it.
    fn start_member(&mut self, i: usize) {
        let extra = if i == 0 {
            vec!["--bootstrap".to_string()]
        } else {
            vec!["--join".to_string(), self.members[0].addr.clone()]
        };
        self.spawn(i, &extra);
    }

    /// Starts `n` members: the first bootstraps, the others join it one by one.
    pub async fn start(n: usize, tuning: &[&str]) -> Cluster {
        let mut cluster = Cluster::members(n, tuning);
        for i in 0..n {
            let id = cluster.members[i].id;
            cluster.start_member(i);
            let addr = cluster.members[i].addr.clone();
            let client = cluster
                .client_of([addr])
                .with_timeout(Duration::from_secs(2));
            wait_for(Duration::from_secs(60), "member to become a voter", || {
                let client = client.clone();
                async move {
                    let s = client.status().await.ok()?;
                    (s.leader.is_some() && s.members.iter().any(|m| m.id == id && m.voter))
                        .then_some(())
                }
            })
            .await;
        }
        cluster
    }

    /// Starts `n` members at the same moment, the joiners before the member they join.
    pub async fn start_at_once(n: usize, tuning: &[&str]) -> Cluster {
        let mut cluster = Cluster::members(n, tuning);
        for i in (0..n).rev() {
            cluster.start_member(i);
        }
        let client = cluster.client().with_timeout(Duration::from_secs(2));
        wait_for(
            Duration::from_secs(90),
            "every member to become a voter",
            || {
                let client = client.clone();
                async move {
                    let s = client.status().await.ok()?;
                    let voters = s.members.iter().filter(|m| m.voter).count();
                    (s.leader.is_some() && voters == n).then_some(())
                }
            },
        )
        .await;
        cluster
    }

    fn spawn(&mut self, i: usize, extra: &[String]) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.arg("server").args(["--id", &m.id.to_string()]);
        // The test's copy of the socket closes once the child has its own: a member
        // that is killed refuses connections, as a dead server does.
        let passed = self.members[i].listener.take();
        match &passed {
            Some(l) => {
                baton_testkit::process::pass_listener(&mut cmd, l);
                cmd.args([
                    "--listen-fd",
                    &baton_testkit::process::LISTEN_FD.to_string(),
                ]);
            }
            None => {
                cmd.args(["--listen", &self.members[i].addr]);
            }
        }
        let m = &self.members[i];
        let child = cmd
            .arg("--data-dir")
            .arg(&m.dir)
            .args(&self.tuning)
            .args(extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn baton server");
        self.members[i].child = Some(child);
    }

    pub fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    pub fn client(&self) -> StoreClient {
        self.client_of(self.addrs())
            .with_timeout(Duration::from_secs(5))
    }

    /// A client of the members at `addrs`, with the test's certificate.
    pub fn client_of(&self, addrs: impl IntoIterator<Item = String>) -> StoreClient {
        StoreClient::new(addrs)
            .with_tls(&self.tls)
            .expect("a TLS client")
    }

    pub fn index_of(&self, id: u64) -> usize {
        self.members
            .iter()
            .position(|m| m.id == id)
            .expect("known member id")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a killed member from its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.members[i].child.is_none(),
            "member {i} is still running"
        );
        self.spawn(i, &[]);
    }

    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(pid) = self.members[i].pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    pub async fn status_of(&self, i: usize) -> Option<Status> {
        let client = self
            .client_of([self.members[i].addr.clone()])
            .with_timeout(Duration::from_secs(1));
        client.status().await.ok()
    }

    /// Waits until every running member agrees on one leader that is running; returns its id.
    pub async fn wait_for_leader(&self) -> u64 {
        wait_for(
            Duration::from_secs(60),
            "running members to agree on a leader",
            || async {
                let mut leader = None;
                for (i, m) in self.members.iter().enumerate() {
                    if !m.is_running() {
                        continue;
                    }
                    let l = self.status_of(i).await?.leader?;
                    if leader.is_some_and(|x| x != l) {
                        return None;
                    }
                    leader = Some(l);
                }
                let l = leader?;
                self.members[self.index_of(l)].is_running().then_some(l)
            },
        )
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A paused member would not die from SIGKILL until continued on some kernels.
            self.signal(i, "-CONT");
            self.kill(i);
        }
    }
}
