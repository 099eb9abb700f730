//! The span queue and the thread that drains it into the exporter; the [`Flush`] that sends
//! what is left when keyswap stops (the OTLP metrics push uses it too).

use std::sync::Arc;
use std::time::Duration;

use super::export::{export_with_retries, Exporter, Settings};
use super::Metrics;

/// How often the exporter thread takes the spans that finished meanwhile.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The exporter side: a bounded queue, drained every [`DRAIN_EVERY`] by a thread of its own that
/// batches and exports with an exporter built from `settings`; an exporter that cannot be built is
/// the error. The [`Flush`] sends what is queued when keyswap stops.
///
/// Off the request path twice over: batching, framing, compressing and sending (a batch is up to
/// 512 spans, most of a megabyte) never hold up the workers that answer Envoy, and while spans
/// keep coming the thread polls the queue instead of waiting on it, so finishing a span never
/// wakes another thread (a waiting receiver would be woken by every span: a system call per
/// request). After a round that found nothing it waits on the queue instead: an idle sidecar's
/// exporter sleeps until the next span, rather than waking 20 times a second.
pub fn spawn(settings: &Settings, metrics: Arc<Metrics>, capacity: usize) -> Result<(SpanQueue, Flush), String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(capacity);
    let (ready, started) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let (flush, rounds) = Flush::new(Duration::ZERO, DRAIN_EVERY);
    let settings = settings.clone();
    std::thread::Builder::new()
        .name("keyswap-otlp".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(ready.send(Err(format!("cannot start the OTLP exporter: {e}")))),
            };
            rt.block_on(async move {
                // Built here: its connections (and tonic's channel task) live on this thread.
                match Exporter::new(&settings) {
                    Ok(exporter) => {
                        let _ = ready.send(Ok(()));
                        // Done once the queue is gone too: nothing takes spans any more.
                        drain(exporter, rx, metrics, capacity, rounds).await.done();
                    }
                    Err(e) => drop(ready.send(Err(e))),
                }
            });
        })
        .map_err(|e| format!("cannot start the OTLP exporter thread: {e}"))?;
    started.recv().map_err(|_| "the OTLP exporter thread ended".to_owned())??;
    Ok((tx, flush))
}

/// Where finished spans wait for the exporter.
pub type SpanQueue = tokio::sync::mpsc::Sender<Vec<u8>>;

/// A background exporter's last act, as the OpenTelemetry SDKs' `Shutdown` (which includes a
/// `ForceFlush`): told to stop, it sends what it holds (the spans of the streams that ended while
/// keyswap drained them, the metrics' final totals) and ends.
pub struct Flush {
    stop: Arc<tokio::sync::Notify>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Flush {
    /// The flush, and the exporter's side of it: a round `first` from its first look, then every
    /// `period`, until stopped.
    pub fn new(first: Duration, period: Duration) -> (Flush, Rounds) {
        let stop = Arc::new(tokio::sync::Notify::new());
        let (done_tx, done) = tokio::sync::oneshot::channel();
        (Flush { stop: stop.clone(), done }, Rounds { stop, first, period, tick: None, done: done_tx })
    }

    /// Tells the exporter to send what it holds, and waits for it at most `within`: whether it
    /// finished in time.
    pub async fn finish(self, within: Duration) -> bool {
        // A permit if the exporter is busy sending: it stops at its next look.
        self.stop.notify_one();
        matches!(tokio::time::timeout(within, self.done).await, Ok(Ok(())))
    }
}

/// When a background exporter sends: every tick, and once more when its [`Flush`] says stop.
pub struct Rounds {
    stop: Arc<tokio::sync::Notify>,
    first: Duration,
    period: Duration,
    /// Made at the first look, on the runtime that drives the exporter (a timer belongs to the
    /// runtime it was made on).
    tick: Option<tokio::time::Interval>,
    done: tokio::sync::oneshot::Sender<()>,
}

impl Rounds {
    /// Waits for the next round: `true` when it is the last (stop was asked).
    pub async fn next(&mut self) -> bool {
        let (first, period) = (self.first, self.period);
        let tick = self.tick.get_or_insert_with(|| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        tokio::select! {
            biased;
            _ = self.stop.notified() => true,
            _ = tick.tick() => false,
        }
    }

    /// Waits for stop to be asked (and nothing else).
    async fn stopped(&self) {
        self.stop.notified().await
    }

    /// The last round is over: the flush finished.
    pub fn done(self) {
        let _ = self.done.send(());
    }
}

async fn drain(
    exporter: Exporter,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    metrics: Arc<Metrics>,
    capacity: usize,
    mut rounds: Rounds,
) -> Rounds {
    use tokio::sync::mpsc::error::TryRecvError;
    // A batch never holds more than the queue: what waits for a hung collector stays bounded.
    let batch_max = capacity.min(512);
    let mut batch = Vec::with_capacity(batch_max);
    // The last round found nothing: wait on the queue rather than the clock.
    let mut idle = false;
    loop {
        let mut closed = false;
        let last = if idle {
            tokio::select! {
                biased;
                _ = rounds.stopped() => true,
                span = rx.recv() => {
                    match span {
                        Some(span) => batch.push(span),
                        None => closed = true,
                    }
                    // The spans that follow it within a tick go out with it.
                    rounds.next().await
                }
            }
        } else {
            rounds.next().await
        };
        idle = true;
        // Batches until the queue is empty (a burst larger than one batch goes out at once).
        loop {
            closed |= last;
            while batch.len() < batch_max {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let full = batch.len() == batch_max;
            if !batch.is_empty() {
                idle = false;
                let n = batch.len() as u64;
                tracing::trace!(spans = n, last, "exporting a batch of spans");
                match export_with_retries(&exporter, &batch).await {
                    Ok(()) => Metrics::add(&metrics.spans_exported, n),
                    Err(e) => {
                        Metrics::add(&metrics.spans_export_failed, n);
                        // `retryable`: the collector was away (retries exhausted) or refused the spans.
                        tracing::warn!(error = %e, retryable = e.retryable(), spans = n, "OTLP export failed; spans dropped");
                    }
                }
                batch.clear();
            }
            if full {
                continue;
            }
            if closed {
                tracing::debug!(last, "span exporter stopping: the queue is empty");
                return rounds;
            }
            break;
        }
    }
}
