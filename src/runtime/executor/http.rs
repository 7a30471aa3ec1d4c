//! The `http` executor (SPEC 4.1): each attempt of an item is a `POST` to
//! the calling product's worker, and a run without `itemIds` is planned by a
//! `POST` to its plan endpoint. The worker's answer is classed here (success,
//! permanent, retryable, throttled); the supervisor in `runtime::run` decides
//! what happens next.
//!
//! Nothing the worker sends back is stored raw: an item error carries the
//! worker's `code` only when it is a short token, and the HTTP status as
//! context. Neither the URL (it may hold credentials) nor the static headers
//! (the worker's secrets) appear in errors or logs.

use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Client, RequestBuilder, Response, StatusCode, Url};
use serde::Serialize;
use serde_json::Value;

use super::{AttemptError, ItemExecutor, ItemRequest, PlanRequest};
use crate::config::{RunTypeConfig, worker_url};
use crate::domain::{ItemError, ItemId};

/// The most of an error answer read to find its `code`, in bytes; a worker
/// that sends more gets `http_<status>`.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// The most of a plan answer read, in bytes: room for the largest plan
/// (`limits.max_items_per_run` ids of up to 256 characters) without letting
/// a broken worker fill the memory.
const PLAN_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The longest worker `code` taken as the item's error code, in characters.
const MAX_CODE_LEN: usize = 64;

