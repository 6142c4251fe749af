//! APISIX `vars` expressions, as lua-resty-expr reads them.
//!
//! One engine serves route `vars`, and later `traffic-split` matches and
//! `_meta.filter`. An expression is parsed and checked once, when a config is
//! compiled; evaluation works on the typed tree and never touches JSON.
//!
//! Forms accepted (each may nest):
//! - a condition: `["arg_name", "==", "jack"]` or negated `["arg_name", "!", "==", "jack"]`;
//! - a list of expressions, all of which must hold: `[["arg_a","==","1"], ["http_x","~~","^v2"]]`;
//! - a logical group: `["OR", expr, expr, …]`, `["AND", …]`, `["!OR", …]`, `["!AND", …]`.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;
use regex::{Regex, RegexBuilder};
use serde_json::Value;

use crate::var::{Var, VarSource};
use crate::BuildError;

/// A compiled expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// Every child holds (an empty list always holds).
    All(Vec<Expr>),
    /// At least one child holds.
    Any(Vec<Expr>),
    /// The child does not hold.
    Not(Box<Expr>),
    /// One comparison of a variable against a value.
    Cond(Cond),
}

/// `[var, op, value]`.
#[derive(Debug, Clone)]
pub struct Cond {
    var: Var,
    op: Op,
    /// `!` before the operator flips the comparison's result.
    negate: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Eq(Literal),
    Ne(Literal),
    Gt(f64),
    Lt(f64),
    Ge(f64),
    Le(f64),
    Regex(Regex),
    In(Vec<Literal>),
    Has(String),
    IpMatch(Vec<IpNet>),
}

#[derive(Debug, Clone)]
enum Literal {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

impl Expr {
    /// Parses an expression from its JSON form. `path` names where it sits
    /// (for example `vars`), so errors read `vars[0][1]: unknown operator`.
    pub fn parse(value: &Value, path: &str) -> Result<Expr, BuildError> {
        let items = value
            .as_array()
            .ok_or_else(|| BuildError::new(path, "an expression must be an array"))?;
        match items.first() {
            None => Ok(Expr::All(Vec::new())),
            Some(Value::String(s)) if is_logic(s) => parse_logic(s, &items[1..], path),
            Some(Value::Array(_)) => parse_children(items, 0, path).map(Expr::All),
            Some(Value::String(_)) => parse_cond(items, path).map(Expr::Cond),
            Some(_) => Err(BuildError::new(
                format!("{path}[0]"),
                "expected a variable name, a logical operator or a nested expression",
            )),
        }
    }

    /// Evaluates the expression against one request's variables.
    pub fn eval<V: VarSource + ?Sized>(&self, vars: &V) -> bool {
        match self {
            Expr::All(children) => children.iter().all(|c| c.eval(vars)),
            Expr::Any(children) => children.iter().any(|c| c.eval(vars)),
            Expr::Not(child) => !child.eval(vars),
            Expr::Cond(cond) => cond.eval(vars),
        }
    }
}

fn is_logic(s: &str) -> bool {
    matches!(s, "AND" | "OR" | "!AND" | "!OR")
}

fn parse_logic(op: &str, rest: &[Value], path: &str) -> Result<Expr, BuildError> {
    if rest.is_empty() {
        return Err(BuildError::new(
            path,
            format!("`{op}` needs at least one expression"),
        ));
    }
    let children = parse_children(rest, 1, path)?;
    let group = if op.ends_with("OR") {
        Expr::Any(children)
    } else {
        Expr::All(children)
    };
    Ok(if op.starts_with('!') {
        Expr::Not(Box::new(group))
    } else {
        group
    })
}

fn parse_children(items: &[Value], offset: usize, path: &str) -> Result<Vec<Expr>, BuildError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| Expr::parse(item, &format!("{path}[{}]", i + offset)))
        .collect()
}

fn parse_cond(items: &[Value], path: &str) -> Result<Cond, BuildError> {
    let (negate, op_at) = match items.get(1) {
        Some(Value::String(s)) if s == "!" => (true, 2),
        _ => (false, 1),
    };
    if items.len() != op_at + 2 {
        return Err(BuildError::new(
            path,
            "a condition is [variable, operator, value] or [variable, \"!\", operator, value]",
        ));
    }
    let name = items[0].as_str().unwrap_or_default();
    let var = Var::parse(name).map_err(|e| BuildError::new(format!("{path}[0]"), e))?;
    let op_name = items[op_at].as_str().ok_or_else(|| {
        BuildError::new(format!("{path}[{op_at}]"), "the operator must be a string")
    })?;
    let value_path = format!("{path}[{}]", op_at + 1);
    let op = parse_op(op_name, &items[op_at + 1], &value_path).map_err(|e| {
        if e.path.is_empty() {
            BuildError::new(format!("{path}[{op_at}]"), e.message)
        } else {
            e
        }
    })?;
    Ok(Cond { var, op, negate })
}

