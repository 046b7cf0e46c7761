//! A client for etcd's v3 JSON gateway (`POST /v3/...` on the client port; etcd 3.4): ranges,
//! puts, deletes, transactions and leases, which is all the agent and the service commands
//! need. Keys and values travel base64-encoded; 64-bit numbers come back as strings.
//!
//! Several endpoints may be given: a call goes to the one that answered last and, when that one
//! fails (refused, timed out, not a 200), to the next, once round. etcd's own consensus makes
//! any member's answer good: a member cut off from the majority fails the call rather than
//! answer stale data for writes and linearizable reads (the gateway's default).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::http::{b64_decode, b64_encode, post};

/// One key as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// The endpoints of one etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    /// Per request and endpoint, in milliseconds.
    timeout_ms: AtomicU64,
    current: AtomicUsize,
}

impl Etcd {
    /// `urls`: comma-separated `http://HOST:PORT`; `timeout`: per request and endpoint.
    pub fn new(urls: &str, timeout: Duration) -> Result<Etcd, String> {
        let endpoints: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err("no etcd endpoint given (--etcd URL[,URL..] or SNAPSHIM_ETCD)".into());
        }
        if let Some(bad) = endpoints.iter().find(|u| !u.starts_with("http://")) {
            return Err(format!(
                "etcd endpoint {bad:?}: only http://HOST:PORT endpoints are supported"
            ));
        }
        Ok(Etcd {
            endpoints,
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            current: AtomicUsize::new(0),
        })
    }

    /// The same endpoints with another per-request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Etcd {
        Etcd {
            endpoints: self.endpoints.clone(),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            current: AtomicUsize::new(self.current.load(Ordering::Relaxed)),
        }
    }

    /// Changes the per-request timeout of this client (the agent's loop keeps it within the
    /// shortest service TTL it serves).
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// POSTs `body` to `path`, trying each endpoint in turn from the last good one.
    fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        let body = body.to_string();
        let first = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let n = (first + i) % self.endpoints.len();
            let ep = &self.endpoints[n];
            match post(ep, path, &body, self.timeout()) {
                Ok(text) => {
                    self.current.store(n, Ordering::Relaxed);
                    return serde_json::from_str(&text)
                        .map_err(|e| format!("etcd {ep}{path}: unreadable answer: {e}"));
                }
                Err(e) => errors.push(format!("{ep}: {e}")),
            }
        }
        Err(format!("etcd {path} failed: {}", errors.join("; ")))
    }

    /// Every key that starts with `prefix`, in key order.
    pub fn prefix(&self, prefix: &str) -> Result<Vec<Kv>, String> {
        let body = json!({ "key": b64(prefix), "range_end": b64_bytes(&prefix_end(prefix)) });
        Ok(kvs(&self.call("/v3/kv/range", body)?))
    }

    /// Puts `value` at `key`, on `lease` (0: none).
    pub fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), String> {
        self.call("/v3/kv/put", op_put_body(key, value, lease))
            .map(drop)
    }

    /// Deletes every key under `prefix` (or just `prefix` with `whole_prefix` false).
    pub fn delete(&self, key: &str, whole_prefix: bool) -> Result<(), String> {
        let mut body = json!({ "key": b64(key) });
        if whole_prefix {
            body["range_end"] = json!(b64_bytes(&prefix_end(key)));
        }
        self.call("/v3/kv/deleterange", body).map(drop)
    }

    /// Runs `success` if every comparison holds; says whether it did.
    pub fn txn(&self, compare: Vec<Value>, success: Vec<Value>) -> Result<bool, String> {
        let v = self.call(
            "/v3/kv/txn",
            json!({ "compare": compare, "success": success }),
        )?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    /// A new lease of `ttl` seconds: its ID and the TTL etcd granted.
    pub fn grant(&self, ttl: i64) -> Result<(i64, i64), String> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl }))?;
        let id = int(&v["ID"]);
        if id == 0 {
            return Err(format!("etcd granted no lease: {}", v["error"]));
        }
        Ok((id, int(&v["TTL"])))
    }

    /// Renews lease `id`; returns its TTL, 0 when it no longer exists (expired or revoked).
    pub fn keepalive(&self, id: i64) -> Result<i64, String> {
        let v = self.call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))?;
        if !v["error"].is_null() {
            return Err(format!("etcd keepalive: {}", v["error"]));
        }
        Ok(int(&v["result"]["TTL"]))
    }

    /// Ends lease `id` and deletes its keys.
    pub fn revoke(&self, id: i64) -> Result<(), String> {
        self.call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .map(drop)
    }
}

