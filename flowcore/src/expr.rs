//! Templates (`"hello {{ input.name }}"`) and expressions (`input.n > 5`), compiled once with
//! minijinja and evaluated against a run's data without copying it.
//!
//! A template is split into literal text and `{{ expr }}` pieces at compile time; each piece is
//! a compiled minijinja expression held by the plan. A template that is exactly one `{{ expr }}`
//! keeps the expression's JSON type (`"{{ input.n }}"` gives a number, as in n8n). Templates with
//! block tags (`{% for %}`) are checked at compile time and rendered by minijinja in full.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value as JValue};
use minijinja::{Environment, Expression as JExpression, UndefinedBehavior};
use serde_json::Value;

use crate::error::ParamError;

/// The names a template or expression may use at its top level.
pub const SCOPE_NAMES: [&str; 5] = ["input", "nodes", "attempt", "trigger", "run"];

/// The most VM instructions one template or expression evaluation may execute.
pub const MAX_FUEL: u64 = 5_000_000;

/// The most one rendering may produce: the bytes of a rendered string, or the estimated memory
/// of a value turned into JSON (its text, plus 32 bytes for each array item and object field).
/// minijinja builds lists lazily (`[[0]*5000]*3000` is 3,000 references to one list); this is
/// what stops them from growing into millions of JSON values.
pub const MAX_RENDERED_BYTES: usize = 32 * 1024 * 1024;

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // Lenient, as in Jinja: a missing field renders empty and tests false, but an attribute of a
    // missing value (`input.missing.deeper`) is an error, so a wrong path shows up.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_recursion_limit(64);
    // Bounds the work of one evaluation, so that `{% for %}` loops nested in a template cannot
    // hang a run (fuzzing found this for inputs like nested `range(100000)`).
    env.set_fuel(Some(MAX_FUEL));
    // `namespace()` is the one way a template carries values from one loop iteration to the
    // next; with it, `{% set ns.a = [ns.a] %}` in a loop nests a value a hundred thousand
    // levels deep (whose drop overflows the stack and aborts the process), and `ns.s ~ ns.s`
    // doubles a string each turn. Loop-carried state belongs in a `script` node.
    env.remove_global("namespace");
    // Booleans as JSON writes them (`true`), not as Python does (`True`, minijinja's default,
    // for Jinja's sake): a flag in a string, a URL or a JSON body means JSON's.
    env.set_formatter(|out, state, value| {
        if value.kind() == minijinja::value::ValueKind::Bool {
            out.write_str(if value.is_true() { "true" } else { "false" })?;
            return Ok(());
        }
        minijinja::escape_formatter(out, state, value)
    });
    env
});

