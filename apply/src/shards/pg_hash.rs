//! PostgreSQL's `hash_bytes_extended` (`src/common/hashfn.c`, Bob Jenkins' lookup3), the
//! function behind `hashtextextended(text, seed)`. Routing hashes a shard key exactly as the
//! server does, so a copy filters rows in SQL (`WHERE hashtextextended(k::text, 0) …`) and an
//! operator checks a shard's rows with the same expression; no crate carries this function
//! (docs/decisions/0017-shard-routing.md). Little-endian servers only (x86-64, AArch64): on
//! big-endian ones PostgreSQL itself hashes differently. Tested against a live server.

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// `hash_bytes_extended(bytes, seed)`: what `hashtextextended(t, seed)` returns for a text
/// whose bytes are `bytes` (reinterpreted as `int8` there).
pub fn hash_bytes_extended(bytes: &[u8], seed: u64) -> u64 {
    // PostgreSQL takes the length as uint32; a key over 4 GiB cannot be a text value.
    let len = bytes.len() as u32;
    let init = 0x9e37_79b9_u32.wrapping_add(len).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    let word = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let mut rest = bytes;
    while rest.len() >= 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    // The last 0–11 bytes; the lowest byte of `c` is left for the length (as in lookup3).
    for (i, byte) in rest.iter().enumerate() {
        let v = u32::from(*byte);
        match i {
            0..=3 => a = a.wrapping_add(v << (8 * i)),
            4..=7 => b = b.wrapping_add(v << (8 * (i - 4))),
            _ => c = c.wrapping_add(v << (8 * (i - 7))),
        }
    }
    finish(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values read from PostgreSQL 15: `SELECT hashtextextended(t, s)`.
    #[test]
    fn matches_postgres() {
        for (text, seed, want) in KNOWN {
            assert_eq!(hash_bytes_extended(text.as_bytes(), *seed) as i64, *want, "{text:?} seed {seed}");
        }
    }

    const KNOWN: &[(&str, u64, i64)] = &[
        ("", 0, -6939563903564495251),
        ("", 1, -150071773020461347),
        ("a", 0, 3591986179850072241),
        ("a", 1, 3325245193489759299),
        ("ab", 0, 2833316173711343549),
        ("ab", 1, 6831083245906393158),
        ("abc", 0, -6747756470228489321),
        ("abc", 1, 2125675926272891485),
        ("abcd", 0, -1038429303365892052),
        ("abcd", 1, -9042268383291675265),
        ("abcde", 0, 3076356108696143428),
        ("abcde", 1, 3336351395796527909),
        ("abcdefgh", 0, -8882191227074733005),
        ("abcdefgh", 1, -996835456672934620),
        ("abcdefghi", 0, -3278210106038014113),
        ("abcdefghi", 1, 5773402991589158274),
        ("abcdefghijk", 0, 3112909444737856467),
        ("abcdefghijk", 1, 8196382510784792041),
        ("abcdefghijkl", 0, -7556637188122330412),
        ("abcdefghijkl", 1, -6429754808531195817),
        ("abcdefghijklm", 0, 8871624171452417744),
        ("abcdefghijklm", 1, 3808842878744369845),
        ("12345", 0, -4619177982457060005),
        ("12345", 1, 5832872284225363426),
        ("-7", 0, -502294974793887995),
        ("-7", 1, 1914305813292469251),
        ("550e8400-e29b-41d4-a716-446655440000", 0, -4798044554483281687),
        ("550e8400-e29b-41d4-a716-446655440000", 1, -230742375267886084),
        ("héllo wörld, a longer text of several words", 0, 6613733707704978174),
        ("héllo wörld, a longer text of several words", 1, -2267311695288001531),
    ];
}
