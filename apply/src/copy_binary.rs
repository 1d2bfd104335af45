//! COPY's binary format for insert runs, made from the captured text values.
//!
//! The target parses a text COPY with each type's input function; for timestamps and numerics
//! that is a general-purpose parser, and it is most of what a bulk catch-up costs the target
//! (COPY of P1's table, 1M rows: 1.2–1.4 s from text, 0.68 s from binary). Capture's session
//! fixes how the source prints values (`DateStyle=ISO`, `TimeZone=UTC`,
//! `extra_float_digits=3`, see `capture/src/transport.rs`), so each of these types arrives in
//! one known form that a few lines turn into the type's binary representation (what its
//! `*send` function would produce). Anything not in that form (`bytea_output = escape`, a
//! source printing another `DateStyle`) is refused, and the caller writes it in text as before; the target's receive
//! functions check ranges and typmods as its input functions do. Why by hand, and why not
//! binary pgoutput end to end: `docs/decisions/0026-binary-copy-into-targets.md`.

use bytes::{BufMut, BytesMut};

/// The header of a binary COPY stream: signature, flags, header extension length.
pub(crate) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The trailer: a field count of -1.
pub(crate) const TRAILER: &[u8] = &[0xff, 0xff];

/// How one column's text becomes its binary COPY field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    /// text, varchar, bpchar, name, json: the binary form is the text.
    Text,
    Jsonb,
    Bytea,
    Uuid,
    Date,
    Time,
    Timestamp,
    TimestampTz,
}

impl Field {
    /// The encoder for a built-in type, by OID; `None` for types sent as text.
    pub fn for_type(oid: u32) -> Option<Field> {
        Some(match oid {
            16 => Field::Bool,
            21 => Field::Int2,
            23 => Field::Int4,
            20 => Field::Int8,
            26 => Field::Oid,
            700 => Field::Float4,
            701 => Field::Float8,
            1700 => Field::Numeric,
            19 | 25 | 114 | 1042 | 1043 => Field::Text,
            3802 => Field::Jsonb,
            17 => Field::Bytea,
            2950 => Field::Uuid,
            1082 => Field::Date,
            1083 => Field::Time,
            1114 => Field::Timestamp,
            1184 => Field::TimestampTz,
            _ => return None,
        })
    }

    /// Appends the field (length word, then the value) for `text` as the source printed it.
    /// `None`, with `buf` as it was, when `text` is not in the form this encoder knows.
    pub fn put(self, text: &str, buf: &mut BytesMut) -> Option<()> {
        let start = buf.len();
        buf.put_i32(0);
        let done = self.put_value(text, buf);
        if done.is_none() {
            buf.truncate(start);
            return None;
        }
        let len = i32::try_from(buf.len() - start - 4).ok();
        let Some(len) = len else {
            buf.truncate(start);
            return None;
        };
        buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
        Some(())
    }

    fn put_value(self, s: &str, buf: &mut BytesMut) -> Option<()> {
        match self {
            Field::Bool => buf.put_u8(match s {
                "t" => 1,
                "f" => 0,
                _ => return None,
            }),
            Field::Int2 => buf.put_i16(int(s)?),
            Field::Int4 => buf.put_i32(int(s)?),
            Field::Int8 => buf.put_i64(int(s)?),
            Field::Oid => buf.put_u32(int(s)?),
            Field::Float4 => buf.put_f32(float(s)?),
            Field::Float8 => buf.put_f64(float(s)?),
            Field::Numeric => numeric(s, buf)?,
            Field::Text => buf.put_slice(s.as_bytes()),
            Field::Jsonb => {
                buf.put_u8(1); // jsonb's binary format version
                buf.put_slice(s.as_bytes());
            }
            Field::Bytea => bytea(s, buf)?,
            Field::Uuid => buf.put_slice(&uuid(s)?),
            Field::Date => buf.put_i32(match s {
                "infinity" => i32::MAX,
                "-infinity" => i32::MIN,
                _ => {
                    let (s, bc) = era(s);
                    let (days, rest) = date(s, bc)?;
                    if !rest.is_empty() {
                        return None;
                    }
                    i32::try_from(days).ok()?
                }
            }),
            Field::Time => {
                let (us, rest) = time(s, true)?;
                if !rest.is_empty() {
                    return None;
                }
                buf.put_i64(us);
            }
            Field::Timestamp | Field::TimestampTz => buf.put_i64(match s {
                "infinity" => i64::MAX,
                "-infinity" => i64::MIN,
                _ => timestamp(s, self == Field::TimestampTz)?,
            }),
        }
        Some(())
    }
}

