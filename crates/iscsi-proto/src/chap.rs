//! CHAP authentication (RFC 7143 §12.1.3, RFC 1994), sans-IO, for both ends.
//!
//! The exchange, as text keys in the Security stage:
//!
//! ```text
//! I->T  CHAP_A=<A1,A2,...>                 (ChapResponder::offer_algorithms)
//! T->I  CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>     (ChapAuthenticator::handle_algorithms)
//! I->T  CHAP_N=<N> CHAP_R=<R> [CHAP_I CHAP_C] (ChapResponder::handle_challenge)
//! T->I  [CHAP_N=<N> CHAP_R=<R>]              (ChapAuthenticator::handle_response)
//!       I verifies the target                (ChapResponder::verify_target)
//! ```
//!
//! The response is `H(id || secret || challenge)` with the algorithm chosen
//! from MD5 (5), SHA-1 (6), SHA-256 (7) and SHA3-256 (8). Responses are
//! compared in constant time, a challenge reflected back at its issuer is
//! refused, and so is one secret used in both directions. Secrets never
//! appear in `Debug` output or in errors.

use md5::Md5;
use sha1::Sha1;
use sha2::Sha256;
use sha3::Sha3_256;
use thiserror::Error;

use crate::keys::parse_numeric;

/// Largest challenge or response accepted (RFC 7143 §12.1.3 caps CHAP_C at
/// 1024 bytes).
pub const MAX_BINARY_LEN: usize = 1024;

/// A CHAP hash algorithm, by its IANA "CHAP_A" code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    /// MD5 (5), the one RFC 7143 requires.
    Md5,
    /// SHA-1 (6).
    Sha1,
    /// SHA-256 (7).
    Sha256,
    /// SHA3-256 (8).
    Sha3_256,
}

impl ChapAlgorithm {
    /// The CHAP_A code.
    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha1 => 6,
            ChapAlgorithm::Sha256 => 7,
            ChapAlgorithm::Sha3_256 => 8,
        }
    }

    /// The algorithm for a CHAP_A code.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            6 => Some(ChapAlgorithm::Sha1),
            7 => Some(ChapAlgorithm::Sha256),
            8 => Some(ChapAlgorithm::Sha3_256),
            _ => None,
        }
    }

    /// Length of the response, in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha1 => 20,
            ChapAlgorithm::Sha256 | ChapAlgorithm::Sha3_256 => 32,
        }
    }

    /// `H(id || secret || challenge)`.
    pub fn digest(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        fn h<D: sha2::Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(secret);
            d.update(challenge);
            d.finalize().to_vec()
        }
        match self {
            ChapAlgorithm::Md5 => h::<Md5>(id, secret, challenge),
            ChapAlgorithm::Sha1 => h::<Sha1>(id, secret, challenge),
            ChapAlgorithm::Sha256 => h::<Sha256>(id, secret, challenge),
            ChapAlgorithm::Sha3_256 => h::<Sha3_256>(id, secret, challenge),
        }
    }
}

/// A CHAP secret. Its `Debug` says nothing, and it is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The secret bytes, for hashing.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // A volatile wipe would need `unsafe`; black_box below keeps
            // these stores from being optimised away in practice.
            *b = 0;
        }
        std::hint::black_box(&self.0);
    }
}

