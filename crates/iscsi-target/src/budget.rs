//! A process-wide budget of bytes: write data being collected for commands
//! (R2T / Data-Out) is reserved here before a task may hold it, so many
//! connections together cannot pin more memory than `write_buffer_limit`,
//! whatever each is allowed on its own. A reservation is an RAII guard: the
//! bytes come back when the task that held them ends, on every path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct ByteBudget {
    used: AtomicU64,
}

/// Bytes held from a [`ByteBudget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl ByteBudget {
    /// Takes `bytes` if the total stays within `limit`.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64, limit: u64) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes held now (for inspection).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_limit_and_return_on_drop() {
        let b = Arc::new(ByteBudget::default());
        let r1 = b.try_reserve(600, 1000).unwrap();
        assert!(b.try_reserve(500, 1000).is_none());
        let r2 = b.try_reserve(400, 1000).unwrap();
        assert_eq!(b.used(), 1000);
        drop(r1);
        assert_eq!(b.used(), 400);
        assert!(
            b.try_reserve(u64::MAX, u64::MAX).is_none(),
            "overflow is refused"
        );
        drop(r2);
        assert_eq!(b.used(), 0);
    }
}
