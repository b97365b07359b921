//! Settings from flags, `GUESTWATCH_*` environment variables and an optional TOML file, in that
//! order of precedence, over built-in defaults.
//!
//! The file uses the long option names with underscores:
//!
//! ```toml
//! root = "/"
//! relay = "vsock:2:919"
//! # or, when the host dials the guest (pull mode), instead of or together with `relay`:
//! # listen = "vsock:919"
//! state = "/var/lib/guestwatch"
//! metrics = "127.0.0.1:9917"
//! detector = "auto"
//! quiet_period = "150ms"
//! periodic_interval = "4h"
//! max_scans_per_minute = 60
//! scan_timeout = "30s"
//! ack_timeout = "10s"
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use guestwatch_daemon::config::{
    ConfigError as SettingsError, load_toml, pick_duration, pick_parsed,
};
use serde::Deserialize;

use crate::{
    cli::{DetectArgs, RunArgs, Target, WatchArgs},
    deliver::machine::MachineId,
    detect::{DetectorChoice, process::AttributionMode, schedule::ScheduleConfig},
};

/// Why settings are unusable: what the relay's can be too (an unreadable file, a bad value),
/// or the target of the inventory.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(
        "say what to inventory: --root DIR or --dbpath DIR (or root/dbpath in the config file)"
    )]
    NoTarget,
    #[error("--root and --dbpath are exclusive (the config file may set only one of them too)")]
    BothTargets,
}

/// The TOML file's keys (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub root: Option<PathBuf>,
    pub dbpath: Option<PathBuf>,
    pub relay: Option<String>,
    pub listen: Option<String>,
    pub state: Option<PathBuf>,
    pub metrics: Option<String>,
    pub detector: Option<String>,
    pub quiet_period: Option<String>,
    pub max_delay: Option<String>,
    pub periodic_interval: Option<String>,
    pub max_scans_per_minute: Option<u32>,
    pub disable_bpf: Option<String>,
    pub attribution: Option<String>,
    pub connect_timeout: Option<String>,
    pub ack_timeout: Option<String>,
    pub max_backoff: Option<String>,
    pub scan_timeout: Option<String>,
    /// The machine-id file the epoch is bound to (tests; default: the target's).
    pub machine_id_file: Option<PathBuf>,
}

impl FileConfig {
    /// Reads `path`, or returns the empty configuration when there is none.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Ok(load_toml(path)?),
            None => Ok(Self::default()),
        }
    }
}

/// What to inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// A system root; the database is located under it.
    Root(PathBuf),
    /// A database directory or file.
    DbPath(PathBuf),
}

impl TargetSpec {
    /// The system root, when one is scanned.
    pub fn root(&self) -> Option<&std::path::Path> {
        match self {
            Self::Root(root) => Some(root),
            Self::DbPath(_) => None,
        }
    }

    pub fn resolve(target: &Target, file: &FileConfig) -> Result<Self, ConfigError> {
        let from_flags = match (&target.root, &target.dbpath) {
            (Some(_), Some(_)) => return Err(ConfigError::BothTargets),
            (Some(root), None) => Some(Self::Root(root.clone())),
            (None, Some(db)) => Some(Self::DbPath(db.clone())),
            (None, None) => None,
        };
        if let Some(spec) = from_flags {
            return Ok(spec);
        }
        match (&file.root, &file.dbpath) {
            (Some(_), Some(_)) => Err(ConfigError::BothTargets),
            (Some(root), None) => Ok(Self::Root(root.clone())),
            (None, Some(db)) => Ok(Self::DbPath(db.clone())),
            (None, None) => Err(ConfigError::NoTarget),
        }
    }
}

/// How long a scan may run before it is abandoned.
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// Detection settings.
#[derive(Clone, Debug)]
pub struct DetectSettings {
    pub choice: DetectorChoice,
    pub schedule: ScheduleConfig,
    /// `None` when disabled (interval 0).
    pub periodic: Option<Duration>,
    pub disable_bpf: Option<String>,
    pub attribution: AttributionMode,
    /// A scan running longer is abandoned.
    pub scan_timeout: Duration,
}

