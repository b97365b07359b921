//! The Redis Streams sink: every delivery is an `XADD` to one stream (capped with `MAXLEN ~`),
//! whose fields include `idempotency_key` (`<vm>/<report id>`), and the VM's latest report is
//! kept under `<prefix>:latest:<vm>` with a TTL, in one atomic transaction. Durable only as far
//! as the Redis server is: with `appendonly yes` and `appendfsync always`. Many relays can feed one Redis; consumers read the stream with consumer groups.
//! The connection is made lazily and re-established automatically, so a Redis outage only
//! delays deliveries (the relay retries from its cache, the guests retransmit).

use std::time::SystemTime;

use redis::{AsyncCommands, aio::ConnectionManager};

use super::{Delivery, DeliveryRecord, SinkError, SinkOptions, envelope};

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

    fn hash_key(&self, vm: &str) -> String {
        format!("{}:hash:{vm}", self.prefix)
    }

    pub async fn deliver(&self, delivery: &Delivery) -> Result<u64, SinkError> {
        let delivered_at = SystemTime::now();
        let record = serde_json::to_string(&DeliveryRecord::new(delivery, delivered_at))
            .map_err(|e| SinkError::Redis(e.to_string()))?;
        let key = delivery.idempotency_key();
        let latest =
            envelope(delivery, delivered_at).map_err(|e| SinkError::Redis(e.to_string()))?;
        let hash = format!("{} {}", delivery.report_id, delivery.content_hash);
        let bytes =
            (record.len() + delivery.report.len() + latest.len() + hash.len() + key.len()) as u64;
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
            .arg("delivery")
            .arg(record)
            .arg("report")
            .arg(delivery.report.as_ref())
            .ignore()
            .set_ex(self.latest_key(&delivery.vm), latest, self.latest_ttl_secs)
            .ignore()
            .set_ex(self.hash_key(&delivery.vm), hash, self.latest_ttl_secs)
            .ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(err)?;
        Ok(bytes)
    }

    pub async fn latest_hash(&self, vm: &str) -> Result<Option<String>, SinkError> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn.get(self.hash_key(vm)).await.map_err(err)?;
        Ok(value.and_then(|v| v.split_whitespace().nth(1).map(str::to_owned)))
    }
}
