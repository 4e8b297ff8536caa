//! vmpager-client: what a VMM links to use `vmpagerd`.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

#[cfg(feature = "refvmm")]
pub mod refvmm;
