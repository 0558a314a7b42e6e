//! The names the volume pieces agree on: the API server (default class, claim
//! protection), the scheduler (the node picked for a waiting claim), the controller
//! manager's local provisioner, and the node that mounts its volumes.

/// The built-in local provisioner, and the `local` StorageClass's `provisioner`.
pub const LOCAL_PROVISIONER: &str = "baton.dev/local";

/// The path prefix of locally provisioned volumes: `/baton-local/<volume>` is `<volume>`
/// in the local volume directory of the node the volume is pinned to.
pub const LOCAL_VOLUME_PREFIX: &str = "/baton-local/";

/// Where the scheduler writes the node it picked for a claim waiting for its first pod.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The finalizer that keeps a claim while pods use it.
pub const CLAIM_PROTECTION: &str = "kubernetes.io/pvc-protection";

/// The annotation that makes a StorageClass the one claims without a class get.
pub const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
