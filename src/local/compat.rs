//! The names the engine uses from the expression evaluator ([`crate::local::expr`]) and from
//! [`crate::period`], in one place.

pub use crate::local::expr::{evaluate, Scope};
pub use crate::period::{format_datetime, parse_datetime, Period, Schedule};
