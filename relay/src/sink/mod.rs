//! Sinks: where delivered reports go. The relay acknowledges a guest only after its sink has
//! durably accepted the report. Every delivery gives the sink the full report and its change
//! event (`event.rs`); each sink keeps one latest inventory per VM.
//!
//! - `dir:DIR` — per VM `DIR/vms/<vm>/latest.json` (and its compact inventory), one line per
//!   delivery appended to `DIR/deliveries.jsonl` and to `DIR/changes.jsonl` (the default);
//! - `http(s)://…` — POST of the change event, the full report, or both (`--http-body`), 2xx =
//!   accepted, report id as idempotency key;
//! - `redis://…` — the change event `XADD`ed to a stream, and the latest full report and
//!   inventory per VM in a hash with a TTL.
//!
//! Every sink can tell whether it already holds a VM's report with a given content hash, so a
//! retransmitted report is acknowledged as a duplicate at once; the dir and Redis sinks also
//! give back the VM's latest compact inventory, the base of the next delta report after a relay
//! restart.

pub mod dir;
pub mod event;
pub mod http;
pub mod redis;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use guestwatch_protocol::{
    Attribution, ChangeCounts, ContentHash, Payload, Trigger, TriggerKind, inventory::Document,
};
use serde::{Serialize, ser::SerializeMap};

use self::event::Changes;
use crate::identity::IdentitySource;

/// A VM's latest compact inventory as a sink stores it.
#[derive(Clone, Debug)]
pub struct StoredInventory {
    pub report_id: String,
    pub content_hash: ContentHash,
    /// The compact document (`Document` or `DocumentZstd`).
    pub payload: Payload,
}

/// What a delta report said about its base: which (name, arch) groups it touched.
#[derive(Clone, Debug)]
pub struct DeltaInfo {
    pub base_hash: ContentHash,
    pub touched: std::sync::Arc<std::collections::BTreeSet<(String, String)>>,
}

/// What the guest says about itself in `Hello` (a claim, never its identity).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Claims {
    /// The agent's epoch, 16 hex digits.
    pub epoch: String,
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub detector: String,
}

/// A report on its way to the sink. `report` is the claircore JSON the guest sent (already
/// checked to be one well-formed JSON object); everything else is the relay's own knowledge,
/// except `trigger`, `transactions`, `tampers`, `coalesced`, `changes` and `claims`, which are
/// what the guest says (in the one schema of the `protocol` crate).
#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    /// The VM, named from its kernel-provided identity.
    pub vm: String,
    /// How the VM was identified (peer CID or the socket it arrived on).
    pub identity: IdentitySource,
    /// `<epoch hex>-<generation>`: stable across retransmissions (see
    /// [`Delivery::idempotency_key`]).
    pub report_id: String,
    /// SHA-256 of the package set, hex (computed by the guest; a claim).
    pub content_hash: String,
    /// The guest's account of the scan's cause and its attribution (a claim).
    pub trigger: Trigger,
    /// Every transaction the scan answers (a claim).
    pub transactions: Vec<Attribution>,
    /// Every tamper record the scan answers (a claim).
    pub tampers: Vec<Attribution>,
    /// How many triggers of each kind the scan answers (a claim).
    #[serde(serialize_with = "kind_counts")]
    pub coalesced: Vec<(TriggerKind, u32)>,
    /// Package changes since the guest's previous report, by class (a claim).
    #[serde(serialize_with = "change_counts")]
    pub changes: ChangeCounts,
    /// What the guest says about itself in `Hello`.
    pub claims: Claims,
    /// When the guest says it scanned (a claim).
    #[serde(serialize_with = "opt_time")]
    pub scanned_at: Option<SystemTime>,
    /// When the relay received the report.
    #[serde(serialize_with = "time")]
    pub received_at: SystemTime,
    /// Number of packages the guest reported (a claim).
    pub package_count: u64,
    #[serde(skip)]
    pub report: bytes::Bytes,
    /// The compact document the report was rendered from (protocol version 2 agents), the base
    /// a later delta is applied to.
    #[serde(skip)]
    pub document: Option<std::sync::Arc<Document>>,
    /// The same as the sink stores it (compressed).
    #[serde(skip)]
    pub inventory: Option<Payload>,
    /// Set when the report came as a delta.
    #[serde(skip)]
    pub delta: Option<DeltaInfo>,
}

