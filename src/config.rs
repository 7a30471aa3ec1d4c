//! Configuration (SPEC 5): `config/runpilot.toml`, or the file named by
//! `--config`, overridden by `RUNPILOT_<SECTION>__<KEY>` variables and the
//! short forms `RUNPILOT_BIND`, `RUNPILOT_DATABASE_URL`, `RUNPILOT_ADMIN_TOKEN`.
//! A bad key or value stops start-up with a message naming the key and the
//! file (or the variable it came from).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::RunType;

/// The file read when `--config` is not given (when it exists).
pub const DEFAULT_CONFIG_PATH: &str = "config/runpilot.toml";

/// A configuration that could not be used; the message names the key and its source.
#[derive(Debug, thiserror::Error)]
#[error("configuration error in {source_name}: {message}")]
pub struct ConfigError {
    pub source_name: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// One table per run type; a run type without a table uses the defaults
    /// (the simulated executor).
    #[serde(default)]
    run_types: BTreeMap<String, RunTypeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where the HTTP API listens; port 0 picks a free port.
    pub bind: String,
    /// The largest request body accepted, in bytes (written like "1MiB").
    pub body_limit: ByteSize,
    /// How long running items may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Dur,
    /// Whether `/metrics` asks for a token reaching every tenant (the
    /// default config binds to loopback, so it does not).
    #[serde(deserialize_with = "de_flag")]
    pub metrics_require_token: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            body_limit: ByteSize(1024 * 1024),
            shutdown_grace: Dur(Duration::from_secs(10)),
            metrics_require_token: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (relative or absolute) or `postgres://…`.
    pub url: String,
    /// SQLite's `synchronous` pragma: "full" (default) or "normal".
    pub sqlite_synchronous: SqliteSynchronous,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/runpilot.db".into(),
            sqlite_synchronous: SqliteSynchronous::Full,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    Full,
    Normal,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A bearer token allowed for every tenant; empty means none.
    pub admin_token: String,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token itself.
        f.debug_struct("AuthConfig")
            .field("admin_token_set", &!self.admin_token.is_empty())
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How long a run's owner holds it without renewing.
    pub lease: Dur,
    /// How often the owner renews its leases.
    pub heartbeat: Dur,
    /// This node's name; default: host name and a random suffix.
    pub node_id: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            lease: Dur(Duration::from_secs(15)),
            heartbeat: Dur(Duration::from_secs(5)),
            node_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Runs of one tenant executing at once; more wait as `queued`.
    #[serde(deserialize_with = "de_count")]
    pub max_active_runs_per_tenant: u32,
    /// The most items one run may have (given or planned).
    #[serde(deserialize_with = "de_count")]
    pub max_items_per_run: u32,
    /// Item attempts in flight across all runs of this process.
    #[serde(deserialize_with = "de_count")]
    pub max_items_in_flight: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_active_runs_per_tenant: 4,
            max_items_per_run: 100_000,
            max_items_in_flight: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Built in: items take `delay`; ids with `fail` fail, ids with `flaky`
    /// fail their first attempt.
    Simulated,
    /// `POST url` per item to a worker of the calling product.
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunTypeConfig {
    pub executor: ExecutorKind,
    /// Items of one run executing at once.
    #[serde(deserialize_with = "de_count")]
    pub concurrency: u32,
    /// Attempts per item before it fails (throttled attempts excepted).
    #[serde(deserialize_with = "de_count")]
    pub max_attempts: u32,
    /// How long one attempt may take before it counts as a `timeout`.
    pub item_timeout: Dur,
    /// How long a run may take from its start; none when absent.
    pub deadline: Option<Dur>,
    /// The first retry's backoff ceiling; it doubles each attempt (full jitter).
    pub retry_base: Dur,
    /// The largest backoff ceiling between attempts.
    pub retry_cap: Dur,
    /// The longest tenant pause one 429 causes (a larger `Retry-After` is cut to it).
    pub throttle_cap: Dur,
    /// Throttled (429) attempts an item may have; they do not count toward
    /// `max_attempts`, and past this many the item fails.
    #[serde(deserialize_with = "de_count")]
    pub max_throttled_waits: u32,
    /// Simulated only: how long one item takes.
    pub delay: Dur,
    /// Simulated only: how many items a run without `itemIds` plans.
    #[serde(deserialize_with = "de_count")]
    pub items: u32,
    /// Http only: the worker endpoint items are posted to (an `http://` URL).
    pub url: Option<String>,
    /// Http only: the endpoint that plans a run's items; without it, runs of
    /// this type must name their `itemIds` (else they fail with `plan_failed`).
    pub plan_url: Option<String>,
    /// Http only: headers sent on every request to the worker (its own auth,
    /// for instance). Their values are secrets: never logged, never printed.
    pub headers: StaticHeaders,
}

impl Default for RunTypeConfig {
    fn default() -> Self {
        Self {
            executor: ExecutorKind::Simulated,
            concurrency: 4,
            max_attempts: 5,
            item_timeout: Dur(Duration::from_secs(60)),
            deadline: Some(Dur(Duration::from_secs(6 * 3600))),
            retry_base: Dur(Duration::from_millis(200)),
            retry_cap: Dur(Duration::from_secs(30)),
            throttle_cap: Dur(Duration::from_secs(300)),
            max_throttled_waits: 20,
            delay: Dur(Duration::from_millis(200)),
            items: 10,
            url: None,
            plan_url: None,
            headers: StaticHeaders::default(),
        }
    }
}

impl Config {
    /// Loads the file (`path`, or the default file when it exists, or the
    /// built-in defaults) and applies the environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with(path, &vars)
    }

