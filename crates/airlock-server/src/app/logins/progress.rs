//! Where a login in `starting` is: the step its task works at, and when each
//! step began. Held in memory only (it is progress, not state: the machine's
//! state is in the store; after a restart the resumed task marks its steps
//! again).

use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;

/// The steps of `starting`, in order; each has its own deadline and a
/// failure in it is named by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoginStep {
    /// The browser sandbox is made and boots.
    Sandbox,
    /// The sandbox is ready; its agent is asked to start the login command.
    Agent,
    /// The login command runs; it has drawn nothing yet.
    CliStart,
    /// It shows its prompts; not all are answered yet.
    Prompts,
    /// Waiting for its sign-in URL (one that passes the provider's rule).
    Url,
}

impl LoginStep {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginStep::Sandbox => "sandbox",
            LoginStep::Agent => "agent",
            LoginStep::CliStart => "cli_start",
            LoginStep::Prompts => "prompts",
            LoginStep::Url => "url",
        }
    }
}

impl From<airlock_proto::login::AgentStep> for LoginStep {
    fn from(s: airlock_proto::login::AgentStep) -> Self {
        use airlock_proto::login::AgentStep;
        match s {
            AgentStep::CliStart => LoginStep::CliStart,
            AgentStep::Prompts => LoginStep::Prompts,
            AgentStep::Url => LoginStep::Url,
        }
    }
}

/// A step and when it began (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub step: LoginStep,
    pub at_ms: i64,
}

/// The marks of every login whose task runs, by login id.
#[derive(Debug, Default)]
pub struct Progress {
    marks: Mutex<HashMap<String, Vec<Mark>>>,
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Mark>>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `step` begins now, unless the login is in it already. A step once
    /// left is not entered again (a repeated status does not move it back).
    pub fn enter(&self, id: &str, step: LoginStep, now_ms: i64) {
        let mut all = self.lock();
        let marks = all.entry(id.to_owned()).or_default();
        if marks.iter().any(|m| m.step == step) {
            return;
        }
        marks.push(Mark {
            step,
            at_ms: now_ms,
        });
    }

    /// The step the login is in, if its task marked one.
    pub fn current(&self, id: &str) -> Option<LoginStep> {
        self.lock().get(id).and_then(|m| m.last()).map(|m| m.step)
    }

    /// When the login entered `step`.
    pub fn since(&self, id: &str, step: LoginStep) -> Option<i64> {
        self.lock()
            .get(id)
            .and_then(|m| m.iter().find(|m| m.step == step))
            .map(|m| m.at_ms)
    }

    pub fn marks(&self, id: &str) -> Vec<Mark> {
        self.lock().get(id).cloned().unwrap_or_default()
    }

    /// The login's task ended.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_move_forward_only() {
        let p = Progress::default();
        assert_eq!(p.current("a"), None);
        p.enter("a", LoginStep::Sandbox, 1);
        p.enter("a", LoginStep::Agent, 5);
        p.enter("a", LoginStep::Agent, 9);
        p.enter("a", LoginStep::Url, 12);
        p.enter("a", LoginStep::Sandbox, 13);
        assert_eq!(p.current("a"), Some(LoginStep::Url));
        assert_eq!(p.since("a", LoginStep::Agent), Some(5));
        assert_eq!(p.marks("a").len(), 3);
        p.forget("a");
        assert!(p.marks("a").is_empty());
    }
}
