//! The config file: `gateway:` node settings plus resources in APISIX's
//! standalone format. An APISIX `apisix.yaml` (no `gateway:` key, a trailing
//! `#END` comment) reads as it is.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::gateway::Gateway;
use crate::model::{Consumer, Id, Opaque, Route, Service, Upstream};
use crate::ConfigError;

/// Every resource kind, with the name used in the file, the etcd key and the
/// Admin API path, and the singular used in messages.
pub const KINDS: [(&str, &str); 9] = [
    ("routes", "route"),
    ("services", "service"),
    ("upstreams", "upstream"),
    ("consumers", "consumer"),
    ("consumer_groups", "consumer group"),
    ("plugin_configs", "plugin config"),
    ("global_rules", "global rule"),
    ("ssls", "ssl"),
    ("plugin_metadata", "plugin metadata"),
];

/// Whether a store key (`routes/1`) names a kind this build reads; others
/// (APISIX's `stream_routes`, `protos`, …) are left alone.
pub fn known_kind(key: &str) -> bool {
    let kind = key.split('/').next().unwrap_or_default();
    KINDS.iter().any(|k| k.0 == kind)
}

/// The resources of one configuration, as written.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub routes: Vec<Route>,
    pub services: Vec<Service>,
    pub upstreams: Vec<Upstream>,
    pub consumers: Vec<Consumer>,
    pub consumer_groups: Vec<Opaque>,
    pub plugin_configs: Vec<Opaque>,
    pub global_rules: Vec<Opaque>,
    pub ssls: Vec<Opaque>,
    pub plugin_metadata: Vec<Opaque>,
}

/// A parsed config file.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub gateway: Gateway,
    pub resources: Resources,
    /// Fields that were read but are not known, as `resource: path` lines.
    pub warnings: Vec<String>,
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<ConfigFile, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError::new(
            "file",
            "",
            format!("cannot read {}: {e}", path.display()),
        )]
    })?;
    parse(&text)
}

/// Parses config text (YAML or JSON).
pub fn parse(text: &str) -> Result<ConfigFile, Vec<ConfigError>> {
    let root: Value = serde_yaml::from_str(text)
        .map_err(|e| vec![ConfigError::new("file", "", e.to_string())])?;
    let root = match root {
        Value::Null => serde_json::Map::new(),
        Value::Object(map) => map,
        _ => {
            return Err(vec![ConfigError::new(
                "file",
                "",
                "the top level must be a mapping",
            )])
        }
    };
    let mut reader = Reader::default();
    let mut file = ConfigFile::default();
    for (key, value) in root {
        if key == "gateway" {
            if let Some(g) = reader.one::<Gateway>("gateway", "", value) {
                file.gateway = g;
            }
        } else {
            reader.resource(&mut file.resources, &key, value);
        }
    }
    if reader.errors.is_empty() {
        file.warnings = reader.warnings;
        Ok(file)
    } else {
        Err(reader.errors)
    }
}

/// The file's text as JSON, unchecked: for the Admin API to show the
/// file's resources, and to import them into a store.
pub fn parse_raw(text: &str) -> Result<Value, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::new("file", "", e.to_string()))
}

/// Reads resource lists given as `{"routes": [...], ...}`: a store's
/// entries gathered by kind. Errors and warnings read as the file's do.
pub fn read_resources(
    lists: serde_json::Map<String, Value>,
) -> Result<(Resources, Vec<String>), Vec<ConfigError>> {
    let mut reader = Reader::default();
    let mut resources = Resources::default();
    for (key, value) in lists {
        reader.resource(&mut resources, &key, value);
    }
    if reader.errors.is_empty() {
        Ok((resources, reader.warnings))
    } else {
        Err(reader.errors)
    }
}

#[derive(Default)]
struct Reader {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Reader {
    fn resource(&mut self, res: &mut Resources, key: &str, value: Value) {
        match key {
            "routes" => res.routes = self.list(key, value),
            "services" => res.services = self.list(key, value),
            "upstreams" => res.upstreams = self.list(key, value),
            "consumers" => res.consumers = self.list(key, value),
            "consumer_groups" => res.consumer_groups = self.list(key, value),
            "plugin_configs" => res.plugin_configs = self.list(key, value),
            "global_rules" => res.global_rules = self.list(key, value),
            "ssls" => res.ssls = self.list(key, value),
            "plugin_metadata" => res.plugin_metadata = self.list(key, value),
            other => self.errors.push(ConfigError::new(
                "file",
                other,
                "unknown top-level key (expected `gateway` or a resource list: routes, services, upstreams, \
                 consumers, consumer_groups, plugin_configs, global_rules, ssls, plugin_metadata)",
            )),
        }
    }

