//! The span queue and the thread that drains it into the exporter; the [`Flush`] that sends
//! what is left when keyswap stops (the OTLP metrics push uses it too).

use std::sync::Arc;
use std::time::Duration;

use super::export::{export_with_retries, Exporter, Settings};
use super::Metrics;

/// The most spans a queue or a batch may hold (a queue takes memory as spans wait in it, and
/// tokio refuses a channel past `usize::MAX >> 3`).
pub const MAX_SPANS: usize = 1 << 20;

/// How finished spans are batched: the OpenTelemetry SDK's batch span processor settings
/// (`OTEL_BSP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// `OTEL_BSP_SCHEDULE_DELAY`: how often the exporter takes the spans that finished meanwhile.
    pub delay: Duration,
    /// `--span-queue` or `OTEL_BSP_MAX_QUEUE_SIZE`: finished spans that may wait for the exporter;
    /// beyond this they are dropped and counted, so a slow collector never slows a request.
    pub queue: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per export at most.
    pub batch: usize,
}

impl Default for Batching {
    /// 50 ms, not the specification's 5 s: spans show up in a viewer at once, and a burst is sent
    /// in several batches instead of one of seconds of traffic (at 8,000 requests a second, 5 s
    /// would overflow any sensible queue). A queue of 4,096 (the specification's 2,048 holds a
    /// quarter of a second at that rate), batches of 512 (the specification's).
    fn default() -> Batching {
        Batching { delay: Duration::from_millis(50), queue: 4096, batch: 512 }
    }
}

impl Batching {
    /// From the environment, `queue` (a command-line flag) over `OTEL_BSP_MAX_QUEUE_SIZE`. A
    /// value out of range (sizes 1 to [`MAX_SPANS`], a delay of 1 ms to a day), or a batch larger
    /// than the queue, is the error.
    pub fn from_env(queue: Option<usize>, env: impl Fn(&str) -> Option<String>) -> Result<Batching, String> {
        let d = Batching::default();
        let set = |var: &str| env(var).filter(|v| !v.trim().is_empty());
        let count = |var: &str, v: &str| match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_SPANS).contains(&n) => Ok(n),
            _ => Err(format!("{var} `{v}` must be a number of spans from 1 to {MAX_SPANS}")),
        };
        let delay = match set("OTEL_BSP_SCHEDULE_DELAY") {
            Some(v) => super::export::millis("OTEL_BSP_SCHEDULE_DELAY", &v)?,
            None => d.delay,
        };
        let queue = match (queue, set("OTEL_BSP_MAX_QUEUE_SIZE")) {
            (Some(n), _) => count("--span-queue", &n.to_string())?,
            (None, Some(v)) => count("OTEL_BSP_MAX_QUEUE_SIZE", &v)?,
            (None, None) => d.queue,
        };
        let batch = match set("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            Some(v) => count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &v)?,
            None => d.batch.min(queue),
        };
        if batch > queue {
            return Err(format!(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) must not exceed the span queue ({queue}: --span-queue or OTEL_BSP_MAX_QUEUE_SIZE)"
            ));
        }
        Ok(Batching { delay, queue, batch })
    }
}

/// The exporter side: a bounded queue, drained every `batching.delay` by a thread of its own that
/// batches and exports with an exporter built from `settings`; an exporter that cannot be built is
/// the error. The [`Flush`] sends what is queued when keyswap stops.
///
/// Off the request path twice over: batching, framing, compressing and sending (a batch is up to
/// 512 spans by default, most of a megabyte) never hold up the workers that answer Envoy, and the
/// thread polls the queue instead of waiting on it, so finishing a span never wakes another thread
/// (a waiting receiver would be woken by every span: a system call per request).
pub fn spawn(settings: &Settings, metrics: Arc<Metrics>, batching: Batching) -> Result<(SpanQueue, Flush), String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(batching.queue.max(1));
    let (ready, started) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let (flush, rounds) = Flush::new(Duration::ZERO, batching.delay);
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
                        drain(exporter, rx, metrics, batching, rounds).await.done();
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
    /// Also says it to an export pausing between retries, which then ends its pause.
    stopping: tokio::sync::watch::Sender<bool>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Flush {
    /// The flush, and the exporter's side of it: a round `first` from its first look, then every
    /// `period`, until stopped.
    pub fn new(first: Duration, period: Duration) -> (Flush, Rounds) {
        let stop = Arc::new(tokio::sync::Notify::new());
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let rounds = Rounds { stop: stop.clone(), stopping: stopping_rx, first, period, tick: None, done: done_tx };
        (Flush { stop, stopping, done }, rounds)
    }

    /// Tells the exporter to send what it holds, and waits for it at most `within`: whether it
    /// finished in time.
    pub async fn finish(self, within: Duration) -> bool {
        // A permit if the exporter is busy sending: it stops at its next look.
        self.stop.notify_one();
        self.stopping.send_replace(true);
        matches!(tokio::time::timeout(within, self.done).await, Ok(Ok(())))
    }
}

