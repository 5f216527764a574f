//! Data movement of the target over real TCP: R2T-driven and unsolicited
//! writes, Data-In sequences and residuals, CRC32C digests.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use iscsi_proto::pdu::{reject_reason, Header, NopOut, Pdu, R2t, BHS_LEN, RESERVED_TAG};

const KIB: u32 = 1024;

#[tokio::test]
async fn write_with_r2t_respects_max_burst_and_max_outstanding_r2t() {
    let t = start("").await;
    let opts = LoginOpts::normal(1)
        .key("InitialR2T", "Yes")
        .key("ImmediateData", "No")
        .key("MaxBurstLength", "65536")
        .key("FirstBurstLength", "65536")
        .key("MaxOutstandingR2T", "2");
    let mut c = Client::login_to(t.addr, opts).await;
    assert_eq!(c.param("InitialR2T", "?"), "Yes");
    assert_eq!(c.param("ImmediateData", "?"), "No");
    let max_burst = c.param_u32("MaxBurstLength", 0);
    let max_r2t = c.param_u32("MaxOutstandingR2T", 0);
    assert_eq!((max_burst, max_r2t), (65536, 2));
    c.clear_ua().await;

    let len = 256 * KIB;
    let data = pattern(len as usize, 0x5a5a_0000);
    let (itt, pdu) = c.command(&write10_cdb(100, 512), len, false, true, true, Bytes::new());
    c.send(&pdu).await;

    let mut outstanding: VecDeque<R2t> = VecDeque::new();
    let mut r2ts: Vec<R2t> = Vec::new();
    loop {
        // Give the target time to send every R2T it wants before answering.
        match c.recv_within(Duration::from_millis(300)).await {
            Ok(p) => match p.header {
                Header::R2t(h) => {
                    assert_eq!(h.itt, itt);
                    outstanding.push_back(h.clone());
                    assert!(
                        outstanding.len() as u32 <= max_r2t,
                        "{} R2Ts outstanding, MaxOutstandingR2T {max_r2t}: {outstanding:?}",
                        outstanding.len()
                    );
                    r2ts.push(h);
                }
                Header::ScsiResponse(h) => {
                    assert_eq!(h.itt, itt);
                    assert_eq!(h.status, 0, "{h:?}");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            },
            Err(RecvEnd::Timeout) => {
                let h = outstanding
                    .pop_front()
                    .expect("target stalled with no R2T outstanding");
                c.answer_r2t(&h, &data).await;
            }
            Err(RecvEnd::Eof) => panic!("connection closed during the write"),
        }
    }
    assert!(
        outstanding.is_empty(),
        "status before all R2Ts were answered"
    );
    let mut next = 0;
    for (i, r) in r2ts.iter().enumerate() {
        assert_eq!(r.r2t_sn, i as u32, "R2TSN increases from 0");
        assert_eq!(r.buffer_offset, next, "R2Ts cover the buffer in order");
        assert!(r.desired_data_transfer_length > 0);
        assert!(r.desired_data_transfer_length <= max_burst);
        assert_ne!(r.ttt, RESERVED_TAG);
        next += r.desired_data_transfer_length;
    }
    assert_eq!(next, len);

    let back = c.read10(100, 512).await;
    assert_eq!(back.status, 0);
    assert!(back.data == data, "read back differs from what was written");
}

#[tokio::test]
async fn unsolicited_data_up_to_first_burst_then_r2ts_for_the_rest() {
    let t = start("").await;
    let opts = LoginOpts::normal(2)
        .key("InitialR2T", "No")
        .key("ImmediateData", "No")
        .key("FirstBurstLength", "16384")
        .key("MaxBurstLength", "65536");
    let mut c = Client::login_to(t.addr, opts).await;
    assert_eq!(c.param("InitialR2T", "?"), "No");
    assert_eq!(c.param_u32("FirstBurstLength", 0), 16384);
    c.clear_ua().await;

    let len = 128 * KIB;
    let data = pattern(len as usize, 0x1111_0000);
    let (itt, pdu) = c.command(
        &write10_cdb(300, 256),
        len,
        false,
        true,
        false,
        Bytes::new(),
    );
    c.send(&pdu).await;
    c.data_out(itt, RESERVED_TAG, 0, 16384, &data).await;
    let r = c.finish(itt, Some(&data)).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert!(!r.r2ts.is_empty());
    assert_eq!(
        r.r2ts[0].buffer_offset, 16384,
        "first R2T starts after FirstBurstLength"
    );
    let mut next = 16384;
    for (i, h) in r.r2ts.iter().enumerate() {
        assert_eq!(h.r2t_sn, i as u32);
        assert_eq!(h.buffer_offset, next);
        assert!(h.desired_data_transfer_length <= 65536);
        next += h.desired_data_transfer_length;
    }
    assert_eq!(next, len);

    let back = c.read10(300, 256).await;
    assert!(back.data == data, "read back differs from what was written");
}

#[tokio::test]
async fn data_in_segments_sequences_status_and_underflow() {
    let t = start("").await;
    let opts = LoginOpts::normal(3)
        .key("MaxRecvDataSegmentLength", "8192")
        .key("MaxBurstLength", "262144");
    let mut c = Client::login_to(t.addr, opts).await;
    assert_eq!(c.param_u32("MaxBurstLength", 0), 262144);
    c.clear_ua().await;
    let len = 1024 * KIB;
    let data = pattern(len as usize, 0x7000_0000);
    assert_eq!(c.write10(0, &data).await.status, 0);

    // EDTL one 4 KiB larger than the 1 MiB the CDB reads.
    let edtl = len + 4096;
    let (itt, pdu) = c.command(&read10_cdb(0, 2048), edtl, true, false, true, Bytes::new());
    c.send(&pdu).await;
    let r = c.finish(itt, None).await;
    assert!(
        r.response.is_none(),
        "status should travel in the last Data-In"
    );
    assert_eq!(r.status, 0);
    assert!(r.data == data, "Data-In data differs");
    let n = r.data_ins.len();
    assert_eq!(n, (len / 8192) as usize);
    let mut offset = 0u32;
    for (i, (h, l)) in r.data_ins.iter().zip(&r.data_in_lens).enumerate() {
        let l = *l as u32;
        assert!(l <= 8192, "Data-In {i} carries {l} bytes");
        assert_eq!(h.data_sn, i as u32, "DataSN");
        assert_eq!(h.buffer_offset, offset, "offset of Data-In {i}");
        offset += l;
        let at_boundary = offset % 262144 == 0;
        assert_eq!(h.final_, at_boundary, "F bit of Data-In {i} at {offset}");
        assert_eq!(h.status_present, i + 1 == n, "S bit of Data-In {i}");
    }
    let last = r.data_ins.last().unwrap();
    assert!(last.underflow && !last.overflow, "{last:?}");
    assert_eq!(last.residual_count, 4096);
    // No separate SCSI Response follows.
    c.ping().await;
}

fn nop(c: &mut Client, itt: u32, data: &[u8]) -> Pdu {
    Pdu::new(
        Header::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
        }),
        Bytes::copy_from_slice(data),
    )
}

