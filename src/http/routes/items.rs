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
    Ok(ItemQuery {
        status: query::optional(&params, "status", |v| {
            v.parse::<ItemStatus>()
                .map_err(|e| query::invalid("status", e.to_string()))
        })?,
        after: query::optional(&params, "cursor", |v| {
            v.parse::<u64>().map_err(|_| query::bad_cursor())
        })?,
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
    let limit = query.limit;
    let probe = ItemQuery {
        limit: query.limit + 1,
        ..query
    };
    let mut page = state
        .directory
        .list_items(&tenant.0, run_type, id, probe)
        .await?
        .ok_or(ApiError::NotFound)?;
    let next_cursor = query::cut_page(&mut page, limit, |(position, _)| position.to_string());
    Ok(HttpResponse::Ok().json(ItemPage {
        items: page
            .into_iter()
            .map(|(_, item)| ItemDto::from(item))
            .collect(),
        next_cursor,
    }))
}
