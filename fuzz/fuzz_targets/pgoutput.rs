//! Feeds arbitrary bytes to the pgoutput decoder: it must return an error, never panic, and
//! every tuple it accepts must iterate completely.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synapse_capture::pgoutput::{decode, Message, OldTuple};

fuzz_target!(|data: &[u8]| {
    let (in_stream, bytes) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => (false, data),
    };
    if let Ok(m) = decode(bytes, in_stream) {
        let tuples = match &m {
            Message::Insert { new, .. } => vec![*new],
            Message::Update { old, new, .. } => {
                let mut v = vec![*new];
                if let Some(OldTuple::Key(t) | OldTuple::Old(t)) = old {
                    v.push(*t);
                }
                v
            }
            Message::Delete { old: OldTuple::Key(t) | OldTuple::Old(t), .. } => vec![*t],
            _ => vec![],
        };
        for t in tuples {
            assert_eq!(t.values().count(), t.len());
        }
    }
});
