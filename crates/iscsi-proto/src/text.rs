//! The `key=value` text format of RFC 7143 §6.1, carried in the data segment
//! of Login and Text PDUs: parsing with the RFC's limits, encoding, and the
//! accumulation of a text spread over several PDUs with the C (continue) bit.
//!
//! Limits enforced at the door: key names of at most 63 bytes of
//! `[A-Za-z0-9.\-+@_#]`, values of at most 255 bytes (8192 for the binary
//! values of the authentication exchanges), valid UTF-8, every pair ended by
//! a NUL. Nothing here panics on peer input.

use thiserror::Error;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest ordinary value (RFC 7143 §6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest value of an authentication key carrying a large binary value
/// (CHAP_C, CHAP_R, SRP_*, KRB_*, SPKM_*).
pub const MAX_LONG_VALUE_LEN: usize = 8192;
/// Default cap on a text reassembled from several PDUs.
pub const DEFAULT_ACCUMULATOR_CAP: usize = 64 * 1024;

/// What is wrong with a text the peer sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TextError {
    /// A pair has no `=`.
    #[error("pair at offset {offset} has no '='")]
    MissingEquals {
        /// Byte offset of the pair.
        offset: usize,
    },
    /// The data does not end with the NUL that closes its last pair.
    #[error("text does not end with NUL (trailing {len} bytes)")]
    Unterminated {
        /// Length of the unterminated tail.
        len: usize,
    },
    /// An empty pair (two NULs in a row) before the end of the data.
    #[error("empty pair at offset {offset}")]
    EmptyPair {
        /// Byte offset of the empty pair.
        offset: usize,
    },
    /// A pair with an empty key name.
    #[error("empty key name at offset {offset}")]
    EmptyKey {
        /// Byte offset of the pair.
        offset: usize,
    },
    /// A key name longer than 63 bytes.
    #[error("key name of {len} bytes exceeds {MAX_KEY_LEN}")]
    KeyTooLong {
        /// Its length.
        len: usize,
    },
    /// A key name with a character RFC 7143 §6.1 does not allow.
    #[error("key name {key:?} has a character outside [A-Za-z0-9.-+@_#]")]
    InvalidKeyName {
        /// The offending name (lossily decoded).
        key: String,
    },
    /// A value longer than the key allows.
    #[error("value of {key} is {len} bytes, more than {max}")]
    ValueTooLong {
        /// The key.
        key: String,
        /// The value's length.
        len: usize,
        /// The limit for that key.
        max: usize,
    },
    /// A key or value that is not UTF-8.
    #[error("pair at offset {offset} is not UTF-8")]
    InvalidUtf8 {
        /// Byte offset of the pair.
        offset: usize,
    },
    /// The same key twice in one text (RFC 7143 §6.2 forbids re-sending).
    #[error("key {key} appears more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A multi-PDU text grew past the accumulator's cap.
    #[error("text spread over PDUs exceeds {cap} bytes")]
    TooLarge {
        /// The cap.
        cap: usize,
    },
}

/// The most bytes a value of `key` may have.
pub fn max_value_len(key: &str) -> usize {
    const LONG: [&str; 4] = ["CHAP_", "SRP_", "KRB_", "SPKM_"];
    if LONG.iter().any(|p| key.starts_with(p)) {
        MAX_LONG_VALUE_LEN
    } else {
        MAX_VALUE_LEN
    }
}

fn valid_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_' | b'#')
}

/// Parses a text into its pairs, in order, refusing a repeated key.
///
/// An empty data segment is an empty list. NUL padding after the last pair is
/// tolerated (some peers send it); an empty pair anywhere else is an error.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let pairs = parse_list(data)?;
    for (i, (k, _)) in pairs.iter().enumerate() {
        if pairs.iter().take(i).any(|(prev, _)| prev == k) {
            return Err(TextError::DuplicateKey { key: k.clone() });
        }
    }
    Ok(pairs)
}

/// Parses a text whose keys may legitimately repeat, such as a SendTargets
/// response (one `TargetName` and several `TargetAddress` per target).
pub fn parse_list(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs = Vec::new();
    let mut offset = 0;
    let mut rest = data;
    while !rest.is_empty() {
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(TextError::Unterminated { len: rest.len() });
        };
        let (record, tail) = rest.split_at(nul);
        let tail = tail.get(1..).unwrap_or_default();
        if record.is_empty() {
            if tail.iter().all(|&b| b == 0) {
                break;
            }
            return Err(TextError::EmptyPair { offset });
        }
        pairs.push(parse_pair(record, offset)?);
        offset += nul + 1;
        rest = tail;
    }
    Ok(pairs)
}

