//! The `--json` output shared by every command that has it: exactly one JSON document on
//! stdout, with the schema version first; on failure `{"schema": 1, "ok": false, "error": ...}`
//! (the one-line error still goes to stderr). docs/usage.md describes each command's document.

use serde_json::{json, Value};

use crate::failure::{Failure, Result};

/// Version of the documents' layout. Fields are only ever added within a version.
pub const SCHEMA: u32 = 1;

/// Prints `doc` (an object) with `schema` and `ok: true` in front of its own fields.
pub fn print_ok(doc: Value) -> Result<()> {
    let mut out = serde_json::Map::new();
    out.insert("schema".into(), json!(SCHEMA));
    out.insert("ok".into(), json!(true));
    if let Value::Object(fields) = doc {
        out.extend(fields);
    }
    let text = serde_json::to_string_pretty(&Value::Object(out))
        .map_err(|e| Failure::op(format!("cannot encode the output as JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// The document printed for a command that failed.
pub fn failure(f: &Failure) -> String {
    let doc = json!({ "schema": SCHEMA, "ok": false, "error": f.message });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
