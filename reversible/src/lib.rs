//! reversible
