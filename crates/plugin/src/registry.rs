//! The plugins this build knows, and how a resource's `plugins` map becomes
//! checked, typed, ready-to-run entries.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::de::DeserializeOwned;
use serde_json::Value;
use turnpike_router::Expr;

use crate::schema::{fill_defaults, pointer_to_path};
use crate::state::States;
use crate::{Consumer, Entry, Plugin};

/// A plugin's lookup from credentials to consumers (the keys of every
/// consumer's `key-auth`, say), built once per snapshot.
pub type Index = Arc<dyn Any + Send + Sync>;

/// Builds an instance from a checked config.
pub type Build = fn(Value, &Env) -> Result<Arc<dyn Plugin>, FieldError>;

/// Every consumer's credential for one plugin, checked.
pub type CredentialList = [(Arc<Consumer>, Value)];

/// Builds a credential lookup; an error names the entry by position.
pub type BuildIndex = fn(&CredentialList) -> Result<Index, (usize, FieldError)>;

/// A credential that did not fit in a lookup: whose, which plugin, what.
pub type CredentialError = (Arc<Consumer>, &'static str, FieldError);

/// What a plugin is: its identity, its config's schema, and how to build it.
pub struct Factory {
    pub name: &'static str,
    /// Higher runs first within a phase.
    pub priority: i32,
    /// The JSON Schema of the config on a route, service, plugin config,
    /// global rule or (for non-credential plugins) consumer.
    pub schema: fn() -> Value,
    /// For authentication plugins: the schema of a consumer's credential.
    pub consumer_schema: Option<fn() -> Value>,
    /// Builds an instance from a config that passed the schema, with its
    /// defaults filled in.
    pub build: Build,
    /// For authentication plugins: builds the lookup from every consumer's
    /// credential (already checked against `consumer_schema`). An error
    /// names the offending entry by its position in the list.
    pub credentials: Option<BuildIndex>,
    /// Where the config holds upstreams written inline, as JSON pointers
    /// with `*` for any array index (`/rules/*/weighted_upstreams/*/upstream`):
    /// the config compiler compiles them with the snapshot, for
    /// [`Env::upstream`] to find.
    pub upstreams: &'static [&'static str],
    /// Fields of the config that hold secrets (APISIX's `encrypt_fields`):
    /// the Admin API masks them in every read after they are written.
    pub secrets: &'static [&'static str],
}

impl Factory {
    /// A plugin that holds no credentials.
    pub const fn new(
        name: &'static str,
        priority: i32,
        schema: fn() -> Value,
        build: Build,
    ) -> Factory {
        Factory {
            name,
            priority,
            schema,
            consumer_schema: None,
            build,
            credentials: None,
            upstreams: &[],
            secrets: &[],
        }
    }

    /// Declares where the config holds inline upstreams (see
    /// [`Factory::upstreams`]).
    pub const fn with_upstreams(mut self, paths: &'static [&'static str]) -> Factory {
        self.upstreams = paths;
        self
    }

    /// Declares the config's secret fields (see [`Factory::secrets`]).
    pub const fn with_secrets(mut self, fields: &'static [&'static str]) -> Factory {
        self.secrets = fields;
        self
    }

    /// An authentication plugin: consumers' configs of it are credentials,
    /// checked against `consumer_schema` and gathered by `credentials`.
    pub const fn auth(
        name: &'static str,
        priority: i32,
        schema: fn() -> Value,
        consumer_schema: fn() -> Value,
        build: Build,
        credentials: BuildIndex,
    ) -> Factory {
        Factory {
            name,
            priority,
            schema,
            consumer_schema: Some(consumer_schema),
            build,
            credentials: Some(credentials),
            upstreams: &[],
            secrets: &[],
        }
    }
}

