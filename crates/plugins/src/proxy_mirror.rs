//! `proxy-mirror`: sends a copy of requests to another service (a new
//! version under test, a traffic recorder) without the client waiting for
//! it or seeing its answer.
//!
//! The copy goes after the request phases (`before_proxy`), with the
//! request's method, headers (as the upstream gets them so far) and body,
//! on a task of its own; its answer is read and dropped. A mirror that is
//! slow or down costs the client nothing: copies give up after
//! `MIRROR_TIMEOUT`, and failures are logged at `debug`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::outbound;
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin};

pub(crate) const NAME: &str = "proxy-mirror";
pub(crate) const PRIORITY: i32 = 1010;

/// How long a mirrored request may take, answer included.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "host": {"type": "string", "pattern": "^https?://[^/]+$"},
            "path": {"type": "string", "pattern": "^/[^?&]*$"},
            "path_concat_mode": {"type": "string", "enum": ["replace", "prefix"], "default": "replace"},
            "sample_ratio": {"type": "number", "minimum": 0.00001, "maximum": 1, "default": 1}
        },
        "required": ["host"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    host: String,
    path: Option<String>,
    path_concat_mode: String,
    sample_ratio: f64,
}

struct ProxyMirror {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    path: Option<String>,
    prefix: bool,
    sample_ratio: f64,
    client: Client<outbound::Connector, Full<Bytes>>,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    Ok(Arc::new(ProxyMirror::new(typed(config)?)?))
}

impl ProxyMirror {
    fn new(c: Config) -> Result<ProxyMirror, FieldError> {
        let uri: Uri = crate::http_url(&c.host, "host")?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| FieldError::new("host", "needs a host, as in http://mirror:8080"))?;
        Ok(ProxyMirror {
            scheme: uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            authority,
            path: c.path,
            prefix: c.path_concat_mode == "prefix",
            sample_ratio: c.sample_ratio,
            // A mirror's certificate is not checked (nginx's
            // `proxy_ssl_verify off`, which APISIX's mirror uses).
            client: Client::builder(TokioExecutor::new()).build(outbound::connector(false)),
        })
    }

    /// The mirror's path and query: the request's, or `path` in its place
    /// (`replace`) or in front of it (`prefix`); the query is kept.
    fn path_and_query(&self, ctx: &Ctx) -> Option<PathAndQuery> {
        let own = &ctx.upstream_uri;
        let path = match (&self.path, self.prefix) {
            (None, _) => own.path().to_owned(),
            (Some(p), false) => p.clone(),
            (Some(p), true) => format!("{}{}", p.trim_end_matches('/'), own.path()),
        };
        let text = match own.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        PathAndQuery::try_from(text).ok()
    }

    fn copy(&self, ctx: &Ctx) -> Option<Request<Full<Bytes>>> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(self.path_and_query(ctx)?)
            .build()
            .ok()?;
        let body = ctx.body.clone().unwrap_or_default();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = ctx.req.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = ctx.req.headers.clone();
        // Framing and the host are the mirror's own.
        let headers = req.headers_mut();
        headers.remove(http::header::HOST);
        headers.remove(http::header::TRANSFER_ENCODING);
        headers.remove(http::header::CONTENT_LENGTH);
        Some(req)
    }
}

impl Plugin for ProxyMirror {
    fn before_proxy(&self, ctx: &mut Ctx) -> Flow {
        if self.sample_ratio < 1.0 && fastrand::f64() >= self.sample_ratio {
            return Flow::Continue;
        }
        let Some(req) = self.copy(ctx) else {
            return Flow::Continue;
        };
        let client = self.client.clone();
        let request_id = ctx.request_id.clone();
        tokio::spawn(async move {
            let exchange = async {
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| outbound::describe(&e))?;
                // Read to the end, piece by piece and kept nowhere, so the
                // connection can be reused.
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    frame.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            };
            match tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(request_id = ?request_id, "proxy-mirror: {e}"),
                Err(_) => tracing::debug!(request_id = ?request_id, "proxy-mirror: timed out"),
            }
        });
        Flow::Continue
    }

    fn reads_request_body(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn mirror(conf: Value) -> ProxyMirror {
        let mut full = json!({"path_concat_mode": "replace", "sample_ratio": 1});
        full.as_object_mut()
            .unwrap()
            .extend(conf.as_object().unwrap().clone());
        let c: Config = typed(full).unwrap();
        ProxyMirror::new(c).unwrap()
    }

    fn copied(conf: Value, uri: &str) -> Request<Full<Bytes>> {
        let mut c = request(http::Request::post(uri).header("x-a", "1"));
        c.body = Some(Bytes::from_static(b"payload"));
        mirror(conf).copy(&c).unwrap()
    }

    #[test]
    fn the_copy_keeps_method_headers_body_and_query() {
        let r = copied(json!({"host": "http://m:81"}), "/orders?id=7");
        assert_eq!(r.method(), http::Method::POST);
        assert_eq!(r.uri().to_string(), "http://m:81/orders?id=7");
        assert_eq!(r.headers()["x-a"], "1");
        assert!(!r.headers().contains_key("host"));
    }

    #[test]
    fn paths_replace_or_prefix() {
        let r = copied(
            json!({"host": "http://m", "path": "/shadow"}),
            "/orders?id=7",
        );
        assert_eq!(r.uri().to_string(), "http://m/shadow?id=7");
        let r = copied(
            json!({"host": "http://m", "path": "/v2/", "path_concat_mode": "prefix"}),
            "/orders",
        );
        assert_eq!(r.uri().to_string(), "http://m/v2/orders");
    }

    #[test]
    fn https_mirrors_keep_their_scheme_and_bad_hosts_and_paths_are_refused() {
        let r = copied(json!({"host": "https://m:81"}), "/orders");
        assert_eq!(r.uri().to_string(), "https://m:81/orders");
        assert_eq!(errors(NAME, json!({"host": "ftp://m"}))[0].path, "host");
        assert_eq!(errors(NAME, json!({"host": "http://m/p"}))[0].path, "host");
        assert_eq!(
            errors(NAME, json!({"host": "http://m", "path": "a"}))[0].path,
            "path"
        );
    }
}
