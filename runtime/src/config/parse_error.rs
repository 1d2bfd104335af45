//! A parser's error made actionable: the line, the message without its position, and a guess
//! at the fix for the two mistakes people make most — a misspelt field, and a field indented
//! under the wrong entry (which YAML reads as "missing field" elsewhere).

/// (line, message, fix).
pub(super) type Parsed = (Option<usize>, String, Option<String>);

pub(super) fn from_yaml(text: &str, path: &str, e: &yaml_serde::Error) -> Parsed {
    let full = e.to_string();
    // yaml_serde appends " at line L column C"; the line is reported on its own.
    let message = full.split(" at line ").next().unwrap_or(&full).trim();
    let location = e.location().map(|l| (l.line(), l.column()));
    finish(text, path, message, location, false)
}

pub(super) fn from_toml(text: &str, path: &str, e: &toml::de::Error) -> Parsed {
    let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    finish(text, path, e.message().trim(), line.map(|l| (l, 1)), true)
}

/// Names the failing field (`path`, "." for the whole file) once, at its line: the parser's
/// position or the field's own line, whichever is deeper in the file (the parsers point at the
/// start of the entry when a value inside it is wrong).
fn finish(text: &str, path: &str, message: &str, at: Option<(usize, usize)>, is_toml: bool) -> Parsed {
    // the YAML parser starts its message with the entry's path (`webhooks[0]: …`).
    let message = match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') => rest,
        _ => message,
    };
    let hint = hint(text, message, at, is_toml);
    let field_line = (path != ".").then(|| super::locate::line_of(text, is_toml, path)).flatten();
    let line = at.map(|a| a.0).max(field_line);
    let message = if path == "." { message.to_owned() } else { format!("{path}: {message}") };
    (line, message, hint)
}

/// The words quoted in backticks in `s`.
fn quoted(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

fn hint(text: &str, message: &str, at: Option<(usize, usize)>, is_toml: bool) -> Option<String> {
    if let Some(rest) = message.split("unknown field ").nth(1) {
        let words = quoted(rest);
        let (bad, expected) = words.split_first()?;
        if let Some(close) = expected.iter().find(|w| strsim::damerau_levenshtein(bad, w) <= 2 || w.starts_with(bad)) {
            return Some(format!("did you mean `{close}`? (rename `{bad}`)"));
        }
        return Some(format!("remove `{bad}`, or use one of the fields listed"));
    }
    let missing = message.split("missing field ").nth(1).and_then(|r| quoted(r).first().copied())?;
    if is_toml {
        return Some(format!("add `{missing} = …` to this table"));
    }
    let (line, column) = at?;
    let fields_indent = column.saturating_sub(1);
    // The key may be in the file, indented under another entry.
    let elsewhere = text.lines().enumerate().find_map(|(i, l)| {
        let trimmed = l.trim_start();
        let body = trimmed.strip_prefix("- ").map_or(trimmed, str::trim_start);
        let key = body.split(':').next()?.trim();
        (key == missing && i + 1 != line && body.contains(':')).then_some((i + 1, l.len() - body.len()))
    });
    match elsewhere {
        Some((other, indent)) if indent != fields_indent => Some(format!(
            "line {other} has `{missing}:` indented {indent} spaces, so it is not part of the entry at line {line}, \
             whose fields are indented {fields_indent}: indent line {other} by {fields_indent} spaces"
        )),
        _ => Some(format!("add `{missing}:` to the entry at line {line}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_words() {
        assert_eq!(quoted("unknown field `secret`, expected `a` or `b`"), ["secret", "a", "b"]);
    }
}