/// A compiled expression, such as a branch condition.
pub struct Expression {
    source: Box<str>,
    compiled: JExpression<'static, 'static>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl Expression {
    /// Compiles an expression.
    ///
    /// ```
    /// let e = flowcore::expr::Expression::compile("input.n > 5").unwrap();
    /// let input = std::sync::Arc::new(serde_json::json!({"n": 7}));
    /// assert_eq!(e.eval_json(&flowcore::expr::Scope::input_only(input)).unwrap(), serde_json::json!(true));
    /// assert!(flowcore::expr::Expression::compile("input.n >").is_err());
    /// ```
    pub fn compile(source: &str) -> Result<Self, ParamError> {
        let compiled = ENV
            .compile_expression_owned(source.to_owned())
            .map_err(|e| {
                ParamError::new(format!("invalid expression `{source}`: {}", describe(&e)))
            })?;
        Ok(Self {
            source: source.into(),
            compiled,
        })
    }

    /// The expression's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a minijinja value.
    pub fn eval(&self, scope: &Scope) -> Result<JValue, String> {
        self.compiled
            .eval(scope.to_value())
            .map_err(|e| format!("`{}`: {}", self.source, describe(&e)))
    }

    /// Evaluates to JSON.
    pub fn eval_json(&self, scope: &Scope) -> Result<Value, String> {
        self.eval(scope).and_then(|v| to_json(&v))
    }

    /// Evaluates to a boolean with Jinja truthiness.
    pub fn eval_bool(&self, scope: &Scope) -> Result<bool, String> {
        self.eval(scope).map(|v| v.is_true())
    }

    /// The top-level names and `nodes.<id>` references the expression uses.
    pub fn references(&self) -> References {
        References::from_names(self.compiled.undeclared_variables(true))
    }
}

#[derive(Debug)]
enum Piece {
    Text(Box<str>),
    Expr(Expression),
}

#[derive(Debug)]
enum Kind {
    /// No `{{` at all: the text as is.
    Literal(Box<str>),
    /// Exactly one `{{ expr }}`: the expression's own JSON value.
    Single(Expression),
    /// Text mixed with expressions: rendered to a string.
    Pieces(Vec<Piece>),
    /// Block tags or whitespace control: minijinja renders the full template.
    Full {
        source: Box<str>,
        references: References,
    },
}

/// A compiled string template.
#[derive(Debug)]
pub struct Template(Kind);

impl Template {
    /// Compiles a template.
    ///
    /// ```
    /// use flowcore::expr::{Scope, Template};
    /// let t = Template::compile("hello {{ input.name }}").unwrap();
    /// let scope = Scope::input_only(std::sync::Arc::new(serde_json::json!({"name": "ada"})));
    /// assert_eq!(t.render(&scope).unwrap(), serde_json::json!("hello ada"));
    /// ```
    pub fn compile(source: &str) -> Result<Self, ParamError> {
        if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
            return Ok(Self(Kind::Literal(source.into())));
        }
        if !source.contains("{%")
            && !source.contains("{#")
            && let Some(pieces) = split_pieces(source)
        {
            let mut compiled = Vec::with_capacity(pieces.len());
            for piece in pieces {
                compiled.push(match piece {
                    RawPiece::Text(t) => Piece::Text(t.into()),
                    RawPiece::Expr(e) => {
                        Piece::Expr(Expression::compile(e.trim()).map_err(|e| {
                            ParamError::new(format!(
                                "invalid template `{source}`: {}",
                                strip_prefix(&e.0)
                            ))
                        })?)
                    }
                });
            }
            if compiled.len() == 1 && matches!(compiled[0], Piece::Expr(_)) {
                let Some(Piece::Expr(e)) = compiled.pop() else {
                    unreachable!("checked above")
                };
                return Ok(Self(Kind::Single(e)));
            }
            return Ok(Self(Kind::Pieces(compiled)));
        }
        let template = ENV.template_from_str(source).map_err(|e| {
            ParamError::new(format!("invalid template `{source}`: {}", describe(&e)))
        })?;
        let references = References::from_names(template.undeclared_variables(true));
        Ok(Self(Kind::Full {
            source: source.into(),
            references,
        }))
    }

    /// Whether the template has no `{{ }}` at all.
    pub fn is_literal(&self) -> bool {
        matches!(self.0, Kind::Literal(_))
    }

    /// Renders: a string, or the expression's JSON value for a template that is one `{{ expr }}`.
    pub fn render(&self, scope: &Scope) -> Result<Value, String> {
        match &self.0 {
            Kind::Literal(s) => Ok(Value::String(s.to_string())),
            Kind::Single(e) => e.eval_json(scope),
            _ => self.render_string(scope).map(Value::String),
        }
    }

    /// Renders to a string whatever the template holds.
    pub fn render_string(&self, scope: &Scope) -> Result<String, String> {
        use std::fmt::Write;
        match &self.0 {
            Kind::Literal(s) => Ok(s.to_string()),
            Kind::Single(e) => {
                let v = e.eval(scope)?;
                let mut out = Bounded::default();
                write_value(&mut out, &v)?;
                Ok(out.text)
            }
            Kind::Pieces(pieces) => {
                let mut out = Bounded::default();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => out.write_str(t).map_err(|_| too_large())?,
                        Piece::Expr(e) => {
                            write_value(&mut out, &e.eval(scope)?)?;
                        }
                    }
                }
                Ok(out.text)
            }
            Kind::Full { source, .. } => {
                let template = ENV.template_from_str(source).map_err(|e| describe(&e))?;
                let mut out = Bounded::default();
                match template.render_captured_to(scope.to_value(), Io(&mut out)) {
                    Ok(_) => Ok(out.text),
                    Err(_) if out.over => Err(too_large()),
                    Err(e) => Err(describe(&e)),
                }
            }
        }
    }

    /// The top-level names and `nodes.<id>` references the template uses.
    pub fn references(&self) -> References {
        match &self.0 {
            Kind::Literal(_) => References::default(),
            Kind::Single(e) => e.references(),
            Kind::Pieces(pieces) => {
                let mut refs = References::default();
                for piece in pieces {
                    if let Piece::Expr(e) = piece {
                        refs.merge(e.references());
                    }
                }
                refs
            }
            Kind::Full { references, .. } => references.clone(),
        }
    }
}

