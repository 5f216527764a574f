//! The steady data path allocates nothing per command (issue 8): once a
//! connection is warm, reads and writes of a memory LU reuse the
//! connection's buffers, queues and task slots. The one exception is a
//! write that a memory LU keeps as its page instead of copying it (one
//! small header; see the end). The target runs on a thread of its own
//! whose heap allocations are counted; the client's are not.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;

struct CountingAllocator;

thread_local! {
    /// Set on the target's thread only.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}
static TARGET_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        TARGET_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Starts the target on its own single-threaded runtime, counted.
fn start_counted_target(defaults: &'static str) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        COUNTED.with(|c| c.set(true));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let target = start(defaults).await;
            tx.send(target.addr).unwrap();
            // Serves until the test process ends.
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

const COMMANDS: u64 = 1000;

/// Allocations on the target's thread while `f` runs `COMMANDS` commands.
async fn allocations_during<F: std::future::Future<Output = ()>>(f: F) -> u64 {
    let before = TARGET_ALLOCATIONS.load(Ordering::Relaxed);
    f.await;
    TARGET_ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[tokio::test]
async fn warm_reads_and_writes_allocate_nothing_per_command() {
    let addr = start_counted_target("");
    let mut c = Client::login_to(addr, LoginOpts::normal(1)).await;
    c.clear_ua().await;
    let block = vec![0x5au8; 4096];
    // Warm up: pools and queues reach their steady size, and every page
    // the test touches exists (a first write to a page allocates it).
    for i in 0..COMMANDS as u32 {
        assert_eq!(c.write10(i * 8, &block).await.status, 0);
        assert_eq!(c.read10(i * 8, 8).await.status, 0);
    }

    let reads = allocations_during(async {
        for i in 0..COMMANDS as u32 {
            let r = c.read10((i % 1000) * 8, 8).await;
            assert_eq!((r.status, r.data.len()), (0, 4096));
        }
    })
    .await;
    // Eight reads in flight at once: responses go out in batches.
    let queued_reads = allocations_during(async {
        for round in 0..COMMANDS as u32 / 8 {
            let mut itts = Vec::new();
            for i in 0..8 {
                let (itt, pdu) = c.command(
                    &read10_cdb((round * 8 + i) % 1000 * 8, 8),
                    4096,
                    true,
                    false,
                    true,
                    bytes::Bytes::new(),
                );
                c.send(&pdu).await;
                itts.push(itt);
            }
            for itt in itts {
                assert_eq!(c.finish(itt, None).await.status, 0);
            }
        }
    })
    .await;
    // Last: a read after a write makes the memory LU's 128 KiB page shared
    // again (bytes allocates its small shared header once per page).
    let writes = allocations_during(async {
        for i in 0..COMMANDS as u32 {
            assert_eq!(c.write10((i % 1000) * 8, &block).await.status, 0);
        }
    })
    .await;
    // 256 KiB writes, whose data comes by R2T; 128 KiB reads, cut into
    // Data-Ins (a read within one of the memory LU's 128 KiB pages is sent
    // from it).
    let big = vec![0xa5u8; 262144];
    for i in 0..8 {
        assert_eq!(c.write10(i * 512, &big).await.status, 0);
    }
    let big_writes = allocations_during(async {
        for i in 0..COMMANDS as u32 {
            let r = c.write10((i % 8) * 512, &big).await;
            assert_eq!(r.status, 0);
            assert!(!r.r2ts.is_empty(), "the write's data came without R2T");
        }
    })
    .await;
    for i in 0..16 {
        assert_eq!(c.read10(i * 256, 256).await.status, 0);
    }
    let big_reads = allocations_during(async {
        for i in 0..COMMANDS as u32 {
            let r = c.read10((i % 16) * 256, 256).await;
            assert_eq!((r.status, r.data.len()), (0, 131072));
            assert!(r.data_ins.len() > 1);
        }
    })
    .await;
    // 512 KiB reads from the middle of a page: five pages' own slices,
    // Data-Ins cut at the pages' ends, no gathering buffer. (The first read
    // of a page makes it shared: bytes allocates its owner count once.)
    for i in 0..6 {
        assert_eq!(c.read10(i * 1024 + 128, 1024).await.status, 0);
    }
    let across_pages = allocations_during(async {
        for i in 0..COMMANDS as u32 {
            let r = c.read10((i % 6) * 1024 + 128, 1024).await;
            assert_eq!((r.status, r.data.len()), (0, 524288));
        }
    })
    .await;
    // 128 KiB page-aligned writes with all their data immediate (as fio's
    // libiscsi engine sends them): received into a pooled buffer that the
    // memory LU keeps as the page, whose old page goes back to the pool.
    let mut d = Client::login_to(
        addr,
        LoginOpts::normal(2)
            .key("InitialR2T", "No")
            .key("FirstBurstLength", "262144")
            .key("MaxRecvDataSegmentLength", "262144"),
    )
    .await;
    d.clear_ua().await;
    let page = vec![0x3cu8; 131072];
    for i in 0..16 {
        assert_eq!(d.write10(i * 256, &page).await.status, 0);
    }
    let page_writes = allocations_during(async {
        for i in 0..COMMANDS as u32 {
            let r = d.write10((i % 16) * 256, &page).await;
            assert_eq!(r.status, 0);
            assert!(r.r2ts.is_empty(), "the write's data was not all immediate");
        }
    })
    .await;
    assert_eq!(d.read10(15 * 256, 256).await.data, page);
    println!(
        "target allocations per {COMMANDS} commands: 4 KiB reads {reads}, 4 KiB writes \
         {writes}, 4 KiB reads 8 at a time {queued_reads}, 256 KiB writes by R2T \
         {big_writes}, 128 KiB reads {big_reads}, 512 KiB reads across pages {across_pages}, \
         128 KiB immediate page writes {page_writes}"
    );
    // A few may come from a structure growing once; none per command.
    for (what, n) in [
        ("reads", reads),
        ("writes", writes),
        ("queued reads", queued_reads),
        ("256 KiB writes", big_writes),
        ("128 KiB reads", big_reads),
        ("512 KiB reads across pages", across_pages),
    ] {
        assert!(
            n <= COMMANDS / 100,
            "{what}: {n} allocations in {COMMANDS} commands"
        );
    }
    // Each such write is one small allocation, not a 128 KiB copy: the
    // header `bytes` gives a buffer once two hold it (the LU's page table
    // and the connection, until the command ends). Copying into the page
    // would allocate nothing, so the lower bound shows the pages were kept.
    assert!(
        (COMMANDS..=COMMANDS + COMMANDS / 100).contains(&page_writes),
        "128 KiB page writes: {page_writes} allocations in {COMMANDS} commands"
    );
}
