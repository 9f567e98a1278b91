//! Pipeline expressions: the `#{...}` language of DG:dp-pipeline-expressions.md, evaluated by
//! `datapipeline-local` the way the web service does before it hands objects to a task runner
//! (SPEC-NOTES §13). Pure: no I/O, no clock. The store hands in a [`Scope`] (the pipeline's objects,
//! the current object, the parameter values) and gets strings back.
//!
//! The language, as implemented here:
//! - references: `#{myField}` (a field of the current object, else a parameter), `#{input.directoryPath}`
//!   (through reference fields, transitively for user-defined fields; a runtime `@field` may be read
//!   through at most one reference, as the guide says), `#{parent.@id}`, `#{node.@scheduledStartTime}`;
//! - literals: integers, floats, `'single'` and `"double"` quoted strings (backslash escapes);
//! - `+ - * / ^` with the guide's rules: integer division truncates, `^` always gives a float
//!   (`2 ^ 2` is `4.0`), `+` concatenates as soon as one side is a string;
//! - every date-time function of DG:dp-pipeline-reference-functions-datetime.md, also in the method
//!   form `#{@scheduledStartTime.format('YYYY-MM-dd')}`, with Joda-Time `DateTimeFormat` patterns.
//!
//! Values that come from fields and parameters are untyped text: they print verbatim (`007` stays
//! `007`), act as a number in arithmetic when they read as one, and as a DateTime where a function
//! wants one. A DateTime prints as `2012-12-12T00:00:00`, a float as Java prints a double (`4.0`).
//!
//! Lists (repeated fields, parameters with several values) follow the guide: `'this is ' + myList`
//! is a list, and lists flatten. How a list lands in a string field is our choice, documented on
//! [`evaluate`] and [`evaluate_list`]: joined with `,` in a single string; as repeated fields (one per
//! element) in [`evaluate_object`] when the field holds one list-valued expression.

use crate::model::{Field, PipelineObject};
use crate::period::{format_datetime, parse_datetime};
use chrono::{DateTime, Datelike, Duration as ChronoDuration, Months, NaiveDate, Timelike, Utc};
use std::collections::BTreeMap;

/// What an expression is evaluated against.
pub struct Scope<'a> {
    /// Every object of the pipeline by id, with inherited and runtime fields as string fields.
    pub objects: &'a BTreeMap<String, PipelineObject>,
    /// The id of the object whose fields are evaluated.
    pub current: &'a str,
    /// Parameter values by parameter id; several values make a list.
    pub params: &'a BTreeMap<String, Vec<String>>,
}

/// Why an expression could not be evaluated. Each variant names the expression text.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExprError {
    #[error("unterminated expression in {template:?}: the `#{{` at byte {offset} has no closing `}}`")]
    Unterminated { template: String, offset: usize },
    #[error("syntax error in `#{{{expr}}}`: {message}")]
    Syntax { expr: String, message: String },
    #[error("unknown function `{name}` in `#{{{expr}}}`")]
    UnknownFunction { name: String, expr: String },
    #[error("unknown field `{field}` in `#{{{expr}}}`: object `{object}` has no such field and no parameter has that id")]
    UnknownField {
        field: String,
        object: String,
        expr: String,
    },
    #[error("unknown object `{object}` in `#{{{expr}}}`")]
    UnknownObject { object: String, expr: String },
    #[error("type error in `#{{{expr}}}`: {message}")]
    Type { expr: String, message: String },
    #[error("cannot evaluate `#{{{expr}}}`: {message}")]
    Eval { expr: String, message: String },
    /// An error inside a field reached from the expression (or being evaluated by
    /// [`evaluate_object`]).
    #[error("field `{field}` of object `{object}`: {cause}")]
    InField {
        object: String,
        field: String,
        cause: Box<ExprError>,
    },
}

/// Replaces each `#{...}` in `template`, evaluated in the context of `scope.current`. A list value is
/// written as its elements joined with `,` (no spaces).
pub fn evaluate(template: &str, scope: &Scope) -> Result<String, ExprError> {
    let mut ev = Evaluator::new(scope, None);
    ev.object(scope.current).map_err(|f| f.at(template))?;
    let values = ev.template_values(scope.current, template)?;
    Ok(values.join(","))
}

/// Like [`evaluate`], but a list stays a list: when exactly one `#{...}` of the template yields a
/// list, the template gives one string per element (`"s3://b/#{myList}"` -> `["s3://b/one",
/// "s3://b/two"]`). With several list-valued expressions they are joined with `,` into one string.
pub fn evaluate_list(template: &str, scope: &Scope) -> Result<Vec<String>, ExprError> {
    let mut ev = Evaluator::new(scope, None);
    ev.object(scope.current).map_err(|f| f.at(template))?;
    ev.template_values(scope.current, template)
}

/// Keys whose values are used verbatim (DG:dp-pipeline-expressions.md: slots of type ID, NAME,
/// TYPE, SPHERE are never evaluated; reference fields neither).
const VERBATIM_KEYS: [&str; 5] = ["id", "name", "type", "@id", "@sphere"];

/// Evaluates every string field of `obj` (which need not be in `scope.objects`; its own fields are
/// read from `obj`). Reference fields and id/name/type/sphere stay verbatim. A field whose value
/// evaluates to a list becomes repeated fields with the same key, as the API carries lists.
pub fn evaluate_object(obj: &PipelineObject, scope: &Scope) -> Result<PipelineObject, ExprError> {
    let mut ev = Evaluator::new(scope, Some(obj));
    let mut fields = Vec::with_capacity(obj.fields.len());
    for f in &obj.fields {
        let text = match &f.string_value {
            Some(s)
                if f.ref_value.is_none() && s.contains("#{") && !VERBATIM_KEYS.contains(&f.key.as_str()) =>
            {
                s
            }
            _ => {
                fields.push(f.clone());
                continue;
            }
        };
        let values = ev
            .template_values(&obj.id, text)
            .map_err(|e| in_field(&obj.id, &f.key, e))?;
        fields.extend(values.into_iter().map(|v| Field::string(f.key.clone(), v)));
    }
    Ok(PipelineObject {
        id: obj.id.clone(),
        name: obj.name.clone(),
        fields,
    })
}

