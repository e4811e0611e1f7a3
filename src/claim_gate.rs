//! Taking turns at claiming: at most a few children of the host in a claim round trip at once.
//!
//! With many children on few cores, claimers that all walk the head of the claim index past each
//! other's locked rows burn the database's CPU; taking turns keeps that walk short. The turns are
//! flags in the shared slot table, so the supervisor can give back the turn of a child it reaps.
//! The fleet's turns (`FORKQ_CLAIMERS`) are shared out between the hosts serving the schema
//! ([`share`]), so that claimers wait here, on a futex, rather than at the database's own gate
//! (the lean round's advisory locks, [`fleet`]): a claimer waiting in the database holds a
//! connection and costs more. The database's gate catches the moments the host count is out of
//! date, and holds the fleet to its turns when the hosts' shares add up to more (each host
//! keeps at least one).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::futex;
use crate::slots::SlotTable;

/// Waits until fewer than `max` children of the host are in a claim round trip, then marks
/// `index` as one of them; [`leave`] ends the turn. The count is read, not locked, so it may
/// admit one or two more than `max` in a race: it shapes load, it is no correctness bound. The
/// supervisor ends a dead child's turn when it reaps it, so no turn is ever lost.
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
        // Every end of a turn wakes a waiter ([`leave`], the supervisor's reaping too), so the
        // timeout is only a backstop: with a few milliseconds, 250 waiting children woke 50,000
        // times a second between them.
        futex::wait(&table.header.claim_done, seen, Duration::from_millis(50));
    }
}

/// This host's share of the fleet's `claimers` turns: an even share of them among the hosts
/// serving the schema (`hosts`, 0 while unknown counts as 1), rounded up, so at least one;
/// without a fleet-wide limit (`claimers` 0), `fallback`.
pub fn share(claimers: usize, hosts: u32, fallback: usize) -> usize {
    if claimers == 0 {
        return fallback;
    }
    claimers.div_ceil(hosts.max(1) as usize).max(1)
}

/// The turns of the database's own gate (0, no gate, without a fleet-wide limit or for a host
/// alone). When the hosts' [`share`]s add up to `claimers`, the hosts' own gates already hold
/// the fleet to it, and the database's grants one more per host: a round's lock is released at
/// its commit, which the server may finish after the reply that ends the host's turn, so the
/// next round of the host can find the lock still held; without the slack about one round in
/// eight was refused at 2 hosts of 8 children on this 2-core machine. When the shares add up to
/// more (their rounding up: 8 hosts sharing 4 turns hold one each), the database's gate is
/// `claimers` itself, and a round it refuses waits there for a turn (`Consumer::claim_in_turn`):
/// with a turn for each of 8 hosts, 8 rounds picked at once where 4 would, and the server spent
/// 28-32 µs per job instead of 22-23 (8 daemons x 2 children against 2 x 8, scale cluster).
/// A host alone (`hosts` 1) sends no gate at all: the database would grant it one turn more
/// than its own gate ever lets through, so the advisory locks could only cost it: without them a
/// durable round (one ack, one claim) ran in 343-376 µs of server time instead of 396-415
/// (pg_stat_statements, 3 drains each). Until the probe has counted the hosts (`hosts` 0) the
/// gate stays: another host may be serving. A host joining later counts two hosts from its
/// first presence write, and this one within a presence interval.
pub fn fleet(claimers: usize, hosts: u32) -> usize {
    if claimers == 0 || hosts == 1 {
        return 0;
    }
    let counted = hosts.max(1) as usize;
    match share(claimers, hosts, 0) * counted == claimers {
        true => claimers + counted,
        false => claimers,
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

    #[test]
    fn the_fleets_turns_are_shared_out_between_its_hosts() {
        assert_eq!(share(4, 0, 9), 4, "host count unknown: this host alone");
        assert_eq!(share(4, 1, 9), 4);
        assert_eq!(share(4, 4, 9), 1);
        assert_eq!(share(4, 8, 9), 1, "never less than one");
        assert_eq!(share(6, 4, 9), 2);
        assert_eq!(share(0, 4, 9), 9, "no fleet-wide limit");
    }

    #[test]
    fn the_database_grants_the_fleets_turns_and_one_more_per_host_when_shares_are_even() {
        assert_eq!(fleet(4, 0), 5, "host count unknown: the gate kept");
        assert_eq!(fleet(4, 1), 0, "a host alone: its own gate is enough");
        assert_eq!(fleet(4, 2), 6, "two each, and one more each");
        assert_eq!(fleet(4, 4), 8);
        assert_eq!(
            fleet(4, 3),
            4,
            "two each would be six: the database holds them to four"
        );
        assert_eq!(fleet(4, 8), 4, "one each would be eight");
        assert_eq!(fleet(0, 8), 0, "no gate");
    }
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
