//! CEL validation rules of CustomResourceDefinitions (`x-kubernetes-validations`).
//!
//! A CRD schema node may carry rules written in CEL, e.g. `self.replicas <= self.maxReplicas`.
//! kube-apiserver compiles them when the CRD is written and runs them on every create and
//! update of a custom object, with `self` bound to the value at the node (and `oldSelf` to
//! the stored value at the same place, for "transition rules"). This module does the same:
//! [`Rules::compile`] walks the schema once and keeps a tree mirroring it, and
//! [`Rules::check`] walks an object alongside that tree.
//!
//! The `cel` crate parses and interprets the expressions. What is ours is the Kubernetes
//! part: the checks kube makes when a CRD is written (with its wording), how JSON values
//! become CEL values (schema-typed numbers, escaped property names, the restricted
//! `metadata` of a resource root), which old value a node is compared with (map-list items
//! by key, plain-list items never), ratcheting, the error wording, and the cost bound.
//!
//! Cost: rule authors are not trusted, and `self.l.all(a, self.l.all(b, ...))` over a big
//! list is quadratic. kube meters evaluation with cel-go's cost tracker; the `cel` crate has
//! none, so we instrument the parsed expression instead: every comprehension step (the
//! loops behind `all`, `exists`, `exists_one`, `map`, `filter`) passes through a `@meter`
//! call that charges one unit plus the size of any element `map` builds, and fails once the
//! call's limit or deadline is spent, which stops the loop at once. Limits: 1M units and
//! 250 ms per expression, 10M units and 2 s per [`Rules::check`] (the units are kube's
//! PerCallLimit and RuntimeCELCostBudget; with this interpreter the deadlines usually bind
//! first). Work between two steps is not metered but is linear in the values in hand;
//! `replace`, whose output could outgrow its input many times over, is swapped for a
//! version that charges for and refuses results over 3 MiB.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::cel::common::ast::ListExpr;
use ::cel::common::ast::{operators, CallExpr, ComprehensionExpr, EntryExpr, Expr};
use ::cel::common::types::{CelBytes, CelInt, CelList, CelMap, CelNull, CelOptional, CelString};
use ::cel::common::types::{DYN_TYPE, INT_TYPE, STRING_TYPE};
use ::cel::common::value::{CowVal, Val};
use ::cel::objects::{Key, Map};
use ::cel::{Context, Env, ExecutionError, IdedExpr, Value as Cel};
use serde_json::Value;

use crate::error::FieldError;

const PER_CALL_LIMIT: u64 = 1_000_000;
const RUNTIME_BUDGET: u64 = 10_000_000;
const PER_CALL_TIME: Duration = Duration::from_millis(250);
const CHECK_TIME: Duration = Duration::from_secs(2);
const MAX_STRING_BYTES: usize = 3 << 20;
const MAX_MESSAGE_BYTES: usize = 5 * 1024;
const METER: &str = "@meter";
const REPLACE: &str = "@replace";
const INVALID: &str = "FieldValueInvalid";
const REASONS: [&str; 4] = [
    "FieldValueDuplicate",
    "FieldValueForbidden",
    INVALID,
    "FieldValueRequired",
];
/// Names a rule may use besides its comprehension variables: the two bindings and the type
/// names CEL predeclares.
const KNOWN: &str = "self oldSelf int uint double bool string bytes list map null_type type";
/// The type names CEL predeclares, which any expression may use.
const TYPE_NAMES: &str = "int uint double bool string bytes list map null_type type";
/// Function namespaces (`math.greatest(...)`): the target of such a call is not a variable.
const NAMESPACES: [&str; 3] = ["optional", "math", "strings"];
/// CEL's reserved words, which kube spells `__word__` as property names.
const RESERVED: &str = "true false null in as break const continue else for function if import \
    let loop package namespace return var void while";
const BUDGET_GONE: &str =
    "validation failed due to running out of cost budget, no further validation rules will be run";
const MESSAGE_FAILED: &str = "messageExpression evaluation";
const CALL_CUT: &str = "no further validation rules will be run due to call cost exceeds limit for";
const CANCELLED: &str = "operation cancelled: actual cost limit exceeded";
const NO_OVERLOAD: &str =
    "call arguments did not match a supported operator, function or macro signature for rule";
const NOT_BOOL: &str = "cel expression must evaluate to a bool";

/// The rules of one schema, compiled once (when the CRD is accepted) and run on every write.
#[derive(Debug)]
pub struct Rules {
    root: Node,
}

/// One schema node: its rules, and what binding `self` and walking an object need.
#[derive(Debug, Default)]
struct Node {
    ty: String,
    rules: Vec<Rule>,
    /// `None` when the schema declares no `properties` (then every key is visible).
    properties: Option<BTreeMap<String, Node>>,
    additional: Option<Box<Node>>,
    items: Option<Box<Node>>,
    /// `x-kubernetes-list-map-keys` of a `x-kubernetes-list-type: map` list.
    map_keys: Option<Vec<String>>,
    /// A resource root (the top, or `x-kubernetes-embedded-resource`): kube shows
    /// `apiVersion`, `kind` and only `metadata.name`/`generateName` there.
    resource: bool,
    /// Whether this node or one below has rules: the walk skips dead branches.
    live: bool,
}

#[derive(Debug)]
struct Rule {
    source: String,
    expr: Compiled,
    message: Option<String>,
    message_expr: Option<(String, Compiled)>,
    reason: &'static str,
    /// The rule's `fieldPath` as a field path (`spec.x`), appended to the node's path.
    field_path: Option<String>,
    transition: bool,
    optional_old_self: bool,
}

/// An instrumented expression and its node count, charged on every evaluation.
#[derive(Debug)]
struct Compiled {
    expr: IdedExpr,
    nodes: u64,
}

