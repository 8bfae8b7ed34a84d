//! reformer
