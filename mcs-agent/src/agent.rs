//! The control loop's decisions, as library code that runs without a kernel.
//!
//! [`schedule`] decides when the loop reconciles, what a pass must do and
//! whether the agent is stale; time is passed in, so its tests run in
//! milliseconds. [`switch`] is the order of a takeover from an earlier
//! agent, with the kernel behind a trait. The loop that drives them still
//! lives in the binary.

pub mod config;
pub mod discovery;
pub mod error;
pub mod passive;
pub mod schedule;
pub mod switch;
pub mod takeover;
