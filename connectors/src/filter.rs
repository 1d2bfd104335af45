//! Row filters for endpoints and streams: a small SQL-like predicate over the row image
//! (`after`, or `before` for deletes), e.g. `status = 'paid' and amount >= 100 or vip`.
//!
//! Grammar (`and` binds tighter than `or`; keywords are case-insensitive):
//! ```text
//! expr := conj ("or" conj)* ;  conj := cond ("and" cond)*
//! cond := column op literal | column "is" ["not"] "null" | column "in" "(" literal ("," literal)* ")" | column
//! op   := = | != | <> | < | <= | > | >= ;  literal := 'text' | number | true | false
//! ```
//! A bare column is true when it is JSON `true`. Numbers compare numerically even when the
//! column is rendered as a string (numeric, money); a missing column is NULL; comparisons with
//! NULL are false, as in SQL. Written by hand: the grammar is ten lines and the available
//! expression crates evaluate over their own value types, not JSON rows.

use serde_json::Value;
use std::cmp::Ordering;

#[derive(Clone, Debug, PartialEq)]
pub struct RowFilter {
    source: String,
    /// Disjunction of conjunctions.
    any: Vec<Vec<Cond>>,
}

#[derive(Clone, Debug, PartialEq)]
enum Lit {
    Text(String),
    Num(f64),
    Bool(bool),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq)]
enum Cond {
    Cmp(String, CmpOp, Lit),
    IsNull(String, bool),
    In(String, Vec<Lit>),
    Truthy(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Text(String),
    Num(f64),
    Op(CmpOp),
    LParen,
    RParen,
    Comma,
}

/// Why a filter does not parse, where (a character position), and the likely fix.
struct Failure {
    at: usize,
    message: String,
    hint: Option<&'static str>,
}

fn fail(at: usize, message: impl Into<String>) -> Failure {
    Failure { at, message: message.into(), hint: None }
}

/// The tokens, each with the position of its first character.
fn lex(s: &str) -> Result<Vec<(Tok, usize)>, Failure> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let (c, start) = (b[i], i);
        let tok = match c {
            ' ' | '\t' | '\n' | '\r' => {
                i += 1;
                continue;
            }
            '(' | ')' | ',' => {
                i += 1;
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    _ => Tok::Comma,
                }
            }
            '\'' => {
                let mut t = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => {
                            return Err(Failure {
                                hint: Some("close the text with `'` (write a quote inside it as `''`)"),
                                ..fail(start, "unterminated string literal")
                            })
                        }
                        Some('\'') if b.get(i + 1) == Some(&'\'') => {
                            t.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            t.push(*ch);
                            i += 1;
                        }
                    }
                }
                Tok::Text(t)
            }
            '=' | '!' | '<' | '>' => {
                let two: String = b[i..(i + 2).min(b.len())].iter().collect();
                let (op, len) = match two.as_str() {
                    "!=" | "<>" => (CmpOp::Ne, 2),
                    "<=" => (CmpOp::Le, 2),
                    ">=" => (CmpOp::Ge, 2),
                    "==" => {
                        return Err(Failure {
                            hint: Some("compare with a single `=`, as in SQL"),
                            ..fail(start, "`==` is not an operator")
                        })
                    }
                    _ => match c {
                        '=' => (CmpOp::Eq, 1),
                        '<' => (CmpOp::Lt, 1),
                        '>' => (CmpOp::Gt, 1),
                        _ => return Err(Failure { hint: Some("write `!=` or `<>`"), ..fail(start, "unexpected `!`") }),
                    },
                };
                i += len;
                Tok::Op(op)
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.' || b[i] == '+' || b[i] == '-') {
                    i += 1;
                }
                let t: String = b[start..i].iter().collect();
                match t.parse() {
                    Ok(n) => Tok::Num(n),
                    Err(_) => {
                        return Err(Failure {
                            hint: Some("quote text values: 'like this'"),
                            ..fail(start, format!("`{t}` is not a number"))
                        })
                    }
                }
            }
            '"' => {
                i += 1;
                let mut t = String::new();
                while i < b.len() && b[i] != '"' {
                    t.push(b[i]);
                    i += 1;
                }
                if i == b.len() {
                    return Err(fail(start, "unterminated quoted column name"));
                }
                i += 1;
                // Quoted names are never keywords.
                Tok::Ident(format!("\"{t}"))
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut t = String::new();
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                    t.push(b[i]);
                    i += 1;
                }
                Tok::Ident(t)
            }
            c => {
                return Err(Failure {
                    hint: Some("a filter uses column names, 'text', numbers, = != < <= > >=, and, or, in, is null"),
                    ..fail(start, format!("unexpected `{c}`"))
                })
            }
        };
        out.push((tok, start));
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    /// Position of the end of the text, for "found the end".
    end: usize,
}