impl Rules {
    /// Compiles every rule in the schema tree. `path` is the schema's field path, e.g.
    /// "spec.versions[0].schema.openAPIV3Schema"; errors name the offending
    /// `x-kubernetes-validations[i]` entry below it, in kube's wording.
    pub fn compile(schema: &Value, path: &str) -> Result<Rules, Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut root = build(schema, path, None, &mut errs);
        root.resource = true;
        if errs.is_empty() {
            Ok(Rules { root })
        } else {
            Err(errs)
        }
    }

    /// Whether the schema has any rule (so callers can skip work).
    pub fn is_empty(&self) -> bool {
        !self.root.live
    }

    /// Runs every rule against `obj` (the whole custom object). `old` is the stored object
    /// on update, None on create. See the module docs for what is bound and bounded.
    pub fn check(&self, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let mut run = Run {
            errs: Vec::new(),
            budget: RUNTIME_BUDGET,
            deadline: Instant::now() + CHECK_TIME,
            stopped: false,
        };
        self.root.walk(&mut run, "", obj, Old::from(old));
        run.errs
    }
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn field_error(field: impl Into<String>, reason: &'static str, message: String) -> FieldError {
    let field = field.into();
    FieldError {
        field,
        reason,
        message,
    }
}

fn required(field: String, why: &str) -> FieldError {
    let message = format!("Required value: {why}");
    field_error(field, "FieldValueRequired", message)
}

// ---------------------------------------------------------------- compiling

fn build(schema: &Value, path: &str, unmatched: Option<&str>, errs: &mut Vec<FieldError>) -> Node {
    let get = |k: &str| schema.get(k).filter(|v| !v.is_null());
    let ty = get("type").and_then(Value::as_str).unwrap_or_default();
    let mut node = Node {
        ty: ty.into(),
        resource: get("x-kubernetes-embedded-resource") == Some(&Value::Bool(true)),
        ..Node::default()
    };
    if let Some(props) = get("properties").and_then(Value::as_object) {
        let build_one = |(name, sub): (&String, &Value)| {
            let sub = build(sub, &format!("{path}.properties[{name}]"), unmatched, errs);
            (name.clone(), sub)
        };
        node.properties = Some(props.iter().map(build_one).collect());
    }
    if let Some(sub) = get("additionalProperties").filter(|s| s.is_object()) {
        let at = format!("{path}.additionalProperties");
        node.additional = Some(Box::new(build(sub, &at, unmatched, errs)));
    }
    if get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let keys = get("x-kubernetes-list-map-keys").and_then(Value::as_array);
        let keys = keys.into_iter().flatten().filter_map(Value::as_str);
        node.map_keys = Some(keys.map(String::from).collect());
    }
    if let Some(sub) = get("items").filter(|s| s.is_object()) {
        let at = format!("{path}.items");
        // Only map-list items can be matched with their old selves.
        let unmatched = unmatched.or(node.map_keys.is_none().then_some(at.as_str()));
        node.items = Some(Box::new(build(sub, &at, unmatched, errs)));
    }
    let rules = get("x-kubernetes-validations").and_then(Value::as_array);
    for (i, entry) in rules.into_iter().flatten().enumerate() {
        let at = format!("{path}.x-kubernetes-validations[{i}]");
        let rule = compile_rule(entry, schema, &at, unmatched, errs);
        node.rules.extend(rule);
    }
    let kids = node.properties.iter().flat_map(|p| p.values());
    let mut kids = kids
        .chain(node.additional.as_deref())
        .chain(node.items.as_deref());
    node.live = !node.rules.is_empty() || kids.any(|n| n.live);
    node
}

/// Checks and compiles one `x-kubernetes-validations` entry as kube's CRD validation does.
fn compile_rule(
    entry: &Value,
    schema: &Value,
    at: &str,
    unmatched: Option<&str>,
    errs: &mut Vec<FieldError>,
) -> Option<Rule> {
    let text = |k: &str| entry.get(k).and_then(Value::as_str).map(String::from);
    let (source, message) = (text("rule").unwrap_or_default(), text("message"));
    let before = errs.len();
    let newline = |s: &str| s.contains(['\n', '\r']);
    let msg = message.as_deref().unwrap_or_default();
    let invalid = |what: &str, value: &str, why: &str| {
        FieldError::invalid(format!("{at}.{what}"), value, why)
    };
    if source.trim().is_empty() {
        errs.push(required(format!("{at}.rule"), "rule is not specified"));
        return None;
    } else if !msg.is_empty() && msg.trim().is_empty() {
        let why = "message must be non-empty if specified";
        errs.push(invalid("message", msg, why));
    } else if newline(msg.trim()) {
        let why = "message must not contain line breaks";
        errs.push(invalid("message", msg, why));
    } else if newline(source.trim()) && msg.trim().is_empty() {
        let why = "message must be specified if rule contains line breaks";
        errs.push(required(format!("{at}.message"), why));
    }
    let reason = match text("reason") {
        None => INVALID,
        Some(r) => {
            let known = REASONS.into_iter().find(|known| *known == r);
            known.unwrap_or_else(|| {
                let supported: Vec<String> = REASONS.iter().map(|r| format!("{r:?}")).collect();
                let supported = supported.join(", ");
                let why = format!("Unsupported value: {r:?}: supported values: {supported}");
                let at = format!("{at}.reason");
                errs.push(field_error(at, "FieldValueNotSupported", why));
                INVALID
            })
        }
    };
    let field_path = text("fieldPath").and_then(|fp| {
        let why = if fp.trim().is_empty() {
            "fieldPath must be non-empty if specified".to_string()
        } else if newline(&fp) {
            "fieldPath must not contain line breaks".to_string()
        } else {
            match valid_field_path(&fp, schema) {
                Ok(path) => return Some(path),
                Err(e) => format!("fieldPath must be a valid path: {e}"),
            }
        };
        errs.push(invalid("fieldPath", &fp, &why));
        None
    });

    let (expr, transition) = match compile(&source) {
        Ok(compiled) => compiled,
        Err(why) => {
            errs.push(invalid("rule", &source, &why));
            return None;
        }
    };
    if let (true, Some(within)) = (transition, unmatched) {
        let why = "oldSelf cannot be used on the uncorrelatable portion of the schema within";
        errs.push(invalid("rule", &source, &format!("{why} {within}")));
    }
    let optional_old_self = entry.get("optionalOldSelf") == Some(&Value::Bool(true));
    if optional_old_self && !transition {
        let why = "Invalid value: true: may not be set if rule does not use oldSelf";
        let at = format!("{at}.optionalOldSelf");
        errs.push(field_error(at, INVALID, why.into()));
    }
    let message_expr = match text("messageExpression") {
        Some(m) if m.trim().is_empty() => {
            let why = "messageExpression must be non-empty if specified";
            errs.push(required(format!("{at}.messageExpression"), why));
            None
        }
        Some(m) => match compile(&m) {
            Ok((compiled, _)) => Some((m, compiled)),
            Err(why) => {
                let why = format!("messageExpression {why}");
                errs.push(invalid("messageExpression", &m, &why));
                None
            }
        },
        None => None,
    };
    (errs.len() == before).then_some(Rule {
        source,
        expr,
        message,
        message_expr,
        reason,
        field_path,
        transition,
        optional_old_self,
    })
}

