//! `jwt-auth`: a consumer is recognised by a signed JSON Web Token.
//!
//! The token names its consumer in a claim (`key` by default); the
//! consumer's credential fixes the algorithm and the key. The token's own
//! `alg` header must equal it, so `alg: none` and a token signed HS256 with
//! an RSA public key as the secret are refused.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Consumer, Ctx, Env, Factory, FieldError, Flow, Index, Plugin, Reply};

pub(crate) const NAME: &str = "jwt-auth";
pub(crate) const PRIORITY: i32 = 2510;

/// Clock skew allowed on `exp` and `nbf` beyond `lifetime_grace_period`.
const LEEWAY_SECS: u64 = 5;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "header": {"type": "string", "minLength": 1, "default": "authorization"},
            "query": {"type": "string", "minLength": 1, "default": "jwt"},
            "cookie": {"type": "string", "minLength": 1, "default": "jwt"},
            "hide_credentials": {"type": "boolean", "default": false},
            "key_claim_name": {"type": "string", "minLength": 1, "default": "key"}
        },
        "additionalProperties": false
    })
}

fn consumer_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "key": {"type": "string", "minLength": 1},
            "secret": {"type": "string", "minLength": 1},
            "public_key": {"type": "string", "minLength": 1},
            "algorithm": {"type": "string", "enum": ["HS256", "HS512", "RS256", "ES256"], "default": "HS256"},
            "exp": {"type": "integer", "minimum": 1, "default": 86400},
            "base64_secret": {"type": "boolean", "default": false},
            "lifetime_grace_period": {"type": "integer", "minimum": 0, "default": 0}
        },
        "required": ["key"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    header: String,
    query: String,
    cookie: String,
    hide_credentials: bool,
    key_claim_name: String,
}

#[derive(Deserialize)]
struct Credential {
    key: String,
    secret: Option<String>,
    public_key: Option<String>,
    algorithm: String,
    base64_secret: bool,
    lifetime_grace_period: u64,
}

/// What verifies one consumer's tokens.
struct Verifier {
    consumer: Arc<Consumer>,
    key: DecodingKey,
    validation: Validation,
}

struct Keys(HashMap<String, Verifier>);

struct JwtAuth {
    conf: Config,
    keys: Arc<Keys>,
}

pub(crate) fn factory() -> Factory {
    Factory::auth(NAME, PRIORITY, schema, consumer_schema, build, credentials)
        .with_secrets(&["secret", "private_key"])
}

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let conf: Config = typed(config)?;
    crate::header_name(&conf.header, "header")?;
    Ok(Arc::new(JwtAuth {
        conf,
        keys: env.index(NAME)?,
    }))
}

fn credentials(list: &[(Arc<Consumer>, Value)]) -> Result<Index, (usize, FieldError)> {
    let keys = crate::credential_index(list, "key", |consumer, cred| {
        let cred: Credential = typed(cred.clone())?;
        let verifier = verifier(consumer.clone(), &cred)?;
        Ok((cred.key, verifier))
    })?;
    Ok(Arc::new(Keys(keys)))
}

fn verifier(consumer: Arc<Consumer>, cred: &Credential) -> Result<Verifier, FieldError> {
    let (alg, key) = match cred.algorithm.as_str() {
        "HS256" | "HS512" => {
            let alg = if cred.algorithm == "HS256" {
                Algorithm::HS256
            } else {
                Algorithm::HS512
            };
            let secret = cred
                .secret
                .as_deref()
                .ok_or_else(|| FieldError::new("secret", "required for HS256 and HS512"))?;
            let bytes = if cred.base64_secret {
                base64::engine::general_purpose::STANDARD
                    .decode(secret)
                    .map_err(|_| {
                        FieldError::new("secret", "not valid base64 (base64_secret is true)")
                    })?
            } else {
                secret.as_bytes().to_vec()
            };
            (alg, DecodingKey::from_secret(&bytes))
        }
        alg => {
            let pem = cred
                .public_key
                .as_deref()
                .ok_or_else(|| FieldError::new("public_key", "required for RS256 and ES256"))?;
            let parsed = if alg == "RS256" {
                DecodingKey::from_rsa_pem(pem.as_bytes()).map(|k| (Algorithm::RS256, k))
            } else {
                DecodingKey::from_ec_pem(pem.as_bytes()).map(|k| (Algorithm::ES256, k))
            };
            parsed.map_err(|e| {
                FieldError::new(
                    "public_key",
                    format!("not a valid {alg} public key in PEM: {e}"),
                )
            })?
        }
    };
    let mut validation = Validation::new(alg);
    validation.leeway = cred.lifetime_grace_period + LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    Ok(Verifier {
        consumer,
        key,
        validation,
    })
}

