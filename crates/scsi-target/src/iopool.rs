//! The I/O threads of one logical unit whose store may block (a file, a
//! block device, an RBD image): commands run here rather than on the
//! runtime's general blocking pool, so each LU keeps as many I/Os in
//! flight as its device serves ([`crate::Backend::io_threads`]) and one
//! slow LU cannot take every thread of the process.
//!
//! Threads start when the queue outgrows the idle ones (up to the width)
//! and end after [`IDLE_EXIT`] without work, so an idle LU holds none.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// An idle thread ends after this long without a job.
const IDLE_EXIT: Duration = Duration::from_secs(30);

struct State {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    threads: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    width: usize,
    name: String,
}

pub(crate) struct IoPool {
    shared: Arc<Shared>,
}

impl IoPool {
    /// A pool of at most `width` threads (at least one), named `name`.
    pub(crate) fn new(width: usize, name: String) -> IoPool {
        IoPool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                    closed: false,
                }),
                ready: Condvar::new(),
                width: width.max(1),
                name,
            }),
        }
    }

    /// Runs `job` on one of the pool's threads.
    pub(crate) fn spawn(&self, job: Job) {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        st.jobs.push_back(job);
        // Every idle thread takes one queued job; start another thread
        // only when there are more jobs than that.
        if st.jobs.len() > st.idle && st.threads < sh.width {
            let shared = self.shared.clone();
            let started = std::thread::Builder::new()
                .name(sh.name.clone())
                .spawn(move || worker(&shared));
            match started {
                Ok(_) => st.threads += 1,
                Err(e) if st.threads == 0 => {
                    // No thread at all would strand the job: run it here.
                    tracing::warn!(error = %e, "cannot start an I/O thread; running inline");
                    let job = st.jobs.pop_back();
                    drop(st);
                    if let Some(job) = job {
                        job();
                    }
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "cannot start another I/O thread"),
            }
        }
        drop(st);
        sh.ready.notify_one();
    }

    /// Threads running now (for tests and inspection).
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .threads
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.closed = true;
        drop(st);
        // Queued jobs still run; then the threads end.
        self.shared.ready.notify_all();
    }
}

fn worker(sh: &Shared) {
    let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            // A panicking command must not take the thread's later jobs
            // (or the pool's count of threads) with it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!(pool = %sh.name, "an I/O job panicked");
            }
            st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if st.closed {
            break;
        }
        st.idle += 1;
        let (next, timeout) = sh
            .ready
            .wait_timeout(st, IDLE_EXIT)
            .unwrap_or_else(|e| e.into_inner());
        st = next;
        st.idle -= 1;
        if timeout.timed_out() && st.jobs.is_empty() {
            break;
        }
    }
    st.threads -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Starts `jobs` jobs that each wait until `width` run at once (or 5 s
    /// pass) and returns the most seen running together.
    fn max_concurrency(width: usize, jobs: usize) -> usize {
        let pool = IoPool::new(width, "test-io".into());
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..jobs {
            let (running, peak, tx) = (running.clone(), peak.clone(), tx.clone());
            pool.spawn(Box::new(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let t = Instant::now();
                while peak.load(Ordering::SeqCst) < width && t.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Stay a moment so more than `width` would be seen if allowed.
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            }));
        }
        for _ in 0..jobs {
            rx.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        assert!(pool.threads() <= width);
        peak.load(Ordering::SeqCst)
    }

    #[test]
    fn pool_runs_width_jobs_at_once() {
        assert_eq!(max_concurrency(8, 8), 8);
    }

    #[test]
    fn pool_never_runs_more_than_its_width() {
        assert_eq!(max_concurrency(3, 12), 3);
    }

    #[test]
    fn a_panicking_job_does_not_stop_the_pool() {
        let pool = IoPool::new(1, "test-io".into());
        pool.spawn(Box::new(|| panic!("boom")));
        let (tx, rx) = std::sync::mpsc::channel();
        pool.spawn(Box::new(move || tx.send(7).unwrap()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
    }

    #[test]
    fn queued_jobs_still_run_after_the_pool_is_dropped() {
        let pool = IoPool::new(1, "test-io".into());
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..4 {
            let tx = tx.clone();
            pool.spawn(Box::new(move || tx.send(i).unwrap()));
        }
        drop(pool);
        let got: Vec<i32> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
    }
}
