//! What a shared viewer may do, for as long as it is open: whether its input
//! reaches the guest (the owner may switch that while it watches), and when
//! it must close (the share was revoked or ran out). The owner's own viewers
//! have no gate.

use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

#[derive(Debug)]
pub struct ViewGate {
    input: AtomicBool,
    ended: watch::Sender<Option<String>>,
}

impl ViewGate {
    pub fn new(input: bool) -> ViewGate {
        ViewGate {
            input: AtomicBool::new(input),
            ended: watch::channel(None).0,
        }
    }

    /// Whether keys, pointer and clipboard text from this viewer reach the guest.
    pub fn input_allowed(&self) -> bool {
        self.input.load(Ordering::Relaxed)
    }

    pub fn set_input(&self, input: bool) {
        self.input.store(input, Ordering::Relaxed);
    }

    /// Close the viewer with this reason (the first reason given stays).
    pub fn end(&self, reason: &str) {
        self.ended.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.to_owned());
            true
        });
    }

    /// Resolves with the reason once the viewer must close.
    pub async fn ended(&self) -> String {
        let mut rx = self.ended.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The sender lives as long as `self`: unreachable, but never a panic.
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
}

/// Resolves when a gate says so; never without one.
pub async fn ended(gate: Option<&ViewGate>) -> String {
    match gate {
        Some(g) => g.ended().await,
        None => std::future::pending().await,
    }
}
