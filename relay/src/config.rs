//! `guestwatch-relay run` settings: flags, `GUESTWATCH_*` environment variables (via clap) and an
//! optional TOML file (`--config`, same keys as the long options with underscores), in that
//! order of precedence over built-in defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
pub use guestwatch_daemon::config::ConfigError;
use guestwatch_daemon::{
    config::{load_toml, pick_duration, pick_parsed},
    duration::parse_duration,
};
use serde::Deserialize;

use crate::{
    deliver::DeliveryConfig,
    listen::ConnectionLimits,
    pull::{PullConfig, PullTarget},
    sink::{HttpBody, SinkOptions},
};

/// Flags of `guestwatch-relay run`.
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Listen on this AF_VSOCK port (QEMU/KVM vhost-vsock hosts: libvirt, KubeVirt).
    #[arg(long, env = "GUESTWATCH_RELAY_VSOCK_PORT", value_name = "PORT")]
    pub vsock_port: Option<u32>,
    /// A hybrid-vsock VM (Firecracker, Cloud Hypervisor): listen on UDS_PATH_PORT for VM NAME.
    /// Repeatable; the environment variable takes a comma-separated list.
    #[arg(
        long,
        env = "GUESTWATCH_RELAY_HYBRID",
        value_name = "NAME=UDS_PATH",
        value_delimiter = ','
    )]
    pub hybrid: Vec<String>,
    /// The host port guests connect to on hybrid sockets. [default: 919]
    #[arg(long, env = "GUESTWATCH_RELAY_PORT", value_name = "PORT")]
    pub port: Option<u32>,
    /// Pull mode: dial VM NAME's agent (`guestwatch-agent run --listen`) at vsock:CID:PORT,
    /// hybrid:UDS_PATH:PORT (the VMM's socket, `CONNECT PORT` handshake) or unix:PATH, and
    /// hold a session with it. Repeatable; the environment variable takes a comma-separated
    /// list; a `pull = [...]` list in the TOML file is reloaded when the file changes.
    #[arg(
        long,
        env = "GUESTWATCH_RELAY_PULL",
        value_name = "NAME=ADDR",
        value_delimiter = ','
    )]
    pub pull: Vec<String>,
    /// Pull mode: dial every hybrid-vsock socket `NAME.vsock` in this directory as VM NAME, on
    /// guest port --pull-port; VMs come and go with their sockets.
    #[arg(long, env = "GUESTWATCH_RELAY_PULL_DIR", value_name = "DIR")]
    pub pull_dir: Option<PathBuf>,
    /// The guest port dialed for --pull-dir VMs. [default: 919]
    #[arg(long, env = "GUESTWATCH_RELAY_PULL_PORT", value_name = "PORT")]
    pub pull_port: Option<u32>,
    /// Cap of the per-VM redial backoff (a VM that is down is dialed at most this often once
    /// its backoff has grown). [default: 30s]
    #[arg(long, env = "GUESTWATCH_RELAY_PULL_MAX_BACKOFF", value_parser = parse_duration, value_name = "DURATION")]
    pub pull_max_backoff: Option<Duration>,
    /// A dial to a pulled VM (connect and the hybrid handshake) gives up after this long.
    /// [default: 5s]
    #[arg(long, env = "GUESTWATCH_RELAY_PULL_CONNECT_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub pull_connect_timeout: Option<Duration>,
    /// Where reports go: dir:DIR, http(s)://URL or redis://HOST[:PORT][/DB].
    /// [default: dir:/var/lib/guestwatch-relay]
    #[arg(long, env = "GUESTWATCH_RELAY_SINK", value_name = "SINK")]
    pub sink: Option<String>,
    /// Serve Prometheus metrics and /healthz on this address (e.g. 127.0.0.1:9918).
    #[arg(long, env = "GUESTWATCH_RELAY_METRICS", value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// File of `CID NAME` lines naming AF_VSOCK guests (unnamed CIDs become cid-N).
    #[arg(long, env = "GUESTWATCH_RELAY_CID_MAP", value_name = "FILE")]
    pub cid_map: Option<PathBuf>,
    /// Accept AF_VSOCK peers from CID 1 (the vsock_loopback transport): for running relay and
    /// agent in one machine in tests only.
    #[arg(long, env = "GUESTWATCH_RELAY_ALLOW_LOOPBACK_CID")]
    pub allow_loopback_cid: bool,
    /// Payload cache slots, one per VM; 0 disables the cache. [default: 100]
    #[arg(long, env = "GUESTWATCH_RELAY_CACHE_SLOTS", value_name = "N")]
    pub cache_slots: Option<usize>,
    /// Payload cache TTL; a sweep runs every TTL/2. [default: 4h]
    #[arg(long, env = "GUESTWATCH_RELAY_CACHE_TTL", value_parser = parse_duration, value_name = "DURATION")]
    pub cache_ttl: Option<Duration>,
    /// Reports per minute per VM; the excess is kept and delivered later. [default: 60]
    #[arg(long, env = "GUESTWATCH_RELAY_REPORTS_PER_MINUTE", value_name = "N")]
    pub reports_per_minute: Option<u32>,
    /// Bytes per minute per VM written to the sink (documents, records); over it reports are
    /// kept and delivered later; 0 = unlimited. [default: 67108864]
    #[arg(
        long,
        env = "GUESTWATCH_RELAY_MAX_SINK_BYTES_PER_MINUTE",
        value_name = "BYTES"
    )]
    pub max_sink_bytes_per_minute: Option<u64>,
    /// Open guest connections in total. [default: 1024]
    #[arg(long, env = "GUESTWATCH_RELAY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Open connections per VM. [default: 4]
    #[arg(
        long,
        env = "GUESTWATCH_RELAY_MAX_CONNECTIONS_PER_VM",
        value_name = "N"
    )]
    pub max_connections_per_vm: Option<usize>,
    /// Reports decompressed and delivered at once, over all VMs (bounds memory). [default: 32]
    #[arg(long, env = "GUESTWATCH_RELAY_MAX_INFLIGHT", value_name = "N")]
    pub max_inflight: Option<usize>,
    /// Largest frame accepted from a guest, in bytes. [default: 16777216]
    #[arg(long, env = "GUESTWATCH_RELAY_MAX_FRAME", value_name = "BYTES")]
    pub max_frame: Option<u32>,
    /// A frame must arrive completely within this long once it started. [default: 30s]
    #[arg(long, env = "GUESTWATCH_RELAY_READ_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub read_timeout: Option<Duration>,
    /// A connection with no message for this long is closed. [default: 120s]
    #[arg(long, env = "GUESTWATCH_RELAY_IDLE_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,
    /// A sink write slower than this counts as failed. [default: 15s]
    #[arg(long, env = "GUESTWATCH_RELAY_SINK_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub sink_timeout: Option<Duration>,
    /// /healthz answers 503 once sink writes have been failing this long. [default: 60s]
    #[arg(long, env = "GUESTWATCH_RELAY_SINK_UNHEALTHY_AFTER", value_parser = parse_duration, value_name = "DURATION")]
    pub sink_unhealthy_after: Option<Duration>,
    /// Memory for VMs' latest inventories (the bases of delta reports), in bytes; beyond it
    /// the least recently used are read back from the sink when needed. [default: 268435456]
    #[arg(
        long,
        env = "GUESTWATCH_RELAY_INVENTORY_CACHE_BYTES",
        value_name = "BYTES"
    )]
    pub inventory_cache_bytes: Option<usize>,
    /// HTTP sink: what a POST carries: the change event and the full report (both), the full
    /// report alone (full), or the change event alone (change). [default: both]
    #[arg(
        long,
        env = "GUESTWATCH_RELAY_HTTP_BODY",
        value_enum,
        value_name = "BODY"
    )]
    pub http_body: Option<HttpBody>,
    /// HTTP sink: file holding a bearer token.
    #[arg(long, env = "GUESTWATCH_RELAY_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
    /// HTTP sink: extra CA certificates (PEM) to trust.
    #[arg(long, env = "GUESTWATCH_RELAY_HTTP_CA_FILE", value_name = "FILE")]
    pub http_ca_file: Option<PathBuf>,
    /// Redis sink: stream name. [default: guestwatch:reports]
    #[arg(long, env = "GUESTWATCH_RELAY_REDIS_STREAM", value_name = "KEY")]
    pub redis_stream: Option<String>,
    /// Redis sink: approximate stream length cap (XADD MAXLEN ~). [default: 100000]
    #[arg(long, env = "GUESTWATCH_RELAY_REDIS_MAXLEN", value_name = "N")]
    pub redis_maxlen: Option<u64>,
    /// Redis sink: TTL of the per-VM latest-report keys. [default: 7d]
    #[arg(long, env = "GUESTWATCH_RELAY_REDIS_LATEST_TTL", value_parser = parse_duration, value_name = "DURATION")]
    pub redis_latest_ttl: Option<Duration>,
    /// Redis sink: key prefix. [default: guestwatch]
    #[arg(long, env = "GUESTWATCH_RELAY_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// TOML configuration file (same keys as the options).
    #[arg(long, env = "GUESTWATCH_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The TOML file's keys.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub vsock_port: Option<u32>,
    pub hybrid: Option<Vec<String>>,
    pub port: Option<u32>,
    pub pull: Option<Vec<String>>,
    pub pull_dir: Option<PathBuf>,
    pub pull_port: Option<u32>,
    pub pull_max_backoff: Option<String>,
    pub pull_connect_timeout: Option<String>,
    pub sink: Option<String>,
    pub metrics: Option<String>,
    pub cid_map: Option<PathBuf>,
    pub allow_loopback_cid: Option<bool>,
    pub cache_slots: Option<usize>,
    pub cache_ttl: Option<String>,
    pub reports_per_minute: Option<u32>,
    pub max_sink_bytes_per_minute: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_vm: Option<usize>,
    pub max_inflight: Option<usize>,
    pub max_frame: Option<u32>,
    pub read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub sink_timeout: Option<String>,
    pub sink_unhealthy_after: Option<String>,
    pub inventory_cache_bytes: Option<usize>,
    pub http_body: Option<HttpBody>,
    pub http_token_file: Option<PathBuf>,
    pub http_ca_file: Option<PathBuf>,
    pub redis_stream: Option<String>,
    pub redis_maxlen: Option<u64>,
    pub redis_latest_ttl: Option<String>,
    pub redis_prefix: Option<String>,
}

