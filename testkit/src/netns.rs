//! Hosts on one machine: each a network namespace with its own address, joined by a
//! bridge in a "switch" namespace of its own, so that a test can cut one host's link and
//! heal it, as a real network partition would. The test process reaches every host
//! through a link of its own to the switch.
//!
//! Needs root and `ip` (iproute2). Everything made is removed when the [`Net`] is
//! dropped: the namespaces, and with them every link inside.
//!
//! ```text
//!   test (root ns) 10.N.M.254 ──┐
//!   host 0        10.N.M.1  ────┤ br0 in the switch namespace
//!   host 1        10.N.M.2  ────┘
//! ```

use std::net::Ipv4Addr;
use std::process::Command;

/// Why the network could not be made.
#[derive(Debug, thiserror::Error)]
#[error("`ip {args}` failed: {stderr}")]
pub struct NetError {
    args: String,
    stderr: String,
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError {
            args: args.join(" "),
            stderr: format!("cannot run ip: {e}"),
        })?;
    if !out.status.success() {
        return Err(NetError {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// One host: its namespace and address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The network namespace's name (`ip netns exec NAME ...`).
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The switch's end of the host's link: down is a partition.
    switch_link: String,
}

/// A switch and the hosts on it.
#[derive(Debug)]
pub struct Net {
    tag: String,
    switch: String,
    /// The subnet's second and third octets.
    octets: (u8, u8),
    hosts: Vec<Host>,
}

impl Net {
    /// A switch with `n` hosts, and a link from the test to it.
    pub fn new(n: usize) -> Result<Self, NetError> {
        // Names and a subnet from the process id and a count of the nets this process
        // made, so that concurrent runs, and several nets of one run, do not meet.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n_made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{}", pid % 0xfffff, n_made % 10);
        let octets = (200 + ((pid / 250 + n_made) % 50) as u8, (pid % 250) as u8);
        let mut net = Net {
            switch: format!("bt{tag}sw"),
            tag,
            octets,
            hosts: Vec::new(),
        };
        // Left over from a run of the same pid that did not clean up.
        let _ = ip(&["netns", "delete", &net.switch]);
        ip(&["netns", "add", &net.switch])?;
        ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.switch, "link", "set", "br0", "up"])?;
        let test_end = format!("bt{}t", net.tag);
        let test_peer = format!("bt{}ts", net.tag);
        let _ = ip(&["link", "delete", &test_end]);
        ip(&[
            "link", "add", &test_end, "type", "veth", "peer", "name", &test_peer,
        ])?;
        ip(&["link", "set", &test_peer, "netns", &net.switch])?;
        ip(&[
            "-n",
            &net.switch,
            "link",
            "set",
            &test_peer,
            "master",
            "br0",
            "up",
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.addr(254)),
            "dev",
            &test_end,
        ])?;
        ip(&["link", "set", &test_end, "up"])?;
        for _ in 0..n {
            net.add_host()?;
        }
        Ok(net)
    }

    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octets.0, self.octets.1, last)
    }

    /// Adds one more host; returns its index.
    pub fn add_host(&mut self) -> Result<usize, NetError> {
        let i = self.hosts.len();
        let netns = format!("bt{}h{i}", self.tag);
        let inner = format!("bt{}h{i}e", self.tag);
        let outer = format!("bt{}h{i}s", self.tag);
        let _ = ip(&["netns", "delete", &netns]);
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &netns, "link", "add", &inner, "type", "veth", "peer", "name", &outer,
        ])?;
        ip(&["-n", &netns, "link", "set", &outer, "netns", &self.switch])?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &outer,
            "master",
            "br0",
            "up",
        ])?;
        let addr = self.addr(i as u8 + 1);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ])?;
        ip(&["-n", &netns, "link", "set", &inner, "up"])?;
        self.hosts.push(Host {
            netns,
            ip: addr,
            switch_link: outer,
        });
        Ok(i)
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// A command that runs `program` on host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i].netns])
            .arg(program);
        cmd
    }

    /// Cuts host `i` off from every other host and from the test.
    pub fn cut(&self, i: usize) -> Result<(), NetError> {
        self.set_link(i, "down")
    }

    /// Joins host `i` to the switch again.
    pub fn heal(&self, i: usize) -> Result<(), NetError> {
        self.set_link(i, "up")
    }

    fn set_link(&self, i: usize, state: &str) -> Result<(), NetError> {
        let link = &self.hosts[i].switch_link;
        ip(&["-n", &self.switch, "link", "set", link, state])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "delete", &h.netns]);
        }
        let _ = ip(&["netns", "delete", &self.switch]);
        let _ = ip(&["link", "delete", &format!("bt{}t", self.tag)]);
    }
}