/// Digits only (an optional leading `-`): what PostgreSQL prints for integers. Rust's parsers
/// also take `+`, which the source never prints; refusing it keeps every accepted form exact.
fn int<T: std::str::FromStr>(s: &str) -> Option<T> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Floats print with enough digits to read back exactly (`extra_float_digits=3`), and Rust's
/// parser rounds correctly; `NaN`, `Infinity` and `-Infinity` are PostgreSQL's spellings.
fn float<T: std::str::FromStr>(s: &str) -> Option<T> {
    let ok = matches!(s, "NaN" | "Infinity" | "-Infinity")
        || s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e'));
    if !ok {
        return None;
    }
    s.parse().ok()
}

/// NUMERIC's binary form: digit count, weight (of the first base-10,000 digit), sign, display
/// scale, then the base-10,000 digits without leading or trailing zero digits (as
/// `numeric_send` writes it; zero has no digits).
fn numeric(s: &str, buf: &mut BytesMut) -> Option<()> {
    const POS: u16 = 0x0000;
    const NEG: u16 = 0x4000;
    let special = match s {
        "NaN" => Some(0xC000),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        buf.put_u16(0);
        buf.put_i16(0);
        buf.put_u16(sign);
        buf.put_u16(0);
        return Some(());
    }
    let (sign, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (NEG, rest),
        None => (POS, s),
    };
    let (int_part, frac) = match unsigned.split_once('.') {
        Some((i, f)) if !f.is_empty() => (i, f),
        Some(_) => return None,
        None => (unsigned, ""),
    };
    if int_part.is_empty() || !int_part.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    // PostgreSQL's limits: display scale ≤ 16,383, weight and digit count within i16/u16.
    let dscale = u16::try_from(frac.len()).ok().filter(|d| *d <= 0x3FFF)?;
    let int_groups = int_part.len().div_ceil(4);
    let frac_groups = frac.len().div_ceil(4);
    let weight = i16::try_from(int_groups - 1).ok()?;
    u16::try_from(int_groups + frac_groups).ok()?;
    let head = buf.len();
    buf.put_u64(0); // digit count, weight, sign, scale: written once the digits are known
    let first = buf.len();
    // Integer digits group from the decimal point leftwards, fraction digits rightwards.
    let lead = int_part.len() - (int_groups - 1) * 4;
    let mut group = |digits: &[u8], pad_right: usize| {
        let mut v: u16 = 0;
        for d in digits {
            v = v * 10 + u16::from(d - b'0');
        }
        buf.put_u16(v * 10u16.pow(pad_right as u32));
    };
    let ib = int_part.as_bytes();
    group(&ib[..lead], 0);
    for chunk in ib[lead..].chunks(4) {
        group(chunk, 0);
    }
    for chunk in frac.as_bytes().chunks(4) {
        group(chunk, 4 - chunk.len());
    }
    let nonzero = |w: &[u8]| w != [0, 0];
    let groups = buf[first..].chunks(2);
    let leading = groups.clone().take_while(|w| !nonzero(w)).count();
    let total = groups.len();
    let trailing = if leading == total { 0 } else { buf[first..].chunks(2).rev().take_while(|w| !nonzero(w)).count() };
    let kept = total - leading - trailing;
    buf.copy_within(first + 2 * leading..first + 2 * (leading + kept), first);
    buf.truncate(first + 2 * kept);
    // Zero has no digits and weight 0; otherwise each dropped leading group lowers the weight.
    let weight = if kept == 0 { 0 } else { weight - leading as i16 };
    let sign = if kept == 0 { POS } else { sign };
    let mut header = [0u8; 8];
    header[..2].copy_from_slice(&(kept as u16).to_be_bytes());
    header[2..4].copy_from_slice(&weight.to_be_bytes());
    header[4..6].copy_from_slice(&sign.to_be_bytes());
    header[6..].copy_from_slice(&dscale.to_be_bytes());
    buf[head..first].copy_from_slice(&header);
    Some(())
}

