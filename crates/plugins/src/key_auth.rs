//! `key-auth`: a consumer is recognised by an API key in a header or a
//! query argument.

use std::collections::HashMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Consumer, Ctx, Env, Factory, FieldError, Flow, Index, Plugin, Reply};

pub(crate) const NAME: &str = "key-auth";
pub(crate) const PRIORITY: i32 = 2500;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "header": {"type": "string", "minLength": 1, "default": "apikey"},
            "query": {"type": "string", "minLength": 1, "default": "apikey"},
            "hide_credentials": {"type": "boolean", "default": false}
        },
        "additionalProperties": false
    })
}

fn consumer_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"key": {"type": "string", "minLength": 1}},
        "required": ["key"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    header: String,
    query: String,
    hide_credentials: bool,
}

/// Keys of every consumer's `key-auth` credential.
struct Keys(HashMap<String, Arc<Consumer>>);

struct KeyAuth {
    conf: Config,
    keys: Arc<Keys>,
}

pub(crate) fn factory() -> Factory {
    Factory::auth(NAME, PRIORITY, schema, consumer_schema, build, credentials)
        .with_secrets(&["key"])
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let conf: Config = typed(config)?;
    crate::header_name(&conf.header, "header")?;
    Ok(Arc::new(KeyAuth {
        conf,
        keys: env.index(NAME)?,
    }))
}

fn credentials(list: &[(Arc<Consumer>, Value)]) -> Result<Index, (usize, FieldError)> {
    let keys = crate::credential_index(list, "key", |consumer, cred| {
        let key = cred["key"].as_str().unwrap_or_default().to_owned();
        Ok((key, consumer.clone()))
    })?;
    Ok(Arc::new(Keys(keys)))
}

impl KeyAuth {
    /// The consumer the request's key belongs to, and whether the key came
    /// in the header; `Err` is the 401 to answer.
    fn consumer(&self, ctx: &Ctx) -> Result<(Arc<Consumer>, bool), &'static str> {
        let found = |key: &str| self.keys.0.get(key).cloned();
        if let Some(key) = ctx.header(&self.conf.header) {
            return found(key)
                .map(|c| (c, true))
                .ok_or("Invalid API key in request");
        }
        match ctx.query_arg(&self.conf.query) {
            Some(key) => found(&key)
                .map(|c| (c, false))
                .ok_or("Invalid API key in request"),
            None => Err("Missing API key in request"),
        }
    }
}

impl Plugin for KeyAuth {
    fn authenticates(&self) -> bool {
        true
    }

    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        let (consumer, from_header) = match self.consumer(ctx) {
            Ok(found) => found,
            Err(message) => {
                return Flow::Respond(Reply::message(StatusCode::UNAUTHORIZED, message))
            }
        };
        ctx.consumer = Some(consumer);
        if self.conf.hide_credentials {
            if from_header {
                ctx.req.headers.remove(self.conf.header.as_str());
            } else {
                crate::hide_query_arg(ctx, &self.conf.query);
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    fn plugin(conf: Value) -> turnpike_plugin::Entry {
        let env = env(
            NAME,
            &[
                ("jack", json!({"key": "k-jack"})),
                ("rose", json!({"key": "k-rose"})),
            ],
        );
        entry_with(NAME, conf, &env)
    }

    #[test]
    fn header_key_finds_the_consumer() {
        let e = plugin(json!({}));
        let mut c = request(http::Request::get("/").header("apikey", "k-rose"));
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(&*c.consumer.unwrap().username, "rose");
    }

    #[test]
    fn query_key_and_hidden_credentials() {
        let e = plugin(json!({"query": "key", "hide_credentials": true}));
        let mut c = ctx("/x?key=k-jack&a=1");
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(&*c.consumer.as_ref().unwrap().username, "jack");
        assert_eq!(c.upstream_uri.as_str(), "/x?a=1");
    }

    #[test]
    fn header_hidden_from_upstream() {
        let e = plugin(json!({"header": "X-Key", "hide_credentials": true}));
        let mut c = request(http::Request::get("/").header("x-key", "k-jack"));
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert!(!c.req.headers.contains_key("x-key"));
    }

    #[test]
    fn missing_and_wrong_keys_get_401() {
        let e = plugin(json!({}));
        let r = run_now(Phase::Rewrite, &e, &mut ctx("/")).unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(body(&r), json!({"message": "Missing API key in request"}));
        let mut c = request(http::Request::get("/").header("apikey", "nope"));
        let r = run_now(Phase::Rewrite, &e, &mut c).unwrap();
        assert_eq!(body(&r), json!({"message": "Invalid API key in request"}));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let r = crate::registry();
        let list = vec![
            (consumer("a"), json!({"key": "same"})),
            (consumer("b"), json!({"key": "same"})),
        ];
        let mut all = HashMap::new();
        all.insert(NAME, list);
        let (_, errs) = r.indexes(all);
        assert_eq!(&*errs[0].0.username, "b");
        assert!(errs[0].2.message.contains("duplicate"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = errors(NAME, json!({"hedaer": "x"}));
        assert!(e[0].message.contains("hedaer"), "{e:?}");
    }
}