impl DetectSettings {
    pub fn resolve(args: &DetectArgs, file: &FileConfig) -> Result<Self, ConfigError> {
        let defaults = ScheduleConfig::default();
        let choice = match (args.detector, &file.detector) {
            (Some(choice), _) => choice,
            (None, Some(text)) => <DetectorChoice as clap::ValueEnum>::from_str(text, true)
                .map_err(|_| SettingsError::Invalid {
                    key: "detector",
                    message: format!("`{text}` is not one of auto, ebpf, inotify, periodic"),
                })?,
            (None, None) => DetectorChoice::Auto,
        };
        let attribution = match (args.attribution, &file.attribution) {
            (Some(mode), _) => mode,
            (None, Some(text)) => <AttributionMode as clap::ValueEnum>::from_str(text, true)
                .map_err(|_| SettingsError::Invalid {
                    key: "attribution",
                    message: format!("`{text}` is not one of full, minimal"),
                })?,
            (None, None) => AttributionMode::Full,
        };
        let periodic = pick_duration(
            args.periodic_interval,
            &file.periodic_interval,
            "periodic_interval",
        )?
        .unwrap_or(Duration::from_secs(4 * 3600));
        let scan_timeout = pick_duration(args.scan_timeout, &file.scan_timeout, "scan_timeout")?
            .unwrap_or(DEFAULT_SCAN_TIMEOUT);
        if scan_timeout.is_zero() {
            return Err(SettingsError::Invalid {
                key: "scan_timeout",
                message: "must be longer than 0".into(),
            }
            .into());
        }
        Ok(Self {
            choice,
            schedule: ScheduleConfig {
                quiet_period: pick_duration(args.quiet_period, &file.quiet_period, "quiet_period")?
                    .unwrap_or(defaults.quiet_period),
                max_delay: pick_duration(args.max_delay, &file.max_delay, "max_delay")?
                    .unwrap_or(defaults.max_delay),
                max_scans_per_minute: args
                    .max_scans_per_minute
                    .or(file.max_scans_per_minute)
                    .unwrap_or(defaults.max_scans_per_minute),
            },
            periodic: (!periodic.is_zero()).then_some(periodic),
            disable_bpf: args
                .disable_bpf
                .clone()
                .or_else(|| file.disable_bpf.clone()),
            attribution,
            scan_timeout,
        })
    }
}

/// Settings of `watch`.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    pub target: TargetSpec,
    pub detect: DetectSettings,
}

impl WatchSettings {
    pub fn resolve(args: &WatchArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.config.as_deref())?;
        Ok(Self {
            target: TargetSpec::resolve(&args.target, &file)?,
            detect: DetectSettings::resolve(&args.detect, &file)?,
        })
    }
}

/// Where the relay listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayAddr {
    /// AF_VSOCK: the host is CID 2.
    Vsock { cid: u32, port: u32 },
    /// A Unix socket (a hybrid-vsock host socket, or tests).
    Unix(PathBuf),
}

impl FromStr for RelayAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or("expected vsock:CID:PORT")?;
            let cid = cid.parse().map_err(|_| format!("bad CID `{cid}`"))?;
            let port = port.parse().map_err(|_| format!("bad port `{port}`"))?;
            return Ok(Self::Vsock { cid, port });
        }
        Err(format!("`{text}`: expected vsock:CID:PORT or unix:PATH"))
    }
}

