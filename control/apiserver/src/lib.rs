//! # baton-apiserver: the Kubernetes REST API over Baton's store
//!
//! This crate is Baton's kube-apiserver. It speaks enough of the Kubernetes API that the
//! real `kubectl` (1.29–1.33) and kube-rs work against it unchanged, and it is the only
//! component that touches the store ([`baton_store`]).
//!
//! ## What a request goes through
//! 1. [`server`]: TLS (rustls; HTTP/2 and HTTP/1.1), then a bearer token from the token file
//!    (`/version` and the health checks are public). Non-resource paths (discovery,
//!    OpenAPI) are answered from the static resource table in [`resources`].
//! 2. [`rest`]: the URL becomes a resource, namespace, name and subresource, and the verb
//!    picks a handler. Bodies are checked against the `k8s-openapi` type of the resource
//!    (unknown and duplicate fields are rejected, warned about or ignored, per
//!    `fieldValidation`), then by the kind's own rules. Everything a kind does differently
//!    (defaults, validation, allocations, updates, deletion, printing) is its
//!    [`strategy`]; the handlers never ask which kind they serve.
//!    Before a create is stored, [`admission`] applies the namespace's LimitRanges and
//!    charges its ResourceQuotas.
//! 3. [`objects`]: objects are JSON in the store under `/registry/<group>/<plural>/...`.
//!    An object's `resourceVersion` is the store revision that last wrote it; a list's is
//!    the revision it was read at. Every update is a compare-and-swap on that revision, so
//!    a stale write gets 409 instead of overwriting.
//! 4. Watches are `ADDED`/`MODIFIED`/`DELETED` events (label and field selectors
//!    included), periodic `BOOKMARK`s, and an `ERROR` 410 when the revision was compacted.
//!    They and most lists are served from the [`watchcache`]: one store watch per resource
//!    feeds every API watch of it, indexed by the field a watch pins (a node's
//!    `spec.nodeName`). What the cache cannot answer is read from the store.
//!
//! Patches ([`patch`]): JSON patch, JSON merge patch, strategic merge (with the merge keys
//! of the served types), and server-side apply with managed fields ([`managed`]).
//!
//! Printing ([`table`]): `Accept: ...;as=Table` gets a `meta.k8s.io/v1` Table with the
//! columns `kubectl get` shows, from each strategy's column list.

pub mod access;
pub mod admission;
pub mod cache;
pub mod crd;
pub mod defaults;
pub mod discovery;
pub mod encryption;
pub mod error;
pub mod event_ttl;
pub mod eviction;
pub mod fairness;
pub mod join;
pub mod jsonpath;
pub mod kubernetes_service;
pub mod managed;
pub mod metrics;
pub mod mutating_policy;
pub mod nodelink;
pub mod objects;
pub mod openapi_v2;
pub mod patch;
pub mod pki;
pub mod podsecurity;
pub mod policy;
pub mod protobuf;
pub mod resources;
pub mod rest;
pub mod selectors;
pub mod server;
pub mod strategy;
pub mod table;
pub mod telemetry;
pub mod ui;
pub mod validation;
pub mod watchcache;
pub mod webhook;

pub use error::{ApiError, FieldError};
pub use objects::Objects;
pub use pki::Pki;
pub use server::{ApiServer, ServeError};