impl Parser {
    fn peek_kw(&self, kw: &str) -> bool {
        matches!(self.toks.get(self.pos), Some((Tok::Ident(t), _)) if t.eq_ignore_ascii_case(kw))
    }
    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |t| t.1)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.0.clone());
        self.pos += 1;
        t
    }
    /// An error about the token just taken by `next`.
    fn found(&self, expected: &str, tok: Option<&Tok>) -> Failure {
        let at = self.toks.get(self.pos.saturating_sub(1)).filter(|_| tok.is_some()).map_or(self.end, |t| t.1);
        fail(at, format!("expected {expected}, found {}", describe(tok)))
    }
    fn column(&mut self) -> Result<String, Failure> {
        match self.next() {
            Some(Tok::Ident(t)) if t.starts_with('"') => Ok(t[1..].to_owned()),
            Some(Tok::Ident(t))
                if !["and", "or", "is", "in", "not", "null"].iter().any(|k| t.eq_ignore_ascii_case(k)) =>
            {
                Ok(t)
            }
            other => Err(Failure {
                hint: Some("each condition starts with a column name, e.g. status = 'paid'; quote a column named like a keyword: \"or\""),
                ..self.found("a column name", other.as_ref())
            }),
        }
    }
    fn literal(&mut self) -> Result<Lit, Failure> {
        match self.next() {
            Some(Tok::Text(t)) => Ok(Lit::Text(t)),
            Some(Tok::Num(n)) => Ok(Lit::Num(n)),
            Some(Tok::Ident(t)) if t.eq_ignore_ascii_case("true") => Ok(Lit::Bool(true)),
            Some(Tok::Ident(t)) if t.eq_ignore_ascii_case("false") => Ok(Lit::Bool(false)),
            other => {
                let hint = match other {
                    Some(Tok::Ident(_)) => "quote text values in single quotes: status = 'paid'",
                    Some(Tok::Op(_)) => "one operator per condition, then a value",
                    _ => "give a value: 'text', a number, true or false",
                };
                Err(Failure {
                    hint: Some(hint),
                    ..self.found("a value ('text', a number, true or false)", other.as_ref())
                })
            }
        }
    }
    fn cond(&mut self) -> Result<Cond, Failure> {
        let col = self.column()?;
        if self.peek_kw("is") {
            self.pos += 1;
            let not = self.peek_kw("not");
            if not {
                self.pos += 1;
            }
            if !self.peek_kw("null") {
                return Err(Failure {
                    hint: Some("`is` only tests for NULL; compare values with = or !="),
                    ..fail(self.at(), format!("expected NULL after `{col} is`"))
                });
            }
            self.pos += 1;
            return Ok(Cond::IsNull(col, !not));
        }
        if self.peek_kw("in") {
            self.pos += 1;
            if self.next() != Some(Tok::LParen) {
                return Err(fail(self.at().min(self.end), format!("expected `(` after `{col} in`")));
            }
            let mut list = vec![self.literal()?];
            loop {
                match self.next() {
                    Some(Tok::Comma) => list.push(self.literal()?),
                    Some(Tok::RParen) => break,
                    other => {
                        return Err(Failure {
                            hint: Some("separate the values with commas: in (1, 2)"),
                            ..self.found("`,` or `)`", other.as_ref())
                        })
                    }
                }
            }
            return Ok(Cond::In(col, list));
        }
        match self.toks.get(self.pos) {
            Some((Tok::Op(op), _)) => {
                let op = *op;
                self.pos += 1;
                Ok(Cond::Cmp(col, op, self.literal()?))
            }
            _ => Ok(Cond::Truthy(col)),
        }
    }
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "the end".into(),
        Some(Tok::Ident(s)) => format!("`{}`", s.trim_start_matches('"')),
        Some(Tok::Text(s)) => format!("'{s}'"),
        Some(Tok::Num(n)) => format!("{n}"),
        Some(Tok::Op(o)) => format!("`{}`", o.symbol()),
        Some(Tok::LParen) => "`(`".into(),
        Some(Tok::RParen) => "`)`".into(),
        Some(Tok::Comma) => "`,`".into(),
    }
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

