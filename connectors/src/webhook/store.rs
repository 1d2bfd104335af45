//! Durable webhook state in one redb file next to the logs: endpoints created through the API,
//! disabled endpoints, delivery positions and dead letters.

use crate::ConnectorError;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use synapse_schemas::Cursor;

const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");
const DISABLED: TableDefinition<&str, &[u8]> = TableDefinition::new("disabled");
/// (endpoint, source) → cursor after which delivery resumes, or [`FROM_START`].
const POSITIONS: TableDefinition<(&str, &str), &str> = TableDefinition::new("positions");
/// (endpoint, sequence) → [`DeadLetter`] JSON.
const DEAD: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");

/// An event whose retry schedule ran out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub source: String,
    pub cursor: String,
    pub event_id: String,
    pub table: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub last_status: Option<u16>,
    pub dead_at: String,
    pub event: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Disabled {
    pub reason: String,
    pub at: String,
}

/// Stored position "before everything the log holds".
const FROM_START: &str = "start";

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    seq: Arc<AtomicU64>,
}

type R<T> = Result<T, Box<redb::Error>>;

fn e<E: Into<redb::Error>>(err: E) -> Box<redb::Error> {
    Box::new(err.into())
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, ConnectorError> {
        let fail = |source| ConnectorError::Store { path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|x| fail(Box::new(redb::Error::Io(x))))?;
        }
        let init = || -> R<(Database, u64)> {
            let db = Database::create(path).map_err(e)?;
            let tx = db.begin_write().map_err(e)?;
            let mut max = 0;
            {
                tx.open_table(ENDPOINTS).map_err(e)?;
                tx.open_table(DISABLED).map_err(e)?;
                tx.open_table(POSITIONS).map_err(e)?;
                let dead = tx.open_table(DEAD).map_err(e)?;
                for item in dead.iter().map_err(e)? {
                    max = max.max(item.map_err(e)?.0.value().1);
                }
            }
            tx.commit().map_err(e)?;
            Ok((db, max))
        };
        let (db, max) = init().map_err(fail)?;
        // It holds the endpoints' signing secrets: readable by synapse's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|x| fail(Box::new(redb::Error::Io(x))))?;
        }
        Ok(Store { db: Arc::new(db), path: path.to_owned(), seq: Arc::new(AtomicU64::new(max + 1)) })
    }

    /// Runs a store operation off the async workers (commits fsync).
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> R<T> + Send + 'static,
    ) -> Result<T, ConnectorError> {
        let db = self.db.clone();
        let path = self.path.display().to_string();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(r) => r.map_err(|source| ConnectorError::Store { path, source }),
            Err(j) => Err(ConnectorError::Store { path, source: Box::new(redb::Error::Io(std::io::Error::other(j))) }),
        }
    }

    async fn put(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), ConnectorError> {
        self.run(move |db| {
            let tx = db.begin_write().map_err(e)?;
            {
                let mut t = tx.open_table(table).map_err(e)?;
                match value {
                    Some(v) => t.insert(key.as_str(), v.as_slice()).map_err(e)?,
                    None => t.remove(key.as_str()).map_err(e)?,
                };
            }
            tx.commit().map_err(e)
        })
        .await
    }

    async fn all(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, ConnectorError> {
        self.run(move |db| {
            let tx = db.begin_read().map_err(e)?;
            let t = tx.open_table(table).map_err(e)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(e)? {
                let (k, v) = item.map_err(e)?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    pub async fn save_endpoint(&self, name: &str, spec_json: Vec<u8>) -> Result<(), ConnectorError> {
        self.put(ENDPOINTS, name.to_owned(), Some(spec_json)).await
    }

    pub async fn endpoints(&self) -> Result<Vec<(String, Vec<u8>)>, ConnectorError> {
        self.all(ENDPOINTS).await
    }

    pub async fn set_disabled(&self, name: &str, d: Option<&Disabled>) -> Result<(), ConnectorError> {
        let v = d.map(|d| serde_json::to_vec(d).unwrap_or_default());
        self.put(DISABLED, name.to_owned(), v).await
    }

    pub async fn disabled(&self) -> Result<Vec<(String, Disabled)>, ConnectorError> {
        Ok(self
            .all(DISABLED)
            .await?
            .into_iter()
            .filter_map(|(k, v)| serde_json::from_slice(&v).ok().map(|d| (k, d)))
            .collect())
    }

    /// `None`: the endpoint never started on this source; `Some(None)`: from the start of the
    /// log; `Some(Some(c))`: after `c`.
    pub async fn position(&self, endpoint: &str, source: &str) -> Result<Option<Option<Cursor>>, ConnectorError> {
        let (a, b) = (endpoint.to_owned(), source.to_owned());
        let s = self
            .run(move |db| {
                let tx = db.begin_read().map_err(e)?;
                let t = tx.open_table(POSITIONS).map_err(e)?;
                let v = t.get((a.as_str(), b.as_str())).map_err(e)?.map(|v| v.value().to_owned());
                Ok(v)
            })
            .await?;
        Ok(s.map(|s| if s == FROM_START { None } else { s.parse().ok() }))
    }

    pub async fn set_position(&self, endpoint: &str, source: &str, c: Option<Cursor>) -> Result<(), ConnectorError> {
        let (a, b) = (endpoint.to_owned(), source.to_owned());
        self.run(move |db| {
            let tx = db.begin_write().map_err(e)?;
            {
                let mut t = tx.open_table(POSITIONS).map_err(e)?;
                let v = c.map_or_else(|| FROM_START.to_owned(), |c| c.to_string());
                t.insert((a.as_str(), b.as_str()), v.as_str()).map_err(e)?;
            }
            tx.commit().map_err(e)
        })
        .await
    }

    /// Endpoints that have a stored position (some may no longer exist).
    pub async fn endpoints_with_positions(&self) -> Result<Vec<String>, ConnectorError> {
        self.run(|db| {
            let tx = db.begin_read().map_err(e)?;
            let t = tx.open_table(POSITIONS).map_err(e)?;
            let mut out: Vec<String> = Vec::new();
            for item in t.iter().map_err(e)? {
                let name = item.map_err(e)?.0.value().0.to_owned();
                if out.last() != Some(&name) {
                    out.push(name);
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn add_dead_letter(&self, endpoint: &str, d: &DeadLetter) -> Result<(), ConnectorError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (name, v) = (endpoint.to_owned(), serde_json::to_vec(d).unwrap_or_default());
        self.run(move |db| {
            let tx = db.begin_write().map_err(e)?;
            tx.open_table(DEAD).map_err(e)?.insert((name.as_str(), seq), v.as_slice()).map_err(e)?;
            tx.commit().map_err(e)
        })
        .await
    }

    /// Dead letters of an endpoint, oldest first.
    pub async fn dead_letters(&self, endpoint: &str, limit: usize) -> Result<Vec<DeadLetter>, ConnectorError> {
        let name = endpoint.to_owned();
        self.run(move |db| {
            let tx = db.begin_read().map_err(e)?;
            let t = tx.open_table(DEAD).map_err(e)?;
            let mut out = Vec::new();
            for item in t.range((name.as_str(), 0)..=(name.as_str(), u64::MAX)).map_err(e)? {
                if out.len() >= limit {
                    break;
                }
                if let Ok(d) = serde_json::from_slice::<DeadLetter>(item.map_err(e)?.1.value()) {
                    out.push(d);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Deletes the dead letters of every endpoint that died before `before` (µs since the
    /// epoch); returns how many.
    pub async fn expire_dead_letters(&self, before_us: i64) -> Result<usize, ConnectorError> {
        self.run(move |db| {
            let tx = db.begin_write().map_err(e)?;
            let mut expired = 0;
            {
                let mut dead = tx.open_table(DEAD).map_err(e)?;
                dead.retain(|_, v| {
                    let died = serde_json::from_slice::<DeadLetter>(v)
                        .ok()
                        .and_then(|d| humantime::parse_rfc3339_weak(&d.dead_at).ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_micros() as i64);
                    // An entry that does not parse is kept: better a stale letter than a lost one.
                    let keep = died.is_none_or(|at| at >= before_us);
                    expired += usize::from(!keep);
                    keep
                })
                .map_err(e)?;
            }
            tx.commit().map_err(e)?;
            Ok(expired)
        })
        .await
    }

    /// Removes everything kept for an endpoint.
    pub async fn forget(&self, endpoint: &str) -> Result<(), ConnectorError> {
        let name = endpoint.to_owned();
        self.run(move |db| {
            let tx = db.begin_write().map_err(e)?;
            {
                tx.open_table(ENDPOINTS).map_err(e)?.remove(name.as_str()).map_err(e)?;
                tx.open_table(DISABLED).map_err(e)?.remove(name.as_str()).map_err(e)?;
                let mut dead = tx.open_table(DEAD).map_err(e)?;
                dead.retain_in((name.as_str(), 0)..=(name.as_str(), u64::MAX), |_, _| false).map_err(e)?;
                let mut pos = tx.open_table(POSITIONS).map_err(e)?;
                pos.retain(|(ep, _), _| ep != name.as_str()).map_err(e)?;
            }
            tx.commit().map_err(e)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(dead_at: &str) -> DeadLetter {
        DeadLetter {
            source: "a".into(),
            cursor: "0/1/1".into(),
            event_id: "a/0/1/1".into(),
            table: "public.t".into(),
            attempts: 3,
            last_error: Some("HTTP 500".into()),
            last_status: Some(500),
            dead_at: dead_at.into(),
            event: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn dead_letters_expire_by_age_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.redb")).unwrap();
        store.add_dead_letter("e1", &letter("2026-01-01T00:00:00.000000Z")).await.unwrap();
        store.add_dead_letter("e2", &letter("2026-01-01T00:00:00.000000Z")).await.unwrap();
        store.add_dead_letter("e1", &letter("2026-06-01T00:00:00.000000Z")).await.unwrap();
        let june = humantime::parse_rfc3339_weak("2026-05-01T00:00:00Z").unwrap();
        let cut = june.duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
        assert_eq!(store.expire_dead_letters(cut).await.unwrap(), 2);
        let left = store.dead_letters("e1", 10).await.unwrap();
        assert_eq!(left.iter().map(|d| d.dead_at.as_str()).collect::<Vec<_>>(), ["2026-06-01T00:00:00.000000Z"]);
        assert!(store.dead_letters("e2", 10).await.unwrap().is_empty());
        assert_eq!(store.expire_dead_letters(cut).await.unwrap(), 0);
    }
}
