//! Query strings of the list routes: known parameters only, each checked.

use std::collections::HashMap;

use actix_web::{HttpRequest, web};

use crate::http::error::ApiError;

/// Items or runs per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u32 = 100;
/// The most one page holds.
pub const MAX_LIMIT: u32 = 1000;

pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The query string's parameters; any not in `known` is refused.
pub fn params(req: &HttpRequest, known: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let params = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map_err(|e| invalid("query", e.to_string()))?
        .into_inner();
    if let Some(unknown) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(invalid(
            unknown,
            format!("unknown parameter ({})", known.join(", ")),
        ));
    }
    Ok(params)
}

/// `limit`: 1 to `MAX_LIMIT`, `DEFAULT_LIMIT` when absent.
pub fn limit(params: &HashMap<String, String>) -> Result<u32, ApiError> {
    match params.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(value) => value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| invalid("limit", format!("a whole number from 1 to {MAX_LIMIT}"))),
    }
}
