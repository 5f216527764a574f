//! JSON-RPC 2.0 request parsing, as a pure function: one line of bytes in,
//! the calls it holds (or the error answers it deserves) out. No I/O and no
//! daemon state, so the fuzz target (`fuzz/src/rpc.rs`, which includes this
//! file by path) and the unit tests drive exactly what the socket server
//! runs. Depends on `serde_json` only.

use serde_json::{json, Map, Value};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// A refused change or a failed operation (the message says why).
pub const REFUSED: i64 = -32000;

/// Most requests one batch may hold.
pub const MAX_BATCH: usize = 256;

/// One well-formed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// None: a notification (executed, never answered).
    pub id: Option<Value>,
    pub method: String,
    /// Always an object (absent or null params become `{}`).
    pub params: Value,
}

/// One element of a request: a call to make, or the error answer for an
/// element that is not a valid request.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Call(Call),
    Invalid(Value),
}

/// What a line holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    One(Item),
    /// A batch; its answer is the array of its calls' answers.
    Batch(Vec<Item>),
}

/// An error answer.
pub fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// A success answer.
pub fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// Parses one request line (a request object or a batch array).
pub fn parse(line: &[u8]) -> Parsed {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Parsed::One(Item::Invalid(error(
                Value::Null,
                PARSE_ERROR,
                &format!("parse error: {e}"),
            )))
        }
    };
    match v {
        Value::Array(items) if items.is_empty() => Parsed::One(Item::Invalid(error(
            Value::Null,
            INVALID_REQUEST,
            "empty batch",
        ))),
        Value::Array(items) if items.len() > MAX_BATCH => Parsed::One(Item::Invalid(error(
            Value::Null,
            INVALID_REQUEST,
            &format!("a batch of {} requests; at most {MAX_BATCH}", items.len()),
        ))),
        Value::Array(items) => Parsed::Batch(items.into_iter().map(item).collect()),
        other => Parsed::One(item(other)),
    }
}

fn item(v: Value) -> Item {
    let Value::Object(mut req) = v else {
        return Item::Invalid(error(
            Value::Null,
            INVALID_REQUEST,
            "a request is an object",
        ));
    };
    let id = req.remove("id");
    let id_ok = matches!(
        id,
        None | Some(Value::Null) | Some(Value::Number(_)) | Some(Value::String(_))
    );
    // An id we cannot echo is answered with null.
    let reply_id = match &id {
        Some(i) if id_ok => i.clone(),
        _ => Value::Null,
    };
    if !id_ok {
        return Item::Invalid(error(
            reply_id,
            INVALID_REQUEST,
            "id must be a string, a number or null",
        ));
    }
    match req.get("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        Some(_) => {
            return Item::Invalid(error(reply_id, INVALID_REQUEST, "jsonrpc must be \"2.0\""))
        }
        None => {
            return Item::Invalid(error(
                reply_id,
                INVALID_REQUEST,
                "not a JSON-RPC 2.0 request (no \"jsonrpc\": \"2.0\")",
            ))
        }
    }
    let method = match req.remove("method") {
        Some(Value::String(m)) if !m.is_empty() => m,
        Some(Value::String(_)) => {
            return Item::Invalid(error(reply_id, INVALID_REQUEST, "method is empty"))
        }
        Some(_) => {
            return Item::Invalid(error(reply_id, INVALID_REQUEST, "method must be a string"))
        }
        None => return Item::Invalid(error(reply_id, INVALID_REQUEST, "no method")),
    };
    let params = match req.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Item::Invalid(error(
                reply_id,
                INVALID_PARAMS,
                "params must be an object of name: value",
            ))
        }
    };
    Item::Call(Call { id, method, params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(p: &Parsed) -> Option<i64> {
        match p {
            Parsed::One(Item::Invalid(v)) => v["error"]["code"].as_i64(),
            _ => None,
        }
    }

    #[test]
    fn a_request_becomes_a_call_with_object_params() {
        let p = parse(br#"{"jsonrpc":"2.0","id":1,"method":"list-lu"}"#);
        let Parsed::One(Item::Call(c)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(c.id, Some(json!(1)));
        assert_eq!(c.method, "list-lu");
        assert_eq!(c.params, json!({}));
        let p = parse(br#"{"jsonrpc":"2.0","method":"x","params":{"a":1}}"#);
        assert!(matches!(p, Parsed::One(Item::Call(Call { id: None, .. }))));
    }

    #[test]
    fn each_malformation_gets_its_error_code() {
        for (line, want) in [
            (&b"{not json"[..], PARSE_ERROR),
            (b"\xff\xfe", PARSE_ERROR),
            (b"[]", INVALID_REQUEST),
            (b"5", INVALID_REQUEST),
            (br#"{"jsonrpc":"1.0","id":1,"method":"m"}"#, INVALID_REQUEST),
            (br#"{"id":1,"method":"m"}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"method":7}"#, INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1,"method":""}"#, INVALID_REQUEST),
            (
                br#"{"jsonrpc":"2.0","id":[1],"method":"m"}"#,
                INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"m","params":[1]}"#,
                INVALID_PARAMS,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"m","params":"x"}"#,
                INVALID_PARAMS,
            ),
        ] {
            assert_eq!(
                code(&parse(line)),
                Some(want),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn errors_echo_a_usable_id_only() {
        let Parsed::One(Item::Invalid(v)) = parse(br#"{"jsonrpc":"1","id":"x","method":"m"}"#)
        else {
            panic!()
        };
        assert_eq!(v["id"], json!("x"));
        let Parsed::One(Item::Invalid(v)) = parse(br#"{"jsonrpc":"2.0","id":{},"method":"m"}"#)
        else {
            panic!()
        };
        assert_eq!(v["id"], Value::Null);
    }

    #[test]
    fn batches_mix_calls_and_errors_and_are_bounded() {
        let Parsed::Batch(items) =
            parse(br#"[{"jsonrpc":"2.0","id":1,"method":"a"}, 3, {"jsonrpc":"2.0","method":"b"}]"#)
        else {
            panic!()
        };
        assert_eq!(items.len(), 3);
        assert!(matches!(items[0], Item::Call(_)));
        assert!(matches!(items[1], Item::Invalid(_)));
        let big = format!("[{}]", vec!["1"; MAX_BATCH + 1].join(","));
        assert_eq!(code(&parse(big.as_bytes())), Some(INVALID_REQUEST));
    }

    #[test]
    fn deep_nesting_is_a_parse_error_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code(&parse(deep.as_bytes())), Some(PARSE_ERROR));
    }
}