/// A problem in one plugin's config, at a field path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `header`, `headers.set`, `regex_uri[1]`; empty for the whole config.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Deserialises a checked config into the plugin's typed struct.
pub fn typed<T: DeserializeOwned>(config: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(config).map_err(|e| {
        let path = e.path().to_string();
        FieldError::new(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

/// What building a plugin may need from the rest of the snapshot, and from
/// the process: state that outlives snapshots, and which resource the
/// plugin is being built for.
#[derive(Default)]
pub struct Env {
    indexes: HashMap<&'static str, Index>,
    states: Arc<States>,
    /// The resource whose plugins are being built: `route 1`, `service s`.
    owner: String,
    /// Upstreams plugins may send requests to (traffic-split, api-breaker's
    /// fallback), by [`Env::upstream`]'s key; opaque here, the config
    /// crate's `Upstream` to the proxy.
    upstreams: HashMap<String, Index>,
    /// Fingerprints resources must agree on, by key (see [`Env::agree`]).
    agreed: Mutex<HashMap<String, u64>>,
    /// Regexes compiled so far in this snapshot, by pattern: ten thousand
    /// routes with the same `regex_uri` compile it once (compiling is what
    /// a reload spends most on otherwise) and share the program.
    regexes: Mutex<HashMap<String, regex::Regex>>,
}

impl Env {
    /// The resource whose plugins are being built, as errors name it:
    /// `route 1`, `service s`, `global rule 1`, `consumer jack`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Sets the resource whose plugins are built next.
    pub fn set_owner(&mut self, owner: &str) {
        owner.clone_into(&mut self.owner);
    }

    /// Records `fingerprint` under `key` for this snapshot; false when a
    /// resource built earlier recorded another (routes of one
    /// `limit-count` group must share one config).
    pub fn agree(&self, key: &str, fingerprint: u64) -> bool {
        // Only the config compiler, on one thread, ever takes this lock.
        let mut agreed = self.agreed.lock().unwrap_or_else(|e| e.into_inner());
        *agreed.entry(key.to_owned()).or_insert(fingerprint) == fingerprint
    }

    /// Makes `upstream` reachable by `key`: `upstreams/{id}` for the
    /// upstreams resources, [`Env::inline_key`] for one written in a
    /// plugin's config.
    pub fn add_upstream(&mut self, key: String, upstream: Index) {
        self.upstreams.insert(key, upstream);
    }

    /// The key of an upstream written inline in plugin `plugin`'s config of
    /// the current owner, at JSON pointer `pointer`
    /// (`/rules/0/weighted_upstreams/1/upstream`).
    pub fn inline_key(&self, plugin: &str, pointer: &str) -> String {
        format!("{}|{plugin}{pointer}", self.owner)
    }

    /// An upstream for a plugin to send requests to, for
    /// [`Ctx::upstream_override`](crate::Ctx::upstream_override): by
    /// `upstream_id`, or written inline in the plugin's config at
    /// `pointer`. The error names `field`.
    pub fn upstream(
        &self,
        plugin: &str,
        id: Option<&str>,
        pointer: &str,
        field: &str,
    ) -> Result<Index, FieldError> {
        let key = match id {
            Some(id) => format!("upstreams/{id}"),
            None => self.inline_key(plugin, pointer),
        };
        self.upstreams.get(&key).cloned().ok_or_else(|| match id {
            Some(id) => FieldError::new(field, format!("upstream `{id}` does not exist")),
            None => FieldError::new(field, "the upstream did not compile"),
        })
    }

    /// State kept across reloads (see `state::States`): the same key gets the
    /// same value while a snapshot still holds it. Keys are the plugin's
    /// to choose; put the plugin's name, the owner and whatever config
    /// change should start afresh into them.
    pub fn state<T: Any + Send + Sync>(&self, key: &str, make: impl FnOnce() -> T) -> Arc<T> {
        self.states.get(key, make)
    }

    /// Compiles `pattern`, or returns the copy compiled earlier.
    pub fn regex(&self, pattern: &str) -> Result<regex::Regex, String> {
        // Only the config compiler, on one thread, ever takes this lock.
        let mut cache = self.regexes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(re) = cache.get(pattern) {
            return Ok(re.clone());
        }
        let re = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        cache.insert(pattern.to_owned(), re.clone());
        Ok(re)
    }

    /// The credential lookup of authentication plugin `name`.
    pub fn index<T: Any + Send + Sync>(&self, name: &str) -> Result<Arc<T>, FieldError> {
        self.indexes
            .get(name)
            .cloned()
            .and_then(|i| i.downcast::<T>().ok())
            .ok_or_else(|| FieldError::new("", format!("no consumer index for `{name}`")))
    }
}

struct Known {
    factory: Factory,
    schema: Value,
    /// Compiled on first use: a validator costs up to a few megabytes, and
    /// most configs use a handful of plugins.
    validator: OnceLock<jsonschema::Validator>,
    consumer: Option<(Value, OnceLock<jsonschema::Validator>)>,
}

impl Known {
    fn validator(&self) -> &jsonschema::Validator {
        self.validator
            .get_or_init(|| compile(self.factory.name, &self.schema))
    }
}

/// Every plugin this build ships, by name.
pub struct Registry {
    plugins: Vec<Known>,
    by_name: HashMap<&'static str, usize>,
    /// Plugin state for the life of the process; see [`Env::state`].
    states: Arc<States>,
}

impl Registry {
    /// Registers the plugins; their schemas compile when first used.
    pub fn new(factories: Vec<Factory>) -> Registry {
        let mut plugins = Vec::new();
        let mut by_name = HashMap::new();
        for factory in factories {
            let schema = (factory.schema)();
            let validator = OnceLock::new();
            let consumer = factory.consumer_schema.map(|f| (f(), OnceLock::new()));
            let previous = by_name.insert(factory.name, plugins.len());
            assert!(
                previous.is_none(),
                "plugin {} registered twice",
                factory.name
            );
            plugins.push(Known {
                factory,
                schema,
                validator,
                consumer,
            });
        }
        Registry {
            plugins,
            by_name,
            states: Arc::default(),
        }
    }

    /// Compiles every schema now. A built-in schema that does not compile
    /// is a bug, so this panics; the plugins crate's tests call it.
    pub fn compile_all(&self) {
        for known in &self.plugins {
            known.validator();
            if let Some((schema, v)) = &known.consumer {
                v.get_or_init(|| compile(known.factory.name, schema));
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Factory> {
        self.by_name.get(name).map(|&i| &self.plugins[i].factory)
    }

    /// Every plugin, in registration order.
    pub fn factories(&self) -> impl Iterator<Item = &Factory> {
        self.plugins.iter().map(|k| &k.factory)
    }

    /// A plugin's config schema, as the Admin API serves it.
    pub fn schema(&self, name: &str) -> Option<&Value> {
        self.by_name.get(name).map(|&i| &self.plugins[i].schema)
    }

    /// A plugin's consumer (credential) schema, if it has one.
    pub fn consumer_schema(&self, name: &str) -> Option<&Value> {
        let i = *self.by_name.get(name)?;
        self.plugins[i].consumer.as_ref().map(|(s, _)| s)
    }

    /// Whether `name` holds credentials when set on a consumer.
    pub fn is_credential(&self, name: &str) -> bool {
        self.consumer_schema(name).is_some()
    }

    /// Checks a consumer's credential for plugin `name` and fills its defaults.
    pub fn check_credential(&self, name: &str, config: &Value) -> Result<Value, Vec<FieldError>> {
        let known = self.known(name)?;
        let Some((schema, validator)) = &known.consumer else {
            return Err(vec![FieldError::new(
                "",
                format!("plugin `{name}` holds no credentials"),
            )]);
        };
        let validator = validator.get_or_init(|| compile(name, schema));
        check(schema, validator, config.clone())
    }

    /// Checks and builds one plugin's config from a `plugins` map: `_meta`
    /// read, the rest checked against the schema, defaults filled, the
    /// typed instance built.
    pub fn entry(&self, name: &str, config: &Value, env: &Env) -> Result<Entry, Vec<FieldError>> {
        let known = self.known(name)?;
        let mut config = config.clone();
        let meta = match config.as_object_mut() {
            Some(map) => map.remove("_meta"),
            None => None,
        };
        let meta = Meta::parse(meta.as_ref()).map_err(|e| vec![e])?;
        let config = check(&known.schema, known.validator(), config)?;
        let plugin = (known.factory.build)(config, env).map_err(|e| vec![e])?;
        Ok(Entry {
            name: known.factory.name,
            priority: meta.priority.unwrap_or(known.factory.priority),
            plugin,
            filter: meta.filter.map(Arc::new),
            disabled: meta.disable,
        })
    }

    /// Builds every authentication plugin's credential lookup from the
    /// consumers' credentials: `(plugin, [(consumer, checked credential)])`.
    /// A plugin whose credentials do not fit gets an empty lookup beside
    /// the error, so its mistake is reported once, not again at every route
    /// that uses the plugin.
    pub fn indexes(
        &self,
        credentials: HashMap<&str, Vec<(Arc<Consumer>, Value)>>,
    ) -> (Env, Vec<CredentialError>) {
        let mut env = self.env();
        let errors = self.add_indexes(&mut env, credentials);
        (env, errors)
    }

    /// A new snapshot's environment, holding the process's plugin state
    /// (see [`Env::state`]). Called once per compile, before any plugin is
    /// built.
    pub fn env(&self) -> Env {
        // Forget state the last snapshots let go of.
        self.states.prune();
        Env {
            states: self.states.clone(),
            ..Env::default()
        }
    }

    /// Adds the credential lookups to `env`, as [`Registry::indexes`].
    pub fn add_indexes(
        &self,
        env: &mut Env,
        mut credentials: HashMap<&str, Vec<(Arc<Consumer>, Value)>>,
    ) -> Vec<CredentialError> {
        let mut errors = Vec::new();
        for known in &self.plugins {
            let Some(build) = known.factory.credentials else {
                continue;
            };
            let list = credentials.remove(known.factory.name).unwrap_or_default();
            match build(&list) {
                Ok(index) => {
                    env.indexes.insert(known.factory.name, index);
                }
                Err((i, e)) => {
                    errors.push((list[i].0.clone(), known.factory.name, e));
                    if let Ok(empty) = build(&[]) {
                        env.indexes.insert(known.factory.name, empty);
                    }
                }
            }
        }
        errors
    }

    fn known(&self, name: &str) -> Result<&Known, Vec<FieldError>> {
        self.by_name
            .get(name)
            .map(|&i| &self.plugins[i])
            .ok_or_else(|| vec![FieldError::new("", format!("unknown plugin `{name}`"))])
    }
}

fn compile(name: &str, schema: &Value) -> jsonschema::Validator {
    // Built-in schemas are constants; `registry_builds` in turnpike-plugins
    // compiles every one of them.
    validator(schema).unwrap_or_else(|e| panic!("schema of plugin {name} does not compile: {e}"))
}

/// A JSON Schema validator, draft 7 (what APISIX's schemas are written
/// in). Later drafts cost about 10 MB of memory more for their
/// meta-schemas, for features plugin schemas do not use.
pub fn validator(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .build(schema)
        .map_err(|e| e.to_string())
}

fn check(
    schema: &Value,
    validator: &jsonschema::Validator,
    mut config: Value,
) -> Result<Value, Vec<FieldError>> {
    if config.is_null() {
        config = Value::Object(Default::default());
    }
    let errors: Vec<FieldError> = validator
        .iter_errors(&config)
        .map(|e| FieldError::new(pointer_to_path(&e.instance_path.to_string()), e.to_string()))
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    fill_defaults(schema, &mut config);
    Ok(config)
}

/// `_meta`: settings every plugin accepts.
#[derive(Default)]
struct Meta {
    disable: bool,
    priority: Option<i32>,
    filter: Option<Expr>,
}

impl Meta {
    fn parse(meta: Option<&Value>) -> Result<Meta, FieldError> {
        let mut out = Meta::default();
        let Some(meta) = meta else {
            return Ok(out);
        };
        let Some(map) = meta.as_object() else {
            return Err(FieldError::new("_meta", "must be an object"));
        };
        for (key, v) in map {
            let path = format!("_meta.{key}");
            match key.as_str() {
                "disable" => {
                    out.disable = v
                        .as_bool()
                        .ok_or_else(|| FieldError::new(&path, "must be a boolean"))?
                }
                "priority" => {
                    let p = v
                        .as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .ok_or_else(|| FieldError::new(&path, "must be an integer"))?;
                    out.priority = Some(p);
                }
                "filter" => {
                    let expr =
                        Expr::parse(v, &path).map_err(|e| FieldError::new(e.path, e.message))?;
                    out.filter = Some(expr);
                }
                // Used by APISIX's Lua error pages and logging; nothing to do here.
                "error_response" | "pre_function" => {
                    return Err(FieldError::new(&path, "not supported"));
                }
                _ => {
                    return Err(FieldError::new(
                        &path,
                        "unknown field (known: disable, priority, filter)",
                    ))
                }
            }
        }
        Ok(out)
    }
}