fn refuse(message: &str) -> Flow {
    Flow::Respond(Reply::message(StatusCode::UNAUTHORIZED, message))
}

/// Where the token came from, for `hide_credentials`.
enum Source {
    Header,
    Query,
    Cookie,
}

impl JwtAuth {
    fn token(&self, ctx: &Ctx) -> Option<(String, Source)> {
        if let Some(h) = ctx.header(&self.conf.header) {
            let token = match h.get(..7) {
                Some(p) if p.eq_ignore_ascii_case("bearer ") => &h[7..],
                _ => h,
            };
            return Some((token.trim().to_owned(), Source::Header));
        }
        if let Some(q) = ctx.query_arg(&self.conf.query) {
            return Some((q.into_owned(), Source::Query));
        }
        ctx.cookie(&self.conf.cookie)
            .map(|c| (c.to_owned(), Source::Cookie))
    }

    fn hide(&self, ctx: &mut Ctx, source: Source) {
        match source {
            Source::Header => {
                ctx.req.headers.remove(self.conf.header.as_str());
            }
            Source::Query => crate::hide_query_arg(ctx, &self.conf.query),
            // Cookies stay: removing one from a Cookie header is not worth
            // the risk of mangling the others.
            Source::Cookie => {}
        }
    }
}

/// The claims, read without verifying, to learn whose key signs the token.
fn unverified_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&raw).ok()
}

impl Plugin for JwtAuth {
    fn authenticates(&self) -> bool {
        true
    }

