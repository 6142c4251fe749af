//! `http-logger`: POSTs batches of log entries to an HTTP collector, from
//! a background task (see [`crate::logger`]): a JSON array of entries, or
//! one entry per line with `concat_method: new_line`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::outbound;
use turnpike_plugin::{typed, Env, Factory, FieldError, Plugin};

use crate::logger::{self, LogConfig, Logger, Sink};

pub(crate) const NAME: &str = "http-logger";
pub(crate) const PRIORITY: i32 = 410;

fn schema() -> Value {
    let mut props = logger::properties();
    let own = json!({
        "uri": {"type": "string", "pattern": "^https?://"},
        "auth_header": {"type": "string"},
        "timeout": {"type": "integer", "minimum": 1, "default": 3},
        "concat_method": {"type": "string", "enum": ["json", "new_line"], "default": "json"},
        "ssl_verify": {"type": "boolean", "default": false}
    });
    props.extend(own.as_object().cloned().unwrap_or_default());
    json!({
        "type": "object",
        "properties": props,
        "required": ["uri"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    uri: String,
    auth_header: Option<String>,
    timeout: u64,
    concat_method: String,
    ssl_verify: bool,
    #[serde(flatten)]
    log: LogConfig,
}

struct Collector {
    uri: Uri,
    auth: Option<HeaderValue>,
    timeout: Duration,
    json: bool,
    client: Client<outbound::Connector, Full<Bytes>>,
}

impl Sink for Collector {
    fn send<'a>(
        &'a self,
        batch: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let body = if self.json {
                format!("[{}]", batch.join(","))
            } else {
                batch.join("\n")
            };
            let mut req = Request::post(self.uri.clone())
                .header(
                    CONTENT_TYPE,
                    if self.json {
                        "application/json"
                    } else {
                        "text/plain"
                    },
                )
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            if let Some(auth) = &self.auth {
                req.headers_mut().insert(AUTHORIZATION, auth.clone());
            }
            match tokio::time::timeout(self.timeout, self.client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    // Read to the end, so the connection can carry the next batch.
                    let body = Limited::new(resp.into_body(), 64 * 1024);
                    let _ = tokio::time::timeout(self.timeout, body.collect()).await;
                    Ok(())
                }
                Ok(Ok(resp)) => Err(format!("{} answered {}", self.uri, resp.status())),
                Ok(Err(e)) => Err(format!("{}: {}", self.uri, outbound::describe(&e))),
                Err(_) => Err(format!("{}: no answer within {:?}", self.uri, self.timeout)),
            }
        })
    }
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let c: Config = typed(config.clone())?;
    let uri: Uri = crate::http_url(&c.uri, "uri")?;
    let auth = match &c.auth_header {
        Some(a) => Some(
            HeaderValue::from_str(a)
                .map_err(|_| FieldError::new("auth_header", "not a valid header value"))?,
        ),
        None => None,
    };
    let timeout = Duration::from_secs(c.timeout);
    let json = c.concat_method == "json";
    let verify = c.ssl_verify;
    let collector = || Collector {
        uri,
        auth,
        timeout,
        json,
        client: Client::builder(TokioExecutor::new()).build(outbound::connector(verify)),
    };
    Logger::build(NAME, env, &config, &c.log, collector)
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build).with_secrets(&["auth_header"])
}
