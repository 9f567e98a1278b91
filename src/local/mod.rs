//! (to be written)
pub mod expr;
