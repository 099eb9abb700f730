//! What bounds Envoy itself against an agent that holds resources on purpose: its overload
//! manager, in every bootstrap keyswap generates (static or ADS).
//!
//! A request body that a token budget, SigV4 or a body span needs whole is buffered by Envoy
//! until it ends (up to 9 MiB a request). One agent opening 60 such requests on three HTTP/2
//! connections and never finishing them took Envoy's heap from 8 MiB to 500 MiB: past the memory
//! limit of its container, the gateway is killed for every agent. With these bounds Envoy resets
//! the HTTP/2 streams that hold the most memory and closes idle HTTP/1.1 requests as its heap
//! nears [`Bounds::max_heap`], before it stops taking requests at all.
//!
//! What they do not stop: an HTTP/1.1 agent that keeps sending a byte of each held body every few
//! seconds holds its memory (Envoy cannot reset HTTP/1.1 streams for memory), and past 98 % of
//! the heap every new request is answered 503 until it lets go. The pod is not OOM-killed.

use serde_json::{json, Value};

/// Envoy's limits, from `--envoy-max-heap` and `--envoy-max-connections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// The heap Envoy's overload manager measures pressure against, in bytes: about three
    /// quarters of the memory limit of Envoy's container.
    pub max_heap: u64,
    /// Agents' connections, all listeners together; past it Envoy closes new ones at once.
    pub max_connections: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { max_heap: DEFAULT_MAX_HEAP, max_connections: DEFAULT_MAX_CONNECTIONS }
    }
}

/// 1 GiB.
pub const DEFAULT_MAX_HEAP: u64 = 1 << 30;
pub const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;

/// How long a request may sit idle (nothing sent or received) when Envoy's heap is full; 300 s
/// (Envoy's stream idle timeout) when it is not, scaled down in between.
const STREAM_IDLE_UNDER_PRESSURE: &str = "10s";

/// Streams holding at least this much buffered memory (2^16 bytes: 64 KiB) are tracked: the ones
/// Envoy resets under pressure, the largest first (8 buckets, doubling from 64 KiB).
const TRACKED_STREAM_POWER_OF_TWO: u32 = 16;

/// The bootstrap's `overload_manager`, looking every 50 ms (at 100 ms, uploads arriving fast
/// through loopback took Envoy's resident memory past 2.5 times its heap in about one run of ten,
/// 210–265 MiB the others under a 160 MiB heap; at 50 ms, 200–235 MiB in fifteen runs). Heap
/// pressure (the heap in use over `max_heap`):
/// - from 0.80, HTTP/2 streams holding over 64 KiB are reset, the largest first, all of them by
///   0.95 (`reset_high_memory_stream`); the agent holding them gets a reset stream. Envoy resets
///   only HTTP/2 streams this way;
/// - from 0.80, the idle timeouts of requests and connections shrink, from Envoy's 300 s and 1 h
///   to 10 s at 0.95 (`reduce_timeouts`): an HTTP/1.1 request whose agent stopped sending its
///   body is closed within seconds once memory is short;
/// - at 0.90, freed memory is given back to the system (`shrink_heap`);
/// - at 0.98, new requests are answered 503 until the pressure falls (`stop_accepting_requests`).
pub fn overload_manager(bounds: &Bounds) -> Value {
    const HEAP: &str = "envoy.resource_monitors.fixed_heap";
    const CONNECTIONS: &str = "envoy.resource_monitors.global_downstream_max_connections";
    let at = |value: f64| json!([{"name": HEAP, "threshold": {"value": value}}]);
    json!({
        "refresh_interval": "0.05s",
        "resource_monitors": [
            {"name": HEAP, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": bounds.max_heap}},
            {"name": CONNECTIONS, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": bounds.max_connections}},
        ],
        "actions": [
            {"name": "envoy.overload_actions.reset_high_memory_stream", "triggers": [{"name": HEAP,
                "scaled": {"scaling_threshold": 0.80, "saturation_threshold": 0.95}}]},
            {"name": "envoy.overload_actions.reduce_timeouts", "triggers": [{"name": HEAP,
                "scaled": {"scaling_threshold": 0.80, "saturation_threshold": 0.95}}],
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.overload.v3.ScaleTimersOverloadActionConfig",
                    "timer_scale_factors": [
                        {"timer": "HTTP_DOWNSTREAM_STREAM_IDLE", "min_timeout": STREAM_IDLE_UNDER_PRESSURE},
                        {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": STREAM_IDLE_UNDER_PRESSURE},
                    ]}},
            {"name": "envoy.overload_actions.shrink_heap", "triggers": at(0.90)},
            {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": at(0.98)},
        ],
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": TRACKED_STREAM_POWER_OF_TWO},
    })
}

/// A size such as `384Mi`, `1Gi`, `512Ki` or a number of bytes (as a Kubernetes memory limit is
/// written; `M` and `G` are the decimal units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}`: expected a size such as 384Mi, 1Gi or a number of bytes");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| bad())?;
    let unit: u64 = match &s[split..] {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(unit).ok_or_else(bad)?;
    if bytes < MIN_HEAP {
        return Err(format!("`{s}`: at least 64Mi (Envoy's own heap is about 10 MiB before any traffic)"));
    }
    Ok(bytes)
}

const MIN_HEAP: u64 = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_kubernetes_writes_memory_limits() {
        assert_eq!(parse_size("384Mi"), Ok(384 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("100M"), Ok(100_000_000));
        assert_eq!(parse_size("134217728"), Ok(128 << 20));
        for bad in ["", "Mi", "1.5Gi", "384MB", "-1Gi", "99999999999999999999Gi", "1 Gi"] {
            assert!(parse_size(bad).unwrap_err().contains("expected a size"), "{bad}");
        }
        assert!(parse_size("16Mi").unwrap_err().contains("at least 64Mi"));
    }
}