/// The shared environment: the standard library, the strings and math extensions, and the
/// two functions [`Walk`] plants in expressions.
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        let strings = env.add_extension(::cel::extensions::strings);
        let math = env.add_extension(::cel::extensions::math);
        let meter = env.add_overload(METER, "baton_meter", vec![DYN_TYPE], meter);
        (strings.and(math).and(meter)).expect("extending the CEL environment");
        let two = vec![STRING_TYPE, STRING_TYPE];
        let three = vec![STRING_TYPE, STRING_TYPE, INT_TYPE];
        for (id, args) in [("baton_replace", two), ("baton_replace_n", three)] {
            let added = env.add_member_overload(REPLACE, id, STRING_TYPE, args, replace);
            added.expect("replace");
        }
        Arc::new(env)
    })
}

/// Parses and instruments `source`; returns it and whether it uses `oldSelf`, or the detail
/// of kube's error. (Without a type checker, a rule that is not a bool fails when it runs.)
fn compile(source: &str) -> Result<(Compiled, bool), String> {
    let known: Vec<&str> = KNOWN.split(' ').collect();
    compile_with(source, &known)
}

/// [`compile`], with `known` the names the expression may use.
fn compile_with(source: &str, known: &[&str]) -> Result<(Compiled, bool), String> {
    let failed = |e| format!("compilation failed: {e}");
    let program = env().compile(source).map_err(failed)?;
    let mut expr = program.expression().clone();
    let mut walk = Walk::default();
    walk.visit(&mut expr);
    let unknown = walk
        .free
        .iter()
        .find(|(_, n)| !known.iter().any(|k| k == n));
    if let Some((id, name)) = unknown {
        let at = program.source_info().offset_for(*id);
        let at = at.map_or(0, |(start, _)| start as usize);
        let before: Vec<char> = source.chars().take(at).collect();
        let line_no = before.iter().filter(|c| **c == '\n').count() + 1;
        let col = before.iter().rev().take_while(|c| **c != '\n').count();
        let line = source.lines().nth(line_no - 1).unwrap_or_default();
        let dots = ".".repeat(col);
        let col = col + 1;
        return Err(format!("compilation failed: ERROR: <input>:{line_no}:{col}: undeclared reference to '{name}' (in container '')\n| {line}\n| {dots}^"));
    }
    let transition = walk.free.iter().any(|(_, n)| n == "oldSelf");
    let nodes = walk.nodes;
    Ok((Compiled { expr, nodes }, transition))
}