impl RowFilter {
    fn parse_text(s: &str) -> Result<Self, Failure> {
        let toks = lex(s)?;
        let mut p = Parser { toks, pos: 0, end: s.chars().count() };
        if p.toks.is_empty() {
            return Err(Failure {
                hint: Some("write a condition such as status = 'paid', or remove the filter"),
                ..fail(0, "the filter is empty")
            });
        }
        let mut any = vec![vec![p.cond()?]];
        while p.pos < p.toks.len() {
            if p.peek_kw("and") {
                p.pos += 1;
                let c = p.cond()?;
                if let Some(last) = any.last_mut() {
                    last.push(c);
                }
            } else if p.peek_kw("or") {
                p.pos += 1;
                any.push(vec![p.cond()?]);
            } else {
                let found = p.toks.get(p.pos).map(|t| &t.0);
                let hint = match found {
                    Some(Tok::Op(_)) => "one operator per condition (compare with a single `=`)",
                    Some(Tok::Ident(_)) => "join conditions with `and` or `or`; quote text values: 'paid'",
                    _ => "join conditions with `and` or `or`",
                };
                return Err(Failure {
                    hint: Some(hint),
                    ..fail(p.at(), format!("expected `and` or `or`, found {}", describe(found)))
                });
            }
        }
        Ok(RowFilter { source: s.to_owned(), any })
    }
}

impl std::str::FromStr for RowFilter {
    type Err = String;

    /// The error names the character where the filter goes wrong (1-based, as an editor counts)
    /// and the likely fix.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse_text(s).map_err(|f| {
            let fix = f.hint.map(|h| format!("; {h}")).unwrap_or_default();
            format!("{} at character {}{fix}", f.message, f.at + 1)
        })
    }
}

impl std::fmt::Display for RowFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn compare(v: &Value, lit: &Lit) -> Option<Ordering> {
    match lit {
        Lit::Num(n) => num(v)?.partial_cmp(n),
        Lit::Text(t) => match v {
            Value::String(s) => Some(s.as_str().cmp(t.as_str())),
            Value::Number(_) | Value::Bool(_) => Some(v.to_string().as_str().cmp(t.as_str())),
            _ => None,
        },
        Lit::Bool(b) => match v {
            Value::Bool(x) => Some(x.cmp(b)),
            _ => None,
        },
    }
}

impl RowFilter {
    /// Whether the row (a JSON object of column → value) passes. A missing row fails.
    pub fn matches(&self, row: &Value) -> bool {
        let Value::Object(row) = row else { return false };
        let get = |c: &str| row.get(c).unwrap_or(&Value::Null);
        let holds = |c: &Cond| match c {
            Cond::IsNull(col, want_null) => get(col).is_null() == *want_null,
            Cond::Truthy(col) => get(col) == &Value::Bool(true),
            Cond::In(col, list) => list.iter().any(|l| compare(get(col), l) == Some(Ordering::Equal)),
            Cond::Cmp(col, op, lit) => match compare(get(col), lit) {
                None => false,
                Some(o) => match op {
                    CmpOp::Eq => o == Ordering::Equal,
                    CmpOp::Ne => o != Ordering::Equal,
                    CmpOp::Lt => o == Ordering::Less,
                    CmpOp::Le => o != Ordering::Greater,
                    CmpOp::Gt => o == Ordering::Greater,
                    CmpOp::Ge => o != Ordering::Less,
                },
            },
        };
        self.any.iter().any(|all| all.iter().all(holds))
    }
}