/// Writes `v` as a `{{ }}` in a string shows it: nothing for none or undefined, booleans as
/// JSON writes them (as the environment's formatter does for whole templates).
fn write_value(out: &mut Bounded, v: &minijinja::Value) -> Result<(), String> {
    use std::fmt::Write;
    let written = match v.kind() {
        minijinja::value::ValueKind::Undefined | minijinja::value::ValueKind::None => Ok(()),
        minijinja::value::ValueKind::Bool => {
            out.write_str(if v.is_true() { "true" } else { "false" })
        }
        _ => write!(out, "{v}"),
    };
    written.map_err(|_| too_large())
}

/// A JSON value whose strings are templates, compiled: `{"a": "{{ input.x }}", "b": [1, "{{ attempt }}"]}`.
#[derive(Debug)]
pub enum ValueTemplate {
    /// A string template.
    Template(Template),
    /// An array of value templates.
    Array(Vec<ValueTemplate>),
    /// An object of value templates.
    Object(Vec<(String, ValueTemplate)>),
    /// Any other JSON value, kept as is.
    Plain(Value),
}

impl ValueTemplate {
    /// Compiles every string inside `value` as a template.
    pub fn compile(value: &Value) -> Result<Self, ParamError> {
        Ok(match value {
            Value::String(s) => Self::Template(Template::compile(s)?),
            Value::Array(items) => {
                Self::Array(items.iter().map(Self::compile).collect::<Result<_, _>>()?)
            }
            Value::Object(map) => Self::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), Self::compile(v)?)))
                    .collect::<Result<_, ParamError>>()?,
            ),
            other => Self::Plain(other.clone()),
        })
    }

    /// Renders to JSON.
    pub fn render(&self, scope: &Scope) -> Result<Value, String> {
        Ok(match self {
            Self::Template(t) => t.render(scope)?,
            Self::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.render(scope))
                    .collect::<Result<_, _>>()?,
            ),
            Self::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(scope)?)))
                    .collect::<Result<_, String>>()?,
            ),
            Self::Plain(v) => v.clone(),
        })
    }

    /// Every reference of every template inside.
    pub fn references(&self) -> References {
        let mut refs = References::default();
        match self {
            Self::Template(t) => refs.merge(t.references()),
            Self::Array(items) => items.iter().for_each(|i| refs.merge(i.references())),
            Self::Object(fields) => fields.iter().for_each(|(_, v)| refs.merge(v.references())),
            Self::Plain(_) => {}
        }
        refs
    }
}

/// What a template or expression refers to, for compile-time checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Top-level names other than the scope's (`input`, `nodes`, `attempt`) and minijinja's globals.
    pub unknown: BTreeSet<String>,
    /// Node ids used as `nodes.<id>`.
    pub nodes: BTreeSet<String>,
}

impl References {
    fn from_names(names: impl IntoIterator<Item = String>) -> Self {
        let mut refs = Self::default();
        for name in names {
            let mut parts = name.split('.');
            let root = parts.next().unwrap_or_default();
            if root == "nodes" {
                if let Some(id) = parts.next() {
                    refs.nodes.insert(id.to_owned());
                }
            } else if !SCOPE_NAMES.contains(&root) && ENV.globals().all(|(g, _)| g != root) {
                refs.unknown.insert(root.to_owned());
            }
        }
        refs
    }

    /// Adds another set of references.
    pub fn merge(&mut self, other: References) {
        self.unknown.extend(other.unknown);
        self.nodes.extend(other.nodes);
    }
}