    /// [`Config::load`] with the environment given explicitly.
    pub fn load_with(path: Option<&Path>, vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let (source_name, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|e| ConfigError {
                    source_name: p.display().to_string(),
                    message: format!("cannot read the file: {e}"),
                })?,
            ),
            None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
                Ok(text) => (DEFAULT_CONFIG_PATH.to_owned(), text),
                Err(_) => ("the built-in defaults".to_owned(), String::new()),
            },
        };
        let err = |message: String| ConfigError {
            source_name: source_name.clone(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(format!("not valid TOML: {}", e.message())))?;
        let from_env = apply_env(&mut table, vars).map_err(err)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let origin = from_env
                    .get(&key)
                    .map(|var| format!(" (from {var})"))
                    .unwrap_or_default();
                err(format!("key `{key}`{origin}: {}", e.inner()))
            })?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// Checks what types alone cannot say.
    fn validate(&self) -> Result<(), String> {
        self.server.bind.parse::<SocketAddr>().map_err(|e| {
            format!(
                "key `server.bind`: '{}' is not an address: {e}",
                self.server.bind
            )
        })?;
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err("key `database.url`: must start with sqlite:// or postgres://".into());
        }
        for name in self.run_types.keys() {
            name.parse::<RunType>()
                .map_err(|e| format!("key `run_types.{name}`: not a run type: {e}"))?;
        }
        for (name, rt) in &self.run_types {
            for (key, value) in [
                ("concurrency", rt.concurrency),
                ("max_attempts", rt.max_attempts),
            ] {
                if value == 0 {
                    return Err(format!("key `run_types.{name}.{key}`: must be at least 1"));
                }
            }
            if rt.executor == ExecutorKind::Http && rt.url.is_none() {
                return Err(format!(
                    "key `run_types.{name}.url`: required when executor = \"http\""
                ));
            }
            for (key, value) in [("url", &rt.url), ("plan_url", &rt.plan_url)] {
                if let Some(raw) = value {
                    // The message names the key only: a URL may carry credentials.
                    worker_url(raw).map_err(|e| format!("key `run_types.{name}.{key}`: {e}"))?;
                }
            }
            rt.headers
                .to_header_map()
                .map_err(|e| format!("key `run_types.{name}.headers`: {e}"))?;
        }
        for (key, value) in [
            (
                "max_active_runs_per_tenant",
                self.limits.max_active_runs_per_tenant,
            ),
            ("max_items_in_flight", self.limits.max_items_in_flight),
        ] {
            if value == 0 {
                return Err(format!("key `limits.{key}`: must be at least 1"));
            }
        }
        Ok(())
    }

    /// The settings of one run type (its table, or the defaults).
    pub fn run_type(&self, run_type: RunType) -> RunTypeConfig {
        self.run_types
            .get(run_type.as_str())
            .cloned()
            .unwrap_or_default()
    }

    /// Sets one run type's settings (for library users and tests).
    pub fn set_run_type(&mut self, run_type: RunType, settings: RunTypeConfig) {
        self.run_types
            .insert(run_type.as_str().to_owned(), settings);
    }
}

/// A worker endpoint of the `http` executor: an absolute `http://` URL.
///
/// `https://` is refused because this build's HTTP client carries no TLS
/// stack (reqwest without a TLS feature, to keep the build lean); refusing
/// at start-up beats failing every attempt with `connection_failed`. The
/// error never repeats the URL, which may hold credentials.
pub fn worker_url(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
    match url.scheme() {
        "http" if url.host().is_some() => Ok(url),
        "http" => Err("the URL has no host".to_owned()),
        "https" => Err(
            "https is not supported by this build (no TLS in its HTTP client); \
             use http:// behind a TLS-terminating proxy"
                .to_owned(),
        ),
        other => Err(format!("the scheme must be http, not {other}")),
    }
}

