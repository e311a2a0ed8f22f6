//! Observation of a proxied request: the [`Recorder`] holds its telemetry state from arrival to
//! the one report at its end, and [`TimedBody`] feeds it each response frame as the frame is
//! handed to the client. Nothing here changes a byte of what the client receives.

mod body;
mod layer;
mod recorder;

pub use body::{IdleTimeout, TimedBody};
pub use layer::Observer;
pub use recorder::{Ending, Feedback, Recorder};

#[cfg(test)]
mod tests;