fn in_field(object: &str, field: &str, cause: ExprError) -> ExprError {
    ExprError::InField {
        object: object.to_string(),
        field: field.to_string(),
        cause: Box::new(cause),
    }
}

// ---------------------------------------------------------------------------------------------
// Templates: literal text with `#{...}` pieces.

#[derive(Debug, PartialEq)]
enum Piece<'t> {
    Text(&'t str),
    Expr(&'t str),
}

/// Splits a template into text and expression sources. The closing `}` is the first one outside a
/// quoted string, so `#{format(x,'}')}` works.
fn split_template(template: &str) -> Result<Vec<Piece<'_>>, ExprError> {
    let mut pieces = Vec::new();
    let mut rest_start = 0;
    while let Some(found) = template[rest_start..].find("#{") {
        let open = rest_start + found;
        if open > rest_start {
            pieces.push(Piece::Text(&template[rest_start..open]));
        }
        let body_start = open + 2;
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in template[body_start..].char_indices() {
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '\'' | '"' => quote = Some(c),
                    '}' => {
                        close = Some(body_start + i);
                        break;
                    }
                    _ => {}
                },
            }
        }
        let close = close.ok_or_else(|| ExprError::Unterminated {
            template: template.to_string(),
            offset: open,
        })?;
        pieces.push(Piece::Expr(&template[body_start..close]));
        rest_start = close + 1;
    }
    if rest_start < template.len() {
        pieces.push(Piece::Text(&template[rest_start..]));
    }
    Ok(pieces)
}

// ---------------------------------------------------------------------------------------------
// Tokens.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Int(i64),
    Float(f64),
    Str(String),
    Ident(String),
    Plus,
    Minus,
    Star,
    Slash,
    Caret,
    LParen,
    RParen,
    Comma,
    Dot,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '@'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks: Vec<Tok> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // An operand may start here (not after a value): decides `.5` and `*password`.
        let operand_position = !matches!(
            toks.last(),
            Some(Tok::Int(_) | Tok::Float(_) | Tok::Str(_) | Tok::Ident(_) | Tok::RParen)
        );
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && operand_position && next.is_some_and(|n| n.is_ascii_digit()))
        {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let mut is_float = false;
            if i < chars.len() && chars[i] == '.' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()) {
                is_float = true;
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let text: String = chars[start..i].iter().collect();
            if i < chars.len() && is_ident_char(chars[i]) {
                return Err(format!("malformed number starting {text:?}"));
            }
            if is_float {
                let v: f64 = text.parse().map_err(|_| format!("malformed number {text:?}"))?;
                toks.push(Tok::Float(v));
            } else {
                let v: i64 = text.parse().map_err(|_| format!("integer {text} is too large"))?;
                toks.push(Tok::Int(v));
            }
        } else if c == '\'' || c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(format!("unterminated string literal starting with {c}")),
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(&e) => s.push(e),
                            None => return Err("unterminated string literal (ends with \\)".into()),
                        }
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&other) => {
                        s.push(other);
                        i += 1;
                    }
                }
            }
            toks.push(Tok::Str(s));
        } else if is_ident_start(c) || (c == '*' && operand_position && next.is_some_and(is_ident_start)) {
            // `*name` is an encrypted field (DG:dp-pipeline-characters.md) where an operand is expected.
            let start = i;
            i += 1;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            toks.push(match c {
                '+' => Tok::Plus,
                '-' => Tok::Minus,
                '*' => Tok::Star,
                '/' => Tok::Slash,
                '^' => Tok::Caret,
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                ',' => Tok::Comma,
                '.' => Tok::Dot,
                other => return Err(format!("unexpected character {other:?}")),
            });
            i += 1;
        }
    }
    Ok(toks)
}

// ---------------------------------------------------------------------------------------------
// Syntax tree and parser (recursive descent).

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

#[derive(Debug, PartialEq)]
enum Expr {
    Int(i64),
    Float(f64),
    Str(String),
    /// `a.b.c`: a name, then fields read through references.
    Path(Vec<String>),
    /// `(expr).field`, e.g. a field of what a parenthesised path gives.
    Member(Box<Expr>, String),
    /// `f(args)`; the method form `x.f(args)` is `f(x, args)`.
    Call(String, Vec<Expr>),
    Neg(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
}

/// Deeper trees are refused: evaluation recurses, and a server thread must not overflow its stack
/// on `((((((...` or `1+1+1+...` (release builds abort on panic).
const MAX_EXPR_DEPTH: u32 = 40;
/// How many fields deep one evaluation may follow expressions inside referenced fields.
const MAX_FIELD_DEPTH: usize = 16;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

type Parsed = Result<(Expr, u32), String>;

fn node(e: Expr, depth: u32) -> Parsed {
    if depth > MAX_EXPR_DEPTH {
        Err(format!(
            "expression nested more than {MAX_EXPR_DEPTH} levels deep"
        ))
    } else {
        Ok((e, depth))
    }
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "the end of the expression".into(),
        Some(Tok::Int(v)) => format!("number {v}"),
        Some(Tok::Float(v)) => format!("number {v}"),
        Some(Tok::Str(s)) => format!("string {s:?}"),
        Some(Tok::Ident(s)) => format!("name `{s}`"),
        Some(t) => format!(
            "`{}`",
            match t {
                Tok::Plus => "+",
                Tok::Minus => "-",
                Tok::Star => "*",
                Tok::Slash => "/",
                Tok::Caret => "^",
                Tok::LParen => "(",
                Tok::RParen => ")",
                Tok::Comma => ",",
                _ => ".",
            }
        ),
    }
}

