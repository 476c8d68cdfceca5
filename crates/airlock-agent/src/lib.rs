//! The in-guest agent of airlock sandboxes, as a library: the `airlock-agent`
//! binary is a thin dispatcher over it, and the integration tests drive its
//! server and the capture program in-process.

pub mod exec;
mod fw_cfg;
pub mod layout;
pub mod login;
pub mod metadata;
pub mod prepare;
pub mod privdrop;
pub mod process;
pub mod server;
pub mod session;
pub mod stream;
pub mod users;

/// Prints an error with every cause, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
