//! Failover, the part of `refresh` that puts the next of a peer's servers in place of the one in
//! use when that one stops answering. This file decides; `refresh` acts.
//!
//! A server has stopped answering when the tunnel sent something (its tx bytes grew) and got
//! nothing back (rx bytes and the latest handshake stand still) for `failoverAfterSeconds`.
//! Received bytes count as an answer only while the peer has a session (a handshake on
//! record): a server whose port drops what we send still sends us its own handshake
//! initiations (it retries for 90 s after its data went unanswered), and both the kernel and
//! wireguard-go count those in rx. Without a session, only a completed handshake is an answer.
//! A healthy server answers data within WireGuard's passive keepalive (10 s), but it never
//! answers a persistent keepalive, so an idle tunnel with keepalive looks the same for up to
//! two minutes. Before switching, the peer is therefore made to handshake anew: a server that
//! is only quiet answers that at once; after [`PROBE_GRACE`] without an answer (and with
//! something sent meanwhile) the next server takes over.
//!
//! Order: the peer itself, then its alternatives, then the peer itself again. A server that
//! works is kept until it fails (no switching back while it answers). When no server answered
//! for a whole round, every further round gives each server twice as long, up to
//! [`MAX_DWELL`]: never a tight loop.

use std::time::{Duration, Instant, SystemTime};

/// How long a forced handshake may go unanswered before the server counts as gone: one
/// WireGuard retry interval.
pub const PROBE_GRACE: Duration = Duration::from_secs(5);
/// The longest a server is given in the rounds after every server failed.
pub const MAX_DWELL: Duration = Duration::from_secs(600);
/// How long an unanswered stretch must have been seen before it counts: an answer already on
/// its way when the look was taken arrives within it.
pub const CONFIRM: Duration = Duration::from_secs(1);

/// What WireGuard reports about the server in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    pub handshake: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait,
    /// Make the server in use handshake anew, to tell a quiet server from a dead one.
    Probe,
    /// Put server `to` in the place of server `from`, which left the tunnel unanswered for
    /// `silent`.
    Switch {
        from: usize,
        to: usize,
        silent: Duration,
    },
}

/// One peer's servers and what the one in use did lately.
#[derive(Debug)]
pub struct Watch {
    servers: usize,
    after: Duration,
    active: usize,
    seen: Option<Counters>,
    /// When `seen` was taken, and the look before that one.
    seen_at: Option<Instant>,
    look_before: Option<Instant>,
    /// The latest look saw an answer.
    last_answered: bool,
    unanswered_since: Option<Instant>,
    /// The look that first saw the current unanswered stretch.
    noticed_at: Option<Instant>,
    probed_at: Option<Instant>,
    sent_since_probe: bool,
    /// Switches since a server last answered.
    failed_in_row: usize,
}

