//! What goes to the console: log lines, and the report of a fault or panic.

pub mod logger;
pub mod report;
