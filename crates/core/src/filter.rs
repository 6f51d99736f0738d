//! Destination filter conditions: a small expression language over an
//! event's JSON (docs/CONFIG.md has the user-facing description).
//!
//! ```text
//! expr  := and ("or" and)*
//! and   := unary ("and" unary)*
//! unary := "not" unary | "(" expr ")" | path "exists" | path op value
//! op    := "=" | "!=" | "contains"
//! value := "string" | number | true | false | null
//! path  := name ("." name)*        e.g. type, event, properties.plan, context.library.name
//! ```
//!
//! Semantics: a path that is absent is never `=` anything and always `!=`;
//! numbers compare as numbers (`1` = `1.0`); `contains` is substring on
//! strings and membership on arrays. Keywords are lower-case.
//!
//! Nesting is bounded: at most [`MAX_DEPTH`] levels of `not` and parentheses
//! inside one another, refused at parse time ([`FilterError::TooDeep`]).
//! Chains of `and` / `or` are parsed in a loop into one n-ary node, so
//! `a and b and c ...` of any length is one level. A parsed condition is
//! therefore at most `2 * MAX_DEPTH + 3` nodes deep, which bounds the
//! recursion of [`Condition::matches`] (and of drop, clone, debug). Every
//! caller (config validation, `sluice config check`, the admin API, the
//! route's plan) builds conditions through [`Condition::parse`].

use serde_json::Value;

/// The deepest nesting of `not` and parentheses a condition may have.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("{0}")]
    Syntax(String),
    #[error("condition nests 'not' and parentheses more than {max} levels deep; write it flatter")]
    TooDeep { max: usize },
}

impl From<String> for FilterError {
    fn from(s: String) -> Self {
        FilterError::Syntax(s)
    }
}

impl From<&str> for FilterError {
    fn from(s: &str) -> Self {
        FilterError::Syntax(s.to_owned())
    }
}

