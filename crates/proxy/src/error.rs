//! The gateway's own error answers, made in this one place.
//!
//! JSON with APISIX's `error_msg` texts, plus the request id so an operator
//! can find the log line: `{"error_msg":"502 Bad Gateway","request_id":"…"}`.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::X_REQUEST_ID;

/// What went wrong, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The request cannot be served as sent (bad path, bad host).
    BadRequest,
    /// No route matches.
    NoRoute,
    /// The client stopped sending its request body.
    ClientTimeout,
    /// The client's request body broke off (the client went away or sent
    /// a malformed body) while it was being sent upstream.
    ClientAborted,
    /// A request body a plugin must read is larger than it may hold.
    TooLarge,
    /// The upstream failed or answered something that is not HTTP.
    BadGateway,
    /// No node could be tried.
    Unavailable,
    /// The upstream did not answer in time.
    Timeout,
}

impl Failure {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Failure::ClientAborted => StatusCode::BAD_REQUEST,
            Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::BadGateway => StatusCode::BAD_GATEWAY,
            Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Failure::BadRequest => "400 Bad Request",
            Failure::NoRoute => "404 Route Not Found",
            Failure::ClientTimeout => "408 Request Time-out",
            Failure::ClientAborted => "400 Bad Request",
            Failure::TooLarge => "413 Request Entity Too Large",
            Failure::BadGateway => "502 Bad Gateway",
            Failure::Unavailable => "503 Service Temporarily Unavailable",
            Failure::Timeout => "504 Gateway Time-out",
        }
    }

    /// The JSON answer for this failure.
    pub(crate) fn respond(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let id = request_id.to_str().unwrap_or_default();
        let body = format!(
            "{{\"error_msg\":\"{}\",\"request_id\":\"{}\"}}",
            self.message(),
            json_escape(id)
        );
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        resp
    }
}

fn json_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn body_is_apisix_text_plus_request_id() {
        let resp = Failure::NoRoute.respond(&HeaderValue::from_static("abc-1"));
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            br#"{"error_msg":"404 Route Not Found","request_id":"abc-1"}"#
        );
    }

    #[test]
    fn escapes() {
        assert_eq!(json_escape("a\"b\\c\u{1}"), "a\\\"b\\\\c\\u0001");
    }
}
