//! API errors, answered as `meta.k8s.io/v1` `Status` objects with the code and reason
//! that kubectl and client-go branch on.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One invalid field, for a 422's `details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field path, as Kubernetes writes it: `metadata.name`, `spec.containers[0].image`.
    pub field: String,
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueDuplicate`, ...
    pub reason: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    pub fn forbidden(field: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {why}"),
        }
    }

    pub fn invalid(field: impl Into<String>, value: &str, why: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {value:?}: {why}"),
        }
    }
}

/// Everything an API request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String },
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{message}")]
    Forbidden { message: String },
    #[error("{resource} {name:?} not found")]
    NotFound {
        group: String,
        resource: String,
        name: String,
    },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{resource} {name:?} already exists")]
    AlreadyExists {
        group: String,
        resource: String,
        name: String,
    },
    #[error("{message}")]
    Conflict {
        group: String,
        resource: String,
        name: String,
        message: String,
    },
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: i64, oldest: i64 },
    #[error("the body of the request was in an unknown format ({got:?}) - accepted media types include: {accepted}")]
    UnsupportedMediaType { got: String, accepted: String },
    #[error("{kind} {name:?} is invalid: {}", summary(causes))]
    Invalid {
        group: String,
        kind: String,
        name: String,
        causes: Vec<FieldError>,
    },
    #[error("only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf (as an object, a Table or PartialObjectMetadata); not {accept:?}")]
    NotAcceptable { accept: String },
    #[error("the request is too large: {size} bytes exceeds {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("{message}")]
    TooManyRequests { message: String },
    #[error("method not allowed: {message}")]
    MethodNotAllowed { message: String },
    #[error("{message}")]
    Timeout { message: String },
    #[error("storage unavailable: {message}")]
    Unavailable { message: String },
    #[error("internal error: {message}")]
    Internal { message: String },
}

fn summary(causes: &[FieldError]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    }
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal {
            message: e.to_string(),
        }
    }

    pub fn code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Expired { .. } => StatusCode::GONE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "BadRequest",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden { .. } => "Forbidden",
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Expired { .. } => "Expired",
            ApiError::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            ApiError::NotAcceptable { .. } => "NotAcceptable",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::TooLarge { .. } => "RequestEntityTooLarge",
            ApiError::TooManyRequests { .. } => "TooManyRequests",
            ApiError::MethodNotAllowed { .. } => "MethodNotAllowed",
            ApiError::Timeout { .. } => "Timeout",
            ApiError::Unavailable { .. } => "ServiceUnavailable",
            ApiError::Internal { .. } => "InternalError",
        }
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        // Every Status has details, as kube-apiserver's do: clients read them without
        // checking (`kubectl debug` reads `details.name` of a 404).
        status["details"] = match self {
            ApiError::NotFound {
                group,
                resource,
                name,
            }
            | ApiError::AlreadyExists {
                group,
                resource,
                name,
            }
            | ApiError::Conflict {
                group,
                resource,
                name,
                ..
            } => json!({"name": name, "group": group, "kind": resource}),
            ApiError::Invalid {
                group,
                kind,
                name,
                causes,
            } => json!({
                "name": name,
                "group": group,
                "kind": kind,
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason, "message": c.message, "field": c.field,
                })).collect::<Vec<_>>(),
            }),
            ApiError::TooManyRequests { .. }
            | ApiError::Timeout { .. }
            | ApiError::Unavailable { .. } => {
                json!({"retryAfterSeconds": 1})
            }
            ApiError::Internal { message } => {
                json!({"causes": [{"message": message}]})
            }
            _ => json!({}),
        };
        status
    }
}

impl From<baton_store::Error> for ApiError {
    fn from(e: baton_store::Error) -> Self {
        use baton_store::Error as E;
        match e {
            E::Compacted {
                requested,
                compact_revision,
            } => ApiError::Expired {
                requested,
                oldest: compact_revision,
            },
            E::FutureRevision { requested, current } => ApiError::Timeout {
                message: format!("Too large resource version: {requested}, current: {current}"),
            },
            E::ValueTooLarge { size, limit } | E::RequestTooLarge { size, limit } => {
                ApiError::TooLarge { size, limit }
            }
            E::NoLeader { .. }
            | E::Unavailable { .. }
            | E::Closed
            | E::Transport { .. }
            | E::NoSpace { .. } => ApiError::Unavailable {
                message: e.to_string(),
            },
            other => ApiError::Internal {
                message: other.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        (code, [("content-type", "application/json")], body).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_details() {
        let errors = [
            ApiError::NoRoute,
            ApiError::bad_request("x"),
            ApiError::Unauthorized,
            ApiError::Forbidden {
                message: "no".into(),
            },
            ApiError::internal("boom"),
            ApiError::TooManyRequests {
                message: "busy".into(),
            },
        ];
        for e in errors {
            let s = e.status();
            assert!(s["details"].is_object(), "{e}: {s}");
        }
        let s = ApiError::NoRoute.status();
        assert_eq!(s["details"], json!({}));
        assert_eq!(
            ApiError::internal("boom").status()["details"]["causes"][0]["message"],
            "boom"
        );
    }
}
