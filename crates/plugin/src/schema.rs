//! JSON Schema helpers: defaults filled from the schema, so the schema is
//! the one place a default is written (and what the Admin API shows).

use serde_json::Value;

/// Fills in `default`s from `schema` for properties `value` leaves out,
/// recursing into nested objects and arrays of objects.
pub fn fill_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                return;
            };
            for (name, sub) in props {
                match map.get_mut(name) {
                    Some(v) => fill_defaults(sub, v),
                    None => {
                        if let Some(d) = sub.get("default") {
                            map.insert(name.clone(), d.clone());
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for v in items {
                    fill_defaults(item, v);
                }
            }
        }
        _ => {}
    }
}

/// A JSON pointer (`/headers/set/0`) as the field path our errors use
/// (`headers.set[0]`).
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_nested_objects_and_arrays() {
        let schema = json!({"type": "object", "properties": {
            "a": {"type": "integer", "default": 5},
            "o": {"type": "object", "properties": {"b": {"default": "x"}}},
            "list": {"type": "array", "items": {"type": "object", "properties": {"c": {"default": true}}}}
        }});
        let mut v = json!({"o": {}, "list": [{}, {"c": false}]});
        fill_defaults(&schema, &mut v);
        assert_eq!(
            v,
            json!({"a": 5, "o": {"b": "x"}, "list": [{"c": true}, {"c": false}]})
        );
    }

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(pointer_to_path("/headers/set/X-A"), "headers.set.X-A");
        assert_eq!(pointer_to_path("/regex_uri/1"), "regex_uri[1]");
        assert_eq!(pointer_to_path(""), "");
    }
}
