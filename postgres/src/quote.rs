//! Names and values written into SQL text. Prefer bind parameters; these are for what cannot
//! be one (identifiers, DDL, PL/pgSQL bodies, replication commands).

/// `"name"`, as PostgreSQL's `quote_ident()` would always quote it.
pub fn ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

/// `'value'`; a value holding a backslash is written ` E'…'`, which reads the same under either
/// `standard_conforming_strings` setting (a plain `'…'` does not when it is off).
pub fn literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

/// A literal for the replication protocol's commands (`START_REPLICATION … (publication_names
/// '…')`): their grammar has no `E'…'` strings and treats a backslash as an ordinary character,
/// so only the quote is doubled.
pub fn replication_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals() {
        assert_eq!(ident("t"), "\"t\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\b'"), " E'a\\\\b'''");
        assert_eq!(replication_literal("\"p\"'s\\"), "'\"p\"''s\\'");
    }
}