/// What went wrong in a CHAP exchange, and who did it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChapError {
    /// A CHAP key arrived at the wrong step of the exchange.
    #[error("{key} not expected at this step of the CHAP exchange")]
    UnexpectedKey {
        /// The key.
        key: String,
    },
    /// A required CHAP key is absent.
    #[error("{key} missing from the CHAP exchange")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A value that does not parse (binary encoding, number, length).
    #[error("malformed {key}: {reason}")]
    Malformed {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The peer offered no algorithm we allow.
    #[error("no common CHAP algorithm in {offered:?}")]
    NoCommonAlgorithm {
        /// The peer's list.
        offered: String,
    },
    /// The target chose an algorithm we did not offer.
    #[error("target chose CHAP algorithm {code:?}, which was not offered")]
    AlgorithmNotOffered {
        /// The value it sent.
        code: String,
    },
    /// The initiator's CHAP_N names no user we know.
    #[error("unknown CHAP user {user:?}")]
    UnknownUser {
        /// The name.
        user: String,
    },
    /// The initiator's CHAP_R is wrong for its user.
    #[error("CHAP response of user {user:?} does not verify")]
    AuthenticationFailed {
        /// The name.
        user: String,
    },
    /// The peer sent back the very challenge we issued (reflection attack).
    #[error("peer reflected our own CHAP challenge")]
    ReflectedChallenge,
    /// The same secret is configured for both directions (RFC 7143 §12.1.3).
    #[error("the same CHAP secret is configured for both directions")]
    IdenticalSecrets,
    /// The initiator asked for mutual CHAP but the target has no credentials.
    #[error("mutual CHAP requested but no target credentials are configured")]
    MutualNotConfigured,
    /// The target named itself differently from what we expect.
    #[error("target CHAP name {got:?} is not the expected {expected:?}")]
    TargetNameMismatch {
        /// The configured name.
        expected: String,
        /// The name received.
        got: String,
    },
    /// The target's CHAP_R does not verify.
    #[error("target's CHAP response does not verify")]
    TargetAuthenticationFailed,
    /// No randomness available for a challenge.
    #[error("no randomness available for a CHAP challenge")]
    Random,
}

