#![allow(dead_code)] // shared by several test crates, each using a part
//! A linearizability checker for a history of operations on registers (keys), after Wing &
//! Gong with Lowe's memoization (the algorithm of Knossos and Porcupine).
//!
//! Linearizability is local: a history is linearizable iff each key's sub-history is, so
//! keys are checked one by one. An operation whose outcome is unknown (the client timed out
//! or lost its member) has no return time: it may take effect at any point after its call,
//! or never, which is the same as "last".

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_store::{Compare, Error, Op, ReadOptions, StoreClient, Txn};
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Put(String),
    /// Compare-and-set: if the value is `expected`, set `new`.
    Cas {
        expected: String,
        new: String,
    },
    Get,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Put,
    Cas(bool),
    Get(Option<String>),
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub client: usize,
    pub key: String,
    pub input: Input,
    /// None: the outcome is unknown.
    pub output: Option<Output>,
    pub call: u128,
    /// None: never returned (outcome unknown).
    pub ret: Option<u128>,
}

type State = Option<String>;

/// The register model: the state after `input` with `output`, or None if impossible.
fn step(state: &State, input: &Input, output: &Option<Output>) -> Option<State> {
    match (input, output) {
        (Input::Put(v), _) => Some(Some(v.clone())),
        (Input::Cas { expected, new }, Some(Output::Cas(true))) => {
            (state.as_deref() == Some(expected.as_str())).then(|| Some(new.clone()))
        }
        (Input::Cas { expected, .. }, Some(Output::Cas(false))) => {
            (state.as_deref() != Some(expected.as_str())).then(|| state.clone())
        }
        (Input::Cas { expected, new }, None) => {
            if state.as_deref() == Some(expected.as_str()) {
                Some(Some(new.clone()))
            } else {
                Some(state.clone())
            }
        }
        (Input::Get, Some(Output::Get(v))) => (v == state).then(|| state.clone()),
        // A read with no answer tells nothing; callers drop those.
        (Input::Get, _) => Some(state.clone()),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

/// Checks one key's operations; Err describes the longest linearizable prefix found.
fn check_key(ops: &[Operation]) -> Result<(), String> {
    // Events sorted by time; returns of unknown operations go last. Calls sort before
    // returns at the same instant, which only makes more histories acceptable when
    // timestamps tie, never fewer.
    let mut events: Vec<(u128, bool, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, true, i));
        events.push((op.ret.unwrap_or(u128::MAX), false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // A doubly linked list with a sentinel head at index 0.
    let n = events.len();
    let mut list: Vec<Entry> = Vec::with_capacity(n + 1);
    list.push(Entry {
        op: usize::MAX,
        is_call: false,
        prev: 0,
        next: 1,
    });
    for (k, &(_, is_call, op)) in events.iter().enumerate() {
        list.push(Entry {
            op,
            is_call,
            prev: k,
            next: k + 2,
        });
    }
    let end = n + 1;
    let mut call_pos = vec![0; ops.len()];
    let mut ret_pos = vec![0; ops.len()];
    for idx in 1..=n {
        if list[idx].is_call {
            call_pos[list[idx].op] = idx;
        } else {
            ret_pos[list[idx].op] = idx;
        }
    }
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut cur = list[0].next;
    let mut best = 0;

    fn unlink(list: &mut [Entry], idx: usize) {
        let (p, nx) = (list[idx].prev, list[idx].next);
        list[p].next = nx;
        if nx < list.len() {
            list[nx].prev = p;
        }
    }
    fn relink(list: &mut [Entry], idx: usize) {
        let (p, nx) = (list[idx].prev, list[idx].next);
        list[p].next = idx;
        if nx < list.len() {
            list[nx].prev = idx;
        }
    }

    while list[0].next != end {
        // Unknown outcomes make the search exponential; refuse to guess rather than hang.
        assert!(
            cache.len() < 5_000_000,
            "linearizability search exceeded its budget ({} operations, {} unknown)",
            ops.len(),
            ops.iter().filter(|o| o.ret.is_none()).count()
        );
        if cur == end {
            return Err("ran past the end of the history".into());
        }
        let e = list[cur];
        if e.is_call {
            let op = &ops[e.op];
            if let Some(next_state) = step(&state, &op.input, &op.output) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin.clone(), next_state.clone())) {
                    stack.push((e.op, state.clone()));
                    state = next_state;
                    linearized = lin;
                    // Lift the operation: remove its call and return from the list.
                    unlink(&mut list, call_pos[e.op]);
                    unlink(&mut list, ret_pos[e.op]);
                    best = best.max(stack.len());
                    cur = list[0].next;
                    continue;
                }
            }
            cur = e.next;
        } else {
            // A return whose call has not been linearized: backtrack.
            let Some((op, prev_state)) = stack.pop() else {
                return Err(format!(
                    "not linearizable: at most {best} of {} operations could be ordered",
                    ops.len()
                ));
            };
            state = prev_state;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut list, ret_pos[op]);
            relink(&mut list, call_pos[op]);
            cur = list[call_pos[op]].next;
        }
    }
    Ok(())
}

