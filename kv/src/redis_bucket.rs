//! Buckets in Redis.

use std::time::Duration;

use baton_wasm_shim::platform::keyvalue::{KvFuture, LIST_PAGE};
use baton_wasm_shim::{Bucket, KvError};
use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;
use tokio::sync::OnceCell;

use crate::StoreError;

/// How long one operation may wait on Redis: a guest's call fails then, rather than
/// hanging on a server that is gone.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on a Redis database used as a bucket. It connects at its first use, and
/// reconnects after a failure, so a pod starts while its Redis is still coming up.
pub struct RedisBucket {
    name: String,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    max_value: u64,
}

impl std::fmt::Debug for RedisBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBucket")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RedisBucket {
    /// A bucket named `name` (for errors) in the database at `url`, whose values may be
    /// at most `max_value` bytes each.
    pub fn new(name: &str, url: &str, max_value: u64) -> Result<Self, StoreError> {
        Ok(Self {
            name: name.to_string(),
            client: redis::Client::open(url).map_err(StoreError::RedisUrl)?,
            conn: OnceCell::new(),
            max_value,
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, KvError> {
        let conn = tokio::time::timeout(
            OP_TIMEOUT,
            self.conn
                .get_or_try_init(|| ConnectionManager::new(self.client.clone())),
        )
        .await
        .map_err(|_| self.timed_out())?
        .map_err(|e| {
            KvError::Backend(format!("connecting to Redis for bucket {}: {e}", self.name))
        })?;
        Ok(conn.clone())
    }

    fn too_big(&self, len: usize) -> KvError {
        KvError::Full {
            bucket: self.name.clone(),
            used: 0,
            cap: self.max_value,
            asked: len as u64,
        }
    }

    fn timed_out(&self) -> KvError {
        KvError::Backend(format!(
            "Redis of bucket {} did not answer in {OP_TIMEOUT:?}",
            self.name
        ))
    }

    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, KvError> {
        let mut conn = self.conn().await?;
        tokio::time::timeout(OP_TIMEOUT, op(&mut conn))
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| KvError::Backend(format!("Redis: {e}")))
    }
}

impl Bucket for RedisBucket {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>> {
        Box::pin(self.run(async move |c| c.get(key).await))
    }

    fn set<'a>(&'a self, key: &'a str, value: Vec<u8>) -> KvFuture<'a, ()> {
        Box::pin(async move {
            if value.len() as u64 > self.max_value {
                return Err(self.too_big(value.len()));
            }
            self.run(async |c| c.set(key, value).await).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, ()> {
        Box::pin(self.run(async move |c| c.del(key).await))
    }

    fn exists<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(self.run(async move |c| c.exists(key).await))
    }

    fn list_keys(&self, cursor: Option<u64>) -> KvFuture<'_, (Vec<String>, Option<u64>)> {
        Box::pin(async move {
            let (next, keys): (u64, Vec<String>) = self
                .run(async |c| {
                    redis::cmd("SCAN")
                        .arg(cursor.unwrap_or(0))
                        .arg("COUNT")
                        .arg(LIST_PAGE)
                        .query_async(c)
                        .await
                })
                .await?;
            Ok((keys, (next != 0).then_some(next)))
        })
    }

    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> KvFuture<'a, i64> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let r: redis::RedisResult<i64> =
                tokio::time::timeout(OP_TIMEOUT, conn.incr(key, delta))
                    .await
                    .map_err(|_| self.timed_out())?;
            match r {
                Ok(n) => Ok(n),
                // Redis refuses INCRBY on a value that is not an integer, or past i64.
                Err(e) if e.kind() == redis::ErrorKind::ResponseError => {
                    Err(KvError::NotACounter {
                        key: key.to_string(),
                    })
                }
                Err(e) => Err(KvError::Backend(format!("Redis: {e}"))),
            }
        })
    }

    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move {
            if value.len() as u64 > self.max_value {
                return Err(self.too_big(value.len()));
            }
            // One script, so that the compare and the write are one step for Redis.
            let script = redis::Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if (ARGV[1] == '0' and v == false) or (ARGV[1] == '1' and v == ARGV[2]) then
                    redis.call('SET', KEYS[1], ARGV[3])
                    return 1
                  end
                  return 0",
            );
            let (present, seen) = match expected {
                Some(v) => ("1", v),
                None => ("0", Vec::new()),
            };
            let swapped: i64 = self
                .run(async move |c| {
                    script
                        .key(key)
                        .arg(present)
                        .arg(seen)
                        .arg(value)
                        .invoke_async(c)
                        .await
                })
                .await?;
            Ok(swapped == 1)
        })
    }
}
