//! Expectations: what a controller asked the API server for and has not yet seen in its
//! watch, so that it does not ask twice.
//!
//! A ReplicaSet that creates 3 pods and is reconciled again before its pod store shows
//! them would create 3 more. kube-controller-manager guards with "expectations"; this is
//! the same idea: creations are remembered by pod name, deletions by UID, and a
//! controller with unmet expectations does not create or delete, only reports status.
//! Expectations expire, so a lost watch event cannot wedge an owner forever.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an expectation is trusted before it is dropped.
const EXPIRY: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Pending {
    creates: HashSet<String>,
    deletes: HashSet<String>,
    at: Instant,
}

/// Outstanding creations and deletions per owner (by UID).
#[derive(Debug, Default)]
pub struct Expectations {
    by_owner: Mutex<HashMap<String, Pending>>,
}

impl Expectations {
    fn with<R>(&self, owner: &str, f: impl FnOnce(&mut Pending) -> R) -> R {
        let mut m = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        let p = m.entry(owner.to_string()).or_insert_with(|| Pending {
            creates: HashSet::new(),
            deletes: HashSet::new(),
            at: Instant::now(),
        });
        p.at = Instant::now();
        f(p)
    }

    pub fn expect_create(&self, owner: &str, name: &str) {
        self.with(owner, |p| p.creates.insert(name.to_string()));
    }

    pub fn expect_delete(&self, owner: &str, uid: &str) {
        self.with(owner, |p| p.deletes.insert(uid.to_string()));
    }

    /// A creation that failed will never be observed.
    pub fn creation_failed(&self, owner: &str, name: &str) {
        self.with(owner, |p| p.creates.remove(name));
    }

    /// Updates from what the store shows now (`present`: (name, uid) of the owner's
    /// pods), and says whether everything asked for has been seen.
    pub fn satisfied<'a>(
        &self,
        owner: &str,
        present: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> bool {
        let mut m = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = m.get_mut(owner) else {
            return true;
        };
        if p.at.elapsed() > EXPIRY {
            m.remove(owner);
            return true;
        }
        let names: HashSet<&str> = present.clone().map(|(n, _)| n).collect();
        let uids: HashSet<&str> = present.map(|(_, u)| u).collect();
        p.creates.retain(|n| !names.contains(n.as_str()));
        p.deletes.retain(|u| uids.contains(u.as_str()));
        let done = p.creates.is_empty() && p.deletes.is_empty();
        if done {
            m.remove(owner);
        }
        done
    }

    pub fn forget(&self, owner: &str) {
        let mut m = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creations_and_deletions_are_awaited() {
        let e = Expectations::default();
        assert!(e.satisfied("rs", std::iter::empty()));
        e.expect_create("rs", "a");
        e.expect_delete("rs", "u-old");
        let present = [("old", "u-old")];
        assert!(!e.satisfied("rs", present.iter().copied()));
        let present = [("a", "u-a"), ("old", "u-old")];
        assert!(!e.satisfied("rs", present.iter().copied()));
        let present = [("a", "u-a")];
        assert!(e.satisfied("rs", present.iter().copied()));
        e.expect_create("rs", "b");
        e.creation_failed("rs", "b");
        assert!(e.satisfied("rs", std::iter::empty()));
    }
}
