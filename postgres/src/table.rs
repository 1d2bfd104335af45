//! A table's name as one typed value, instead of `"schema.table"` strings split on `.` (which
//! breaks on a schema or table name holding a dot).

use crate::quote::ident;
use std::fmt;

/// A schema-qualified table name. `Display` writes it as people read it (`schema.table`, parts
/// quoted only where needed); [`TableName::quoted`] writes it for SQL.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// Why a text is not a table name.
#[derive(Debug, thiserror::Error)]
#[error("invalid table name {text:?}: {reason} (write schema.table, double-quoting a part that holds a dot)")]
pub struct TableNameError {
    pub text: String,
    pub reason: &'static str,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName { schema: schema.into(), name: name.into() }
    }

    /// `schema.table` or `table` (in `public`); a part in double quotes keeps its case and may
    /// hold dots (`"My.Schema"."t"`); an unquoted part is folded to lower case, as PostgreSQL does.
    pub fn parse(text: &str) -> Result<Self, TableNameError> {
        let fail = |reason| TableNameError { text: text.to_owned(), reason };
        let mut parts = Vec::new();
        let mut chars = text.trim().chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(fail("an opening double quote is not closed")),
                    }
                }
            } else {
                while let Some(c) = chars.peek().copied().filter(|c| *c != '.') {
                    if c == '"' {
                        return Err(fail("a double quote inside an unquoted name"));
                    }
                    part.push(c.to_ascii_lowercase());
                    chars.next();
                }
            }
            if part.is_empty() {
                return Err(fail("an empty name part"));
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(_) => return Err(fail("text after a quoted name part")),
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(TableName { schema, name }),
            Err(parts) if parts.len() == 1 => {
                Ok(TableName::new("public", parts.into_iter().next().unwrap_or_default()))
            }
            Err(_) => Err(fail("more than two parts")),
        }
    }

    /// `"schema"."table"`, for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |p: &str| {
            let plain = p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit());
            if plain {
                p.to_owned()
            } else {
                ident(p)
            }
        };
        write!(f, "{}.{}", part(&self.schema), part(&self.name))
    }
}

impl std::str::FromStr for TableName {
    type Err = TableNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::TableName;

    #[test]
    fn parses_and_prints() {
        assert_eq!(TableName::parse("public.t").unwrap(), TableName::new("public", "t"));
        assert_eq!(TableName::parse("Items").unwrap(), TableName::new("public", "items"));
        let dotted = TableName::parse("\"My.Schema\".\"a\"\"b\"").unwrap();
        assert_eq!(dotted, TableName::new("My.Schema", "a\"b"));
        assert_eq!(dotted.to_string(), "\"My.Schema\".\"a\"\"b\"");
        assert_eq!(dotted.quoted(), "\"My.Schema\".\"a\"\"b\"");
        assert_eq!(TableName::parse(&dotted.to_string()).unwrap(), dotted);
        assert_eq!(TableName::new("public", "t").to_string(), "public.t");
        for bad in ["", "a.", ".b", "a.b.c", "\"open", "\"x\"y", "a\"b"] {
            let e = TableName::parse(bad).unwrap_err();
            assert!(e.to_string().contains("schema.table"), "{bad}: {e}");
        }
    }
}
