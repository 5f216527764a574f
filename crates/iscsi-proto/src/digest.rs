//! CRC32C header and data digests (RFC 7143 §11.1 and Appendix B).
//!
//! The `crc32c` crate uses the SSE4.2 / ARMv8 CRC instructions when present.
//! iSCSI sends the digest least significant byte first.

/// Digest of one contiguous buffer.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Digest of a data segment followed by its pad bytes (the pad is covered).
pub fn data_digest(data: &[u8], pad: usize) -> u32 {
    let crc = crc32c::crc32c(data);
    if pad == 0 {
        crc
    } else {
        crc32c::crc32c_append(crc, &[0u8; 3][..pad.min(3)])
    }
}

/// The on-wire byte order of a digest.
pub fn to_wire(digest: u32) -> [u8; 4] {
    digest.to_le_bytes()
}

/// Reads a digest from its on-wire bytes.
pub fn from_wire(bytes: [u8; 4]) -> u32 {
    u32::from_le_bytes(bytes)
}

/// Number of pad bytes after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - (len % 4)) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7143 Appendix B.4 (iSCSI test vectors, taken from RFC 3720 B.4).
    #[test]
    fn crc32c_matches_rfc_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113f_db5c);
    }

    #[test]
    fn digest_wire_order_is_little_endian() {
        // RFC 3720 B.4: 32 bytes of zeros give bytes aa 36 91 8a on the wire.
        assert_eq!(to_wire(crc32c(&[0u8; 32])), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(from_wire([0xaa, 0x36, 0x91, 0x8a]), 0x8a91_36aa);
    }

    #[test]
    fn data_digest_covers_pad() {
        let data = [1u8, 2, 3, 4, 5];
        let mut padded = data.to_vec();
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(data_digest(&data, pad_len(data.len())), crc32c(&padded));
        assert_eq!(pad_len(0), 0);
        assert_eq!(pad_len(1), 3);
        assert_eq!(pad_len(4), 0);
        assert_eq!(pad_len(7), 1);
    }
}
