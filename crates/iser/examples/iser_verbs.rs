//! iser_verbs: checks the rdma-core backend against the verbs contract on a real (or Soft-RoCE)
//! device, the way the unit tests check the emulation. Run in the VM test bed by
//! `testbed/tests/iser-verbs.sh`:
//!
//! ```text
//! iser_verbs pair 10.0.2.15:4420     # listener and client in one process, over the device
//! iser_verbs remove 10.0.2.15:4420   # prints READY; then `rdma link delete rxe0` from outside
//! ```
//!
//! `remove` shows what a device removal does: DEVICE_REMOVAL reaches both QPs, every posted
//! receive completes as a flush and the QPs let go of the device at once. On Debian 12
//! (rdma-core 44) `rdma link delete rxe0` still waits for the process to exit, because
//! librdmacm keeps its own verbs context of the device open for the life of the process, so
//! the VM tests pull connections (process kill, daemon restart) rather than the device.
//!
//! Each check prints `ok: ...`; the first failure prints `FAIL: ...` and exits 1.

#[cfg(feature = "rdma")]
mod run {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    use iser::rdma::{device_names, RdmaQp, RdmaVerbs};
    use iser::verbs::{
        Access, Completion, ConnectRequest, Listener, LocalSlice, QpConfig, QueuePair, RemoteAddr,
        Verbs, VerbsError, WcOpcode, WcStatus,
    };

    type R<T> = Result<T, String>;

