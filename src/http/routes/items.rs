//! A run's item results: `GET /admin/t/{tenant}/runs/{runType}/{runId}/items`.

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, web};

use super::runs::{run_id, run_type};
use crate::domain::ItemStatus;
use crate::http::AppState;
use crate::http::auth::TenantAccess;
use crate::http::dto::{ItemDto, ItemPage};
use crate::http::error::ApiError;
use crate::runtime::ItemQuery;

/// Items per page unless `limit` says otherwise.
const DEFAULT_LIMIT: u32 = 100;
/// The most items one page holds.
const MAX_LIMIT: u32 = 1000;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Reads `status`, `limit` and `cursor`; any other parameter is refused.
fn item_query(req: &HttpRequest) -> Result<ItemQuery, ApiError> {
    let params = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map_err(|e| invalid("query", e.to_string()))?
        .into_inner();
    let mut query = ItemQuery {
        status: None,
        after: None,
        limit: DEFAULT_LIMIT,
    };
    for (key, value) in params {
        match key.as_str() {
            "status" => {
                query.status = Some(
                    value
                        .parse::<ItemStatus>()
                        .map_err(|e| invalid("status", e.to_string()))?,
                )
            }
            "limit" => {
                query.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        invalid("limit", format!("a whole number from 1 to {MAX_LIMIT}"))
                    })?
            }
            "cursor" => {
                query.after = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| invalid("cursor", "not a cursor this API gave out"))?,
                )
            }
            other => return Err(invalid(other, "unknown parameter (status, limit, cursor)")),
        }
    }
    Ok(query)
}

pub async fn list_items(
    tenant: TenantAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let run_type = run_type(&req)?;
    let id = run_id(&req)?;
    let query = item_query(&req)?;
    let limit = query.limit as usize;
    // One more than asked tells whether another page follows.
    let probe = ItemQuery {
        limit: query.limit + 1,
        ..query
    };
    let mut page = state
        .directory
        .list_items(&tenant.0, run_type, id, probe)
        .await?
        .ok_or(ApiError::NotFound)?;
    let next_cursor = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|(position, _)| position.to_string())
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(ItemPage {
        items: page
            .into_iter()
            .map(|(_, item)| ItemDto::from(item))
            .collect(),
        next_cursor,
    }))
}
