//! A run's item results: `GET /admin/t/{tenant}/runs/{runType}/{runId}/items`.

use actix_web::{HttpRequest, HttpResponse, web};

use super::query;
use super::runs::{run_id, run_type};
use crate::domain::ItemStatus;
use crate::http::AppState;
use crate::http::auth::TenantAccess;
use crate::http::dto::{ItemDto, ItemPage};
use crate::http::error::ApiError;
use crate::runtime::ItemQuery;

/// Reads `status`, `limit` and `cursor`; any other parameter is refused.
fn item_query(req: &HttpRequest) -> Result<ItemQuery, ApiError> {
    let params = query::params(req, &["status", "limit", "cursor"])?;
    let status = match params.get("status") {
        Some(value) => Some(
            value
                .parse::<ItemStatus>()
                .map_err(|e| query::invalid("status", e.to_string()))?,
        ),
        None => None,
    };
    let after = match params.get("cursor") {
        Some(value) => Some(
            value
                .parse::<u64>()
                .map_err(|_| query::invalid("cursor", "not a cursor this API gave out"))?,
        ),
        None => None,
    };
    Ok(ItemQuery {
        status,
        after,
        limit: query::limit(&params)?,
    })
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
