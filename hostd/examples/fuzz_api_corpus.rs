//! Writes the `host_api` fuzz target's seed corpus and dictionary from the API's own OpenAPI document: a seed
//! per route and caller, with a body made from the request schema's required fields (strings take their
//! enum's first value, numbers 1), and the dictionary of every path segment, property name and enum value.
//!
//! `cargo run -p portholed --example fuzz_api_corpus -- fuzz` (the fuzz crate's directory).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Map, Value, json};

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap_or(schema),
        None => schema,
    }
}

/// The smallest value `schema` accepts, as far as a seed needs it (depth-limited: schemas nest).
fn example(doc: &Value, schema: &Value, depth: u32) -> Value {
    let schema = resolve(doc, schema);
    if depth > 6 {
        return Value::Null;
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(first) = schema.get(key).and_then(Value::as_array).and_then(|a| a.first()) {
            return example(doc, first, depth + 1);
        }
    }
    if let Some(first) = schema.get("enum").and_then(Value::as_array).and_then(|a| a.first()) {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.iter().find(|k| *k != "null").cloned().unwrap_or(Value::Null),
        Some(k) => k.clone(),
        None => Value::Null,
    };
    match kind.as_str() {
        Some("object") => {
            let mut out = Map::new();
            let required: BTreeSet<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, prop) in props {
                    if required.contains(name.as_str()) {
                        out.insert(name.clone(), example(doc, prop, depth + 1));
                    }
                }
            }
            Value::Object(out)
        }
        Some("array") => json!([]),
        Some("string") => json!("fuzz"),
        Some("integer") | Some("number") => json!(1),
        Some("boolean") => json!(true),
        _ => Value::Null,
    }
}

/// Every property name and enum string anywhere in `v`.
fn words(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(props) = m.get("properties").and_then(Value::as_object) {
                out.extend(props.keys().map(|k| format!("\"{k}\"")));
            }
            if let Some(values) = m.get("enum").and_then(Value::as_array) {
                out.extend(values.iter().filter_map(Value::as_str).map(|s| format!("\"{s}\"")));
            }
            m.values().for_each(|v| words(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| words(v, out)),
        _ => {}
    }
}

fn main() -> anyhow::Result<()> {
    let fuzz = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz".into()));
    let doc = portholed::openapi::document();
    let corpus = fuzz.join("corpus/host_api");
    std::fs::create_dir_all(&corpus)?;
    let mut dict = BTreeSet::new();
    words(&doc, &mut dict);
    let methods = ["get", "post", "put", "patch", "delete"];
    let mut seeds = 0;
    for (path, ops) in doc["paths"].as_object().into_iter().flatten() {
        for segment in path.split('/').filter(|s| !s.is_empty() && !s.starts_with('{')) {
            dict.insert(format!("\"{segment}\""));
        }
        // Path parameters: the first VM's id (the target's `@0`), drive and card names, snapshot and task ids.
        let concrete = path
            .replace("{id}", "@0")
            .replace("{drive}", "disk1")
            .replace("{nic}", "net0")
            .replace("{sid}", "@0")
            .replace("{name}", "fuzz.iso")
            .replace("{action}", "start");
        let concrete = if path.starts_with("/tasks/{id}") { concrete.replace("@0", "@t") } else { concrete };
        for (method, op) in ops.as_object().into_iter().flatten() {
            let Some(m) = methods.iter().position(|x| x == method) else { continue };
            let body = op
                .pointer("/requestBody/content/application~1json/schema")
                .map(|s| serde_json::to_vec(&example(&doc, s, 0)))
                .transpose()?
                .unwrap_or_default();
            // The owner on the Unix socket, and a viewer token over TCP (whose rights are checked).
            for caller in [0u8, 3] {
                let mut seed = vec![m as u8 | caller << 3];
                seed.extend_from_slice(format!("{}{concrete}\n", porthole_api::API_PREFIX).as_bytes());
                seed.extend_from_slice(&body);
                std::fs::write(corpus.join(format!("seed-{seeds:03}")), seed)?;
                seeds += 1;
            }
        }
    }
    // Queries the routes read, and the other actions.
    for (m, extra) in [
        (0u8, "/vms/@0/stats?since=0"),
        (0, "/vms/@0/serial?lines=10"),
        (0, "/vms/@0/screenshot?width=64"),
        (1, "/vms/@0/shutdown"),
        (1, "/vms/@0/poweroff"),
        (1, "/vms/@0/pause"),
        (1, "/vms/@1/suspend"),
    ] {
        let mut seed = vec![m];
        seed.extend_from_slice(format!("{}{extra}\n", porthole_api::API_PREFIX).as_bytes());
        std::fs::write(corpus.join(format!("seed-{seeds:03}")), seed)?;
        seeds += 1;
    }
    for word in ["@0", "@1", "@t", "?since=", "?lines=", "?width=", "Bearer ", "/api/v1"] {
        dict.insert(format!("\"{word}\""));
    }
    let dict: Vec<String> = dict.into_iter().filter(|w| w.len() <= 66).collect();
    std::fs::create_dir_all(fuzz.join("dict"))?;
    std::fs::write(fuzz.join("dict/host_api.dict"), dict.join("\n") + "\n")?;
    println!("{seeds} seeds in {}, {} dictionary words", corpus.display(), dict.len());
    Ok(())
}
