//! `events.k8s.io/v1` Events: the same objects as core/v1 Events, in the newer form.
//!
//! kube-apiserver stores both under one prefix and converts between them on every read
//! and write; so does Baton. An Event written in one form is read in the other, with the
//! fields renamed as Kubernetes renames them (`involvedObject` and `regarding`, `message`
//! and `note`, `source` and `deprecatedSource`, …).

use serde_json::{json, Map, Value};

use super::{Column, Strategy};
use crate::error::FieldError;
use crate::table::s;

#[derive(Debug)]
pub struct EventsV1;

/// (core/v1 field, events.k8s.io/v1 field), renamed one to one.
const RENAMED: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename(obj: &mut Value, to_v1: bool) {
    let Some(m) = obj.as_object_mut() else { return };
    let mut moved = Map::new();
    for (core, v1) in RENAMED {
        let (from, to) = if to_v1 { (core, v1) } else { (v1, core) };
        if let Some(v) = m.remove(*from) {
            moved.insert(to.to_string(), v);
        }
    }
    m.extend(moved);
}

fn last_seen(o: &Value) -> Value {
    let t = [
        "/series/lastObservedTime",
        "/deprecatedLastTimestamp",
        "/eventTime",
    ]
    .iter()
    .map(|p| s(o, p))
    .find(|t| !t.is_empty());
    json!(t.map_or_else(|| "<unknown>".into(), |t| crate::table::age_of(Some(t))))
}

static COLUMNS: &[Column] = &[
    Column::new("Last Seen", "string", 0, last_seen),
    Column::new("Type", "string", 0, |o| json!(s(o, "/type"))),
    Column::new("Reason", "string", 0, |o| json!(s(o, "/reason"))),
    Column::new("Object", "string", 0, |o| {
        json!(format!(
            "{}/{}",
            s(o, "/regarding/kind").to_lowercase(),
            s(o, "/regarding/name")
        ))
    }),
    Column::new("Message", "string", 0, |o| json!(s(o, "/note"))),
];

impl Strategy for EventsV1 {
    fn field_selectable(&self, field: &str) -> bool {
        field.starts_with("regarding.")
            || matches!(
                field,
                "reason" | "type" | "reportingController" | "deprecatedSource"
            )
    }

    /// What events.k8s.io/v1 requires of a new Event, in kube-apiserver's words.
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        for (field, ptr) in [
            ("eventTime", "/eventTime"),
            ("reportingController", "/reportingController"),
            ("reportingInstance", "/reportingInstance"),
            ("action", "/action"),
            ("reason", "/reason"),
        ] {
            if s(o, ptr).is_empty() {
                errs.push(FieldError::required(field));
            }
        }
        let t = s(o, "/type");
        if !matches!(t, "Normal" | "Warning") {
            errs.push(FieldError {
                field: "type".into(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {t:?}: supported values: \"Normal\", \"Warning\""
                ),
            });
        }
        if s(o, "/note").len() > 1024 {
            errs.push(FieldError {
                field: "note".into(),
                reason: "FieldValueTooLong",
                message: "Too long: may not be more than 1024 bytes".into(),
            });
        }
    }

    fn stored_to_served(&self, obj: &mut Value) {
        rename(obj, true);
    }

    fn served_to_stored(&self, obj: &mut Value) {
        rename(obj, false);
    }

    fn columns(&self) -> &[Column] {
        COLUMNS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_forms_rename_into_each_other() {
        let core = json!({"involvedObject": {"kind": "Pod", "name": "p"}, "message": "hi",
                          "reason": "Started", "count": 3, "source": {"component": "kubelet"}});
        let mut v = core.clone();
        EventsV1.stored_to_served(&mut v);
        assert_eq!(v["regarding"]["name"], "p");
        assert_eq!(v["note"], "hi");
        assert_eq!(v["deprecatedCount"], 3);
        assert_eq!(v["deprecatedSource"]["component"], "kubelet");
        assert!(v.get("message").is_none());
        EventsV1.served_to_stored(&mut v);
        assert_eq!(v, core);
    }
}
