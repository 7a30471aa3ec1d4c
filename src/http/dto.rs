//! Every name on the wire: the JSON of runs and start requests.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::domain::{ItemError, ItemId, ItemRecord, RunRecord};

/// The longest `targetObjectId` or `payloadHash` accepted, in characters.
const MAX_KEY_PART_CHARS: usize = 1024;

/// A run as the API shows it (the seed's RunRecord and a few extra fields).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDto {
    pub id: String,
    pub tenant_external_id: String,
    #[serde(rename = "type")]
    pub run_type: &'static str,
    pub status: &'static str,
    pub target_object_id: Option<String>,
    pub payload_hash: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    pub counts: CountsDto,
    pub safe_error: Option<SafeErrorDto>,
    pub cancel_requested: bool,
    /// While the tenant is throttled by its upstream: when dispatch resumes.
    pub throttled_until: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CountsDto {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct SafeErrorDto {
    pub code: &'static str,
    pub context: Map<String, Value>,
}

impl From<RunRecord> for RunDto {
    fn from(r: RunRecord) -> Self {
        Self {
            id: r.id.to_string(),
            tenant_external_id: r.tenant.to_string(),
            run_type: r.run_type.as_str(),
            status: r.status.as_str(),
            target_object_id: r.target_object_id,
            payload_hash: r.payload_hash,
            created_at: r.created_at.to_rfc3339(),
            started_at: r.started_at.map(|t| t.to_rfc3339()),
            finished_at: r.finished_at.map(|t| t.to_rfc3339()),
            updated_at: r.updated_at.to_rfc3339(),
            counts: CountsDto {
                total: r.counts.total,
                succeeded: r.counts.succeeded,
                failed: r.counts.failed,
            },
            safe_error: r.safe_error.map(|e| SafeErrorDto {
                code: e.code.as_str(),
                context: e.context,
            }),
            cancel_requested: r.cancel_requested,
            throttled_until: r.throttled_until.map(|t| t.to_rfc3339()),
        }
    }
}

/// An item's result as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemDto {
    pub item_id: String,
    pub status: &'static str,
    pub attempts: u32,
    pub last_error: Option<ItemErrorDto>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ItemErrorDto {
    pub code: String,
    pub context: Map<String, Value>,
}

impl From<ItemRecord> for ItemDto {
    fn from(i: ItemRecord) -> Self {
        Self {
            item_id: i.item_id.to_string(),
            status: i.status.as_str(),
            attempts: i.attempts,
            last_error: i
                .last_error
                .map(|ItemError { code, context }| ItemErrorDto { code, context }),
            started_at: i.started_at.map(|t| t.to_rfc3339()),
            finished_at: i.finished_at.map(|t| t.to_rfc3339()),
        }
    }
}

/// A page of items; `nextCursor` is opaque and null on the last page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemPage {
    pub items: Vec<ItemDto>,
    pub next_cursor: Option<String>,
}

/// A page of runs, newest first; `nextCursor` is opaque and null on the last page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunPage {
    pub runs: Vec<RunDto>,
    pub next_cursor: Option<String>,
}

/// The answer to a start.
#[derive(Debug, Serialize)]
pub struct RunStartResponse {
    pub reused: bool,
    pub run: RunDto,
}

/// The seed's RunStartRequest as it arrives.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunStartRequestDto {
    target_object_id: Option<String>,
    payload_hash: Option<String>,
    item_ids: Option<Vec<String>>,
}

/// A start request, validated.
#[derive(Debug, Default)]
pub struct RunStartRequest {
    pub target_object_id: Option<String>,
    pub payload_hash: Option<String>,
    pub item_ids: Option<Vec<ItemId>>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        field: field.into(),
        message: message.into(),
    }
}

impl RunStartRequest {
    /// Parses a start body: empty means "no options"; anything else must be
    /// the seed's RunStartRequest, with every item id valid, none twice,
    /// and at most `max_items` of them.
    pub fn parse(body: &[u8], max_items: usize) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let dto: RunStartRequestDto = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            // serde_path_to_error says "." for the top level and "?" where it
            // could not tell (a syntax error): both are the body as a whole.
            let field = if path == "." || path == "?" {
                "body".to_owned()
            } else {
                path
            };
            invalid(field, e.inner().to_string())
        })?;
        de.end().map_err(|e| invalid("body", e.to_string()))?;
        for (field, value) in [
            ("targetObjectId", &dto.target_object_id),
            ("payloadHash", &dto.payload_hash),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.chars().count() > MAX_KEY_PART_CHARS)
            {
                return Err(invalid(
                    field,
                    format!("at most {MAX_KEY_PART_CHARS} characters"),
                ));
            }
        }
        let item_ids = match dto.item_ids {
            None => None,
            Some(raw) => {
                if raw.len() > max_items {
                    return Err(invalid(
                        "itemIds",
                        format!("at most {max_items} items per run ({} given)", raw.len()),
                    ));
                }
                let mut seen = std::collections::HashSet::with_capacity(raw.len());
                let mut ids = Vec::with_capacity(raw.len());
                for (i, id) in raw.iter().enumerate() {
                    let id =
                        ItemId::parse(id).map_err(|e| invalid(format!("itemIds[{i}]"), e.0))?;
                    if !seen.insert(id.clone()) {
                        return Err(invalid(
                            format!("itemIds[{i}]"),
                            format!("'{id}' is given twice"),
                        ));
                    }
                    ids.push(id);
                }
                Some(ids)
            }
        };
        Ok(Self {
            target_object_id: dto.target_object_id,
            payload_hash: dto.payload_hash,
            item_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        match RunStartRequest::parse(body.as_bytes(), 3) {
            Err(ApiError::InvalidRequest { field, .. }) => field,
            other => panic!("expected invalid_request, got {other:?}"),
        }
    }

    #[test]
    fn empty_bodies_and_empty_objects_mean_no_options() {
        for body in ["", "  ", "{}"] {
            let r = RunStartRequest::parse(body.as_bytes(), 3).unwrap();
            assert!(r.item_ids.is_none() && r.target_object_id.is_none());
        }
    }

    #[test]
    fn bad_bodies_name_the_field() {
        assert_eq!(field_of(r#"{"targetObjectId": 5}"#), "targetObjectId");
        assert_eq!(field_of(r#"{"itemIds": ["a", 1]}"#), "itemIds[1]");
        assert_eq!(field_of(r#"{"itemIds": ["a", ""]}"#), "itemIds[1]");
        assert_eq!(field_of(r#"{"itemIds": ["a", "a"]}"#), "itemIds[1]");
        assert_eq!(field_of(r#"{"itemIds": ["a", "b", "c", "d"]}"#), "itemIds");
        assert!(field_of(r#"{"extra": 1}"#).contains("extra"));
        assert_eq!(field_of("not json"), "body");
        assert_eq!(field_of("[]"), "body");
    }
}