/// Why an `HttpExecutor` could not be built from its settings. The messages
/// name keys and header names, never URLs or header values.
#[derive(Debug, thiserror::Error)]
pub enum HttpExecutorError {
    #[error("key `url`: required for the http executor")]
    MissingUrl,
    #[error("key `{key}`: {reason}")]
    InvalidUrl { key: &'static str, reason: String },
    #[error("key `headers`: {0}")]
    InvalidHeaders(String),
    #[error("the HTTP client cannot be built")]
    Client(#[source] reqwest::Error),
}

/// Posts items (and plans) to a worker over HTTP.
pub struct HttpExecutor {
    /// One client for every attempt of every run of this run type, so
    /// connections to the worker are pooled. It carries the static headers
    /// and a per-request timeout of the run type's `item_timeout`.
    client: Client,
    /// Where each item attempt is posted.
    url: Url,
    /// Where plans are asked for; `None` means runs must name their items.
    plan_url: Option<Url>,
    /// The client's per-request timeout (the run type's `item_timeout`),
    /// kept to report it in a `timeout` error as the supervisor does.
    timeout: Duration,
}

impl HttpExecutor {
    /// The executor of one run type's settings (`url`, `plan_url`,
    /// `headers`, `item_timeout`).
    pub fn new(settings: &RunTypeConfig) -> Result<Self, HttpExecutorError> {
        let url = settings
            .url
            .as_deref()
            .ok_or(HttpExecutorError::MissingUrl)?;
        let url = worker_url(url)
            .map_err(|reason| HttpExecutorError::InvalidUrl { key: "url", reason })?;
        let plan_url = settings
            .plan_url
            .as_deref()
            .map(worker_url)
            .transpose()
            .map_err(|reason| HttpExecutorError::InvalidUrl {
                key: "plan_url",
                reason,
            })?;
        let headers = settings
            .headers
            .to_header_map()
            .map_err(HttpExecutorError::InvalidHeaders)?;
        let client = Client::builder()
            .user_agent(concat!("runpilot/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .timeout(settings.item_timeout.0)
            // A redirected POST may turn into a GET elsewhere; a worker that
            // redirects is misconfigured and its 3xx fails the item.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(HttpExecutorError::Client)?;
        Ok(Self {
            client,
            url,
            plan_url,
            timeout: settings.item_timeout.0,
        })
    }
}

/// The body of an item attempt (SPEC 4.1).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemBody<'a> {
    tenant_external_id: &'a str,
    run_type: &'a str,
    run_id: String,
    item_id: &'a str,
    target_object_id: Option<&'a str>,
    payload_hash: Option<&'a str>,
    attempt: u32,
}

/// The body of a plan request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlanBody<'a> {
    tenant_external_id: &'a str,
    run_type: &'a str,
    run_id: String,
    target_object_id: Option<&'a str>,
    payload_hash: Option<&'a str>,
}

impl ItemExecutor for HttpExecutor {
    fn plan(&self, request: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
        let Some(plan_url) = &self.plan_url else {
            return Box::pin(async { Err(ItemError::new("plan_url_missing")) });
        };
        let body = PlanBody {
            tenant_external_id: request.tenant.as_str(),
            run_type: request.run_type.as_str(),
            run_id: request.run_id.to_string(),
            target_object_id: request.target_object_id.as_deref(),
            payload_hash: request.payload_hash.as_deref(),
        };
        let post = self.client.post(plan_url.clone()).json(&body);
        Box::pin(ask_plan(post, self.timeout))
    }

    fn execute(&self, request: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
        // An item id may hold characters a header cannot (line breaks, other
        // control characters); such an item can never be sent, so it fails
        // for good instead of being retried.
        let Ok(key) = HeaderValue::from_str(&request.idempotency_key()) else {
            return Box::pin(async {
                Err(AttemptError::Permanent(ItemError::new(
                    "invalid_idempotency_key",
                )))
            });
        };
        let run = &request.run;
        let body = ItemBody {
            tenant_external_id: run.tenant.as_str(),
            run_type: run.run_type.as_str(),
            run_id: run.run_id.to_string(),
            item_id: request.item_id.as_str(),
            target_object_id: run.target_object_id.as_deref(),
            payload_hash: run.payload_hash.as_deref(),
            attempt: request.attempt,
        };
        let post = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", key)
            .json(&body);
        Box::pin(attempt(post, self.timeout))
    }
}

/// Sends one item attempt and classes the answer.
async fn attempt(post: RequestBuilder, timeout: Duration) -> Result<(), AttemptError> {
    let response = post
        .send()
        .await
        .map_err(|e| transport_failure(e, timeout))?;
    let status = response.status();
    match Verdict::of(status) {
        Verdict::Succeeded => {
            // Reading the (small) body lets the connection go back to the
            // pool; what it says does not matter, and neither does a failure
            // to read it: the status already decided.
            let _ = read_limited(response, ERROR_BODY_LIMIT).await;
            Ok(())
        }
        Verdict::Permanent => {
            let error = worker_error(response).await;
            Err(AttemptError::Permanent(error))
        }
        Verdict::Retryable => {
            let retry_after = retry_after(response.headers(), SystemTime::now());
            let error = worker_error(response).await;
            Err(AttemptError::Retryable { error, retry_after })
        }
        Verdict::Throttled => {
            let retry_after = retry_after(response.headers(), SystemTime::now());
            let error = worker_error(response).await;
            Err(AttemptError::Throttled { error, retry_after })
        }
    }
}

/// Asks the worker for a run's items.
async fn ask_plan(post: RequestBuilder, timeout: Duration) -> Result<Vec<ItemId>, ItemError> {
    let response = post
        .send()
        .await
        .map_err(|e| transport_failure(e, timeout).error().clone())?;
    let status = response.status();
    if !status.is_success() {
        return Err(ItemError::new(format!("plan_http_{}", status.as_u16()))
            .with("status", status.as_u16()));
    }
    let body = read_limited(response, PLAN_BODY_LIMIT)
        .await
        .map_err(|e| transport_failure(e, timeout).error().clone())?
        .ok_or_else(|| plan_invalid("the answer is too large"))?;
    parse_plan(&body)
}

/// The items of a plan answer `{"itemIds": [string…]}`. The reasons are
/// fixed phrases: nothing of the answer itself is repeated.
fn parse_plan(body: &[u8]) -> Result<Vec<ItemId>, ItemError> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|_| plan_invalid("the answer is not JSON"))?;
    let ids = answer
        .get("itemIds")
        .and_then(Value::as_array)
        .ok_or_else(|| plan_invalid("the answer has no itemIds array"))?;
    ids.iter()
        .enumerate()
        .map(|(index, id)| {
            let id = id
                .as_str()
                .ok_or_else(|| plan_invalid("an item id is not a string").with("index", index))?;
            ItemId::parse(id).map_err(|_| {
                plan_invalid("an item id is not 1-256 characters").with("index", index)
            })
        })
        .collect()
}

/// A plan answer that cannot be used. The explanation goes under `detail`
/// because the run puts the error's code under `reason` in its safeError.
fn plan_invalid(detail: &'static str) -> ItemError {
    ItemError::new("plan_invalid").with("detail", detail)
}

/// How an HTTP status is handled (SPEC 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Succeeded,
    /// Any other 4xx, and a 3xx (redirects are not followed): asking again
    /// would get the same answer.
    Permanent,
    /// 408, 409, 425 and every 5xx: the worker may answer otherwise later.
    Retryable,
    /// 429: the upstream counts requests and wants fewer.
    Throttled,
}