async fn digest_client(t: &TestTarget, isid: u8) -> Client {
    let opts = LoginOpts::normal(isid)
        .key("HeaderDigest", "CRC32C,None")
        .key("DataDigest", "CRC32C,None");
    let c = Client::login_to(t.addr, opts).await;
    assert!(c.header_digest && c.data_digest, "{:?}", c.target_keys);
    c
}

#[tokio::test]
async fn commands_work_with_crc32c_digests() {
    let t = start("").await;
    let mut c = digest_client(&t, 4).await;
    c.clear_ua().await;
    let data = pattern(200 * KIB as usize, 0x0bad_f00d);
    assert_eq!(c.write10(64, &data).await.status, 0);
    let back = c.read10(64, 400).await;
    assert_eq!(back.status, 0);
    assert!(back.data == data);
    c.ping().await;
}

#[tokio::test]
async fn data_digest_error_gets_reject_and_connection_goes_on() {
    let t = start("").await;
    let mut c = digest_client(&t, 5).await;
    let pdu = nop(&mut c, 0x4242, b"this data will be corrupted");
    let mut wire = BytesMut::new();
    pdu.encode(true, true, &mut wire);
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    c.send_bytes(&wire).await;
    let (reason, rejected) = c.recv_reject().await;
    assert_eq!(reason, reject_reason::DATA_DIGEST_ERROR);
    assert_eq!(&rejected[..], &bhs_of(&pdu)[..]);
    c.ping().await;
    c.clear_ua().await;
}

