//! Views changed under an open session: the nexus whose LU inventory
//! changes gets 3F/0E REPORTED LUNS DATA HAS CHANGED on its next command to
//! an LU it still sees, REPORT LUNS shows the new inventory, and an LU taken
//! out of its view answers LOGICAL UNIT NOT SUPPORTED from then on. Another
//! initiator's session, whose inventory did not change, sees nothing.

mod common;

use common::*;

const OTHER: &str = "iqn.2026-11.dev.ironstar:other";

fn toml() -> String {
    format!(
        r#"
[[portal_group]]
tag = 1
portals = ["@PG1@"]
[[target]]
iqn = "{TARGET}"
portal_groups = [1]
[[target.lun]]
lun = 0
backend = "memory"
size = "4MiB"
[[lu]]
guid = "600000000000000a"
backend = "memory"
size = "4MiB"
[[lu]]
guid = "600000000000000b"
backend = "memory"
size = "4MiB"
[[host_group]]
name = "mine"
members = ["{INITIATOR}"]
[[view]]
lu = "600000000000000a"
host_group = "mine"
lun = 1
[defaults]
nop_in_interval = 0
"#
    )
}

async fn tur(c: &mut Client, lun: u64) -> Option<(u8, u8, u8)> {
    let r = c.run_on(lun, &[0u8; 6], 0, None).await;
    assert_eq!(r.status == 0, r.sense.is_none());
    r.sense_code()
}

async fn report_luns(c: &mut Client) -> Vec<u64> {
    let cdb = [0xA0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    let r = c.run_on(0, &cdb, 1024, None).await;
    assert_eq!(r.status, 0, "{:?}", r.sense_code());
    r.data
        .get(8..)
        .unwrap_or_default()
        .chunks(8)
        .map(|e| u64::from(u16::from_be_bytes([e[0], e[1]]) & 0x3fff))
        .collect()
}

#[tokio::test]
async fn view_changes_reach_open_sessions_as_unit_attentions() {
    let t = start_toml(&toml()).await;
    let mut a = Client::login_to(t.addr, LoginOpts::normal(1)).await;
    let mut b = Client::login_to(
        t.addr,
        LoginOpts {
            initiator: OTHER.into(),
            ..LoginOpts::normal(2)
        },
    )
    .await;
    a.clear_ua_on(0).await;
    a.clear_ua_on(1).await;
    b.clear_ua_on(0).await;
    assert_eq!(report_luns(&mut a).await, vec![0, 1]);
    assert_eq!(report_luns(&mut b).await, vec![0]);

    // A view for our host group only: our inventory grows, OTHER's does not.
    let mut cfg = t.registry.snapshot().config.clone();
    let mut v = cfg.views[0].clone();
    v.lu = "600000000000000b".into();
    v.lun = 2;
    cfg.views.push(v);
    t.registry.apply(&cfg, |_| Ok::<(), String>(())).unwrap();
    assert_eq!(tur(&mut a, 0).await, Some((6, 0x3F, 0x0E)));
    assert_eq!(
        tur(&mut a, 1).await,
        Some((6, 0x3F, 0x0E)),
        "each LU says it once"
    );
    assert_eq!(tur(&mut a, 0).await, None);
    assert_eq!(report_luns(&mut a).await, vec![0, 1, 2]);
    // The new LU greets the nexus as any new one.
    assert_eq!(tur(&mut a, 2).await, Some((6, 0x29, 0x00)));
    assert_eq!(tur(&mut b, 0).await, None, "OTHER's inventory is unchanged");

    // LUN 1 leaves our view: gone at once, the change reported on LUN 0.
    let mut cfg = t.registry.snapshot().config.clone();
    cfg.views.remove(0);
    t.registry.apply(&cfg, |_| Ok::<(), String>(())).unwrap();
    assert_eq!(tur(&mut a, 1).await, Some((5, 0x25, 0x00)));
    let read = a.run_on(1, &read10_cdb(0, 1), 512, None).await;
    assert_eq!(read.sense_code(), Some((5, 0x25, 0x00)));
    assert!(read.data.is_empty(), "no data from an LU outside the view");
    assert_eq!(tur(&mut a, 0).await, Some((6, 0x3F, 0x0E)));
    assert_eq!(report_luns(&mut a).await, vec![0, 2]);
    // REPORT LUNS answered the question: the attention LUN 2 still held
    // for this nexus is gone without being reported (SAM-5 §5.14).
    assert_eq!(tur(&mut a, 2).await, None);
    assert_eq!(tur(&mut b, 0).await, None);
}
