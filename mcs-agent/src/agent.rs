//! The agent: its configuration, the loop that runs it, and the loop's
//! decisions as library code that runs without a kernel.
//!
//! [`run::Agent`] is the loop. What it decides is in modules of its own,
//! each with its inputs passed in (time) or behind a narrow trait (the
//! kernel), so its tests run in milliseconds: [`schedule`] (when to
//! reconcile, what a pass must do, whether the agent is stale), [`switch`]
//! (the order of a takeover from an earlier agent), [`passive`] (passive
//! health's tick) and [`discovery`] (interfaces found by pattern).
//! [`takeover`], [`sources`] and [`pass`] are the kernel's and the API's
//! side of it.

pub mod config;
pub mod control;
pub mod discovery;
pub mod error;
pub mod grow;
pub mod pass;
pub mod passive;
pub mod run;
pub mod schedule;
pub mod sources;
pub mod switch;
pub mod takeover;

pub use self::{config::Config, error::AgentError, run::Agent};
