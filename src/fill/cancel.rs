//! Cancelling a prefetch fill so a real miss can have its room (`Fills::cancel_unjoined_prefetch`):
//! only before the fill begins to commit, since a fill dropped during its commit would leave a
//! stored file the index does not hold.

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::Notify;

/// How a prefetch fill is cancelled for a real miss: only before it begins to commit (a fill
/// dropped during its commit would leave a stored file the index does not hold).
#[derive(Default)]
pub(super) struct Cancel {
    notify: Notify,
    /// `RUNNING`, then `CANCELLED` or `COMMITTING`, whichever comes first.
    state: AtomicU8,
}

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const COMMITTING: u8 = 2;

impl Cancel {
    /// Cancels the fill unless it began to commit; whether it did.
    pub(super) fn cancel(&self) -> bool {
        let cancelled = self.moved_to(CANCELLED);
        if cancelled {
            self.notify.notify_one();
        }
        cancelled
    }

    /// Resolves once the fill is cancelled.
    pub(super) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The fill begins to commit, unless it was cancelled; whether it may.
    pub(super) fn begin_commit(&self) -> bool {
        self.moved_to(COMMITTING)
    }

    pub(super) fn was_cancelled(&self) -> bool {
        self.state.load(Ordering::Acquire) == CANCELLED
    }

    fn moved_to(&self, state: u8) -> bool {
        let moved =
            self.state
                .compare_exchange(RUNNING, state, Ordering::AcqRel, Ordering::Acquire);
        moved.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefetch_is_cancelled_only_before_it_begins_to_commit() {
        let committing = Cancel::default();
        assert!(committing.begin_commit());
        assert!(
            !committing.cancel(),
            "a commit under way is never cancelled"
        );
        assert!(!committing.was_cancelled());
        let cancelled = Cancel::default();
        assert!(cancelled.cancel());
        assert!(!cancelled.begin_commit(), "a cancelled fill never commits");
        assert!(cancelled.was_cancelled());
    }
}
