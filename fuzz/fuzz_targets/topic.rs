//! `Topic::parse` on arbitrary strings. Input: `[mode][rest]`; mode 0 parses `rest` as a topic of
//! fleet `city`, otherwise `rest` is `[fleet len][fleet][topic]`.
//!
//! Invariants: no panic; a parsed topic formats back to a string that parses to the same topic.
#![no_main]

use coevo_protocol::Topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (fleet, topic) = if mode == 0 {
        ("city".to_string(), rest)
    } else {
        let Some((&n, rest)) = rest.split_first() else {
            return;
        };
        let n = usize::from(n).min(rest.len());
        (String::from_utf8_lossy(&rest[..n]).into_owned(), &rest[n..])
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    if let Ok(t) = Topic::parse(&fleet, topic) {
        let path = t.path(&fleet);
        assert_eq!(
            Topic::parse(&fleet, &path).as_ref(),
            Ok(&t),
            "{topic:?} → {t:?} → {path:?}"
        );
        // Ids that made it into a topic are valid ids.
        match &t {
            Topic::DeltaChunk { client, .. }
            | Topic::Receipt { client }
            | Topic::Status { client } => {
                assert!(
                    coevo_protocol::topic::validate_id(client).is_ok(),
                    "{client:?}"
                )
            }
            _ => {}
        }
    }
});
