//! Authenticated `/metrics`, as controller-runtime's secure serving and kube-rbac-proxy do: the
//! bearer token is reviewed by the API server (TokenReview), and the user it names must be
//! allowed `get` on the non-resource URL `/metrics` (SubjectAccessReview). A scraper's
//! ServiceAccount then needs only a ClusterRole with `nonResourceURLs: ["/metrics"]`.
//!
//! Verdicts are cached briefly per token, so a scrape every few seconds costs the API server
//! two small requests per token and [`CACHE_TTL`], not per scrape.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// How long a verdict on a token is reused (controller-runtime's default is 10 s as well).
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Most tokens remembered at once; past it the cache starts over, so junk tokens cannot grow it.
const CACHE_MAX: usize = 1024;
/// The path and verb a scraper must be allowed.
const PATH: &str = "/metrics";
const VERB: &str = "get";

/// What the API server said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Authenticated and allowed `get` on `/metrics`.
    Allowed,
    /// Not a valid token (unknown, expired, wrong audience).
    Unauthenticated,
    /// A valid token whose user may not read `/metrics`.
    Forbidden { user: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("TokenReview failed: {0}")]
    TokenReview(#[source] kube::Error),
    #[error("SubjectAccessReview failed: {0}")]
    AccessReview(#[source] kube::Error),
}

/// Who vouches for a bearer token.
pub trait Authorize: Send + Sync + 'static {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Verdict, AuthError>>;
}

/// The answer to a request to `/metrics` that may not have it, or `None` to serve it.
pub(super) async fn check(auth: &dyn Authorize, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = bearer(headers) else {
        return Some(unauthorized("a bearer token is required\n"));
    };
    match auth.review(token).await {
        Ok(Verdict::Allowed) => None,
        Ok(Verdict::Unauthenticated) => Some(unauthorized("the token is not valid\n")),
        Ok(Verdict::Forbidden { user }) => Some(
            (
                StatusCode::FORBIDDEN,
                format!("{user} may not get {PATH}\n"),
            )
                .into_response(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot review a /metrics token");
            Some((StatusCode::SERVICE_UNAVAILABLE, "cannot review the token\n").into_response())
        }
    }
}

fn unauthorized(body: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        body,
    )
        .into_response()
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 9110 §11.1).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reviews tokens with the API server the agent talks to, and caches the verdicts.
pub struct KubeAuthorizer {
    client: kube::Client,
    cache: Mutex<HashMap<String, (Verdict, Instant)>>,
}

impl KubeAuthorizer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, token: &str) -> Option<Verdict> {
        let cache = self.cache.lock().ok()?;
        let (verdict, at) = cache.get(token)?;
        (at.elapsed() < CACHE_TTL).then(|| verdict.clone())
    }

    fn remember(&self, token: &str, verdict: &Verdict) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (verdict.clone(), Instant::now()));
    }

    async fn ask(&self, token: &str) -> Result<Verdict, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::TokenReview)?;
        let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let user = status.user.unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(PATH.into()),
                    verb: Some(VERB.into()),
                }),
                resource_attributes: None,
            },
            ..Default::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
            .map_err(AuthError::AccessReview)?;
        if answered.status.is_some_and(|s| s.allowed) {
            Ok(Verdict::Allowed)
        } else {
            Ok(Verdict::Forbidden {
                user: user.username.unwrap_or_default(),
            })
        }
    }
}

impl Authorize for KubeAuthorizer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Verdict, AuthError>> {
        Box::pin(async move {
            if let Some(v) = self.cached(token) {
                return Ok(v);
            }
            // Errors are not cached: the next scrape asks again.
            let verdict = self.ask(token).await?;
            self.remember(token, &verdict);
            Ok(verdict)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            value.parse().expect("a header value"),
        );
        h
    }

    #[test]
    fn bearer_takes_the_token_of_the_bearer_scheme_only() {
        assert_eq!(bearer(&with_auth("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer(&with_auth("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&with_auth("Basic abc")), None);
        assert_eq!(bearer(&with_auth("Bearer ")), None);
        assert_eq!(bearer(&with_auth("Bearer")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
