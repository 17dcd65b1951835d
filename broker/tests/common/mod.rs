//! Helpers shared by the broker integration tests.
#![allow(dead_code)]

pub mod storm;
