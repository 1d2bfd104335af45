//! Feeds arbitrary bytes to the log's record decoding (postcard, as both logs store records):
//! an error or a record that encodes back to a record equal to it, whose tuples iterate
//! completely — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synapse_schemas::LogRecord;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = postcard::from_bytes::<LogRecord>(data) else { return };
    if let LogRecord::Change(c) = &record {
        for t in c.after.iter().chain(c.before.as_ref().map(|(_, t)| t)) {
            assert_eq!(t.values().count(), t.len());
        }
    }
    let again = postcard::to_stdvec(&record).unwrap();
    assert_eq!(postcard::from_bytes::<LogRecord>(&again).unwrap(), record);
});
