//! Runnable programs showing `bus` in use: see the files beside this crate.
