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

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1
            }
            '\'' => {
                let mut t = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err("unterminated string literal".into()),
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
                out.push(Tok::Text(t));
            }
            '=' | '!' | '<' | '>' => {
                let two: String = b[i..(i + 2).min(b.len())].iter().collect();
                let (op, len) = match two.as_str() {
                    "!=" | "<>" => (CmpOp::Ne, 2),
                    "<=" => (CmpOp::Le, 2),
                    ">=" => (CmpOp::Ge, 2),
                    _ => match c {
                        '=' => (CmpOp::Eq, 1),
                        '<' => (CmpOp::Lt, 1),
                        '>' => (CmpOp::Gt, 1),
                        _ => return Err(format!("unexpected `{c}`")),
                    },
                };
                out.push(Tok::Op(op));
                i += len;
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.' || b[i] == '+' || b[i] == '-') {
                    i += 1;
                }
                let t: String = b[start..i].iter().collect();
                out.push(Tok::Num(t.parse().map_err(|_| format!("`{t}` is not a number"))?));
            }
            c if c.is_alphabetic() || c == '_' || c == '"' => {
                let mut t = String::new();
                if c == '"' {
                    i += 1;
                    while i < b.len() && b[i] != '"' {
                        t.push(b[i]);
                        i += 1;
                    }
                    if i == b.len() {
                        return Err("unterminated quoted column name".into());
                    }
                    i += 1;
                    // Quoted names are never keywords.
                    out.push(Tok::Ident(format!("\"{t}")));
                    continue;
                }
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                    t.push(b[i]);
                    i += 1;
                }
                out.push(Tok::Ident(t));
            }
            c => return Err(format!("unexpected `{c}`")),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_kw(&self, kw: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Ident(t)) if t.eq_ignore_ascii_case(kw))
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn column(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Ident(t)) if t.starts_with('"') => Ok(t[1..].to_owned()),
            Some(Tok::Ident(t))
                if !["and", "or", "is", "in", "not", "null"].iter().any(|k| t.eq_ignore_ascii_case(k)) =>
            {
                Ok(t)
            }
            other => Err(format!("expected a column name, found {}", describe(other.as_ref()))),
        }
    }
    fn literal(&mut self) -> Result<Lit, String> {
        match self.next() {
            Some(Tok::Text(t)) => Ok(Lit::Text(t)),
            Some(Tok::Num(n)) => Ok(Lit::Num(n)),
            Some(Tok::Ident(t)) if t.eq_ignore_ascii_case("true") => Ok(Lit::Bool(true)),
            Some(Tok::Ident(t)) if t.eq_ignore_ascii_case("false") => Ok(Lit::Bool(false)),
            other => {
                Err(format!("expected a literal ('text', a number, true or false), found {}", describe(other.as_ref())))
            }
        }
    }
    fn cond(&mut self) -> Result<Cond, String> {
        let col = self.column()?;
        if self.peek_kw("is") {
            self.pos += 1;
            let not = self.peek_kw("not");
            if not {
                self.pos += 1;
            }
            if !self.peek_kw("null") {
                return Err(format!("expected NULL after `{col} is`"));
            }
            self.pos += 1;
            return Ok(Cond::IsNull(col, !not));
        }
        if self.peek_kw("in") {
            self.pos += 1;
            if self.next() != Some(Tok::LParen) {
                return Err(format!("expected `(` after `{col} in`"));
            }
            let mut list = vec![self.literal()?];
            loop {
                match self.next() {
                    Some(Tok::Comma) => list.push(self.literal()?),
                    Some(Tok::RParen) => break,
                    other => return Err(format!("expected `,` or `)`, found {}", describe(other.as_ref()))),
                }
            }
            return Ok(Cond::In(col, list));
        }
        match self.toks.get(self.pos) {
            Some(Tok::Op(op)) => {
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
        Some(Tok::Op(o)) => format!("{o:?}"),
        Some(Tok::LParen) => "`(`".into(),
        Some(Tok::RParen) => "`)`".into(),
        Some(Tok::Comma) => "`,`".into(),
    }
}

impl std::str::FromStr for RowFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut p = Parser { toks: lex(s)?, pos: 0 };
        if p.toks.is_empty() {
            return Err("the filter is empty".into());
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
                return Err(format!("expected `and` or `or`, found {}", describe(p.toks.get(p.pos))));
            }
        }
        Ok(RowFilter { source: s.to_owned(), any })
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
            ("status =", "expected a literal"),
            ("status = 'x", "unterminated"),
            ("a = 1 b = 2", "expected `and` or `or`"),
            ("and = 1", "expected a column name"),
            ("a in (1 2)", "expected `,` or `)`"),
            ("a is 3", "expected NULL"),
            ("a = 1x", "not a number"),
        ] {
            let e = bad.parse::<RowFilter>().unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}
