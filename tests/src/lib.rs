//! Workspace-level scenarios live in `tests/*.rs` beside this crate.
