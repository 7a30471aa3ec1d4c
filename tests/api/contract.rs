//! Answers checked against the seed contract's schemas, read from the
//! contract file itself (a copy kept in tests/fixtures).

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::helpers::{Backend, TENANT, on_both_backends, spawn_app};

fn contract() -> &'static Value {
    static CONTRACT: OnceLock<Value> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/run-orchestration.seed.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the contract file");
        serde_yaml::from_str(&text).expect("the contract parses")
    })
}

fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &contract()["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// The subset of OpenAPI 3.0 schema rules the contract uses.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let schema = resolve(schema);
    if value.is_null() {
        if schema["nullable"] != json!(true) {
            errors.push(format!("{path}: null where it is not nullable"));
        }
        return;
    }
    let type_ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("the checker does not know type {other}"),
        None => true,
    };
    if !type_ok {
        errors.push(format!("{path}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    if let Some(min) = schema["minimum"].as_i64()
        && value.as_i64().is_some_and(|v| v < min)
    {
        errors.push(format!("{path}: {value} is below {min}"));
    }
    if schema["format"] == json!("date-time") {
        let text = value.as_str().unwrap_or_default();
        if chrono::DateTime::parse_from_rfc3339(text).is_err() {
            errors.push(format!("{path}: '{text}' is not an RFC 3339 date-time"));
        }
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let key = required.as_str().unwrap_or_default();
            if !object.contains_key(key) {
                errors.push(format!("{path}: missing required {key}"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, item) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(sub) => check(sub, item, &format!("{path}.{key}"), errors),
                None if schema["additionalProperties"] == json!(false) => {
                    errors.push(format!("{path}: extra key {key}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check(items, item, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Fails the test with every violation of the named schema.
pub fn assert_matches_schema(name: &str, value: &Value) {
    let schema = &contract()["components"]["schemas"][name];
    assert!(schema.is_object(), "no schema {name} in the contract");
    let mut errors = Vec::new();
    check(schema, value, name, &mut errors);
    assert!(
        errors.is_empty(),
        "{name} violations: {errors:#?}\nin {value}"
    );
}

#[test]
fn the_checker_refuses_what_the_contract_forbids() {
    let good = json!({"id": "x", "tenantExternalId": "t", "type": "snapshot_capture",
        "status": "queued", "counts": {"total": 0, "succeeded": 0, "failed": 0}, "safeError": null});
    let mut errors = Vec::new();
    check(
        &contract()["components"]["schemas"]["RunRecord"],
        &good,
        "r",
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:?}");
    for bad in [
        json!({"id": "x", "tenantExternalId": "t", "type": "s", "status": "canceled"}),
        json!({"id": "x", "tenantExternalId": "t", "type": "s", "status": "queued", "counts": {"total": 1, "extra": 1}}),
        json!({"id": "x", "tenantExternalId": "t", "type": "s", "status": "queued", "createdAt": "yesterday"}),
        json!({"id": "x", "tenantExternalId": "t", "type": "s", "status": "queued", "safeError": {"code": "c", "stack": "…"}}),
        json!({"id": "x", "tenantExternalId": "t", "type": "s"}),
        json!({"id": "x", "tenantExternalId": "t", "type": "s", "status": "queued", "counts": {"total": -1}}),
    ] {
        let mut errors = Vec::new();
        check(
            &contract()["components"]["schemas"]["RunRecord"],
            &bad,
            "r",
            &mut errors,
        );
        assert!(!errors.is_empty(), "accepted {bad}");
    }
}

on_both_backends!(start_and_get_answers_match_the_seed_schemas_at_every_status);
async fn start_and_get_answers_match_the_seed_schemas_at_every_status(backend: Backend) {
    let app = spawn_app(backend).await;
    // Arrange: one run that will succeed, one partial, one failed.
    let bodies = [
        json!({"targetObjectId": "policy-1", "itemIds": ["a", "b"]}),
        json!({"targetObjectId": "policy-2", "itemIds": ["a", "b-fail"]}),
        json!({"targetObjectId": "policy-3", "itemIds": ["x-fail"]}),
    ];
    for body in bodies {
        // Act
        let (status, created) = app
            .start_run(TENANT, "snapshot_capture", Some(body.clone()))
            .await;
        assert_eq!(status, 201);
        assert_matches_schema("RunStartResponse", &created);
        assert_eq!(created["run"]["status"], "queued");
        assert_eq!(created["reused"], false);
        let (status, reused) = app.start_run(TENANT, "snapshot_capture", Some(body)).await;
        assert_eq!(status, 200);
        assert_matches_schema("RunStartResponse", &reused);
        let id = created["run"]["id"].as_str().unwrap();
        let (_, live) = app.get_run(TENANT, "snapshot_capture", id).await;
        assert_matches_schema("RunRecord", &live);
        // Assert: the terminal record too.
        let done = app.wait_until_finished("snapshot_capture", id).await;
        assert_matches_schema("RunRecord", &done);
        assert!(done["finishedAt"].is_string());
        assert!(done["startedAt"].is_string());
    }
}
