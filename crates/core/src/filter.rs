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

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    And(Box<Condition>, Box<Condition>),
    Or(Box<Condition>, Box<Condition>),
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

    fn expr(&mut self) -> Result<Condition, String> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Condition::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Condition, String> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            left = Condition::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Condition, String> {
        if self.keyword("not") {
            return Ok(Condition::Not(Box::new(self.unary()?)));
        }
        match self.next() {
            Some(Token::Open) => {
                let e = self.expr()?;
                match self.next() {
                    Some(Token::Close) => Ok(e),
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Token::Word(w)) if !matches!(w.as_str(), "and" | "or" | "exists" | "contains" | "true" | "false" | "null") => {
                let path: Vec<String> = w.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    return Err(format!("bad field path {w:?}"));
                }
                if self.keyword("exists") {
                    return Ok(Condition::Exists(path));
                }
                let op = match self.next() {
                    Some(Token::Op(op)) => op,
                    Some(Token::Word(k)) if k == "contains" => "contains",
                    other => return Err(format!("expected =, !=, contains or exists after {w:?}, found {}", describe(other.as_ref()))),
                };
                let value = match self.next() {
                    Some(Token::Str(s)) => Value::String(s),
                    Some(Token::Num(n)) => serde_json::Number::from_f64(n).map(Value::Number).ok_or("bad number")?,
                    Some(Token::Word(k)) if k == "true" => Value::Bool(true),
                    Some(Token::Word(k)) if k == "false" => Value::Bool(false),
                    Some(Token::Word(k)) if k == "null" => Value::Null,
                    other => return Err(format!("expected a value after {op:?}, found {} (quote strings)", describe(other.as_ref()))),
                };
                Ok(match op {
                    "=" => Condition::Eq(path, value),
                    "!=" => Condition::Ne(path, value),
                    _ => Condition::Contains(path, value),
                })
            }
            other => Err(format!("expected a field path, 'not' or '(', found {}", describe(other.as_ref()))),
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
    pub fn parse(text: &str) -> Result<Condition, String> {
        let mut p = Parser { tokens: tokenize(text)?, pos: 0 };
        let c = p.expr()?;
        match p.peek() {
            None => Ok(c),
            Some(t) => Err(format!("unexpected {} (join conditions with and/or)", describe(Some(t)))),
        }
    }

    pub fn matches(&self, event: &Value) -> bool {
        match self {
            Condition::And(a, b) => a.matches(event) && b.matches(event),
            Condition::Or(a, b) => a.matches(event) || b.matches(event),
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
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
