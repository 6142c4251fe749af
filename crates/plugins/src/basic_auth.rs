//! `basic-auth`: a consumer is recognised by HTTP Basic credentials.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Consumer, Ctx, Env, Factory, FieldError, Flow, Index, Plugin, Reply};

pub(crate) const NAME: &str = "basic-auth";
pub(crate) const PRIORITY: i32 = 2520;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {"hide_credentials": {"type": "boolean", "default": false}},
        "additionalProperties": false
    })
}

fn consumer_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "username": {"type": "string", "minLength": 1},
            "password": {"type": "string"}
        },
        "required": ["username", "password"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    hide_credentials: bool,
}

/// Every consumer's `basic-auth` credential, by user name.
struct Users(HashMap<String, (String, Arc<Consumer>)>);

struct BasicAuth {
    conf: Config,
    users: Arc<Users>,
}

pub(crate) fn factory() -> Factory {
    Factory::auth(NAME, PRIORITY, schema, consumer_schema, build, credentials)
        .with_secrets(&["password"])
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    Ok(Arc::new(BasicAuth {
        conf: typed(config)?,
        users: env.index(NAME)?,
    }))
}

fn credentials(list: &[(Arc<Consumer>, Value)]) -> Result<Index, (usize, FieldError)> {
    let users = crate::credential_index(list, "username", |consumer, cred| {
        let user = cred["username"].as_str().unwrap_or_default().to_owned();
        let password = cred["password"].as_str().unwrap_or_default().to_owned();
        Ok((user, (password, consumer.clone())))
    })?;
    Ok(Arc::new(Users(users)))
}

fn refuse(message: &str) -> Flow {
    Flow::Respond(Reply::message(StatusCode::UNAUTHORIZED, message))
}

/// `Basic dXNlcjpwYXNz` → (`user`, `pass`).
fn decode(header: &str) -> Result<(String, String), &'static str> {
    let mut words = header.split_ascii_whitespace();
    let (Some(scheme), Some(encoded), None) = (words.next(), words.next(), words.next()) else {
        return Err("Invalid authorization header format");
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("Invalid authorization header format");
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "Failed to decode authentication header")?;
    let text = String::from_utf8(raw).map_err(|_| "Failed to decode authentication header")?;
    let (user, pass) = text
        .split_once(':')
        .ok_or("Split authorization err: invalid decoded data")?;
    Ok((user.to_owned(), pass.to_owned()))
}

impl Plugin for BasicAuth {
    fn authenticates(&self) -> bool {
        true
    }

    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        let Some(header) = ctx.header(AUTHORIZATION.as_str()) else {
            let reply =
                Reply::message(StatusCode::UNAUTHORIZED, "Missing authorization in request")
                    .header(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm='.'"),
                    );
            return Flow::Respond(reply);
        };
        let (user, pass) = match decode(header) {
            Ok(pair) => pair,
            Err(message) => return refuse(message),
        };
        match self.users.0.get(&user) {
            Some((password, consumer))
                if turnpike_plugin::same_secret(password.as_bytes(), pass.as_bytes()) =>
            {
                ctx.consumer = Some(consumer.clone());
            }
            _ => return refuse("Invalid user authorization"),
        }
        if self.conf.hide_credentials {
            ctx.req.headers.remove(AUTHORIZATION);
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
            &[("jack", json!({"username": "jack", "password": "s3cret"}))],
        );
        entry_with(NAME, conf, &env)
    }

    fn with_auth(value: &str) -> Ctx {
        request(http::Request::get("/").header("authorization", value))
    }

    #[test]
    fn right_password_finds_the_consumer() {
        let e = plugin(json!({"hide_credentials": true}));
        let mut c = with_auth("Basic amFjazpzM2NyZXQ="); // jack:s3cret
        assert!(run_now(Phase::Rewrite, &e, &mut c).is_none());
        assert_eq!(&*c.consumer.unwrap().username, "jack");
        assert!(!c.req.headers.contains_key("authorization"));
    }

    #[test]
    fn missing_header_asks_for_basic() {
        let r = run_now(Phase::Rewrite, &plugin(json!({})), &mut ctx("/")).unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.headers["www-authenticate"], "Basic realm='.'");
        assert_eq!(
            body(&r),
            json!({"message": "Missing authorization in request"})
        );
    }

    #[test]
    fn wrong_password_unknown_user_and_garbage_get_401() {
        let e = plugin(json!({}));
        for (value, message) in [
            ("Basic amFjazp3cm9uZw==", "Invalid user authorization"), // jack:wrong
            ("Basic YW5uOnMzY3JldA==", "Invalid user authorization"), // ann:s3cret
            ("Bearer x", "Invalid authorization header format"),
            ("Basic !!!", "Failed to decode authentication header"),
        ] {
            let r = run_now(Phase::Rewrite, &e, &mut with_auth(value)).unwrap();
            assert_eq!(r.status, 401);
            assert_eq!(body(&r), json!({"message": message}), "{value}");
        }
    }
}