impl Verdict {
    fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            200..=299 => Verdict::Succeeded,
            429 => Verdict::Throttled,
            408 | 409 | 425 => Verdict::Retryable,
            500..=599 => Verdict::Retryable,
            // 1xx never reaches here (the client handles it); 3xx and the
            // remaining 4xx are the worker's final word.
            _ => Verdict::Permanent,
        }
    }
}

/// The item error of a non-2xx answer: the worker's JSON `code` when it is
/// a short token, else `http_<status>`; the status as context. The body is
/// never copied: it may hold anything.
async fn worker_error(response: Response) -> ItemError {
    let status = response.status().as_u16();
    let code = match read_limited(response, ERROR_BODY_LIMIT).await {
        Ok(Some(body)) => worker_code(&body),
        Ok(None) | Err(_) => None,
    };
    ItemError::new(code.unwrap_or_else(|| format!("http_{status}"))).with("status", status)
}

/// The `code` of a JSON object body, when it is 1-64 chars of `[A-Za-z0-9_.-]`.
fn worker_code(body: &[u8]) -> Option<String> {
    let answer: Value = serde_json::from_slice(body).ok()?;
    let code = answer.get("code")?.as_str()?;
    let well_formed = (1..=MAX_CODE_LEN).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    well_formed.then(|| code.to_owned())
}

/// How long the worker asked us to wait: `Retry-After` as delta seconds or
/// as an HTTP date (a date in the past means now). `None` when absent or
/// unreadable, so the supervisor's own backoff applies.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = raw.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(raw).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An attempt that got no answer (or no whole answer within `timeout`).
/// reqwest's own message names the URL, so only the kind of failure is kept.
fn transport_failure(error: reqwest::Error, timeout: Duration) -> AttemptError {
    if error.is_timeout() {
        AttemptError::Retryable {
            error: ItemError::new("timeout").with("timeoutMs", timeout.as_millis() as u64),
            retry_after: None,
        }
    } else if error.is_builder() {
        // The request could not even be formed; it never will be.
        AttemptError::Permanent(ItemError::new("request_invalid"))
    } else {
        let stage = if error.is_connect() {
            "connect"
        } else {
            "request"
        };
        AttemptError::Retryable {
            error: ItemError::new("connection_failed").with("stage", stage),
            retry_after: None,
        }
    }
}

/// The body, or `None` when it is longer than `limit` bytes (reading stops
/// there).
async fn read_limited(mut response: Response, limit: usize) -> reqwest::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classed_as_the_spec_says() {
        let verdict = |code: u16| Verdict::of(StatusCode::from_u16(code).unwrap());
        for code in [200, 201, 202, 204] {
            assert_eq!(verdict(code), Verdict::Succeeded, "{code}");
        }
        for code in [400, 401, 403, 404, 410, 422, 302] {
            assert_eq!(verdict(code), Verdict::Permanent, "{code}");
        }
        for code in [408, 409, 425, 500, 502, 503, 504] {
            assert_eq!(verdict(code), Verdict::Retryable, "{code}");
        }
        assert_eq!(verdict(429), Verdict::Throttled);
    }

    #[test]
    fn a_worker_code_is_taken_only_when_it_is_a_short_token() {
        assert_eq!(
            worker_code(br#"{"code":"policy_invalid"}"#).as_deref(),
            Some("policy_invalid")
        );
        assert_eq!(
            worker_code(br#"{"code":"a.b-C_9"}"#).as_deref(),
            Some("a.b-C_9")
        );
        assert_eq!(worker_code(br#"{"code":""}"#), None);
        assert_eq!(worker_code(br#"{"code":"has space"}"#), None);
        assert_eq!(worker_code(br#"{"code":"token=s3cret/x"}"#), None);
        assert_eq!(
            worker_code(format!(r#"{{"code":"{}"}}"#, "x".repeat(65)).as_bytes()),
            None
        );
        assert_eq!(worker_code(br#"{"code":7}"#), None);
        assert_eq!(worker_code(b"<html>oops</html>"), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(with("7"), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(with(&later), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(with(&earlier), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn a_plan_answer_must_list_item_ids_as_strings() {
        let ids = parse_plan(br#"{"itemIds":["a","b"],"extra":1}"#).unwrap();
        assert_eq!(
            ids.iter().map(ItemId::as_str).collect::<Vec<_>>(),
            ["a", "b"]
        );
        for bad in [
            &br#"{"itemIds":[1]}"#[..],
            br#"{"items":[]}"#,
            br#"{"itemIds":[""]}"#,
            br#"["a"]"#,
            b"not json",
        ] {
            let error = parse_plan(bad).unwrap_err();
            assert_eq!(error.code, "plan_invalid");
            assert!(error.context.contains_key("detail"));
        }
    }
}
