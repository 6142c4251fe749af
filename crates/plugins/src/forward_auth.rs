//! `forward-auth`: asks an external service whether a request may pass.
//!
//! The auth service gets the client's method, host, URI and address in
//! `X-Forwarded-*` headers, plus the `request_headers` named. A 2xx answer
//! lets the request through, carrying the `upstream_headers` named from the
//! answer; any other answer goes back to the client as it came, with the
//! `client_headers` named. When the service cannot be reached,
//! `allow_degradation` lets requests through, otherwise they get
//! `status_on_error`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::outbound;
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply, Resume};

pub(crate) const NAME: &str = "forward-auth";
pub(crate) const PRIORITY: i32 = 2002;

/// The most of an auth service's refusal body passed to the client.
const MAX_AUTH_BODY: usize = 64 * 1024;

fn schema() -> Value {
    let names = json!({"type": "array", "items": {"type": "string"}, "default": []});
    json!({
        "type": "object",
        "properties": {
            "uri": {"type": "string", "pattern": "^https?://"},
            "ssl_verify": {"type": "boolean", "default": true},
            "request_method": {"type": "string", "enum": ["GET", "POST"], "default": "GET"},
            "request_headers": names,
            "upstream_headers": names,
            "client_headers": names,
            "timeout": {"type": "integer", "minimum": 1, "maximum": 60000, "default": 3000},
            "keepalive": {"type": "boolean", "default": true},
            "keepalive_timeout": {"type": "integer", "minimum": 1000, "default": 60000},
            "keepalive_pool": {"type": "integer", "minimum": 1, "default": 5},
            "allow_degradation": {"type": "boolean", "default": false},
            "status_on_error": {"type": "integer", "minimum": 200, "maximum": 599, "default": 403}
        },
        "required": ["uri"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    uri: String,
    ssl_verify: bool,
    request_method: String,
    request_headers: Vec<String>,
    upstream_headers: Vec<String>,
    client_headers: Vec<String>,
    timeout: u64,
    keepalive: bool,
    keepalive_timeout: u64,
    keepalive_pool: usize,
    allow_degradation: bool,
    status_on_error: u16,
}

struct ForwardAuth {
    uri: Uri,
    method: Method,
    request_headers: Vec<HeaderName>,
    upstream_headers: Arc<[HeaderName]>,
    client_headers: Arc<[HeaderName]>,
    timeout: Duration,
    allow_degradation: bool,
    status_on_error: StatusCode,
    client: Client<outbound::Connector, Full<Bytes>>,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn names(list: &[String], field: &str) -> Result<Vec<HeaderName>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, n)| {
            HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| FieldError::new(format!("{field}[{i}]"), "not a valid header name"))
        })
        .collect()
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config)?;
    let uri: Uri = crate::http_url(&c.uri, "uri")?;
    let mut builder = Client::builder(TokioExecutor::new());
    if c.keepalive {
        builder
            .pool_idle_timeout(Duration::from_millis(c.keepalive_timeout))
            .pool_max_idle_per_host(c.keepalive_pool);
    } else {
        builder.pool_max_idle_per_host(0);
    }
    Ok(Arc::new(ForwardAuth {
        uri,
        method: if c.request_method == "POST" {
            Method::POST
        } else {
            Method::GET
        },
        request_headers: names(&c.request_headers, "request_headers")?,
        upstream_headers: names(&c.upstream_headers, "upstream_headers")?.into(),
        client_headers: names(&c.client_headers, "client_headers")?.into(),
        timeout: Duration::from_millis(c.timeout),
        allow_degradation: c.allow_degradation,
        status_on_error: StatusCode::from_u16(c.status_on_error)
            .map_err(|_| FieldError::new("status_on_error", "not an HTTP status"))?,
        client: builder.build(outbound::connector(c.ssl_verify)),
    }))
}

/// What the auth service said.
enum Verdict {
    Allow(HeaderMap),
    Deny(Reply),
    Unreachable(String),
}

impl ForwardAuth {
    fn auth_request(&self, ctx: &Ctx) -> Request<Full<Bytes>> {
        let body = match self.method {
            Method::POST => ctx.body.clone().unwrap_or_default(),
            _ => Bytes::new(),
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        for name in &self.request_headers {
            if let Some(v) = ctx.req.headers.get(name) {
                h.insert(name.clone(), v.clone());
            }
        }
        // Set last: a client never chooses what the auth service is told
        // about the request.
        let text = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
        h.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(ctx.conn.scheme),
        );
        h.insert("x-forwarded-method", text(ctx.req.method.as_str()));
        h.insert("x-forwarded-host", text(ctx.host_str()));
        let uri = ctx.req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        h.insert("x-forwarded-uri", text(uri));
        h.insert("x-forwarded-for", ctx.conn.remote_ip.clone());
        req
    }
}

async fn ask(
    client: Client<outbound::Connector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    client_headers: Arc<[HeaderName]>,
) -> Verdict {
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| outbound::describe(&e))?;
        let (parts, body) = resp.into_parts();
        if parts.status.is_success() {
            return Ok((parts, Bytes::new()));
        }
        // A refusal stays a refusal whatever its body: one too large to
        // pass on goes to the client without it.
        let body = match Limited::new(body, MAX_AUTH_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Ok::<_, String>((parts, body))
    };
    let (parts, body) = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Verdict::Unreachable("timed out".into()),
        Ok(Err(e)) => return Verdict::Unreachable(e),
        Ok(Ok(answer)) => answer,
    };
    if parts.status.is_success() {
        return Verdict::Allow(parts.headers);
    }
    let mut reply = Reply::new(parts.status).body(body);
    for name in client_headers.iter() {
        for v in parts.headers.get_all(name) {
            reply.headers.append(name.clone(), v.clone());
        }
    }
    Verdict::Deny(reply)
}

impl Plugin for ForwardAuth {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let req = self.auth_request(ctx);
        let upstream_headers = self.upstream_headers.clone();
        let (degrade, on_error) = (self.allow_degradation, self.status_on_error);
        let verdict = ask(
            self.client.clone(),
            req,
            self.timeout,
            self.client_headers.clone(),
        );
        Flow::Await(Box::pin(async move {
            let verdict = verdict.await;
            let resume: Resume = Box::new(move |ctx: &mut Ctx| match verdict {
                Verdict::Allow(headers) => {
                    for name in upstream_headers.iter() {
                        match headers.get(name) {
                            Some(v) => ctx.req.headers.insert(name.clone(), v.clone()),
                            None => ctx.req.headers.remove(name),
                        };
                    }
                    Flow::Continue
                }
                Verdict::Deny(reply) => Flow::Respond(reply),
                Verdict::Unreachable(e) => {
                    tracing::warn!(request_id = ?ctx.request_id, "forward-auth: auth service failed: {e}");
                    if degrade {
                        Flow::Continue
                    } else {
                        Flow::Respond(Reply::new(on_error))
                    }
                }
            });
            resume
        }))
    }

    fn reads_request_body(&self) -> bool {
        self.method == Method::POST
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::errors;

    #[test]
    fn https_is_taken_and_other_schemes_and_a_missing_uri_are_refused() {
        crate::test_util::entry(NAME, json!({"uri": "https://auth", "ssl_verify": false}));
        let other = errors(NAME, json!({"uri": "ftp://auth"}));
        assert_eq!(other[0].path, "uri");
        assert!(!errors(NAME, json!({})).is_empty());
    }
}