/// Compare: `key` does not exist.
pub fn absent(key: &str) -> Value {
    json!({ "key": b64(key), "target": "CREATE", "create_revision": "0" })
}

/// Compare: `key` was last modified at `revision` (it is unchanged since read).
pub fn unchanged(key: &str, revision: i64) -> Value {
    json!({ "key": b64(key), "target": "MOD", "mod_revision": revision.to_string() })
}

/// Operation: put.
pub fn op_put(key: &str, value: &str, lease: i64) -> Value {
    json!({ "request_put": op_put_body(key, value, lease) })
}

/// Operation: delete one key.
pub fn op_delete(key: &str) -> Value {
    json!({ "request_delete_range": { "key": b64(key) } })
}

/// Operation: delete every key under `prefix` but `keep` (a transaction may not touch one key
/// twice, so a put of `keep` can go with it).
pub fn op_delete_prefix_but(prefix: &str, keep: &str) -> [Value; 2] {
    let mut after = keep.as_bytes().to_vec();
    after.push(0);
    let range = |from: &[u8], to: &[u8]| json!({ "request_delete_range": { "key": b64_bytes(from), "range_end": b64_bytes(to) } });
    [
        range(prefix.as_bytes(), keep.as_bytes()),
        range(&after, &prefix_end(prefix)),
    ]
}

fn op_put_body(key: &str, value: &str, lease: i64) -> Value {
    let mut body = json!({ "key": b64(key), "value": b64(value) });
    if lease != 0 {
        body["lease"] = json!(lease.to_string());
    }
    body
}

fn b64(s: &str) -> String {
    b64_encode(s.as_bytes())
}

fn b64_bytes(b: &[u8]) -> String {
    b64_encode(b)
}

/// The first key after every key starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A 64-bit number the gateway sends as a string (or, from some versions, as a number).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kvs(v: &Value) -> Vec<Kv> {
    let Some(list) = v["kvs"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|kv| {
            let key = b64_decode(kv["key"].as_str()?).ok()?;
            let value = b64_decode(kv["value"].as_str().unwrap_or("")).ok()?;
            Some(Kv {
                key: String::from_utf8_lossy(&key).into_owned(),
                value,
                mod_revision: int(&kv["mod_revision"]),
                lease: int(&kv["lease"]),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0");
        assert_eq!(prefix_end("a"), b"b");
    }

    #[test]
    fn ranges_are_decoded() {
        let v: Value = serde_json::from_str(
            r#"{"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"7",
                "version":"1","value":"Yg==","lease":"42"}],"count":"1"}"#,
        )
        .unwrap();
        let got = kvs(&v);
        assert_eq!(
            got,
            [Kv {
                key: "a".into(),
                value: b"b".to_vec(),
                mod_revision: 7,
                lease: 42
            }]
        );
        assert!(kvs(&json!({})).is_empty());
    }

    #[test]
    fn endpoints_must_be_http() {
        assert!(Etcd::new("", Duration::from_secs(1)).is_err());
        assert!(Etcd::new("https://x:1", Duration::from_secs(1)).is_err());
        assert!(Etcd::new("http://a:1, http://b:2", Duration::from_secs(1)).is_ok());
    }
}
