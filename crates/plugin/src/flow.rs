//! What a phase hook returns, and the answers plugins make.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::StatusCode;

use crate::Ctx;

/// What happens after a hook.
pub enum Flow {
    /// Go on to the next plugin.
    Continue,
    /// Stop here and answer the client with this; the remaining request
    /// phases are skipped, `header_filter` and `log` still run.
    Respond(Reply),
    /// Wait for I/O (an auth service, say), then apply the result to the
    /// request. Only plugins that do I/O pay for the box.
    Await(Pending),
}

/// The I/O a hook waits for; it resolves to what to do with the request.
pub type Pending = Pin<Box<dyn Future<Output = Resume> + Send>>;

/// The second half of a hook that waited: applied to the request once the
/// I/O is done, it decides the flow as a hook would.
pub type Resume = Box<dyn FnOnce(&mut Ctx) -> Flow + Send>;

/// An answer a plugin makes in place of the upstream's.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn new(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// APISIX's plugin answer: `{"message":"…"}` as JSON.
    pub fn message(status: StatusCode, message: &str) -> Reply {
        let body = serde_json::json!({ "message": message }).to_string();
        Reply::json(status, body)
    }

    /// A JSON body that is already serialised.
    pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Reply {
        Reply::new(status)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body)
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.insert(name, value);
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = body.into();
        self
    }
}

/// A response head on its way to the client, for `header_filter`.
#[derive(Debug, Default)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body, when it is known in full: a plugin's answer, or a
    /// replacement a plugin set. `None` streams the upstream's body.
    pub body: Option<Bytes>,
    /// The head and body are a complete response of their own (a cached
    /// copy put in place of the upstream's): its `Content-Encoding`,
    /// `ETag` and `Last-Modified` still describe the body and are kept.
    pub whole: bool,
}

impl From<Reply> for Head {
    fn from(r: Reply) -> Head {
        Head {
            status: r.status,
            headers: r.headers,
            body: Some(r.body),
            whole: true,
        }
    }
}
