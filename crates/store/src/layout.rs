//! How resources sit in a store: one key per resource, `{kind}/{id}`, as
//! APISIX lays them out in etcd. Consumers are keyed by username and their
//! credentials sit under them (`consumers/jack/credentials/c1`).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::{Item, State};

/// Groups values by kind into the lists the config reader takes
/// (`{"routes": [...], ...}`), each with the id its key gives written in:
/// a consumer's `username`, a credential's `{username}/credentials/{id}`.
pub fn resource_lists<'a>(
    values: impl IntoIterator<Item = (&'a String, &'a Value)>,
) -> Map<String, Value> {
    let mut lists: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (key, value) in values {
        let Some((kind, id)) = key.split_once('/') else {
            continue;
        };
        let mut value = value.clone();
        if let Value::Object(fields) = &mut value {
            if kind == "consumers" && !id.contains('/') {
                fields.insert("username".into(), id.into());
            } else {
                fields.insert("id".into(), id.into());
            }
        }
        lists.entry(kind).or_default().push(value);
    }
    lists
        .into_iter()
        .map(|(kind, list)| (kind.to_owned(), Value::Array(list)))
        .collect()
}

/// A state's values by key.
pub fn values(state: &State) -> BTreeMap<String, Value> {
    state
        .items
        .iter()
        .map(|(k, i)| (k.clone(), i.value.clone()))
        .collect()
}

/// The resources of a config file as a store would hold them, at
/// `revision`, for the Admin API to read when the file is the truth.
/// An entry without an id is keyed by its position (1-based).
pub fn file_state(root: &Value, revision: u64) -> State {
    let mut items = BTreeMap::new();
    for (kind, list) in root.as_object().into_iter().flatten() {
        if kind == "gateway" {
            continue;
        }
        for (i, entry) in list.as_array().into_iter().flatten().enumerate() {
            let id = |field: &str| match entry.get(field) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            let id = if kind == "consumers" {
                id("username").or_else(|| id("id"))
            } else {
                id("id")
            };
            let item = Item {
                value: entry.clone(),
                created: revision,
                modified: revision,
            };
            items.insert(
                format!("{kind}/{}", id.unwrap_or_else(|| (i + 1).to_string())),
                item,
            );
        }
    }
    State { revision, items }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_carry_the_ids_keys_give() {
        let values = BTreeMap::from([
            ("routes/1".to_string(), json!({"uri": "/a"})),
            ("consumers/jack".to_string(), json!({})),
            (
                "consumers/jack/credentials/c1".to_string(),
                json!({"plugins": {}}),
            ),
        ]);
        let lists = resource_lists(&values);
        assert_eq!(lists["routes"], json!([{"uri": "/a", "id": "1"}]));
        assert_eq!(
            lists["consumers"],
            json!([{"username": "jack"}, {"plugins": {}, "id": "jack/credentials/c1"}])
        );
    }

    #[test]
    fn file_entries_are_keyed_by_id_or_position() {
        let root = json!({"gateway": {}, "routes": [{"id": 7, "uri": "/a"}, {"uri": "/b"}],
            "consumers": [{"username": "jack"}, {"id": "jack/credentials/c1"}]});
        let state = file_state(&root, 3);
        let keys: Vec<&String> = state.items.keys().collect();
        assert_eq!(
            keys,
            [
                "consumers/jack",
                "consumers/jack/credentials/c1",
                "routes/2",
                "routes/7"
            ]
        );
        assert_eq!(state.items["routes/7"].modified, 3);
    }
}