/// A hybrid-vsock VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridVm {
    pub name: String,
    pub uds_path: PathBuf,
}

/// Resolved settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub vsock_port: Option<u32>,
    pub hybrid: Vec<HybridVm>,
    pub port: u32,
    /// VMs dialed at start (from the flags, or else the file).
    pub pull: Vec<PullTarget>,
    /// The pull targets came from the file: a reload re-reads them there.
    pub pull_from_file: bool,
    pub pull_dir: Option<PathBuf>,
    pub pull_port: u32,
    pub pull_config: PullConfig,
    /// The TOML file, for reloads.
    pub config_file: Option<PathBuf>,
    pub sink: String,
    pub sink_options: SinkOptions,
    pub metrics: Option<SocketAddr>,
    pub cid_map: Option<PathBuf>,
    pub allow_loopback_cid: bool,
    pub delivery: DeliveryConfig,
    pub limits: ConnectionLimits,
    pub max_frame: u32,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

fn parse_hybrid(spec: &str) -> Result<HybridVm, ConfigError> {
    let (name, path) = spec.split_once('=').ok_or_else(|| ConfigError::Invalid {
        key: "hybrid",
        message: format!("`{spec}`: expected NAME=UDS_PATH"),
    })?;
    if !crate::identity::valid_vm_name(name) {
        return Err(ConfigError::Invalid {
            key: "hybrid",
            message: format!("`{name}` is not a valid VM name (letters, digits, . _ -)"),
        });
    }
    if path.is_empty() {
        return Err(ConfigError::Invalid {
            key: "hybrid",
            message: format!("`{spec}`: empty socket path"),
        });
    }
    Ok(HybridVm {
        name: name.to_owned(),
        uds_path: PathBuf::from(path),
    })
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// The pull targets the file lists.
    pub fn pull_targets(&self) -> Result<Vec<PullTarget>, ConfigError> {
        parse_pull(self.pull.as_deref().unwrap_or_default())
    }
}

