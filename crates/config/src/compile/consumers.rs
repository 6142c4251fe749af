//! Consumers and their credentials: each consumer's own plugins become its
//! chain; its authentication plugins' configs become credentials, gathered
//! per plugin into the lookups the routes' auth plugins use.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::*;

/// Credentials gathered per authentication plugin.
type Credentials<'r> = HashMap<&'r str, Vec<(Arc<Consumer>, Value)>>;

impl<'p> Compiler<'p> {
    /// Builds every consumer and the credential lookups (into `self.env`),
    /// returning consumers by username.
    pub(super) fn consumers(&mut self, res: &'p Resources) -> HashMap<Arc<str>, Arc<Consumer>> {
        let groups = self.plugin_sets(&res.consumer_groups, "consumer group");
        let mut by_name: HashMap<Arc<str>, Arc<Consumer>> = HashMap::new();
        let mut credentials: Credentials<'p> = HashMap::new();
        for c in &res.consumers {
            let Some(username) = &c.username else {
                continue;
            };
            let label = format!("consumer {username}");
            if !valid_username(username) {
                self.err(&label, "username", "must be letters, digits, `_` and `-`");
                continue;
            }
            if by_name.contains_key(username.as_str()) {
                self.err(&label, "username", "duplicate username");
                continue;
            }
            let (creds, own) = self.split_credentials(&label, c.plugins.as_ref());
            let group = match &c.group_id {
                Some(g) => match groups.get(g) {
                    Some(entries) => &entries[..],
                    None => {
                        self.err(
                            &label,
                            "group_id",
                            format!("consumer group `{g}` does not exist"),
                        );
                        &[]
                    }
                },
                None => &[],
            };
            let consumer = Arc::new(Consumer {
                username: username.as_str().into(),
                // Checked by `valid_username` above.
                header: HeaderValue::from_str(username).expect("usernames are header-safe"),
                group_id: c.group_id.as_ref().map(|g| g.0.as_str().into()),
                chain: Chain::merge([group, &own[..]]),
            });
            for (name, value) in creds {
                credentials
                    .entry(name)
                    .or_default()
                    .push((consumer.clone(), value));
            }
            by_name.insert(consumer.username.clone(), consumer);
        }
        self.credential_entries(res, &by_name, &mut credentials);
        let errors = self.registry.add_indexes(&mut self.env, credentials);
        for (consumer, plugin, e) in errors {
            let label = format!("consumer {}", consumer.username);
            self.plugin_errors(&label, plugin, vec![e]);
        }
        by_name
    }

    /// Splits a consumer's plugins into credentials (checked against the
    /// plugin's consumer schema) and ordinary plugins (built).
    fn split_credentials(
        &mut self,
        label: &str,
        plugins: Option<&'p model::Plugins>,
    ) -> (Vec<(&'p str, Value)>, Vec<Entry>) {
        let mut creds = Vec::new();
        let mut others = model::Plugins::new();
        for (name, config) in plugins.into_iter().flatten() {
            if !self.registry.is_credential(name) {
                others.insert(name.clone(), config.clone());
                continue;
            }
            match self.registry.check_credential(name, config) {
                Ok(v) => creds.push((name.as_str(), v)),
                Err(errors) => self.plugin_errors(label, name, errors),
            }
        }
        // Consumer plugins never need credential lookups themselves.
        let own = self.entries(label, Some(&others));
        (creds, own)
    }

    /// APISIX 3.11+ credentials: consumer entries with the id
    /// `{username}/credentials/{id}`, holding only authentication plugins.
    fn credential_entries(
        &mut self,
        res: &'p Resources,
        by_name: &HashMap<Arc<str>, Arc<Consumer>>,
        credentials: &mut Credentials<'p>,
    ) {
        let mut seen = HashSet::new();
        for c in res.consumers.iter().filter(|c| c.username.is_none()) {
            let Some(id) = &c.id else {
                self.err("consumer", "username", "missing");
                continue;
            };
            let label = format!("credential {id}");
            let Some((user, _)) = id.split_once("/credentials/") else {
                self.err(
                    &label,
                    "username",
                    "missing (a credential's id is `{username}/credentials/{id}`)",
                );
                continue;
            };
            if !seen.insert(id.as_str()) {
                self.err(&label, "id", "duplicate id");
                continue;
            }
            let Some(consumer) = by_name.get(user) else {
                self.err(&label, "id", format!("consumer `{user}` does not exist"));
                continue;
            };
            for (name, config) in c.plugins.iter().flatten() {
                if !self.registry.is_credential(name) {
                    let what = if self.registry.get(name).is_some() {
                        "is not an authentication plugin"
                    } else {
                        "is not a known plugin"
                    };
                    self.err(
                        &label,
                        format!("plugins.{name}"),
                        format!("`{name}` {what}; credentials hold only authentication plugins"),
                    );
                    continue;
                }
                match self.registry.check_credential(name, config) {
                    Ok(v) => credentials
                        .entry(name.as_str())
                        .or_default()
                        .push((consumer.clone(), v)),
                    Err(errors) => self.plugin_errors(&label, name, errors),
                }
            }
        }
    }
}

/// APISIX's pattern for usernames; it also keeps `X-Consumer-Username` valid.
fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