impl Delivery {
    /// `<vm>/<epoch hex>-<generation>`: what every sink deduplicates by. The VM's name is part
    /// of it because VMs cloned from one image can share an agent epoch, and so report ids.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}", self.vm, self.report_id)
    }
}

/// The largest delivery record a guest can cause, JSON-encoded: the guest bounds
/// (`protocol::guest`, 64 KiB of encoded facts, 256-byte claims) with every character escaped
/// at 6 bytes (see the test). A dir-sink delivery writes the record twice (log line and
/// `latest.json`) beside the report.
pub const MAX_RECORD: usize = 512 * 1024;

/// The metadata written beside the report (`delivery` key of `latest.json`, one
/// `deliveries.jsonl` line, the Redis stream entry's fields).
#[derive(Serialize)]
pub struct DeliveryRecord<'a> {
    #[serde(flatten)]
    pub delivery: &'a Delivery,
    /// [`Delivery::idempotency_key`].
    pub idempotency_key: String,
    #[serde(serialize_with = "time")]
    pub delivered_at: SystemTime,
}

impl<'a> DeliveryRecord<'a> {
    pub fn new(delivery: &'a Delivery, delivered_at: SystemTime) -> Self {
        Self {
            delivery,
            idempotency_key: delivery.idempotency_key(),
            delivered_at,
        }
    }
}

/// Why a sink did not accept a report. Every failure is retried (from the cache, and by the
/// guest); `retry_after` is a hint from the sink (HTTP `Retry-After`).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP sink: {0}")]
    Http(String),
    #[error("HTTP sink answered {status}")]
    HttpStatus {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("Redis sink: {0}")]
    Redis(String),
    #[error("invalid sink configuration: {0}")]
    Config(String),
}

impl SinkError {
    /// How long the sink asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::HttpStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short, label-safe reason for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Http(_) | Self::HttpStatus { .. } => "http",
            Self::Redis(_) => "redis",
            Self::Config(_) => "config",
        }
    }
}

/// The configured sink.
pub enum Sink {
    Dir(dir::DirSink),
    Http(http::HttpSink),
    Redis(redis::RedisSink),
}

/// Options that only some sinks use.
#[derive(Clone, Debug, Default)]
pub struct SinkOptions {
    /// HTTP: bearer token sent as `Authorization: Bearer …`.
    pub bearer_token: Option<String>,
    /// HTTP: extra CA certificates (PEM) to trust, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// HTTP: per-request timeout.
    pub timeout: Duration,
    /// Redis: the stream reports are added to.
    pub redis_stream: String,
    /// Redis: approximate stream length cap (`MAXLEN ~`).
    pub redis_maxlen: u64,
    /// Redis: TTL of the per-VM latest-report keys.
    pub redis_latest_ttl: Duration,
    /// Redis: key prefix.
    pub redis_prefix: String,
    /// HTTP: what a POST carries.
    pub http_body: HttpBody,
}

/// What the HTTP sink POSTs per delivery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpBody {
    /// `{"delivery": …, "report": …}`.
    Full,
    /// The change event alone.
    Change,
    /// `{"change": …, "delivery": …, "report": …}`.
    #[default]
    Both,
}

impl SinkOptions {
    pub fn defaults() -> Self {
        Self {
            bearer_token: None,
            ca_file: None,
            timeout: Duration::from_secs(10),
            redis_stream: "guestwatch:reports".into(),
            redis_maxlen: 100_000,
            redis_latest_ttl: Duration::from_secs(7 * 86_400),
            redis_prefix: "guestwatch".into(),
            http_body: HttpBody::Both,
        }
    }
}

