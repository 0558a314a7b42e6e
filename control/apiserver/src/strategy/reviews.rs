//! The access and token reviews (authorization.k8s.io, authentication.k8s.io): kinds
//! that are questions. A create is answered by [`crate::access::reviews`] and nothing is
//! stored, so they serve only `create`.

use baton_auth::UserInfo;
use serde_json::Value;

use super::{Hook, Strategy};
use crate::access::reviews;
use crate::error::ApiResult;
use crate::objects::Objects;

const CREATE: &[&str] = &["create"];

/// SelfSubjectAccessReview: may I?
#[derive(Debug)]
pub struct SelfSubjectAccessReviews;
/// SubjectAccessReview, or LocalSubjectAccessReview (served in a namespace): may they?
#[derive(Debug)]
pub struct SubjectAccessReviews;
/// SelfSubjectRulesReview: what may I do here?
#[derive(Debug)]
pub struct SelfSubjectRulesReviews;
/// SelfSubjectReview: who am I?
#[derive(Debug)]
pub struct SelfSubjectReviews;
/// TokenReview: whom does this token stand for?
#[derive(Debug)]
pub struct TokenReviews;

macro_rules! answers {
    ($ty:ty, |$objects:ident, $user:ident, $ns:ident, $body:ident| $answer:expr) => {
        impl Strategy for $ty {
            fn verbs(&self) -> &'static [&'static str] {
                CREATE
            }

            fn answer<'a>(
                &'a self,
                $objects: &'a Objects,
                $user: &'a UserInfo,
                $ns: Option<&'a str>,
                $body: Value,
            ) -> Result<Hook<'a, ApiResult<Value>>, Value> {
                Ok(Box::pin(async move { $answer }))
            }
        }
    };
}

answers!(SelfSubjectAccessReviews, |objects, user, _ns, body| {
    reviews::self_access(objects, user, body).await
});
answers!(SubjectAccessReviews, |objects, _user, ns, body| {
    reviews::access(objects, ns, body).await
});
answers!(SelfSubjectRulesReviews, |objects, user, _ns, body| {
    reviews::self_rules(objects, user, body).await
});
answers!(SelfSubjectReviews, |_objects, user, _ns, body| {
    reviews::whoami(user, body)
});
answers!(TokenReviews, |objects, _user, _ns, body| reviews::token(
    objects, body
)
.await);
