//! Tests of the node API and its client.