fn parse_pair(record: &[u8], offset: usize) -> Result<(String, String), TextError> {
    let eq = record
        .iter()
        .position(|&b| b == b'=')
        .ok_or(TextError::MissingEquals { offset })?;
    let (key, value) = record.split_at(eq);
    let value = value.get(1..).unwrap_or_default();
    if key.is_empty() {
        return Err(TextError::EmptyKey { offset });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(TextError::KeyTooLong { len: key.len() });
    }
    if !key.iter().all(|&b| valid_key_char(b)) {
        return Err(TextError::InvalidKeyName {
            key: String::from_utf8_lossy(key).into_owned(),
        });
    }
    // Only ASCII passed the check above, so this cannot fail; stay panic-free anyway.
    let key = std::str::from_utf8(key).map_err(|_| TextError::InvalidUtf8 { offset })?;
    let max = max_value_len(key);
    if value.len() > max {
        return Err(TextError::ValueTooLong {
            key: key.to_owned(),
            len: value.len(),
            max,
        });
    }
    let value = std::str::from_utf8(value).map_err(|_| TextError::InvalidUtf8 { offset })?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Appends `key=value\0` for every pair.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)], out: &mut Vec<u8>) {
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
}

/// Splits an encoded text into data segments of at most `max_segment` bytes
/// (the peer's MaxRecvDataSegmentLength), each paired with its C bit: `true`
/// on every segment but the last. A pair may straddle two segments, as
/// RFC 7143 §11.10.2 allows. An empty text yields one empty final segment.
pub fn segments(data: &[u8], max_segment: usize) -> Vec<(&[u8], bool)> {
    let size = max_segment.max(1);
    if data.is_empty() {
        return vec![(data, false)];
    }
    let count = data.chunks(size).count();
    data.chunks(size)
        .enumerate()
        .map(|(i, c)| (c, i + 1 < count))
        .collect()
}

/// Reassembles the data segments of one text carried by several Login or
/// Text PDUs (C bit set on all but the last) under a hard size cap, so a
/// hostile peer cannot make it grow without bound.
#[derive(Debug, Clone)]
pub struct TextAccumulator {
    buf: Vec<u8>,
    cap: usize,
}

impl Default for TextAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl TextAccumulator {
    /// An accumulator with the default 64 KiB cap.
    pub fn new() -> Self {
        Self::with_cap(DEFAULT_ACCUMULATOR_CAP)
    }

