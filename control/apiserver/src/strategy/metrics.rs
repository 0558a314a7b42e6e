//! NodeMetrics and PodMetrics (metrics.k8s.io), and the pods' custom metrics
//! (custom.metrics.k8s.io): kinds that are measured, not stored. A get or list is
//! answered by [`crate::metrics`] from what the nodes measure, so they serve only `get`
//! and `list`; a custom metric is a `get` of a subresource.

use serde_json::Value;

use super::{Hook, Strategy};
use crate::error::ApiResult;
use crate::objects::Objects;
use crate::selectors::LabelSelector;

const READ: &[&str] = &["get", "list"];

/// NodeMetrics: a node's CPU and memory.
#[derive(Debug)]
pub struct NodeMetricses;
/// PodMetrics: the CPU and memory of a pod's containers.
#[derive(Debug)]
pub struct PodMetricses;

impl Strategy for NodeMetricses {
    fn verbs(&self) -> &'static [&'static str] {
        READ
    }

    fn measure<'a>(
        &'a self,
        objects: &'a Objects,
        _namespace: Option<&'a str>,
        name: Option<&'a str>,
        labels: &'a LabelSelector,
    ) -> Option<Hook<'a, ApiResult<Vec<Value>>>> {
        Some(Box::pin(crate::metrics::node_metrics(
            objects, name, labels,
        )))
    }
}

impl Strategy for PodMetricses {
    fn verbs(&self) -> &'static [&'static str] {
        READ
    }

    fn measure<'a>(
        &'a self,
        objects: &'a Objects,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
        labels: &'a LabelSelector,
    ) -> Option<Hook<'a, ApiResult<Vec<Value>>>> {
        Some(Box::pin(crate::metrics::pod_metrics(
            objects, namespace, name, labels,
        )))
    }
}

/// The pods' custom metrics (`custom.metrics.k8s.io/v1beta2`): each metric is a
/// subresource of `pods`, answered with a MetricValueList.
#[derive(Debug)]
pub struct PodCustomMetrics;

impl Strategy for PodCustomMetrics {
    fn verbs(&self) -> &'static [&'static str] {
        // `pods` alone names no metric: only its subresources are read.
        &[]
    }

    fn metrics(&self) -> &'static [&'static str] {
        crate::metrics::POD_METRICS
    }

    fn metric<'a>(
        &'a self,
        objects: &'a Objects,
        namespace: Option<&'a str>,
        name: &'a str,
        metric: &'a str,
        labels: &'a LabelSelector,
    ) -> Option<Hook<'a, ApiResult<Value>>> {
        Some(Box::pin(crate::metrics::pod_custom_metric(
            objects, namespace, name, metric, labels,
        )))
    }
}
