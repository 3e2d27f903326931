//! vLLM's structured-output fields: `guided_json`, `guided_regex`, `guided_choice`,
//! `guided_grammar` and their newer form `structured_outputs` (`{"json" | "regex" | "choice" |
//! "grammar" | "json_object": ...}`), read into the [`Structure`] a grammar forces the answer to.

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::constraint::Structure;
use crate::engine::gbnf;

/// The structured-output fields of a request (chat or completion).
#[derive(Debug, Default, Deserialize)]
pub struct StructuredFields {
    /// A JSON Schema (an object, or its JSON text) the answer must match.
    #[serde(default)]
    guided_json: Option<Value>,
    /// A regular expression the whole answer must match.
    #[serde(default)]
    guided_regex: Option<Value>,
    /// The answer is exactly one of these strings.
    #[serde(default)]
    guided_choice: Option<Value>,
    /// A grammar in Lark syntax (llguidance's dialect, as vLLM's `guidance` backend takes it) or
    /// in llama.cpp's GBNF (as its xgrammar backend and llama.cpp's server take it).
    #[serde(default)]
    guided_grammar: Option<Value>,
    /// vLLM's newer form of the four above (and `json_object`).
    #[serde(default)]
    structured_outputs: Option<Value>,
}

/// Keys of `structured_outputs` that only tune how a backend searches, not what it accepts.
const TUNING_KEYS: [&str; 2] = ["disable_fallback", "disable_any_whitespace"];

impl StructuredFields {
    /// The structure the request forces its answer to, with the field that asked for it; an
    /// error naming the field when a value is malformed or two fields ask at once.
    pub fn structure(&self) -> Result<Option<(Structure, &'static str)>, ApiError> {
        let set = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
        let mut found: Vec<(Structure, &'static str)> = Vec::new();
        if let Some(v) = set(&self.guided_json) {
            found.push((json_schema("guided_json", v)?, "guided_json"));
        }
        if let Some(v) = set(&self.guided_regex) {
            found.push((Structure::Regex(text("guided_regex", v)?), "guided_regex"));
        }
        if let Some(v) = set(&self.guided_choice) {
            found.push((choice("guided_choice", v)?, "guided_choice"));
        }
        if let Some(v) = set(&self.guided_grammar) {
            found.push((grammar("guided_grammar", v)?, "guided_grammar"));
        }
        if let Some(v) = set(&self.structured_outputs) {
            if let Some(s) = structured_outputs(v)? {
                found.push((s, "structured_outputs"));
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(bad(
                found[1].1,
                format!("`{}` and `{}` both constrain the answer: send one", found[0].1, found[1].1),
            )),
        }
    }
}

fn bad(field: &'static str, msg: String) -> ApiError {
    ApiError::bad_request(msg, Some(field))
}

/// A JSON Schema given as an object, a boolean, or its JSON text (vLLM takes both).
fn json_schema(field: &'static str, v: Value) -> Result<Structure, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| bad(field, format!("`{field}` is a string that is not a JSON Schema's JSON text: {e}")))?,
        other => other,
    };
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(Structure::JsonSchema(schema)),
        other => Err(bad(field, format!("`{field}` must be a JSON Schema (an object), got {other}"))),
    }
}

fn text(field: &'static str, v: Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s),
        other => Err(bad(field, format!("`{field}` must be a non-empty string, got {other}"))),
    }
}

/// A grammar's text: GBNF (a line `name ::= ...`) rewritten into Lark, else Lark as given.
fn grammar(field: &'static str, v: Value) -> Result<Structure, ApiError> {
    let text = text(field, v)?;
    if !gbnf::looks_like_gbnf(&text) {
        return Ok(Structure::Lark(text));
    }
    gbnf::to_lark(&text).map(Structure::Lark).map_err(|e| bad(field, format!("`{field}`: {e:#}")))
}

fn choice(field: &'static str, v: Value) -> Result<Structure, ApiError> {
    let choices: Option<Vec<String>> =
        v.as_array().map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect());
    match choices {
        Some(c) if !c.is_empty() && c.len() == v.as_array().map_or(0, Vec::len) => Ok(Structure::Choice(c)),
        _ => Err(bad(field, format!("`{field}` must be a non-empty list of strings, got {v}"))),
    }
}