pub const KEYS: [&str; 3] = ["lin/a", "lin/b", "lin/c"];

/// One client of the workload until `stop` is set: puts, compare-and-sets and reads of
/// [`KEYS`], each recorded with its call and return times (µs since `start`). Refusals
/// that prove nothing happened are not recorded; any other failure is an unknown outcome.
pub async fn client_loop(
    id: usize,
    client: StoreClient,
    start: Instant,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Operation>>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    let mut n = 0;
    let mut last_seen: Option<String> = None;
    // Stopped by a flag between operations, never mid-operation: an operation dropped
    // unrecorded could have taken effect, and the check would find a value no one wrote.
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        let value = format!("c{id}-{n}");
        let choice = rng.gen_range(0..10);
        let call = start.elapsed().as_micros();
        let (input, result): (Input, Result<Output, Error>) = if choice < 4 {
            let r = client.put(key, value.clone()).await.map(|_| Output::Put);
            (Input::Put(value), r)
        } else if choice < 6 {
            let expected = last_seen.clone().unwrap_or_else(|| "none".into());
            let txn = Txn::new()
                .when([Compare::value(key, expected.clone())])
                .and_then([Op::put(key, value.clone())]);
            let r = client
                .txn(&txn)
                .await
                .map(|resp| Output::Cas(resp.succeeded));
            (
                Input::Cas {
                    expected,
                    new: value,
                },
                r,
            )
        } else {
            let r = client.get(key.as_bytes(), ReadOptions::default()).await;
            let r = r.map(|kv| Output::Get(kv.map(|kv| String::from_utf8(kv.value).unwrap())));
            if let Ok(Output::Get(Some(v))) = &r {
                last_seen = Some(v.clone());
            }
            (Input::Get, r)
        };
        let ret = start.elapsed().as_micros();
        let op = match result {
            Ok(output) => Operation {
                client: id,
                key: key.into(),
                input,
                output: Some(output),
                call,
                ret: Some(ret),
            },
            // Refused before anything was proposed: the operation did not happen.
            Err(Error::NoLeader { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(Error::Transport { source, .. }) if source.is_connect() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // Failed or timed out: the write may or may not have happened.
            Err(_) => Operation {
                client: id,
                key: key.into(),
                input,
                output: None,
                call,
                ret: None,
            },
        };
        let failed = op.output.is_none();
        history.lock().unwrap().push(op);
        if failed {
            // A crashed member's connections fail at once; do not spin on them.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Reads every key once the cluster is whole, so that the check sees every acknowledged
/// write survive.
pub async fn final_reads(
    client: &StoreClient,
    start: Instant,
    history: &Arc<Mutex<Vec<Operation>>>,
) {
    let call = start.elapsed().as_micros();
    for key in KEYS {
        let kv = client
            .get(key.as_bytes(), ReadOptions::default())
            .await
            .unwrap();
        let ret = start.elapsed().as_micros();
        let output = Some(Output::Get(
            kv.map(|kv| String::from_utf8(kv.value).unwrap()),
        ));
        history.lock().unwrap().push(Operation {
            client: 99,
            key: key.into(),
            input: Input::Get,
            output,
            call,
            ret: Some(ret),
        });
    }
}

/// Checks a whole history, key by key.
pub fn check(history: &[Operation]) -> Result<(), String> {
    let mut keys: Vec<&str> = history.iter().map(|o| o.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let ops: Vec<Operation> = history
            .iter()
            .filter(|o| o.key == key)
            // Unanswered reads have no effect and constrain nothing.
            .filter(|o| !(o.input == Input::Get && o.output.is_none()))
            .cloned()
            .collect();
        check_key(&ops).map_err(|e| format!("key {key}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
pub mod self_test {
    use super::*;

    fn op(input: Input, output: Option<Output>, call: u128, ret: Option<u128>) -> Operation {
        Operation {
            client: 0,
            key: "k".into(),
            input,
            output,
            call,
            ret,
        }
    }

    pub fn run() {
        let put = |v: &str| Input::Put(v.into());
        let got = |v: Option<&str>| Some(Output::Get(v.map(String::from)));
        // Sequential and correct.
        let h = vec![
            op(put("a"), Some(Output::Put), 0, Some(1)),
            op(Input::Get, got(Some("a")), 2, Some(3)),
        ];
        assert!(check(&h).is_ok());
        // A stale read after a completed write: not linearizable.
        let h = vec![
            op(put("a"), Some(Output::Put), 0, Some(1)),
            op(put("b"), Some(Output::Put), 2, Some(3)),
            op(Input::Get, got(Some("a")), 4, Some(5)),
        ];
        assert!(check(&h).is_err(), "stale read must be rejected");
        // Concurrent write: either value may be read.
        let h = vec![
            op(put("a"), Some(Output::Put), 0, Some(1)),
            op(put("b"), Some(Output::Put), 2, Some(10)),
            op(Input::Get, got(Some("a")), 3, Some(4)),
            op(Input::Get, got(Some("b")), 5, Some(6)),
        ];
        assert!(check(&h).is_ok());
        // Reads may not go back in time once the new value was seen.
        let h = vec![
            op(put("a"), Some(Output::Put), 0, Some(1)),
            op(put("b"), Some(Output::Put), 2, Some(10)),
            op(Input::Get, got(Some("b")), 3, Some(4)),
            op(Input::Get, got(Some("a")), 5, Some(6)),
        ];
        assert!(
            check(&h).is_err(),
            "a read that goes back in time must be rejected"
        );
        // An unknown write may have happened...
        let h = vec![
            op(put("a"), None, 0, None),
            op(Input::Get, got(Some("a")), 5, Some(6)),
        ];
        assert!(check(&h).is_ok());
        // ...or not.
        let h = vec![
            op(put("a"), None, 0, None),
            op(Input::Get, got(None), 5, Some(6)),
        ];
        assert!(check(&h).is_ok());
        // Two successful CAS from the same value cannot both succeed.
        let cas = |e: &str, n: &str| Input::Cas {
            expected: e.into(),
            new: n.into(),
        };
        let h = vec![
            op(put("a"), Some(Output::Put), 0, Some(1)),
            op(cas("a", "b"), Some(Output::Cas(true)), 2, Some(5)),
            op(cas("a", "c"), Some(Output::Cas(true)), 3, Some(6)),
        ];
        assert!(check(&h).is_err(), "double CAS must be rejected");
        // A lost acknowledged write: read of the old value after the write returned.
        let h = vec![
            op(put("a"), Some(Output::Put), 0, Some(1)),
            op(cas("a", "b"), Some(Output::Cas(true)), 2, Some(3)),
            op(Input::Get, got(Some("a")), 4, Some(5)),
        ];
        assert!(check(&h).is_err());
    }
}
