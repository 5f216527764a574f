//! Session-level behaviour of the target over real TCP: session and
//! connection reinstatement, logout, SendTargets and login authorization.

mod common;

use std::time::Duration;

use common::*;
use iscsi_proto::pdu::logout;

const CLOSE_WAIT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn session_reinstatement_closes_the_old_sessions_connection() {
    let t = start("").await;
    let mut a = Client::login_to(t.addr, LoginOpts::normal(1)).await;
    a.clear_ua().await;
    // Same initiator name and ISID, TSIH 0: a new session replacing the old.
    let mut b = Client::login_to(t.addr, LoginOpts::normal(1)).await;
    assert_ne!(b.tsih, 0);
    let seen = a.expect_eof(CLOSE_WAIT).await;
    assert!(
        seen.is_empty(),
        "old connection got PDUs before closing: {seen:?}"
    );
    b.clear_ua().await;
    b.ping().await;
}

#[tokio::test]
async fn connection_reinstatement_closes_the_old_connection_and_keeps_the_session() {
    let t = start("").await;
    let opts = LoginOpts::normal(2).key("MaxConnections", "4");
    let mut a = Client::login_to(t.addr, opts.clone()).await;
    assert_eq!(a.param_u32("MaxConnections", 1), 4);
    a.clear_ua().await;

    let mut b = join(t.addr, &a, &opts, 2).await;

    // A third login reusing CID 1: connection reinstatement.
    let mut c = join(t.addr, &a, &opts, 1).await;
    a.expect_eof(CLOSE_WAIT).await;

    // The session survives on the second connection (and the new first).
    b.cmd_sn = c.cmd_sn;
    let r = b.tur().await;
    assert_eq!(r.status, 0, "TUR on the surviving connection: {r:?}");
    c.cmd_sn = b.cmd_sn;
    assert_eq!(c.tur().await.status, 0);
}

#[tokio::test]
async fn logout_close_session_answers_then_closes_and_frees_the_isid() {
    let t = start("").await;
    let mut a = Client::login_to(t.addr, LoginOpts::normal(3)).await;
    a.clear_ua().await;
    let old_tsih = a.tsih;
    assert_eq!(
        a.logout(logout::CLOSE_SESSION, a.cid).await,
        logout::SUCCESS
    );
    a.expect_eof(CLOSE_WAIT).await;

    // The session is gone: joining it by TSIH is refused...
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut j = Client::connect(t.addr).await;
    let r = j
        .login(&LoginOpts {
            tsih: old_tsih,
            cid: 2,
            ..LoginOpts::normal(3)
        })
        .await;
    assert_eq!(
        (r.status_class, r.status_detail),
        (2, 10),
        "joining a logged-out session: {r:?}"
    );
    // ...and a fresh login with the same ISID works.
    let mut b = Client::login_to(t.addr, LoginOpts::normal(3)).await;
    b.clear_ua().await;
}

#[tokio::test]
async fn logout_close_connection_of_another_cid_closes_only_that_connection() {
    let t = start("").await;
    let opts = LoginOpts::normal(4).key("MaxConnections", "2");
    let mut a = Client::login_to(t.addr, opts.clone()).await;
    a.clear_ua().await;
    let mut b = join(t.addr, &a, &opts, 2).await;

    assert_eq!(a.logout(logout::CLOSE_CONNECTION, 2).await, logout::SUCCESS);
    b.expect_eof(CLOSE_WAIT).await;
    // Connection 1 goes on.
    let r = a.tur().await;
    assert_eq!(r.status, 0, "{r:?}");
    // A CID that is not in the session.
    assert_eq!(
        a.logout(logout::CLOSE_CONNECTION, 9).await,
        logout::CID_NOT_FOUND
    );
    a.ping().await;
}

const BOTH: &str = "iqn.2026-11.dev.ironstar:both";
const PRIVATE: &str = "iqn.2026-11.dev.ironstar:private";
const OTHER: &str = "iqn.2026-11.dev.ironstar:other";

