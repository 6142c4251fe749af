//! Secret fields of plugin configs (each plugin's [`Factory::secrets`]):
//! masked in every read, kept when a client writes the mask back, and cut
//! out of error messages.
//!
//! [`Factory::secrets`]: turnpike_plugin::Factory::secrets

use serde_json::Value;
use turnpike_plugin::Registry;

/// What a secret reads as.
pub(crate) const MASK: &str = "******";

/// Calls `f` with each secret string field in `value`, by JSON pointer:
/// the secret fields of its plugins, and an SSL's private keys.
fn each_secret(registry: &Registry, value: &mut Value, mut f: impl FnMut(&str, &mut Value)) {
    if value.get("cert").is_some() || value.get("certs").is_some() {
        if let Some(key) = value.get_mut("key").filter(|k| k.is_string()) {
            f("/key", key);
        }
        for (i, key) in value
            .get_mut("keys")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if key.is_string() {
                f(&format!("/keys/{i}"), key);
            }
        }
    }
    let Some(plugins) = value.get_mut("plugins").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, config) in plugins.iter_mut() {
        let secrets = registry.get(name).map_or(&[][..], |f| f.secrets);
        let Some(config) = config.as_object_mut() else {
            continue;
        };
        for (field, v) in config.iter_mut() {
            if v.is_string() && secrets.contains(&field.as_str()) {
                f(
                    &format!(
                        "/plugins/{}/{field}",
                        name.replace('~', "~0").replace('/', "~1")
                    ),
                    v,
                );
            }
        }
    }
}

/// The value as a read shows it.
pub(crate) fn masked(registry: &Registry, value: &Value) -> Value {
    let mut value = value.clone();
    each_secret(registry, &mut value, |_, v| *v = MASK.into());
    value
}

/// A written value whose secrets read as the mask takes them from what is
/// stored: a client may send back what it read.
pub(crate) fn unmask(registry: &Registry, value: &mut Value, stored: Option<&Value>) {
    each_secret(registry, value, |pointer, v| {
        if v.as_str() == Some(MASK) {
            if let Some(old) = stored.and_then(|s| s.pointer(pointer)) {
                *v = old.clone();
            }
        }
    });
}

/// The secrets a value holds, to cut out of messages about it.
pub(crate) fn secrets(registry: &Registry, value: &Value) -> Vec<String> {
    let mut value = value.clone();
    let mut found = Vec::new();
    each_secret(registry, &mut value, |_, v| {
        if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
            found.push(s.to_owned());
        }
    });
    found
}

/// `message` with every secret replaced by the mask: as a quoted JSON
/// string always (validation messages quote values), and bare when it is
/// long enough not to be part of ordinary words.
pub(crate) fn redact(message: &str, secrets: &[String]) -> String {
    let mut message = message.to_owned();
    for s in secrets {
        let quoted = Value::String(s.clone()).to_string();
        message = message.replace(&quoted, &format!("\"{MASK}\""));
        if s.len() >= 6 {
            message = message.replace(s.as_str(), MASK);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_keys_are_masked_and_kept() {
        let registry = Registry::new(Vec::new());
        let stored = serde_json::json!({"cert": "C", "key": "PRIVATE", "keys": ["K2"]});
        let shown = masked(&registry, &stored);
        assert_eq!(
            shown,
            serde_json::json!({"cert": "C", "key": MASK, "keys": [MASK]})
        );
        let mut back = shown.clone();
        unmask(&registry, &mut back, Some(&stored));
        assert_eq!(back, stored);
        assert_eq!(secrets(&registry, &stored), ["PRIVATE", "K2"]);
    }

    #[test]
    fn redaction_spares_words_that_hold_a_short_secret() {
        let secrets = vec!["k".to_string(), "longer-secret".to_string()];
        let m = redact(
            "consumer `jack`: \"k\" is too short; longer-secret",
            &secrets,
        );
        assert_eq!(m, "consumer `jack`: \"******\" is too short; ******");
    }
}
