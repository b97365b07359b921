//! The Redis Streams sink. Every delivery, in one atomic transaction:
//!
//! - `XADD` of its change event to one stream (capped with `MAXLEN ~`): fields `vm`,
//!   `report_id`, `idempotency_key` (`<vm>/<report id>`), `content_hash` and `event` (the change
//!   event's JSON, see `event.rs`; bounded, no inventory);
//! - the VM's hash `<prefix>:latest:<vm>` replaced, with a TTL: `report_id`, `content_hash`,
//!   `report` (the full report envelope `{"delivery": …, "report": …}`, zstd-compressed: read it
//!   with `redis-cli --raw HGET <prefix>:latest:<vm> report | zstd -d`) and `document` (the
//!   compact inventory the relay reads back as the base of the next delta).
//!
//! Durable only as far as the Redis server is: with `appendonly yes` and `appendfsync always`.
//! Many relays can feed one Redis; consumers read the stream with consumer groups. The
//! connection is made lazily and re-established automatically, so a Redis outage only delays
//! deliveries (the relay retries from its cache, the guests retransmit).

use std::time::SystemTime;

use redis::{AsyncCommands, aio::ConnectionManager};

use guestwatch_protocol::{ContentHash, Payload, PayloadEncoding};

use super::{
    Delivery, SinkError, SinkOptions, StoredInventory, envelope,
    event::{ChangeEvent, Changes},
};

/// zstd level of the stored report: quick, since every delivery pays it.
const REPORT_ZSTD_LEVEL: i32 = 3;

pub struct RedisSink {
    conn: ConnectionManager,
    describe: String,
    stream: String,
    maxlen: u64,
    latest_ttl_secs: u64,
    prefix: String,
}

fn err(e: redis::RedisError) -> SinkError {
    SinkError::Redis(e.to_string())
}

impl RedisSink {
    pub async fn connect(url: &str, options: &SinkOptions) -> Result<Self, SinkError> {
        let client =
            redis::Client::open(url).map_err(|e| SinkError::Config(format!("`{url}`: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            // Fail a request fast when Redis is down; the relay has its own retry schedule.
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(err)?;
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map(|i| format!("redis://{}", i.addr()))
            .unwrap_or_else(|_| "redis://?".into());
        Ok(Self {
            conn,
            describe: format!("{info} stream {}", options.redis_stream),
            stream: options.redis_stream.clone(),
            maxlen: options.redis_maxlen,
            latest_ttl_secs: options.redis_latest_ttl.as_secs().max(1),
            prefix: options.redis_prefix.clone(),
        })
    }

    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    fn latest_key(&self, vm: &str) -> String {
        format!("{}:latest:{vm}", self.prefix)
    }

    pub async fn deliver(&self, delivery: &Delivery, changes: &Changes) -> Result<u64, SinkError> {
        let delivered_at = SystemTime::now();
        let failed = |e: &dyn std::fmt::Display| SinkError::Redis(e.to_string());
        let event = ChangeEvent::new(delivery, changes, delivered_at)
            .to_json()
            .map_err(|e| failed(&e))?;
        let full = envelope(delivery, delivered_at).map_err(|e| failed(&e))?;
        let report = zstd::bulk::compress(&full, REPORT_ZSTD_LEVEL).map_err(|e| failed(&e))?;
        let key = delivery.idempotency_key();
        let latest = self.latest_key(&delivery.vm);
        let document = delivery.inventory.as_ref();
        let bytes = (event.len()
            + report.len()
            + document.map_or(0, |d| d.bytes.len())
            + key.len()
            + 2 * (delivery.report_id.len() + delivery.content_hash.len()))
            as u64;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*")
            .arg("vm")
            .arg(&delivery.vm)
            .arg("report_id")
            .arg(&delivery.report_id)
            .arg("idempotency_key")
            .arg(&key)
            .arg("content_hash")
            .arg(&delivery.content_hash)
            .arg("event")
            .arg(event)
            .ignore()
            // Replaced whole: an earlier report's inventory never outlives it.
            .del(&latest)
            .ignore()
            .cmd("HSET")
            .arg(&latest)
            .arg("report_id")
            .arg(&delivery.report_id)
            .arg("content_hash")
            .arg(&delivery.content_hash)
            .arg("report")
            .arg(report)
            .ignore();
        if let Some(document) = document {
            pipe.cmd("HSET")
                .arg(&latest)
                .arg("document")
                .arg(document.bytes.as_slice())
                .arg("document_encoding")
                .arg(if document.encoding == PayloadEncoding::DocumentZstd {
                    "zstd"
                } else {
                    "plain"
                })
                .ignore();
        }
        pipe.expire(&latest, self.latest_ttl_secs as i64).ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(err)?;
        Ok(bytes)
    }

    pub async fn latest_hash(&self, vm: &str) -> Result<Option<String>, SinkError> {
        let mut conn = self.conn.clone();
        conn.hget(self.latest_key(vm), "content_hash")
            .await
            .map_err(err)
    }

    pub async fn latest_inventory(&self, vm: &str) -> Result<Option<StoredInventory>, SinkError> {
        let mut conn = self.conn.clone();
        let (report_id, hash, document, encoding): (
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
            Option<String>,
        ) = redis::cmd("HMGET")
            .arg(self.latest_key(vm))
            .arg("report_id")
            .arg("content_hash")
            .arg("document")
            .arg("document_encoding")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        let (Some(report_id), Some(hash), Some(bytes)) = (report_id, hash, document) else {
            return Ok(None);
        };
        let encoding = match encoding.as_deref() {
            Some("zstd") => PayloadEncoding::DocumentZstd,
            Some("plain") => PayloadEncoding::Document,
            _ => return Ok(None),
        };
        Ok(
            ContentHash::from_hex(&hash).map(|content_hash| StoredInventory {
                report_id,
                content_hash,
                payload: Payload { encoding, bytes },
            }),
        )
    }
}
