//! Cross-crate tests and benchmarks live in tests/ and benches/.
