//! # baton-fuzzing: what the fuzzers feed arbitrary bytes to
//!
//! Each target takes any bytes and must return, never panic, hang or abort: every one is
//! a place where Baton reads input it does not control (request bodies, patches,
//! selectors in a query string, quantities in a pod spec, an OCI registry's manifests, a
//! component's bytes). The bodies live here, in an ordinary crate, so that two things
//! run them:
//! - `fuzz/` (cargo-fuzz, libFuzzer), which explores: `scripts/fuzz.sh`;
//! - this crate's tests, which replay every input in `fuzz/corpus/TARGET/` on each test
//!   run, so a crash once found stays fixed.

use std::path::Path;
use std::sync::OnceLock;

use baton_apiserver::patch::{apply_patch, PatchType};
use baton_apiserver::resources::BUILTIN;
use baton_apiserver::selectors::{FieldSelector, LabelSelector};
use baton_apiserver::validation;
use serde_json::Value;

/// A target's body: any bytes in, nothing out, never a panic.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory and of its cargo-fuzz binary.
pub const TARGETS: &[(&str, Target)] = &[
    ("body", body),
    ("patch", patch),
    ("selectors", selectors),
    ("quantity", quantity),
    ("oci_manifest", oci_manifest),
    ("component", component),
];

/// A request body through the API server's decoding and validation: JSON, YAML or
/// protobuf (by the first byte), then the typed schema and the rules of a few kinds.
pub fn body(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let parsed = match kind % 3 {
        0 => validation::parse_json_checked(body).ok().map(|(v, _)| v),
        1 => validation::parse_yaml_checked(body).ok().map(|(v, _)| v),
        _ => baton_apiserver::protobuf::decode(body).ok(),
    };
    let Some(v) = parsed else {
        return;
    };
    for r in BUILTIN.iter() {
        let mut errs = Vec::new();
        r.strategy.validate(&v, &mut errs);
        let _ = validation::metadata(&v, r.namespaced, r.strategy.name_rule());
        // What passes the type check is given the kind's defaults, as a create does.
        if let Ok((mut typed, _)) = r.decode(&v) {
            if typed.is_object() {
                r.strategy.prepare_create(&mut typed);
            }
        }
    }
}

/// A patch of each type applied to an object: the input is `object \0 patch`.
pub fn patch(data: &[u8]) {
    let Some(split) = data.iter().position(|b| *b == 0) else {
        return;
    };
    let (Ok(obj), Ok(p)) = (
        serde_json::from_slice::<Value>(&data[..split]),
        serde_json::from_slice::<Value>(&data[split + 1..]),
    ) else {
        return;
    };
    for ty in [PatchType::Json, PatchType::Merge, PatchType::Strategic] {
        let mut target = obj.clone();
        let _ = apply_patch(ty, &mut target, &p);
    }
}

/// Label and field selectors as a query string carries them.
pub fn selectors(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = LabelSelector::parse(s) {
        let _ = sel.matches(&serde_json::json!({"metadata": {"labels": {"app": "web"}}}));
    }
    for r in BUILTIN.iter() {
        let _ = FieldSelector::parse(s, r);
    }
}

/// A resource quantity, and the units the scheduler and the node read from it.
pub fn quantity(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let exact = baton_kube::quantity::nanos(s);
    let milli = baton_kube::quantity::millicores(s);
    let whole = baton_kube::quantity::whole(s);
    // The three agree: a value readable in nano-units rounds up consistently.
    if let (Ok(n), Ok(m), Ok(w)) = (exact, milli, whole) {
        assert_eq!(u128::from(m), n.div_ceil(1_000_000), "{s:?}");
        assert_eq!(u128::from(w), n.div_ceil(1_000_000_000), "{s:?}");
    }
}

/// An image manifest as a registry serves it.
pub fn oci_manifest(data: &[u8]) {
    let _ = baton_oci::component_layer("fuzz.example/app:1", data);
}

/// Arbitrary bytes as a component: an error, never a crash.
pub fn component(data: &[u8]) {
    static RUNTIME: OnceLock<baton_wasm_shim::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        baton_wasm_shim::Runtime::new(baton_wasm_shim::RuntimeConfig {
            max_instances: 4,
            guest_threads: 1,
            ..Default::default()
        })
        .expect("a runtime")
    });
    if let Ok(c) = rt.load_bytes(data, Path::new("fuzz.wasm")) {
        let _ = rt.kind(&c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed input of every target.
    #[test]
    fn the_corpus_replays_clean() {
        let root = baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut ran = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                target(&data);
                ran += 1;
            }
        }
        assert!(ran >= TARGETS.len(), "an empty corpus proves nothing");
    }
}
