//! Showing an error with its causes: see [`baton_error_chain`], which the store (that
//! has no Kubernetes types) shares.

pub use baton_error_chain::{chain, Chain};
