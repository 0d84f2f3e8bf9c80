//! What goes to the console: log lines, the report of a fault or panic, guest lines
//! assembled whole (`line`), per-VM rate limits (`limit`) and a UART transmitter that
//! drops instead of hanging (`tx`).

pub mod limit;
pub mod line;
pub mod logger;
pub mod report;
pub mod tx;