/// kube's `ValidFieldPath`: `.name` and `['name']` steps through properties or map keys,
/// rendered as a field path (`spec.x`, `labels[k]`).
fn valid_field_path(path: &str, schema: &Value) -> Result<String, String> {
    let mut tokens = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        let b = rest.as_bytes();
        let len = match b[0] {
            b'\'' => (1..b.len()).find(|&i| b[i] == b'\'' && b[i - 1] != b'\\'),
            b'.' | b'[' | b']' => Some(0),
            _ => rest.find(['.', '[', ']']).map(|i| i - 1),
        };
        let len = len.map_or(rest.len(), |i| i + 1);
        tokens.push(&rest[..len]);
        rest = &rest[len..];
    }
    let (mut tokens, mut out, mut schema) = (tokens.into_iter(), String::new(), Some(schema));
    let eof = || "unexpected end of JSON path".to_string();
    while let Some(tok) = tokens.next() {
        let name = match tok {
            "." => tokens.next().ok_or_else(eof)?.to_string(),
            "[" => {
                let quoted = tokens.next().ok_or_else(eof)?;
                let inner = quoted.strip_prefix('\'').and_then(|q| q.strip_suffix('\''));
                let inner =
                    inner.ok_or(format!("expected single quoted string but got {quoted}"))?;
                match tokens.next().ok_or_else(eof)? {
                    "]" => inner.replace("\\'", "'").replace("\\\\", "\\"),
                    t => return Err(format!("expected ] but got {t}")),
                }
            }
            t => return Err(format!("expected [ or . but got: {t}")),
        };
        let s = schema.ok_or("does not refer to a valid field")?;
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            schema = Some(props.get(&name).ok_or("does not refer to a valid field")?);
            out = child(&out, &name);
        } else if let Some(add) = s.get("additionalProperties") {
            schema = add.is_object().then_some(add);
            out = format!("{out}[{name}]");
        } else {
            return Err("does not refer to a valid field".into());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- metering

/// One pass over a parsed expression: collects the identifiers no comprehension binds,
/// counts nodes, routes `replace` to our bounded version and plants `@meter` calls.
struct Walk {
    bound: Vec<String>,
    free: Vec<(u64, String)>,
    nodes: u64,
    next: u64,
}

impl Default for Walk {
    fn default() -> Self {
        // Ids above the parser's, for the calls we add.
        let next = 1 << 40;
        Walk {
            bound: Vec::new(),
            free: Vec::new(),
            nodes: 0,
            next,
        }
    }
}

impl Walk {
    fn visit(&mut self, e: &mut IdedExpr) {
        self.nodes += 1;
        match &mut e.expr {
            Expr::Ident(name) if !self.bound.contains(name) => self.free.push((e.id, name.clone())),
            Expr::Call(call) => {
                if let Some(target) = call.target.as_deref_mut() {
                    let namespace = matches!(&target.expr, Expr::Ident(n)
                        if NAMESPACES.contains(&n.as_str()) && !self.bound.contains(n));
                    if !namespace {
                        self.visit(target);
                    }
                }
                call.args.iter_mut().for_each(|a| self.visit(a));
                let args = call.args.len();
                if call.target.is_some() && call.func_name == "replace" && (2..=3).contains(&args) {
                    call.func_name = REPLACE.into();
                }
            }
            Expr::Select(s) => self.visit(&mut s.operand),
            Expr::List(l) => l.elements.iter_mut().for_each(|x| self.visit(x)),
            Expr::Map(m) => m.entries.iter_mut().for_each(|x| self.entry(&mut x.expr)),
            Expr::Struct(s) => s.entries.iter_mut().for_each(|x| self.entry(&mut x.expr)),
            Expr::Comprehension(c) => {
                self.visit(&mut c.iter_range);
                self.visit(&mut c.accu_init);
                let depth = self.bound.len();
                self.bound.extend([c.iter_var.clone(), c.accu_var.clone()]);
                self.bound.extend(c.iter_var2.clone());
                for part in [&mut c.loop_cond, &mut c.loop_step, &mut c.result] {
                    self.visit(part);
                }
                self.bound.truncate(depth);
                self.place_meters(c);
            }
            _ => {}
        }
    }

    fn entry(&mut self, e: &mut EntryExpr) {
        match e {
            EntryExpr::MapEntry(m) => {
                self.visit(&mut m.key);
                self.visit(&mut m.value);
            }
            EntryExpr::StructField(f) => self.visit(&mut f.value),
        }
    }

    /// Puts the meter where its failure ends the loop at once: the loop condition, or for
    /// `map`/`filter` the guard and the appended element, since the crate builds those in
    /// place only while the condition is a literal. Never in an `all`/`exists` step: the
    /// loop carries on past errors there.
    fn place_meters(&mut self, c: &mut ComprehensionExpr) {
        let accu = c.accu_var.clone();
        let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if *n == accu);
        if matches!(c.loop_cond.expr, Expr::Literal(_)) && is_accu(&c.result) {
            if let Some(list) = Self::appended(&mut c.loop_step, &accu) {
                return list.elements.iter_mut().for_each(|x| self.wrap(x));
            }
            if let Expr::Call(cond) = &mut c.loop_step.expr {
                if let [guard, step, otherwise] = cond.args.as_mut_slice() {
                    if cond.func_name == operators::CONDITIONAL && is_accu(otherwise) {
                        if let Some(list) = Self::appended(step, &accu) {
                            list.elements.iter_mut().for_each(|x| self.wrap(x));
                            return self.wrap(guard);
                        }
                    }
                }
            }
        }
        self.wrap(&mut c.loop_cond);
    }

    /// The list literal of a `map`/`filter` step appending to the accumulator.
    fn appended<'e>(e: &'e mut IdedExpr, accu: &str) -> Option<&'e mut ListExpr> {
        let Expr::Call(add) = &mut e.expr else {
            return None;
        };
        match add.args.as_mut_slice() {
            [a, IdedExpr {
                expr: Expr::List(l),
                ..
            }] if add.func_name == operators::ADD
                && matches!(&a.expr, Expr::Ident(n) if n == accu) =>
            {
                Some(l)
            }
            _ => None,
        }
    }

    fn wrap(&mut self, e: &mut IdedExpr) {
        self.next += 1;
        let args = vec![std::mem::take(e)];
        let call = CallExpr {
            func_name: METER.into(),
            target: None,
            args,
        };
        *e = IdedExpr {
            id: self.next,
            expr: Expr::Call(call),
        };
    }
}

/// The budget of the expression being evaluated on this thread. Evaluation is synchronous,
/// so the thread-local is set for exactly one [`Run::eval`]; the crate's overloads are
/// plain `fn`s, which cannot capture it.
struct Meter {
    spent: u64,
    limit: u64,
    deadline: Instant,
    cut: bool,
}

thread_local! {
    static BUDGET: std::cell::RefCell<Option<Meter>> = const { std::cell::RefCell::new(None) };
}

fn charge(units: u64) -> Result<(), ExecutionError> {
    BUDGET.with(|b| {
        let mut b = b.borrow_mut();
        let cut = match b.as_mut() {
            Some(m) => {
                m.spent = m.spent.saturating_add(units);
                m.cut |= m.spent > m.limit || Instant::now() >= m.deadline;
                m.cut
            }
            None => true,
        };
        let cut = cut.then(|| ExecutionError::function_error(METER, CANCELLED));
        cut.map_or(Ok(()), Err)
    })
}

fn meter<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let value = args
        .pop()
        .ok_or_else(ExecutionError::missing_argument_or_target)?;
    charge(size(&*value))?;
    Ok(value)
}

/// Roughly what a value costs to copy: one unit per element, one per 16 bytes of text.
fn size(v: &dyn Val) -> u64 {
    if let Some(list) = v.downcast_ref::<CelList<'_>>() {
        1 + list.inner().iter().map(|x| size(x.as_ref())).sum::<u64>()
    } else if let Some(map) = v.downcast_ref::<CelMap<'_>>() {
        let values = map.inner().values();
        1 + values.map(|x| 1 + size(x.as_ref())).sum::<u64>()
    } else if let Some(s) = v.downcast_ref::<CelString<'_>>() {
        1 + s.inner().len() as u64 / 16
    } else if let Some(b) = v.downcast_ref::<CelBytes<'_>>() {
        1 + b.inner().len() as u64 / 16
    } else {
        1
    }
}

/// The strings extension's `replace`, charging for its result and refusing one over
/// [`MAX_STRING_BYTES`]: `s.replace('', s)` would otherwise square the size of `s`.
fn replace<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let text = |i: usize| Some(args.get(i)?.downcast_ref::<CelString<'_>>()?.inner());
    let n = args.get(3).and_then(|a| a.downcast_ref::<CelInt>());
    let n = n.map_or(-1, |n| *n.inner());
    let (Some(s), Some(from), Some(to)) = (text(0), text(1), text(2)) else {
        return Err(ExecutionError::function_error(
            "replace",
            "expected strings",
        ));
    };
    let found = s.matches(from).count();
    let count = if n < 0 { found } else { found.min(n as usize) };
    let len = (s.len() - count * from.len()) as u128 + (count as u128) * (to.len() as u128);
    charge(1 + (len / 16) as u64)?;
    if len > MAX_STRING_BYTES as u128 {
        let why = format!("result of {len} bytes exceeds the limit of {MAX_STRING_BYTES}");
        return Err(ExecutionError::function_error("replace", why));
    }
    Ok(CowVal::owned(CelString::from(s.replacen(from, to, count))))
}

