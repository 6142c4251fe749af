//! `traffic-split`: sends a share of a route's requests, or the requests
//! matching some rule, to other upstreams: canary releases, blue-green,
//! API versions chosen by header, path or weight.
//!
//! The first rule whose `match` holds (or that has none) picks one of its
//! `weighted_upstreams` by weight; an entry with neither `upstream_id` nor
//! `upstream` stands for the route's own upstream. Requests no rule
//! matches go to the route's upstream. Inline upstreams are compiled with
//! the configuration, like any other, and keep their balancer state across
//! reloads that do not change them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use turnpike_plugin::{typed, Ctx, Env, Factory, FieldError, Flow, Index, Plugin};
use turnpike_router::Expr;

pub(crate) const NAME: &str = "traffic-split";
pub(crate) const PRIORITY: i32 = 966;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "match": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"vars": {"type": "array"}},
                                "additionalProperties": false
                            }
                        },
                        "weighted_upstreams": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "upstream_id": {"type": ["string", "integer"]},
                                    "upstream": {"type": "object"},
                                    "weight": {"type": "integer", "minimum": 0, "default": 1}
                                },
                                "additionalProperties": false
                            }
                        }
                    },
                    "required": ["weighted_upstreams"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["rules"],
        "additionalProperties": false
    })
}

#[derive(Deserialize)]
struct Config {
    rules: Vec<RuleConf>,
}

#[derive(Deserialize)]
struct RuleConf {
    #[serde(rename = "match", default)]
    matches: Vec<MatchConf>,
    weighted_upstreams: Vec<WeightedConf>,
}

#[derive(Deserialize)]
struct MatchConf {
    #[serde(default)]
    vars: Option<Value>,
}

#[derive(Deserialize)]
struct WeightedConf {
    upstream_id: Option<Value>,
    upstream: Option<Value>,
    weight: u32,
}

struct TrafficSplit {
    rules: Vec<Rule>,
}

struct Rule {
    /// Any one holding is enough; none means every request.
    matches: Vec<Expr>,
    /// The upstreams; `None` is the route's own.
    targets: Vec<Option<Index>>,
    /// One round of picks, interleaved by weight (nginx's smooth weighted
    /// round robin): weights 1:3 give `[1, 1, 0, 1]`.
    round: Vec<u32>,
    /// Requests so far; kept across reloads that leave the config alone,
    /// so a reload does not restart the round.
    turn: Arc<AtomicU64>,
}

/// The longest round kept; beyond it weights are scaled down.
const MAX_ROUND: u64 = 10_000;

fn build(config: Value, env: &Env) -> Result<Arc<dyn Plugin>, FieldError> {
    let scope = crate::state_key(NAME, env, None, &config);
    let c: Config = typed(config)?;
    let rules = c
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(env, &scope, i, r))
        .collect::<Result<_, _>>()?;
    Ok(Arc::new(TrafficSplit { rules }))
}

fn rule(env: &Env, scope: &str, i: usize, r: &RuleConf) -> Result<Rule, FieldError> {
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().enumerate() {
        let path = format!("rules[{i}].match[{j}].vars");
        if let Some(vars) = &m.vars {
            let expr = Expr::parse(vars, &path).map_err(|e| FieldError::new(e.path, e.message))?;
            matches.push(expr);
        }
    }
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for (j, w) in r.weighted_upstreams.iter().enumerate() {
        let field = format!("rules[{i}].weighted_upstreams[{j}]");
        let upstream = match (&w.upstream_id, &w.upstream) {
            (None, None) => None,
            (Some(id), _) => {
                let id = id.as_str().map_or_else(|| id.to_string(), str::to_owned);
                Some(env.upstream(NAME, Some(&id), "", &format!("{field}.upstream_id"))?)
            }
            (None, Some(_)) => {
                let pointer = format!("/rules/{i}/weighted_upstreams/{j}/upstream");
                Some(env.upstream(NAME, None, &pointer, &format!("{field}.upstream"))?)
            }
        };
        weights.push(u64::from(w.weight));
        targets.push(upstream);
    }
    if weights.iter().all(|&w| w == 0) {
        let path = format!("rules[{i}].weighted_upstreams");
        return Err(FieldError::new(path, "the weights add up to 0"));
    }
    Ok(Rule {
        matches,
        targets,
        round: round(&weights),
        turn: env.state(&format!("{scope}:turn:{i}"), || AtomicU64::new(0)),
    })
}