#[tokio::test]
async fn header_digest_error_ends_the_connection() {
    let t = start("").await;
    let mut c = digest_client(&t, 6).await;
    c.ping().await;
    let pdu = nop(&mut c, 0x4343, b"fine data");
    let mut wire = BytesMut::new();
    pdu.encode(true, true, &mut wire);
    wire[48] ^= 0x01; // first byte of the header digest
    c.send_bytes(&wire).await;
    let seen = c.expect_eof(Duration::from_secs(3)).await;
    assert!(
        seen.iter().all(|p| !matches!(p.header, Header::NopIn(_))),
        "the PDU with a bad header digest was answered: {seen:?}"
    );
}

#[tokio::test]
async fn immediate_then_unsolicited_data_then_r2ts() {
    let t = start("").await;
    let opts = LoginOpts::normal(7)
        .key("InitialR2T", "No")
        .key("ImmediateData", "Yes")
        .key("FirstBurstLength", "16384")
        .key("MaxBurstLength", "32768");
    let mut c = Client::login_to(t.addr, opts).await;
    assert_eq!(c.param("ImmediateData", "?"), "Yes");
    c.clear_ua().await;
    let len = 64 * KIB;
    let data = pattern(len as usize, 0x2222_0000);
    let imm = Bytes::copy_from_slice(&data[..4096]);
    let (itt, pdu) = c.command(&write10_cdb(500, 128), len, false, true, false, imm);
    c.send(&pdu).await;
    c.data_out(itt, RESERVED_TAG, 4096, 16384, &data).await;
    let r = c.finish(itt, Some(&data)).await;
    assert_eq!(r.status, 0, "{r:?}");
    let firsts: Vec<(u32, u32)> = r
        .r2ts
        .iter()
        .map(|h| (h.buffer_offset, h.desired_data_transfer_length))
        .collect();
    assert_eq!(firsts, vec![(16384, 32768), (49152, 16384)]);
    let back = c.read10(500, 128).await;
    assert!(back.data == data, "read back differs from what was written");
}

#[tokio::test]
async fn data_segment_beyond_our_max_recv_gets_reject_and_close() {
    let t = start("max_recv_data_segment_length = 8192").await;
    let mut c = Client::login_to(t.addr, LoginOpts::normal(8)).await;
    assert_eq!(c.target_mrdsl(), 8192);
    let (_, pdu) = c.nop_out(&vec![7u8; 16384]);
    c.send(&pdu).await;
    let seen = c.expect_eof(Duration::from_secs(3)).await;
    let rejected = seen.iter().any(|p| {
        matches!(&p.header, Header::Reject(h) if h.reason == reject_reason::PROTOCOL_ERROR)
            && p.data[..] == bhs_of(&pdu)[..]
    });
    assert!(rejected, "expected a Reject before the close: {seen:?}");
}