// ---------------------------------------------------------------- checking

struct Run {
    errs: Vec<FieldError>,
    budget: u64,
    deadline: Instant,
    stopped: bool,
}

/// Why an evaluation was cut short.
enum Cut {
    /// The per-expression limit.
    Call,
    /// What is left of the whole check's budget.
    Budget,
}

impl Run {
    /// Evaluates `c` under a fresh meter, charging the check's budget.
    fn eval(&mut self, c: &Compiled, ctx: &Context<'_, '_>) -> Result<Result<Cel, String>, Cut> {
        let limit = PER_CALL_LIMIT.min(self.budget);
        let deadline = self.deadline.min(Instant::now() + PER_CALL_TIME);
        let cut = c.nodes > limit;
        let fresh = Meter {
            spent: c.nodes,
            limit,
            deadline,
            cut,
        };
        BUDGET.with(|b| *b.borrow_mut() = Some(fresh));
        // A panic in the interpreter must fail this write, not the server's task.
        let run = std::panic::AssertUnwindSafe(|| Cel::resolve(&c.expr, ctx));
        let result = std::panic::catch_unwind(run);
        let m = BUDGET.with(|b| b.borrow_mut().take());
        let (spent, cut) = m.map_or((limit, true), |m| (m.spent, m.cut));
        self.budget = self.budget.saturating_sub(spent);
        if cut {
            self.stopped = true;
            let by_budget = limit < PER_CALL_LIMIT || deadline == self.deadline;
            return Err(if by_budget { Cut::Budget } else { Cut::Call });
        }
        Ok(match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ExecutionError::NoSuchOverload(e))) => Err(format!("'{e}': {NO_OVERLOAD}")),
            Ok(Err(e)) => Err(format!("{e} evaluating rule")),
            Err(_) => Err("internal error evaluating rule".into()),
        })
    }
}

/// A node's old value: the value; none though one could be matched (create, new map key);
/// or not matchable at all (an item of a plain list), with whether the nearest matchable
/// parent is unchanged, which is what ratchets that node's errors.
#[derive(Clone, Copy)]
enum Old<'a> {
    Value(&'a Value),
    Missing,
    Unmatchable(bool),
}

impl<'a> From<Option<&'a Value>> for Old<'a> {
    fn from(v: Option<&'a Value>) -> Self {
        v.filter(|v| !v.is_null()).map_or(Old::Missing, Old::Value)
    }
}

impl<'a> Old<'a> {
    fn value(self) -> Option<&'a Value> {
        match self {
            Old::Value(v) => Some(v),
            _ => None,
        }
    }

    /// Whether a failure here is ratcheted (kube 1.30+): the node, or when it cannot be
    /// matched its nearest matchable parent, equals its old value.
    fn unchanged(self, obj: &Value) -> bool {
        match self {
            Old::Value(o) => o == obj,
            Old::Missing => false,
            Old::Unmatchable(parent) => parent,
        }
    }
}

impl Node {
    fn walk(&self, run: &mut Run, path: &str, obj: &Value, old: Old<'_>) {
        if !self.live || obj.is_null() || run.stopped {
            return;
        }
        if !self.rules.is_empty() {
            self.run_rules(run, path, obj, old);
        }
        match obj {
            Value::Object(map) => {
                for (k, v) in map {
                    let old = match old {
                        Old::Unmatchable(parent) => Old::Unmatchable(parent),
                        _ => Old::from(old.value().and_then(|o| o.get(k))),
                    };
                    if let Some(sub) = self.properties.as_ref().and_then(|p| p.get(k)) {
                        sub.walk(run, &child(path, k), v, old);
                    } else if let Some(sub) = &self.additional {
                        sub.walk(run, &format!("{path}[{k}]"), v, old);
                    }
                }
            }
            Value::Array(list) => {
                let Some(items) = self.items.as_deref().filter(|n| n.live) else {
                    return;
                };
                let key = |item: &Value| {
                    let keys = self.map_keys.iter().flatten();
                    let key: Vec<_> = keys.map(|k| item.get(k).unwrap_or(&Value::Null)).collect();
                    serde_json::to_string(&key).unwrap_or_default()
                };
                let olds: Option<HashMap<String, &Value>> = match old {
                    Old::Unmatchable(_) => None,
                    _ if self.map_keys.is_none() => None,
                    _ => {
                        let olds = old.value().and_then(Value::as_array).into_iter().flatten();
                        Some(olds.map(|o| (key(o), o)).collect())
                    }
                };
                let parent = olds.is_none() && old.unchanged(obj);
                for (i, v) in list.iter().enumerate() {
                    let old = match &olds {
                        Some(by_key) => Old::from(by_key.get(&key(v)).copied()),
                        None => Old::Unmatchable(parent),
                    };
                    items.walk(run, &format!("{path}[{i}]"), v, old);
                }
            }
            _ => {}
        }
    }

