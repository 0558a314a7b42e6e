//! The access and token reviews: questions a client asks with a create, answered and
//! never stored.
//!
//! - SelfSubjectAccessReview (`kubectl auth can-i`): may I do this?
//! - SubjectAccessReview, LocalSubjectAccessReview: may this user do this?
//! - SelfSubjectRulesReview (`kubectl auth can-i --list`): what may I do in a namespace?
//! - SelfSubjectReview (`kubectl auth whoami`): who am I?
//! - TokenReview: whom does this token authenticate?

use baton_auth::{Attributes, Decision, UserInfo};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::Objects;
use crate::table::{s, strings};

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::Invalid {
        group: "authorization.k8s.io".into(),
        kind: "SubjectAccessReview".into(),
        name: String::new(),
        causes: vec![FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: message.into(),
        }],
    }
}

/// The attributes a review's spec asks about, for `user`.
fn asked(user: UserInfo, spec: &Value) -> ApiResult<Attributes> {
    if let Some(r) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        return Ok(Attributes {
            user,
            verb: s(r, "/verb").into(),
            resource_request: true,
            namespace: s(r, "/namespace").into(),
            api_group: s(r, "/group").into(),
            api_version: s(r, "/version").into(),
            resource: s(r, "/resource").into(),
            subresource: s(r, "/subresource").into(),
            name: s(r, "/name").into(),
            path: String::new(),
        });
    }
    if let Some(n) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        return Ok(Attributes {
            user,
            verb: s(n, "/verb").into(),
            path: s(n, "/path").into(),
            ..Attributes::default()
        });
    }
    Err(invalid(
        "spec.resourceAttributes",
        "exactly one of nonResourceAttributes or resourceAttributes must be specified",
    ))
}

async fn decide(objects: &Objects, a: &Attributes) -> Value {
    match objects.access.authorize(objects, a).await {
        Decision::Allow(why) => json!({"allowed": true, "reason": why}),
        Decision::NoOpinion => json!({"allowed": false}),
        Decision::Deny(why) => json!({"allowed": false, "denied": true, "reason": why}),
    }
}

fn answered(mut body: Value, status: Value) -> Value {
    body["status"] = status;
    if !body.get("metadata").is_some_and(Value::is_object) {
        body["metadata"] = json!({});
    }
    body["metadata"]["creationTimestamp"] = Value::Null;
    body
}

/// SelfSubjectAccessReview: the requester's own access.
pub async fn self_access(objects: &Objects, user: &UserInfo, body: Value) -> ApiResult<Value> {
    let a = asked(user.clone(), &body["spec"])?;
    let status = decide(objects, &a).await;
    Ok(answered(body, status))
}

/// SubjectAccessReview (cluster-wide) and LocalSubjectAccessReview (`namespace`, which
/// the spec must not contradict): another user's access.
pub async fn access(objects: &Objects, namespace: Option<&str>, body: Value) -> ApiResult<Value> {
    let spec = &body["spec"];
    let user = UserInfo {
        name: s(spec, "/user").into(),
        uid: s(spec, "/uid").into(),
        groups: strings(spec.get("groups")),
        extra: spec
            .get("extra")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), strings(Some(v))))
                    .collect()
            })
            .unwrap_or_default(),
    };
    if user.name.is_empty() && user.groups.is_empty() {
        return Err(invalid(
            "spec.user",
            "at least one of user or group must be specified",
        ));
    }
    let mut a = asked(user, spec)?;
    if let Some(ns) = namespace {
        if a.resource_request && !a.namespace.is_empty() && a.namespace != ns {
            return Err(invalid(
                "spec.resourceAttributes.namespace",
                &format!("must match metadata.namespace {ns:?}"),
            ));
        }
        if a.resource_request {
            a.namespace = ns.to_string();
        }
    }
    let status = decide(objects, &a).await;
    Ok(answered(body, status))
}

/// SelfSubjectRulesReview: every rule the requester holds in `spec.namespace`.
pub async fn self_rules(objects: &Objects, user: &UserInfo, body: Value) -> ApiResult<Value> {
    let ns = s(&body, "/spec/namespace").to_string();
    let rules = objects.access.with_policy(|p| p.rules_for(user, &ns));
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for r in rules {
        if let Some(urls) = r.non_resource_urls.filter(|u| !u.is_empty()) {
            non_resource_rules.push(json!({"verbs": r.verbs, "nonResourceURLs": urls}));
        }
        if r.resources.as_ref().is_some_and(|x| !x.is_empty()) {
            let mut rule = json!({"verbs": r.verbs, "apiGroups": r.api_groups.unwrap_or_default(),
                                  "resources": r.resources});
            if let Some(names) = r.resource_names.filter(|n| !n.is_empty()) {
                rule["resourceNames"] = json!(names);
            }
            resource_rules.push(rule);
        }
    }
    // A node's grants come from the Node authorizer, which has no rule list.
    let incomplete = user.as_node().is_some();
    let mut status = json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules,
                            "incomplete": incomplete});
    if incomplete {
        status["evaluationError"] = json!("the node authorizer does not list its rules");
    }
    Ok(answered(body, status))
}

fn user_json(u: &UserInfo) -> Value {
    let mut v = json!({"username": u.name, "groups": u.groups});
    if !u.uid.is_empty() {
        v["uid"] = json!(u.uid);
    }
    if !u.extra.is_empty() {
        v["extra"] = json!(u.extra);
    }
    v
}

/// SelfSubjectReview: who the requester is.
pub fn whoami(user: &UserInfo, body: Value) -> ApiResult<Value> {
    Ok(answered(body, json!({"userInfo": user_json(user)})))
}

/// TokenReview: whom a token authenticates, for the audiences asked (the API's own when
/// none are).
pub async fn token(objects: &Objects, body: Value) -> ApiResult<Value> {
    let token = s(&body, "/spec/token").to_string();
    let audiences = strings(body.pointer("/spec/audiences"));
    if let Some(u) = objects.access.pki().and_then(|p| p.authenticate(&token)) {
        let status = json!({"authenticated": true, "user": user_json(&u.clone().authenticated()),
                            "audiences": audiences});
        return Ok(answered(body, status));
    }
    let status = match super::tokens::check(objects, &token, &audiences).await {
        Ok((u, matched)) => {
            json!({"authenticated": true, "user": user_json(&u), "audiences": matched})
        }
        Err(why) => json!({"authenticated": false, "user": {}, "error": why}),
    };
    Ok(answered(body, status))
}