/// Header names that runpilot sets itself (or that HTTP manages); a static
/// header may not replace them.
const RESERVED_HEADERS: [&str; 6] = [
    "idempotency-key",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// Static headers of an `http` run type (`headers = { Authorization = "…" }`).
/// `Debug` prints the names only: the values are the worker's secrets.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct StaticHeaders(BTreeMap<String, String>);

impl StaticHeaders {
    /// Adds or replaces one header (for library users and tests).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers as sent, each value marked sensitive so the HTTP client
    /// never prints it either. The error names the header, never its value.
    pub fn to_header_map(&self) -> Result<reqwest::header::HeaderMap, String> {
        use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
        let mut map = HeaderMap::new();
        for (name, value) in &self.0 {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a valid header name"))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(format!(
                    "`{name}` is set by runpilot and cannot be configured"
                ));
            }
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                format!("the value of `{name}` is not a valid header value (no control characters or line breaks)")
            })?;
            value.set_sensitive(true);
            map.insert(header, value);
        }
        Ok(map)
    }
}

impl fmt::Debug for StaticHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the values are secrets.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Applies `RUNPILOT_*` variables to the parsed file; returns which key each
/// variable set, so errors can name the variable.
fn apply_env(
    table: &mut toml::Table,
    vars: &[(String, String)],
) -> Result<BTreeMap<String, String>, String> {
    let mut from_env = BTreeMap::new();
    for (name, value) in vars {
        let path: Vec<String> = match name.as_str() {
            "RUNPILOT_BIND" => vec!["server".into(), "bind".into()],
            "RUNPILOT_DATABASE_URL" => vec!["database".into(), "url".into()],
            "RUNPILOT_ADMIN_TOKEN" => vec!["auth".into(), "admin_token".into()],
            other => match other.strip_prefix("RUNPILOT_") {
                Some(rest) if rest.contains("__") => {
                    rest.split("__").map(|p| p.to_ascii_lowercase()).collect()
                }
                // Other RUNPILOT_ variables (test settings, log filters) are not configuration.
                _ => continue,
            },
        };
        if path.iter().any(String::is_empty) {
            return Err(format!("{name}: not of the form RUNPILOT_<SECTION>__<KEY>"));
        }
        let mut node = &mut *table;
        let (last, parents) = path.split_last().expect("path has at least one part");
        for part in parents {
            let entry = node
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry
                .as_table_mut()
                .ok_or_else(|| format!("{name}: `{part}` is not a section"))?;
        }
        node.insert(last.clone(), toml::Value::String(value.clone()));
        from_env.insert(path.join("."), name.clone());
    }
    Ok(from_env)
}

/// Flags may be written as booleans in the file or as strings (environment).
fn de_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bool(bool),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bool(b) => Ok(b),
        Raw::Text(s) => match s.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "'{other}' is not true or false"
            ))),
        },
    }
}

/// Counts may be written as numbers in the file or as strings (environment).
fn de_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
    }
    let n = match Raw::deserialize(d)? {
        Raw::Int(n) => n,
        Raw::Text(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| serde::de::Error::custom(format!("'{s}' is not a whole number")))?,
    };
    u32::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range")))
}