    fn run_rules(&self, run: &mut Run, path: &str, obj: &Value, old: Old<'_>) {
        let bind = |v: &Value| -> Box<dyn Val> {
            let value = Box::<dyn Val>::try_from(to_cel(v, Some(self)));
            value.unwrap_or_else(|_| Box::new(CelNull))
        };
        let mut ctx = Context::with_env(Arc::clone(env()));
        ctx.add_variable_as_val("self", bind(obj));
        let here = if path.is_empty() { "<nil>" } else { path };
        let ty = self.ty.as_str();
        let mut ratchet = None;
        for rule in &self.rules {
            if rule.transition {
                let old_self: Box<dyn Val> = match (rule.optional_old_self, old.value()) {
                    (true, Some(o)) => Box::new(CelOptional::of(bind(o))),
                    (true, None) => Box::new(CelOptional::none()),
                    (false, Some(o)) => bind(o),
                    (false, None) => continue,
                };
                ctx.add_variable_as_val("oldSelf", old_self);
            }
            let message = rule
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty());
            let who = message.unwrap_or(rule.source.trim());
            let why = match run.eval(&rule.expr, &ctx) {
                Ok(Ok(Cel::Bool(true))) => continue,
                Ok(Ok(Cel::Bool(false))) => None,
                Ok(Ok(v)) => Some(format!(
                    "{NOT_BOOL}, not {}, evaluating rule: {who}",
                    v.type_of()
                )),
                Ok(Err(e)) => Some(format!("{e}: {who}")),
                Err(Cut::Budget) => Some(BUDGET_GONE.to_string()),
                Err(Cut::Call) => Some(format!("'{CANCELLED}': {CALL_CUT} rule: {who}")),
            };
            if let Some(why) = why {
                run.errs.push(FieldError::invalid(here, ty, why));
                if run.stopped {
                    return;
                }
                continue;
            }
            let at = rule
                .field_path
                .as_ref()
                .map_or(here.to_string(), |fp| child(path, fp));
            let mut detail = None;
            if let Some((src, mexpr)) = &rule.message_expr {
                detail = match run.eval(mexpr, &ctx) {
                    Ok(Ok(Cel::String(s))) => Some(s.trim().to_string()),
                    Ok(_) => None,
                    Err(cut) => {
                        let why = match cut {
                            Cut::Budget => BUDGET_GONE.replacen("validation", MESSAGE_FAILED, 1),
                            Cut::Call => format!("{CALL_CUT} messageExpression: {src:?}"),
                        };
                        return run.errs.push(FieldError::invalid(at, ty, why));
                    }
                };
                // kube falls back to `message` for an unusable result.
                detail = detail.filter(|m| !m.is_empty() && m.len() <= MAX_MESSAGE_BYTES);
                detail = detail.filter(|m| !m.contains('\n'));
            }
            let fallback = || message.map_or(format!("failed rule: {who}"), String::from);
            let detail = detail.unwrap_or_else(fallback);
            // An unchanged value keeps passing updates whatever rules (other than
            // transition rules) say of it; kube turns the error into a warning.
            if !rule.transition && *ratchet.get_or_insert_with(|| old.unchanged(obj)) {
                continue;
            }
            run.errs.push(match rule.reason {
                "FieldValueForbidden" => {
                    field_error(at, rule.reason, format!("Forbidden: {detail}"))
                }
                "FieldValueRequired" => required(at, &detail),
                "FieldValueDuplicate" => {
                    field_error(at, rule.reason, format!("Duplicate value: {ty:?}"))
                }
                _ => FieldError::invalid(at, ty, detail),
            });
        }
    }
}

/// A CEL expression outside a schema (an admission policy's), over named JSON values,
/// run under the same meter as schema rules.
#[derive(Debug)]
pub struct Expression {
    compiled: Compiled,
}

impl Expression {
    /// Parses `source`, which may use the names in `variables` (and CEL's type names).
    pub fn compile(source: &str, variables: &[&str]) -> Result<Self, String> {
        let mut known: Vec<&str> = TYPE_NAMES.split(' ').collect();
        known.extend_from_slice(variables);
        compile_with(source, &known).map(|(compiled, _)| Self { compiled })
    }

    /// Evaluates with `variables` bound; the value as JSON, or why it failed.
    pub fn eval(&self, variables: &[(&str, &Value)]) -> Result<Value, String> {
        let mut ctx = Context::with_env(Arc::clone(env()));
        for (name, value) in variables {
            let v = Box::<dyn Val>::try_from(to_cel(value, None));
            ctx.add_variable_as_val(*name, v.unwrap_or_else(|_| Box::new(CelNull)));
        }
        let mut run = Run {
            errs: Vec::new(),
            budget: PER_CALL_LIMIT,
            deadline: Instant::now() + PER_CALL_TIME,
            stopped: false,
        };
        match run.eval(&self.compiled, &ctx) {
            Ok(Ok(v)) => Ok(from_cel(&v)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CANCELLED.to_string()),
        }
    }
}

/// A CEL value as JSON (what policies' variables and messages hold).
fn from_cel(v: &Cel) -> Value {
    match v {
        Cel::Null => Value::Null,
        Cel::Bool(b) => Value::Bool(*b),
        Cel::Int(i) => Value::from(*i),
        Cel::UInt(u) => Value::from(*u),
        Cel::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Cel::String(s) => Value::String(s.to_string()),
        Cel::List(l) => Value::Array(l.iter().map(from_cel).collect()),
        Cel::Map(m) => Value::Object(
            m.map
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Key::String(s) => s.to_string(),
                        Key::Int(i) => i.to_string(),
                        Key::Uint(u) => u.to_string(),
                        Key::Bool(b) => b.to_string(),
                    };
                    (key, from_cel(v))
                })
                .collect(),
        ),
        other => Value::String(format!("{other:?}")),
    }
}

/// A JSON value as CEL sees it through `node`'s schema: `number` fields are doubles even
/// when written as integers, declared properties go by kube's escaped names and undeclared
/// ones are hidden, and a resource root shows only `metadata.name` and `generateName`.
fn to_cel(v: &Value, node: Option<&Node>) -> Cel {
    let key = |k: &str| Key::String(Arc::new(k.to_string()));
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match (node.is_some_and(|n| n.ty == "number"), n.as_i64()) {
            (false, Some(i)) => Cel::Int(i),
            _ => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(list) => {
            let items = node.and_then(|n| n.items.as_deref());
            Cel::List(Arc::new(list.iter().map(|x| to_cel(x, items)).collect()))
        }
        Value::Object(map) => {
            let mut out = HashMap::new();
            for (k, x) in map {
                let resource = node.is_some_and(|n| n.resource);
                let (name, value) = match node {
                    _ if resource && k == "metadata" => {
                        let keep = ["name", "generateName"].into_iter();
                        let meta = keep.filter_map(|f| Some((key(f), to_cel(x.get(f)?, None))));
                        (
                            key(k),
                            Cel::Map(Map {
                                map: Arc::new(meta.collect()),
                            }),
                        )
                    }
                    _ if resource && (k == "apiVersion" || k == "kind") => {
                        (key(k), to_cel(x, None))
                    }
                    Some(Node {
                        properties: Some(props),
                        ..
                    }) => match (props.get(k), escape(k)) {
                        (Some(sub), Some(name)) => (key(&name), to_cel(x, Some(sub))),
                        _ => continue,
                    },
                    _ => (
                        key(k),
                        to_cel(x, node.and_then(|n| n.additional.as_deref())),
                    ),
                };
                out.insert(name, value);
            }
            Cel::Map(Map { map: Arc::new(out) })
        }
    }
}

