//! `ip-restriction`: admits or refuses clients by address or CIDR range.

use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Plugin, Reply};

pub(crate) const NAME: &str = "ip-restriction";
pub(crate) const PRIORITY: i32 = 3000;

fn schema() -> Value {
    let list = json!({"type": "array", "minItems": 1, "items": {"type": "string"}});
    json!({
        "type": "object",
        "properties": {
            "whitelist": list,
            "blacklist": list,
            "message": {"type": "string", "minLength": 1, "maxLength": 1024, "default": "Your IP address is not allowed"},
            "response_code": {"type": "integer", "minimum": 403, "maximum": 404, "default": 403}
        },
        "oneOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    whitelist: Option<Vec<String>>,
    blacklist: Option<Vec<String>>,
    message: String,
    response_code: u16,
}

struct IpRestriction {
    allow: bool,
    nets: Vec<IpNet>,
    message: String,
    status: StatusCode,
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
}

fn build(config: Value, _env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let conf: Config = typed(config)?;
    let (allow, field, list) = match (conf.whitelist, conf.blacklist) {
        (Some(w), _) => (true, "whitelist", w),
        (None, Some(b)) => (false, "blacklist", b),
        (None, None) => return Err(FieldError::new("", "set `whitelist` or `blacklist`")),
    };
    let nets = list
        .iter()
        .enumerate()
        .map(|(i, s)| {
            net(s).ok_or_else(|| {
                FieldError::new(
                    format!("{field}[{i}]"),
                    format!("`{s}` is not an IP address or CIDR range"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Arc::new(IpRestriction {
        allow,
        nets,
        message: conf.message,
        status: StatusCode::from_u16(conf.response_code).unwrap_or(StatusCode::FORBIDDEN),
    }))
}

fn net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl Plugin for IpRestriction {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let ip = ctx.conn.remote.ip();
        let listed = self.nets.iter().any(|n| n.contains(&ip));
        if listed == self.allow {
            Flow::Continue
        } else {
            Flow::Respond(Reply::message(self.status, &self.message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use turnpike_plugin::Phase;

    #[test]
    fn whitelist_and_blacklist() {
        let allow = entry(NAME, json!({"whitelist": ["10.0.0.0/24", "::1"]}));
        assert!(run_now(Phase::Access, &allow, &mut ctx("/")).is_none());
        let deny = entry(NAME, json!({"blacklist": ["10.0.0.1"], "message": "no"}));
        let r = run_now(Phase::Access, &deny, &mut ctx("/")).unwrap();
        assert_eq!(
            (r.status.as_u16(), body(&r)),
            (403, json!({"message": "no"}))
        );
        let other = entry(NAME, json!({"whitelist": ["192.168.0.0/16"]}));
        let r = run_now(Phase::Access, &other, &mut ctx("/")).unwrap();
        assert_eq!(
            body(&r),
            json!({"message": "Your IP address is not allowed"})
        );
    }

    #[test]
    fn bad_ranges_and_both_lists_are_refused() {
        let e = errors(NAME, json!({"whitelist": ["10.0.0.0/33"]}));
        assert_eq!(e[0].path, "whitelist[0]");
        assert!(!errors(
            NAME,
            json!({"whitelist": ["1.1.1.1"], "blacklist": ["2.2.2.2"]})
        )
        .is_empty());
    }
}