/// When a background exporter sends: every tick, and once more when its [`Flush`] says stop.
pub struct Rounds {
    stop: Arc<tokio::sync::Notify>,
    /// True once a flush was asked for.
    stopping: tokio::sync::watch::Receiver<bool>,
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

    /// The last round is over: the flush finished.
    pub fn done(self) {
        let _ = self.done.send(());
    }
}

/// The most span bytes one export carries (a span larger than this goes alone): under the 4 MiB
/// an OpenTelemetry Collector accepts in one OTLP/gRPC message by default, which spans with
/// captured bodies (up to several hundred KB each) would pass long before a batch of 512 is full.
/// A batch the collector refuses for its size is retried, then lost whole.
pub const MAX_BATCH_BYTES: usize = 4_000_000;

async fn drain(
    exporter: Exporter,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    metrics: Arc<Metrics>,
    batching: Batching,
    mut rounds: Rounds,
) -> Rounds {
    use tokio::sync::mpsc::error::TryRecvError;
    // A batch never holds more than the queue: what waits for a hung collector stays bounded.
    let batch_max = batching.batch.clamp(1, batching.queue.max(1));
    let mut batch = Vec::with_capacity(batch_max);
    // The span that would have made the last batch too large: the next batch's first.
    let mut carried: Option<Vec<u8>> = None;
    loop {
        let last = rounds.next().await;
        // Batches until the queue is empty (a burst larger than one batch goes out at once).
        loop {
            let mut closed = last;
            let mut bytes = 0;
            while batch.len() < batch_max {
                let span = match carried.take() {
                    Some(span) => span,
                    None => match rx.try_recv() {
                        Ok(span) => {
                            metrics.left_queue(&span);
                            span
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    },
                };
                if !batch.is_empty() && bytes + span.len() > MAX_BATCH_BYTES {
                    carried = Some(span);
                    break;
                }
                bytes += span.len();
                batch.push(span);
            }
            let full = batch.len() == batch_max || carried.is_some();
            if !batch.is_empty() {
                let n = batch.len() as u64;
                tracing::trace!(spans = n, last, "exporting a batch of spans");
                match export_with_retries(&exporter, &batch, &rounds.stopping).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn from(flag: Option<usize>, vars: &[(&str, &str)]) -> Result<Batching, String> {
        Batching::from_env(flag, |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn batching_reads_the_otel_bsp_variables_with_the_flag_over_the_queue_size() {
        assert_eq!(from(None, &[]), Ok(Batching::default()));
        let vars = [
            ("OTEL_BSP_SCHEDULE_DELAY", "2000"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10"),
        ];
        assert_eq!(from(None, &vars), Ok(Batching { delay: Duration::from_secs(2), queue: 100, batch: 10 }));
        assert_eq!(from(Some(50), &vars).map(|b| b.queue), Ok(50), "--span-queue over the variable");
        // A queue smaller than the default batch: batches of the queue's size.
        assert_eq!(from(Some(16), &[]).map(|b| b.batch), Ok(16));
        assert_eq!(from(None, &[("OTEL_BSP_SCHEDULE_DELAY", " ")]), Ok(Batching::default()), "empty is unset");
    }

    #[test]
    fn a_malformed_batching_variable_names_itself() {
        for (var, v) in [
            ("OTEL_BSP_SCHEDULE_DELAY", "5s"),
            ("OTEL_BSP_SCHEDULE_DELAY", "0"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
            // Out of range (a queue past tokio's channel limit panicked at start before).
            ("OTEL_BSP_SCHEDULE_DELAY", "18446744073709551615"),
            ("OTEL_BSP_SCHEDULE_DELAY", "86400001"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "18446744073709551615"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1048577"),
        ] {
            let e = from(None, &[(var, v)]).unwrap_err();
            assert!(e.contains(var) && e.contains(v), "{e}");
        }
        assert!(from(Some(usize::MAX), &[]).unwrap_err().contains("--span-queue"));
        let e = from(Some(8), &[("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "9")]).unwrap_err();
        assert!(e.contains("must not exceed the span queue (8"), "{e}");
        assert!(from(Some(0), &[]).unwrap_err().contains("--span-queue"));
    }
}
