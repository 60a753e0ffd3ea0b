//! The `microvm` substrate.

pub mod image;