/// A duration written like "200ms", "30s", "5m", "6h" or "1d".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("'{s}' has no unit (ms, s, m, h, d)"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration like \"200ms\" or \"30s\""))?;
        let ms = match unit.trim() {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            other => return Err(format!("'{other}' is not a unit (ms, s, m, h, d)")),
        };
        ms.map(|ms| Dur(Duration::from_millis(ms)))
            .ok_or_else(|| format!("'{s}' is too long"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A size written like "1MiB", "512KiB", "1000000" or "2MB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size like \"1MiB\""))?;
        let factor = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1024,
            "MB" => 1_000_000,
            "MiB" => 1024 * 1024,
            "GB" => 1_000_000_000,
            "GiB" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "'{other}' is not a size unit (B, KiB, MiB, GiB, KB, MB, GB)"
                ));
            }
        };
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("'{s}' is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => usize::try_from(n)
                .map(ByteSize)
                .map_err(|_| serde::de::Error::custom("too large")),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Where the SQLite file of a `sqlite://` URL lives, if it is a file.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        None
    } else {
        Some(PathBuf::from(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runpilot.toml");
        std::fs::write(&path, text).unwrap();
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with(Some(&path), &vars)
    }

    #[test]
    fn the_shipped_file_loads_and_uses_the_simulated_executor_everywhere() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let config = Config::load_with(Some(&path), &[]).unwrap();
        for rt in RunType::ALL {
            assert_eq!(config.run_type(*rt).executor, ExecutorKind::Simulated);
        }
        assert_eq!(config.server.bind, "127.0.0.1:8080");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_file() {
        let err = load("[server]\nbindd = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bindd"), "{err}");
        assert!(err.contains("runpilot.toml"), "{err}");
    }

    #[test]
    fn a_bad_duration_is_named_with_its_key() {
        let err = load("[run_types.snapshot_capture]\ndelay = \"fast\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("run_types.snapshot_capture.delay"), "{err}");
    }

    #[test]
    fn environment_variables_override_the_file_and_are_named_on_error() {
        let config = load(
            "[server]\nbind = \"127.0.0.1:1\"\n",
            &[
                ("RUNPILOT_BIND", "127.0.0.1:9999"),
                ("RUNPILOT_LIMITS__MAX_ITEMS_IN_FLIGHT", "7"),
                ("RUNPILOT_RUN_TYPES__RESTORE_EXECUTE__DELAY", "5ms"),
                ("RUNPILOT_TEST_POSTGRES_URL", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.server.bind, "127.0.0.1:9999");
        assert_eq!(config.limits.max_items_in_flight, 7);
        assert_eq!(
            config.run_type(RunType::RestoreExecute).delay,
            Dur(Duration::from_millis(5))
        );
        let err = load("", &[("RUNPILOT_LIMITS__MAX_ITEMS_IN_FLIGHT", "many")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RUNPILOT_LIMITS__MAX_ITEMS_IN_FLIGHT"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_run_type_is_refused() {
        let err = load("[run_types.backup]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("run_types.backup"), "{err}");
    }

    #[test]
    fn http_run_types_take_worker_urls_and_static_headers() {
        let config = load(
            "[run_types.restore_execute]\nexecutor = \"http\"\nurl = \"http://127.0.0.1:9000/items\"\n\
             plan_url = \"http://127.0.0.1:9000/plan\"\nheaders = { Authorization = \"Bearer s3cret\" }\n",
            &[],
        )
        .unwrap();
        let settings = config.run_type(RunType::RestoreExecute);
        assert_eq!(settings.executor, ExecutorKind::Http);
        let headers = settings.headers.to_header_map().unwrap();
        assert_eq!(headers["authorization"], "Bearer s3cret");
        assert!(headers["authorization"].is_sensitive());
        let printed = format!("{settings:?}");
        assert!(printed.contains("Authorization"), "{printed}");
        assert!(!printed.contains("s3cret"), "{printed}");
    }

    #[test]
    fn bad_static_headers_are_named_without_their_values() {
        let rt =
            "[run_types.restore_execute]\nexecutor = \"http\"\nurl = \"http://127.0.0.1:9000/\"\n";
        for headers in [
            "headers = { \"Bad Name\" = \"v\" }",
            "headers = { X-Token = \"line\\nbreak-s3cret\" }",
            "headers = { Idempotency-Key = \"s3cret\" }",
        ] {
            let err = load(&format!("{rt}{headers}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("run_types.restore_execute.headers"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn worker_urls_must_be_http_and_are_not_repeated_in_errors() {
        for url in [
            "not a url",
            "ftp://127.0.0.1/x",
            "https://user:s3cret@example.com/items",
        ] {
            let err = load(
                &format!("[run_types.restore_execute]\nexecutor = \"http\"\nplan_url = \"{url}\"\nurl = \"http://127.0.0.1:1/\"\n"),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("run_types.restore_execute.plan_url"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn durations_and_sizes_parse_their_units() {
        assert_eq!(Dur::parse("200ms").unwrap().0, Duration::from_millis(200));
        assert_eq!(Dur::parse("5m").unwrap().0, Duration::from_secs(300));
        assert!(Dur::parse("5").is_err());
        assert_eq!(ByteSize::parse("1MiB").unwrap().0, 1_048_576);
        assert!(ByteSize::parse("1XB").is_err());
    }

    #[test]
    fn sqlite_urls_name_relative_and_absolute_files() {
        assert_eq!(
            sqlite_file("sqlite://data/r.db"),
            Some(PathBuf::from("data/r.db"))
        );
        assert_eq!(
            sqlite_file("sqlite:///var/r.db?mode=rwc"),
            Some(PathBuf::from("/var/r.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
    }
}
