//! Login sessions: a CLI signed in inside a browser sandbox, its credentials
//! captured, sealed in the vault and delivered to the user's workspace.
//! (Owned by the login work; these hooks are what the rest of the app calls.)

use super::App;

#[derive(Debug, Default)]
pub struct LoginsState {}

impl App {
    /// After a restart: carry on with logins that were under way.
    pub(crate) async fn recover_logins(self: &std::sync::Arc<Self>) {}

    /// Called by the reaper on every round.
    pub(crate) async fn reap_logins(self: &std::sync::Arc<Self>) {}
}
