//! A source's schema change (a log's schema record): which statement of the client's text
//! fired the source's event trigger — what a target runs and what a consumer is shown.
//!
//! The source's event trigger records the text the client sent, which may hold several
//! statements (`psql -c "…; …"`, a migration tool sending a whole file): it fires once per DDL
//! statement and says which one (`nth`). Rows that the other statements changed arrive as
//! changes of their own, so only that DDL statement runs here. A DDL statement run from inside
//! a `DO` block, a procedure or a function has no text of its own to replay; it is refused by
//! name instead of guessed.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Location, Token, Tokenizer};

/// DDL statement `nth` (0: the first) of the client's text `sql`, which the source's trigger
/// reported with command tag `tag`; or why it cannot be told.
pub fn statement(sql: &str, nth: u32, tag: &str) -> Result<String, String> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .with_unescape(false)
        .tokenize_with_location()
        .map_err(|e| format!("its text does not split into statements: {e}"))?;
    let chars: Vec<char> = sql.chars().collect();
    let line_starts: Vec<usize> =
        std::iter::once(0).chain(chars.iter().enumerate().filter(|(_, c)| **c == '\n').map(|(i, _)| i + 1)).collect();
    let at =
        |l: Location| line_starts.get((l.line as usize).saturating_sub(1)).map_or(0, |s| s + l.column as usize - 1);

    let mut ddl = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut span: Option<(usize, usize)> = None;
    // `CONCURRENTLY` cannot run in the applier's transaction: an index is built (or dropped)
    // there the plain way, which only the applier waits for.
    let mut concurrently: Vec<(usize, usize)> = Vec::new();
    let mut end_statement = |words: &mut Vec<String>,
                             span: &mut Option<(usize, usize)>,
                             concurrently: &mut Vec<(usize, usize)>|
     -> Result<(), String> {
        if let Some((from, to)) = span.take() {
            let index = words.iter().take(4).any(|w| w == "INDEX");
            let text: String = chars[from.min(chars.len())..to.min(chars.len())]
                .iter()
                .enumerate()
                .filter(|(i, _)| !index || !concurrently.iter().any(|(a, b)| (a..b).contains(&&(from + i))))
                .map(|(_, c)| c)
                .collect();
            concurrently.clear();
            match kind(words) {
                Kind::Ddl => ddl.push((text, words.clone())),
                Kind::Other => {}
                Kind::Hidden => {
                    return Err(format!(
                        "it ran inside `{}`: a schema change made by a DO block, procedure or function has no \
                         statement of its own to replay",
                        words.first().map(String::as_str).unwrap_or("?")
                    ))
                }
            }
        }
        words.clear();
        Ok(())
    };
    for t in &tokens {
        match &t.token {
            Token::SemiColon => end_statement(&mut words, &mut span, &mut concurrently)?,
            Token::Whitespace(_) => {}
            token => {
                if let Token::Word(w) = token {
                    if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("concurrently") {
                        concurrently.push((at(t.span.start), at(t.span.end)));
                        continue;
                    }
                    if w.quote_style.is_none() && words.len() < 8 {
                        words.push(w.value.to_ascii_uppercase());
                    }
                } else if words.is_empty() {
                    words.push(String::new()); // a statement that starts with no keyword
                }
                let (from, to) = (at(t.span.start), at(t.span.end));
                span = Some(span.map_or((from, to), |(f, _)| (f, to)));
            }
        }
    }
    end_statement(&mut words, &mut span, &mut concurrently)?;
    let Some((text, words)) = ddl.get(nth as usize) else {
        return Err(format!(
            "the source ran DDL statement {} of its text, which holds {} (a DDL statement run by a function?)",
            nth + 1,
            ddl.len()
        ));
    };
    // The trigger's command tag must name this statement: a miscount is refused, never run.
    let tag_words: Vec<&str> = tag.split_whitespace().collect();
    let matches = tag_words.first().is_some_and(|t| words.first().is_some_and(|w| w == t))
        && tag_words.last().is_some_and(|t| words.iter().any(|w| w == t));
    if !matches {
        return Err(format!("the source's command tag `{tag}` does not name statement `{text}`"));
    }
    Ok(text.clone())
}

enum Kind {
    /// A statement that fires event triggers: the ones the source recorded.
    Ddl,
    /// Rows, transaction control, settings…: their effects arrive as changes, or have none.
    Other,
    /// Runs statements the text does not show.
    Hidden,
}

