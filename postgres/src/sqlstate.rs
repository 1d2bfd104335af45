//! Which PostgreSQL errors a retry can cure. One list, so capture, apply and repair agree: they
//! once disagreed on 53300 and 57P03, and capture stopped where apply retried.

/// Transient: retrying the same work later can succeed without anyone changing anything.
///
/// * no SQLSTATE: the connection broke, timed out or was refused before the server answered;
/// * class 08, connection exceptions;
/// * class 53, insufficient resources: too many clients (53300), disk full, out of memory;
/// * class 57, operator intervention: shutting down (57P01/57P02), starting up (57P03),
///   a cancelled statement (57014, also what `statement_timeout` raises);
/// * 40001 serialization failure and 40P01 deadlock: the transaction can simply run again;
/// * 55P03 lock not available (`lock_timeout`) and 55006 object in use (a replication slot or
///   origin still held by our own crashed session until the server notices).
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        // A certificate the TLS policy refuses, or a server without TLS where it is required.
        None if crate::tls::is_tls_refusal(error) => false,
        // A password the connection must not send in clear: a setting to change, not a fault.
        None if crate::guard::is_refusal(error) => false,
        None => true,
        Some(code) => is_transient_code(code.code()),
    }
}

/// [`is_transient`] for a bare SQLSTATE, as the replication protocol reports it.
pub fn is_transient_code(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "53" | "57")) || matches!(code, "40001" | "40P01" | "55P03" | "55006")
}

#[cfg(test)]
mod tests {
    use super::is_transient_code;

    #[test]
    fn retryable_states_are_transient() {
        for code in ["53300", "57P03", "57P01", "57014", "40001", "40P01", "08006", "08001", "55P03", "55006", "53100"]
        {
            assert!(is_transient_code(code), "{code} should be retried");
        }
    }

    #[test]
    fn states_needing_a_person_are_definite() {
        // permission denied, undefined table/column, unique and not-null violations, syntax,
        // invalid password, numeric out of range, a raised exception.
        for code in ["42501", "42P01", "42703", "23505", "23502", "42601", "28P01", "22003", "P0001", "", "5"] {
            assert!(!is_transient_code(code), "{code} should stop the component");
        }
    }
}