    fn rewrite(&self, ctx: &mut Ctx) -> Flow {
        let Some((token, source)) = self.token(ctx) else {
            return refuse("Missing JWT token in request");
        };
        let Some(claims) = unverified_claims(&token) else {
            return refuse("JWT token invalid");
        };
        let Some(key) = claims
            .get(&self.conf.key_claim_name)
            .and_then(Value::as_str)
        else {
            return refuse("missing user key in JWT token");
        };
        let Some(v) = self.keys.0.get(key) else {
            return refuse("Invalid user key in JWT token");
        };
        if let Err(e) = jsonwebtoken::decode::<Value>(&token, &v.key, &v.validation) {
            tracing::debug!(request_id = ?ctx.request_id, "jwt refused: {e}");
            return refuse("failed to verify jwt");
        }
        ctx.consumer = Some(v.consumer.clone());
        if self.conf.hide_credentials {
            self.hide(ctx, source);
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use turnpike_plugin::Phase;

    const RSA_PRIVATE: &str = include_str!("testdata/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("testdata/rsa_public.pem");
    const EC_PRIVATE: &str = include_str!("testdata/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("testdata/ec_public.pem");

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn plugin() -> turnpike_plugin::Entry {
        let env = env(
            NAME,
            &[
                ("hs", json!({"key": "hs-key", "secret": "my-secret"})),
                (
                    "hs512",
                    json!({"key": "hs512-key", "secret": "bXktc2VjcmV0", "base64_secret": true, "algorithm": "HS512"}),
                ),
                (
                    "rs",
                    json!({"key": "rs-key", "public_key": RSA_PUBLIC, "algorithm": "RS256"}),
                ),
                (
                    "es",
                    json!({"key": "es-key", "public_key": EC_PUBLIC, "algorithm": "ES256"}),
                ),
            ],
        );
        entry_with(NAME, json!({}), &env)
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
        encode(&Header::new(alg), &claims, key).unwrap()
    }

    fn hs(claims: Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"my-secret"),
            claims,
        )
    }

    fn check(token: &str) -> Result<String, Value> {
        let mut c =
            request(http::Request::get("/").header("authorization", format!("Bearer {token}")));
        match run_now(Phase::Rewrite, &plugin(), &mut c) {
            None => Ok(c.consumer.unwrap().username.to_string()),
            Some(r) => {
                assert_eq!(r.status, 401);
                Err(body(&r)["message"].clone())
            }
        }
    }

    #[test]
    fn every_algorithm_verifies() {
        let exp = now() + 60;
        assert_eq!(
            check(&hs(json!({"key": "hs-key", "exp": exp}))).unwrap(),
            "hs"
        );
        let t = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(b"my-secret"),
            json!({"key": "hs512-key"}),
        );
        assert_eq!(check(&t).unwrap(), "hs512");
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        assert_eq!(
            check(&sign(
                Algorithm::RS256,
                &rsa,
                json!({"key": "rs-key", "exp": exp})
            ))
            .unwrap(),
            "rs"
        );
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        assert_eq!(
            check(&sign(Algorithm::ES256, &ec, json!({"key": "es-key"}))).unwrap(),
            "es"
        );
    }

    #[test]
    fn bad_signature_expired_and_not_yet_valid_are_refused() {
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"guess"),
            json!({"key": "hs-key"}),
        );
        assert_eq!(check(&forged).unwrap_err(), "failed to verify jwt");
        let expired = hs(json!({"key": "hs-key", "exp": now() - 60}));
        assert_eq!(check(&expired).unwrap_err(), "failed to verify jwt");
        let early = hs(json!({"key": "hs-key", "nbf": now() + 60}));
        assert_eq!(check(&early).unwrap_err(), "failed to verify jwt");
        // Within the leeway both pass.
        assert!(check(&hs(
            json!({"key": "hs-key", "exp": now() - 1, "nbf": now() + 1})
        ))
        .is_ok());
    }

    #[test]
    fn alg_none_is_refused() {
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"key":"hs-key"}"#);
        assert_eq!(
            check(&format!("{header}.{claims}.")).unwrap_err(),
            "failed to verify jwt"
        );
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        let t = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
            json!({"key": "rs-key"}),
        );
        assert_eq!(check(&t).unwrap_err(), "failed to verify jwt");
    }

    #[test]
    fn missing_garbled_and_unknown_tokens() {
        let r = run_now(Phase::Rewrite, &plugin(), &mut ctx("/")).unwrap();
        assert_eq!(body(&r)["message"], "Missing JWT token in request");
        assert_eq!(check("not-a-token").unwrap_err(), "JWT token invalid");
        assert_eq!(
            check(&hs(json!({"sub": "x"}))).unwrap_err(),
            "missing user key in JWT token"
        );
        assert_eq!(
            check(&hs(json!({"key": "who"}))).unwrap_err(),
            "Invalid user key in JWT token"
        );
    }

    #[test]
    fn token_from_query_and_cookie() {
        let t = hs(json!({"key": "hs-key"}));
        let mut c = ctx(&format!("/?jwt={t}"));
        assert!(run_now(Phase::Rewrite, &plugin(), &mut c).is_none());
        let mut c = request(http::Request::get("/").header("cookie", format!("a=1; jwt={t}")));
        assert!(run_now(Phase::Rewrite, &plugin(), &mut c).is_none());
    }

    #[test]
    fn credentials_without_their_key_material_are_refused() {
        let r = crate::registry();
        let mut all = HashMap::new();
        let cred = r
            .check_credential(NAME, &json!({"key": "k", "algorithm": "RS256"}))
            .unwrap();
        all.insert(NAME, vec![(consumer("x"), cred)]);
        let (_, errs) = r.indexes(all);
        assert_eq!(errs[0].2.path, "public_key");
    }
}