    fn list<T: DeserializeOwned>(&mut self, kind: &str, value: Value) -> Vec<T> {
        let Value::Array(items) = value else {
            if !value.is_null() {
                self.errors
                    .push(ConfigError::new("file", kind, "must be a list"));
            }
            return Vec::new();
        };
        let singular = singular(kind);
        items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let label = resource_label(singular, &item, i);
                self.one(&label, "", item)
            })
            .collect()
    }

    /// Deserialises one value, recording the field path of an error and
    /// every field that was not understood.
    fn one<T: DeserializeOwned>(&mut self, label: &str, base: &str, value: Value) -> Option<T> {
        let mut ignored = Vec::new();
        let mut note = |path: serde_ignored::Path<'_>| ignored.push(path.to_string());
        let result = serde_path_to_error::deserialize::<_, T>(serde_ignored::Deserializer::new(
            value, &mut note,
        ));
        for path in ignored {
            self.warnings
                .push(format!("{label}: {path}: unknown field, ignored"));
        }
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                let path = join(base, &e.path().to_string());
                self.errors
                    .push(ConfigError::new(label, path, clean(e.inner().to_string())));
                None
            }
        }
    }
}

fn join(base: &str, path: &str) -> String {
    match (base, path) {
        ("", "." | "") => String::new(),
        ("", p) => p.to_owned(),
        (b, "." | "") => b.to_owned(),
        (b, p) => format!("{b}.{p}"),
    }
}

/// serde's untagged-enum message says nothing useful; say what is expected.
fn clean(message: String) -> String {
    if message.starts_with("data did not match any variant of untagged enum Nodes") {
        "`nodes` must be a map {\"host:port\": weight} or a list of {host, port, weight}".into()
    } else {
        message
    }
}

fn singular(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|k| k.0 == kind)
        .map_or("resource", |k| k.1)
}

/// `route 7` when the item has a readable id, else `route #3` (1-based position).
fn resource_label(singular: &str, item: &Value, index: usize) -> String {
    let id = item.get("id").or_else(|| item.get("username"));
    match id.and_then(|v| serde_json::from_value::<Id>(v.clone()).ok()) {
        Some(id) => format!("{singular} {id}"),
        None => format!("{singular} #{}", index + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apisix_standalone_file_reads_as_is() {
        let text = r#"
routes:
  -
    uri: /hello
    upstream:
      nodes:
        "127.0.0.1:1980": 1
      type: roundrobin
#END
"#;
        let f = parse(text).unwrap();
        assert_eq!(f.resources.routes.len(), 1);
        assert_eq!(f.gateway.listen, vec!["0.0.0.0:9080"]);
    }

    #[test]
    fn errors_name_resource_and_field_path() {
        let text = r#"
routes:
  - id: 1
    uri: /a
    upstream: {nodes: [{host: "127.0.0.1", port: 80, weight: "heavy"}]}
  - id: 2
    uri: /b
    priority: high
upstreams:
  - id: u1
    nodes: {"127.0.0.1:80": -1}
"#;
        let errors = parse(text).unwrap_err();
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("{}|{}", e.resource, e.path))
            .collect();
        assert_eq!(
            lines,
            vec![
                "route 1|upstream.nodes",
                "route 2|priority",
                "upstream u1|nodes"
            ]
        );
        assert!(
            errors[1]
                .to_string()
                .starts_with("route 2: priority: invalid type"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn gateway_errors_and_unknown_keys() {
        let errors = parse("gateway:\n  listen: 9080\n  wrokers: 2\nroutez: []\n").unwrap_err();
        assert_eq!(errors[0].resource, "gateway");
        assert_eq!(errors[1].path, "routez");
    }

    #[test]
    fn unknown_resource_fields_warn() {
        let f = parse("routes:\n  - id: 1\n    uri: /a\n    upstream_idd: 3\n").unwrap();
        assert_eq!(
            f.warnings,
            vec!["route 1: upstream_idd: unknown field, ignored"]
        );
    }

    #[test]
    fn empty_file_is_an_empty_config() {
        let f = parse("").unwrap();
        assert!(f.resources.routes.is_empty());
    }

    #[test]
    fn yaml_syntax_errors_say_where() {
        let errors = parse("routes:\n  - id: 1\n   uri: [\n").unwrap_err();
        assert_eq!(errors[0].resource, "file");
        assert!(errors[0].message.contains("line"), "{}", errors[0].message);
    }
}