impl<'de> serde::Deserialize<'de> for RowFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("invalid filter `{s}`: {e}")))
    }
}

impl serde::Serialize for RowFilter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(s: &str) -> RowFilter {
        s.parse().unwrap()
    }

    #[test]
    fn evaluates_like_sql() {
        let row = json!({"status": "paid", "amount": "120.50", "n": 3, "vip": true, "note": null});
        assert!(f("status = 'paid'").matches(&row));
        assert!(f("amount >= 100 and status <> 'open'").matches(&row));
        assert!(!f("amount > 200").matches(&row));
        assert!(f("amount > 200 or vip").matches(&row));
        assert!(f("n in (1, 2, 3)").matches(&row));
        assert!(f("note is null and status is not null").matches(&row));
        assert!(!f("note = 'x'").matches(&row), "comparisons with NULL are false");
        assert!(!f("missing = 1").matches(&row));
        assert!(f("\"status\" = 'paid'").matches(&row));
        assert!(f("STATUS_X is null OR n = 3").matches(&row));
        assert!(f("status = 'it''s'").matches(&json!({"status": "it's"})));
        assert!(!f("status = 'paid'").matches(&Value::Null));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (bad, msg) in [
            ("", "empty"),
            ("status =", "expected a value"),
            ("status = 'x", "unterminated"),
            ("a = 1 b = 2", "expected `and` or `or`"),
            ("and = 1", "expected a column name"),
            ("a in (1 2)", "expected `,` or `)`"),
            ("a is 3", "expected NULL"),
            ("a = 1x", "not a number"),
            // Where it goes wrong (1-based character) and the fix; operators as written.
            ("status == 'paid'", "`==` is not an operator at character 8; compare with a single `=`"),
            ("status = paid", "found `paid` at character 10; quote text values in single quotes"),
            ("= 'paid'", "expected a column name, found `=` at character 1"),
            ("a = 1 b = 2", "found `b` at character 7; join conditions with `and` or `or`"),
            ("a = 1 and", "expected a column name, found the end at character 10"),
            ("a >= <", "found `<` at character 6"),
        ] {
            let e = bad.parse::<RowFilter>().unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    /// Fuzzing by property: any text — and any sequence of the grammar's own tokens, which
    /// reaches the parser's deeper states — parses or fails with a message naming a position;
    /// a filter that parses evaluates any row without panicking.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn token() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("id".to_string()),
                Just("\"st\"\"x\"".to_string()),
                Just("=".to_string()),
                Just("<>".to_string()),
                Just(">=".to_string()),
                Just("and".to_string()),
                Just("OR".to_string()),
                Just("not".to_string()),
                Just("is".to_string()),
                Just("null".to_string()),
                Just("in".to_string()),
                Just("(".to_string()),
                Just(")".to_string()),
                Just(",".to_string()),
                Just("'it''s'".to_string()),
                Just("'".to_string()),
                Just("true".to_string()),
                Just("-1e308".to_string()),
                Just("1e999".to_string()),
                Just("NaN".to_string()),
                "[a-z_]{1,3}",
                any::<f64>().prop_map(|f| f.to_string()),
            ]
        }

        fn row() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                ".{0,8}".prop_map(Value::String),
            ];
            proptest::collection::btree_map(prop_oneof![Just("id".to_string()), "[a-z_]{1,3}"], leaf, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            #[test]
            fn any_text_parses_or_fails_cleanly(text in ".{0,64}", r in row()) {
                match text.parse::<RowFilter>() {
                    Ok(f) => { let _ = f.matches(&r); }
                    Err(e) => prop_assert!(!e.is_empty()),
                }
            }

            #[test]
            fn any_token_sequence_parses_or_fails_cleanly(
                tokens in proptest::collection::vec(token(), 0..24),
                r in row(),
            ) {
                let text = tokens.join(" ");
                match text.parse::<RowFilter>() {
                    Ok(f) => { let _ = f.matches(&r); }
                    Err(e) => prop_assert!(!e.is_empty(), "{text}"),
                }
            }
        }
    }
}