impl Sink {
    /// Builds the sink named by `--sink` (`dir:DIR`, `http(s)://…`, `redis(s)://…`).
    pub async fn open(spec: &str, options: &SinkOptions) -> Result<Self, SinkError> {
        if let Some(dir) = spec.strip_prefix("dir:") {
            return Ok(Self::Dir(dir::DirSink::open(dir.into()).await?));
        }
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return Ok(Self::Http(http::HttpSink::new(spec, options)?));
        }
        if spec.starts_with("redis://") || spec.starts_with("rediss://") {
            return Ok(Self::Redis(redis::RedisSink::connect(spec, options).await?));
        }
        Err(SinkError::Config(format!(
            "`{spec}`: expected dir:DIR, http(s)://URL or redis(s)://HOST[:PORT][/DB]"
        )))
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Dir(s) => format!("dir:{}", s.root().display()),
            Self::Http(s) => s.url().to_owned(),
            Self::Redis(s) => s.describe(),
        }
    }

    /// Stores the report and its change event durably. Returns when the sink has them, with
    /// the number of bytes written (what the VM's sink budget is charged).
    pub async fn deliver(&self, delivery: &Delivery, changes: &Changes) -> Result<u64, SinkError> {
        match self {
            Self::Dir(s) => s.deliver(delivery, changes).await,
            Self::Http(s) => s.deliver(delivery, changes).await,
            Self::Redis(s) => s.deliver(delivery, changes).await,
        }
    }

    /// The VM's latest compact inventory in the sink, if the sink keeps one.
    pub async fn latest_inventory(&self, vm: &str) -> Result<Option<StoredInventory>, SinkError> {
        match self {
            Self::Dir(s) => s.latest_inventory(vm).await,
            // Nothing to read back: a relay restart costs each VM one full report.
            Self::Http(_) => Ok(None),
            Self::Redis(s) => s.latest_inventory(vm).await,
        }
    }

    /// The content hash of the VM's latest report in the sink, if the sink can tell.
    pub async fn latest_hash(&self, vm: &str) -> Result<Option<String>, SinkError> {
        match self {
            Self::Dir(s) => s.latest_hash(vm).await,
            // An HTTP endpoint cannot be asked; the relay's memory and the idempotency key
            // cover retransmissions.
            Self::Http(_) => Ok(None),
            Self::Redis(s) => s.latest_hash(vm).await,
        }
    }
}

fn kind_counts<S: serde::Serializer>(
    counts: &[(TriggerKind, u32)],
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(counts.len()))?;
    for (kind, n) in counts {
        map.serialize_entry(kind.as_str(), n)?;
    }
    map.end()
}

fn change_counts<S: serde::Serializer>(c: &ChangeCounts, s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(5))?;
    map.serialize_entry("added", &c.added)?;
    map.serialize_entry("removed", &c.removed)?;
    map.serialize_entry("upgraded", &c.upgraded)?;
    map.serialize_entry("downgraded", &c.downgraded)?;
    map.serialize_entry("reinstalled", &c.reinstalled)?;
    map.end()
}

fn time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => time(t, s),
        None => s.serialize_none(),
    }
}

/// `{"delivery": {…}, "report": <the guest's JSON>}` — the report bytes are spliced in as they
/// came (they were validated as JSON on receipt), never re-encoded.
pub fn envelope(
    delivery: &Delivery,
    delivered_at: SystemTime,
) -> Result<Vec<u8>, serde_json::Error> {
    let head = envelope_head(delivery, delivered_at)?;
    let mut out = Vec::with_capacity(head.len() + delivery.report.len() + ENVELOPE_TAIL.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&delivery.report);
    out.extend_from_slice(ENVELOPE_TAIL);
    Ok(out)
}

/// What comes before the report in [`envelope`] (a sink that writes the parts one after the
/// other needs no copy of a report that may be 64 MiB).
pub fn envelope_head(
    delivery: &Delivery,
    delivered_at: SystemTime,
) -> Result<Vec<u8>, serde_json::Error> {
    let record = serde_json::to_vec(&DeliveryRecord::new(delivery, delivered_at))?;
    let mut head = Vec::with_capacity(record.len() + 24);
    head.extend_from_slice(b"{\"delivery\":");
    head.extend_from_slice(&record);
    head.extend_from_slice(b",\"report\":");
    Ok(head)
}

