//! Firecracker's own API description (Swagger 2.0, YAML) as a validator of
//! request bodies.
//!
//! Parsed with `serde_norway` (a maintained fork of serde_yaml, which is no
//! longer maintained) into JSON values, and checked with the `jsonschema`
//! crate as JSON Schema draft 4, the dialect Swagger 2.0 schemas are written
//! in. Two adjustments make the check as strict as Firecracker itself:
//! objects get `additionalProperties: false` unless they say otherwise
//! (Firecracker's request types deny unknown fields, the description does not
//! say so), and a `format` that is a regular expression (MMDS's address) is
//! checked as a `pattern`.

use crate::firecracker::api::{ApiRequest, Method};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Where the description is: `$AIRLOCK_FIRECRACKER_API_YAML`, else the copy
/// kept with the tests (`tests/data/`, see its README).
fn location() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_FIRECRACKER_API_YAML") {
        return PathBuf::from(p);
    }
    kept_copy()
}

fn kept_copy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/firecracker-v1.16.1-api.yaml")
}

/// The kept copy is the reference one, wherever the reference is at hand
/// (the `shared/reference` directory beside the workspace).
#[test]
fn the_kept_description_is_the_reference_one() {
    let reference = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/firecracker-v1.16.1-api.yaml");
    let Ok(reference) = std::fs::read(&reference) else {
        eprintln!(
            "skipped: no reference copy at {} to compare with",
            reference.display()
        );
        return;
    };
    let kept = std::fs::read(kept_copy()).expect("the kept copy");
    assert!(
        kept == reference,
        "tests/data differs from the reference description"
    );
}

pub struct ApiSpec {
    doc: Value,
}

fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            if let Some(Value::String(format)) = map.get("format") {
                if format.contains('(') {
                    let pattern = format!("^{format}$");
                    map.insert("pattern".into(), Value::String(pattern));
                }
            }
            for v in map.values_mut() {
                strict(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

impl ApiSpec {
    pub fn load() -> ApiSpec {
        let path = location();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "Firecracker's API description is needed to validate request bodies: {} ({e}); \
                 set AIRLOCK_FIRECRACKER_API_YAML",
                path.display()
            )
        });
        let doc: Value = serde_norway::from_str(&text).expect("the API description parses");
        assert_eq!(doc["swagger"], "2.0", "a Swagger 2.0 document");
        ApiSpec { doc }
    }

    /// The path template of the description that `path` matches.
    fn template(&self, path: &str) -> Option<(&str, &Value)> {
        let paths = self.doc["paths"].as_object()?;
        paths.iter().find_map(|(template, item)| {
            let t: Vec<&str> = template.split('/').collect();
            let p: Vec<&str> = path.split('/').collect();
            let same = t.len() == p.len()
                && t.iter().zip(&p).all(|(a, b)| {
                    (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) || a == b
                });
            same.then_some((template.as_str(), item))
        })
    }

    /// Every problem with `request`, or `Ok` when the description allows it.
    pub fn validate(&self, request: &ApiRequest) -> Result<(), Vec<String>> {
        let (template, item) = self
            .template(&request.path)
            .ok_or_else(|| vec![format!("no path {} in the API", request.path)])?;
        let method = match request.method {
            Method::Get => "get",
            Method::Put => "put",
            Method::Patch => "patch",
        };
        let operation = item
            .get(method)
            .ok_or_else(|| vec![format!("{template} has no {method} operation")])?;
        let params = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let body_param = params.iter().find(|p| p["in"] == "body");
        let (Some(param), Some(body)) = (body_param, &request.body) else {
            return match (body_param, &request.body) {
                (None, None) => Ok(()),
                (None, Some(_)) => Err(vec![format!("{template} {method} takes no body")]),
                (Some(p), None) if p["required"] == true => {
                    Err(vec![format!("{template} {method} requires a body")])
                }
                _ => Ok(()),
            };
        };
        let mut definitions = self.doc["definitions"].clone();
        strict(&mut definitions);
        let mut root = param["schema"].clone();
        strict(&mut root);
        if let Value::Object(map) = &mut root {
            map.insert("definitions".into(), definitions);
        } else {
            root = json!({ "definitions": definitions });
        }
        let validator = jsonschema::draft4::new(&root)
            .map_err(|e| vec![format!("schema of {template} does not compile: {e}")])?;
        let problems: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
