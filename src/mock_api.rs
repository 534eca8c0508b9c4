//! A scripted Kubernetes API for unit tests (no server, no root): the code under test gets a
//! real `kube::Client` whose requests arrive here one by one; each test states the exact
//! requests it expects, in order, and the answers. An unexpected request, a wrong verb, path,
//! patch type or body fails the test; a missing request times out.
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// How long a test waits for the next request before failing.
const WAIT: Duration = Duration::from_secs(5);

/// One request as the API server saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query, e.g. `/api/v1/nodes/n1?fieldManager=x&force=true`.
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

impl Seen {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// Whether the query has `key=value`.
    pub fn has_query(&self, pair: &str) -> bool {
        self.uri
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|p| p == pair))
    }
}

pub struct MockApi {
    handle: Handle,
}

/// A client wired to a fresh mock API.
pub fn client() -> (Client, MockApi) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), MockApi { handle })
}

impl MockApi {
    /// Wait for the next request, check its verb and path (query excluded), answer with
    /// `status` and `reply`, and return it for further checks.
    pub async fn expect(&mut self, method: &str, path: &str, status: u16, reply: Value) -> Seen {
        self.respond(|seen| {
            assert_eq!(
                (seen.method.as_str(), seen.path()),
                (method, path),
                "unexpected request {} {}: {}",
                seen.method,
                seen.uri,
                seen.body
            );
            (status, reply)
        })
        .await
    }

    /// Wait for the next request and answer what `answer` says: for requests whose order is
    /// not fixed (concurrent writes).
    pub async fn respond(&mut self, answer: impl FnOnce(&Seen) -> (u16, Value)) -> Seen {
        let (seen, held) = self.hold().await;
        let (status, reply) = answer(&seen);
        held.answer(status, reply);
        seen
    }

    /// Wait for the next request and leave it unanswered until [`Held::answer`]: to show that
    /// other requests go out while this one is in flight.
    pub async fn hold(&mut self) -> (Seen, Held) {
        let (request, send) = tokio::time::timeout(WAIT, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request within {WAIT:?}"))
            .expect("the client went away");
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let method = request.method().to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("the request body is JSON")
        };
        let seen = Seen {
            method,
            uri,
            content_type,
            body,
        };
        (seen, Held(send))
    }

    /// Assert that no request arrives within a short while.
    pub async fn expect_silence(&mut self) {
        let next =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// A request not answered yet (see [`MockApi::hold`]).
pub struct Held(tower_test::mock::SendResponse<Response<Body>>);

impl Held {
    /// Answer with `status` and `reply` (a failure status sends a `metav1.Status` instead).
    pub fn answer(self, status: u16, reply: Value) {
        let reply = if status >= 400 {
            status_reply(status)
        } else {
            reply
        };
        self.0.send_response(
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                .expect("response"),
        );
    }
}

/// A `metav1.Status` failure body as the API server sends it.
fn status_reply(code: u16) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("mock {reason}"), "reason": reason, "code": code,
    })
}

/// The content type of a server-side apply.
pub const APPLY: &str = "application/apply-patch+yaml";
/// The content type of a JSON merge patch.
pub const MERGE: &str = "application/merge-patch+json";