impl std::fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where the agent accepts the host's connection (pull mode: the relay dials the guest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on this port, any local CID; only the host (CID 2) is accepted.
    Vsock { port: u32 },
    /// A Unix socket (tests, and agents inventorying a root from outside the VM); only its
    /// owner's uid (or root) is accepted.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(port) = text.strip_prefix("vsock:") {
            let port = port
                .parse()
                .map_err(|_| format!("bad port `{port}` (expected vsock:PORT)"))?;
            return Ok(Self::Vsock { port });
        }
        Err(format!("`{text}`: expected vsock:PORT or unix:PATH"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock { port } => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The default relay address, used when neither `relay` nor `listen` is configured.
pub const DEFAULT_RELAY: &str = "vsock:2:919";

/// Settings of `run`.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub target: TargetSpec,
    pub detect: DetectSettings,
    /// Dial the relay here (push); `None` when the agent only listens.
    pub relay: Option<RelayAddr>,
    /// Accept the host's connection here (pull); `None` when the agent only dials.
    pub listen: Option<ListenAddr>,
    pub state: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_backoff: Duration,
    /// Overrides the machine-id file the epoch is bound to.
    pub machine_id_file: Option<PathBuf>,
}

impl RunSettings {
    pub fn resolve(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.config.as_deref())?;
        let listen = args
            .listen
            .clone()
            .or_else(|| file.listen.clone())
            .map(|text| {
                text.parse().map_err(|message| SettingsError::Invalid {
                    key: "listen",
                    message,
                })
            })
            .transpose()?;
        // `--listen` alone means pull only; with neither, the agent dials the host's relay.
        let relay_text = args.relay.clone().or_else(|| file.relay.clone());
        let relay_text = match (&relay_text, &listen) {
            (None, None) => Some(DEFAULT_RELAY.to_owned()),
            _ => relay_text,
        };
        let relay = relay_text
            .map(|text| {
                text.parse().map_err(|message| SettingsError::Invalid {
                    key: "relay",
                    message,
                })
            })
            .transpose()?;
        let metrics = pick_parsed(args.metrics, &file.metrics, "metrics")?;
        Ok(Self {
            target: TargetSpec::resolve(&args.target, &file)?,
            detect: DetectSettings::resolve(&args.detect, &file)?,
            relay,
            listen,
            state: args
                .state
                .clone()
                .or_else(|| file.state.clone())
                .unwrap_or_else(|| "/var/lib/guestwatch".into()),
            metrics,
            connect_timeout: pick_duration(
                args.connect_timeout,
                &file.connect_timeout,
                "connect_timeout",
            )?
            .unwrap_or(Duration::from_secs(5)),
            ack_timeout: pick_duration(args.ack_timeout, &file.ack_timeout, "ack_timeout")?
                .unwrap_or(Duration::from_secs(10)),
            max_backoff: pick_duration(args.max_backoff, &file.max_backoff, "max_backoff")?
                .unwrap_or(Duration::from_secs(5)),
            machine_id_file: args
                .machine_id_file
                .clone()
                .or_else(|| file.machine_id_file.clone()),
        })
    }

    /// The machine the state directory must belong to: the override file, else the
    /// `/etc/machine-id` of the root being inventoried (read inside it), else this machine's.
    pub fn machine_id(&self) -> MachineId {
        let name = Path::new("/etc/machine-id");
        match (&self.machine_id_file, &self.target) {
            (Some(file), _) => MachineId::read_file(file),
            (None, TargetSpec::Root(root)) => MachineId::read_in_root(root, name),
            (None, TargetSpec::DbPath(_)) => MachineId::read_in_root(Path::new("/"), name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses() {
        assert_eq!(
            "vsock:2:919".parse(),
            Ok(RelayAddr::Vsock { cid: 2, port: 919 })
        );
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(RelayAddr::Unix("/run/x.sock".into()))
        );
        assert!("vsock:2".parse::<RelayAddr>().is_err());
        assert!("tcp:1.2.3.4:5".parse::<RelayAddr>().is_err());
        assert!("unix:".parse::<RelayAddr>().is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("vsock:919".parse(), Ok(ListenAddr::Vsock { port: 919 }));
        assert_eq!(
            "unix:/run/gw.sock".parse(),
            Ok(ListenAddr::Unix("/run/gw.sock".into()))
        );
        assert!("vsock:2:919".parse::<ListenAddr>().is_err());
        assert!("vsock:".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("tcp:919".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn listen_alone_is_pull_only_and_both_can_be_given() {
        let dir = tempfile::tempdir().unwrap();
        let args = |relay: Option<&str>, listen: Option<&str>| RunArgs {
            target: Target {
                dbpath: Some(dir.path().into()),
                ..Target::default()
            },
            detect: DetectArgs::default(),
            relay: relay.map(str::to_owned),
            listen: listen.map(str::to_owned),
            state: None,
            metrics: None,
            connect_timeout: None,
            ack_timeout: None,
            max_backoff: None,
            machine_id_file: None,
            config: None,
        };
        let push = RunSettings::resolve(&args(None, None)).unwrap();
        assert_eq!(push.relay, Some(RelayAddr::Vsock { cid: 2, port: 919 }));
        assert_eq!(push.listen, None);
        let pull = RunSettings::resolve(&args(None, Some("vsock:919"))).unwrap();
        assert_eq!(pull.relay, None);
        assert_eq!(pull.listen, Some(ListenAddr::Vsock { port: 919 }));
        let both = RunSettings::resolve(&args(Some("unix:/r.sock"), Some("unix:/l.sock"))).unwrap();
        assert_eq!(both.relay, Some(RelayAddr::Unix("/r.sock".into())));
        assert_eq!(both.listen, Some(ListenAddr::Unix("/l.sock".into())));
        let err = RunSettings::resolve(&args(None, Some("vsock:2:919")))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("listen"), "{err}");
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "root = \"/srv/vm\"\nrelay = \"unix:/run/relay.sock\"\nquiet_period = \"300ms\"\n\
             periodic_interval = \"0\"\ndetector = \"inotify\"\nscan_timeout = \"45s\"\n\
             machine_id_file = \"/run/test-machine-id\"\n",
        )
        .unwrap();
        let args = RunArgs {
            target: Target::default(),
            detect: DetectArgs {
                quiet_period: Some(Duration::from_millis(50)),
                ..Default::default()
            },
            relay: None,
            listen: None,
            state: None,
            metrics: None,
            connect_timeout: None,
            ack_timeout: None,
            max_backoff: None,
            machine_id_file: None,
            config: Some(path),
        };
        let s = RunSettings::resolve(&args).unwrap();
        assert_eq!(s.target, TargetSpec::Root("/srv/vm".into()));
        assert_eq!(s.relay, Some(RelayAddr::Unix("/run/relay.sock".into())));
        assert_eq!(s.listen, None);
        assert_eq!(s.detect.schedule.quiet_period, Duration::from_millis(50));
        assert_eq!(s.detect.periodic, None);
        assert_eq!(s.detect.choice, DetectorChoice::Inotify);
        assert_eq!(s.ack_timeout, Duration::from_secs(10));
        assert_eq!(s.state, PathBuf::from("/var/lib/guestwatch"));
        assert_eq!(s.detect.scan_timeout, Duration::from_secs(45));
        assert_eq!(
            s.machine_id_file,
            Some(PathBuf::from("/run/test-machine-id"))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "rooot = \"/\"\n").unwrap();
        let err = FileConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("rooot"), "{err}");
        std::fs::write(&path, "dbpath = \"/x\"\nquiet_period = \"soon\"\n").unwrap();
        let file = FileConfig::load(Some(&path)).unwrap();
        let err = DetectSettings::resolve(&DetectArgs::default(), &file)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("quiet_period"), "{err}");
        std::fs::write(&path, "dbpath = \"/x\"\nscan_timeout = \"0\"\n").unwrap();
        let file = FileConfig::load(Some(&path)).unwrap();
        let err = DetectSettings::resolve(&DetectArgs::default(), &file)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("scan_timeout"), "{err}");
        let defaults = DetectSettings::resolve(&DetectArgs::default(), &FileConfig::default());
        assert_eq!(defaults.unwrap().scan_timeout, DEFAULT_SCAN_TIMEOUT);
    }

    #[test]
    fn a_target_is_required_and_unique() {
        let file = FileConfig::default();
        assert!(matches!(
            TargetSpec::resolve(&Target::default(), &file),
            Err(ConfigError::NoTarget)
        ));
        let both = FileConfig {
            root: Some("/".into()),
            dbpath: Some("/x".into()),
            ..Default::default()
        };
        assert!(matches!(
            TargetSpec::resolve(&Target::default(), &both),
            Err(ConfigError::BothTargets)
        ));
    }
}
