//! Recording core/v1 Events, the story `kubectl describe` tells.
//!
//! kube-runtime's recorder writes `events.k8s.io/v1` Events; kubectl's describe reads
//! core/v1 Events by involved object, so Baton's components record those. A repeated
//! event (same object, reason and message) bumps the count of the first one instead of
//! adding another, as the kubelet's event correlator does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::pod::now;

/// Normal or Warning, as Events carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Records Events for one component (`default-scheduler`, `kubelet`, ...). Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
    host: Option<String>,
    seen: Arc<Mutex<HashMap<String, (String, i32)>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("component", &self.component)
            .finish()
    }
}

impl Recorder {
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Self {
        Self {
            client,
            component: component.into(),
            host: host.map(str::to_string),
            seen: Arc::default(),
        }
    }

    /// Records an event about `object`. Failures are logged, not returned: an event that
    /// could not be written must not fail the work it describes.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) {
        let ns = object.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let key = format!(
            "{}/{}/{}/{}\0{reason}\0{message}",
            object.kind.as_deref().unwrap_or(""),
            ns,
            object.name.as_deref().unwrap_or(""),
            object.uid.as_deref().unwrap_or("")
        );
        let repeat = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded: forget everything rather than grow without end.
            if seen.len() > 4096 {
                seen.clear();
            }
            seen.get_mut(&key).map(|(name, count)| {
                *count += 1;
                (name.clone(), *count)
            })
        };
        let t = now();
        if let Some((name, count)) = repeat {
            let patch = json!({"count": count, "lastTimestamp": t});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => return,
                // Gone (expired or deleted): write a new one below.
                Err(e) => tracing::debug!(error = %e, "event update failed"),
            }
        }
        let name = format!(
            "{}.{:x}",
            object.name.as_deref().unwrap_or("object"),
            t.0.timestamp_nanos_opt().unwrap_or_default()
        );
        let event = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns),
                ..Default::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(format!("{type_:?}")),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: self.host.clone(),
            first_timestamp: Some(t.clone()),
            last_timestamp: Some(t),
            count: Some(1),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.insert(key, (name, 1));
            }
            Err(e) => tracing::warn!(error = %e, reason, "failed to record an event"),
        }
    }
}

/// Events sent, in order, by a task of their own, so that recording never makes the work
/// it describes wait for the API: a pod's start does not pay a round trip per `Pulling`,
/// `Created` or `Started`. A full queue drops what does not fit, as the kubelet's event
/// broadcaster does; an event is a report, not state.
#[derive(Clone, Debug)]
pub struct EventQueue {
    tx: tokio::sync::mpsc::Sender<Queued>,
}

#[derive(Debug)]
struct Queued {
    object: ObjectReference,
    type_: EventType,
    reason: &'static str,
    message: String,
}

impl EventQueue {
    /// Starts the task that sends `recorder`'s events; it ends when the last clone of the
    /// queue is dropped. Must be called on a Tokio runtime.
    pub fn spawn(recorder: Recorder, capacity: usize) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Queued>(capacity.max(1));
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                recorder
                    .publish(&e.object, e.type_, e.reason, &e.message)
                    .await;
            }
        });
        Self { tx }
    }

    /// Queues an event about `object`.
    pub fn post(
        &self,
        object: ObjectReference,
        type_: EventType,
        reason: &'static str,
        message: String,
    ) {
        let queued = Queued {
            object,
            type_,
            reason,
            message,
        };
        if let Err(e) = self.tx.try_send(queued) {
            tracing::debug!(error = %e, "event dropped");
        }
    }
}