fn kind(words: &[String]) -> Kind {
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match w(0) {
        "DO" | "CALL" | "EXECUTE" => Kind::Hidden,
        // Shared objects and event triggers fire no event trigger.
        "CREATE" | "ALTER" | "DROP"
            if ["DATABASE", "ROLE", "USER", "GROUP", "TABLESPACE", "SYSTEM"].contains(&w(1))
                || (w(1) == "EVENT" && w(2) == "TRIGGER") =>
        {
            Kind::Other
        }
        "CREATE" | "ALTER" | "DROP" | "COMMENT" | "SECURITY" | "IMPORT" | "REFRESH" => Kind::Ddl,
        // `SELECT … INTO` makes a table (a plain SELECT's INTO is only PL/pgSQL's).
        "SELECT" if words.iter().any(|x| x == "INTO") => Kind::Ddl,
        // Privileges on objects do; role membership does not.
        "GRANT" | "REVOKE" if words.iter().any(|x| x == "ON") => Kind::Ddl,
        _ => Kind::Other,
    }
}

/// SQL, for an event trigger on `ddl_command_end`: the `FROM` list that yields table `c` (and
/// its namespace `tn`) for each command of `pg_event_trigger_ddl_commands()` (alias `e`), an
/// index or a constraint counted as its table's. Capture and the mesh both use it, so they
/// agree on which tables a statement touched. A macro so `concat!` can build `const` SQL.
#[macro_export]
macro_rules! ddl_command_tables {
    () => {
        "pg_catalog.pg_event_trigger_ddl_commands() e
          LEFT JOIN pg_catalog.pg_index i ON e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND i.indexrelid = e.objid
          LEFT JOIN pg_catalog.pg_constraint k ON e.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND k.oid = e.objid
          JOIN pg_catalog.pg_class c ON c.oid = CASE
              WHEN i.indrelid IS NOT NULL THEN i.indrelid
              WHEN k.conrelid IS NOT NULL THEN k.conrelid
              WHEN e.classid = 'pg_catalog.pg_class'::pg_catalog.regclass THEN e.objid END
          JOIN pg_catalog.pg_namespace tn ON tn.oid = c.relnamespace"
    };
}

/// SQL creating event trigger `$name` on `$event` to run `$function()`, unless it exists
/// (`CREATE EVENT TRIGGER` has no `IF NOT EXISTS`).
#[macro_export]
macro_rules! create_event_trigger {
    ($name:literal, $event:literal, $function:literal) => {
        concat!(
            "DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = '",
            $name,
            "') THEN CREATE EVENT TRIGGER ",
            $name,
            " ON ",
            $event,
            " EXECUTE FUNCTION ",
            $function,
            "(); END IF; END $do$;"
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nth_ddl_statement_of_the_text_as_written() {
        let sql = "-- migration 7\nALTER TABLE t ADD COLUMN note text DEFAULT 'it''s';\n\
                   UPDATE t SET note = $$a;b$$ WHERE id > 0;\n  CREATE UNIQUE INDEX t_note ON t (note);";
        assert_eq!(statement(sql, 0, "ALTER TABLE").unwrap(), "ALTER TABLE t ADD COLUMN note text DEFAULT 'it''s'");
        assert_eq!(statement(sql, 1, "CREATE INDEX").unwrap(), "CREATE UNIQUE INDEX t_note ON t (note)");
        assert!(statement(sql, 2, "ALTER TABLE").unwrap_err().contains("holds 2"));
        let sql = "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_v ON t (v)";
        assert_eq!(statement(sql, 0, "CREATE INDEX").unwrap(), "CREATE INDEX  IF NOT EXISTS t_v ON t (v)");
    }

    #[test]
    fn a_miscount_or_a_hidden_statement_is_refused() {
        let e = statement("ALTER TABLE t ADD c int; DROP TABLE u", 1, "ALTER TABLE").unwrap_err();
        assert!(e.contains("does not name"), "{e}");
        let e = statement("DO $$ BEGIN ALTER TABLE t ADD c int; END $$", 0, "ALTER TABLE").unwrap_err();
        assert!(e.contains("DO block"), "{e}");
        // Statements that fire no event trigger are not counted.
        let sql = "CREATE ROLE r; GRANT r TO postgres; GRANT SELECT ON t TO r";
        assert_eq!(statement(sql, 0, "GRANT").unwrap(), "GRANT SELECT ON t TO r");
    }
}
