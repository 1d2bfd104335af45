//! Feeds arbitrary text to the parsers of stream positions (a `cursor` query parameter, an
//! SSE `Last-Event-ID`, an LSN): an error, or a value that prints back to text parsing to the
//! same value — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synapse_schemas::{Cursor, Lsn};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = text.parse::<Cursor>() {
        assert_eq!(c.to_string().parse::<Cursor>().unwrap(), c);
    }
    if let Ok(l) = text.parse::<Lsn>() {
        assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
    }
});
