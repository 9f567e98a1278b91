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
        let close = match (close, quote) {
            (Some(c), _) => c,
            // Say which mistake it is: an open quote swallows the `}`.
            (None, Some(q)) => {
                return Err(ExprError::Syntax {
                    expr: template[body_start..].to_string(),
                    message: format!("unterminated string literal: a {q} is never closed"),
                })
            }
            (None, None) => {
                return Err(ExprError::Unterminated {
                    template: template.to_string(),
                    offset: open,
                })
            }
        };
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
    /// Text of an encrypted field (`*password`, DG:dp-pipeline-characters.md): like `Text`, but
    /// never quoted in an error message, which may end up in logs and API answers.
    Secret(String),
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
            Value::Secret(_) => "an encrypted field's value",
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
            Value::Text(s) | Value::Str(s) | Value::Secret(s) | Value::Ref(s) => s.clone(),
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
                    } else if name.starts_with('*') {
                        values.push(Value::Secret(s.clone()));
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
        Value::Secret(s) => parse_num(s)
            .ok_or_else(|| Fail::Type("the value of an encrypted (*) field is not a number".into())),
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
        let text = |v: &Value| match v {
            Value::Text(_) | Value::Secret(_) => true,
            _ => false,
        };
        let numeric_text = |v: &Value| match v {
            Value::Text(s) | Value::Secret(s) => parse_num(s).is_some(),
            _ => false,
        };
        let concat = match (&a, &b) {
            (Value::Str(_), _) | (_, Value::Str(_)) => true,
            (x, y) if text(x) && text(y) => true,
            // Text from a field that reads as a number adds (`#{myCount + 1}`); other text concatenates.
            (t, n) | (n, t) if text(t) && is_num(n) => !numeric_text(t),
            (x, y) if text(x) || text(y) => true,
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
            Value::Str(s) | Value::Text(s) | Value::Secret(s) => s,
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
        Value::Secret(s) => parse_datetime(s)
            .map_err(|_| Fail::Type("the value of an encrypted (*) field is not a date-time".into())),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(id: &str, fields: &[(&str, &str)], refs: &[(&str, &str)]) -> PipelineObject {
        let mut f: Vec<Field> = fields.iter().map(|(k, v)| Field::string(*k, *v)).collect();
        f.extend(refs.iter().map(|(k, v)| Field::reference(*k, *v)));
        PipelineObject {
            id: id.into(),
            name: format!("{id}Name"),
            fields: f,
        }
    }

    /// A small pipeline: the guide's examples, plus instances and some traps.
    fn objects() -> BTreeMap<String, PipelineObject> {
        let list = [
            obj(
                "Act",
                &[
                    ("type", "ShellCommandActivity"),
                    ("myDateTime", "2011-05-24T17:10:00"),
                    ("@scheduledStartTime", "2012-12-12T00:00:00"),
                    ("@scheduledEndTime", "2012-12-13T00:00:00"),
                    ("myList", "one"),
                    ("myList", "two"),
                    ("myList1", "1"),
                    ("myList1", "2"),
                    ("myList2", "3"),
                    ("myList2", "4"),
                    ("myCount", "5"),
                    ("myZero", "007"),
                    ("command", "echo #{@scheduledStartTime}"),
                    ("myLater", "#{plusDays(@scheduledStartTime, 1)}"),
                ],
                &[
                    ("input", "In"),
                    ("output", "Out"),
                    ("precondition", "Pre"),
                    ("onFail", "Alarm"),
                ],
            ),
            obj(
                "In",
                &[
                    ("@scheduledStartTime", "2012-12-12T00:00:00"),
                    (
                        "directoryPath",
                        "s3://bucket/#{@scheduledStartTime.format('YYYY-MM-dd')}",
                    ),
                    ("myPrefix", "#{directoryPath}/part"),
                ],
                &[],
            ),
            obj("Out", &[("directoryPath", "s3://out")], &[("input", "In")]),
            obj("Pre", &[("command", "test #{node.@scheduledStartTime}")], &[]),
            obj(
                "Alarm",
                &[
                    (
                        "message",
                        "Error for interval #{node.@scheduledStartTime}..#{node.@scheduledEndTime}.",
                    ),
                    ("subject", "S3 bucket '#{node.output.directoryPath}' failed"),
                ],
                &[],
            ),
            obj(
                "ExampleDataNode",
                &[("filePath", "s3://mybucket/#{parent.@id}.csv")],
                &[],
            ),
            obj("Child", &[], &[("parent", "Base")]),
            obj("Base", &[("myBaseField", "base")], &[]),
            obj(
                "@Act_2012-12-12T00:00:00",
                &[("@scheduledStartTime", "2012-12-12T00:00:00")],
                &[("@componentParent", "Act")],
            ),
            obj(
                "@Act_2012-12-12T00:00:00_Attempt=1",
                &[],
                &[("@instanceParent", "@Act_2012-12-12T00:00:00")],
            ),
            obj("Loop", &[("myA", "#{myB}"), ("myB", "x#{myA}")], &[]),
            obj("Lonely", &[("note", "#{node.@id}")], &[]),
            obj("Shared", &[], &[]),
            obj("User1", &[], &[("onSuccess", "Shared")]),
            obj("User2", &[], &[("onFail", "Shared")]),
        ];
        list.into_iter().map(|o| (o.id.clone(), o)).collect()
    }

    fn params() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            ("myParam".to_string(), vec!["p1".to_string()]),
            ("myMulti".to_string(), vec!["x".to_string(), "y".to_string()]),
            // A field of the same name wins over a parameter.
            ("myCount".to_string(), vec!["99".to_string()]),
        ])
    }

    fn eval_in(current: &str, template: &str) -> Result<String, ExprError> {
        let (objects, params) = (objects(), params());
        evaluate(
            template,
            &Scope {
                objects: &objects,
                current,
                params: &params,
            },
        )
    }

    fn list_in(current: &str, template: &str) -> Result<Vec<String>, ExprError> {
        let (objects, params) = (objects(), params());
        evaluate_list(
            template,
            &Scope {
                objects: &objects,
                current,
                params: &params,
            },
        )
    }

    fn ev(template: &str) -> String {
        eval_in("Act", template).unwrap_or_else(|e| panic!("{template}: {e}"))
    }

    fn err(template: &str) -> ExprError {
        eval_in("Act", template).expect_err(template)
    }

    /// DG:dp-pipeline-reference-functions-datetime.md, with `myDateTime` = May 24, 2011 @ 5:10 pm GMT.
    /// The guide prints DateTime results as `"2011-05-24T17:10:00z"` (and twice with a space or ` UTC`);
    /// a DateTime prints here as the API writes date-times, `2011-05-24T17:10:00`.
    #[test]
    fn every_datetime_function_with_the_guides_examples() {
        let table = [
            ("day(myDateTime)", "24"),
            ("dayOfYear(myDateTime)", "144"),
            ("firstOfMonth(myDateTime)", "2011-05-01T17:10:00"),
            // The guide's result reads "2011-05-24T17:10:00 UTC", which this pattern cannot produce
            // (it has a space, not a `T`); Joda-Time prints the following.
            (
                "format(myDateTime,'YYYY-MM-dd HH:mm:ss z')",
                "2011-05-24 17:10:00 UTC",
            ),
            ("hour(myDateTime)", "17"),
            ("makeDate(2011,5,24)", "2011-05-24T00:00:00"),
            ("makeDateTime(2011,5,24,14,21)", "2011-05-24T14:21:00"),
            // The guide's midnight example uses 2011-05-25T17:10:00z.
            ("midnight(plusDays(myDateTime,1))", "2011-05-25T00:00:00"),
            ("midnight(myDateTime)", "2011-05-24T00:00:00"),
            ("minusDays(myDateTime,1)", "2011-05-23T17:10:00"),
            ("minusHours(myDateTime,1)", "2011-05-24T16:10:00"),
            ("minusMinutes(myDateTime,1)", "2011-05-24T17:09:00"),
            ("minusMonths(myDateTime,1)", "2011-04-24T17:10:00"),
            ("minusWeeks(myDateTime,1)", "2011-05-17T17:10:00"),
            ("minusYears(myDateTime,1)", "2010-05-24T17:10:00"),
            ("minute(myDateTime)", "10"),
            ("month(myDateTime)", "5"),
            ("plusDays(myDateTime,1)", "2011-05-25T17:10:00"),
            ("plusHours(myDateTime,1)", "2011-05-24T18:10:00"),
            ("plusMinutes(myDateTime,1)", "2011-05-24T17:11:00"),
            ("plusMonths(myDateTime,1)", "2011-06-24T17:10:00"),
            ("plusWeeks(myDateTime,1)", "2011-05-31T17:10:00"),
            ("plusYears(myDateTime,1)", "2012-05-24T17:10:00"),
            ("sunday(myDateTime)", "2011-05-22T17:10:00"),
            ("year(myDateTime)", "2011"),
            ("yesterday(myDateTime)", "2011-05-23T17:10:00"),
        ];
        for (expr, want) in table {
            assert_eq!(ev(&format!("#{{{expr}}}")), want, "{expr}");
        }
        // No function goes untested.
        for f in FUNCTIONS {
            assert!(
                table.iter().any(|(e, _)| e.starts_with(&format!("{}(", f.name))),
                "no test vector for {}",
                f.name
            );
        }
    }

    #[test]
    fn datetime_edge_cases() {
        // A Sunday is its own sunday(); months clamp like Joda-Time.
        assert_eq!(ev("#{sunday(makeDate(2011,5,22))}"), "2011-05-22T00:00:00");
        assert_eq!(ev("#{plusMonths(makeDate(2011,1,31),1)}"), "2011-02-28T00:00:00");
        assert_eq!(ev("#{minusYears(makeDate(2012,2,29),1)}"), "2011-02-28T00:00:00");
        assert_eq!(ev("#{plusDays(myDateTime,-1)}"), "2011-05-23T17:10:00");
        assert_eq!(ev("#{firstOfMonth(makeDate(2011,12,31))}"), "2011-12-01T00:00:00");
        // Numeric text from fields works as an int argument.
        assert_eq!(ev("#{plusDays(myDateTime, myCount)}"), "2011-05-29T17:10:00");
        assert!(matches!(err("#{makeDate(2011,2,30)}"), ExprError::Eval { .. }));
        assert!(matches!(
            err("#{plusYears(myDateTime, 999999999)}"),
            ExprError::Eval { .. }
        ));
        assert!(matches!(
            err("#{plusDays(myDateTime, 1.5)}"),
            ExprError::Type { .. }
        ));
    }

    #[test]
    fn joda_format_patterns() {
        let table = [
            ("YYYY-MM-dd HH:mm:ss", "2011-05-24 17:10:00"),
            ("yyyy-MM-dd'T'HH:mm:ss.SSS", "2011-05-24T17:10:00.000"),
            // The guide's own nested example uses `hh`, the 12-hour clock.
            ("YYYY-MM-dd hh:mm:ss", "2011-05-24 05:10:00"),
            ("h:mm a", "5:10 PM"),
            ("K k H", "5 17 17"),
            ("yy/M/d", "11/5/24"),
            ("y yyy yyyyy", "2011 2011 02011"),
            ("EEE, d MMM yyyy", "Tue, 24 May 2011"),
            ("EEEE d MMMM", "Tuesday 24 May"),
            ("D DDD", "144 144"),
            ("xxxx-'W'ww-e", "2011-W21-2"),
            ("G C", "AD 20"),
            ("z zzzz", "UTC Coordinated Universal Time"),
            ("Z ZZ ZZZ", "+0000 +00:00 UTC"),
            ("'quoted ''text''' HH", "quoted 'text' 17"),
            ("''HH''", "'17'"),
            ("dd/MM/yyyy @ HH:mm", "24/05/2011 @ 17:10"),
            ("", ""),
        ];
        let t = parse_datetime("2011-05-24T17:10:00").unwrap();
        for (pattern, want) in table {
            assert_eq!(joda_format(t, pattern).as_deref(), Ok(want), "{pattern}");
        }
        let midnight = parse_datetime("2011-05-24T00:05:00").unwrap();
        assert_eq!(joda_format(midnight, "hh:mm a k").unwrap(), "12:05 AM 24");
        assert_eq!(
            joda_format(
                parse_datetime("2011-05-24T00:00:00.123456").unwrap(),
                "S SS SSS SSSS"
            )
            .unwrap(),
            "1 12 123 1234"
        );
        let e = joda_format(t, "yyyy-qq").unwrap_err();
        assert!(e.contains("'q'") && e.contains("yyyy-qq"), "{e}");
        assert!(matches!(
            err("#{format(myDateTime, 'bb')}"),
            ExprError::Eval { .. }
        ));
    }

    /// DG:dp-pipeline-reference-functions-math.md.
    #[test]
    fn math_with_the_guides_examples() {
        let table = [
            ("1 + 2", "3"),
            ("1 - 2", "-1"),
            ("1 * 2", "2"),
            ("1 / 2", "0"),
            // The guide prints `.5`; the service is a JVM and Java prints a double as `0.5`.
            ("1.0 / 2", "0.5"),
            ("2 ^ 2", "4.0"),
            ("1 + 2 * 3", "7"),
            ("(1 + 2) * 3", "9"),
            ("2 ^ 3 ^ 2", "512.0"),
            ("2 * 3 ^ 2", "18.0"),
            ("-7 / 2", "-3"),
            ("7.5 - 0.5", "7.0"),
            ("-(3)", "-3"),
            ("--3", "3"),
            ("+3", "3"),
            ("10 - 2 - 3", "5"),
            ("12 / 2 / 3", "2"),
            (".5 * 4", "2.0"),
            ("2 ^ -1", "0.5"),
            ("10.0 ^ 7", "1.0E7"),
            ("myCount * 2", "10"),
            ("myCount - 0.5", "4.5"),
            ("myCount + 1", "6"),
        ];
        for (expr, want) in table {
            assert_eq!(ev(&format!("#{{{expr}}}")), want, "{expr}");
        }
        assert!(
            matches!(err("#{1 / 0}"), ExprError::Eval { message, .. } if message.contains("division by zero"))
        );
        assert!(matches!(err("#{1.0 / 0}"), ExprError::Eval { .. }));
        assert!(
            matches!(err("#{9223372036854775807 + 1}"), ExprError::Eval { message, .. } if message.contains("overflow"))
        );
        assert!(matches!(err("#{99999999999999999999}"), ExprError::Syntax { .. }));
    }

    /// DG:dp-pipeline-reference-functions-string.md: `+` concatenates and converts non-strings.
    #[test]
    fn strings_and_concatenation() {
        let table = [
            (r#""hel" + "lo""#, "hello"),
            ("'hel' + 'lo'", "hello"),
            ("'a' + 1", "a1"),
            ("1 + 'a'", "1a"),
            ("'v' + 2 ^ 2", "v4.0"),
            ("'x' + (1 + 2)", "x3"),
            ("'x' + 1 + 2", "x12"),
            (r"'it\'s'", "it's"),
            (r#""say \"hi\"""#, "say \"hi\""),
            ("'at ' + myDateTime", "at 2011-05-24T17:10:00"),
            ("'at ' + plusDays(myDateTime, 1)", "at 2011-05-25T17:10:00"),
            ("'n' + myCount", "n5"),
            // Two field values are text: `+` concatenates them.
            ("myCount + myCount", "55"),
            ("myZero", "007"),
            ("'}{'", "}{"),
        ];
        for (expr, want) in table {
            assert_eq!(ev(&format!("#{{{expr}}}")), want, "{expr}");
        }
        assert_eq!(ev("a #{'b'} c #{1} d"), "a b c 1 d");
        assert_eq!(
            ev("no expressions, # and { } stay"),
            "no expressions, # and { } stay"
        );
        assert_eq!(ev(""), "");
    }

    #[test]
    fn references_runtime_fields_and_parameters() {
        assert_eq!(ev("#{@scheduledStartTime}"), "2012-12-12T00:00:00");
        assert_eq!(
            ev("/tmp/stdout:#{@scheduledStartTime}"),
            "/tmp/stdout:2012-12-12T00:00:00"
        );
        assert_eq!(ev("#{input.directoryPath}"), "s3://bucket/2012-12-12");
        assert_eq!(ev("#{input.myPrefix}"), "s3://bucket/2012-12-12/part");
        assert_eq!(ev("#{output.input.directoryPath}"), "s3://bucket/2012-12-12");
        assert_eq!(ev("#{input}"), "In");
        assert_eq!(ev("#{input.@id}"), "In");
        assert_eq!(ev("#{(input).directoryPath}"), "s3://bucket/2012-12-12");
        assert_eq!(ev("#{command}"), "echo 2012-12-12T00:00:00");
        assert_eq!(ev("#{name} #{id} #{@id}"), "ActName Act Act");
        assert_eq!(ev("#{myParam}"), "p1");
        assert_eq!(ev("#{myCount}"), "5");
        assert_eq!(
            ev("#{@scheduledStartTime.format('YYYY-MM-dd HH:mm:ss')}"),
            "2012-12-12 00:00:00"
        );
        // DG:dp-pipeline-expressions.md, nested expressions.
        assert_eq!(
            ev("#{format(minusMinutes(@scheduledStartTime,30),'YYYY-MM-dd hh:mm:ss')}"),
            "2012-12-11 11:30:00"
        );
        assert_eq!(
            ev("#{minusMinutes(@scheduledStartTime,30).format('HH:mm')}"),
            "23:30"
        );
        // A field that is one expression keeps its DateTime type.
        assert_eq!(ev("#{myLater.format('dd')}"), "13");
        assert_eq!(ev("#{format(myLater, 'dd')}"), "13");
        assert_eq!(ev("#{  day( myDateTime )  }"), "24");
    }

    #[test]
    fn parent_means_the_component() {
        // DG:dp-pipeline-expressions.md: `s3://mybucket/#{parent.@id}.csv` gives `ExampleDataNode.csv`.
        assert_eq!(
            eval_in("ExampleDataNode", "#{filePath}").unwrap(),
            "s3://mybucket/ExampleDataNode.csv"
        );
        assert_eq!(
            eval_in("@Act_2012-12-12T00:00:00", "#{parent.@id}").unwrap(),
            "Act"
        );
        assert_eq!(
            eval_in("@Act_2012-12-12T00:00:00_Attempt=1", "#{parent.@id}").unwrap(),
            "Act"
        );
        assert_eq!(
            eval_in("@Act_2012-12-12T00:00:00", "#{parent.input.directoryPath}").unwrap(),
            "s3://bucket/2012-12-12"
        );
        assert_eq!(eval_in("Child", "#{parent.myBaseField}").unwrap(), "base");
    }

    #[test]
    fn node_is_the_referrer_of_alarms_and_preconditions() {
        assert_eq!(
            eval_in("Alarm", "#{message}").unwrap(),
            "Error for interval 2012-12-12T00:00:00..2012-12-13T00:00:00."
        );
        assert_eq!(
            eval_in("Alarm", "#{subject}").unwrap(),
            "S3 bucket 's3://out' failed"
        );
        assert_eq!(eval_in("Pre", "#{command}").unwrap(), "test 2012-12-12T00:00:00");
        assert_eq!(
            eval_in(
                "Pre",
                "#{format(minusMinutes(node.@scheduledStartTime,30),'YYYY-MM-dd hh:mm:ss')}"
            )
            .unwrap(),
            "2012-12-11 11:30:00"
        );
        // An explicit `node` reference (what the store puts on instances) wins.
        let mut objects = objects();
        objects.insert("PreInstance".into(), obj("PreInstance", &[], &[("node", "In")]));
        let params = params();
        let scope = Scope {
            objects: &objects,
            current: "PreInstance",
            params: &params,
        };
        assert_eq!(evaluate("#{node.@id}", &scope).unwrap(), "In");

        let e = eval_in("Lonely", "#{note}").unwrap_err().to_string();
        assert!(e.contains("`node` is only available"), "{e}");
        let e = eval_in("Shared", "#{node.@id}").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("User1") && e.contains("User2"),
            "{e}"
        );
    }

    /// DG:dp-pipeline-expressions.md, "Lists".
    #[test]
    fn lists_map_and_flatten() {
        assert_eq!(
            list_in("Act", "#{'this is ' + myList}").unwrap(),
            ["this is one", "this is two"]
        );
        assert_eq!(ev("#{'this is ' + myList}"), "this is one,this is two");
        assert_eq!(
            list_in("Act", "#{myList1 + myList2}").unwrap(),
            ["1", "2", "3", "4"]
        );
        // Two list-valued expressions in one string are each joined with `,`.
        assert_eq!(ev("[#{myList1}, #{myList2}]"), "[1,2, 3,4]");
        assert_eq!(
            list_in("Act", "s3://b/#{myList}/x").unwrap(),
            ["s3://b/one/x", "s3://b/two/x"]
        );
        assert_eq!(list_in("Act", "#{myMulti}").unwrap(), ["x", "y"]);
        assert_eq!(list_in("Act", "#{myList1 * 10}").unwrap(), ["10", "20"]);
        assert_eq!(list_in("Act", "#{myList + '!'}").unwrap(), ["one!", "two!"]);
        assert_eq!(list_in("Act", "plain").unwrap(), ["plain"]);
        assert!(matches!(err("#{myList1 * myList2}"), ExprError::Type { .. }));
    }

    #[test]
    fn evaluate_object_evaluates_strings_and_keeps_the_rest() {
        let objects = objects();
        let params = params();
        let scope = Scope {
            objects: &objects,
            current: "Merged",
            params: &params,
        };
        // Not in `objects`, like an attempt merged with its component.
        let merged = PipelineObject {
            id: "Merged".into(),
            name: "#{name}".into(),
            fields: vec![
                Field::string("type", "#{notEvaluated}"),
                Field::string("@sphere", "ATTEMPT"),
                Field::string("@scheduledStartTime", "2012-12-12T00:00:00"),
                Field::string(
                    "command",
                    "echo #{format(@scheduledStartTime, 'YYYY')} #{input.directoryPath}",
                ),
                Field::reference("input", "In"),
                Field::string("scriptArgument", "#{myMulti}"),
                Field::string("scriptArgument", "last"),
                Field::string("plain", "no expression"),
            ],
        };
        let out = evaluate_object(&merged, &scope).unwrap();
        assert_eq!(out.id, "Merged");
        assert_eq!(out.name, "#{name}");
        assert_eq!(out.get("type"), Some("#{notEvaluated}"));
        assert_eq!(out.get("command"), Some("echo 2012 s3://bucket/2012-12-12"));
        assert_eq!(out.get_ref("input"), Some("In"));
        assert_eq!(
            out.get_all("scriptArgument").collect::<Vec<_>>(),
            ["x", "y", "last"]
        );
        assert_eq!(out.get("plain"), Some("no expression"));
        assert_eq!(out.fields.len(), merged.fields.len() + 1);

        let bad = obj("Bad", &[("command", "echo #{nope}")], &[]);
        match evaluate_object(&bad, &scope).unwrap_err() {
            ExprError::InField { object, field, cause } => {
                assert_eq!((object.as_str(), field.as_str()), ("Bad", "command"));
                assert!(matches!(*cause, ExprError::UnknownField { ref field, .. } if field == "nope"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_what_failed_and_where() {
        let cases: Vec<(&str, &str)> = vec![
            (
                "#{noSuchFunction(1)}",
                "unknown function `noSuchFunction` in `#{noSuchFunction(1)}`",
            ),
            (
                "#{myMissing}",
                "unknown field `myMissing` in `#{myMissing}`: object `Act`",
            ),
            (
                "#{input.nope}",
                "unknown field `nope` in `#{input.nope}`: object `In`",
            ),
            ("x #{day(myDateTime)", "unterminated expression"),
            ("#{}", "empty expression"),
            ("#{1 +}", "expected a value, found the end of the expression"),
            ("#{(1}", "expected `)`"),
            ("#{1 2}", "unexpected number 2"),
            ("#{day(myDateTime,}", "expected a value"),
            ("#{'abc}", "unterminated string literal"),
            ("#{a $ b}", "unexpected character '$'"),
            ("#{12abc}", "malformed number"),
            ("#{day('abc')}", "int day(DateTime): invalid date-time \"abc\""),
            ("#{'a' - 1}", "\"a\" is a string, not a number"),
            ("#{myDateTime.year}", "`myDateTime` is a string, not a reference"),
            ("#{plusDays(myDateTime,1) + 1}", "cannot add a DateTime"),
            ("#{day(myDateTime, 2)}", "day() takes 1 argument, 2 given"),
            ("#{format(myDateTime)}", "format() takes 2 arguments, 1 given"),
            ("#{format(myDateTime, 5)}", "wants a pattern string"),
            (
                "#{output.input.@scheduledStartTime}",
                "cannot be read through more than one reference",
            ),
        ];
        for (template, needle) in cases {
            let e = eval_in("Act", template).expect_err(template).to_string();
            assert!(e.contains(needle), "{template}: {e}");
        }
        let e = eval_in("Loop", "#{myA}").unwrap_err().to_string();
        assert!(
            e.contains("circular reference: Loop.myA -> Loop.myB -> Loop.myA"),
            "{e}"
        );
        let e = eval_in("Nobody", "#{x}").unwrap_err();
        assert!(
            matches!(e, ExprError::UnknownObject { ref object, .. } if object == "Nobody"),
            "{e}"
        );
        // An error inside a referenced field says which field.
        let mut objects = objects();
        objects.insert("Broken".into(), obj("Broken", &[("path", "#{day('x')}")], &[]));
        objects.insert("User".into(), obj("User", &[], &[("input", "Broken")]));
        let params = params();
        let scope = Scope {
            objects: &objects,
            current: "User",
            params: &params,
        };
        let e = evaluate("#{input.path}", &scope).unwrap_err().to_string();
        assert!(
            e.starts_with("field `path` of object `Broken`: type error in `#{day('x')}`"),
            "{e}"
        );
    }

    #[test]
    fn closing_brace_inside_quotes_does_not_end_the_expression() {
        assert_eq!(
            split_template("a#{format(x,'}')}b").unwrap(),
            vec![Piece::Text("a"), Piece::Expr("format(x,'}')"), Piece::Text("b")]
        );
        assert_eq!(ev("#{'}' + \"}\"}"), "}}");
        assert_eq!(ev("#{format(myDateTime,'HH}')}"), "17}");
    }

    #[test]
    fn encrypted_field_names_and_multiplication() {
        let mut objects = objects();
        objects.insert(
            "Db".into(),
            obj("Db", &[("*password", "secret"), ("myN", "3")], &[]),
        );
        let params = params();
        let scope = Scope {
            objects: &objects,
            current: "Db",
            params: &params,
        };
        assert_eq!(evaluate("#{*password}", &scope).unwrap(), "secret");
        assert_eq!(evaluate("#{myN*2}", &scope).unwrap(), "6");
        let e = evaluate("#{myN * *password}", &scope).unwrap_err().to_string();
        // The value of an encrypted field is never quoted in an error.
        assert!(
            e.contains("encrypted (*) field is not a number") && !e.contains("secret"),
            "{e}"
        );
        let e = evaluate("#{day(*password)}", &scope).unwrap_err().to_string();
        assert!(e.contains("not a date-time") && !e.contains("secret"), "{e}");
        assert_eq!(evaluate("#{'pw=' + *password}", &scope).unwrap(), "pw=secret");
    }

    #[test]
    fn java_double_rendering() {
        for (v, s) in [
            (4.0, "4.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.0, "0.0"),
            (1e7, "1.0E7"),
            (1.5e-4, "1.5E-4"),
            (123456.0, "123456.0"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(java_double(v), s);
        }
    }

    /// Hostile input must give an error, never a panic or a stack overflow (release builds abort on
    /// panic, and the server evaluates user-supplied definitions).
    #[test]
    fn deep_or_long_input_is_refused_not_crashed() {
        let deep = [
            format!("#{{{}1{}}}", "(".repeat(5000), ")".repeat(5000)),
            format!("#{{1{}}}", "+1".repeat(5000)),
            format!("#{{{}1}}", "-".repeat(5000)),
            format!("#{{{}2}}", "2^".repeat(5000)),
            format!("#{{{}1{}}}", "day(".repeat(5000), ")".repeat(5000)),
            format!("#{{myDateTime{}}}", ".format('y')".repeat(5000)),
        ];
        for t in deep {
            let e = eval_in("Act", &t).unwrap_err().to_string();
            assert!(e.contains("nested more than"), "{}: {e}", &t[..20]);
        }
        // Moderate nesting still works.
        assert_eq!(ev(&format!("#{{{}1{}}}", "(".repeat(20), ")".repeat(20))), "1");
    }

    /// A cheap fuzz: random templates over the language's alphabet never panic, and whatever
    /// evaluates also evaluates the same way twice (no hidden state).
    #[test]
    fn random_templates_never_panic() {
        let atoms = [
            "#{",
            "}",
            "(",
            ")",
            "'",
            "\"",
            "\\",
            "+",
            "-",
            "*",
            "/",
            "^",
            ",",
            ".",
            "1",
            "2.5",
            ".5",
            " ",
            "myDateTime",
            "myList",
            "myCount",
            "input",
            "node",
            "parent",
            "@id",
            "@scheduledStartTime",
            "format",
            "day",
            "plusDays",
            "makeDate",
            "'YYYY'",
            "'x'",
            "myParam",
            "myMulti",
            "zz",
            "é",
            "#",
            "{",
            "myA",
            "0",
        ];
        let (objects, params) = (objects(), params());
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64*
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let mut ok = 0;
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let mut t = String::from("#{");
            for _ in 0..len {
                t.push_str(atoms[(next() % atoms.len() as u64) as usize]);
            }
            if next() % 2 == 0 {
                t.push('}');
            }
            let current = ["Act", "Alarm", "Loop", "In"][(next() % 4) as usize];
            let scope = Scope {
                objects: &objects,
                current,
                params: &params,
            };
            let first = evaluate(&t, &scope);
            assert_eq!(first, evaluate(&t, &scope), "{t}");
            ok += usize::from(first.is_ok());
        }
        // The generator does reach the evaluator, not only the syntax errors.
        assert!(ok > 100, "only {ok} random templates evaluated");
    }
}
