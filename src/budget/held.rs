//! A request's reservations until they are settled: what the call is counted as when its
//! response ends ([`Observed`], [`Answered`]), and the release of what was never used.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use super::{local, redis, weighted, Amounts, Claim, Engine, Settling};

/// Reservations taken for one request, settled exactly once: by [`Held::settle`], or released
/// whole when dropped unsettled (the request never reached the provider).
#[derive(Debug)]
pub struct Held {
    pub(super) claims: Vec<Claim>,
    pub(super) on: HeldIn,
    pub(super) engine: Arc<Engine>,
}

#[derive(Debug)]
pub(super) enum HeldIn {
    Local(Vec<Arc<local::Counter>>),
    Redis(Arc<redis::RedisStore>),
    /// Admitted uncounted (the store was down, fail-open), or already settled.
    Nothing,
}

/// What is known about a call when its reservation is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The response ended. Tokens the provider reported count, and a count missing beside a
    /// reported one is zero (embeddings report no output). A response that reports no usage at
    /// all keeps its reservation when it succeeded (an OpenAI stream without `include_usage`) or
    /// timed out ([`Answered::TimedOut`]); an error status without usage generated nothing: its
    /// tokens are released.
    /// `events`: of a stream; one that reports no usage and whose request set no output limit
    /// keyswap read is charged at least that many output tokens (its reservation, the default,
    /// bounds nothing the model generates).
    Ended { answered: Answered, input: Option<u64>, output: Option<u64>, events: u64 },
    /// The request was forwarded, then cut off (client gone, upstream reset). The reported input
    /// counts, or else the input as reserved (the provider may have read the prompt whether or not
    /// it answered); the output is the larger of the reported count and the response bytes that
    /// passed, those capped at the output reserved (a token is at least one byte; a count
    /// reported before the end can be a placeholder). When the request set no output limit keyswap
    /// read (the reservation is `defaultOutputTokens`, no bound on what the model generates), at
    /// least the stream's `events` that passed: a model streams about a token or more per event,
    /// and hanging up just before the usage event must not cap a long answer at the default.
    Aborted { input: Option<u64>, output: Option<u64>, response_bytes: u64, events: u64 },
}

/// What a response's status says about a call, for settling one that reported no usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// 2xx.
    Success,
    /// 408 or 504 from upstream: a gateway in front of the model (the provider's edge, a proxy on
    /// the way) gave up waiting on a long generation. The model may have run the call to its end,
    /// and nothing says what it used: settled like a success without usage, the reservation
    /// stands. (Envoy's own timeouts never reach keyswap as a status: ext_proc skips its local
    /// replies, the stream closes, and the call is settled as cut off.)
    TimedOut,
    /// Any other status: the provider refused or failed the call.
    Error,
}

impl Answered {
    /// The answer a response status gives.
    pub fn of_status(status: Option<u16>) -> Answered {
        match status {
            Some(200..=299) => Answered::Success,
            Some(408 | 504) => Answered::TimedOut,
            _ => Answered::Error,
        }
    }
}

impl Held {
    pub fn claims(&self) -> &[Claim] {
        &self.claims
    }

    /// Weighs the call's tokens by `model` too (the model the response names), where it weighs
    /// more than the one the request named: an alias (`gemini-pro-latest`) cannot dodge the
    /// weight of the model that answered.
    pub fn weigh_as(&mut self, model: &str) {
        for c in &mut self.claims {
            c.weight = c.weight.max(c.budget.weight(model));
        }
    }

    /// Settles every claim to what the call used, per `observed`; releases the rest.
    pub fn settle(self, observed: Observed) {
        self.settle_at(observed, SystemTime::now());
    }

