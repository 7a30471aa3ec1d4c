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

/// The parameter `key` parsed by `parse`, when present.
pub fn optional<T>(
    params: &HashMap<String, String>,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, ApiError>,
) -> Result<Option<T>, ApiError> {
    params.get(key).map(|value| parse(value)).transpose()
}

/// Cuts a page fetched with one row more than `limit` (that row tells that
/// another page follows) and returns the cursor of the next page.
pub fn cut_page<T>(
    rows: &mut Vec<T>,
    limit: u32,
    cursor_of: impl Fn(&T) -> String,
) -> Option<String> {
    let limit = limit as usize;
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(cursor_of)
    } else {
        None
    }
}

/// The error of a cursor this API did not give out.
pub fn bad_cursor() -> ApiError {
    invalid("cursor", "not a cursor this API gave out")
}
