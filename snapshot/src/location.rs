//! Where a snapshot lives: an `object_store` URL, opened into a store and a prefix.
//!
//! * `file:///abs/dir`: a directory of this machine (`LocalFileSystem`).
//! * `s3://bucket/prefix`: S3 or any S3-compatible store. Credentials, region and endpoint come
//!   from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//!   `AWS_ALLOW_HTTP`, ...) and from [`StoreOptions`]; never from a file of the project.
//! * `memory://name/prefix`: an in-memory store shared by everything of this process that
//!   opens the same `name` (tests).

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore, RetryConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Why a URL cannot be opened (bad input).
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    /// Not a URL.
    #[error("{url:?} is not a URL: {source}")]
    Url {
        /// What was given.
        url: String,
        /// Cause.
        #[source]
        source: url::ParseError,
    },
    /// A scheme this build does not serve.
    #[error("{0:?}: only file://, s3:// and memory:// snapshot URLs are supported")]
    Scheme(String),
    /// The store refused its configuration (a missing bucket, a bad option).
    #[error("cannot open {url}: {source}")]
    Store {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// A path part that is not a valid object path.
    #[error("{url}: {source}")]
    Path {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: object_store::path::Error,
    },
}

/// Options beside the environment (each overrides the matching `AWS_*` variable).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// S3 endpoint (`AWS_ENDPOINT_URL`), e.g. `http://127.0.0.1:9000` for a local server.
    pub endpoint: Option<String>,
    /// Allow plain `http://` endpoints (`AWS_ALLOW_HTTP`).
    pub allow_http: bool,
    /// Region (`AWS_REGION`).
    pub region: Option<String>,
    /// Access key id and secret (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), for an
    /// embedder that holds them; the command-line tools take them from the environment only.
    pub credentials: Option<(String, String)>,
}

/// An opened snapshot location.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The snapshot's prefix in it (the manifest and the data object are under it).
    pub prefix: Path,
    /// The URL it was opened from.
    pub url: String,
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

impl Location {
    /// Opens `url`.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Location, LocationError> {
        let parsed = url::Url::parse(url).map_err(|source| LocationError::Url {
            url: url.into(),
            source,
        })?;
        let path_of = |p: &str| {
            Path::parse(p.trim_matches('/')).map_err(|source| LocationError::Path {
                url: url.into(),
                source,
            })
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| LocationError::Scheme(url.into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| LocationError::Store {
                    url: url.into(),
                    source: object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(e),
                    },
                })?;
                let store = LocalFileSystem::new_with_prefix(&dir).map_err(|source| {
                    LocationError::Store {
                        url: url.into(),
                        source,
                    }
                })?;
                (Arc::new(store), Path::default())
            }
            "memory" => {
                let name = parsed.host_str().unwrap_or_default().to_owned();
                let store = memory_stores()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(name)
                    .or_insert_with(|| Arc::new(InMemory::new()))
                    .clone();
                (store, path_of(parsed.path())?)
            }
            "s3" | "s3a" => {
                let mut b = AmazonS3Builder::from_env().with_url(url);
                // Bounded requests and few retries inside object_store: the callers retry
                // with their own deadlines (a restore poisons a chunk it cannot have in time).
                for (key, var, value) in [
                    (ClientConfigKey::Timeout, "AWS_TIMEOUT", "30s"),
                    (ClientConfigKey::ConnectTimeout, "AWS_CONNECT_TIMEOUT", "5s"),
                ] {
                    if std::env::var_os(var).is_none() {
                        b = b.with_config(AmazonS3ConfigKey::Client(key), value);
                    }
                }
                b = b.with_retry(RetryConfig {
                    max_retries: 2,
                    retry_timeout: std::time::Duration::from_secs(5),
                    ..RetryConfig::default()
                });
                if let Some(e) = &options.endpoint {
                    b = b.with_endpoint(e);
                }
                if options.allow_http {
                    b = b.with_allow_http(true);
                }
                if let Some(r) = &options.region {
                    b = b.with_region(r);
                }
                if let Some((id, secret)) = &options.credentials {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                }
                let store = b.build().map_err(|source| LocationError::Store {
                    url: url.into(),
                    source,
                })?;
                (Arc::new(store), path_of(parsed.path())?)
            }
            _ => return Err(LocationError::Scheme(url.into())),
        };
        Ok(Location {
            store,
            prefix,
            url: url.into(),
        })
    }

    /// The object `name` under the prefix.
    pub fn object(&self, name: &str) -> Path {
        self.prefix.child(name)
    }
}
