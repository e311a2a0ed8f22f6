//! Fault injection: the `x-tokentap-sim-fault` header and the `[faults]` rates.

use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;

use super::config::FaultRates;

/// Name of the request header that injects faults.
pub const FAULT_HEADER: &str = "x-tokentap-sim-fault";

/// The faults applied to one request. Token positions count tokens per choice (decode steps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Answer with this status and an OpenAI-style error body instead of generating.
    pub status: Option<u16>,
    /// Send an in-band error event (then `[DONE]`) where token N would have been sent.
    pub error_after: Option<u32>,
    /// Abort the connection where token N would have been sent.
    pub disconnect_after: Option<u32>,
    /// Pause `stall` before token N.
    pub stall_after: Option<u32>,
    /// Length of the pause of `stall_after`.
    pub stall: Duration,
    /// Delay the response headers by this much (generation starts after it).
    pub header_delay: Duration,
}

/// A header value the grammar does not accept.
#[derive(Debug, thiserror::Error)]
#[error("invalid {FAULT_HEADER} header: {0}")]
pub struct FaultParseError(String);

impl Faults {
    /// Parses `key=value[,key=value]...` (spaces allowed around items). Keys: `status`
    /// (400–599), `error_after`, `disconnect_after`, `stall_after` (token counts), `stall_ms`,
    /// `header_delay_ms` (milliseconds). `stall_after` without `stall_ms` stalls 1000 ms.
    pub fn parse(value: &str) -> Result<Faults, FaultParseError> {
        let mut faults = Faults::default();
        let mut stall_ms = None;
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| FaultParseError(format!("`{item}` is not key=value")))?;
            let (key, val) = (key.trim(), val.trim());
            let number = |max: u64| -> Result<u64, FaultParseError> {
                match val.parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(FaultParseError(format!(
                        "`{key}` needs a whole number up to {max}, got `{val}`"
                    ))),
                }
            };
            match key {
                "status" => {
                    let code = number(599)?;
                    if code < 400 {
                        return Err(FaultParseError(format!(
                            "`status` must be 400..=599, got {code}"
                        )));
                    }
                    faults.status = Some(code as u16);
                }
                "error_after" => faults.error_after = Some(number(u32::MAX.into())? as u32),
                "disconnect_after" => {
                    faults.disconnect_after = Some(number(u32::MAX.into())? as u32)
                }
                "stall_after" => faults.stall_after = Some(number(u32::MAX.into())? as u32),
                "stall_ms" => stall_ms = Some(number(86_400_000)?),
                "header_delay_ms" => {
                    faults.header_delay = Duration::from_millis(number(86_400_000)?)
                }
                other => {
                    return Err(FaultParseError(format!(
                        "unknown key `{other}` (expected status, error_after, disconnect_after, \
                         stall_after, stall_ms, header_delay_ms)"
                    )));
                }
            }
        }
        if let Some(ms) = stall_ms {
            faults.stall = Duration::from_millis(ms);
            faults.stall_after.get_or_insert(0);
        } else if faults.stall_after.is_some() {
            faults.stall = Duration::from_millis(1000);
        }
        Ok(faults)
    }

    /// Draws faults from the configured rates. `tokens` is the longest output of the request;
    /// token positions are uniform in `0..tokens`. Always makes the same number of draws.
    pub(crate) fn draw(rates: &FaultRates, tokens: u32, rng: &mut SmallRng) -> Faults {
        let mut faults = Faults::default();
        let u: f64 = rng.random();
        if u < rates.rate_429 {
            faults.status = Some(429);
        } else if u < rates.rate_429 + rates.rate_500 {
            faults.status = Some(500);
        } else if u < rates.rate_429 + rates.rate_500 + rates.rate_503 {
            faults.status = Some(503);
        }
        let tokens = tokens.max(1);
        let position = |rate: f64, rng: &mut SmallRng| {
            let hit = rng.random_bool(rate);
            let at = rng.random_range(0..tokens);
            hit.then_some(at)
        };
        faults.error_after = position(rates.rate_error, rng);
        faults.disconnect_after = position(rates.rate_disconnect, rng);
        faults.stall_after = position(rates.rate_stall, rng);
        faults.stall = Duration::from_millis(rates.stall_ms);
        if rng.random_bool(rates.rate_header_delay) {
            faults.header_delay = Duration::from_millis(rates.header_delay_ms);
        }
        faults
    }
}