    fn err(what: &str) -> impl Fn(VerbsError) -> String + '_ {
        move |e| format!("{what}: {e}")
    }

    fn ok(what: &str) {
        println!("ok: {what}");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn wait_for(qp: &RdmaQp, pending: &mut Vec<Completion>, wr_id: u64) -> R<Completion> {
        loop {
            if let Some(i) = pending.iter().position(|c| c.wr_id == wr_id) {
                return Ok(pending.remove(i));
            }
            qp.poll(pending, 64).await.map_err(err("poll"))?;
        }
    }

    const CM_REQ: [u8; 4] = [0x80, 0, 0, 0];
    const CM_REP: [u8; 4] = [0xc0, 0, 0, 0];
    const BIG: usize = 1 << 20;
    const RECVS: u64 = 8;

    /// The target-like side: accepts one connection, then serves the client's script.
    async fn server(mut listener: iser::rdma::RdmaListener) -> R<()> {
        let req = listener.next_request().await.map_err(err("next_request"))?;
        if req.private_data().get(..4) != Some(&CM_REQ[..]) {
            return Err(format!(
                "REQ private data {:02x?}",
                req.private_data().get(..4)
            ));
        }
        ok("listener got the REQ with the iSER CM header");
        let mut recv_region = None;
        let qp = req
            .accept(QpConfig::default(), &CM_REP, |qp| {
                let r = qp.register(4096 * RECVS as usize, Access::LOCAL_WRITE)?;
                for i in 0..RECVS {
                    let s = LocalSlice::new(Arc::clone(&r), (i * 4096) as usize, 4096)
                        .ok_or(VerbsError::Invalid("slice"))?;
                    qp.post_recv(i, s)?;
                }
                recv_region = Some(r);
                Ok(())
            })
            .await
            .map_err(err("accept"))?;
        let recv = recv_region.ok_or("no receive region")?;
        ok("accepted with receives posted before the REP");
        let mut pending = Vec::new();
        // 1: the client's SEND carries its buffer's address and rkey.
        let c = wait_for(&qp, &mut pending, 0).await?;
        if !c.is_ok() || c.opcode != WcOpcode::Recv || c.byte_len != 12 {
            return Err(format!("first receive: {c:?}"));
        }
        let mut m = [0u8; 12];
        recv.read_at(0, &mut m).ok_or("read_at")?;
        let remote = RemoteAddr {
            addr: u64::from_be_bytes(m[..8].try_into().map_err(|_| "va")?),
            rkey: u32::from_be_bytes(m[8..].try_into().map_err(|_| "rkey")?),
        };
        ok("RECV of the client's SEND (12 bytes)");
        // 2: RDMA READ the client's 1 MiB, check it, RDMA WRITE another pattern back.
        let data = qp
            .register(BIG, Access::LOCAL_WRITE)
            .map_err(err("register"))?;
        let whole = LocalSlice::whole(Arc::clone(&data)).ok_or("slice")?;
        let t = Instant::now();
        qp.post_rdma_read(100, whole.clone(), remote)
            .map_err(err("read"))?;
        let c = wait_for(&qp, &mut pending, 100).await?;
        if !c.is_ok() || c.opcode != WcOpcode::RdmaRead {
            return Err(format!("RDMA READ: {c:?}"));
        }
        let mut got = vec![0u8; BIG];
        data.read_at(0, &mut got).ok_or("read_at")?;
        if got != pattern(BIG, 7) {
            return Err("RDMA READ data differ".into());
        }
        ok(&format!("RDMA READ of 1 MiB verified ({:?})", t.elapsed()));
        data.write_at(0, &pattern(BIG, 99)).ok_or("write_at")?;
        qp.post_rdma_write(101, whole, remote)
            .map_err(err("write"))?;
        // 3: a SEND after the WRITE: RC ordering makes the data land first.
        let msg = qp.register(64, Access::empty()).map_err(err("register"))?;
        msg.write_at(0, b"done").ok_or("write_at")?;
        let s = LocalSlice::new(Arc::clone(&msg), 0, 4).ok_or("slice")?;
        qp.post_send(102, s, None).map_err(err("send"))?;
        for id in [101, 102] {
            let c = wait_for(&qp, &mut pending, id).await?;
            if !c.is_ok() {
                return Err(format!("wr {id}: {c:?}"));
            }
        }
        ok("RDMA WRITE of 1 MiB then SEND completed");
        // 4: a READ with a wrong rkey is refused by the peer.
        let bad = RemoteAddr {
            addr: remote.addr,
            rkey: remote.rkey ^ 0x5a5a_0000,
        };
        let s = LocalSlice::new(Arc::clone(&data), 0, 4096).ok_or("slice")?;
        qp.post_rdma_read(103, s, bad).map_err(err("read"))?;
        let c = wait_for(&qp, &mut pending, 103).await?;
        if c.status == WcStatus::Success {
            return Err("a READ with a wrong rkey succeeded".into());
        }
        ok(&format!(
            "RDMA READ with a wrong rkey refused: {:?}",
            c.status
        ));
        if qp.is_connected() {
            return Err("QP still connected after an error completion".into());
        }
        // 5: every other receive flushes, then poll says Disconnected.
        let mut flushed = 0;
        loop {
            // Flushes may already have come with the READ's completion.
            for c in pending.drain(..) {
                if c.opcode == WcOpcode::Recv && c.status == WcStatus::WrFlushErr {
                    flushed += 1;
                } else {
                    return Err(format!("unexpected completion after error: {c:?}"));
                }
            }
            match qp.poll(&mut pending, 64).await {
                Ok(_) => {}
                Err(VerbsError::Disconnected) => break,
                Err(e) => return Err(format!("poll after error: {e}")),
            }
        }
        if flushed != RECVS - 1 {
            return Err(format!("{flushed} receives flushed, want {}", RECVS - 1));
        }
        ok(&format!(
            "{flushed} posted receives flushed, then poll returned Disconnected"
        ));
        match qp.post_send(104, LocalSlice::new(msg, 0, 4).ok_or("slice")?, None) {
            Err(VerbsError::Disconnected) => ok("posting after the error is refused"),
            other => return Err(format!("post after error: {other:?}")),
        }
        Ok(())
    }

    async fn client(addr: SocketAddr) -> R<()> {
        let mut recv_region = None;
        let (qp, rep) = RdmaVerbs::new()
            .connect(addr, QpConfig::default(), &CM_REQ, |qp| {
                let r = qp.register(4096, Access::LOCAL_WRITE)?;
                qp.post_recv(
                    1,
                    LocalSlice::whole(Arc::clone(&r)).ok_or(VerbsError::Invalid("slice"))?,
                )?;
                recv_region = Some(r);
                Ok(())
            })
            .await
            .map_err(err("connect"))?;
        let recv = recv_region.ok_or("no receive region")?;
        if rep.get(..4) != Some(&CM_REP[..]) {
            return Err(format!("REP private data {:02x?}", rep.get(..4)));
        }
        ok(&format!(
            "connected {} -> {}, REP carried the iSER CM header",
            qp.local_addr(),
            qp.peer_addr()
        ));
        let data = qp
            .register(
                BIG,
                Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE,
            )
            .map_err(err("register"))?;
        data.write_at(0, &pattern(BIG, 7)).ok_or("write_at")?;
        let msg = qp.register(64, Access::empty()).map_err(err("register"))?;
        let mut m = data.addr().to_be_bytes().to_vec();
        m.extend_from_slice(&data.rkey().to_be_bytes());
        msg.write_at(0, &m).ok_or("write_at")?;
        let mut pending = Vec::new();
        qp.post_send(2, LocalSlice::new(msg, 0, 12).ok_or("slice")?, None)
            .map_err(err("send"))?;
        let c = wait_for(&qp, &mut pending, 2).await?;
        if !c.is_ok() {
            return Err(format!("client SEND: {c:?}"));
        }
        let c = wait_for(&qp, &mut pending, 1).await?;
        if !c.is_ok() || c.byte_len != 4 {
            return Err(format!("client RECV: {c:?}"));
        }
        let mut d = [0u8; 4];
        recv.read_at(0, &mut d).ok_or("read_at")?;
        if &d != b"done" {
            return Err("bad reply".into());
        }
        let mut got = vec![0u8; BIG];
        data.read_at(0, &mut got).ok_or("read_at")?;
        if got != pattern(BIG, 99) {
            return Err("RDMA WRITE data differ".into());
        }
        ok("the target's RDMA WRITE landed before its SEND (1 MiB verified)");
        // The server's bad READ puts both QPs in error: ours sees the disconnect.
        let t = Instant::now();
        while qp.is_connected() {
            if t.elapsed().as_secs() > 20 {
                return Err("client never saw the disconnect".into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        ok("client saw the disconnect");
        Ok(())
    }

    async fn reject(addr: SocketAddr) -> R<()> {
        let mut listener = RdmaVerbs::new().listen(addr).await.map_err(err("listen"))?;
        let srv = tokio::spawn(async move {
            if let Ok(req) = listener.next_request().await {
                req.reject(&[0xde, 0xad]).await;
            }
        });
        let r = RdmaVerbs::new()
            .connect(addr, QpConfig::default(), &CM_REQ, |_| Ok(()))
            .await;
        let _ = srv.await;
        match r {
            Err(VerbsError::Rejected { private_data })
                if private_data.get(..2) == Some(&[0xde, 0xad][..]) =>
            {
                ok("a rejected connect returns Rejected with the peer's private data");
                Ok(())
            }
            other => Err(format!(
                "connect to a rejecting listener: {:?}",
                other.map(|_| ())
            )),
        }
    }

    /// Counts flushed completions until poll says Disconnected.
    async fn drain_flushes(qp: &RdmaQp) -> R<usize> {
        let mut out = Vec::new();
        let mut n = 0;
        loop {
            match qp.poll(&mut out, 64).await {
                Ok(_) => {}
                Err(VerbsError::Disconnected) => return Ok(n),
                Err(e) => return Err(format!("poll: {e}")),
            }
            for c in out.drain(..) {
                if c.status != WcStatus::WrFlushErr {
                    return Err(format!("not a flush: {c:?}"));
                }
                n += 1;
            }
        }
    }

    fn post_recvs(qp: &RdmaQp, n: u64) -> Result<(), VerbsError> {
        let r = qp.register(4096 * n as usize, Access::LOCAL_WRITE)?;
        for i in 0..n {
            let s = LocalSlice::new(Arc::clone(&r), (i * 4096) as usize, 4096)
                .ok_or(VerbsError::Invalid("slice"))?;
            qp.post_recv(i, s)?;
        }
        Ok(())
    }

    /// The device disappears under two connected QPs with receives posted (the script runs
    /// `rdma link delete rxe0` after READY): both flush everything, let go of the device,
    /// and once the device is back the listener accepts a new connection.
    pub async fn remove(addr: SocketAddr) -> R<()> {
        let mut listener = RdmaVerbs::new().listen(addr).await.map_err(err("listen"))?;
        let accept = tokio::spawn(async move {
            let req = listener.next_request().await.map_err(err("next_request"))?;
            let qp = req
                .accept(QpConfig::default(), &CM_REP, |qp| post_recvs(qp, 4))
                .await
                .map_err(err("accept"))?;
            Ok::<_, String>((listener, qp))
        });
        let (cqp, _) = RdmaVerbs::new()
            .connect(addr, QpConfig::default(), &CM_REQ, |qp| post_recvs(qp, 4))
            .await
            .map_err(err("connect"))?;
        let (mut listener, sqp) = accept.await.map_err(|e| e.to_string())??;
        println!("READY");
        let t = Instant::now();
        let (a, b) = tokio::join!(drain_flushes(&sqp), drain_flushes(&cqp));
        let (a, b) = (a?, b?);
        ok(&format!(
            "device removal: {a} + {b} receives flushed in {:?}, QPs released",
            t.elapsed()
        ));
        drop((sqp, cqp));
        println!("RELEASED");
        let srv = tokio::spawn(async move {
            let req = listener.next_request().await.map_err(err("next_request"))?;
            req.accept(QpConfig::default(), &CM_REP, |qp| post_recvs(qp, 4))
                .await
                .map_err(err("accept again"))
        });
        let t = Instant::now();
        let cqp = loop {
            match RdmaVerbs::new()
                .connect(addr, QpConfig::default(), &CM_REQ, |_| Ok(()))
                .await
            {
                Ok((qp, _)) => break qp,
                Err(e) if t.elapsed().as_secs() < 60 => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(format!("no reconnect within 60 s: {e}")),
            }
        };
        let sqp = srv.await.map_err(|e| e.to_string())??;
        let msg = cqp.register(16, Access::empty()).map_err(err("register"))?;
        cqp.post_send(9, LocalSlice::new(msg, 0, 16).ok_or("slice")?, None)
            .map_err(err("send"))?;
        let mut pending = Vec::new();
        let c = wait_for(&sqp, &mut pending, 0).await?;
        if !c.is_ok() || c.byte_len != 16 {
            return Err(format!("RECV after the device came back: {c:?}"));
        }
        ok(&format!(
            "the listener is back after the device returned; a new connection carried a SEND ({:?})",
            t.elapsed()
        ));
        Ok(())
    }

    pub async fn pair(addr: SocketAddr) -> R<()> {
        println!("devices: {:?}", device_names());
        let listener = RdmaVerbs::new().listen(addr).await.map_err(err("listen"))?;
        ok(&format!("listening on {}", listener.local_addr()));
        let srv = tokio::spawn(server(listener));
        let cli = client(addr).await;
        let srv = srv.await.map_err(|e| format!("server task: {e}"))?;
        srv?;
        cli?;
        let mut other = addr;
        other.set_port(addr.port().wrapping_add(1));
        reject(other).await
    }
}

#[cfg(feature = "rdma")]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| std::net::SocketAddr::from(([10, 0, 2, 15], 4420)));
    let mode = args.get(1).cloned().unwrap_or_default();
    if mode != "pair" && mode != "remove" {
        eprintln!("usage: iser_verbs pair|remove ADDR:PORT");
        std::process::exit(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("FAIL: runtime: {e}");
            std::process::exit(1);
        }
    };
    let r = if mode == "pair" {
        rt.block_on(run::pair(addr))
    } else {
        rt.block_on(run::remove(addr))
    };
    match r {
        Ok(()) => println!("iser_verbs: all checks passed"),
        Err(e) => {
            println!("FAIL: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(not(feature = "rdma"))]
fn main() {
    eprintln!("iser_verbs needs the rdma feature");
}