/// A write that brings all its data immediately is received into a buffer
/// of its own (which a memory LU keeps as a page): digests are checked on
/// that path too, and a bad one costs only that command.
#[tokio::test]
async fn large_immediate_writes_are_placed_with_digests_checked() {
    let t = start("").await;
    let opts = LoginOpts::normal(9)
        .key("HeaderDigest", "CRC32C,None")
        .key("DataDigest", "CRC32C,None")
        .key("InitialR2T", "No")
        .key("FirstBurstLength", "262144")
        .key("MaxRecvDataSegmentLength", "262144");
    let mut c = Client::login_to(t.addr, opts).await;
    assert!(c.data_digest);
    c.clear_ua().await;
    // A whole page (kept as is), then part of one (copied), then two pages.
    for (lba, len, seed) in [
        (256u32, 128 * KIB, 1u32),
        (40, 96 * KIB, 2),
        (512, 256 * KIB, 3),
    ] {
        let data = pattern(len as usize, seed);
        let r = c.write10(lba, &data).await;
        assert_eq!((r.status, r.r2ts.len()), (0, 0), "{r:?}");
        let back = c.read10(lba, (len / 512) as u16).await;
        assert!(back.data == data, "read back differs at LBA {lba}");
    }
    // Its data digest broken: rejected, the medium unchanged, the connection on.
    let before = c.read10(256, 256).await.data;
    let (_, pdu) = c.command(
        &write10_cdb(256, 256),
        128 * KIB,
        false,
        true,
        true,
        Bytes::from(pattern(128 * KIB as usize, 9)),
    );
    let mut wire = BytesMut::new();
    pdu.encode(true, true, &mut wire);
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    // The header first and the data a moment later: the data is received
    // into a buffer of its own, not read ahead with the header.
    c.send_bytes(&wire[..BHS_LEN + 4 + 1000]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send_bytes(&wire[BHS_LEN + 4 + 1000..]).await;
    let (reason, rejected) = c.recv_reject().await;
    assert_eq!(reason, reject_reason::DATA_DIGEST_ERROR);
    assert_eq!(&rejected[..], &bhs_of(&pdu)[..]);
    // The rejected command was never received: its CmdSN is used again.
    c.cmd_sn = c.cmd_sn.wrapping_sub(1);
    c.ping().await;
    assert!(c.read10(256, 256).await.data == before);
}

/// A read over several of the memory LU's pages is sent from each page: its
/// Data-Ins end at the pages' ends as well as at MaxRecvDataSegmentLength.
#[tokio::test]
async fn reads_across_pages_are_cut_at_the_pages_ends_with_digests_checked() {
    let t = start("").await;
    let opts = LoginOpts::normal(10)
        .key("HeaderDigest", "CRC32C,None")
        .key("DataDigest", "CRC32C,None")
        .key("MaxRecvDataSegmentLength", "65536");
    let mut c = Client::login_to(t.addr, opts).await;
    assert!(c.data_digest);
    c.clear_ua().await;
    let data = pattern(384 * KIB as usize, 4);
    assert_eq!(c.write10(0, &data).await.status, 0);
    // 300 KiB from 50 KiB in: the ends of the 128 KiB pages fall mid-segment.
    let r = c.read10(100, 600).await;
    assert_eq!(r.status, 0);
    assert!(
        r.data[..] == data[50 * 1024..350 * 1024],
        "read back differs"
    );
    let ends: Vec<u32> = r
        .data_ins
        .iter()
        .zip(&r.data_in_lens)
        .map(|(d, &n)| d.buffer_offset + n as u32)
        .collect();
    for page_end in [78 * 1024, 206 * 1024] {
        assert!(
            ends.contains(&page_end),
            "no Data-In ends at {page_end}: {ends:?}"
        );
    }
    assert!(r.data_in_lens.iter().all(|&n| n <= 65536));
}

/// Immediate data the session did not allow is a protocol error (RFC 7143
/// §13.11): the write is rejected, not executed, and the session goes on.
#[tokio::test]
async fn immediate_data_when_immediate_data_is_no_gets_reject() {
    let t = start("").await;
    let opts = LoginOpts::normal(10)
        .key("ImmediateData", "No")
        .key("InitialR2T", "No");
    let mut c = Client::login_to(t.addr, opts).await;
    assert_eq!(c.param("ImmediateData", "?"), "No");
    c.clear_ua().await;
    let before = c.read10(64, 8).await.data;
    let (_, pdu) = c.command(
        &write10_cdb(64, 8),
        4096,
        false,
        true,
        true,
        Bytes::from(vec![0x77u8; 4096]),
    );
    c.send(&pdu).await;
    let (reason, rejected) = c.recv_reject().await;
    assert_eq!(reason, reject_reason::PROTOCOL_ERROR);
    assert_eq!(&rejected[..], &bhs_of(&pdu)[..]);
    c.ping().await;
    assert!(
        c.read10(64, 8).await.data == before,
        "the rejected write was executed"
    );
}