impl Parser {
    fn parse(src: &str) -> Result<Expr, String> {
        let toks = tokenize(src)?;
        if toks.is_empty() {
            return Err("empty expression".into());
        }
        let mut p = Parser { toks, pos: 0 };
        let (e, _) = p.additive(0)?;
        if p.pos < p.toks.len() {
            return Err(format!(
                "unexpected {} after a complete expression",
                describe(p.peek())
            ));
        }
        Ok(e)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, t: &Tok, what: &str) -> Result<(), String> {
        if self.eat(t) {
            Ok(())
        } else {
            Err(format!("expected {what}, found {}", describe(self.peek())))
        }
    }

    fn additive(&mut self, depth: u32) -> Parsed {
        let (mut lhs, mut d) = self.multiplicative(depth + 1)?;
        loop {
            let op = match self.peek() {
                Some(Tok::Plus) => Op::Add,
                Some(Tok::Minus) => Op::Sub,
                _ => return Ok((lhs, d)),
            };
            self.pos += 1;
            let (rhs, rd) = self.multiplicative(depth + 1)?;
            let nd = d.max(rd) + 1;
            (lhs, d) = node(Expr::Bin(op, Box::new(lhs), Box::new(rhs)), nd)?;
        }
    }

    fn multiplicative(&mut self, depth: u32) -> Parsed {
        let (mut lhs, mut d) = self.power(depth + 1)?;
        loop {
            let op = match self.peek() {
                Some(Tok::Star) => Op::Mul,
                Some(Tok::Slash) => Op::Div,
                _ => return Ok((lhs, d)),
            };
            self.pos += 1;
            let (rhs, rd) = self.power(depth + 1)?;
            let nd = d.max(rd) + 1;
            (lhs, d) = node(Expr::Bin(op, Box::new(lhs), Box::new(rhs)), nd)?;
        }
    }

    /// `^` binds tighter than `*` and associates to the right (`2^3^2` is `2^9`).
    fn power(&mut self, depth: u32) -> Parsed {
        if depth > MAX_EXPR_DEPTH * 4 {
            return Err(format!(
                "expression nested more than {MAX_EXPR_DEPTH} levels deep"
            ));
        }
        let (base, bd) = self.unary(depth + 1)?;
        if self.eat(&Tok::Caret) {
            let (exp, ed) = self.power(depth + 1)?;
            return node(Expr::Bin(Op::Pow, Box::new(base), Box::new(exp)), bd.max(ed) + 1);
        }
        Ok((base, bd))
    }

    fn unary(&mut self, depth: u32) -> Parsed {
        if depth > MAX_EXPR_DEPTH * 4 {
            return Err(format!(
                "expression nested more than {MAX_EXPR_DEPTH} levels deep"
            ));
        }
        if self.eat(&Tok::Minus) {
            let (e, d) = self.unary(depth + 1)?;
            return node(Expr::Neg(Box::new(e)), d + 1);
        }
        if self.eat(&Tok::Plus) {
            return self.unary(depth + 1);
        }
        self.postfix(depth + 1)
    }

    fn postfix(&mut self, depth: u32) -> Parsed {
        let (mut e, mut d) = self.primary(depth + 1)?;
        while self.eat(&Tok::Dot) {
            let name = match self.peek() {
                Some(Tok::Ident(n)) => n.clone(),
                other => {
                    return Err(format!(
                        "expected a field or function name after `.`, found {}",
                        describe(other)
                    ))
                }
            };
            self.pos += 1;
            if self.peek() == Some(&Tok::LParen) {
                // Method form: `@scheduledStartTime.format('YYYY')` is `format(@scheduledStartTime, 'YYYY')`.
                self.pos += 1;
                let (mut args, ad) = self.args(depth + 1)?;
                args.insert(0, e);
                let nd = d.max(ad) + 1;
                (e, d) = node(Expr::Call(name, args), nd)?;
            } else if let Expr::Path(segs) = &mut e {
                segs.push(name);
            } else {
                (e, d) = node(Expr::Member(Box::new(e), name), d + 1)?;
            }
        }
        Ok((e, d))
    }

    /// Arguments after `(` up to and including `)`.
    fn args(&mut self, depth: u32) -> Result<(Vec<Expr>, u32), String> {
        let mut args = Vec::new();
        let mut d = 0;
        if self.eat(&Tok::RParen) {
            return Ok((args, d));
        }
        loop {
            let (a, ad) = self.additive(depth + 1)?;
            args.push(a);
            d = d.max(ad);
            if self.eat(&Tok::RParen) {
                return Ok((args, d));
            }
            self.expect(&Tok::Comma, "`,` or `)` in the argument list")?;
        }
    }

