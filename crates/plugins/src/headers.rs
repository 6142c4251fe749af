//! Header edits shared by `proxy-rewrite` and `response-rewrite`: APISIX's
//! `{"add": {…}, "set": {…}, "remove": […]}`, or the older flat map where
//! every key is set (and an empty value removes).

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};
use turnpike_plugin::{Ctx, FieldError, Template};

/// The schema of a `headers` field.
pub(crate) fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "add": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
            "set": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
            "remove": {"type": "array", "items": {"type": "string"}}
        }
    })
}

/// One header value, fixed or with `$variables` to expand per request.
#[derive(Debug, Clone)]
enum Text {
    Fixed(HeaderValue),
    Template(Template),
}

#[derive(Debug, Default, Clone)]
pub(crate) struct HeaderOps {
    add: Vec<(HeaderName, Text)>,
    set: Vec<(HeaderName, Text)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Reads a checked `headers` value; `path` names it in errors.
    pub(crate) fn parse(value: Option<&Value>, path: &str) -> Result<HeaderOps, FieldError> {
        let mut ops = HeaderOps::default();
        let Some(Value::Object(map)) = value else {
            return Ok(ops);
        };
        let ops_named = |k: &String| matches!(k.as_str(), "add" | "set" | "remove");
        let structured = map.keys().any(ops_named);
        if let Some(other) = map.keys().find(|k| structured && !ops_named(k)) {
            return Err(FieldError::new(
                format!("{path}.{other}"),
                "unknown field (known: add, set, remove)",
            ));
        }
        if !structured {
            for (k, v) in map {
                let name = name(k, &format!("{path}.{k}"))?;
                match text(v, &format!("{path}.{k}"))? {
                    Text::Fixed(f) if f.is_empty() => ops.remove.push(name),
                    t => ops.set.push((name, t)),
                }
            }
            return Ok(ops);
        }
        for (kind, list) in [("add", &mut ops.add), ("set", &mut ops.set)] {
            if let Some(Value::Object(m)) = map.get(kind) {
                for (k, v) in m {
                    let at = format!("{path}.{kind}.{k}");
                    list.push((name(k, &at)?, text(v, &at)?));
                }
            }
        }
        if let Some(Value::Array(names)) = map.get("remove") {
            for (i, n) in names.iter().enumerate() {
                let n = n.as_str().unwrap_or_default();
                ops.remove.push(name(n, &format!("{path}.remove[{i}]"))?);
            }
        }
        Ok(ops)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits in APISIX's order: add, set, remove.
    pub(crate) fn apply(&self, ctx: &Ctx, headers: &mut HeaderMap) {
        for (n, t) in &self.add {
            if let Some(v) = value(ctx, t) {
                headers.append(n.clone(), v);
            }
        }
        for (n, t) in &self.set {
            if let Some(v) = value(ctx, t) {
                headers.insert(n.clone(), v);
            }
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

fn value(ctx: &Ctx, t: &Text) -> Option<HeaderValue> {
    match t {
        Text::Fixed(v) => Some(v.clone()),
        Text::Template(t) => HeaderValue::from_str(&ctx.render(t)).ok(),
    }
}

fn name(k: &str, path: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(k.as_bytes())
        .map_err(|_| FieldError::new(path, format!("`{k}` is not a valid header name")))
}

fn text(v: &Value, path: &str) -> Result<Text, FieldError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(FieldError::new(path, "must be a string or a number")),
    };
    let template = crate::template(&s, path)?;
    let Some(fixed) = template.fixed() else {
        return Ok(Text::Template(template));
    };
    HeaderValue::from_str(&fixed)
        .map(Text::Fixed)
        .map_err(|_| FieldError::new(path, "not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::ctx;

    #[test]
    fn structured_edits_apply_in_order() {
        let ops = HeaderOps::parse(
            Some(&json!({"add": {"x-a": "1"}, "set": {"x-b": "$remote_addr"}, "remove": ["x-c"]})),
            "headers",
        )
        .unwrap();
        let c = ctx("/");
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("0"));
        h.insert("x-c", HeaderValue::from_static("gone"));
        ops.apply(&c, &mut h);
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(h["x-b"], "10.0.0.1");
        assert!(!h.contains_key("x-c"));
    }

    #[test]
    fn flat_map_sets_and_empty_removes() {
        let ops = HeaderOps::parse(Some(&json!({"x-a": "1", "x-b": ""})), "headers").unwrap();
        let c = ctx("/");
        let mut h = HeaderMap::new();
        h.insert("x-b", HeaderValue::from_static("old"));
        ops.apply(&c, &mut h);
        assert_eq!(h["x-a"], "1");
        assert!(!h.contains_key("x-b"));
    }

    #[test]
    fn typos_and_unknown_variables_are_named() {
        let e = HeaderOps::parse(Some(&json!({"set": {"a": "1"}, "remov": ["b"]})), "headers")
            .unwrap_err();
        assert_eq!(e.path, "headers.remov");
        let e =
            HeaderOps::parse(Some(&json!({"set": {"a": "$remote_adr"}})), "headers").unwrap_err();
        assert_eq!(e.path, "headers.set.a");
    }

    #[test]
    fn bad_names_are_named() {
        let e = HeaderOps::parse(Some(&json!({"set": {"bad name": "1"}})), "headers").unwrap_err();
        assert_eq!(e.path, "headers.set.bad name");
    }
}