enum RawPiece<'a> {
    Text(&'a str),
    Expr(&'a str),
}

/// Splits `a {{ x }} b` into text and expression pieces. `None` when the template needs the full
/// engine: whitespace control (`{{-`), or a `{{` without its `}}` (the full parser then reports
/// the error with minijinja's message).
fn split_pieces(source: &str) -> Option<Vec<RawPiece<'_>>> {
    let mut pieces = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            pieces.push(RawPiece::Text(&rest[..start]));
        }
        let body = &rest[start + 2..];
        if body.starts_with('-') {
            return None;
        }
        let end = find_close(body)?;
        let expr = &body[..end];
        if expr.ends_with('-') || expr.trim().is_empty() {
            return None;
        }
        pieces.push(RawPiece::Expr(expr));
        rest = &body[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(RawPiece::Text(rest));
    }
    Some(pieces)
}

/// The byte offset of the `}}` closing an expression, skipping string literals.
fn find_close(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut quote = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'}' && bytes.get(i + 1) == Some(&b'}') => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

fn strip_prefix(message: &str) -> &str {
    message.split_once(": ").map_or(message, |(_, rest)| rest)
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{detail} ({})", e.kind()),
        None => e.kind().to_string(),
    }
}

fn too_large() -> String {
    format!(
        "the rendered value is larger than {} MB",
        MAX_RENDERED_BYTES / (1024 * 1024)
    )
}

/// A string that refuses to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct Bounded {
    text: String,
    over: bool,
}

impl std::fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.text.len() + s.len() > MAX_RENDERED_BYTES {
            self.over = true;
            return Err(std::fmt::Error);
        }
        self.text.push_str(s);
        Ok(())
    }
}

/// [`Bounded`] as the `io::Write` that minijinja renders into (it writes UTF-8 only).
struct Io<'a>(&'a mut Bounded);

