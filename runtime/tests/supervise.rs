//! The supervisor's contract with an operator: a capture parked on a gap stays acceptable
//! between two tries, and a resume asked for while a component is trying is not lost.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use synapse_runtime::ops::{ComponentState, Health, Supervision, GAP_CODE};
use synapse_runtime::pipeline::supervise;

#[derive(Debug, thiserror::Error)]
#[error("a definite failure")]
struct Definite;

impl synapse_error::Classify for Definite {
    fn code(&self) -> &'static str {
        GAP_CODE
    }
    fn is_transient(&self) -> bool {
        false
    }
    fn hint(&self) -> &'static str {
        "accept the gap"
    }
}

fn parked() -> ComponentState {
    ComponentState::Parked { code: GAP_CODE.into(), error: "gap".into(), hint: "accept it".into() }
}

#[test]
fn a_gap_stays_open_between_tries_until_the_capture_streams() {
    let h = Health::new(Supervision::default());
    assert!(!h.gap_open("a"));
    h.set("capture/a", parked());
    assert!(h.gap_open("a"));
    // The next try: the state says starting, the gap is still there to accept.
    h.set("capture/a", ComponentState::Starting);
    assert!(h.gap_open("a") && !h.gap_open("b"));
    // Another component's park on the same code is not a source's gap.
    h.set("apply/a->b", parked());
    assert!(!h.gap_open("a->b"));
    h.set("capture/a", ComponentState::Streaming);
    assert!(!h.gap_open("a"));
}

/// With an hour between tries, a component that parks after a resume was asked for during its
/// try must try again at once: the operator's `synapse resume` (or an accepted gap) arrived
/// while it was busy.
#[tokio::test]
async fn a_resume_asked_for_during_a_try_is_not_lost() {
    let h = Arc::new(Health::new(Supervision { park_retry: Duration::from_secs(3600), exit_on_park: false }));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let tries = AtomicU32::new(0);
    let run = supervise("capture/a", &h, &shutdown, || {
        let n = tries.fetch_add(1, Ordering::SeqCst);
        let h = h.clone();
        async move {
            if n == 0 {
                // The operator asks while this try is still running; then it fails.
                h.resume_parked();
                Err(Definite)
            } else {
                Ok(n)
            }
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(10), run).await.expect("the resume was lost").unwrap();
    assert_eq!(got, Some(1));
}

/// Without a resume request, a parked component waits for its next try (no busy loop).
#[tokio::test]
async fn a_parked_component_waits_without_a_request() {
    let h = Health::new(Supervision { park_retry: Duration::from_secs(3600), exit_on_park: false });
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let run = supervise("capture/a", &h, &shutdown, || async { Err::<(), _>(Definite) });
    assert!(tokio::time::timeout(Duration::from_millis(500), run).await.is_err());
    assert!(h.gap_open("a"));
}
