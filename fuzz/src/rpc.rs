//! Harness for `rpc_request`: any bytes as one line for iscsitd's JSON-RPC
//! request parser (`crates/iscsitd/src/jsonrpc.rs`, included by path: it is
//! a pure module of a binary crate and needs only `serde_json`).
//!
//! Checks besides "no panic": every element is either a call (non-empty
//! method, object params, a string/number/null id or none) that reads back
//! the same after being written out again, or an error answer that is a
//! JSON-RPC 2.0 error with one of the codes a malformed request may get
//! (-32700, -32600, -32602) and a message; batches are non-empty and bounded.

#[path = "../../crates/iscsitd/src/jsonrpc.rs"]
#[allow(dead_code)]
mod jsonrpc;

use jsonrpc::{Item, Parsed};
use serde_json::{json, Value};

pub fn run(data: &[u8]) {
    let items = match jsonrpc::parse(data) {
        Parsed::One(i) => vec![i],
        Parsed::Batch(v) => {
            assert!(
                !v.is_empty() && v.len() <= jsonrpc::MAX_BATCH,
                "batch of {}",
                v.len()
            );
            v
        }
    };
    for item in items {
        match item {
            Item::Call(c) => {
                assert!(!c.method.is_empty());
                assert!(c.params.is_object());
                assert!(matches!(
                    c.id,
                    None | Some(Value::Null) | Some(Value::Number(_)) | Some(Value::String(_))
                ));
                let mut again = json!({"jsonrpc": "2.0", "method": c.method, "params": c.params});
                if let Some(id) = &c.id {
                    again["id"] = id.clone();
                }
                match jsonrpc::parse(again.to_string().as_bytes()) {
                    Parsed::One(Item::Call(b)) => {
                        assert_eq!(b.method, c.method);
                        assert_eq!(b.id.is_some(), c.id.is_some());
                        let keys = |v: &Value| {
                            v.as_object()
                                .map(|o| o.keys().cloned().collect::<Vec<_>>())
                                .unwrap_or_default()
                        };
                        assert_eq!(keys(&b.params), keys(&c.params));
                    }
                    other => panic!("a call written out again reads as {other:?}"),
                }
            }
            Item::Invalid(v) => {
                assert_eq!(v["jsonrpc"], "2.0");
                let code = v["error"]["code"].as_i64();
                assert!(
                    matches!(code, Some(-32700 | -32600 | -32602)),
                    "code {code:?}"
                );
                assert!(v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()));
                assert!(matches!(
                    v["id"],
                    Value::Null | Value::Number(_) | Value::String(_)
                ));
            }
        }
    }
}
