//! The process-wide registered-memory gauge (`iser::registered_memory`):
//! regions come with connections and go with them, whether a connection is
//! closed or its link is pulled mid-traffic. Its own test binary (its own
//! process) with one test, so no other test's regions move the gauge.

use std::time::Duration;

use bytes::Bytes;
use idm::transport::{PduRx, PduTx, Transport};
use iscsi_proto::pdu::{Header, NopOut, Pdu};
use iser::emulation::Emulation;
use iser::verbs::{Listener, Verbs};
use iser::{registered_memory, IserConfig, IserTransport};

async fn pair(fab: &Emulation) -> (IserTransport, IserTransport) {
    let mut l = fab.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = l.local_addr();
    let f2 = fab.clone();
    let ini = tokio::spawn(async move {
        IserTransport::connect(&f2, addr, IserConfig::default())
            .await
            .unwrap()
    });
    let req = l.next_request().await.unwrap();
    let tgt = IserTransport::accept(req, IserConfig::default())
        .await
        .unwrap();
    (ini.await.unwrap(), tgt)
}

async fn back_to(baseline: iser::RegisteredMemory) {
    for _ in 0..200 {
        if registered_memory() == baseline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "registered memory stuck at {:?}, baseline {:?}",
        registered_memory(),
        baseline
    );
}

#[tokio::test]
async fn gauge_follows_connections_and_returns_to_baseline_after_link_pull() {
    let baseline = registered_memory();
    let fab = Emulation::new();

    // Closed normally: every region goes with the connection.
    let (ini, tgt) = pair(&fab).await;
    let during = registered_memory();
    assert!(during.regions >= baseline.regions + 2, "{during:?}");
    assert!(during.bytes > baseline.bytes, "{during:?}");
    drop((ini, tgt));
    back_to(baseline).await;

    // Four connections with traffic in flight, then the link is pulled.
    let mut halves = Vec::new();
    for i in 0..4u32 {
        let (ini, tgt) = pair(&fab).await;
        let (_irx, mut itx) = ini.into_split();
        let (mut trx, ttx) = tgt.into_split();
        let nop = Pdu::new(
            Header::NopOut(NopOut {
                itt: i,
                ..Default::default()
            }),
            Bytes::from_static(b"ping"),
        );
        itx.send(std::slice::from_ref(&nop)).await.unwrap();
        assert!(trx.recv().await.unwrap().is_some());
        halves.push((itx, _irx, trx, ttx));
    }
    assert!(registered_memory().regions >= baseline.regions + 8);
    fab.set_link(false);
    // The receive halves see the connection end, as the target's would.
    for (_, _, trx, _) in halves.iter_mut() {
        while let Ok(Some(_)) = trx.recv().await {}
    }
    drop(halves);
    back_to(baseline).await;
    fab.set_link(true);
}
