//! Rows of logins (owned by the logins work; its tables come from its own migration).