fn parse_op(name: &str, value: &Value, value_path: &str) -> Result<Op, BuildError> {
    let num = |v: &Value| -> Result<f64, BuildError> {
        number(v).ok_or_else(|| {
            BuildError::new(
                value_path,
                format!("`{name}` compares numbers: the value must be a number"),
            )
        })
    };
    let op = match name {
        "==" => Op::Eq(literal(value, value_path)?),
        "~=" => Op::Ne(literal(value, value_path)?),
        ">" => Op::Gt(num(value)?),
        "<" => Op::Lt(num(value)?),
        ">=" => Op::Ge(num(value)?),
        "<=" => Op::Le(num(value)?),
        "~~" | "~*" => Op::Regex(regex(value, name == "~*", value_path)?),
        "in" => Op::In(
            value
                .as_array()
                .ok_or_else(|| BuildError::new(value_path, "`in` needs an array of values"))?
                .iter()
                .enumerate()
                .map(|(i, v)| literal(v, &format!("{value_path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        "has" => Op::Has(
            value
                .as_str()
                .ok_or_else(|| BuildError::new(value_path, "`has` needs a string"))?
                .to_owned(),
        ),
        "ipmatch" => Op::IpMatch(cidrs(value, value_path)?),
        other => {
            return Err(BuildError::new(
                "",
                format!("unknown operator `{other}` (expected one of == ~= > < >= <= ~~ ~* in has ipmatch, optionally after \"!\")"),
            ))
        }
    };
    Ok(op)
}

fn literal(v: &Value, path: &str) -> Result<Literal, BuildError> {
    Ok(match v {
        Value::String(s) => Literal::Str(s.clone()),
        Value::Number(n) => Literal::Num(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => Literal::Bool(*b),
        Value::Null => Literal::Null,
        _ => {
            return Err(BuildError::new(
                path,
                "expected a string, number, boolean or null",
            ))
        }
    })
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn regex(v: &Value, caseless: bool, path: &str) -> Result<Regex, BuildError> {
    let pattern = v
        .as_str()
        .ok_or_else(|| BuildError::new(path, "a regular expression must be a string"))?;
    RegexBuilder::new(pattern)
        .case_insensitive(caseless)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| BuildError::new(path, format!("invalid regular expression: {e}")))
}

/// Parses one CIDR or address (`10.0.0.0/8`, `::1`, `192.168.1.7`).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

fn cidrs(v: &Value, path: &str) -> Result<Vec<IpNet>, BuildError> {
    let one = |v: &Value, path: &str| {
        v.as_str().and_then(parse_cidr).ok_or_else(|| {
            BuildError::new(path, "expected an IP address or CIDR such as 10.0.0.0/8")
        })
    };
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| one(item, &format!("{path}[{i}]")))
            .collect(),
        other => Ok(vec![one(other, path)?]),
    }
}

impl Cond {
    fn eval<V: VarSource + ?Sized>(&self, vars: &V) -> bool {
        let value = vars.var(&self.var);
        self.op.eval(value.as_deref()) != self.negate
    }
}

impl Op {
    fn eval(&self, value: Option<&str>) -> bool {
        match self {
            Op::Eq(lit) => eq(value, lit),
            Op::Ne(lit) => !eq(value, lit),
            Op::Gt(n) => num_of(value).is_some_and(|v| v > *n),
            Op::Lt(n) => num_of(value).is_some_and(|v| v < *n),
            Op::Ge(n) => num_of(value).is_some_and(|v| v >= *n),
            Op::Le(n) => num_of(value).is_some_and(|v| v <= *n),
            Op::Regex(re) => value.is_some_and(|v| re.is_match(v)),
            Op::In(list) => value.is_some() && list.iter().any(|lit| eq(value, lit)),
            Op::Has(needle) => {
                value.is_some_and(|v| v.split(',').any(|item| item.trim() == needle))
            }
            Op::IpMatch(nets) => value
                .and_then(|v| v.parse::<IpAddr>().ok())
                .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip))),
        }
    }
}

fn num_of(value: Option<&str>) -> Option<f64> {
    value.and_then(|v| v.trim().parse().ok())
}

fn eq(value: Option<&str>, lit: &Literal) -> bool {
    match (value, lit) {
        (None, Literal::Null) => true,
        (None, _) | (Some(_), Literal::Null) => false,
        (Some(v), Literal::Str(s)) => v == s,
        (Some(v), Literal::Num(n)) => v.trim().parse::<f64>().is_ok_and(|x| x == *n),
        (Some(v), Literal::Bool(b)) => v == if *b { "true" } else { "false" },
    }
}

/// Variables as a plain map, for tests and tools.
impl VarSource for std::collections::HashMap<&str, &str> {
    fn var(&self, var: &Var) -> Option<Cow<'_, str>> {
        self.get(var.name().as_ref()).map(|v| Cow::Borrowed(*v))
    }
}