/// `\x` followed by hex digits (`bytea_output = hex`, the default).
fn bytea(s: &str, buf: &mut BytesMut) -> Option<()> {
    let hex = s.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    buf.reserve(hex.len() / 2);
    for pair in hex.chunks(2) {
        buf.put_u8(nibble(pair[0])? << 4 | nibble(pair[1])?);
    }
    Some(())
}

fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as PostgreSQL prints a uuid.
fn uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut hex = b.iter().filter(|c| **c != b'-');
    let mut out = [0u8; 16];
    for o in &mut out {
        *o = nibble(*hex.next()?)? << 4 | nibble(*hex.next()?)?;
    }
    Some(out)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn leap(y: i64) -> bool {
    y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0)
}

/// PostgreSQL counts dates and timestamps from 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
const US_PER_DAY: i64 = 86_400_000_000;

/// Exactly `n` ASCII digits as a number.
fn digits(s: &str, n: usize) -> Option<i64> {
    let d = s.get(..n)?;
    if !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

/// Dates before year 1 print with ` BC` at the very end (after a timestamptz's offset).
fn era(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

/// `YYYY-MM-DD` (four or more year digits; `bc`: year YYYY before Christ, the astronomical
/// year 1 - YYYY): days since 2000-01-01 and what follows.
fn date(s: &str, bc: bool) -> Option<(i64, &str)> {
    let year_len = s.bytes().take_while(u8::is_ascii_digit).count();
    if !(4..=7).contains(&year_len) {
        return None;
    }
    let y = digits(s, year_len)?;
    let rest = &s[year_len..];
    let rest = rest.strip_prefix('-')?;
    let m = digits(rest, 2)?;
    let rest = rest[2..].strip_prefix('-')?;
    let d = digits(rest, 2)?;
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap(if bc { 1 - y } else { y }) => 29,
        2 => 28,
        _ => return None,
    };
    if y == 0 || d < 1 || d > month_days {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some((days_from_civil(y, m, d) - PG_EPOCH_DAYS, &rest[2..]))
}

/// `HH:MM:SS[.ffffff]`: microseconds since midnight and what follows. `24:00:00` only for
/// the time type (`allow_24`).
fn time(s: &str, allow_24: bool) -> Option<(i64, &str)> {
    let h = digits(s, 2)?;
    let rest = s.get(2..)?.strip_prefix(':')?;
    let m = digits(rest, 2)?;
    let rest = rest.get(2..)?.strip_prefix(':')?;
    let sec = digits(rest, 2)?;
    let mut rest = rest.get(2..)?;
    let mut us = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=6).contains(&n) {
            return None;
        }
        us = digits(frac, n)? * 10i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    let total = ((h * 60 + m) * 60 + sec) * 1_000_000 + us;
    let max = if allow_24 { US_PER_DAY } else { US_PER_DAY - 1 };
    if m > 59 || sec > 59 || total > max {
        return None;
    }
    Some((total, rest))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]`, for timestamptz followed by the UTC offset the source
/// printed it in (`+00` under `TimeZone=UTC`; `±HH[:MM[:SS]]` in general): microseconds since
/// 2000-01-01 00:00 UTC.
fn timestamp(s: &str, with_zone: bool) -> Option<i64> {
    let (s, bc) = era(s);
    let (days, rest) = date(s, bc)?;
    let rest = rest.strip_prefix(' ')?;
    let (us, rest) = time(rest, false)?;
    let offset = if with_zone {
        zone(rest)?
    } else if rest.is_empty() {
        0
    } else {
        return None;
    };
    days.checked_mul(US_PER_DAY)?.checked_add(us)?.checked_sub(offset)
}

/// `±HH[:MM[:SS]]` to microseconds east of UTC; nothing may follow.
fn zone(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let mut secs = 0;
    let mut rest = rest;
    for (i, scale) in [3600, 60, 1].into_iter().enumerate() {
        if i > 0 {
            match rest.strip_prefix(':') {
                Some(r) => rest = r,
                None => break,
            }
        }
        let v = digits(rest, 2)?;
        if i > 0 && v > 59 {
            return None;
        }
        secs += v * scale;
        rest = &rest[2..];
    }
    if !rest.is_empty() {
        return None;
    }
    Some(sign * secs * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(f: Field, s: &str) -> Option<Vec<u8>> {
        let mut b = BytesMut::new();
        f.put(s, &mut b)?;
        Some(b[4..].to_vec())
    }

    #[test]
    fn refuses_what_it_does_not_know_and_leaves_the_buffer() {
        let mut b = BytesMut::from(&b"x"[..]);
        for (f, s) in [
            (Field::Int4, "+1"),
            (Field::Int4, "1 "),
            (Field::Int2, "40000"),
            (Field::Bool, "true"),
            (Field::Numeric, "1e5"),
            (Field::Numeric, "1."),
            (Field::Numeric, ".5"),
            (Field::Bytea, "abc"),
            (Field::Bytea, "\\x0"),
            (Field::Uuid, "a0eebc999c0b4ef8bb6d6bb9bd380a11"),
            (Field::Date, "0044-03-15 AD"),
            (Field::Date, "0002-02-29 BC"),
            (Field::Date, "2023-02-29"),
            (Field::Timestamp, "2024-01-01 24:00:00"),
            (Field::Timestamp, "2024-01-01 10:00:00+00"),
            (Field::TimestampTz, "2024-01-01 10:00:00"),
            (Field::TimestampTz, "2024-01-01 10:00:00.1234567+00"),
            (Field::Float8, "1,5"),
        ] {
            assert_eq!(f.put(s, &mut b), None, "{f:?} {s}");
            assert_eq!(&b[..], b"x");
        }
    }

    const FIELDS: [Field; 16] = [
        Field::Bool,
        Field::Int2,
        Field::Int4,
        Field::Int8,
        Field::Oid,
        Field::Float4,
        Field::Float8,
        Field::Numeric,
        Field::Text,
        Field::Jsonb,
        Field::Bytea,
        Field::Uuid,
        Field::Date,
        Field::Time,
        Field::Timestamp,
        Field::TimestampTz,
    ];

    proptest::proptest! {
        /// Values come from the log: any text is encoded or refused, never a panic, and a
        /// refusal leaves the buffer as it was.
        #[test]
        fn any_text_is_encoded_or_refused(
            s in "[-+0-9:. a-zA-Z\\\\]{0,40}|\\PC{0,40}|-?[0-9]{0,30}(\\.[0-9]{0,30})?\
                  |[0-9]{1,8}-[0-9]{1,2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,7})?)?([+-][0-9]{2}(:[0-9]{2}){0,3})?( BC)?"
        ) {
            for f in FIELDS {
                let mut b = BytesMut::from(&b"ab"[..]);
                match f.put(&s, &mut b) {
                    Some(()) => {
                        let len = i32::from_be_bytes(b[2..6].try_into().unwrap());
                        proptest::prop_assert_eq!(len as usize, b.len() - 6);
                    }
                    None => proptest::prop_assert_eq!(&b[..], b"ab"),
                }
            }
        }
    }

    #[test]
    fn known_forms() {
        assert_eq!(put(Field::Int8, "-2").unwrap(), (-2i64).to_be_bytes());
        assert_eq!(put(Field::Date, "2000-01-01").unwrap(), 0i32.to_be_bytes());
        assert_eq!(put(Field::Date, "1999-12-31").unwrap(), (-1i32).to_be_bytes());
        let one_hour = 3_600_000_000i64;
        assert_eq!(put(Field::TimestampTz, "2000-01-01 01:30:00+00:30").unwrap(), one_hour.to_be_bytes());
        assert_eq!(put(Field::Time, "24:00:00").unwrap(), US_PER_DAY.to_be_bytes());
        // -12345.678: two integer groups (1, 2345), one fraction group (6780), scale 3.
        let n = put(Field::Numeric, "-12345.678").unwrap();
        let words: Vec<u16> = n.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        assert_eq!(words, [3, 1, 0x4000, 3, 1, 2345, 6780]);
    }
}
