//! Rows of egress (owned by the egress work; its tables come from its own migration).