    fn primary(&mut self, depth: u32) -> Parsed {
        if depth > MAX_EXPR_DEPTH * 4 {
            return Err(format!(
                "expression nested more than {MAX_EXPR_DEPTH} levels deep"
            ));
        }
        let t = self.peek().cloned();
        self.pos += 1;
        match t {
            Some(Tok::Int(v)) => Ok((Expr::Int(v), 1)),
            Some(Tok::Float(v)) => Ok((Expr::Float(v), 1)),
            Some(Tok::Str(s)) => Ok((Expr::Str(s), 1)),
            Some(Tok::LParen) => {
                let (e, d) = self.additive(depth + 1)?;
                self.expect(&Tok::RParen, "`)`")?;
                Ok((e, d))
            }
            Some(Tok::Ident(name)) => {
                if self.eat(&Tok::LParen) {
                    let (args, ad) = self.args(depth + 1)?;
                    node(Expr::Call(name, args), ad + 1)
                } else {
                    Ok((Expr::Path(vec![name]), 1))
                }
            }
            other => {
                self.pos -= 1;
                Err(format!("expected a value, found {}", describe(other.as_ref())))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values.

#[derive(Clone, Debug, PartialEq)]
enum Value {
    /// Text from a field or parameter: untyped, coerced by what uses it.
    Text(String),
    /// A string literal or a function's string result.
    Str(String),
    Int(i64),
    Float(f64),
    DateTime(DateTime<Utc>),
    /// A reference to an object (by id).
    Ref(String),
    List(Vec<Value>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Text(_) | Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::DateTime(_) => "a DateTime",
            Value::Ref(_) => "an object reference",
            Value::List(_) => "a list",
        }
    }

    /// How the value prints in a string field. Lists are flattened and joined with `,`.
    fn render(&self) -> String {
        match self {
            Value::Text(s) | Value::Str(s) | Value::Ref(s) => s.clone(),
            Value::Int(v) => v.to_string(),
            Value::Float(v) => java_double(*v),
            Value::DateTime(t) => format_datetime(*t),
            Value::List(items) => items.iter().map(Value::render).collect::<Vec<_>>().join(","),
        }
    }

    fn flatten_into(self, out: &mut Vec<Value>) {
        match self {
            Value::List(items) => items.into_iter().for_each(|v| v.flatten_into(out)),
            v => out.push(v),
        }
    }

    fn from_list(mut items: Vec<Value>) -> Value {
        if items.len() == 1 {
            items.pop().unwrap()
        } else {
            Value::List(items)
        }
    }
}

/// A double as Java's `Double.toString` prints it (`4.0`, `0.5`, `1.0E7`): the service runs on the JVM
/// and the guide shows `2 ^ 2` as `4.0`.
fn java_double(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = v.abs();
    if a == 0.0 || (1e-3..1e7).contains(&a) {
        let s = format!("{v}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{v:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        if m.contains('.') {
            format!("{m}E{e}")
        } else {
            format!("{m}.0E{e}")
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Num {
    I(i64),
    F(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::I(v) => v as f64,
            Num::F(v) => v,
        }
    }
}

fn parse_num(s: &str) -> Option<Num> {
    let t = s.trim();
    if let Ok(v) = t.parse::<i64>() {
        return Some(Num::I(v));
    }
    // Only plain decimals: "NaN", "inf" and "1e5" are text, not numbers, in a pipeline field.
    let plain = !t.is_empty()
        && t.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-')
        && t.chars().any(|c| c.is_ascii_digit());
    if plain {
        t.parse::<f64>().ok().map(Num::F)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

/// Why evaluating one expression failed, before the expression text is attached.
enum Fail {
    UnknownFunction(String),
    UnknownField {
        field: String,
        object: String,
    },
    UnknownObject(String),
    Type(String),
    Eval(String),
    /// Already complete (from a field reached through a reference).
    Nested(ExprError),
}

impl Fail {
    fn at(self, expr: &str) -> ExprError {
        let expr = expr.to_string();
        match self {
            Fail::UnknownFunction(name) => ExprError::UnknownFunction { name, expr },
            Fail::UnknownField { field, object } => ExprError::UnknownField { field, object, expr },
            Fail::UnknownObject(object) => ExprError::UnknownObject { object, expr },
            Fail::Type(message) => ExprError::Type { expr, message },
            Fail::Eval(message) => ExprError::Eval { expr, message },
            Fail::Nested(e) => e,
        }
    }
}

type Res = Result<Value, Fail>;

/// Fields that refer to an alarm or precondition; the object holding one is that alarm's or
/// precondition's `node` (DG:dp-pipeline-expressions.md, "Node Expression").
const NODE_REFERRER_KEYS: [&str; 4] = ["precondition", "onFail", "onSuccess", "onLateAction"];

struct Evaluator<'s, 'a> {
    scope: &'s Scope<'a>,
    /// The object given to `evaluate_object`, which may differ from (or be absent in) `scope.objects`.
    own: Option<&'s PipelineObject>,
    /// (object, field) pairs being evaluated, to refuse circular references.
    stack: Vec<(String, String)>,
}

impl<'s, 'a> Evaluator<'s, 'a> {
    fn new(scope: &'s Scope<'a>, own: Option<&'s PipelineObject>) -> Self {
        Evaluator {
            scope,
            own,
            stack: Vec::new(),
        }
    }

    fn object(&self, id: &str) -> Result<&'s PipelineObject, Fail> {
        if let Some(o) = self.own.filter(|o| o.id == id) {
            return Ok(o);
        }
        self.scope
            .objects
            .get(id)
            .ok_or_else(|| Fail::UnknownObject(id.to_string()))
    }

    /// Evaluates a template in the context of `obj_id` into one string, or one per list element
    /// (see [`evaluate_list`]).
    fn template_values(&mut self, obj_id: &str, template: &str) -> Result<Vec<String>, ExprError> {
        let pieces = split_template(template)?;
        let mut parts: Vec<Result<String, Vec<Value>>> = Vec::with_capacity(pieces.len());
        let mut list_parts = 0;
        for p in pieces {
            match p {
                Piece::Text(t) => parts.push(Ok(t.to_string())),
                Piece::Expr(src) => match self.expr_source(obj_id, src)? {
                    Value::List(items) => {
                        let mut flat = Vec::new();
                        items.into_iter().for_each(|v| v.flatten_into(&mut flat));
                        list_parts += 1;
                        parts.push(Err(flat));
                    }
                    v => parts.push(Ok(v.render())),
                },
            }
        }
        let render_all = |parts: &[Result<String, Vec<Value>>]| -> String {
            parts
                .iter()
                .map(|p| match p {
                    Ok(s) => s.clone(),
                    Err(items) => Value::List(items.clone()).render(),
                })
                .collect()
        };
        if list_parts != 1 {
            return Ok(vec![render_all(&parts)]);
        }
        let (idx, items) = parts
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.as_ref().err().map(|items| (i, items.clone())))
            .expect("one list part");
        Ok(items
            .iter()
            .map(|item| {
                let mut one = parts.clone();
                one[idx] = Ok(item.render());
                render_all(&one)
            })
            .collect())
    }

    /// Parses and evaluates the text between `#{` and `}`.
    fn expr_source(&mut self, obj_id: &str, src: &str) -> Result<Value, ExprError> {
        let expr = Parser::parse(src).map_err(|message| ExprError::Syntax {
            expr: src.to_string(),
            message,
        })?;
        self.eval(&expr, obj_id).map_err(|f| f.at(src))
    }

    /// The value of a field holding text with expressions, evaluated in its own object's context.
    /// A field that is exactly one expression keeps its type (a DateTime stays a DateTime).
    fn field_text(&mut self, obj_id: &str, key: &str, text: &str) -> Res {
        if self.stack.iter().any(|(o, k)| o == obj_id && k == key) {
            let chain: Vec<String> = self
                .stack
                .iter()
                .map(|(o, k)| format!("{o}.{k}"))
                .chain(std::iter::once(format!("{obj_id}.{key}")))
                .collect();
            return Err(Fail::Eval(format!("circular reference: {}", chain.join(" -> "))));
        }
        if self.stack.len() >= MAX_FIELD_DEPTH {
            return Err(Fail::Eval(format!(
                "references nested more than {MAX_FIELD_DEPTH} fields deep"
            )));
        }
        self.stack.push((obj_id.to_string(), key.to_string()));
        let result = (|| -> Result<Value, ExprError> {
            let pieces = split_template(text)?;
            if let [Piece::Expr(src)] = pieces.as_slice() {
                return self.expr_source(obj_id, src);
            }
            let values = self.template_values(obj_id, text)?;
            Ok(Value::from_list(values.into_iter().map(Value::Text).collect()))
        })();
        self.stack.pop();
        result.map_err(|e| Fail::Nested(in_field(obj_id, key, e)))
    }

    fn eval(&mut self, e: &Expr, obj_id: &str) -> Res {
        match e {
            Expr::Int(v) => Ok(Value::Int(*v)),
            Expr::Float(v) => Ok(Value::Float(*v)),
            Expr::Str(s) => Ok(Value::Str(s.clone())),
            Expr::Path(segs) => self.path(obj_id, segs),
            Expr::Member(inner, name) => {
                let v = self.eval(inner, obj_id)?;
                self.member(v, name, name)
            }
            Expr::Neg(inner) => {
                let v = self.eval(inner, obj_id)?;
                map_list(v, &mut |v| match as_num(&v)? {
                    Num::I(i) => i
                        .checked_neg()
                        .map(Value::Int)
                        .ok_or_else(|| Fail::Eval("integer overflow".into())),
                    Num::F(f) => Ok(Value::Float(-f)),
                })
            }
            Expr::Bin(op, l, r) => {
                let a = self.eval(l, obj_id)?;
                let b = self.eval(r, obj_id)?;
                binop(*op, a, b)
            }
            Expr::Call(name, args) => {
                let f = FUNCTIONS
                    .iter()
                    .find(|f| f.name == name)
                    .ok_or_else(|| Fail::UnknownFunction(name.clone()))?;
                if args.len() != f.arity {
                    return Err(Fail::Type(format!(
                        "{}() takes {} argument{}, {} given: {}",
                        f.name,
                        f.arity,
                        if f.arity == 1 { "" } else { "s" },
                        args.len(),
                        f.signature
                    )));
                }
                let mut values = Vec::with_capacity(args.len());
                for a in args {
                    values.push(self.eval(a, obj_id)?);
                }
                call(f, values)
            }
        }
    }

    fn path(&mut self, obj_id: &str, segs: &[String]) -> Res {
        let mut v = self.resolve(obj_id, &segs[0], true)?;
        for (hops, seg) in segs.iter().enumerate().skip(1) {
            // DG:dp-pipeline-expressions.md: "transitive references for user-defined fields, but not
            // runtime fields". `@id` is always known, so it is allowed at any depth.
            if hops >= 2 && seg.starts_with('@') && seg != "@id" {
                return Err(Fail::Eval(format!(
                    "the runtime field `{seg}` cannot be read through more than one reference (`{}`): \
                     transitive references work for user-defined fields only",
                    segs.join(".")
                )));
            }
            let prefix = segs[..hops].join(".");
            v = self.member(v, seg, &prefix)?;
        }
        Ok(v)
    }

    fn member(&mut self, v: Value, name: &str, prefix: &str) -> Res {
        match v {
            Value::Ref(id) => self.resolve(&id, name, false),
            Value::List(items) => {
                let mut out = Vec::new();
                for item in items {
                    self.member(item, name, prefix)?.flatten_into(&mut out);
                }
                Ok(Value::List(out))
            }
            other => Err(Fail::Type(format!(
                "`{prefix}` is {}, not a reference to an object, so it has no field `{name}`",
                other.type_name()
            ))),
        }
    }

    /// A name in the context of object `obj_id`: `node`, `parent`, a field, `@id`/`id`/`name`, and
    /// (only at the start of a path) a parameter.
    fn resolve(&mut self, obj_id: &str, name: &str, head: bool) -> Res {
        let obj = self.object(obj_id)?;
        match name {
            "node" if obj.get_ref("node").is_none() => return self.node_of(obj).map(Value::Ref),
            "parent" => return Ok(Value::Ref(self.parent_of(obj))),
            _ => {}
        }
        let fields: Vec<&'s Field> = obj.fields.iter().filter(|f| f.key == name).collect();
        if !fields.is_empty() {
            let mut values = Vec::with_capacity(fields.len());
            for f in fields {
                if let Some(r) = &f.ref_value {
                    values.push(Value::Ref(r.clone()));
                } else if let Some(s) = &f.string_value {
                    if s.contains("#{") {
                        let obj_id = obj.id.clone();
                        values.push(self.field_text(&obj_id, name, s)?);
                    } else {
                        values.push(Value::Text(s.clone()));
                    }
                }
            }
            return Ok(Value::from_list(values));
        }
        match name {
            "@id" | "id" => return Ok(Value::Text(obj.id.clone())),
            "name" => return Ok(Value::Text(obj.name.clone())),
            _ => {}
        }
        if head {
            if let Some(vals) = self.scope.params.get(name) {
                return Ok(Value::from_list(vals.iter().cloned().map(Value::Text).collect()));
            }
        }
        Err(Fail::UnknownField {
            field: name.to_string(),
            object: obj.id.clone(),
        })
    }

    /// The object that refers to this precondition or alarm. An explicit `node` reference field
    /// wins (the store sets one on instances); otherwise the one object that names this one in
    /// `precondition`, `onFail`, `onSuccess` or `onLateAction`.
    fn node_of(&self, obj: &PipelineObject) -> Result<String, Fail> {
        let referrers: Vec<&String> = self
            .scope
            .objects
            .values()
            .filter(|o| o.id != obj.id)
            .filter(|o| {
                o.fields.iter().any(|f| {
                    NODE_REFERRER_KEYS.contains(&f.key.as_str()) && f.ref_value.as_deref() == Some(&obj.id)
                })
            })
            .map(|o| &o.id)
            .collect();
        match referrers.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Fail::Eval(format!(
                "`node` is only available in preconditions and alarms: no object refers to `{}` \
                 through precondition/onFail/onSuccess/onLateAction",
                obj.id
            ))),
            many => Err(Fail::Eval(format!(
                "`node` of `{}` is ambiguous: it is referred to by {}",
                obj.id,
                many.iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// What `parent` means in an expression. For an instance or attempt it is the component it
    /// came from (`#{parent.@id}` on `@Node_2012-..` is `Node`, DG:dp-pipeline-expressions.md);
    /// for a component, its `parent` reference if it has one, else the object itself (the guide's
    /// `ExampleDataNode` has no parent and `#{parent.@id}` gives `ExampleDataNode`).
    fn parent_of(&self, obj: &PipelineObject) -> String {
        if let Some(c) = obj.get_ref("@componentParent") {
            return c.to_string();
        }
        if let Some(c) = obj
            .get_ref("@instanceParent")
            .and_then(|i| self.object(i).ok())
            .and_then(|i| i.get_ref("@componentParent"))
        {
            return c.to_string();
        }
        obj.get_ref("parent").unwrap_or(&obj.id).to_string()
    }
}

/// Applies `f` to a value, or to each element of a list.
fn map_list(v: Value, f: &mut dyn FnMut(Value) -> Res) -> Res {
    match v {
        Value::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(map_list(item, f)?);
            }
            Ok(Value::List(out))
        }
        v => f(v),
    }
}

fn as_num(v: &Value) -> Result<Num, Fail> {
    match v {
        Value::Int(i) => Ok(Num::I(*i)),
        Value::Float(f) => Ok(Num::F(*f)),
        Value::Text(s) | Value::Str(s) => {
            parse_num(s).ok_or_else(|| Fail::Type(format!("{s:?} is a string, not a number")))
        }
        other => Err(Fail::Type(format!(
            "expected a number, got {} ({})",
            other.type_name(),
            other.render()
        ))),
    }
}

fn binop(op: Op, a: Value, b: Value) -> Res {
    // Lists: the guide's `'this is ' + myList` maps over the list; two lists concatenate (flatten).
    match (a, b) {
        (Value::List(x), Value::List(y)) if op == Op::Add => {
            let mut out = Vec::new();
            x.into_iter().chain(y).for_each(|v| v.flatten_into(&mut out));
            Ok(Value::List(out))
        }
        (Value::List(_), Value::List(_)) => Err(Fail::Type(format!(
            "{} needs at most one list operand",
            op_name(op)
        ))),
        (Value::List(x), b) => map_list(Value::List(x), &mut |v| binop(op, v, b.clone())),
        (a, Value::List(y)) => map_list(Value::List(y), &mut |v| binop(op, a.clone(), v)),
        (a, b) => scalar_binop(op, a, b),
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Add => "`+`",
        Op::Sub => "`-`",
        Op::Mul => "`*`",
        Op::Div => "`/`",
        Op::Pow => "`^`",
    }
}

fn scalar_binop(op: Op, a: Value, b: Value) -> Res {
    if op == Op::Add {
        // DG:dp-pipeline-reference-functions-string.md: "Non-string values are first converted to strings".
        let is_num = |v: &Value| matches!(v, Value::Int(_) | Value::Float(_));
        let concat = match (&a, &b) {
            (Value::Str(_), _) | (_, Value::Str(_)) | (Value::Text(_), Value::Text(_)) => true,
            // Text from a field that reads as a number adds (`#{myCount + 1}`); other text concatenates.
            (Value::Text(s), n) | (n, Value::Text(s)) if is_num(n) => parse_num(s).is_none(),
            (Value::Text(_), _) | (_, Value::Text(_)) => true,
            (x, y) if is_num(x) && is_num(y) => false,
            _ => {
                return Err(Fail::Type(format!(
                    "cannot add {} ({}) and {} ({}); use plusDays/plusHours/... for date arithmetic, \
                     or a string to concatenate",
                    a.type_name(),
                    a.render(),
                    b.type_name(),
                    b.render()
                )))
            }
        };
        if concat {
            return Ok(Value::Str(a.render() + &b.render()));
        }
    }
    let (x, y) = (as_num(&a)?, as_num(&b)?);
    let overflow = || Fail::Eval("integer overflow".into());
    Ok(match (op, x, y) {
        (Op::Pow, x, y) => Value::Float(x.f().powf(y.f())),
        (Op::Div, _, y) if y.f() == 0.0 => return Err(Fail::Eval("division by zero".into())),
        (Op::Add, Num::I(x), Num::I(y)) => Value::Int(x.checked_add(y).ok_or_else(overflow)?),
        (Op::Sub, Num::I(x), Num::I(y)) => Value::Int(x.checked_sub(y).ok_or_else(overflow)?),
        (Op::Mul, Num::I(x), Num::I(y)) => Value::Int(x.checked_mul(y).ok_or_else(overflow)?),
        // Integer division truncates (DG:dp-pipeline-reference-functions-math.md: `1 / 2` is `0`).
        (Op::Div, Num::I(x), Num::I(y)) => Value::Int(x.checked_div(y).ok_or_else(overflow)?),
        (Op::Add, x, y) => Value::Float(x.f() + y.f()),
        (Op::Sub, x, y) => Value::Float(x.f() - y.f()),
        (Op::Mul, x, y) => Value::Float(x.f() * y.f()),
        (Op::Div, x, y) => Value::Float(x.f() / y.f()),
    })
}

// ---------------------------------------------------------------------------------------------
// Functions (DG:dp-pipeline-reference-functions-datetime.md).

struct Function {
    name: &'static str,
    arity: usize,
    signature: &'static str,
    imp: fn(&[Value]) -> Res,
}

macro_rules! f {
    ($name:literal, $arity:literal, $sig:literal, $imp:expr) => {
        Function {
            name: $name,
            arity: $arity,
            signature: $sig,
            imp: $imp,
        }
    };
}

const FUNCTIONS: &[Function] = &[
    f!("day", 1, "int day(DateTime)", |a| Ok(Value::Int(
        date(&a[0])?.day().into()
    ))),
    f!("dayOfYear", 1, "int dayOfYear(DateTime)", |a| Ok(Value::Int(
        date(&a[0])?.ordinal().into()
    ))),
    f!("firstOfMonth", 1, "DateTime firstOfMonth(DateTime)", |a| {
        // The guide keeps the time of day: firstOfMonth(2011-05-24T17:10) is 2011-05-01T17:10.
        let t = date(&a[0])?;
        Ok(Value::DateTime(t - ChronoDuration::days(i64::from(t.day0()))))
    }),
    f!("format", 2, "String format(DateTime, String)", |a| {
        let pattern = match &a[1] {
            Value::Str(s) | Value::Text(s) => s,
            other => {
                return Err(Fail::Type(format!(
                    "format() wants a pattern string, got {}",
                    other.type_name()
                )))
            }
        };
        joda_format(date(&a[0])?, pattern)
            .map(Value::Str)
            .map_err(Fail::Eval)
    }),
    f!("hour", 1, "int hour(DateTime)", |a| Ok(Value::Int(
        date(&a[0])?.hour().into()
    ))),
    f!(
        "makeDate",
        3,
        "DateTime makeDate(int year, int month, int day)",
        |a| { make_date(int(&a[0])?, int(&a[1])?, int(&a[2])?, 0, 0) }
    ),
    f!(
        "makeDateTime",
        5,
        "DateTime makeDateTime(int year, int month, int day, int hour, int minute)",
        |a| make_date(int(&a[0])?, int(&a[1])?, int(&a[2])?, int(&a[3])?, int(&a[4])?)
    ),
    f!("midnight", 1, "DateTime midnight(DateTime)", |a| {
        Ok(Value::DateTime(
            date(&a[0])?.date_naive().and_time(Default::default()).and_utc(),
        ))
    }),
    f!("minusDays", 2, "DateTime minusDays(DateTime, int)", |a| shift(
        a, 86_400, -1
    )),
    f!("minusHours", 2, "DateTime minusHours(DateTime, int)", |a| shift(
        a, 3_600, -1
    )),
    f!("minusMinutes", 2, "DateTime minusMinutes(DateTime, int)", |a| {
        shift(a, 60, -1)
    }),
    f!("minusMonths", 2, "DateTime minusMonths(DateTime, int)", |a| {
        shift_months(a, 1, -1)
    }),
    f!("minusWeeks", 2, "DateTime minusWeeks(DateTime, int)", |a| shift(
        a,
        7 * 86_400,
        -1
    )),
    f!("minusYears", 2, "DateTime minusYears(DateTime, int)", |a| {
        shift_months(a, 12, -1)
    }),
    f!("minute", 1, "int minute(DateTime)", |a| Ok(Value::Int(
        date(&a[0])?.minute().into()
    ))),
    f!("month", 1, "int month(DateTime)", |a| Ok(Value::Int(
        date(&a[0])?.month().into()
    ))),
    f!("plusDays", 2, "DateTime plusDays(DateTime, int)", |a| shift(
        a, 86_400, 1
    )),
    f!("plusHours", 2, "DateTime plusHours(DateTime, int)", |a| shift(
        a, 3_600, 1
    )),
    f!(
        "plusMinutes",
        2,
        "DateTime plusMinutes(DateTime, int)",
        |a| shift(a, 60, 1)
    ),
    f!("plusMonths", 2, "DateTime plusMonths(DateTime, int)", |a| {
        shift_months(a, 1, 1)
    }),
    f!("plusWeeks", 2, "DateTime plusWeeks(DateTime, int)", |a| shift(
        a,
        7 * 86_400,
        1
    )),
    f!("plusYears", 2, "DateTime plusYears(DateTime, int)", |a| {
        shift_months(a, 12, 1)
    }),
    f!("sunday", 1, "DateTime sunday(DateTime)", |a| {
        // The previous Sunday, or the same day if it is one; the time of day is kept (the guide's example).
        let t = date(&a[0])?;
        Ok(Value::DateTime(
            t - ChronoDuration::days(i64::from(t.weekday().num_days_from_sunday())),
        ))
    }),
    f!("year", 1, "int year(DateTime)", |a| Ok(Value::Int(
        date(&a[0])?.year().into()
    ))),
    f!("yesterday", 1, "DateTime yesterday(DateTime)", |a| shift(
        &[a[0].clone(), Value::Int(1)],
        86_400,
        -1
    )),
];

/// Calls a function; a list as first argument maps the function over its elements.
fn call(f: &Function, mut args: Vec<Value>) -> Res {
    if let Some(Value::List(_)) = args.first() {
        let first = args.remove(0);
        return map_list(first, &mut |v| {
            let mut a = Vec::with_capacity(args.len() + 1);
            a.push(v);
            a.extend(args.iter().cloned());
            call(f, a)
        });
    }
    (f.imp)(&args).map_err(|fail| match fail {
        Fail::Type(m) => Fail::Type(format!("{}: {m}", f.signature)),
        other => other,
    })
}

fn date(v: &Value) -> Result<DateTime<Utc>, Fail> {
    match v {
        Value::DateTime(t) => Ok(*t),
        Value::Text(s) | Value::Str(s) => parse_datetime(s).map_err(Fail::Type),
        other => Err(Fail::Type(format!(
            "expected a DateTime, got {} ({})",
            other.type_name(),
            other.render()
        ))),
    }
}

fn int(v: &Value) -> Result<i64, Fail> {
    match as_num(v)? {
        Num::I(i) => Ok(i),
        Num::F(f) => Err(Fail::Type(format!(
            "expected an integer, got the float {}",
            java_double(f)
        ))),
    }
}

fn make_date(y: i64, mo: i64, d: i64, h: i64, mi: i64) -> Res {
    let small = |v: i64| u32::try_from(v).ok();
    let t = i32::try_from(y)
        .ok()
        .zip(small(mo).zip(small(d)))
        .and_then(|(y, (mo, d))| NaiveDate::from_ymd_opt(y, mo, d))
        .zip(small(h).zip(small(mi)))
        .and_then(|(date, (h, mi))| date.and_hms_opt(h, mi, 0));
    t.map(|t| Value::DateTime(t.and_utc())).ok_or_else(|| {
        Fail::Eval(format!(
            "no such date-time: year {y}, month {mo}, day {d}, hour {h}, minute {mi}"
        ))
    })
}

fn shift(a: &[Value], unit_seconds: i64, sign: i64) -> Res {
    let t = date(&a[0])?;
    let n = int(&a[1])?;
    n.checked_mul(unit_seconds)
        .and_then(|s| s.checked_mul(sign))
        .and_then(ChronoDuration::try_seconds)
        .and_then(|d| t.checked_add_signed(d))
        .map(Value::DateTime)
        .ok_or_else(|| Fail::Eval("the resulting date-time is out of range".into()))
}

/// Calendar months (clamped to the month's last day, as Joda-Time does).
fn shift_months(a: &[Value], unit_months: i64, sign: i64) -> Res {
    let t = date(&a[0])?;
    let n = int(&a[1])?
        .checked_mul(unit_months)
        .and_then(|m| m.checked_mul(sign))
        .ok_or_else(|| Fail::Eval("the resulting date-time is out of range".into()))?;
    let months = u32::try_from(n.unsigned_abs()).ok().map(Months::new);
    let out = months.and_then(|m| {
        if n >= 0 {
            t.checked_add_months(m)
        } else {
            t.checked_sub_months(m)
        }
    });
    out.map(Value::DateTime)
        .ok_or_else(|| Fail::Eval("the resulting date-time is out of range".into()))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats like Joda-Time's `DateTimeFormat.forPattern(pattern).print(t)` in UTC and the English
/// locale. Letters are fields (the count sets the minimum width, or text vs number for `M`/`E`),
/// `'...'` is literal text, `''` a single quote, any other character is copied. Note that Joda's
/// `Y` is the year of era (not the week-year of Java's SimpleDateFormat), so `YYYY` is the year.
fn joda_format(t: DateTime<Utc>, pattern: &str) -> Result<String, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let pad = |v: i64, width: usize| {
        if v < 0 {
            format!("-{:0width$}", -v, width = width)
        } else {
            format!("{v:0width$}")
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            if chars.get(i + 1) == Some(&'\'') {
                out.push('\'');
                i += 2;
                continue;
            }
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        out.push('\'');
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                out.push(chars[i]);
                i += 1;
            }
            continue;
        }
        if !c.is_ascii_alphabetic() {
            out.push(c);
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i] == c {
            i += 1;
        }
        let n = i - start;
        let year = i64::from(t.year());
        let year_of_era = if year > 0 { year } else { 1 - year };
        let year_text = |y: i64| {
            if n == 2 {
                pad(y.rem_euclid(100), 2)
            } else {
                pad(y, n)
            }
        };
        match c {
            'G' => out.push_str(if year > 0 { "AD" } else { "BC" }),
            'C' => out.push_str(&pad(year_of_era / 100, n)),
            'Y' => out.push_str(&year_text(year_of_era)),
            'y' => out.push_str(&year_text(year)),
            'x' => out.push_str(&year_text(i64::from(t.iso_week().year()))),
            'w' => out.push_str(&pad(t.iso_week().week().into(), n)),
            'e' => out.push_str(&pad(t.weekday().number_from_monday().into(), n)),
            'E' => {
                let name = WEEKDAYS[t.weekday().num_days_from_monday() as usize];
                out.push_str(if n >= 4 { name } else { &name[..3] });
            }
            'D' => out.push_str(&pad(t.ordinal().into(), n)),
            'M' => {
                let name = MONTHS[t.month0() as usize];
                match n {
                    1 | 2 => out.push_str(&pad(t.month().into(), n)),
                    3 => out.push_str(&name[..3]),
                    _ => out.push_str(name),
                }
            }
            'd' => out.push_str(&pad(t.day().into(), n)),
            'a' => out.push_str(if t.hour() < 12 { "AM" } else { "PM" }),
            'h' => out.push_str(&pad(((t.hour() + 11) % 12 + 1).into(), n)),
            'K' => out.push_str(&pad((t.hour() % 12).into(), n)),
            'H' => out.push_str(&pad(t.hour().into(), n)),
            'k' => out.push_str(&pad(if t.hour() == 0 { 24 } else { t.hour().into() }, n)),
            'm' => out.push_str(&pad(t.minute().into(), n)),
            's' => out.push_str(&pad(t.second().into(), n)),
            'S' => {
                // Fraction of second: the first n digits, truncated (Joda: `SSS` is milliseconds).
                let digits = format!("{:09}", t.nanosecond() % 1_000_000_000);
                let mut frac: String = digits.chars().take(n).collect();
                while frac.len() < n {
                    frac.push('0');
                }
                out.push_str(&frac);
            }
            'z' => out.push_str(if n >= 4 { "Coordinated Universal Time" } else { "UTC" }),
            'Z' => out.push_str(match n {
                1 => "+0000",
                2 => "+00:00",
                _ => "UTC",
            }),
            other => {
                return Err(format!(
                    "illegal pattern letter '{other}' in the date-time format {pattern:?} (Joda-Time DateTimeFormat)"
                ))
            }
        }
    }
    Ok(out)
}
