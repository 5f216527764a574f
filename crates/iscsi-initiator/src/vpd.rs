//! Decoding of the common Vital Product Data pages (SPC-4 §7.8, SBC-4
//! §6.6) into `(field, value)` lines for people: supported pages (0x00),
//! unit serial number (0x80), device identification (0x83), block limits
//! (0xB0), block device characteristics (0xB1) and logical block
//! provisioning (0xB2). Short or odd pages decode as far as they go.

/// A readable name of a VPD page.
pub fn page_name(page: u8) -> &'static str {
    match page {
        0x00 => "Supported VPD pages",
        0x80 => "Unit serial number",
        0x83 => "Device identification",
        0x86 => "Extended INQUIRY data",
        0x87 => "Mode page policy",
        0x88 => "SCSI ports",
        0x8f => "Third-party copy",
        0xb0 => "Block limits",
        0xb1 => "Block device characteristics",
        0xb2 => "Logical block provisioning",
        _ => "Unknown",
    }
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |v, x| (v << 8) | u64::from(*x))
}

fn field(p: &[u8], at: usize, len: usize) -> Option<u64> {
    p.get(at..at.checked_add(len)?).map(be)
}

/// The page's payload (after the 4-byte header), cut to its page length.
fn payload(p: &[u8]) -> &[u8] {
    let n = field(p, 2, 2).unwrap_or(0) as usize;
    let end = 4usize.saturating_add(n).min(p.len());
    p.get(4..end).unwrap_or(&[])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_owned()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The supported page codes of page 0x00.
pub fn supported_pages(p: &[u8]) -> Vec<u8> {
    payload(p).to_vec()
}

/// Decodes a VPD page; pages we do not know come back empty.
pub fn decode(p: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(&code) = p.get(1) else {
        return out;
    };
    let body = payload(p);
    match code {
        0x00 => {
            for c in body {
                out.push((format!("{c:#04x}"), page_name(*c).to_owned()));
            }
        }
        0x80 => out.push(("Serial number".into(), text(body))),
        0x83 => {
            let mut rest = body;
            while let Some(head) = rest.get(..4) {
                let len = usize::from(head[3]);
                let Some(id) = rest.get(4..4 + len) else {
                    break;
                };
                let code_set = head[0] & 0x0f;
                let assoc = (head[1] >> 4) & 0x3;
                let kind = head[1] & 0x0f;
                let kind_name = match kind {
                    0 => "vendor specific",
                    1 => "T10 vendor ID",
                    2 => "EUI-64",
                    3 => "NAA",
                    4 => "relative target port",
                    5 => "target port group",
                    6 => "logical unit group",
                    7 => "MD5 logical unit",
                    8 => "SCSI name string",
                    _ => "reserved",
                };
                let assoc_name = match assoc {
                    0 => "logical unit",
                    1 => "target port",
                    2 => "target device",
                    _ => "reserved",
                };
                let value = match (code_set, kind) {
                    (_, 4) | (_, 5) | (_, 6) => be(id.get(2..4).unwrap_or(&[])).to_string(),
                    (2, _) | (3, _) => text(id),
                    _ => format!("0x{}", hex(id)),
                };
                out.push((format!("{kind_name} ({assoc_name})"), value));
                rest = rest.get(4 + len..).unwrap_or(&[]);
            }
        }
        0xb0 => {
            let names: [(&str, usize, usize); 10] = [
                ("Maximum compare and write length (blocks)", 1, 1),
                ("Optimal transfer length granularity", 2, 2),
                ("Maximum transfer length", 4, 4),
                ("Optimal transfer length", 8, 4),
                ("Maximum prefetch length", 12, 4),
                ("Maximum unmap LBA count", 16, 4),
                ("Maximum unmap block descriptor count", 20, 4),
                ("Optimal unmap granularity", 24, 4),
                ("Unmap granularity alignment", 28, 4),
                ("Maximum write same length", 32, 8),
            ];
            for (name, at, len) in names {
                if let Some(v) = field(body, at, len) {
                    out.push((name.to_owned(), v.to_string()));
                }
            }
        }
        0xb1 => {
            if let Some(rate) = field(body, 0, 2) {
                let v = match rate {
                    0 => "not reported".to_owned(),
                    1 => "non-rotating medium (solid state)".to_owned(),
                    r => format!("{r} rpm"),
                };
                out.push(("Medium rotation rate".into(), v));
            }
            if let Some(ff) = field(body, 3, 1) {
                let v = match ff & 0x0f {
                    0 => "not reported",
                    1 => "5.25 inch",
                    2 => "3.5 inch",
                    3 => "2.5 inch",
                    4 => "1.8 inch",
                    5 => "less than 1.8 inch",
                    _ => "reserved",
                };
                out.push(("Nominal form factor".into(), v.to_owned()));
            }
        }
        0xb2 => {
            if let Some(t) = field(body, 0, 1) {
                out.push(("Threshold exponent".into(), t.to_string()));
            }
            if let Some(f) = field(body, 1, 1) {
                let yes = |b: u64| if f & b != 0 { "yes" } else { "no" };
                out.push(("UNMAP supported (LBPU)".into(), yes(0x80).into()));
                out.push(("WRITE SAME (16) unmap (LBPWS)".into(), yes(0x40).into()));
                out.push(("WRITE SAME (10) unmap (LBPWS10)".into(), yes(0x20).into()));
                out.push((
                    "Reads of unmapped blocks are zero (LBPRZ)".into(),
                    yes(0x04).into(),
                ));
            }
            if let Some(t) = field(body, 2, 1) {
                let v = match t & 0x07 {
                    0 => "fully provisioned",
                    1 => "resource provisioned",
                    2 => "thin provisioned",
                    _ => "reserved",
                };
                out.push(("Provisioning type".into(), v.into()));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_identification_decodes_naa_and_names() {
        let mut p = vec![0, 0x83, 0, 0];
        p.extend([0x01, 0x03, 0, 8, 0x60, 1, 2, 3, 4, 5, 6, 7]);
        p.extend([0x03, 0x28, 0, 4, b'i', b'q', b'n', 0]);
        p[3] = (p.len() - 4) as u8;
        let d = decode(&p);
        assert_eq!(
            d[0],
            ("NAA (logical unit)".into(), "0x6001020304050607".into())
        );
        assert_eq!(
            d[1],
            ("SCSI name string (target device)".into(), "iqn".into())
        );
    }

    #[test]
    fn truncated_pages_decode_as_far_as_they_go() {
        assert!(decode(&[]).is_empty());
        let d = decode(&[0, 0x83, 0, 40, 0x01, 0x03, 0, 8, 0x60]);
        assert!(d.is_empty());
        let d = decode(&[0, 0xb0, 0, 60, 0, 1, 0, 8]);
        assert_eq!(d.len(), 2);
    }
}
