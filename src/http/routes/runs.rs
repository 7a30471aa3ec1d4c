//! The seed's two operations: start a run, get a run.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;

use super::query;
use crate::domain::{DedupKey, RunId, RunStatus, RunType};
use crate::http::AppState;
use crate::http::auth::TenantAccess;
use crate::http::dto::{RunDto, RunPage, RunStartRequest, RunStartResponse};
use crate::http::error::ApiError;
use crate::runtime::{CancelOutcome, RunQuery};

/// The run type of the path; 400 `unknown_run_type` when it is none.
pub(super) fn run_type(req: &HttpRequest) -> Result<RunType, ApiError> {
    let raw = req.match_info().get("run_type").unwrap_or_default();
    raw.parse()
        .map_err(|e: crate::domain::UnknownValue| ApiError::UnknownRunType(e.to_string()))
}

/// `POST /admin/t/{tenant}/runs/{runType}`: 201 with a new run, or 200 with
/// the active run that has the same dedup key.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0))]
pub async fn start_run(
    tenant: TenantAccess,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let run_type = run_type(&req)?;
    let body = read_json_body(&req, payload, state.config.server.body_limit.0).await?;
    let request = RunStartRequest::parse(&body, state.config.limits.max_items_per_run as usize)?;
    if state.directory.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let key = DedupKey {
        run_type,
        target_object_id: request.target_object_id,
        payload_hash: request.payload_hash,
    };
    let started = state
        .directory
        .start_run(&tenant.0, key, request.item_ids)
        .await?;
    let mut response = if started.reused {
        HttpResponse::Ok()
    } else {
        HttpResponse::Created()
    };
    Ok(response.json(RunStartResponse {
        reused: started.reused,
        run: RunDto::from(started.run),
    }))
}

/// `GET /admin/t/{tenant}/runs/{runType}/{runId}`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0))]
pub async fn get_run(
    tenant: TenantAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let run_type = run_type(&req)?;
    let id = run_id(&req)?;
    let run = state
        .directory
        .get_run(&tenant.0, run_type, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(RunDto::from(run)))
}

/// `POST /admin/t/{tenant}/runs/{runType}/{runId}/cancel`: 202 while the
/// cancel is under way (again 202), 409 once the run has finished.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0))]
pub async fn cancel_run(
    tenant: TenantAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let run_type = run_type(&req)?;
    let id = run_id(&req)?;
    match state
        .directory
        .cancel_run(&tenant.0, run_type, id)
        .await?
        .ok_or(ApiError::NotFound)?
    {
        CancelOutcome::Accepted(run) => Ok(HttpResponse::Accepted().json(RunDto::from(run))),
        CancelOutcome::AlreadyFinished(_) => Err(ApiError::AlreadyFinished),
    }
}

/// `GET /admin/t/{tenant}/runs?type=&status=&limit=&cursor=`: the
/// tenant's runs, newest first.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0))]
pub async fn list_runs(
    tenant: TenantAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let params = query::params(&req, &["type", "status", "limit", "cursor"])?;
    let limit = query::limit(&params)?;
    let wanted = RunQuery {
        run_type: query::optional(&params, "type", |v| {
            v.parse::<RunType>()
                .map_err(|e| ApiError::UnknownRunType(e.to_string()))
        })?,
        status: query::optional(&params, "status", |v| {
            v.parse::<RunStatus>()
                .map_err(|e| query::invalid("status", e.to_string()))
        })?,
        before: query::optional(&params, "cursor", |v| {
            RunId::parse(v).map_err(|_| query::bad_cursor())
        })?,
        limit: limit + 1,
    };
    let mut runs = state.directory.list_runs(&tenant.0, wanted).await?;
    let next_cursor = query::cut_page(&mut runs, limit, |run| run.id.to_string());
    Ok(HttpResponse::Ok().json(RunPage {
        runs: runs.into_iter().map(RunDto::from).collect(),
        next_cursor,
    }))
}

/// The run id of the path; a malformed id is a run that does not exist.
pub(super) fn run_id(req: &HttpRequest) -> Result<RunId, ApiError> {
    let raw = req.match_info().get("run_id").unwrap_or_default();
    RunId::parse(raw).map_err(|_| ApiError::NotFound)
}

/// Reads a request body of at most `limit` bytes; a body with a
/// Content-Type other than JSON is refused (no Content-Type is taken as JSON).
async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidRequest {
            field: "body".into(),
            message: format!("could not be read: {e}"),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    if !body.is_empty()
        && let Some(content_type) = req.headers().get(header::CONTENT_TYPE)
    {
        let essence = content_type
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    Ok(body)
}
