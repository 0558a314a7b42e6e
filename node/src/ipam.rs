//! Pod addresses: each pod gets a loopback address of its own from the node's range
//! (`127.16.0.0/16` by default), which is how pods on one node share ports without
//! conflict (see wasm-shim's `net.rs`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Why a pod got no address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("the node's pod range {0} is exhausted")]
    Exhausted(String),
    #[error("invalid pod range {0:?}: want a 127.x.y.z/N loopback CIDR with N between 8 and 30")]
    Range(String),
}

/// `A.B.C.D/N` as its address and prefix length, N at most 32.
pub fn parse_range(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, bits) = cidr.split_once('/')?;
    let bits: u8 = bits.parse().ok()?;
    Some((ip.parse().ok()?, bits)).filter(|_| bits <= 32)
}

/// The address a node binds as itself in its pod range `cidr`: the range's first (`.1`),
/// which is never a pod's.
pub fn node_address(cidr: &str) -> Result<Ipv4Addr, IpamError> {
    let (ip, bits) = parse_range(cidr)
        .filter(|(_, bits)| (1..=30).contains(bits))
        .ok_or_else(|| IpamError::Range(cidr.to_string()))?;
    let mask = u32::MAX << (32 - u32::from(bits));
    Ok(Ipv4Addr::from((u32::from(ip) & mask) + 1))
}

/// Hands out and takes back the addresses of one range.
#[derive(Debug)]
pub struct Ipam {
    cidr: String,
    first: u32,
    last: u32,
    used: BTreeSet<u32>,
    next: u32,
}

impl Ipam {
    pub fn new(cidr: &str) -> Result<Self, IpamError> {
        let err = || IpamError::Range(cidr.to_string());
        let (ip, bits) = parse_range(cidr).ok_or_else(err)?;
        if !ip.is_loopback() || !(8..=30).contains(&bits) {
            return Err(err());
        }
        let bits = u32::from(bits);
        let mask = u32::MAX << (32 - bits);
        let base = u32::from(ip) & mask;
        // Skip the network address and .1 (the address a node binds as itself).
        let first = base + 2;
        let last = base | !mask;
        Ok(Self {
            cidr: cidr.to_string(),
            first,
            last: last - 1,
            used: BTreeSet::new(),
            next: first,
        })
    }

    /// An address, `want` if it is in range and free (a pod keeping its address across a
    /// node agent restart), else the next free one.
    pub fn allocate(&mut self, want: Option<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        if let Some(w) = want.map(u32::from) {
            if (self.first..=self.last).contains(&w) && self.used.insert(w) {
                return Ok(Ipv4Addr::from(w));
            }
        }
        let size = self.last - self.first + 1;
        for i in 0..size {
            let candidate = self.first + (self.next - self.first + i) % size;
            if self.used.insert(candidate) {
                self.next = if candidate == self.last {
                    self.first
                } else {
                    candidate + 1
                };
                return Ok(Ipv4Addr::from(candidate));
            }
        }
        Err(IpamError::Exhausted(self.cidr.clone()))
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_reused_and_bounded() {
        let mut ipam = Ipam::new("127.20.0.0/30").unwrap();
        // A /30 has .2 only, once the network address, .1 and broadcast are kept out.
        let a = ipam.allocate(None).unwrap();
        assert_eq!(a, Ipv4Addr::new(127, 20, 0, 2));
        assert!(ipam.allocate(None).is_err());
        ipam.release(a);
        assert_eq!(ipam.allocate(Some(a)).unwrap(), a);
        let mut ipam = Ipam::new("127.16.0.0/16").unwrap();
        let want = Ipv4Addr::new(127, 16, 3, 4);
        assert_eq!(ipam.allocate(Some(want)).unwrap(), want);
        assert_ne!(ipam.allocate(Some(want)).unwrap(), want);
        assert!(Ipam::new("10.0.0.0/16").is_err());
    }
}
