//! The scaffolding `itadm` and `stmfadm` share: the options every tool
//! takes, and the shape of one invocation — one verb, one call, its answer
//! printed as text or, with `--json`, as the daemon gave it.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;

use crate::{call, print_json, run, Failure, DEFAULT_SOCKET};

/// The options every tool takes (flatten into the tool's parser).
#[derive(clap::Args)]
pub struct Global {
    /// iscsitd's administration socket.
    #[arg(long, global = true, env = "IRONSTAR_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's answer as JSON (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

/// How a verb prints its answer as text.
pub type Show = Box<dyn Fn(&Value)>;

/// Prints nothing: for verbs whose success needs no words.
pub fn quiet() -> Show {
    Box::new(|_| {})
}

/// One call to the daemon: a method and its parameters.
pub type Call<'a> = &'a dyn Fn(&str, Value) -> Result<Value, Failure>;

/// Runs one invocation of `prog`: `verb` makes its call(s) through the
/// given [`Call`] and says how to show the answer; `--json` prints the
/// answer instead. Errors are one line and a non-zero exit ([`run`]).
pub fn run_verb(
    prog: &str,
    global: &Global,
    verb: impl FnOnce(Call) -> Result<(Value, Show), Failure>,
) -> ExitCode {
    run(prog, || {
        let c = |m: &str, p: Value| call(&global.socket, m, p);
        let (result, show) = verb(&c)?;
        if global.json {
            print_json(&result);
        } else {
            show(&result);
        }
        Ok(())
    })
}

/// The elements of an array answer (none if it is not one).
pub fn arr(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// The elements of the array at `key` of an object answer (none if absent).
pub fn arr_at(v: &Value, key: &str) -> Vec<Value> {
    v.get(key).map(arr).unwrap_or_default()
}
