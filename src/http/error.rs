//! The API's errors: one enum, one table from error to HTTP status and
//! stable `code`, rendered as RFC 9457 problem JSON. Internal causes are
//! logged with a correlation id that the body carries; they never reach
//! the body themselves.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::runtime::RegistryError;

/// How long a client should wait before trying again after a 503.
const RETRY_AFTER_SECS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthenticated,
    #[error("this token does not reach that tenant")]
    Forbidden,
    #[error("{0}")]
    InvalidTenant(String),
    #[error("{0}")]
    UnknownRunType(String),
    #[error("{field}: {message}")]
    InvalidRequest { field: String, message: String },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("a request body must be application/json")]
    UnsupportedMediaType,
    #[error("no such resource")]
    NotFound,
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    #[error("the run has finished already")]
    AlreadyFinished,
    #[error("the store is unavailable; try again shortly")]
    StoreUnavailable,
    #[error("the service is shutting down; try again shortly")]
    ShuttingDown,
    #[error("an internal error occurred (correlation id {correlation_id})")]
    Internal { correlation_id: String },
}

impl ApiError {
    /// The stable machine code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden => "forbidden",
            ApiError::InvalidTenant(_) => "invalid_tenant",
            ApiError::UnknownRunType(_) => "unknown_run_type",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::AlreadyFinished => "already_finished",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal { .. } => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "Unauthenticated",
            ApiError::Forbidden => "Forbidden",
            ApiError::InvalidTenant(_) => "Invalid tenant id",
            ApiError::UnknownRunType(_) => "Unknown run type",
            ApiError::InvalidRequest { .. } => "Invalid request",
            ApiError::PayloadTooLarge { .. } => "Payload too large",
            ApiError::UnsupportedMediaType => "Unsupported media type",
            ApiError::NotFound => "Not found",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::AlreadyFinished => "Already finished",
            ApiError::StoreUnavailable => "Store unavailable",
            ApiError::ShuttingDown => "Shutting down",
            ApiError::Internal { .. } => "Internal error",
        }
    }

    /// An internal error: logs the cause with a new correlation id.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        let correlation_id = uuid::Uuid::now_v7().to_string();
        let mut chain = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(correlation_id = %correlation_id, cause = %chain, "internal error");
        ApiError::Internal { correlation_id }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::InvalidTenant(_)
            | ApiError::UnknownRunType(_)
            | ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AlreadyFinished => StatusCode::CONFLICT,
            ApiError::StoreUnavailable | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut body = json!({
            "type": format!("urn:runpilot:problem:{}", self.code()),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": self.to_string(),
            "code": self.code(),
        });
        match self {
            ApiError::InvalidRequest { field, .. } => body["field"] = json!(field),
            ApiError::Internal { correlation_id } => body["correlationId"] = json!(correlation_id),
            _ => {}
        }
        let mut response = HttpResponse::build(status);
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        match self {
            ApiError::StoreUnavailable | ApiError::ShuttingDown => {
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
            }
            ApiError::Unauthenticated => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        response.body(body.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::Store(s) if s.is_unavailable() => ApiError::StoreUnavailable,
            RegistryError::Store(_) | RegistryError::Mailbox(_) => ApiError::internal(&e),
        }
    }
}