fn parse_pull(specs: &[String]) -> Result<Vec<PullTarget>, ConfigError> {
    let targets = specs
        .iter()
        .map(|s| {
            s.parse::<PullTarget>()
                .map_err(|message| ConfigError::Invalid {
                    key: "pull",
                    message,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = std::collections::HashSet::new();
    for t in &targets {
        if !names.insert(t.name.as_str()) {
            return Err(ConfigError::Invalid {
                key: "pull",
                message: format!("VM `{}` is listed twice", t.name),
            });
        }
    }
    Ok(targets)
}

/// A pull target must not take the name of a VM that pushes through a hybrid socket: the two
/// are different VMs and would share one VM's limits, cache and sink entries.
pub fn check_pull_names(targets: &[PullTarget], hybrid: &[HybridVm]) -> Result<(), ConfigError> {
    for t in targets {
        if hybrid.iter().any(|h| h.name == t.name) {
            return Err(ConfigError::Invalid {
                key: "pull",
                message: format!(
                    "VM `{}` is both a --hybrid VM and a pull target: names must be unique",
                    t.name
                ),
            });
        }
    }
    Ok(())
}

impl Settings {
    pub fn resolve(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let hybrid_specs = if args.hybrid.is_empty() {
            file.hybrid.clone().unwrap_or_default()
        } else {
            args.hybrid.clone()
        };
        let hybrid = hybrid_specs
            .iter()
            .map(|s| parse_hybrid(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut names = std::collections::HashSet::new();
        for vm in &hybrid {
            if !names.insert(vm.name.clone()) {
                return Err(ConfigError::Invalid {
                    key: "hybrid",
                    message: format!("VM `{}` is listed twice", vm.name),
                });
            }
        }
        let pull_from_file = args.pull.is_empty();
        let pull = if pull_from_file {
            file.pull_targets()?
        } else {
            parse_pull(&args.pull)?
        };
        check_pull_names(&pull, &hybrid)?;
        let pull_dir = args.pull_dir.clone().or(file.pull_dir.clone());
        let vsock_port = args.vsock_port.or(file.vsock_port);
        // A file that may list pull targets later (it is reloaded) counts as something to do.
        let may_pull = !pull.is_empty()
            || pull_dir.is_some()
            || (pull_from_file && file.pull.is_some() && args.config.is_some());
        if vsock_port.is_none() && hybrid.is_empty() && !may_pull {
            return Err(ConfigError::Invalid {
                key: "listeners",
                message: "nothing to do: give --vsock-port PORT, --hybrid NAME=UDS_PATH, \
                          --pull NAME=ADDR and/or --pull-dir DIR"
                    .into(),
            });
        }
        let pull_defaults = PullConfig::default();
        let pull_config = PullConfig {
            connect_timeout: pick_duration(
                args.pull_connect_timeout,
                &file.pull_connect_timeout,
                "pull_connect_timeout",
            )?
            .unwrap_or(pull_defaults.connect_timeout),
            max_backoff: pick_duration(
                args.pull_max_backoff,
                &file.pull_max_backoff,
                "pull_max_backoff",
            )?
            .unwrap_or(pull_defaults.max_backoff),
        };
        let metrics = pick_parsed(args.metrics, &file.metrics, "metrics")?;
        let token_file = args
            .http_token_file
            .clone()
            .or(file.http_token_file.clone());
        let bearer_token = match token_file {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let defaults = SinkOptions::defaults();
        let delivery_defaults = DeliveryConfig::default();
        let sink_timeout = pick_duration(args.sink_timeout, &file.sink_timeout, "sink_timeout")?
            .unwrap_or(delivery_defaults.sink_timeout);
        Ok(Self {
            vsock_port,
            hybrid,
            port: args.port.or(file.port).unwrap_or(919),
            pull,
            pull_from_file,
            pull_dir,
            pull_port: args.pull_port.or(file.pull_port).unwrap_or(919),
            pull_config,
            config_file: args.config.clone(),
            sink: args
                .sink
                .clone()
                .or(file.sink.clone())
                .unwrap_or_else(|| "dir:/var/lib/guestwatch-relay".into()),
            sink_options: SinkOptions {
                bearer_token,
                ca_file: args.http_ca_file.clone().or(file.http_ca_file.clone()),
                timeout: sink_timeout,
                redis_stream: args
                    .redis_stream
                    .clone()
                    .or(file.redis_stream.clone())
                    .unwrap_or(defaults.redis_stream),
                redis_maxlen: args
                    .redis_maxlen
                    .or(file.redis_maxlen)
                    .unwrap_or(defaults.redis_maxlen),
                redis_latest_ttl: pick_duration(
                    args.redis_latest_ttl,
                    &file.redis_latest_ttl,
                    "redis_latest_ttl",
                )?
                .unwrap_or(defaults.redis_latest_ttl),
                redis_prefix: args
                    .redis_prefix
                    .clone()
                    .or(file.redis_prefix.clone())
                    .unwrap_or(defaults.redis_prefix),
                http_body: args
                    .http_body
                    .or(file.http_body)
                    .unwrap_or(defaults.http_body),
            },
            metrics,
            cid_map: args.cid_map.clone().or(file.cid_map.clone()),
            allow_loopback_cid: args.allow_loopback_cid || file.allow_loopback_cid.unwrap_or(false),
            delivery: DeliveryConfig {
                reports_per_minute: args
                    .reports_per_minute
                    .or(file.reports_per_minute)
                    .unwrap_or(delivery_defaults.reports_per_minute),
                sink_timeout,
                cache_slots: args
                    .cache_slots
                    .or(file.cache_slots)
                    .unwrap_or(delivery_defaults.cache_slots),
                cache_ttl: pick_duration(args.cache_ttl, &file.cache_ttl, "cache_ttl")?
                    .unwrap_or(delivery_defaults.cache_ttl),
                max_inflight: args
                    .max_inflight
                    .or(file.max_inflight)
                    .unwrap_or(delivery_defaults.max_inflight)
                    .max(1),
                max_sink_bytes_per_minute: args
                    .max_sink_bytes_per_minute
                    .or(file.max_sink_bytes_per_minute)
                    .unwrap_or(delivery_defaults.max_sink_bytes_per_minute),
                sink_unhealthy_after: pick_duration(
                    args.sink_unhealthy_after,
                    &file.sink_unhealthy_after,
                    "sink_unhealthy_after",
                )?
                .unwrap_or(delivery_defaults.sink_unhealthy_after),
                inventory_cache_bytes: args
                    .inventory_cache_bytes
                    .or(file.inventory_cache_bytes)
                    .unwrap_or(delivery_defaults.inventory_cache_bytes),
                ..delivery_defaults
            },
            limits: ConnectionLimits {
                total: args
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or(1024)
                    .max(1),
                per_vm: args
                    .max_connections_per_vm
                    .or(file.max_connections_per_vm)
                    .unwrap_or(4)
                    .max(1),
            },
            max_frame: args
                .max_frame
                .or(file.max_frame)
                .unwrap_or(16 * 1024 * 1024),
            read_timeout: pick_duration(args.read_timeout, &file.read_timeout, "read_timeout")?
                .unwrap_or(Duration::from_secs(30)),
            idle_timeout: pick_duration(args.idle_timeout, &file.idle_timeout, "idle_timeout")?
                .unwrap_or(Duration::from_secs(120)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_specs() {
        assert_eq!(
            parse_hybrid("vm1=/run/fc/vm1.vsock").unwrap(),
            HybridVm {
                name: "vm1".into(),
                uds_path: "/run/fc/vm1.vsock".into()
            }
        );
        assert!(parse_hybrid("vm1").is_err());
        assert!(parse_hybrid("../x=/run/x").is_err());
        assert!(parse_hybrid("vm1=").is_err());
    }

    #[test]
    fn the_packaged_configuration_parses_with_and_without_its_examples() {
        let text = include_str!("../../packaging/config/relay.toml");
        let file: FileConfig = toml::from_str(text).unwrap();
        assert_eq!(file.vsock_port, Some(919));
        let example = |rest: &str| {
            rest.starts_with(|c: char| c.is_ascii_lowercase()) && rest.contains(" = ")
                || rest.trim_start().starts_with('"')
                || rest.trim() == "]"
        };
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if example(rest) => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let all: FileConfig = toml::from_str(&uncommented).unwrap();
        assert_eq!(all.pull_targets().unwrap().len(), 2);
        assert!(all.pull_dir.is_some() && all.cid_map.is_some() && all.metrics.is_some());
    }

    #[test]
    fn pull_targets_from_flags_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "pull = [\"a=unix:/run/a.sock\", \"b=hybrid:/run/fc/b.vsock:919\"]\npull_max_backoff = \"10s\"\n",
        )
        .unwrap();
        let from_file = Settings::resolve(&RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(from_file.pull_from_file);
        assert_eq!(from_file.pull.len(), 2);
        assert_eq!(from_file.pull_config.max_backoff, Duration::from_secs(10));
        assert_eq!(from_file.pull_port, 919);
        let from_flags = Settings::resolve(&RunArgs {
            config: Some(path),
            pull: vec!["c=vsock:7:919".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(!from_flags.pull_from_file);
        assert_eq!(from_flags.pull[0].name, "c");
        // A pull-dir alone is something to do.
        assert!(
            Settings::resolve(&RunArgs {
                pull_dir: Some(dir.path().into()),
                ..Default::default()
            })
            .is_ok()
        );
        for bad in [
            vec!["a=unix:/x".to_owned(), "a=unix:/y".to_owned()],
            vec!["a=vsock:2:919".to_owned()],
        ] {
            assert!(
                Settings::resolve(&RunArgs {
                    pull: bad.clone(),
                    ..Default::default()
                })
                .is_err(),
                "{bad:?}"
            );
        }
        let clash = Settings::resolve(&RunArgs {
            pull: vec!["a=unix:/x".into()],
            hybrid: vec!["a=/run/a.vsock".into()],
            ..Default::default()
        });
        assert!(clash.unwrap_err().to_string().contains("unique"));
    }

    #[test]
    fn needs_a_listener_and_merges_file_and_flags() {
        assert!(Settings::resolve(&RunArgs::default()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "hybrid = [\"a=/run/a.sock\"]\ncache_slots = 7\ncache_ttl = \"1h\"\nsink = \"dir:/srv\"\nmax_sink_bytes_per_minute = 1000\nsink_unhealthy_after = \"5s\"\n").unwrap();
        let args = RunArgs {
            config: Some(path),
            cache_slots: Some(3),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.hybrid[0].name, "a");
        assert_eq!(s.delivery.cache_slots, 3, "flags win");
        assert_eq!(
            s.delivery.cache_ttl,
            Duration::from_secs(3600),
            "file wins over defaults"
        );
        assert_eq!(s.sink, "dir:/srv");
        assert_eq!(s.port, 919);
        assert_eq!(s.max_frame, 16 * 1024 * 1024);
        assert_eq!(s.delivery.max_sink_bytes_per_minute, 1000);
        assert_eq!(s.delivery.sink_unhealthy_after, Duration::from_secs(5));
        let defaults = Settings::resolve(&RunArgs {
            hybrid: vec!["a=/run/a.sock".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(defaults.delivery.max_sink_bytes_per_minute, 64 << 20);
        assert_eq!(
            defaults.delivery.sink_unhealthy_after,
            Duration::from_secs(60)
        );
    }
}