impl ChapError {
    /// Whether this is an authentication failure (Login status 0x0201) rather
    /// than a malformed or out-of-order exchange (0x0200, initiator error).
    pub fn is_authentication_failure(&self) -> bool {
        !matches!(
            self,
            ChapError::UnexpectedKey { .. }
                | ChapError::MissingKey { .. }
                | ChapError::Malformed { .. }
                | ChapError::Random
        )
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes bytes as an RFC 7143 §6.1 binary value in hex (`0x...`).
pub fn encode_binary(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Decodes an RFC 7143 §6.1 binary value: `0x`/`0X` hex (an odd digit
/// count implies a leading zero) or `0b`/`0B` base64, at most
/// [`MAX_BINARY_LEN`] bytes.
pub fn decode_binary(s: &str) -> Result<Vec<u8>, ChapError> {
    decode_binary_for("binary-value", s)
}

fn decode_binary_for(key: &'static str, s: &str) -> Result<Vec<u8>, ChapError> {
    let malformed = |reason| ChapError::Malformed { key, reason };
    if s.len() > 2 + MAX_BINARY_LEN * 2 {
        return Err(malformed("too long"));
    }
    let bytes = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        decode_hex(hex).ok_or_else(|| malformed("bad hex"))?
    } else if let Some(b64) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        decode_base64(b64).ok_or_else(|| malformed("bad base64"))?
    } else {
        return Err(malformed("no 0x or 0b prefix"));
    };
    if bytes.is_empty() {
        return Err(malformed("empty"));
    }
    if bytes.len() > MAX_BINARY_LEN {
        return Err(malformed("too long"));
    }
    Ok(bytes)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s
        .chars()
        .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()))
        .collect::<Option<_>>()?;
    let mut out = Vec::with_capacity(digits.len() / 2 + 1);
    let mut rest = digits.as_slice();
    if rest.len() % 2 == 1 {
        out.push(*rest.first()?);
        rest = rest.get(1..)?;
    }
    for pair in rest.chunks_exact(2) {
        if let [hi, lo] = pair {
            out.push(hi << 4 | lo);
        }
    }
    Some(out)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let body = s.trim_end_matches('=');
    if s.len() % 4 != 0 || s.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in body.bytes() {
        let v = B64.iter().position(|&b| b == c)?;
        acc = (acc << 6) | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn random_bytes(len: usize) -> Result<Vec<u8>, ChapError> {
    let mut buf = vec![0u8; len];
    getrandom::fill(&mut buf).map_err(|_| ChapError::Random)?;
    Ok(buf)
}

fn parse_id(value: &str) -> Result<u8, ChapError> {
    parse_numeric(value)
        .and_then(|n| u8::try_from(n).ok())
        .ok_or(ChapError::Malformed {
            key: "CHAP_I",
            reason: "not a number from 0 to 255",
        })
}

/// Pulls the CHAP keys of one step out of `pairs`, refusing any other CHAP key.
fn take<'a>(
    pairs: &'a [(String, String)],
    wanted: &[&'static str],
) -> Result<Vec<Option<&'a str>>, ChapError> {
    let mut found = vec![None; wanted.len()];
    for (k, v) in pairs {
        match wanted.iter().position(|w| w == k) {
            Some(i) => {
                if let Some(slot) = found.get_mut(i) {
                    *slot = Some(v.as_str());
                }
            }
            None if k.starts_with("CHAP_") => {
                return Err(ChapError::UnexpectedKey { key: k.clone() })
            }
            None => {}
        }
    }
    Ok(found)
}

/// A fresh challenge as long as the algorithm's digest (at least 16 bytes).
fn new_challenge(alg: ChapAlgorithm) -> Result<(u8, Vec<u8>), ChapError> {
    let id = random_bytes(1)?.first().copied().unwrap_or(0);
    Ok((id, random_bytes(alg.digest_len().max(16))?))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetStep {
    AwaitAlgorithms,
    AwaitResponse {
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// The target's side of CHAP: issues the challenge, verifies the initiator,
/// and answers a mutual challenge.
#[derive(Debug, Clone)]
pub struct ChapAuthenticator {
    allowed: Vec<ChapAlgorithm>,
    step: TargetStep,
}

/// A verified initiator, and what to send back (the mutual response, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapOutcome {
    /// The CHAP_N the initiator authenticated as.
    pub initiator_user: String,
    /// `CHAP_N`/`CHAP_R` for mutual CHAP, else empty.
    pub reply: Vec<(String, String)>,
}

impl ChapAuthenticator {
    /// A target accepting these algorithms (the initiator's order decides).
    pub fn new(allowed: Vec<ChapAlgorithm>) -> Self {
        Self {
            allowed,
            step: TargetStep::AwaitAlgorithms,
        }
    }

    /// Picks the first algorithm of the initiator's CHAP_A list we allow and
    /// returns CHAP_A, CHAP_I and CHAP_C.
    pub fn handle_algorithms(&mut self, chap_a: &str) -> Result<Vec<(String, String)>, ChapError> {
        if self.step != TargetStep::AwaitAlgorithms {
            return Err(ChapError::UnexpectedKey {
                key: "CHAP_A".into(),
            });
        }
        let alg = chap_a
            .split(',')
            .filter_map(|c| parse_numeric(c).and_then(ChapAlgorithm::from_code))
            .find(|a| self.allowed.contains(a))
            .ok_or_else(|| ChapError::NoCommonAlgorithm {
                offered: chap_a.to_owned(),
            })?;
        let (id, challenge) = new_challenge(alg)?;
        let reply = vec![
            ("CHAP_A".to_owned(), alg.code().to_string()),
            ("CHAP_I".to_owned(), id.to_string()),
            ("CHAP_C".to_owned(), encode_binary(&challenge)),
        ];
        self.step = TargetStep::AwaitResponse { alg, id, challenge };
        Ok(reply)
    }

    /// Verifies CHAP_N/CHAP_R with the secret `secret_for` gives for that
    /// user; if the initiator sent CHAP_I/CHAP_C, answers them with
    /// `target_credentials` (name, secret).
    pub fn handle_response(
        &mut self,
        pairs: &[(String, String)],
        secret_for: &dyn Fn(&str) -> Option<Vec<u8>>,
        target_credentials: Option<(&str, &[u8])>,
    ) -> Result<ChapOutcome, ChapError> {
        let TargetStep::AwaitResponse { alg, id, challenge } = self.step.clone() else {
            return Err(ChapError::UnexpectedKey {
                key: "CHAP_R".into(),
            });
        };
        let found = take(pairs, &["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"])?;
        let [user, response, mutual_id, mutual_challenge] = found.as_slice() else {
            return Err(ChapError::MissingKey { key: "CHAP_N" });
        };
        let user = user.ok_or(ChapError::MissingKey { key: "CHAP_N" })?;
        let response = response.ok_or(ChapError::MissingKey { key: "CHAP_R" })?;
        let response = decode_binary_for("CHAP_R", response)?;
        self.step = TargetStep::Done;

        let secret = Secret::new(secret_for(user).ok_or_else(|| ChapError::UnknownUser {
            user: user.to_owned(),
        })?);
        let expected = alg.digest(id, secret.expose(), &challenge);
        if !constant_time_eq(&expected, &response) {
            return Err(ChapError::AuthenticationFailed {
                user: user.to_owned(),
            });
        }
        let reply = match (mutual_id, mutual_challenge) {
            (None, None) => Vec::new(),
            (Some(mid), Some(mc)) => {
                let mid = parse_id(mid)?;
                let mc = decode_binary_for("CHAP_C", mc)?;
                if constant_time_eq(&mc, &challenge) {
                    return Err(ChapError::ReflectedChallenge);
                }
                let (name, tsecret) = target_credentials.ok_or(ChapError::MutualNotConfigured)?;
                if constant_time_eq(tsecret, secret.expose()) {
                    return Err(ChapError::IdenticalSecrets);
                }
                vec![
                    ("CHAP_N".to_owned(), name.to_owned()),
                    (
                        "CHAP_R".to_owned(),
                        encode_binary(&alg.digest(mid, tsecret, &mc)),
                    ),
                ]
            }
            (None, Some(_)) => return Err(ChapError::MissingKey { key: "CHAP_I" }),
            (Some(_), None) => return Err(ChapError::MissingKey { key: "CHAP_C" }),
        };
        Ok(ChapOutcome {
            initiator_user: user.to_owned(),
            reply,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum InitiatorStep {
    Start,
    AwaitChallenge,
    AwaitTarget {
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// The initiator's side of CHAP: answers the target's challenge and, for
/// mutual CHAP, challenges and verifies the target.
#[derive(Debug, Clone)]
pub struct ChapResponder {
    user: String,
    secret: Secret,
    mutual: Option<(String, Secret)>,
    allowed: Vec<ChapAlgorithm>,
    step: InitiatorStep,
}

impl ChapResponder {
    /// `mutual` is (the CHAP_N the target must present, its secret).
    pub fn new(
        user: impl Into<String>,
        secret: impl Into<Vec<u8>>,
        mutual: Option<(String, Vec<u8>)>,
        allowed: Vec<ChapAlgorithm>,
    ) -> Self {
        Self {
            user: user.into(),
            secret: Secret::new(secret),
            mutual: mutual.map(|(n, s)| (n, Secret::new(s))),
            allowed,
            step: InitiatorStep::Start,
        }
    }

    /// `CHAP_A=<codes in preference order>`.
    pub fn offer_algorithms(&mut self) -> Vec<(String, String)> {
        self.step = InitiatorStep::AwaitChallenge;
        let codes: Vec<String> = self.allowed.iter().map(|a| a.code().to_string()).collect();
        vec![("CHAP_A".to_owned(), codes.join(","))]
    }

    /// Answers CHAP_A/CHAP_I/CHAP_C with CHAP_N/CHAP_R, plus CHAP_I/CHAP_C of
    /// our own when mutual CHAP is configured.
    pub fn handle_challenge(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ChapError> {
        if self.step != InitiatorStep::AwaitChallenge {
            return Err(ChapError::UnexpectedKey {
                key: "CHAP_C".into(),
            });
        }
        let found = take(pairs, &["CHAP_A", "CHAP_I", "CHAP_C"])?;
        let [a, i, c] = found.as_slice() else {
            return Err(ChapError::MissingKey { key: "CHAP_A" });
        };
        let a = a.ok_or(ChapError::MissingKey { key: "CHAP_A" })?;
        let alg = parse_numeric(a)
            .and_then(ChapAlgorithm::from_code)
            .filter(|alg| self.allowed.contains(alg))
            .ok_or_else(|| ChapError::AlgorithmNotOffered { code: a.to_owned() })?;
        let id = parse_id(i.ok_or(ChapError::MissingKey { key: "CHAP_I" })?)?;
        let challenge =
            decode_binary_for("CHAP_C", c.ok_or(ChapError::MissingKey { key: "CHAP_C" })?)?;

        let mut reply = vec![
            ("CHAP_N".to_owned(), self.user.clone()),
            (
                "CHAP_R".to_owned(),
                encode_binary(&alg.digest(id, self.secret.expose(), &challenge)),
            ),
        ];
        match &self.mutual {
            Some((_, tsecret)) => {
                if constant_time_eq(tsecret.expose(), self.secret.expose()) {
                    return Err(ChapError::IdenticalSecrets);
                }
                let (mut mid, mut mc) = new_challenge(alg)?;
                while constant_time_eq(&mc, &challenge) {
                    (mid, mc) = new_challenge(alg)?;
                }
                reply.push(("CHAP_I".to_owned(), mid.to_string()));
                reply.push(("CHAP_C".to_owned(), encode_binary(&mc)));
                self.step = InitiatorStep::AwaitTarget {
                    alg,
                    id: mid,
                    challenge: mc,
                };
            }
            None => self.step = InitiatorStep::Done,
        }
        Ok(reply)
    }

    /// Checks the target's CHAP_N/CHAP_R (mutual CHAP). Without mutual CHAP
    /// there is nothing to verify and any CHAP key is unexpected.
    pub fn verify_target(&mut self, pairs: &[(String, String)]) -> Result<(), ChapError> {
        let InitiatorStep::AwaitTarget { alg, id, challenge } = self.step.clone() else {
            return match pairs.iter().find(|(k, _)| k.starts_with("CHAP_")) {
                Some((k, _)) => Err(ChapError::UnexpectedKey { key: k.clone() }),
                None => Ok(()),
            };
        };
        let Some((expected_user, tsecret)) = &self.mutual else {
            return Err(ChapError::MutualNotConfigured);
        };
        let found = take(pairs, &["CHAP_N", "CHAP_R"])?;
        let [n, r] = found.as_slice() else {
            return Err(ChapError::MissingKey { key: "CHAP_N" });
        };
        let n = n.ok_or(ChapError::MissingKey { key: "CHAP_N" })?;
        let r = decode_binary_for("CHAP_R", r.ok_or(ChapError::MissingKey { key: "CHAP_R" })?)?;
        self.step = InitiatorStep::Done;
        if n != expected_user {
            return Err(ChapError::TargetNameMismatch {
                expected: expected_user.clone(),
                got: n.to_owned(),
            });
        }
        if !constant_time_eq(&alg.digest(id, tsecret.expose(), &challenge), &r) {
            return Err(ChapError::TargetAuthenticationFailed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap()
    }

    const ALL: [ChapAlgorithm; 4] = [
        ChapAlgorithm::Sha3_256,
        ChapAlgorithm::Sha256,
        ChapAlgorithm::Sha1,
        ChapAlgorithm::Md5,
    ];

    fn hex(s: &str) -> Vec<u8> {
        decode_binary(&format!("0x{s}")).unwrap()
    }

    #[test]
    fn digest_vectors_for_each_algorithm() {
        // Computed independently (Python hashlib) over 0x2a || "ironstar-secret" || 00..0f.
        let challenge: Vec<u8> = (0u8..16).collect();
        let cases = [
            (ChapAlgorithm::Md5, "3550f0071b7be55ef7784a2bf5120097"),
            (
                ChapAlgorithm::Sha1,
                "2b7187335cfad654b70561aef600c50186abe666",
            ),
            (
                ChapAlgorithm::Sha256,
                "9abb8fac88f6b34a4535601de0346e622390b47a0f7705509ee20ee9eec5d53e",
            ),
            (
                ChapAlgorithm::Sha3_256,
                "b69c8f789f42f1dc0b5f236ea7f358c656aa6b89eac8963e07ea3ac072959da3",
            ),
        ];
        for (alg, want) in cases {
            let got = alg.digest(0x2a, b"ironstar-secret", &challenge);
            assert_eq!(got, hex(want), "{alg:?}");
            assert_eq!(got.len(), alg.digest_len());
        }
    }

    #[test]
    fn rfc_1994_style_md5_response() {
        // RFC 1994 §4.1: Response = MD5(Identifier || secret || Challenge).
        let c = hex("0123456789abcdeffedcba9876543210");
        let r = ChapAlgorithm::Md5.digest(1, b"password", &c);
        assert_eq!(encode_binary(&r), "0x7c2467060a7e072d4394158088b4f263");
    }

    #[test]
    fn codes_round_trip() {
        for alg in ALL {
            assert_eq!(ChapAlgorithm::from_code(u64::from(alg.code())), Some(alg));
        }
        assert_eq!(ChapAlgorithm::from_code(4), None);
    }

    #[test]
    fn binary_values_in_hex_and_base64() {
        assert_eq!(decode_binary("0x00ff10").unwrap(), vec![0, 255, 16]);
        assert_eq!(decode_binary("0XABC").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(
            decode_binary("0bAAECAwQFBgcICQoLDA0ODw==").unwrap(),
            (0u8..16).collect::<Vec<_>>()
        );
        assert_eq!(decode_binary("0bYWI=").unwrap(), b"ab".to_vec());
        assert_eq!(encode_binary(&[0xde, 0xad]), "0xdead");
        for bad in [
            "", "0x", "deadbeef", "0xzz", "0bYWI", "0b!!!!", "0bY===", "0x12 34",
        ] {
            assert!(decode_binary(bad).is_err(), "{bad:?}");
        }
        let too_long = format!("0x{}", "00".repeat(MAX_BINARY_LEN + 1));
        assert!(decode_binary(&too_long).is_err());
        let max = format!("0x{}", "00".repeat(MAX_BINARY_LEN));
        assert_eq!(decode_binary(&max).unwrap().len(), MAX_BINARY_LEN);
    }

    fn secrets(user: &str) -> Option<Vec<u8>> {
        (user == "alice").then(|| b"alice-secret-12".to_vec())
    }

    #[test]
    fn one_way_chap_for_every_algorithm() {
        for alg in ALL {
            let mut t = ChapAuthenticator::new(vec![alg]);
            let mut i =
                ChapResponder::new("alice", b"alice-secret-12".to_vec(), None, ALL.to_vec());
            let offer = i.offer_algorithms();
            assert_eq!(get(&offer, "CHAP_A"), "8,7,6,5");
            let challenge = t.handle_algorithms(get(&offer, "CHAP_A")).unwrap();
            assert_eq!(get(&challenge, "CHAP_A"), alg.code().to_string());
            let c = decode_binary(get(&challenge, "CHAP_C")).unwrap();
            assert!(c.len() >= alg.digest_len());
            let resp = i.handle_challenge(&challenge).unwrap();
            assert_eq!(resp.len(), 2);
            let out = t.handle_response(&resp, &secrets, None).unwrap();
            assert_eq!(out.initiator_user, "alice");
            assert!(out.reply.is_empty());
            i.verify_target(&[]).unwrap();
        }
    }

    #[test]
    fn target_follows_the_initiators_preference() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5, ChapAlgorithm::Sha256]);
        let r = t.handle_algorithms("8,7,5").unwrap();
        assert_eq!(get(&r, "CHAP_A"), "7");
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Sha256]);
        let e = t.handle_algorithms("5,junk").unwrap_err();
        assert!(e.is_authentication_failure());
    }

    #[test]
    fn mutual_chap_both_directions() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Sha256]);
        let mut i = ChapResponder::new(
            "alice",
            b"alice-secret-12".to_vec(),
            Some((
                "iqn.2024-01.org.ironstar:disk0".into(),
                b"target-secret-34".to_vec(),
            )),
            vec![ChapAlgorithm::Sha256, ChapAlgorithm::Md5],
        );
        let challenge = t
            .handle_algorithms(get(&i.offer_algorithms(), "CHAP_A"))
            .unwrap();
        let resp = i.handle_challenge(&challenge).unwrap();
        assert_eq!(resp.len(), 4);
        let out = t
            .handle_response(
                &resp,
                &secrets,
                Some(("iqn.2024-01.org.ironstar:disk0", b"target-secret-34")),
            )
            .unwrap();
        assert_eq!(get(&out.reply, "CHAP_N"), "iqn.2024-01.org.ironstar:disk0");
        i.verify_target(&out.reply).unwrap();
    }

    #[test]
    fn initiator_detects_a_wrong_target_secret_or_name() {
        let run = |target_name: &str, target_secret: &[u8]| {
            let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
            let mut i = ChapResponder::new(
                "alice",
                b"alice-secret-12".to_vec(),
                Some(("tgt".into(), b"target-secret-34".to_vec())),
                vec![ChapAlgorithm::Md5],
            );
            i.offer_algorithms();
            let challenge = t.handle_algorithms("5").unwrap();
            let resp = i.handle_challenge(&challenge).unwrap();
            let out = t
                .handle_response(&resp, &secrets, Some((target_name, target_secret)))
                .unwrap();
            i.verify_target(&out.reply)
        };
        assert_eq!(run("tgt", b"target-secret-34"), Ok(()));
        assert_eq!(
            run("tgt", b"wrong-secret-99"),
            Err(ChapError::TargetAuthenticationFailed)
        );
        assert!(matches!(
            run("evil", b"target-secret-34"),
            Err(ChapError::TargetNameMismatch { .. })
        ));
    }

    #[test]
    fn wrong_secret_and_unknown_user_fail_authentication() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let mut i = ChapResponder::new(
            "alice",
            b"not-the-secret".to_vec(),
            None,
            vec![ChapAlgorithm::Md5],
        );
        i.offer_algorithms();
        let resp = i
            .handle_challenge(&t.handle_algorithms("5").unwrap())
            .unwrap();
        let e = t.handle_response(&resp, &secrets, None).unwrap_err();
        assert_eq!(
            e,
            ChapError::AuthenticationFailed {
                user: "alice".into()
            }
        );
        assert!(e.is_authentication_failure());
        assert!(!format!("{e} {e:?}").contains("secret-12"));

        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let mut i = ChapResponder::new(
            "mallory",
            b"whatever".to_vec(),
            None,
            vec![ChapAlgorithm::Md5],
        );
        i.offer_algorithms();
        let resp = i
            .handle_challenge(&t.handle_algorithms("5").unwrap())
            .unwrap();
        let e = t.handle_response(&resp, &secrets, None).unwrap_err();
        assert!(matches!(e, ChapError::UnknownUser { .. }));
    }

    #[test]
    fn reflected_challenge_is_refused() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let challenge = t.handle_algorithms("5").unwrap();
        let id: u8 = get(&challenge, "CHAP_I").parse().unwrap();
        let c = decode_binary(get(&challenge, "CHAP_C")).unwrap();
        let r = ChapAlgorithm::Md5.digest(id, b"alice-secret-12", &c);
        let resp = kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &encode_binary(&r)),
            ("CHAP_I", &id.to_string()),
            ("CHAP_C", get(&challenge, "CHAP_C")),
        ]);
        let e = t
            .handle_response(&resp, &secrets, Some(("tgt", b"target-secret-34")))
            .unwrap_err();
        assert_eq!(e, ChapError::ReflectedChallenge);
    }

