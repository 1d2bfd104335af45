use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A PostgreSQL write-ahead-log position, printed as PostgreSQL does (`16/B374D848`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{input}` is not a cursor: expected `<commit_lsn>/<index>` such as `0/16B3748/2` ({why})")]
pub struct ParseCursorError {
    pub input: String,
    pub why: &'static str,
}

fn err(input: &str, why: &'static str) -> ParseCursorError {
    ParseCursorError { input: input.chars().take(64).collect(), why }
}

impl FromStr for Lsn {
    type Err = ParseCursorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| err(s, "an LSN has one `/`"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err(s, "LSN high half is not hex"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err(s, "LSN low half is not hex"))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// The position of a record in a source node's change stream: the commit LSN of its transaction
/// and its index inside that transaction (0 = begin). Cursors are totally ordered and stable:
/// the same change always has the same cursor, which makes it the de-duplication key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cursor {
    pub commit_lsn: Lsn,
    pub index: u32,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.commit_lsn, self.index)
    }
}

impl FromStr for Cursor {
    type Err = ParseCursorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lsn, index) = s.rsplit_once('/').ok_or_else(|| err(s, "missing `/<index>`"))?;
        let index = index.parse().map_err(|_| err(s, "index is not a number"))?;
        Ok(Cursor { commit_lsn: lsn.parse().map_err(|e: ParseCursorError| err(s, e.why))?, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert!("16-B3".parse::<Lsn>().is_err());
        assert!("0/1/x".parse::<Cursor>().unwrap_err().to_string().contains("index"));
    }

    proptest! {
        #[test]
        fn cursor_roundtrip_and_order(a: u64, i: u32, b: u64, j: u32) {
            let x = Cursor { commit_lsn: Lsn(a), index: i };
            let y = Cursor { commit_lsn: Lsn(b), index: j };
            prop_assert_eq!(x.to_string().parse::<Cursor>().unwrap(), x);
            prop_assert_eq!(x.cmp(&y), (a, i).cmp(&(b, j)));
        }
    }
}
