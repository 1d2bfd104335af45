//! Feeds arbitrary bytes, as a server's side of the replication connection, to the frame
//! splitter and the frame parsers: errors only, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = synapse_capture::transport::parse_frames(data);
});