/// Callers that report errors as text (the route's plan) keep using `?`.
impl From<FilterError> for String {
    fn from(e: FilterError) -> Self {
        e.to_string()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Two or more conditions that must all hold (one `a and b and ...` chain).
    And(Vec<Condition>),
    /// Two or more conditions of which one must hold (one `a or b or ...` chain).
    Or(Vec<Condition>),
    Not(Box<Condition>),
    Exists(Vec<String>),
    Eq(Vec<String>, Value),
    Ne(Vec<String>, Value),
    Contains(Vec<String>, Value),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Num(f64),
    Op(&'static str),
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1
            }
            ')' => {
                out.push(Token::Close);
                i += 1
            }
            '=' => {
                out.push(Token::Op("="));
                i += 1
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Token::Op("!="));
                i += 2
            }
            '"' => {
                let mut v = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string".into()),
                        Some('"') => break,
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some(&e @ ('"' | '\\')) => v.push(e),
                                _ => return Err("only \\\" and \\\\ escapes are allowed in strings".into()),
                            }
                            i += 2;
                            continue;
                        }
                        Some(&ch) => v.push(ch),
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token::Str(v));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || matches!(chars[i], '.' | 'e' | 'E' | '+' | '-')) {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                out.push(Token::Num(text.parse().map_err(|_| format!("bad number {text:?}"))?));
            }
            c if c.is_alphanumeric() || c == '_' || c == '$' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '$' | '-')) {
                    i += 1;
                }
                out.push(Token::Word(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn keyword(&mut self, k: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w == k) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// `depth` is how many `not` and `(` enclose the current position; the
    /// recursion below goes one level deeper only through [`Parser::enter`].
    fn expr(&mut self, depth: usize) -> Result<Condition, FilterError> {
        let mut terms = vec![self.and(depth)?];
        while self.keyword("or") {
            terms.push(self.and(depth)?);
        }
        Ok(if terms.len() == 1 { terms.pop().expect("one term") } else { Condition::Or(terms) })
    }

    fn and(&mut self, depth: usize) -> Result<Condition, FilterError> {
        let mut terms = vec![self.unary(depth)?];
        while self.keyword("and") {
            terms.push(self.unary(depth)?);
        }
        Ok(if terms.len() == 1 { terms.pop().expect("one term") } else { Condition::And(terms) })
    }

    fn enter(depth: usize) -> Result<usize, FilterError> {
        if depth >= MAX_DEPTH {
            return Err(FilterError::TooDeep { max: MAX_DEPTH });
        }
        Ok(depth + 1)
    }

    fn unary(&mut self, depth: usize) -> Result<Condition, FilterError> {
        if self.keyword("not") {
            let depth = Self::enter(depth)?;
            return Ok(Condition::Not(Box::new(self.unary(depth)?)));
        }
        match self.next() {
            Some(Token::Open) => {
                let depth = Self::enter(depth)?;
                let e = self.expr(depth)?;
                match self.next() {
                    Some(Token::Close) => Ok(e),
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Token::Word(w)) if !matches!(w.as_str(), "and" | "or" | "exists" | "contains" | "true" | "false" | "null") => {
                let path: Vec<String> = w.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    return Err(format!("bad field path {w:?}").into());
                }
                if self.keyword("exists") {
                    return Ok(Condition::Exists(path));
                }
                let op = match self.next() {
                    Some(Token::Op(op)) => op,
                    Some(Token::Word(k)) if k == "contains" => "contains",
                    other => return Err(format!("expected =, !=, contains or exists after {w:?}, found {}", describe(other.as_ref())).into()),
                };
                let value = match self.next() {
                    Some(Token::Str(s)) => Value::String(s),
                    Some(Token::Num(n)) => serde_json::Number::from_f64(n).map(Value::Number).ok_or("bad number")?,
                    Some(Token::Word(k)) if k == "true" => Value::Bool(true),
                    Some(Token::Word(k)) if k == "false" => Value::Bool(false),
                    Some(Token::Word(k)) if k == "null" => Value::Null,
                    other => return Err(format!("expected a value after {op:?}, found {} (quote strings)", describe(other.as_ref())).into()),
                };
                Ok(match op {
                    "=" => Condition::Eq(path, value),
                    "!=" => Condition::Ne(path, value),
                    _ => Condition::Contains(path, value),
                })
            }
            other => Err(format!("expected a field path, 'not' or '(', found {}", describe(other.as_ref())).into()),
        }
    }
}

fn describe(t: Option<&Token>) -> String {
    match t {
        None => "the end".into(),
        Some(Token::Word(w)) => format!("{w:?}"),
        Some(Token::Str(s)) => format!("\"{s}\""),
        Some(Token::Num(n)) => n.to_string(),
        Some(Token::Op(o)) => format!("{o:?}"),
        Some(Token::Open) => "'('".into(),
        Some(Token::Close) => "')'".into(),
    }
}

impl Condition {
    /// Parses a condition; nesting deeper than [`MAX_DEPTH`] is refused.
    pub fn parse(text: &str) -> Result<Condition, FilterError> {
        let mut p = Parser { tokens: tokenize(text)?, pos: 0 };
        let c = p.expr(0)?;
        match p.peek() {
            None => Ok(c),
            Some(t) => Err(format!("unexpected {} (join conditions with and/or)", describe(Some(t))).into()),
        }
    }

    /// Recurses once per node level: at most `2 * MAX_DEPTH + 3` for a parsed
    /// condition (see the module's documentation).
    pub fn matches(&self, event: &Value) -> bool {
        match self {
            Condition::And(all) => all.iter().all(|c| c.matches(event)),
            Condition::Or(any) => any.iter().any(|c| c.matches(event)),
            Condition::Not(c) => !c.matches(event),
            Condition::Exists(p) => lookup(event, p).is_some(),
            Condition::Eq(p, v) => lookup(event, p).is_some_and(|x| same(x, v)),
            Condition::Ne(p, v) => !lookup(event, p).is_some_and(|x| same(x, v)),
            Condition::Contains(p, v) => match lookup(event, p) {
                Some(Value::String(s)) => v.as_str().is_some_and(|needle| s.contains(needle)),
                Some(Value::Array(items)) => items.iter().any(|x| same(x, v)),
                _ => false,
            },
        }
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// The value at a dotted path.
pub fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| cur.as_object()?.get(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(cond: &str, event: &Value) -> bool {
        Condition::parse(cond).unwrap_or_else(|e| panic!("{cond}: {e}")).matches(event)
    }

    #[test]
    fn evaluates_the_documented_forms() {
        let e = json!({"type": "track", "event": "Order Completed", "properties": {"total": 20, "tags": ["a", "b"], "coupon": null},
                       "context": {"library": {"name": "analytics-python"}}});
        assert!(m(r#"type = "track""#, &e));
        assert!(!m(r#"type = "identify""#, &e));
        assert!(m(r#"type = "track" and event = "Order Completed""#, &e));
        assert!(m(r#"type = "page" or properties.total = 20.0"#, &e));
        assert!(m(r#"not (type = "page")"#, &e));
        assert!(m("properties.total exists", &e));
        assert!(m("properties.coupon exists", &e), "null is present");
        assert!(m("properties.coupon = null", &e));
        assert!(!m("properties.missing exists", &e));
        assert!(m(r#"properties.missing != "x""#, &e), "absent is != anything");
        assert!(!m(r#"properties.missing = "x""#, &e));
        assert!(m(r#"context.library.name contains "python""#, &e));
        assert!(m(r#"properties.tags contains "b""#, &e));
        assert!(m(r#"event = "say \"hi\"" or true_field != false"#, &e));
        assert!(m(r#"type = "track" and (event = "x" or properties.total = 20)"#, &e));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (bad, needle) in [
            ("type = track", "quote strings"),
            ("type", "expected =, !=, contains or exists"),
            (r#"type = "a" event = "b""#, "and/or"),
            (r#"(type = "a""#, "')'"),
            (r#"type = "a"#, "unterminated"),
            ("type ~ 1", "unexpected character"),
        ] {
            let err = Condition::parse(bad).unwrap_err();
            assert!(err.to_string().contains(needle), "{bad}: {err}");
        }
    }

    /// Nodes on the longest path from the root to a leaf.
    fn height(c: &Condition) -> usize {
        match c {
            Condition::And(v) | Condition::Or(v) => 1 + v.iter().map(height).max().unwrap_or(0),
            Condition::Not(c) => 1 + height(c),
            _ => 1,
        }
    }

    /// Runs `f` on a thread with a small stack, so unbounded recursion fails
    /// here (the process aborts) instead of passing by luck on a big stack.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new().stack_size(256 * 1024).spawn(f).unwrap().join().unwrap()
    }

    #[test]
    fn deep_not_is_refused_with_a_clear_error() {
        on_small_stack(|| {
            let ok = format!("{}type exists", "not ".repeat(MAX_DEPTH));
            let c = Condition::parse(&ok).expect("MAX_DEPTH levels are allowed");
            assert_eq!(c.matches(&serde_json::json!({"type": "track"})), MAX_DEPTH % 2 == 0);
            let over = format!("{}type exists", "not ".repeat(MAX_DEPTH + 1));
            assert_eq!(Condition::parse(&over), Err(FilterError::TooDeep { max: MAX_DEPTH }));
            // What the admin API was sent: 6,000 levels.
            let err = Condition::parse(&format!("{}type exists", "not ".repeat(6000))).unwrap_err();
            assert_eq!(err, FilterError::TooDeep { max: MAX_DEPTH });
            assert!(err.to_string().contains("more than 64 levels deep"), "{err}");
        });
    }

    #[test]
    fn deep_parentheses_are_refused() {
        on_small_stack(|| {
            let nest = |n: usize| format!("{}type = \"track\"{}", "(".repeat(n), ")".repeat(n));
            let c = Condition::parse(&nest(MAX_DEPTH)).expect("MAX_DEPTH levels are allowed");
            assert!(c.matches(&serde_json::json!({"type": "track"})));
            assert_eq!(Condition::parse(&nest(MAX_DEPTH + 1)), Err(FilterError::TooDeep { max: MAX_DEPTH }));
            assert_eq!(Condition::parse(&nest(20_000)), Err(FilterError::TooDeep { max: MAX_DEPTH }));
            // Unbalanced input is refused as deep before it is found unbalanced.
            assert_eq!(Condition::parse(&"(".repeat(20_000)), Err(FilterError::TooDeep { max: MAX_DEPTH }));
            // `not` and parentheses count together.
            let mixed = format!("{}type exists{}", "not (".repeat(MAX_DEPTH / 2 + 1), ")".repeat(MAX_DEPTH / 2 + 1));
            assert_eq!(Condition::parse(&mixed), Err(FilterError::TooDeep { max: MAX_DEPTH }));
        });
    }

    #[test]
    fn long_and_or_chains_are_flat() {
        on_small_stack(|| {
            let e = serde_json::json!({"a": 1, "b": 2});
            let all = vec!["a exists"; 10_000].join(" and ");
            let c = Condition::parse(&all).unwrap();
            assert_eq!(height(&c), 2);
            assert!(c.matches(&e));
            let any = format!("{} or b exists", vec!["x exists"; 10_000].join(" or "));
            let c = Condition::parse(&any).unwrap();
            assert_eq!(height(&c), 2);
            assert!(c.matches(&e));
            let mixed = format!("{} or a exists and b exists", vec!["x exists and a exists"; 5_000].join(" or "));
            let c = Condition::parse(&mixed).unwrap();
            assert_eq!(height(&c), 3);
            assert!(c.matches(&e));
            drop(c.clone());
            // A chain inside the deepest allowed nesting is still bounded.
            let deep = format!("{}{}{}", "(".repeat(MAX_DEPTH), all, ")".repeat(MAX_DEPTH));
            let c = Condition::parse(&deep).unwrap();
            assert!(c.matches(&e));
        });
    }

    #[test]
    fn a_parsed_condition_is_at_most_2_max_depth_plus_3_deep() {
        on_small_stack(|| {
            // Each level of parentheses can open an `or` of `and`s.
            let mut s = "b exists or b exists and a exists".to_string();
            for _ in 0..MAX_DEPTH {
                s = format!("b exists or b exists and ({s})");
            }
            let c = Condition::parse(&s).unwrap();
            assert_eq!(height(&c), 2 * MAX_DEPTH + 3);
            assert!(c.matches(&serde_json::json!({"b": 1})));
            assert!(Condition::parse(&format!("b exists or b exists and ({s})")).is_err());
        });
    }
}
