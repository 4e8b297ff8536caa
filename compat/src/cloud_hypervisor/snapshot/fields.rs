//! Reading typed fields out of the snapshot's JSON, each failure a [`SnapshotError`] that names
//! the file and the field.

use super::SnapshotError;
use serde_json::Value;
use std::path::Path;

pub(super) fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|e| SnapshotError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub(super) fn bad_field(path: &Path, field: String, expected: &'static str) -> SnapshotError {
    SnapshotError::BadField {
        path: path.to_path_buf(),
        field,
        expected,
    }
}

pub(super) fn req_u64(obj: &Value, key: &str, at: &str, path: &Path) -> Result<u64, SnapshotError> {
    obj.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad_field(path, format!("{at}.{key}"), "an unsigned integer"))
}

/// A field that may be missing or null (then `None`).
pub(super) fn opt_field<'v>(obj: &'v Value, key: &str) -> Option<&'v Value> {
    obj.get(key).filter(|v| !v.is_null())
}

pub(super) fn opt_bool(
    obj: &Value,
    key: &str,
    at: &str,
    path: &Path,
) -> Result<bool, SnapshotError> {
    match opt_field(obj, key) {
        None => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad_field(path, format!("{at}.{key}"), "a boolean")),
    }
}

pub(super) fn opt_u64(
    obj: &Value,
    key: &str,
    at: &str,
    path: &Path,
) -> Result<Option<u64>, SnapshotError> {
    match opt_field(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad_field(path, format!("{at}.{key}"), "an unsigned integer")),
    }
}