    #[test]
    fn identical_secrets_are_refused_on_both_sides() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let mut i = ChapResponder::new(
            "alice",
            b"alice-secret-12".to_vec(),
            Some(("tgt".into(), b"other-secret-56".to_vec())),
            vec![ChapAlgorithm::Md5],
        );
        i.offer_algorithms();
        let resp = i
            .handle_challenge(&t.handle_algorithms("5").unwrap())
            .unwrap();
        let e = t
            .handle_response(&resp, &secrets, Some(("tgt", b"alice-secret-12")))
            .unwrap_err();
        assert_eq!(e, ChapError::IdenticalSecrets);

        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let mut i = ChapResponder::new(
            "alice",
            b"same".to_vec(),
            Some(("tgt".into(), b"same".to_vec())),
            vec![ChapAlgorithm::Md5],
        );
        i.offer_algorithms();
        let e = i
            .handle_challenge(&t.handle_algorithms("5").unwrap())
            .unwrap_err();
        assert_eq!(e, ChapError::IdenticalSecrets);
    }

    #[test]
    fn mutual_requested_but_not_configured() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let mut i = ChapResponder::new(
            "alice",
            b"alice-secret-12".to_vec(),
            Some(("tgt".into(), b"target-secret-34".to_vec())),
            vec![ChapAlgorithm::Md5],
        );
        i.offer_algorithms();
        let resp = i
            .handle_challenge(&t.handle_algorithms("5").unwrap())
            .unwrap();
        let e = t.handle_response(&resp, &secrets, None).unwrap_err();
        assert_eq!(e, ChapError::MutualNotConfigured);
        assert!(e.is_authentication_failure());
    }

    #[test]
    fn malformed_and_out_of_order_exchanges() {
        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        let e = t
            .handle_response(
                &kv(&[("CHAP_N", "alice"), ("CHAP_R", "0x00")]),
                &secrets,
                None,
            )
            .unwrap_err();
        assert!(matches!(e, ChapError::UnexpectedKey { .. }));
        assert!(!e.is_authentication_failure());
        t.handle_algorithms("5").unwrap();
        assert!(t.handle_algorithms("5").is_err());
        let e = t
            .handle_response(&kv(&[("CHAP_N", "alice")]), &secrets, None)
            .unwrap_err();
        assert_eq!(e, ChapError::MissingKey { key: "CHAP_R" });

        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        t.handle_algorithms("5").unwrap();
        let e = t
            .handle_response(
                &kv(&[("CHAP_N", "alice"), ("CHAP_R", "zz")]),
                &secrets,
                None,
            )
            .unwrap_err();
        assert!(matches!(e, ChapError::Malformed { key: "CHAP_R", .. }));

        let mut t = ChapAuthenticator::new(vec![ChapAlgorithm::Md5]);
        t.handle_algorithms("5").unwrap();
        let e = t
            .handle_response(
                &kv(&[("CHAP_N", "alice"), ("CHAP_R", "0x00"), ("CHAP_A", "5")]),
                &secrets,
                None,
            )
            .unwrap_err();
        assert!(matches!(e, ChapError::UnexpectedKey { .. }));

        let mut i = ChapResponder::new("alice", b"s".to_vec(), None, vec![ChapAlgorithm::Sha256]);
        i.offer_algorithms();
        let e = i
            .handle_challenge(&kv(&[("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x01")]))
            .unwrap_err();
        assert!(matches!(e, ChapError::AlgorithmNotOffered { .. }));
        let mut i = ChapResponder::new("alice", b"s".to_vec(), None, vec![ChapAlgorithm::Md5]);
        i.offer_algorithms();
        let e = i
            .handle_challenge(&kv(&[
                ("CHAP_A", "5"),
                ("CHAP_I", "256"),
                ("CHAP_C", "0x01"),
            ]))
            .unwrap_err();
        assert!(matches!(e, ChapError::Malformed { key: "CHAP_I", .. }));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let i = ChapResponder::new(
            "alice",
            b"hunter2-hunter2".to_vec(),
            Some(("tgt".into(), b"target-pass-99".to_vec())),
            vec![ChapAlgorithm::Md5],
        );
        let dbg = format!("{i:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("target-pass"));
        assert!(!dbg.contains("104, 117")); // the bytes of "hu..." either
        assert_eq!(format!("{:?}", Secret::new("x")), "Secret(<redacted>)");
    }
}