impl Watch {
    pub fn new(servers: usize, active: usize, after: Duration) -> Watch {
        Watch {
            servers: servers.max(1),
            after,
            active,
            seen: None,
            seen_at: None,
            look_before: None,
            last_answered: false,
            unanswered_since: None,
            noticed_at: None,
            probed_at: None,
            sent_since_probe: false,
            failed_in_row: 0,
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// Another server is in use than the last decision said (a switch that could not be
    /// made, or someone else's change): watch that one from now on.
    pub fn set_active(&mut self, active: usize) {
        self.active = active;
        self.seen = None;
        self.seen_at = None;
        self.look_before = None;
        self.last_answered = false;
        self.unanswered_since = None;
        self.noticed_at = None;
        self.probed_at = None;
    }

    /// No server has answered for a whole round.
    pub fn all_down(&self) -> bool {
        self.failed_in_row >= self.servers
    }

    /// How long the server in use may stay unanswered: `after`, doubled for every whole round
    /// without an answer.
    pub fn dwell(&self) -> Duration {
        let rounds = u32::try_from(self.failed_in_row / self.servers).unwrap_or(u32::MAX);
        let factor = 1u32.checked_shl(rounds.min(16)).unwrap_or(u32::MAX);
        self.after
            .saturating_mul(factor)
            .min(MAX_DWELL.max(self.after))
    }

    /// When the watch wants its next look at the counters; None before its first look at the
    /// server in use (look at once). While the server is unanswered: the moment it may be
    /// probed, then the end of the probe's grace. Otherwise (`after` - [`CONFIRM`]) / 2 past the
    /// last look. An unanswered stretch is dated back to the earliest moment it may have
    /// started (see [`Watch::observe`]), so a server that stops answering right after a look is
    /// probed `after` later, and replaced [`PROBE_GRACE`] after that, as if it were watched
    /// all the time.
    pub fn next_look(&self) -> Option<Instant> {
        let last = self.seen_at?;
        Some(match (self.unanswered_since, self.probed_at) {
            // Once soon after the probe, to see the counters the peer anew start from zero
            // (the grace's end alone might find them back where they were).
            (Some(_), Some(at)) if last <= at => at + CONFIRM,
            (Some(_), Some(at)) => at + PROBE_GRACE,
            (Some(since), None) => {
                (since + self.dwell()).max(self.noticed_at.unwrap_or(last) + CONFIRM)
            }
            (None, _) => last + self.after.saturating_sub(CONFIRM) / 2,
        })
    }

    pub fn observe(&mut self, now: Instant, counters: Counters) -> Decision {
        let before_previous = self.look_before;
        let previous_look = self.seen_at.replace(now);
        self.look_before = previous_look;
        let previous_answered = std::mem::take(&mut self.last_answered);
        let Some(before) = self.seen.replace(counters) else {
            // A server just put in place that has sent and has no session is unanswered from
            // now: while it waits for a handshake answer, WireGuard sends only every 5 s.
            if counters.tx > 0 && counters.handshake.is_none() {
                self.unanswered_since = Some(now);
                self.noticed_at = Some(now);
            }
            return Decision::Wait;
        };
        // A peer added anew (a probe, a switch, a reload) counts from zero.
        let reset = counters.tx < before.tx || counters.rx < before.rx;
        let (rx_before, tx_before) = if reset {
            (0, 0)
        } else {
            (before.rx, before.tx)
        };
        let answered = counters.handshake.is_some()
            && (counters.rx > rx_before || counters.handshake != before.handshake);
        if answered {
            self.last_answered = true;
            self.unanswered_since = None;
            self.noticed_at = None;
            self.probed_at = None;
            self.failed_in_row = 0;
            return Decision::Wait;
        }
        if counters.tx > tx_before {
            // Sent and not answered since the previous look: unanswered since then, or, when
            // that look saw an answer (which may have come right after the one before it),
            // since the one before.
            if self.unanswered_since.is_none() {
                let start = if previous_answered {
                    before_previous.or(previous_look)
                } else {
                    previous_look
                };
                self.unanswered_since = Some(start.unwrap_or(now));
                self.noticed_at = Some(now);
            }
            self.sent_since_probe |= self.probed_at.is_some();
        }
        let Some(since) = self.unanswered_since else {
            return Decision::Wait;
        };
        let noticed = self.noticed_at.unwrap_or(since);
        if now.duration_since(since) < self.dwell() || now.duration_since(noticed) < CONFIRM {
            return Decision::Wait;
        }
        match self.probed_at {
            None => {
                self.probed_at = Some(now);
                self.sent_since_probe = false;
                Decision::Probe
            }
            Some(at) if now.duration_since(at) < PROBE_GRACE => Decision::Wait,
            // Nothing was sent after the probe: no evidence either way, and nothing waits.
            Some(_) if !self.sent_since_probe => {
                self.unanswered_since = None;
                self.noticed_at = None;
                self.probed_at = None;
                Decision::Wait
            }
            Some(_) => {
                let from = self.active;
                self.failed_in_row += 1;
                self.set_active((from + 1) % self.servers);
                Decision::Switch {
                    from,
                    to: self.active,
                    silent: now.duration_since(since),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rx: u64, tx: u64, handshake: Option<u64>) -> Counters {
        Counters {
            rx,
            tx,
            handshake: handshake.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    /// Feeds one observation per second from `t` on; returns the decisions that were not Wait.
    fn run(w: &mut Watch, t: &mut Instant, steps: &[Counters]) -> Vec<(usize, Decision)> {
        let mut out = Vec::new();
        for (i, counters) in steps.iter().enumerate() {
            let d = w.observe(*t, *counters);
            if d != Decision::Wait {
                out.push((i, d));
            }
            *t += Duration::from_secs(1);
        }
        out
    }

    #[test]
    fn a_server_that_answers_is_kept() {
        let mut t = Instant::now();
        let mut w = Watch::new(2, 0, Duration::from_secs(5));
        // Traffic both ways.
        let steps: Vec<_> = (0..30).map(|i| c(100 * i, 100 * i, Some(1))).collect();
        assert!(run(&mut w, &mut t, &steps).is_empty());
        // Idle: nothing sent, nothing received: no reason to switch, however long.
        let steps: Vec<_> = (0..300).map(|_| c(3000, 3000, Some(1))).collect();
        assert!(run(&mut w, &mut t, &steps).is_empty());
    }

    #[test]
    fn a_quiet_server_is_probed_and_kept_when_it_answers() {
        let mut t = Instant::now();
        let mut w = Watch::new(2, 0, Duration::from_secs(5));
        // Keepalives go out, nothing comes back: 5 s after the last look before the first one
        // was seen, a probe.
        let steps: Vec<_> = (0..8).map(|i| c(0, 32 * i, Some(1))).collect();
        let decisions = run(&mut w, &mut t, &steps);
        assert_eq!(decisions, vec![(5, Decision::Probe)]);
        // The re-added peer handshakes: counters from zero, a new handshake.
        assert_eq!(w.observe(t, c(92, 148, Some(50))), Decision::Wait);
        assert_eq!(w.active(), 0);
        assert!(!w.all_down());
    }

    #[test]
    fn a_dead_server_is_replaced_then_all_rounds_back_off() {
        let mut t = Instant::now();
        let after = Duration::from_secs(5);
        let mut w = Watch::new(2, 0, after);
        let sending = |n: u64| -> Vec<Counters> { (1..=n).map(|i| c(0, 100 * i, None)).collect() };
        // Sent and never heard: unanswered from the first look; probe after 5 s, switch 5 s
        // later.
        let decisions = run(&mut w, &mut t, &sending(11));
        assert_eq!(decisions[0], (5, Decision::Probe));
        assert!(matches!(
            decisions[1],
            (10, Decision::Switch { from: 0, to: 1, .. })
        ));
        assert!(!w.all_down());
        // The alternative is dead too: back to the peer itself, and now all are down.
        let decisions = run(&mut w, &mut t, &sending(11));
        assert!(matches!(
            decisions.last(),
            Some((10, Decision::Switch { from: 1, to: 0, .. }))
        ));
        assert!(w.all_down());
        // The next round gives each server twice as long.
        assert_eq!(w.dwell(), 2 * after);
        // The first look at a server that has only sent counts as unanswered already.
        let mut fresh = Watch::new(2, 1, after);
        fresh.observe(t, c(0, 148, None));
        assert_eq!(fresh.unanswered_since, Some(t));
        let decisions = run(&mut w, &mut t, &sending(30));
        assert_eq!(decisions[0].0, 10, "probe after 10 s: {decisions:?}");
        // Backoff is capped.
        let mut w = Watch::new(2, 0, after);
        w.failed_in_row = 1000;
        assert_eq!(w.dwell(), MAX_DWELL);
        // An answer ends the outage.
        let mut w = Watch::new(2, 1, after);
        w.failed_in_row = 4;
        w.observe(t, c(0, 100, None));
        w.observe(t, c(60, 200, Some(9)));
        assert!(!w.all_down());
        assert_eq!(w.dwell(), after);
    }

    /// A server whose host drops our packets keeps sending its own handshake initiations
    /// (148 bytes every 5 s, for 90 s), which WireGuard counts as received: the VM test saw
    /// probe after probe with the kernel backend, and never a switch.
    #[test]
    fn handshake_initiations_from_a_server_that_drops_ours_are_no_answer() {
        let mut t = Instant::now();
        let after = Duration::from_secs(5);
        let mut w = Watch::new(2, 0, after);
        // An established session; then what we send goes unanswered, and after the probe the
        // re-added peer (no session) hears the server's initiations and nothing else.
        let mut steps: Vec<_> = (0..6).map(|i| c(5000, 5000 + 100 * i, Some(1))).collect();
        steps.extend([
            c(148, 148, None),
            c(148, 148, None),
            c(296, 148, None),
            c(296, 296, None),
            c(296, 296, None),
        ]);
        let decisions = run(&mut w, &mut t, &steps);
        assert_eq!(decisions[0], (5, Decision::Probe), "{decisions:?}");
        assert!(
            matches!(decisions[1], (10, Decision::Switch { from: 0, to: 1, .. })),
            "{decisions:?}"
        );
        // The alternative put in place hears the same from its server: still no answer, and
        // after a whole round every server is down.
        let heard_only_initiations = [
            c(0, 148, None),
            c(0, 148, None),
            c(148, 148, None),
            c(148, 296, None),
            c(148, 296, None),
            c(148, 296, None),
            c(148, 148, None),
            c(148, 148, None),
            c(296, 148, None),
            c(296, 296, None),
            c(296, 296, None),
        ];
        let decisions = run(&mut w, &mut t, &heard_only_initiations);
        assert_eq!(decisions[0], (5, Decision::Probe), "{decisions:?}");
        assert!(
            matches!(decisions[1], (10, Decision::Switch { from: 1, to: 0, .. })),
            "{decisions:?}"
        );
        assert!(w.all_down());
        // A handshake that completes is an answer.
        w.observe(t, c(148, 148, None));
        w.observe(t, c(240, 296, Some(99)));
        assert!(!w.all_down());
    }

    #[test]
    fn looking_now_and_then_delays_no_switch() {
        let after = Duration::from_secs(6);
        let half = (after - CONFIRM) / 2;
        let t0 = Instant::now();
        let mut w = Watch::new(2, 0, after);
        assert_eq!(w.next_look(), None, "the first look is at once");
        // Traffic both ways: the next look 2.5 s later.
        assert_eq!(w.observe(t0, c(100, 100, Some(1))), Decision::Wait);
        assert_eq!(w.next_look(), Some(t0 + half));
        // The server stops answering right after t0. The next look still sees its last
        // answers; the one after sees only sending, dates the silence back to t0, and
        // confirms it a second later.
        assert_eq!(w.observe(t0 + half, c(150, 500, Some(1))), Decision::Wait);
        assert_eq!(w.next_look(), Some(t0 + 2 * half));
        assert_eq!(
            w.observe(t0 + 2 * half, c(150, 900, Some(1))),
            Decision::Wait
        );
        let confirmed = t0 + after;
        assert_eq!(w.next_look(), Some(confirmed));
        assert_eq!(w.observe(confirmed, c(150, 1000, Some(1))), Decision::Probe);
        // The probe put the peer anew: its counters start from zero, the initiation sent.
        assert_eq!(w.next_look(), Some(confirmed + CONFIRM));
        assert_eq!(
            w.observe(confirmed + CONFIRM, c(0, 148, None)),
            Decision::Wait
        );
        let grace_over = confirmed + PROBE_GRACE;
        assert_eq!(w.next_look(), Some(grace_over));
        assert!(matches!(
            w.observe(grace_over, c(0, 296, None)),
            Decision::Switch { from: 0, to: 1, .. }
        ));
        // `after` + PROBE_GRACE after the server stopped.
        assert_eq!(w.next_look(), None, "the new server is looked at at once");
    }

    #[test]
    fn no_switch_without_something_sent_after_the_probe() {
        let mut t = Instant::now();
        let mut w = Watch::new(3, 0, Duration::from_secs(5));
        let mut steps: Vec<_> = (1..=6).map(|i| c(0, 100 * i, None)).collect();
        // After the probe the counters restart and stay at zero: the program stopped sending.
        steps.extend((0..10).map(|_| c(0, 0, None)));
        let decisions = run(&mut w, &mut t, &steps);
        assert_eq!(decisions, vec![(5, Decision::Probe)]);
        assert_eq!(w.active(), 0);
    }
}