fn discovery_toml() -> String {
    format!(
        r#"
[[portal_group]]
tag = 1
portals = ["@PG1@"]

[[portal_group]]
tag = 2
portals = ["@PG62@"]

[[target]]
iqn = "{TARGET}"
portal_groups = [1]
[[target.lun]]
lun = 0
backend = "memory"
size = "4MiB"

[[target]]
iqn = "{BOTH}"
portal_groups = [1, 2]
[[target.lun]]
lun = 0
backend = "memory"
size = "4MiB"

[[target]]
iqn = "{PRIVATE}"
portal_groups = [1]
allowed_initiators = ["{OTHER}"]
[[target.lun]]
lun = 0
backend = "memory"
size = "4MiB"

[defaults]
nop_in_interval = 0
"#
    )
}

async fn send_targets(t: &TestTarget, initiator: &str) -> Vec<(String, String)> {
    let mut c = Client::login_to(
        t.addr,
        LoginOpts {
            initiator: initiator.to_string(),
            ..LoginOpts::discovery(5)
        },
    )
    .await;
    let answer = c.text_request(&text(&[("SendTargets", "All")])).await;
    iscsi_proto::text::parse_list(&answer).unwrap()
}

#[tokio::test]
async fn send_targets_lists_every_target_with_tpgt_and_bracketed_ipv6() {
    let t = start_toml(&discovery_toml()).await;
    let v4 = t.addrs[0];
    let v6 = t.addrs[1];
    assert!(v4.is_ipv4() && v6.is_ipv6());
    let pair = |k: &str, v: String| (k.to_string(), v);
    let got = send_targets(&t, INITIATOR).await;
    let want = vec![
        pair("TargetName", TARGET.into()),
        pair("TargetAddress", format!("127.0.0.1:{},1", v4.port())),
        pair("TargetName", BOTH.into()),
        pair("TargetAddress", format!("127.0.0.1:{},1", v4.port())),
        pair("TargetAddress", format!("[::1]:{},2", v6.port())),
    ];
    assert_eq!(got, want);

    // The initiator the private target admits sees it too.
    let got = send_targets(&t, OTHER).await;
    assert!(got.contains(&pair("TargetName", PRIVATE.into())), "{got:?}");
}

/// Discovery is filtered by each target's access list unless
/// `[discovery] list_all_targets` says otherwise.
#[tokio::test]
async fn send_targets_hides_targets_that_do_not_admit_us_unless_configured() {
    let t = start_toml(&discovery_toml()).await;
    let names = |got: Vec<(String, String)>| -> Vec<String> {
        got.into_iter()
            .filter(|(k, _)| k == "TargetName")
            .map(|(_, v)| v)
            .collect()
    };
    assert!(!names(send_targets(&t, INITIATOR).await).contains(&PRIVATE.to_string()));
    let t = start_toml(&format!(
        "{}\n[discovery]\nlist_all_targets = true\n",
        discovery_toml()
    ))
    .await;
    let got = names(send_targets(&t, INITIATOR).await);
    assert!(got.contains(&PRIVATE.to_string()), "{got:?}");
    assert!(got.contains(&TARGET.to_string()), "{got:?}");
}

#[tokio::test]
async fn login_to_a_target_that_does_not_admit_us_gets_authorization_failure() {
    let t = start_toml(&discovery_toml()).await;
    let mut c = Client::connect(t.addr).await;
    let r = c
        .login(&LoginOpts {
            target: Some(PRIVATE.to_string()),
            ..LoginOpts::normal(6)
        })
        .await;
    assert_eq!((r.status_class, r.status_detail), (2, 2), "{r:?}");
    c.expect_eof(CLOSE_WAIT).await;
    // The admitted initiator gets in.
    let mut o = Client::login_to(
        t.addr,
        LoginOpts {
            initiator: OTHER.to_string(),
            target: Some(PRIVATE.to_string()),
            ..LoginOpts::normal(6)
        },
    )
    .await;
    o.clear_ua().await;
}