impl std::io::Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::fmt::Write as _;
        let text = std::str::from_utf8(buf).map_err(std::io::Error::other)?;
        self.0
            .write_str(text)
            .map_err(|_| std::io::Error::other(too_large()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts what a value would cost as JSON while it is serialized, and stops past the limit.
struct Cost(usize);

impl std::io::Write for Cost {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let items = buf
            .iter()
            .filter(|b| matches!(b, b',' | b'[' | b'{'))
            .count();
        self.0 = self.0.saturating_add(buf.len() + 32 * items);
        if self.0 > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other("too large"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Converts a minijinja value to JSON; undefined becomes `null`. Refused past
/// [`MAX_RENDERED_BYTES`], measured before the JSON is built.
pub fn to_json(v: &JValue) -> Result<Value, String> {
    if v.is_undefined() {
        return Ok(Value::Null);
    }
    let mut cost = Cost(0);
    if v.as_str().is_none()
        && serde_json::to_writer(&mut cost, v).is_err()
        && cost.0 > MAX_RENDERED_BYTES
    {
        return Err(too_large());
    }
    serde_json::to_value(v).map_err(|e| format!("value cannot be turned into JSON: {e}"))
}

/// Looks up a completed node's output by id, for `nodes.<id>`.
pub trait NodeOutputs: Send + Sync + std::fmt::Debug {
    /// The output of node `id` if it has finished and its output is visible to this node.
    fn get(&self, id: &str) -> Option<Arc<Value>>;
    /// The ids of the visible outputs, for iteration in templates.
    fn ids(&self) -> Vec<String>;
}

/// The data a template or expression sees: `input`, `nodes` and `attempt`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Scope(JValue);

#[derive(Debug, Clone)]
struct ScopeObject {
    input: Arc<Value>,
    nodes: Option<Arc<dyn NodeOutputs>>,
    attempt: u32,
    trigger: Option<Arc<Value>>,
    run: Option<Arc<Value>>,
    /// A `map` item and its index, for the templates that make the item's input.
    item: Option<(Arc<Value>, usize)>,
}

impl Scope {
    /// A scope over a run's input, the completed nodes' outputs and the attempt number.
    pub fn new(input: Arc<Value>, nodes: Arc<dyn NodeOutputs>, attempt: u32) -> Self {
        Self(JValue::from_object(ScopeObject {
            input,
            nodes: Some(nodes),
            attempt,
            trigger: None,
            run: None,
            item: None,
        }))
    }

    /// A run's scope, with `trigger`: what started the run (a webhook's chosen headers), and
    /// `run`: the run itself (`{"id"}`).
    pub(crate) fn for_run(
        input: Arc<Value>,
        nodes: Arc<dyn NodeOutputs>,
        attempt: u32,
        trigger: Option<Arc<Value>>,
        run: Arc<Value>,
    ) -> Self {
        Self(JValue::from_object(ScopeObject {
            input,
            nodes: Some(nodes),
            attempt,
            trigger,
            run: Some(run),
            item: None,
        }))
    }

    /// This scope with `item` and `index` (what a `map` node renders an item's input in).
    pub fn with_item(&self, item: Arc<Value>, index: usize) -> Self {
        let mut object = self
            .0
            .downcast_object_ref::<ScopeObject>()
            .cloned()
            .unwrap_or_else(|| ScopeObject {
                input: Arc::new(Value::Null),
                nodes: None,
                attempt: 1,
                trigger: None,
                run: None,
                item: None,
            });
        object.item = Some((item, index));
        Self(JValue::from_object(object))
    }

    /// A scope with only `input` (and `attempt` = 1), for tests and one-off evaluation.
    pub fn input_only(input: Arc<Value>) -> Self {
        Self(JValue::from_object(ScopeObject {
            input,
            nodes: None,
            attempt: 1,
            trigger: None,
            run: None,
            item: None,
        }))
    }

    fn to_value(&self) -> JValue {
        self.0.clone()
    }
}

impl Object for ScopeObject {
    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match key.as_str()? {
            "input" => Some(json_value(&self.input, &[])),
            "nodes" => Some(JValue::from_object(NodesObject(self.nodes.clone()))),
            "attempt" => Some(JValue::from(self.attempt)),
            "trigger" => Some(match &self.trigger {
                Some(trigger) => json_value(trigger, &[]),
                None => JValue::from(()),
            }),
            "run" => Some(match &self.run {
                Some(run) => json_value(run, &[]),
                None => JValue::from(()),
            }),
            "item" => self.item.as_ref().map(|(item, _)| json_value(item, &[])),
            "index" => self.item.as_ref().map(|(_, index)| JValue::from(*index)),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&SCOPE_NAMES)
    }
}

#[derive(Debug)]
struct NodesObject(Option<Arc<dyn NodeOutputs>>);

impl Object for NodesObject {
    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let out = self.0.as_ref()?.get(key.as_str()?)?;
        Some(json_value(&out, &[]))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let ids = self.0.as_ref().map(|n| n.ids()).unwrap_or_default();
        Enumerator::Values(ids.into_iter().map(JValue::from).collect())
    }
}

/// A lazy view of a JSON value inside a shared document: only what a template touches is
/// converted, so a 20 MB node output costs nothing unless a template walks all of it.
#[derive(Debug)]
struct JsonView {
    root: Arc<Value>,
    path: Vec<PathSeg>,
}

#[derive(Debug, Clone)]
enum PathSeg {
    Key(Arc<str>),
    Index(usize),
}

impl JsonView {
    fn target(&self) -> &Value {
        let mut v = &*self.root;
        for seg in &self.path {
            v = match (seg, v) {
                (PathSeg::Key(k), Value::Object(m)) => &m[&**k],
                (PathSeg::Index(i), Value::Array(a)) => &a[*i],
                _ => unreachable!("paths are built only from existing entries"),
            };
        }
        v
    }

    fn child(&self, seg: PathSeg) -> JValue {
        let mut path = self.path.clone();
        path.push(seg);
        json_value(&self.root, &path)
    }
}

fn json_value(root: &Arc<Value>, path: &[PathSeg]) -> JValue {
    let view = JsonView {
        root: root.clone(),
        path: path.to_vec(),
    };
    match view.target() {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                JValue::from(i)
            } else if let Some(u) = n.as_u64() {
                JValue::from(u)
            } else {
                JValue::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => JValue::from(s.as_str()),
        Value::Array(_) | Value::Object(_) => JValue::from_object(view),
    }
}

impl Object for JsonView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.target() {
            Value::Array(_) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match self.target() {
            Value::Object(m) => {
                let k = key.as_str()?;
                m.get_key_value(k)
                    .map(|(k, _)| self.child(PathSeg::Key(Arc::from(k.as_str()))))
            }
            Value::Array(a) => {
                let i = usize::try_from(key.as_i64()?).ok()?;
                (i < a.len()).then(|| self.child(PathSeg::Index(i)))
            }
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.target() {
            Value::Object(m) => {
                Enumerator::Values(m.keys().map(|k| JValue::from(k.as_str())).collect())
            }
            Value::Array(a) => Enumerator::Values(
                (0..a.len())
                    .map(|i| self.child(PathSeg::Index(i)))
                    .collect(),
            ),
            _ => Enumerator::Empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(v: Value) -> Scope {
        Scope::input_only(Arc::new(v))
    }

    #[test]
    fn literal_single_and_mixed() {
        let s = scope(json!({"n": 7, "name": "ada", "list": [1, 2], "o": {"k": "v"}}));
        assert_eq!(
            Template::compile("plain").unwrap().render(&s).unwrap(),
            json!("plain")
        );
        assert_eq!(
            Template::compile("{{ input.n }}")
                .unwrap()
                .render(&s)
                .unwrap(),
            json!(7)
        );
        assert_eq!(
            Template::compile("{{ input.o }}")
                .unwrap()
                .render(&s)
                .unwrap(),
            json!({"k": "v"})
        );
        assert_eq!(
            Template::compile("n={{ input.n + 1 }}!")
                .unwrap()
                .render(&s)
                .unwrap(),
            json!("n=8!")
        );
        assert_eq!(
            Template::compile("{{ input.list[1] }}")
                .unwrap()
                .render(&s)
                .unwrap(),
            json!(2)
        );
        assert_eq!(
            Template::compile("{{ '}}' }}").unwrap().render(&s).unwrap(),
            json!("}}")
        );
        let flags = scope(json!({"yes": true, "no": false}));
        assert_eq!(
            Template::compile("{{ input.yes }}/{{ input.no }}/{{ 1 == 2 }}")
                .unwrap()
                .render(&flags)
                .unwrap(),
            json!("true/false/false"),
            "booleans in a string as JSON writes them"
        );
        assert_eq!(
            Template::compile("{{ input.yes }}")
                .unwrap()
                .render(&flags)
                .unwrap(),
            json!(true),
            "a whole template keeps the boolean"
        );
        assert_eq!(
            Template::compile("{% if input.yes %}{{ input.no }}{% endif %}")
                .unwrap()
                .render(&flags)
                .unwrap(),
            json!("false"),
            "and so do statements"
        );
        let full = Template::compile("{% for x in input.list %}{{ x }},{% endfor %}").unwrap();
        assert_eq!(full.render(&s).unwrap(), json!("1,2,"));
        assert_eq!(
            Template::compile("{{ input.list | length }}")
                .unwrap()
                .render(&s)
                .unwrap(),
            json!(2)
        );
    }

    #[test]
    fn bad_templates_and_expressions_are_refused() {
        assert!(Template::compile("{{ input. }}").is_err());
        assert!(Template::compile("{% for %}").is_err());
        assert!(Template::compile("{{ unclosed").is_err());
        assert!(Expression::compile("1 +").is_err());
    }

    #[test]
    fn references_name_nodes_and_unknown_roots() {
        let t = Template::compile("{{ nodes.a.x }} {{ inptu.y }} {{ range(3) | list }}").unwrap();
        let r = t.references();
        assert_eq!(r.nodes.into_iter().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(r.unknown.into_iter().collect::<Vec<_>>(), vec!["inptu"]);
    }

    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let t = Template::compile(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = t.render(&scope(json!({}))).unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn conditions() {
        let e = Expression::compile("input.n > 5 and input.name == 'ada'").unwrap();
        assert!(e.eval_bool(&scope(json!({"n": 6, "name": "ada"}))).unwrap());
        assert!(!e.eval_bool(&scope(json!({"n": 5, "name": "ada"}))).unwrap());
    }
}
