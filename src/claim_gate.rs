//! Taking turns at claiming: at most a few children of the host in a claim round trip at once.
//!
//! With many children on few cores, claimers that all walk the head of the claim index past each
//! other's locked rows burn the database's CPU; taking turns keeps that walk short. The turns are
//! flags in the shared slot table, so the supervisor can give back the turn of a child it reaps.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::futex;
use crate::slots::SlotTable;

/// Waits until fewer than `max` children of the host are in a claim round trip, then marks
/// `index` as one of them; [`leave`] ends the turn. The count is read, not locked, so it may
/// admit one or two more than `max` in a race: it shapes load, it is no correctness bound. The
/// supervisor clears a dead child's flag when it reaps it, so no turn is ever lost.
///
/// Waiting here is being alive, so the waiter heartbeats: a turn is held only by a child that is
/// itself alive (beating, or in a bounded database call) or about to be killed as stuck, which
/// frees its turn; during a database outage the holders retry their connection, heartbeating,
/// and the waiters wait as long, heartbeating too.
pub fn enter(table: &SlotTable, index: usize, max: usize) {
    let slot = &table.slots[index];
    loop {
        slot.beat();
        let seen = table.header.claim_done.load(Ordering::Acquire);
        let busy = table
            .active()
            .iter()
            .filter(|s| s.in_claim.load(Ordering::Acquire))
            .count();
        if busy < max {
            slot.in_claim.store(true, Ordering::Release);
            return;
        }
        futex::wait(&table.header.claim_done, seen, Duration::from_millis(5));
    }
}

/// Ends the claim turn taken by [`enter`] and wakes a child waiting for one.
pub fn leave(table: &SlotTable, index: usize) {
    table.slots[index].in_claim.store(false, Ordering::Release);
    futex::wake(&table.header.claim_done);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn admits_max_then_waits_for_a_turn() {
        let table = SlotTable::create_shared().unwrap();
        table.header.concurrency.store(3, Ordering::Release);
        enter(table, 0, 2);
        enter(table, 1, 2);
        let started = Instant::now();
        let waiter = std::thread::spawn(move || {
            enter(table, 2, 2);
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(200));
        leave(table, 0);
        let waited = waiter.join().unwrap();
        assert!(
            waited >= Duration::from_millis(150),
            "the third claimer did not wait: {waited:?}"
        );
        assert!(table.slots[2].in_claim.load(Ordering::Acquire));
        assert!(!table.slots[0].in_claim.load(Ordering::Acquire));
    }
}