/// `structured_outputs`: one of `json`, `regex`, `choice`, `grammar` or `json_object: true`,
/// besides the search-tuning keys; `None` when it asks for nothing.
fn structured_outputs(v: Value) -> Result<Option<Structure>, ApiError> {
    const FIELD: &str = "structured_outputs";
    let Value::Object(o) = v else {
        return Err(bad(FIELD, format!("`{FIELD}` must be an object, got {v}")));
    };
    let mut found = Vec::new();
    for (key, value) in o {
        if value.is_null() || TUNING_KEYS.contains(&key.as_str()) {
            continue;
        }
        let s = match key.as_str() {
            "json" => json_schema(FIELD, value)?,
            "regex" => Structure::Regex(text(FIELD, value)?),
            "choice" => choice(FIELD, value)?,
            "grammar" => grammar(FIELD, value)?,
            "json_object" if value == Value::Bool(false) => continue,
            "json_object" if value == Value::Bool(true) => Structure::JsonSchema(serde_json::json!({"type": "object"})),
            other => {
                let msg = format!(
                    "`{FIELD}.{other}` is not supported (json, regex, choice, grammar, json_object; {})",
                    TUNING_KEYS.join(", ")
                );
                return Err(bad(FIELD, msg));
            }
        };
        found.push((key, s));
    }
    match found.len() {
        0 | 1 => Ok(found.pop().map(|(_, s)| s)),
        _ => Err(bad(FIELD, format!("`{FIELD}` sets both `{}` and `{}`: send one", found[0].0, found[1].0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> Result<Option<(Structure, &'static str)>, ApiError> {
        serde_json::from_str::<StructuredFields>(body).unwrap().structure()
    }

    fn message(body: &str) -> String {
        read(body).err().unwrap_or_else(|| panic!("{body} accepted")).message
    }

    #[test]
    fn each_field_reads_as_vllm_reads_it() {
        let schema = serde_json::json!({"type": "object"});
        assert_eq!(read("{}").unwrap(), None);
        assert_eq!(read(r#"{"guided_json": null, "structured_outputs": {}}"#).unwrap(), None);
        let want = Some((Structure::JsonSchema(schema.clone()), "guided_json"));
        assert_eq!(read(r#"{"guided_json": {"type": "object"}}"#).unwrap(), want);
        assert_eq!(read(r#"{"guided_json": "{\"type\": \"object\"}"}"#).unwrap(), want);
        let regex = Some((Structure::Regex("[0-9]+".into()), "guided_regex"));
        assert_eq!(read(r#"{"guided_regex": "[0-9]+"}"#).unwrap(), regex);
        let choice = Structure::Choice(vec!["yes".into(), "no".into()]);
        assert_eq!(read(r#"{"guided_choice": ["yes", "no"]}"#).unwrap(), Some((choice.clone(), "guided_choice")));
        let lark = Structure::Lark("start: \"a\"".into());
        assert_eq!(read(r#"{"guided_grammar": "start: \"a\""}"#).unwrap(), Some((lark.clone(), "guided_grammar")));
        // GBNF (llama.cpp's, vLLM's xgrammar's) is rewritten into Lark.
        let gbnf = Structure::Lark(gbnf::to_lark("root ::= [0-9]+").unwrap());
        assert_eq!(read(r#"{"guided_grammar": "root ::= [0-9]+"}"#).unwrap(), Some((gbnf, "guided_grammar")));
        for (body, want) in [
            (
                r#"{"structured_outputs": {"json": {"type": "object"}, "disable_fallback": true}}"#,
                Structure::JsonSchema(schema.clone()),
            ),
            (r#"{"structured_outputs": {"json_object": true}}"#, Structure::JsonSchema(schema)),
            (r#"{"structured_outputs": {"regex": "[0-9]+", "choice": null}}"#, Structure::Regex("[0-9]+".into())),
            (r#"{"structured_outputs": {"choice": ["yes", "no"]}}"#, choice),
            (r#"{"structured_outputs": {"grammar": "start: \"a\""}}"#, lark),
        ] {
            assert_eq!(read(body).unwrap(), Some((want, "structured_outputs")), "{body}");
        }
    }

    #[test]
    fn malformed_or_conflicting_fields_are_refused_by_name() {
        for (body, words) in [
            (r#"{"guided_json": 3}"#, vec!["guided_json", "JSON Schema"]),
            (r#"{"guided_json": "{not json"}"#, vec!["guided_json", "JSON text"]),
            (r#"{"guided_regex": ""}"#, vec!["guided_regex", "non-empty string"]),
            (r#"{"guided_choice": []}"#, vec!["guided_choice", "non-empty list"]),
            (r#"{"guided_choice": ["a", 1]}"#, vec!["guided_choice", "list of strings"]),
            (r#"{"guided_grammar": {"x": 1}}"#, vec!["guided_grammar"]),
            (r#"{"guided_regex": "a", "guided_choice": ["a"]}"#, vec!["guided_regex", "guided_choice", "send one"]),
            (r#"{"structured_outputs": {"structural_tag": "x"}}"#, vec!["structured_outputs.structural_tag"]),
            (r#"{"structured_outputs": {"regex": "a", "choice": ["a"]}}"#, vec!["sets both"]),
            (r#"{"structured_outputs": [1]}"#, vec!["must be an object"]),
            (
                r#"{"guided_grammar": "root ::= \"a\" <[12]>"}"#,
                vec!["guided_grammar", "GBNF line 1", "token references"],
            ),
            (r#"{"structured_outputs": {"grammar": "item ::= \"a\""}}"#, vec!["structured_outputs", "no `root` rule"]),
        ] {
            let m = message(body);
            assert!(words.iter().all(|w| m.contains(w)), "{body}: {m}");
        }
    }
}
