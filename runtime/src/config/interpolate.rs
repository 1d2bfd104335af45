//! `${VAR}`, `${VAR:-default}` and `${VAR:?message}` in the configuration file, every unset
//! variable reported at once with its line.

use super::ConfigError;

/// A `${VAR}` (or `${VAR:?message}`) of the configuration file without a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    /// 1-based line of the file.
    pub line: usize,
    pub var: String,
    /// The file's own `${VAR:?message}`.
    pub message: Option<String>,
}

pub(super) fn missing_list(missing: &[MissingVar]) -> String {
    let mut out = if missing.len() == 1 {
        "environment variable not set:".to_owned()
    } else {
        format!("{} environment variables not set:", missing.len())
    };
    for m in missing {
        out.push_str(&format!("\n  line {}: {}", m.line, m.var));
        if let Some(msg) = m.message.as_deref().filter(|m| !m.is_empty()) {
            out.push_str(&format!(" ({msg})"));
        }
    }
    out
}

/// Replaces `${VAR}`, `${VAR:-default}` and `${VAR:?message}` with values from `lookup`;
/// every variable without a value is reported, with its line, in one error.
pub fn interpolate(text: &str, path: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let re = regex_lite::Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-?])([^}]*))?\}").expect("static regex");
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let mut last = 0;
    for cap in re.captures_iter(text) {
        let (Some(whole), Some(var)) = (cap.get(0), cap.get(1)) else { continue };
        out.push_str(&text[last..whole.start()]);
        last = whole.end();
        let value = lookup(var.as_str()).filter(|v| !v.is_empty());
        match (value, cap.get(2).map(|m| m.as_str()), cap.get(3).map(|m| m.as_str())) {
            (Some(v), _, _) => out.push_str(&v),
            (None, Some("-"), Some(default)) => out.push_str(default),
            (None, kind, msg) => missing.push(MissingVar {
                line: text[..whole.start()].matches('\n').count() + 1,
                var: var.as_str().into(),
                message: if kind == Some("?") { msg.map(str::to_owned) } else { None },
            }),
        }
    }
    if !missing.is_empty() {
        return Err(ConfigError::MissingVars { path: path.into(), missing });
    }
    out.push_str(&text[last..]);
    Ok(out)
}