/// kube's property-name escaping: `foo-bar` is `foo__dash__bar` in CEL, `namespace` is
/// `__namespace__`; a name that cannot be escaped is not visible to rules.
fn escape(name: &str) -> Option<String> {
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if RESERVED.split_whitespace().any(|r| r == name) {
        return Some(format!("__{name}__"));
    }
    let mut out = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '_' if chars.next_if_eq(&'_').is_some() => out.push_str("__underscores__"),
            '.' => out.push_str("__dot__"),
            '-' => out.push_str("__dash__"),
            '/' => out.push_str("__slash__"),
            c if c.is_ascii_alphanumeric() || c == '_' => out.push(c),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AT: &str = "spec.versions[0].schema.openAPIV3Schema";

    /// A root schema whose `spec` has `rules` and the properties `replicas` and `max`.
    fn spec(rules: Value) -> Value {
        let int = json!({"type": "integer"});
        let props = json!({"replicas": int, "max": int});
        let spec =
            json!({"type": "object", "properties": props, "x-kubernetes-validations": rules});
        json!({"type": "object", "properties": {"spec": spec}})
    }

    fn check(schema: &Value, obj: Value, old: Option<Value>) -> Vec<FieldError> {
        let rules = Rules::compile(schema, AT).expect("compiles");
        rules.check(&obj, old.as_ref())
    }

    fn messages(errs: &[FieldError]) -> Vec<(&str, &str)> {
        errs.iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect()
    }

    #[test]
    fn rules_are_shareable_and_counted() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Rules>();
        assert!(Rules::compile(&spec(json!([])), AT).unwrap().is_empty());
        assert!(!Rules::compile(&spec(json!([{"rule": "true"}])), AT)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn compile_errors_name_the_entry_in_kube_words() {
        let rules = json!([
            {"rule": "self.replicas <"},
            {"rule": "self.a.all(x, x > y)"},
            {"rule": "self.replicas > 0", "reason": "Nope"},
            {"rule": "self.replicas > 0", "fieldPath": ".nosuch"},
            {"rule": "self.replicas > 0", "messageExpression": "'a' +"},
            {"rule": " "},
        ]);
        let errs = Rules::compile(&spec(rules), AT).unwrap_err();
        let got = messages(&errs);
        let at = |i: usize, what: &str| {
            format!("{AT}.properties[spec].x-kubernetes-validations[{i}].{what}")
        };
        assert_eq!(got.len(), 6, "{got:#?}");
        assert_eq!(got[0].0, at(0, "rule"));
        let syntax = "Invalid value: \"self.replicas <\": compilation failed: ERROR: <input>:1:16:";
        assert!(got[0].1.starts_with(syntax), "{}", got[0].1);
        assert_eq!(got[1].0, at(1, "rule"));
        let undeclared = "compilation failed: ERROR: <input>:1:19: undeclared reference to 'y'";
        assert!(got[1].1.contains(undeclared), "{}", got[1].1);
        assert_eq!(got[2].0, at(2, "reason"));
        let reason = "Unsupported value: \"Nope\": supported values: \"FieldValueDuplicate\", ";
        assert!(got[2].1.starts_with(reason));
        assert_eq!(errs[2].reason, "FieldValueNotSupported");
        let field_path = "fieldPath must be a valid path: does not refer to a valid field";
        assert_eq!(
            got[3],
            (
                at(3, "fieldPath").as_str(),
                &*format!("Invalid value: \".nosuch\": {field_path}")
            )
        );
        assert_eq!(got[4].0, at(4, "messageExpression"));
        assert!(got[4]
            .1
            .contains("messageExpression compilation failed: ERROR: <input>:1:"));
        assert_eq!(
            got[5],
            (
                at(5, "rule").as_str(),
                "Required value: rule is not specified"
            )
        );
    }

    #[test]
    fn oldself_is_refused_where_items_cannot_be_matched() {
        let item =
            json!({"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]});
        let list = json!({"type": "array", "items": item});
        let errs =
            Rules::compile(&json!({"type": "object", "properties": {"l": list}}), AT).unwrap_err();
        let within =
            format!("uncorrelatable portion of the schema within {AT}.properties[l].items");
        assert!(errs[0].message.ends_with(&within), "{errs:?}");
    }

    #[test]
    fn failures_carry_the_message_reason_and_field_path() {
        let rules = json!([
            {"rule": "self.replicas <= self.max"},
            {"rule": "self.replicas <= self.max", "message": "too many"},
            {"rule": "self.replicas <= self.max", "message": "m",
             "messageExpression": "'replicas is ' + string(self.replicas)"},
            {"rule": "self.replicas <= self.max", "message": "fallback", "messageExpression": "''"},
            {"rule": "self.replicas <= self.max", "message": "no", "reason": "FieldValueForbidden",
             "fieldPath": ".replicas"},
            {"rule": "self.max > 5", "message": "set max", "reason": "FieldValueRequired",
             "fieldPath": "['max']"},
            {"rule": "self.nosuch == 1"},
            {"rule": "self.max + 1"},
        ]);
        let schema = spec(rules);
        let errs = check(&schema, json!({"spec": {"replicas": 5, "max": 2}}), None);
        let object = "Invalid value: \"object\"";
        assert_eq!(messages(&errs), [
            ("spec", &*format!("{object}: failed rule: self.replicas <= self.max")),
            ("spec", &format!("{object}: too many")),
            ("spec", &format!("{object}: replicas is 5")),
            ("spec", &format!("{object}: fallback")),
            ("spec.replicas", "Forbidden: no"),
            ("spec.max", "Required value: set max"),
            ("spec", &format!("{object}: No such key: nosuch evaluating rule: self.nosuch == 1")),
            ("spec", &format!("{object}: cel expression must evaluate to a bool, not int, evaluating rule: self.max + 1")),
        ]);
        let reasons: Vec<&str> = errs.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons[3..6],
            [
                "FieldValueInvalid",
                "FieldValueForbidden",
                "FieldValueRequired"
            ]
        );
        let fine = check(&schema, json!({"spec": {"replicas": 1, "max": 6}}), None);
        assert_eq!(fine.len(), 2, "only the runtime failures: {fine:?}");
    }

    #[test]
    fn transition_rules_run_only_with_an_old_value() {
        let name = json!({"type": "string", "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": "name is immutable"}]});
        let spec = json!({"type": "object", "properties": {"name": name}});
        let schema = json!({"type": "object", "properties": {"spec": spec}});
        let named = |n: &str| json!({"spec": {"name": n}});
        assert_eq!(check(&schema, named("a"), None), []);
        assert_eq!(check(&schema, named("a"), Some(named("a"))), []);
        assert_eq!(check(&schema, named("b"), Some(json!({"spec": {}}))), []);
        let errs = check(&schema, named("b"), Some(named("a")));
        assert_eq!(
            errs,
            [FieldError::invalid(
                "spec.name",
                "string",
                "name is immutable"
            )]
        );
    }

    #[test]
    fn rules_run_per_item_and_per_map_value() {
        let item = json!({"type": "object",
            "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
            "x-kubernetes-validations": [
                {"rule": "self.size >= 0", "message": "negative"},
                {"rule": "self.size >= oldSelf.size", "message": "shrunk"}]});
        let items = json!({"type": "array", "items": item,
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]});
        let label = json!({"type": "string", "x-kubernetes-validations": [{"rule": "self.startsWith('x')"}]});
        let labels = json!({"type": "object", "additionalProperties": label});
        let spec = json!({"type": "object", "properties": {"items": items, "labels": labels},
            "x-kubernetes-validations": [{"rule": "self.items.all(i, i.name != '')"}]});
        let schema = json!({"type": "object", "properties": {"spec": spec}});
        let items =
            json!([{"name": "a", "size": 1}, {"name": "b", "size": -1}, {"name": "c", "size": 1}]);
        let obj = json!({"spec": {"items": items, "labels": {"ok": "xy", "foo": "bar"}}});
        let old = json!({"spec": {"items": [{"name": "c", "size": 2}, {"name": "a", "size": 1}]}});
        assert_eq!(
            messages(&check(&schema, obj, Some(old))),
            [
                ("spec.items[1]", "Invalid value: \"object\": negative"),
                ("spec.items[2]", "Invalid value: \"object\": shrunk"),
                (
                    "spec.labels[foo]",
                    "Invalid value: \"string\": failed rule: self.startsWith('x')"
                ),
            ]
        );
    }

    #[test]
    fn values_are_bound_the_way_kube_types_them() {
        let props = json!({"foo-bar": {"type": "number"}, "namespace": {"type": "string"},
            "n": {"x-kubernetes-int-or-string": true}});
        let rules = json!([
            {"rule": "self.foo__dash__bar == 2.0 && type(self.foo__dash__bar) == double"},
            {"rule": "self.__namespace__ == 'ns' && !has(self.hidden)"},
            {"rule": "type(self.n) == int || self.n.endsWith('%')"},
        ]);
        let spec =
            json!({"type": "object", "properties": props, "x-kubernetes-validations": rules});
        let schema = json!({"type": "object", "properties": {"spec": spec}});
        let obj = json!({"spec": {"foo-bar": 2, "namespace": "ns", "hidden": 1, "n": "5%"}});
        assert_eq!(check(&schema, obj, None), []);
        let rule = "self.metadata.name == 'x' && !has(self.metadata.labels) && self.kind == 'K'";
        let root = json!({"type": "object", "x-kubernetes-validations": [{"rule": rule}]});
        let obj = json!({"kind": "K", "metadata": {"name": "x", "labels": {"a": "b"}}});
        assert_eq!(check(&root, obj, None), []);
        let errs = check(&root, json!({"kind": "K", "metadata": {"name": "y"}}), None);
        assert_eq!(errs[0].field, "<nil>");
    }

    #[test]
    fn unchanged_values_are_ratcheted_on_update() {
        let schema = spec(json!([{"rule": "self.replicas <= self.max"}]));
        let bad = json!({"spec": {"replicas": 5, "max": 2}});
        assert_eq!(check(&schema, bad.clone(), Some(bad.clone())), []);
        let before = json!({"spec": {"replicas": 4, "max": 2}});
        assert_eq!(check(&schema, bad, Some(before)).len(), 1);
    }

    #[test]
    fn runaway_rules_are_cut_off() {
        let list = json!({"type": "array", "items": {"type": "integer"}});
        let props = json!({"l": list, "s": {"type": "string"}});
        let schema = |rules: Value| {
            let spec =
                json!({"type": "object", "properties": props, "x-kubernetes-validations": rules});
            json!({"type": "object", "properties": {"spec": spec}})
        };
        let cubic = "self.l.all(a, self.l.all(b, self.l.all(c, a + b + c >= 0)))";
        let rules = json!([{"rule": cubic}, {"rule": "true"}]);
        let started = Instant::now();
        let l: Vec<i64> = (0..300).collect();
        let errs = check(&schema(rules), json!({"spec": {"l": l}}), None);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(errs.len(), 1, "the check stops: {errs:?}");
        assert!(
            errs[0].message.contains("call cost exceeds limit for rule"),
            "{errs:?}"
        );

        let l: Vec<i64> = (0..5000).collect();
        let obj = json!({"spec": {"s": "x".repeat(100_000), "l": l}});
        for rule in [
            "self.s.replace('', self.s).size() > 0",
            "self.l.map(x, self.l).size() > 0",
        ] {
            let errs = check(&schema(json!([{ "rule": rule }])), obj.clone(), None);
            assert!(
                errs[0].message.contains("call cost exceeds limit"),
                "{errs:?}"
            );
        }
    }
}