    /// [`Held::settle`], the response ending at `now`. What a call used beyond its reservation
    /// counts in the window it ends in: a stream that outlasts its window (a minute's, an hour's)
    /// would otherwise charge it to a window already over, and per-minute limits would not bound
    /// long streams. What it used less is given back to the window it was reserved in.
    pub fn settle_at(mut self, observed: Observed, now: SystemTime) {
        // Admitted uncounted (the store was down, fail-open): no counter holds it, and the metric
        // of settled tokens says what counters were charged.
        let counted = !matches!(self.on, HeldIn::Nothing);
        // Each claim's change: what it used past its reservation (or less). One whose window has
        // ended keeps only what it gives back; its excess goes to the window of `now`.
        let mut deltas = Vec::with_capacity(self.claims.len());
        let mut later: Vec<(usize, Claim, Amounts)> = Vec::new();
        for (i, c) in self.claims.iter().enumerate() {
            let used = c.used(observed);
            if counted {
                let settled = used[3].max(0) as u64;
                self.engine.metrics.of_budget(&c.budget).settled_tokens.fetch_add(settled, Ordering::Relaxed);
            }
            let delta: Amounts = std::array::from_fn(|d| used[d] - c.reserved[d]);
            // (The window is looked up only for an excess: most calls use less than they reserve.)
            match (counted && delta.iter().any(|v| *v > 0)).then(|| c.later_window(now)).flatten() {
                Some(l) => {
                    deltas.push(delta.map(|v| v.min(0)));
                    later.push((i, l, delta.map(|v| v.max(0))));
                }
                None => deltas.push(delta),
            }
        }
        self.apply(deltas, later, now);
    }

    /// Adds each claim's delta to its counter (negative: gives back), and each of `later`'s
    /// amounts to the counter of its claim in a later window, made if need be.
    fn apply(&mut self, deltas: Vec<Amounts>, later: Vec<(usize, Claim, Amounts)>, now: SystemTime) {
        match std::mem::replace(&mut self.on, HeldIn::Nothing) {
            HeldIn::Local(counters) => {
                for (counter, delta) in counters.iter().zip(&deltas) {
                    counter.add(delta);
                }
                for (i, c, excess) in &later {
                    // No room for the later window's counter: charged where it was reserved.
                    match self.engine.local.counter(c, now) {
                        Some(counter) => counter.add(excess),
                        None => counters[*i].add(excess),
                    }
                }
            }
            HeldIn::Redis(store) => {
                let mut settle: Vec<(&Claim, Amounts, bool)> =
                    self.claims.iter().zip(deltas).map(|(c, d)| (c, d, false)).collect();
                settle.extend(later.iter().map(|(_, c, excess)| (c, *excess, true)));
                store.settle(&settle, Settling::new(&self.engine))
            }
            HeldIn::Nothing => {}
        }
    }
}

impl Claim {
    /// This claim in the window of `now`, when that is a later one than it was reserved in.
    fn later_window(&self, now: SystemTime) -> Option<Claim> {
        let (window_start, window_end) = super::window_bounds(self.budget.window, now);
        (window_start > self.window_start).then(|| Claim { window_start, window_end, ..self.clone() })
    }

    /// What the call counts as in this claim's budget, per `observed`.
    fn used(&self, observed: Observed) -> Amounts {
        let (w, reserved) = (self.weight, &self.reserved);
        let count = |reported: Option<u64>, otherwise: i64| reported.map_or(otherwise, |t| weighted(t, w));
        let (input, output) = match observed {
            Observed::Ended { answered: Answered::Error, input: None, output: None, .. } => (0, 0),
            // No count: the events that passed are the floor, a limit read in the body or not (a
            // limit under a name the upstream ignores, `max_gen_len` to a vLLM server, bounds
            // nothing; one it honours keeps the events near it).
            Observed::Ended { input: None, output: None, events, .. } => {
                (reserved[1], reserved[2].max(weighted(events, w)))
            }
            Observed::Ended { input, output, .. } => (count(input, 0), count(output, 0)),
            Observed::Aborted { input, output, response_bytes, events } => {
                // What passed bounds the output from below too: a count reported before the end
                // can be a placeholder (Anthropic's `message_start` says 1 or 2 output tokens).
                let passed = reserved[2].min(weighted(response_bytes, w)).max(weighted(events, w));
                (count(input, reserved[1]), count(output, passed).max(passed))
            }
        };
        [1, input, output, input + output]
    }
}

impl Drop for Held {
    /// Never settled: the request was refused or abandoned before it was forwarded.
    fn drop(&mut self) {
        if !matches!(self.on, HeldIn::Nothing) {
            let deltas = self.claims.iter().map(|c| c.reserved.map(|a| -a)).collect();
            self.apply(deltas, Vec::new(), SystemTime::now());
        }
    }
}
