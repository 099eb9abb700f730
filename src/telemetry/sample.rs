//! Which transactions get a span: the OpenTelemetry SDK samplers, configured by
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` as the SDK environment specification says.
//!
//! The default is `parentbased_always_on`: an agent's `traceparent` with the sampled flag off
//! means no span (and the header goes upstream as the agent sent it); without one, every
//! transaction is sampled. A refused request is decided the same way.

/// A sampler of the specification (`jaeger_remote`, `xray` and other remote samplers are not
/// built in: keyswap refuses them at start, naming the variable).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Samples this fraction of trace ids (0.0–1.0), by the trace id: the same trace id gets the
    /// same decision in every process that uses the same rule.
    TraceIdRatio(f64),
    /// Follows the remote parent's sampled flag; roots get the inner sampler.
    ParentBased(Root),
}

/// The root sampler of a parent-based sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::ParentBased(Root::AlwaysOn)
    }
}

impl Sampler {
    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`; a value it cannot use is an
    /// error naming the variable (keyswap does not start with a sampler it would misread).
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Sampler, String> {
        let name = env("OTEL_TRACES_SAMPLER").map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty());
        let ratio = || -> Result<f64, String> {
            match env("OTEL_TRACES_SAMPLER_ARG").map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
                None => Ok(1.0),
                Some(v) => match v.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(format!("OTEL_TRACES_SAMPLER_ARG={v}: a ratio from 0 to 1")),
                },
            }
        };
        Ok(match name.as_deref() {
            None | Some("parentbased_always_on") => Sampler::ParentBased(Root::AlwaysOn),
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("traceidratio") => Sampler::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => Sampler::ParentBased(Root::AlwaysOff),
            Some("parentbased_traceidratio") => Sampler::ParentBased(Root::TraceIdRatio(ratio()?)),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other}: keyswap knows always_on, always_off, traceidratio, \
                     parentbased_always_on (the default), parentbased_always_off, parentbased_traceidratio"
                ))
            }
        })
    }

    /// Whether a transaction is sampled. `parent`: the agent's `traceparent`, parsed (trace id,
    /// flags); `fresh`: the trace id a root span would get.
    pub fn sampled(&self, parent: Option<([u8; 16], u8)>, fresh: impl FnOnce() -> [u8; 16]) -> bool {
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(r) => ratio_sampled(&parent.map_or_else(fresh, |(t, _)| t), r),
            Sampler::ParentBased(root) => match parent {
                Some((_, flags)) => flags & 1 == 1,
                None => match root {
                    Root::AlwaysOn => true,
                    Root::AlwaysOff => false,
                    Root::TraceIdRatio(r) => ratio_sampled(&fresh(), r),
                },
            },
        }
    }
}

/// The specification's rule: the trace id's last 8 bytes, as a number, below `ratio` × 2^64.
fn ratio_sampled(trace_id: &[u8; 16], ratio: f64) -> bool {
    let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
    if ratio >= 1.0 {
        return true;
    }
    (low as f64) < ratio * (u64::MAX as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_standard_variables_choose_the_sampler() {
        assert_eq!(Sampler::from_env(env(&[])), Ok(Sampler::ParentBased(Root::AlwaysOn)));
        assert_eq!(Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "always_off")])), Ok(Sampler::AlwaysOff));
        assert_eq!(
            Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.25")])),
            Ok(Sampler::TraceIdRatio(0.25))
        );
        assert_eq!(
            Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")])),
            Ok(Sampler::ParentBased(Root::TraceIdRatio(1.0)))
        );
        let e = Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "2")]));
        assert!(e.unwrap_err().contains("OTEL_TRACES_SAMPLER_ARG=2"));
        assert!(Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")])).is_err());
    }

    #[test]
    fn parent_based_follows_the_sampled_flag_and_ratios_decide_by_trace_id() {
        let s = Sampler::default();
        assert!(!s.sampled(Some(([7; 16], 0)), || unreachable!()));
        assert!(s.sampled(Some(([7; 16], 1)), || unreachable!()));
        assert!(s.sampled(None, || [1; 16]));
        assert!(!Sampler::AlwaysOff.sampled(Some(([7; 16], 1)), || [1; 16]));
        // always_on traces an agent that asks not to be sampled (docs/security.md).
        assert!(Sampler::AlwaysOn.sampled(Some(([7; 16], 0)), || [1; 16]));
        // The same trace id, the same decision; about a quarter of random ids.
        let r = Sampler::TraceIdRatio(0.25);
        let mut low = [0u8; 16];
        low[8..].copy_from_slice(&(u64::MAX / 8).to_be_bytes());
        let mut high = [0u8; 16];
        high[8..].copy_from_slice(&(u64::MAX / 2).to_be_bytes());
        assert!(r.sampled(Some((low, 0)), || unreachable!()));
        assert!(!r.sampled(Some((high, 1)), || unreachable!()));
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let n = (0..10_000)
            .filter(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&state.to_be_bytes());
                r.sampled(None, || id)
            })
            .count();
        assert!((2_250..2_750).contains(&n), "{n} of 10,000 sampled at 0.25");
    }
}