    /// An accumulator refusing texts larger than `cap` bytes.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
        }
    }

    /// Bytes held so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Drops whatever was held (e.g. when the exchange is abandoned).
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// Adds one PDU's data segment. Returns the whole text once the PDU with
    /// the C bit clear arrives (`continues == false`), `None` before that.
    /// On error the held bytes are dropped.
    pub fn push_raw(
        &mut self,
        segment: &[u8],
        continues: bool,
    ) -> Result<Option<Vec<u8>>, TextError> {
        let total = self.buf.len().saturating_add(segment.len());
        if total > self.cap {
            self.buf.clear();
            return Err(TextError::TooLarge { cap: self.cap });
        }
        self.buf.extend_from_slice(segment);
        if continues {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }

    /// Like [`push_raw`](Self::push_raw), then parses the complete text with
    /// [`parse`] (duplicates refused).
    pub fn push(
        &mut self,
        segment: &[u8],
        continues: bool,
    ) -> Result<Option<Vec<(String, String)>>, TextError> {
        match self.push_raw(segment, continues)? {
            Some(text) => parse(&text).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_segment_is_empty_list() {
        assert_eq!(parse(b""), Ok(vec![]));
    }

    #[test]
    fn parses_pairs_in_order() {
        let got = parse(b"InitiatorName=iqn.a\0SessionType=Normal\0").unwrap();
        assert_eq!(
            got,
            pairs(&[("InitiatorName", "iqn.a"), ("SessionType", "Normal")])
        );
    }

    #[test]
    fn value_may_contain_equals_and_be_empty() {
        let got = parse(b"SendTargets=\0X-a=b=c\0").unwrap();
        assert_eq!(got, pairs(&[("SendTargets", ""), ("X-a", "b=c")]));
    }

    #[test]
    fn missing_equals_is_an_error() {
        assert_eq!(
            parse(b"A=1\0Junk\0"),
            Err(TextError::MissingEquals { offset: 4 })
        );
    }

    #[test]
    fn trailing_garbage_without_nul_is_an_error() {
        assert_eq!(parse(b"A=1\0B=2"), Err(TextError::Unterminated { len: 3 }));
    }

    #[test]
    fn nul_padding_after_last_pair_is_tolerated_but_not_inside() {
        assert_eq!(parse(b"A=1\0\0\0\0").unwrap().len(), 1);
        assert_eq!(
            parse(b"A=1\0\0B=2\0"),
            Err(TextError::EmptyPair { offset: 4 })
        );
        assert_eq!(parse(b"\0A=1\0"), Err(TextError::EmptyPair { offset: 0 }));
    }

    #[test]
    fn key_name_limits() {
        let long = format!("{}=1\0", "K".repeat(64));
        assert_eq!(
            parse(long.as_bytes()),
            Err(TextError::KeyTooLong { len: 64 })
        );
        let ok = format!("{}=1\0", "K".repeat(63));
        assert!(parse(ok.as_bytes()).is_ok());
        assert!(matches!(
            parse(b"Bad Key=1\0"),
            Err(TextError::InvalidKeyName { .. })
        ));
        assert_eq!(parse(b"=1\0"), Err(TextError::EmptyKey { offset: 0 }));
        assert!(parse(b"X#NodeArchitecture=a\0X-com.example_v+1@x=1\0").is_ok());
    }

    #[test]
    fn value_length_limits() {
        let v255 = format!("TargetAlias={}\0", "a".repeat(255));
        assert!(parse(v255.as_bytes()).is_ok());
        let v256 = format!("TargetAlias={}\0", "a".repeat(256));
        assert!(matches!(
            parse(v256.as_bytes()),
            Err(TextError::ValueTooLong { len: 256, .. })
        ));
        let chap = format!("CHAP_C=0x{}\0", "ab".repeat(1024));
        assert!(parse(chap.as_bytes()).is_ok());
        let chap = format!("CHAP_C=0x{}\0", "ab".repeat(4096));
        assert!(matches!(
            parse(chap.as_bytes()),
            Err(TextError::ValueTooLong { max: 8192, .. })
        ));
    }

    #[test]
    fn invalid_utf8_value_is_an_error() {
        assert_eq!(
            parse(b"TargetAlias=\xff\xfe\0"),
            Err(TextError::InvalidUtf8 { offset: 0 })
        );
    }

    #[test]
    fn duplicate_keys_are_visible_to_the_caller() {
        assert_eq!(
            parse(b"A=1\0B=2\0A=1\0"),
            Err(TextError::DuplicateKey { key: "A".into() })
        );
        // A SendTargets response repeats keys legitimately.
        let st = parse_list(b"TargetName=iqn.a\0TargetAddress=1\0TargetAddress=2\0").unwrap();
        assert_eq!(st.len(), 3);
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let p = pairs(&[
            ("HeaderDigest", "CRC32C,None"),
            ("MaxBurstLength", "262144"),
        ]);
        let mut out = Vec::new();
        encode(&p, &mut out);
        assert_eq!(out, b"HeaderDigest=CRC32C,None\0MaxBurstLength=262144\0");
        assert_eq!(parse(&out).unwrap(), p);
    }

    #[test]
    fn accumulator_joins_a_pair_split_across_pdus() {
        let mut acc = TextAccumulator::new();
        assert_eq!(acc.push(b"InitiatorName=iqn.19", true), Ok(None));
        assert_eq!(acc.push(b"94-05.com.example\0Sess", true), Ok(None));
        let got = acc.push(b"ionType=Normal\0", false).unwrap().unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("InitiatorName", "iqn.1994-05.com.example"),
                ("SessionType", "Normal")
            ])
        );
        assert!(acc.is_empty());
    }

    #[test]
    fn accumulator_split_right_after_nul_and_empty_final_pdu() {
        let mut acc = TextAccumulator::new();
        assert_eq!(acc.push(b"A=1\0", true), Ok(None));
        assert_eq!(acc.push(b"", false).unwrap().unwrap(), pairs(&[("A", "1")]));
    }

    #[test]
    fn accumulator_enforces_its_cap() {
        let mut acc = TextAccumulator::with_cap(10);
        assert_eq!(acc.push(b"A=12345", true), Ok(None));
        assert_eq!(
            acc.push(b"6789\0", false),
            Err(TextError::TooLarge { cap: 10 })
        );
        assert!(acc.is_empty());
        // Default cap: 64 KiB.
        let mut acc = TextAccumulator::new();
        let chunk = vec![b'a'; 8192];
        for _ in 0..8 {
            assert_eq!(acc.push_raw(&chunk, true), Ok(None));
        }
        assert!(acc.push_raw(b"x", true).is_err());
    }

    #[test]
    fn segments_split_text_with_continue_bits() {
        let data = b"A=1\0B=2\0C=3\0";
        let segs = segments(data, 5);
        assert_eq!(segs.len(), 3);
        assert!(segs[0].1 && segs[1].1 && !segs[2].1);
        let mut acc = TextAccumulator::new();
        let mut out = None;
        for (s, c) in segs {
            out = acc.push(s, c).unwrap();
        }
        assert_eq!(out.unwrap().len(), 3);
        assert_eq!(segments(b"", 5), vec![(&b""[..], false)]);
    }
}