/// What comes after the report in [`envelope`].
pub const ENVELOPE_TAIL: &[u8] = b"}\n";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn delivery(vm: &str, generation: u64, hash: &str) -> Delivery {
        Delivery {
            vm: vm.to_owned(),
            identity: IdentitySource::Hybrid {
                socket: PathBuf::from("/run/vm.sock_919"),
            },
            report_id: format!("00000000000000aa-{generation}"),
            content_hash: hash.to_owned(),
            trigger: Trigger::new(TriggerKind::Transaction).with_attribution(Attribution {
                pid: 42,
                comm: "rpm".into(),
                ..Default::default()
            }),
            transactions: Vec::new(),
            tampers: Vec::new(),
            coalesced: vec![(TriggerKind::Transaction, 1)],
            changes: ChangeCounts::default(),
            claims: Claims {
                hostname: "guest".into(),
                ..Default::default()
            },
            scanned_at: Some(SystemTime::UNIX_EPOCH),
            received_at: SystemTime::UNIX_EPOCH,
            package_count: 1,
            report: bytes::Bytes::from_static(
                br#"{"packages":{"1":{"name":"bash"}},"success":true}"#,
            ),
            document: None,
            inventory: None,
            delta: None,
        }
    }

    #[test]
    fn envelope_splices_the_report() {
        let d = delivery("vm1", 3, "ab");
        let bytes = envelope(&d, SystemTime::UNIX_EPOCH).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["report"]["packages"]["1"]["name"], "bash");
        assert_eq!(v["delivery"]["vm"], "vm1");
        assert_eq!(v["delivery"]["report_id"], "00000000000000aa-3");
        assert_eq!(v["delivery"]["idempotency_key"], "vm1/00000000000000aa-3");
        assert_eq!(v["delivery"]["identity"]["source"], "hybrid");
        assert_eq!(v["delivery"]["trigger"]["attribution"]["comm"], "rpm");
        assert_eq!(v["delivery"]["coalesced"]["transaction"], 1);
        assert_eq!(v["delivery"]["changes"]["upgraded"], 0);
        assert_eq!(v["delivery"]["claims"]["hostname"], "guest");
        assert_eq!(v["delivery"]["delivered_at"], "1970-01-01T00:00:00.000Z");
    }

    /// The largest facts a guest may send, every string control characters (6 bytes each in
    /// JSON): the delivery record (`deliveries.jsonl` line, `delivery` of `latest.json`, the
    /// Redis entry's `delivery`) stays within [`MAX_RECORD`].
    #[test]
    fn a_delivery_record_is_bounded_by_the_guest_bounds() {
        use guestwatch_protocol::{Ancestor, ReportFacts, guest};
        let name = "\u{1}".repeat(guest::MAX_NAME);
        let text = "\u{1}".repeat(guest::MAX_TEXT);
        let attribution = Attribution {
            comm: name.clone(),
            exe: Some(text.clone()),
            tty: Some(name.clone()),
            cmdline: vec!["\u{1}".repeat(64); guest::MAX_CMDLINE_ARGS],
            ancestors: vec![
                Ancestor {
                    pid: u32::MAX,
                    comm: name.clone(),
                    exe: Some(text.clone()),
                };
                guest::MAX_ANCESTORS
            ],
            unit: Some(name.clone()),
            database: Some(text.clone()),
            library: Some(text.clone()),
            operation: Some(name.clone()),
            paths: vec![String::new(); guest::MAX_PATHS],
            ..Default::default()
        };
        let mut facts = ReportFacts {
            trigger: Trigger::new(TriggerKind::Tamper)
                .with_detail(text.clone())
                .with_attribution(attribution.clone()),
            transactions: vec![attribution.clone(); guest::MAX_LISTED],
            tampers: vec![attribution; guest::MAX_LISTED],
            coalesced: vec![(TriggerKind::Tamper, u32::MAX); guest::MAX_SMALL_LIST],
            agent_version: name.clone(),
            detector: name.clone(),
            ..Default::default()
        };
        facts.fit();
        facts.check_limits().unwrap();
        // Many small records cost more JSON per encoded byte than a few long strings.
        let mut empty = ReportFacts {
            transactions: vec![Attribution::default(); guest::MAX_LISTED],
            tampers: vec![
                Attribution {
                    ancestors: vec![Ancestor::default(); guest::MAX_ANCESTORS],
                    paths: vec![String::new(); guest::MAX_PATHS],
                    ..Default::default()
                };
                guest::MAX_LISTED
            ],
            ..Default::default()
        };
        empty.fit();
        for facts in [facts, empty] {
            facts.check_limits().unwrap();
            println!(
                "facts: {} bytes encoded",
                guestwatch_protocol::encoded_len(&facts)
            );
            let mut d = delivery("vm1", 1, &"f".repeat(64));
            d.trigger = facts.trigger;
            d.transactions = facts.transactions;
            d.tampers = facts.tampers;
            d.coalesced = facts.coalesced;
            d.claims = Claims {
                epoch: "f".repeat(16),
                agent_version: name.clone(),
                hostname: name.clone(),
                os: name.clone(),
                kernel: name.clone(),
                detector: name.clone(),
            };
            let record = serde_json::to_vec(&DeliveryRecord::new(&d, SystemTime::now())).unwrap();
            println!("record: {} bytes", record.len());
            assert!(record.len() <= MAX_RECORD, "{} bytes", record.len());
        }
    }
}