/// One round of smooth weighted round robin over `weights` (not all 0),
/// divided by their greatest common divisor and scaled to at most
/// [`MAX_ROUND`] picks.
fn round(weights: &[u64]) -> Vec<u32> {
    let gcd = weights.iter().fold(0, |a, &b| gcd(a, b));
    let mut weights: Vec<u64> = weights.iter().map(|w| w / gcd).collect();
    let total: u64 = weights.iter().sum();
    if total > MAX_ROUND {
        for w in &mut weights {
            // Scaled, but a non-zero weight keeps at least one pick.
            *w = if *w == 0 {
                0
            } else {
                (*w * MAX_ROUND / total).max(1)
            };
        }
    }
    let total: i64 = weights.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += *w as i64;
            }
            let best = (0..current.len())
                .max_by_key(|&k| (current[k], -(k as i64)))
                .unwrap_or(0);
            current[best] -= total;
            best as u32
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(crate) fn factory() -> Factory {
    Factory::new(NAME, PRIORITY, schema, build)
        .with_upstreams(&["/rules/*/weighted_upstreams/*/upstream"])
}

impl Plugin for TrafficSplit {
    fn access(&self, ctx: &mut Ctx) -> Flow {
        let rule = self
            .rules
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.eval(ctx)));
        if let Some(rule) = rule {
            ctx.upstream_override = rule.pick().cloned();
        }
        Flow::Continue
    }
}

impl Rule {
    /// The next upstream by weight: every round, each target gets
    /// exactly its (reduced) weight, spread out.
    fn pick(&self) -> Option<&Index> {
        let n = self.turn.fetch_add(1, Ordering::Relaxed) % self.round.len() as u64;
        self.targets[self.round[n as usize] as usize].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ctx, entry_with, errors};
    use turnpike_plugin::Phase;

    fn env() -> Env {
        let mut env = Env::default();
        env.add_upstream("upstreams/blue".into(), Arc::new("blue"));
        env.add_upstream("upstreams/green".into(), Arc::new("green"));
        env
    }

    fn chosen(ctx: &Ctx) -> &'static str {
        match &ctx.upstream_override {
            Some(u) => u.downcast_ref::<&str>().copied().unwrap_or("?"),
            None => "route",
        }
    }

    #[test]
    fn weights_share_requests_exactly() {
        let e = entry_with(
            NAME,
            json!({"rules": [{"weighted_upstreams": [
                {"upstream_id": "blue", "weight": 3}, {"weight": 1}
            ]}]}),
            &env(),
        );
        let mut seen = std::collections::HashMap::new();
        for _ in 0..400 {
            let mut c = ctx("/");
            crate::test_util::run_now(Phase::Access, &e, &mut c);
            *seen.entry(chosen(&c)).or_insert(0) += 1;
        }
        assert_eq!(seen["blue"], 300);
        assert_eq!(seen["route"], 100, "no upstream: the route's own");
    }

    #[test]
    fn rounds_interleave_by_reduced_weight() {
        assert_eq!(round(&[1, 3]), [1, 0, 1, 1]);
        assert_eq!(round(&[500, 500]), [0, 1], "divided by their gcd");
        assert_eq!(round(&[0, 2]), [1]);
        let big = round(&[1, 99_999]);
        assert!(big.len() <= MAX_ROUND as usize + 1);
        assert!(big.contains(&0), "a small weight keeps a pick");
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let e = entry_with(
            NAME,
            json!({"rules": [
                {"match": [{"vars": [["http_x_version", "==", "2"]]}, {"vars": [["arg_v", "==", "2"]]}],
                 "weighted_upstreams": [{"upstream_id": "green"}]},
                {"match": [{"vars": [["arg_beta", "==", "1"]]}],
                 "weighted_upstreams": [{"upstream_id": "blue"}]}
            ]}),
            &env(),
        );
        let pick = |c: &mut Ctx| {
            crate::test_util::run_now(Phase::Access, &e, c);
            chosen(c)
        };
        assert_eq!(pick(&mut ctx("/?v=2&beta=1")), "green");
        assert_eq!(pick(&mut ctx("/?beta=1")), "blue");
        assert_eq!(pick(&mut ctx("/")), "route", "no rule matched");
    }

    #[test]
    fn missing_upstreams_and_zero_weights_are_refused() {
        let e = errors(
            NAME,
            json!({"rules": [{"weighted_upstreams": [{"upstream_id": "nope"}]}]}),
        );
        assert_eq!(e[0].path, "rules[0].weighted_upstreams[0].upstream_id");
        assert!(e[0].message.contains("does not exist"));
        let e = errors(
            NAME,
            json!({"rules": [{"weighted_upstreams": [{"weight": 0}]}]}),
        );
        assert_eq!(e[0].path, "rules[0].weighted_upstreams");
    }
}
